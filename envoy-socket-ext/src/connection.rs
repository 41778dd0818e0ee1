//! One connection's transport: decide the mode in-band, then move payload.
//!
//! The initiator (Envoy's upstream side) offers a pairing to its shuntd and sends a hello; the
//! responder offers the same token to its own shuntd (the same one, if the two sidecars share a
//! node) and answers. If shuntd paired them, payload moves through the FIFO pair and the TCP
//! connection carries only one-byte doorbells, and closes when the connection does; a
//! half-close is the FIFO's writer-shutdown flag plus a doorbell. Otherwise the connection
//! carries payload itself. Either way the connection works.
//!
//! Envoy's socket events are edge-triggered: every path that leaves work behind (FIFO data, a
//! read limit, a full FIFO) arranges its own retry with `set_readable`, `set_writable` or a
//! peer doorbell.

use std::io::{ErrorKind, IoSlice};
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};
use shunt_client::{Error as ClientError, PendingConnect, Session, Worker};
use shunt_sapi::ErrorCode;
use shunt_sapi::message::{PAIR_TOKEN_LEN, PairOffer, PairRole};

use crate::attach;
use crate::config::{PeerPolicy, SocketConfig};
use crate::host::{Host, Io, LogLevel};
use crate::stats::{Mode, STATS};
use crate::wire::{self, ANSWER_LEN, Answer, HELLO_LEN, Hello, NONCE_LEN, RefuseReason, Sniff};

/// What a hook tells Envoy to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoResult {
    pub close: bool,
    pub bytes: u64,
    pub end_stream: bool,
}

impl IoResult {
    fn keep(bytes: usize, end_stream: bool) -> Self {
        Self {
            close: false,
            bytes: bytes as u64,
            end_stream,
        }
    }
    pub fn closed() -> Self {
        Self {
            close: true,
            bytes: 0,
            end_stream: false,
        }
    }
}

/// Which end of the TCP connection this socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Envoy's upstream (cluster) side: it opened the connection and speaks first.
    Initiator,
    /// Envoy's downstream (listener) side.
    Responder,
}

/// Bytes read from the kernel socket per call while it carries payload.
const PLAIN_CHUNK: usize = 64 * 1024;
/// Bytes moved from the FIFO per `read_buffer_add`.
const FIFO_CHUNK: usize = 64 * 1024;

enum State {
    Start,
    /// Initiator: hello sent, waiting for the answer.
    AwaitAnswer {
        worker: Worker,
        pending: PendingConnect,
        since: Instant,
    },
    /// Responder: reading the first bytes to learn whether the peer speaks Shunt.
    Sniffing,
    Plain,
    CutThrough(CutThrough),
    Closed,
}

struct CutThrough {
    session: Session,
    /// The FIFO was full; a peer doorbell means space may have freed.
    write_blocked: bool,
    /// The peer's FIN (or reset) arrived on the TCP connection.
    tcp_closed: bool,
    write_shut: bool,
    /// A doorbell could not be written yet.
    doorbell_owed: bool,
}

pub struct Connection {
    config: Arc<SocketConfig>,
    side: Side,
    state: State,
    /// Handshake bytes read but not yet consumed.
    inbound: Vec<u8>,
    /// Handshake bytes not yet written.
    outbound: Vec<u8>,
    scratch: Vec<u8>,
    failure: Option<String>,
}

fn log(host: &dyn Host, level: LogLevel, msg: impl FnOnce() -> String) {
    if host.log_enabled(level) {
        host.log(level, &msg());
    }
}

/// The pairing token of plain mode: both ends know the namespace secret and see the nonce.
fn plain_token(secret: &[u8], nonce: &[u8; NONCE_LEN]) -> [u8; PAIR_TOKEN_LEN] {
    let mut h = Sha256::new();
    h.update(b"shunt plain pairing v1");
    h.update((secret.len() as u32).to_be_bytes());
    h.update(secret);
    h.update(nonce);
    h.finalize().into()
}

impl Connection {
    pub fn new(config: Arc<SocketConfig>, side: Side) -> Self {
        Self {
            config,
            side,
            state: State::Start,
            inbound: Vec::new(),
            outbound: Vec::new(),
            scratch: vec![0u8; PLAIN_CHUNK],
            failure: None,
        }
    }

    pub fn failure_reason(&self) -> &str {
        self.failure.as_deref().unwrap_or("")
    }

    fn fail(&mut self, host: &dyn Host, reason: String) -> IoResult {
        log(host, LogLevel::Debug, || {
            format!("shunt: closing: {reason}")
        });
        self.failure = Some(reason);
        IoResult::closed()
    }

