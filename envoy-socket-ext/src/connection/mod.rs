//! One connection's transport: decide the mode in-band, then move payload.
//!
//! Deciding, by configuration:
//! * **mutual TLS** ([`tls_handshake`]): the TLS handshake runs first; when ALPN says both ends
//!   run Shunt, both derive the pairing token from the TLS exporter and offer it to their
//!   shuntd, and one frame each way inside TLS tells whether shuntd paired them.
//! * **plain** ([`plain_handshake`]): the initiator sends a nonce in a hello; both key the
//!   pairing token with the namespace secret.
//!
//! Moving payload, in one of three modes:
//! * **cut-through** ([`cut_through`]): through the FIFO pair; the TCP connection carries only
//!   one-byte doorbells, and closes when the connection does;
//! * **tls** ([`tls_payload`]): TLS records over the TCP connection;
//! * **plain** ([`passthrough`]): the TCP connection itself.
//!
//! Either way the connection works.
//!
//! Envoy's socket events are edge-triggered: every path that leaves work behind (buffered
//! data, a read limit, a full FIFO) arranges its own retry with `set_readable`, `set_writable`
//! or a peer doorbell.

mod cut_through;
mod pairing;
mod passthrough;
mod plain_handshake;
mod tls_handshake;
mod tls_payload;

use std::sync::Arc;

use crate::config::{PeerPolicy, Settings, SocketConfig};
use crate::host::{Host, Io, LogLevel};
use crate::identity::{self, PeerRecord};
use crate::stats::{self, Mode};

use cut_through::CutThrough;
use pairing::Pairing;
use tls_handshake::TlsHandshake;
use tls_payload::TlsPayload;

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

/// Bytes moved per call while payload flows: socket reads, FIFO reads, TLS records.
const CHUNK: usize = 64 * 1024;

enum State {
    Start,
    /// Responder: reading the first bytes to learn what the peer speaks.
    Sniffing,
    /// Plain-mode initiator: hello sent, waiting for the answer.
    AwaitAnswer(Pairing),
    TlsHandshake(Box<TlsHandshake>),
    Plain,
    Tls(Box<TlsPayload>),
    CutThrough(CutThrough),
    /// Closed by Envoy, or failed: then the next hook tells Envoy to close.
    Closed,
}

pub struct Connection {
    settings: Arc<Settings>,
    side: Side,
    state: State,
    /// Bytes read from the socket and not yet consumed (handshake frames, TLS records).
    inbound: Vec<u8>,
    /// Bytes for the socket not yet written (handshake frames, TLS records).
    outbound: Vec<u8>,
    scratch: Vec<u8>,
    failure: Option<String>,
    /// Envoy's id of this connection, under which the companion filter finds its peer.
    connection_id: Option<u64>,
    /// The SPIFFE id the TLS handshake verified.
    peer_identity: Option<Arc<str>>,
    /// The mode chosen, once it is.
    mode: Option<Mode>,
    /// Why this connection is not cut-through, once that is known.
    fallback: Option<&'static str>,
}

fn log(host: &dyn Host, level: LogLevel, msg: impl FnOnce() -> String) {
    if host.log_enabled(level) {
        host.log(level, &msg());
    }
}

impl Connection {
    pub fn new(settings: Arc<Settings>, side: Side) -> Self {
        Self {
            settings,
            side,
            state: State::Start,
            inbound: Vec::new(),
            outbound: Vec::new(),
            scratch: vec![0u8; CHUNK],
            failure: None,
            connection_id: None,
            peer_identity: None,
            mode: None,
            fallback: None,
        }
    }

    fn config(&self) -> &SocketConfig {
        &self.settings.config
    }

    pub fn failure_reason(&self) -> &str {
        self.failure.as_deref().unwrap_or("")
    }

    /// Ends the connection: Envoy closes it when the hook returns.
    fn fail(&mut self, host: &dyn Host, reason: String) -> IoResult {
        log(host, LogLevel::Debug, || {
            format!("shunt: closing: {reason}")
        });
        self.failure = Some(reason);
        if self.mode.is_none() && self.fallback.is_some() {
            // Refused before any mode: the companion filter counts why when it closes.
            self.record();
        }
        self.close(true);
        IoResult::closed()
    }

    /// Carries payload over the TCP connection itself, in the clear.
    fn fall_back_to_plain(&mut self, host: &dyn Host, reason: &'static str) {
        self.note_fallback(host, Mode::Plain, reason);
        self.count_mode(Mode::Plain);
        self.state = State::Plain;
    }

    /// Counts why this connection is not cut-through (it fell back, or is refused), for
    /// shuntd and for the companion filter.
    fn count_fallback(&mut self, reason: &'static str) {
        stats::fallback(reason);
        self.fallback = Some(reason);
    }