    fn fall_back(&mut self, host: &dyn Host, reason: &'static str) {
        STATS.fallback(reason);
        log(host, LogLevel::Debug, || {
            format!("shunt: plain TCP for this connection: {reason}")
        });
        STATS.connection(Mode::Plain);
        self.state = State::Plain;
    }

    // ---- hooks ----

    pub fn on_connected(&mut self, host: &mut dyn Host) {
        match self.side {
            Side::Responder => {
                host.raise_connected();
                self.state = State::Sniffing;
            }
            Side::Initiator => match self.offer(host) {
                Ok((worker, pending)) => {
                    self.state = State::AwaitAnswer {
                        worker,
                        pending,
                        since: Instant::now(),
                    };
                    self.flush_outbound(host);
                }
                Err(reason) => {
                    self.fall_back(host, reason);
                    host.raise_connected();
                }
            },
        }
    }

    /// Initiator: offers the pairing to shuntd and queues the hello that lets the peer offer
    /// the same token. The offer goes first, so it is waiting when the peer's arrives.
    fn offer(&mut self, host: &dyn Host) -> Result<(Worker, PendingConnect), &'static str> {
        let (Some(local), Some(remote)) = (host.local_address(), host.remote_address()) else {
            return Err("no_address");
        };
        let worker = attach::worker_for(&self.config).ok_or("shuntd_down")?;
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|_| "no_randomness")?;
        let token = plain_token(self.config.namespace.secret.as_bytes(), &nonce);
        let pending = worker
            .start_pair(PairOffer {
                token,
                role: PairRole::Initiator,
                local,
                remote,
            })
            .map_err(|_| "shuntd_down")?;
        self.outbound.extend_from_slice(&Hello { nonce }.emit());
        Ok((worker, pending))
    }

    pub fn do_read(&mut self, host: &mut dyn Host) -> IoResult {
        match self.state {
            State::Start | State::Closed => IoResult::keep(0, false),
            State::Sniffing => self.sniff(host),
            State::AwaitAnswer { .. } => self.await_answer(host),
            State::Plain => self.plain_read(host),
            State::CutThrough(_) => self.cut_through_read(host),
        }
    }

    pub fn do_write(&mut self, host: &mut dyn Host, end_stream: bool) -> IoResult {
        if !self.outbound.is_empty() {
            self.flush_outbound(host);
        }
        match self.state {
            // Envoy writes before the mode is decided; hold its data until then.
            State::Start | State::Sniffing | State::AwaitAnswer { .. } | State::Closed => {
                IoResult::keep(0, false)
            }
            State::Plain => self.plain_write(host, end_stream),
            State::CutThrough(_) => self.cut_through_write(host, end_stream),
        }
    }

    pub fn close(&mut self, abort: bool) {
        if let State::CutThrough(ct) = std::mem::replace(&mut self.state, State::Closed) {
            if abort {
                ct.session.reset();
            } else {
                ct.session.close();
            }
        } else if let State::AwaitAnswer {
            worker, pending, ..
        } = std::mem::replace(&mut self.state, State::Closed)
        {
            worker.abandon_connect(pending);
        }
    }

    // ---- handshake ----

    fn flush_outbound(&mut self, host: &mut dyn Host) {
        while !self.outbound.is_empty() {
            match host.io_write(&self.outbound) {
                Io::Done(n) => {
                    self.outbound.drain(..n);
                }
                Io::Again => {
                    host.set_writable();
                    return;
                }
                Io::Eof | Io::Error => return,
            }
        }
    }

    /// Reads until `inbound` holds `want` bytes. `Ok(false)`: not yet.
    fn fill_inbound(&mut self, host: &mut dyn Host, want: usize) -> Result<bool, Io> {
        while self.inbound.len() < want {
            let mut buf = [0u8; HELLO_LEN];
            let room = want - self.inbound.len();
            match host.io_read(&mut buf[..room]) {
                Io::Done(n) => self.inbound.extend_from_slice(&buf[..n]),
                Io::Again => return Ok(false),
                other => return Err(other),
            }
            if self.side == Side::Responder && wire::sniff(&self.inbound) == Sniff::Other {
                return Ok(true);
            }
        }
        Ok(true)
    }

    /// Responder: learns from the first bytes whether the peer speaks Shunt.
    fn sniff(&mut self, host: &mut dyn Host) -> IoResult {
        let eof = match self.fill_inbound(host, HELLO_LEN) {
            Ok(false) => return IoResult::keep(0, false),
            Ok(true) => false,
            Err(Io::Eof) => true,
            Err(_) => return self.fail(host, "connection reset during the handshake".into()),
        };
        if wire::sniff(&self.inbound) != Sniff::Shunt || eof {
            if self.config.peers == PeerPolicy::Strict {
                STATS.fallback("refused_peer_without_shunt");
                return self.fail(
                    host,
                    "peer does not speak Shunt and this listener is strict".into(),
                );
            }
            self.fall_back(host, "peer_without_shunt");
            host.flush_write_buffer();
            return self.plain_read_after_handshake(host, eof);
        }
        let hello = match Hello::parse(self.inbound[..HELLO_LEN].try_into().expect("len")) {
            Ok(h) => h,
            Err(e) => return self.fail(host, format!("bad Shunt hello: {e}")),
        };
        self.inbound.drain(..HELLO_LEN);
        let answer = self.answer(host, &hello);
        self.outbound.extend_from_slice(&answer.emit());
        self.flush_outbound(host);
        // Envoy may already have written (a server that speaks first); now it can go out.
        host.flush_write_buffer();
        match self.state {
            State::CutThrough(_) => self.cut_through_read(host),
            _ => self.plain_read(host),
        }
    }

    /// Responder: offers the same token and waits, briefly, for shuntd to pair the two ends.
    /// The initiator offered before it sent the hello, so the wait is one shuntd round trip.
    fn answer(&mut self, host: &dyn Host, hello: &Hello) -> Answer {
        let refuse = |this: &mut Self, reason: RefuseReason, why: &'static str| {
            this.fall_back(host, why);
            Answer::Refuse(reason)
        };
        let (Some(local), Some(remote)) = (host.local_address(), host.remote_address()) else {
            return refuse(self, RefuseReason::Refused, "no_address");
        };
        let Some(worker) = attach::worker_for(&self.config) else {
            return refuse(self, RefuseReason::ShuntdDown, "shuntd_down");
        };
        let token = plain_token(self.config.namespace.secret.as_bytes(), &hello.nonce);
        let offer = PairOffer {
            token,
            role: PairRole::Responder,
            local,
            remote,
        };
        let since = Instant::now();
        let Ok(pending) = worker.start_pair(offer) else {
            return refuse(self, RefuseReason::ShuntdDown, "shuntd_down");
        };
        match finish_pairing(&worker, pending, since + self.config.pairing_timeout()) {
            Ok(session) => {
                STATS.pairing(since.elapsed());
                self.start_cut_through(session);
                Answer::Accept
            }
            Err(ClientError::Refused {
                code: ErrorCode::PairTimeout,
                ..
            })
            | Err(ClientError::Timeout) => refuse(self, RefuseReason::Timeout, "pairing_timeout"),
            Err(ClientError::Refused {
                code: ErrorCode::Denied,
                ..
            }) => refuse(self, RefuseReason::Refused, "pairing_denied"),
            Err(_) => refuse(self, RefuseReason::Refused, "pairing_refused"),
        }
    }

    /// Initiator: reads the responder's answer and switches mode.
    fn await_answer(&mut self, host: &mut dyn Host) -> IoResult {
        match self.fill_inbound(host, ANSWER_LEN) {
            Ok(false) => return IoResult::keep(0, false),
            Ok(true) => {}
            Err(_) => {
                return self.fail(
                    host,
                    "peer closed the connection during the handshake".into(),
                );
            }
        }
        let State::AwaitAnswer {
            worker,
            pending,
            since,
        } = std::mem::replace(&mut self.state, State::Start)
        else {
            unreachable!("await_answer runs in AwaitAnswer")
        };
        let answer = Answer::parse(self.inbound[..ANSWER_LEN].try_into().expect("len"));
        self.inbound.drain(..ANSWER_LEN);
        match answer {
            Ok(Answer::Accept) => {
                // The responder was told after us, so our session is already queued.
                let deadline = Instant::now() + self.config.pairing_timeout();
                match finish_pairing(&worker, pending, deadline) {
                    Ok(session) => {
                        STATS.pairing(since.elapsed());
                        self.start_cut_through(session);
                    }
                    Err(e) => {
                        // The responder already moved to the FIFOs: there is no way back.
                        return self.fail(host, format!("peer accepted, shuntd did not: {e}"));
                    }
                }
            }
            Ok(Answer::Refuse(reason)) => {
                worker.abandon_connect(pending);
                self.fall_back(host, reason.as_str());
            }
            Err(e) => {
                worker.abandon_connect(pending);
                return self.fail(host, format!("bad Shunt answer: {e}"));
            }
        }
        host.raise_connected();
        host.flush_write_buffer();
        // Whatever followed the answer is payload (plain) or doorbells (cut-through).
        match self.state {
            State::CutThrough(_) => self.cut_through_read(host),
            _ => self.plain_read_after_handshake(host, false),
        }
    }

    fn start_cut_through(&mut self, mut session: Session) {
        session.use_external_wakeups();
        STATS.connection(Mode::CutThrough);
        self.state = State::CutThrough(CutThrough {
            session,
            write_blocked: false,
            tcp_closed: false,
            write_shut: false,
            doorbell_owed: false,
        });
    }

    // ---- plain ----

    /// Hands Envoy the payload that arrived with the handshake bytes, then reads on (unless
    /// the peer already ended its stream).
    fn plain_read_after_handshake(&mut self, host: &mut dyn Host, eof: bool) -> IoResult {
        let early = std::mem::take(&mut self.inbound);
        host.read_buffer_add(&early);
        STATS.bytes(Mode::Plain, early.len());
        if eof {
            return IoResult::keep(early.len(), true);
        }
        let more = self.plain_read(host);
        IoResult::keep(early.len() + more.bytes as usize, more.end_stream)
    }

    fn plain_read(&mut self, host: &mut dyn Host) -> IoResult {
        let mut total = 0;
        loop {
            if total >= self.config.max_read_per_event || host.should_drain_read_buffer() {
                host.set_readable();
                return IoResult::keep(total, false);
            }
            match host.io_read_into_buffer(PLAIN_CHUNK) {
                Io::Done(n) => {
                    total += n;
                    STATS.bytes(Mode::Plain, n);
                }
                Io::Again => return IoResult::keep(total, false),
                Io::Eof => return IoResult::keep(total, true),
                Io::Error => {
                    self.failure = Some("connection reset".into());
                    return IoResult::closed();
                }
            }
        }
    }

    fn plain_write(&mut self, host: &mut dyn Host, end_stream: bool) -> IoResult {
        let mut total = 0;
        while host.write_slices().iter().any(|s| !s.is_empty()) {
            match host.io_write_from_buffer() {
                Io::Done(n) => total += n,
                Io::Again => return IoResult::keep(total, false),
                Io::Eof | Io::Error => {
                    self.failure = Some("connection reset".into());
                    return IoResult::closed();
                }
            }
        }
        if end_stream {
            host.io_shutdown_write();
        }
        IoResult::keep(total, false)
    }

    // ---- cut-through ----

    fn cut_through_read(&mut self, host: &mut dyn Host) -> IoResult {
        let State::CutThrough(ct) = &mut self.state else {
            unreachable!("cut_through_read runs in CutThrough")
        };
        // 1. Doorbells, and the peer's FIN. Any non-doorbell byte is a broken peer.
        let mut bells = std::mem::take(&mut self.inbound);
        ct.tcp_closed |= read_doorbells(host, &mut bells);
        if bells.iter().any(|b| *b != wire::DOORBELL) {
            return self.fail(host, "peer sent payload on a cut-through connection".into());
        }
        let State::CutThrough(ct) = &mut self.state else {
            unreachable!()
        };
        ct.session.on_peer_wakeup();
        if ct.write_blocked {
            ct.write_blocked = false;
            host.set_writable();
        }

        // 2. Payload from the FIFO, up to this event's share.
        let mut total = 0;
        let mut end_stream = false;
        let mut fifo_empty = false;
        let limit = self.config.max_read_per_event;
        while total < limit && !host.should_drain_read_buffer() {
            let want = FIFO_CHUNK.min(limit - total);
            match ct.session.try_read(&mut self.scratch[..want]) {
                Ok(0) => {
                    end_stream = true;
                    break;
                }
                Ok(n) => {
                    host.read_buffer_add(&self.scratch[..n]);
                    total += n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    fifo_empty = true;
                    break;
                }
                Err(e) => {
                    self.failure = Some(format!("cut-through session: {e}"));
                    return IoResult::closed();
                }
            }
        }
        STATS.bytes(Mode::CutThrough, total);
        let tcp_closed = ct.tcp_closed;
        let bell_count = bells.len();
        log(host, LogLevel::Trace, || {
            format!(
                "shunt: {bell_count} doorbells, read {total} from the FIFO, end_stream={end_stream}, fifo_empty={fifo_empty}, tcp_closed={tcp_closed}"
            )
        });
        if !end_stream && !fifo_empty {
            // Stopped at the limit: come back for the rest.
            host.set_readable();
        }
        self.ring_if_due(host);
        if tcp_closed && fifo_empty {
            // The peer's socket closed but its side of the FIFO never ended: it died or aborted.
            self.failure = Some("peer went away without finishing its stream".into());
            return IoResult {
                close: true,
                bytes: total as u64,
                end_stream: false,
            };
        }
        IoResult::keep(total, end_stream)
    }

    fn cut_through_write(&mut self, host: &mut dyn Host, end_stream: bool) -> IoResult {
        let State::CutThrough(ct) = &mut self.state else {
            unreachable!("cut_through_write runs in CutThrough")
        };
        if ct.write_shut {
            return IoResult::keep(0, false);
        }
        let mut total = 0;
        let mut blocked = false;
        loop {
            let result = {
                let slices = host.write_slices();
                if slices.iter().all(|s| s.is_empty()) {
                    break;
                }
                let io: Vec<IoSlice<'_>> = slices.iter().map(|s| IoSlice::new(s)).collect();
                ct.session.try_write_vectored(&io)
            };
            match result {
                Ok(n) => {
                    host.write_drain(n);
                    total += n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    // The session asked the reader to wake us once it frees space.
                    blocked = true;
                    break;
                }
                Err(e) => {
                    self.failure = Some(format!("cut-through session: {e}"));
                    return IoResult::closed();
                }
            }
        }
        ct.write_blocked = blocked;
        if blocked && end_stream {
            // Once its upstream has finished, Envoy may flush-close this connection: it then
            // stops read events and waits only for writes, so the peer's space doorbell would
            // never be read. Poll instead: take any doorbells here, and come back until the
            // FIFO has room. This only happens for the last bytes of a stream.
            let mut bells = Vec::new();
            ct.tcp_closed |= read_doorbells(host, &mut bells);
            ct.session.on_peer_wakeup();
            host.set_writable();
        }
        STATS.bytes(Mode::CutThrough, total);
        log(host, LogLevel::Trace, || {
            format!("shunt: wrote {total} to the FIFO, blocked={blocked}, end_stream={end_stream}")
        });
        let finish = end_stream && !blocked;
        if finish {
            if let Err(e) = ct.session.shutdown_write() {
                self.failure = Some(format!("cut-through session: {e}"));
                return IoResult::closed();
            }
            ct.write_shut = true;
        }
        // The half-close travels in the FIFO (its writer-shutdown flag) and this doorbell, not
        // as a TCP FIN: the peer's reads must still be able to wake us for space after our
        // writes end, and a shut TCP write side could no longer carry that doorbell back.
        self.ring_if_due(host);
        IoResult::keep(total, false)
    }

    /// Sends one doorbell if the session says the peer must be woken (or one is owed).
    fn ring_if_due(&mut self, host: &mut dyn Host) {
        let State::CutThrough(ct) = &mut self.state else {
            return;
        };
        if !(ct.session.take_peer_wakeup() || ct.doorbell_owed) {
            return;
        }
        let result = host.io_write(&[wire::DOORBELL]);
        log(host, LogLevel::Trace, || {
            format!("shunt: doorbell sent: {result:?}")
        });
        match result {
            Io::Done(_) => ct.doorbell_owed = false,
            Io::Again => {
                ct.doorbell_owed = true;
                host.set_writable();
            }
            // The peer is gone; the read side will notice and close.
            Io::Eof | Io::Error => ct.doorbell_owed = false,
        }
    }
}

/// Reads what the peer sent on a cut-through connection into `bells`, until the socket has
/// nothing more. Returns whether the peer's socket closed. A close with doorbells unread
/// arrives as a reset; the FIFO, not the TCP connection, says whether the stream ended cleanly.
fn read_doorbells(host: &mut dyn Host, bells: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match host.io_read(&mut buf) {
            Io::Done(n) => bells.extend_from_slice(&buf[..n]),
            Io::Again => return false,
            Io::Eof | Io::Error => return true,
        }
    }
}

/// Waits until shuntd answers a pairing offer, or `deadline`.
fn finish_pairing(
    worker: &Worker,
    pending: PendingConnect,
    deadline: Instant,
) -> Result<Session, ClientError> {
    loop {
        match worker.poll_connect(&pending) {
            Ok(Some(session)) => return Ok(session),
            Ok(None) => {}
            Err(e) => return Err(e),
        }
        let now = Instant::now();
        if now >= deadline {
            worker.abandon_connect(pending);
            return Err(ClientError::Timeout);
        }
        worker.wait(Some(deadline - now))?;
    }
}