    /// Counts and logs (at debug, once per connection) why the connection goes `mode` rather
    /// than cut-through.
    fn note_fallback(&mut self, host: &dyn Host, mode: Mode, reason: &'static str) {
        self.count_fallback(reason);
        log(host, LogLevel::Debug, || {
            format!("shunt: {} for this connection: {reason}", mode.as_str())
        });
    }

    /// Whether a peer without Shunt (plain or TLS) is served, or refused with a reason.
    fn refuse_if_strict(&mut self, host: &dyn Host, what: &str) -> Option<IoResult> {
        (self.config().peers == PeerPolicy::Strict).then(|| {
            self.count_fallback("refused_by_strict_policy");
            self.fail(host, format!("{what}, and this listener is strict"))
        })
    }

    // ---- hooks ----

    pub fn on_connected(&mut self, host: &mut dyn Host) {
        self.connection_id = host.connection_id();
        match self.side {
            Side::Responder => {
                host.raise_connected();
                self.state = State::Sniffing;
            }
            Side::Initiator if self.settings.uses_tls() => self.start_tls_client(host),
            Side::Initiator => self.start_plain_initiator(host),
        }
    }

    pub fn do_read(&mut self, host: &mut dyn Host) -> IoResult {
        let result = self.read_by_state(host);
        stats::flush_if_due(self.config());
        result
    }

    fn read_by_state(&mut self, host: &mut dyn Host) -> IoResult {
        match self.state {
            State::Start => IoResult::keep(0, false),
            State::Closed if self.failure.is_some() => IoResult::closed(),
            State::Closed => IoResult::keep(0, false),
            State::Sniffing => self.sniff(host),
            State::AwaitAnswer(_) => self.await_answer(host),
            State::TlsHandshake(_) => self.tls_handshake_read(host),
            State::Plain => self.plain_read(host),
            State::Tls(_) => self.tls_read(host),
            State::CutThrough(_) => self.cut_through_read(host),
        }
    }

    pub fn do_write(&mut self, host: &mut dyn Host, end_stream: bool) -> IoResult {
        self.flush_outbound(host);
        match self.state {
            State::Closed if self.failure.is_some() => IoResult::closed(),
            // Envoy writes before the mode is decided; hold its data until then.
            State::Start
            | State::Sniffing
            | State::AwaitAnswer(_)
            | State::TlsHandshake(_)
            | State::Closed => IoResult::keep(0, false),
            State::Plain => self.plain_write(host, end_stream),
            State::Tls(_) => self.tls_write(host, end_stream),
            State::CutThrough(_) => self.cut_through_write(host, end_stream),
        }
    }

    /// Releases what the connection holds at shuntd: its session, or a pairing offer still
    /// waiting there.
    pub fn close(&mut self, abort: bool) {
        match std::mem::replace(&mut self.state, State::Closed) {
            State::CutThrough(ct) => ct.close(abort),
            State::AwaitAnswer(pairing) => pairing.abandon(),
            State::TlsHandshake(hs) => hs.abandon(),
            _ => {}
        }
        stats::flush(self.config());
    }

    /// Counts the mode just chosen, reports to shuntd what this thread has counted, and
    /// records the peer for the companion filter.
    fn count_mode(&mut self, mode: Mode) {
        stats::connection(mode);
        stats::flush(self.config());
        self.mode = Some(mode);
        self.record();
    }

    /// Records what is known of this connection for the companion filter.
    fn record(&self) {
        if let Some(id) = self.connection_id {
            let peer = PeerRecord {
                identity: self.peer_identity.clone(),
                mode: self.mode,
                fallback: self.fallback,
            };
            identity::record(id, peer);
        }
    }

    // ---- socket helpers shared by the handshakes ----

    /// Writes what `outbound` holds, as far as the socket takes it. Returns whether all went.
    /// A socket that refuses (EAGAIN) raises a write event when it has room again.
    fn flush_outbound(&mut self, host: &mut dyn Host) -> bool {
        while !self.outbound.is_empty() {
            match host.io_write(&self.outbound) {
                Io::Done(n) => {
                    self.outbound.drain(..n);
                }
                Io::Again | Io::Eof | Io::Error => return false,
            }
        }
        true
    }

    /// Reads what the socket has into `inbound`, at most `max` bytes in all. `Ok(true)`: the
    /// peer has shut its write side (what came before is in `inbound`).
    fn read_inbound(&mut self, host: &mut dyn Host, max: usize) -> Result<bool, ()> {
        while self.inbound.len() < max {
            let room = (max - self.inbound.len()).min(self.scratch.len());
            match host.io_read(&mut self.scratch[..room]) {
                Io::Done(n) => self.inbound.extend_from_slice(&self.scratch[..n]),
                Io::Again => return Ok(false),
                Io::Eof => return Ok(true),
                Io::Error => return Err(()),
            }
        }
        Ok(false)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(id) = self.connection_id {
            identity::forget(id);
        }
    }
}
