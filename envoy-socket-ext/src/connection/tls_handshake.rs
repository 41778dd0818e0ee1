//! Mutual TLS first, then, if both ends run Shunt, the pairing.
//!
//! The TLS handshake runs over the TCP connection and proves both identities. A Shunt client
//! offers Shunt's ALPN id only when it can reach its shuntd; a Shunt server picks it whenever
//! offered. If they agree, both derive the pairing token from the TLS exporter, which only
//! the two ends of this TLS session know, so no third process on the node can present it. Each
//! offer carries the SPIFFE id this end verified, so shuntd's rules can refuse a pair by the
//! identity of either end. The initiator offers first and then says so in a frame inside TLS;
//! the responder offers, waits for shuntd, and answers inside TLS. After an accept, payload moves through the FIFOs and the
//! TCP connection carries only doorbells; otherwise it carries TLS records.
//!
//! Records are fed to TLS one at a time until the mode is decided, so that nothing after the
//! last TLS record (the doorbells) is ever taken for TLS.

use shunt_sapi::message::PairRole;
use shunt_tls::TlsStream;

use super::pairing::{NoPair, Pairing};
use super::tls_payload::TlsPayload;
use super::{Connection, IoResult, Side, State, log};
use crate::host::{Host, LogLevel};
use crate::stats::{self, Mode};
use crate::wire::{self, ANSWER_LEN, Answer, RefuseReason};

/// The largest TLS record on the wire (RFC 8446 §5.2), header included.
const MAX_RECORD: usize = 5 + (1 << 14) + 256;

pub(super) struct TlsHandshake {
    tls: TlsStream,
    step: Step,
    /// Bytes of the record being fed that TLS has not taken yet.
    record_left: usize,
    /// Decrypted bytes of the peer's frame.
    frame: Vec<u8>,
    /// Why the initiator did not offer Shunt, if it did not.
    not_offered: Option<&'static str>,
}

enum Step {
    Handshaking,
    /// Initiator: offered the pairing and said so; waiting for the responder's answer.
    AwaitAnswer(Pairing),
    /// Responder: both run Shunt; waiting for the initiator's frame.
    AwaitInitiator,
}

impl TlsHandshake {
    pub(super) fn abandon(self) {
        if let Step::AwaitAnswer(pairing) = self.step {
            pairing.abandon();
        }
    }
}

/// What the handshake decided.
enum Next {
    /// Needs more from the peer.
    Wait,
    CutThrough(shunt_client::Session),
    Tls(Option<&'static str>),
    Fail(String),
}

impl Connection {
    /// Initiator: sends the ClientHello.
    pub(super) fn start_tls_client(&mut self, host: &mut dyn Host) {
        let context = match self.settings.tls_context() {
            Ok(context) => context,
            Err(reason) => {
                stats::handshake_failure("no_certificate");
                self.fail(host, reason);
                // The next hook reports the failure; make sure there is one soon.
                host.set_readable();
                return;
            }
        };
        // Offering Shunt commits the peer to wait for a pairing: only offer what can happen.
        let not_offered = crate::attach::worker_for(self.config())
            .is_none()
            .then_some(NoPair::SHUNTD_DOWN.reason);
        match TlsStream::client(&context, not_offered.is_none()) {
            Ok(tls) => {
                self.state = State::TlsHandshake(Box::new(TlsHandshake {
                    tls,
                    step: Step::Handshaking,
                    record_left: 0,
                    frame: Vec::new(),
                    not_offered,
                }));
                self.send_tls_output(host);
            }
            Err(e) => {
                stats::handshake_failure(e.failure().as_str());
                self.fail(host, format!("TLS: {e}"));
                // The next hook reports the failure; make sure there is one soon.
                host.set_readable();
            }
        }
    }

    /// Responder: the peer's first bytes are a TLS record.
    pub(super) fn start_tls_server(&mut self, host: &mut dyn Host) -> IoResult {
        let context = match self.settings.tls_context() {
            Ok(context) => context,
            Err(reason) => {
                stats::handshake_failure("no_certificate");
                return self.fail(host, reason);
            }
        };
        self.state = State::TlsHandshake(Box::new(TlsHandshake {
            tls: TlsStream::server(&context),
            step: Step::Handshaking,
            record_left: 0,
            frame: Vec::new(),
            not_offered: None,
        }));
        self.tls_handshake_read(host)
    }

    pub(super) fn tls_handshake_read(&mut self, host: &mut dyn Host) -> IoResult {
        loop {
            let State::TlsHandshake(hs) = &mut self.state else {
                unreachable!("tls_handshake_read runs in TlsHandshake")
            };
            if hs.record_left == 0 {
                hs.record_left = wire::tls_record_len(&self.inbound).unwrap_or(0);
            }
            if hs.record_left == 0 {
                if self.inbound.len() >= MAX_RECORD {
                    return self.fail(host, "TLS record too long".into());
                }
                // Records that arrived with the peer's FIN still count: a client done with its
                // handshake may send its payload and close before we have read a byte.
                let closed = self.read_inbound(host, MAX_RECORD).unwrap_or(true);
                if wire::tls_record_len(&self.inbound).is_some() {
                    continue;
                }
                if closed {
                    stats::handshake_failure("connection_closed");
                    return self.fail(host, "peer closed during the TLS handshake".into());
                }
                return IoResult::keep(0, false);
            }
            let fed = hs.tls.feed(&self.inbound[..hs.record_left]);
            let outcome = match fed {
                Ok(n) => {
                    hs.record_left -= n;
                    self.inbound.drain(..n);
                    self.advance(host)
                }
                Err(e) => {
                    stats::handshake_failure(e.failure().as_str());
                    Next::Fail(format!("TLS handshake: {e}"))
                }
            };
            // Alerts, handshake messages and frames, before anything else goes out.
            self.send_tls_output(host);
            match outcome {
                Next::Wait => {}
                Next::Fail(reason) => return self.fail(host, reason),
                Next::CutThrough(session) => {
                    self.start_cut_through(session);
                    return self.enter_mode(host);
                }
                Next::Tls(reason) => {
                    let State::TlsHandshake(hs) = std::mem::replace(&mut self.state, State::Start)
                    else {
                        unreachable!()
                    };
                    if let Some(reason) = reason {
                        self.note_fallback(host, Mode::Tls, reason);
                    }
                    self.count_mode(Mode::Tls);
                    self.state = State::Tls(Box::new(TlsPayload::new(hs.tls)));
                    return self.enter_mode(host);
                }
            }
        }
    }

    fn enter_mode(&mut self, host: &mut dyn Host) -> IoResult {
        match self.side {
            Side::Initiator => self.mode_decided(host),
            Side::Responder => {
                host.flush_write_buffer();
                match self.state {
                    State::CutThrough(_) => self.cut_through_read(host),
                    _ => self.tls_read(host),
                }
            }
        }
    }

    /// Acts on what the last record completed.
    fn advance(&mut self, host: &dyn Host) -> Next {
        let State::TlsHandshake(hs) = &mut self.state else {
            unreachable!()
        };
        if hs.tls.is_handshaking() {
            return Next::Wait;
        }
        if self.peer_identity.is_none()
            && let Some(peer) = hs.tls.peer()
        {
            let identity: std::sync::Arc<str> = peer.identity.as_str().into();
            log(host, LogLevel::Debug, || {
                format!("shunt: TLS peer {identity}")
            });
            self.peer_identity = Some(identity);
        }
        if matches!(hs.step, Step::Handshaking) {
            if !hs.tls.negotiated_shunt() {
                return Next::Tls(Some(hs.not_offered.unwrap_or("peer_without_shunt")));
            }
            let token = match hs.tls.pairing_token() {
                Ok(token) => token,
                Err(e) => return Next::Fail(format!("TLS exporter: {e}")),
            };
            match self.side {
                Side::Responder => hs.step = Step::AwaitInitiator,
                Side::Initiator => {
                    // Offer first, then tell the responder: its offer finds ours waiting.
                    let offered = Pairing::offer(
                        host,
                        &self.settings.config,
                        token,
                        PairRole::Initiator,
                        self.peer_identity.as_deref(),
                    );
                    match offered {
                        Ok(pairing) => {
                            hs.step = Step::AwaitAnswer(pairing);
                            hs.tls.write_plaintext(&Answer::Accept.emit());
                        }
                        Err(no_pair) => {
                            hs.tls
                                .write_plaintext(&Answer::Refuse(no_pair.tell_peer).emit());
                            return Next::Tls(Some(no_pair.reason));
                        }
                    }
                    return Next::Wait;
                }
            }
        }
        let frame = match read_frame(hs) {
            Ok(Some(frame)) => frame,
            Ok(None) => return Next::Wait,
            Err(reason) => return Next::Fail(reason),
        };
        let State::TlsHandshake(hs) = &mut self.state else {
            unreachable!()
        };
        match std::mem::replace(&mut hs.step, Step::Handshaking) {
            Step::AwaitInitiator => match frame {
                Answer::Refuse(reason) => Next::Tls(Some(reason.as_str())),
                Answer::Accept => {
                    let token = match hs.tls.pairing_token() {
                        Ok(token) => token,
                        Err(e) => return Next::Fail(format!("TLS exporter: {e}")),
                    };
                    let config = &self.settings.config;
                    let peer = self.peer_identity.as_deref();
                    let paired = Pairing::offer(host, config, token, PairRole::Responder, peer)
                        .and_then(|pairing| pairing.finish(host, config));
                    match paired {
                        Ok((session, took)) => {
                            stats::pairing(took);
                            hs.tls.write_plaintext(&Answer::Accept.emit());
                            Next::CutThrough(session)
                        }
                        Err(no_pair) => {
                            hs.tls
                                .write_plaintext(&Answer::Refuse(no_pair.tell_peer).emit());
                            if no_pair == NoPair::DENIED {
                                // `count_fallback`, spelt out: `hs` borrows the state.
                                stats::fallback(no_pair.reason);
                                self.fallback = Some(no_pair.reason);
                                Next::Fail("shuntd's rules deny this pair".into())
                            } else {
                                Next::Tls(Some(no_pair.reason))
                            }
                        }
                    }
                }
            },
            Step::AwaitAnswer(pairing) => match frame {
                Answer::Accept => match pairing.finish(host, &self.settings.config) {
                    Ok((session, took)) => {
                        stats::pairing(took);
                        Next::CutThrough(session)
                    }
                    // The responder already moved to the FIFOs: there is no way back.
                    Err(no_pair) => {
                        Next::Fail(format!("peer accepted, shuntd did not: {}", no_pair.reason))
                    }
                },
                Answer::Refuse(RefuseReason::Denied) => {
                    pairing.abandon();
                    stats::fallback(RefuseReason::Denied.as_str());
                    self.fallback = Some(RefuseReason::Denied.as_str());
                    Next::Fail("shuntd's rules deny this pair".into())
                }
                Answer::Refuse(reason) => {
                    pairing.abandon();
                    Next::Tls(Some(reason.as_str()))
                }
            },
            Step::Handshaking => unreachable!("handled above"),
        }
    }

    /// Moves what TLS has to send into `outbound` and sends it.
    pub(super) fn send_tls_output(&mut self, host: &mut dyn Host) {
        match &mut self.state {
            State::TlsHandshake(hs) => hs.tls.pending_output(&mut self.outbound),
            State::Tls(payload) => payload.tls.pending_output(&mut self.outbound),
            _ => return,
        }
        if !self.flush_outbound(host) {
            log(host, LogLevel::Trace, || {
                format!(
                    "shunt: {} TLS bytes wait for the socket",
                    self.outbound.len()
                )
            });
        }
    }
}

/// The peer's frame, once all of it has been decrypted.
fn read_frame(hs: &mut TlsHandshake) -> Result<Option<Answer>, String> {
    while hs.frame.len() < ANSWER_LEN {
        let mut buf = [0u8; ANSWER_LEN];
        let want = ANSWER_LEN - hs.frame.len();
        match hs.tls.read_plaintext(&mut buf[..want]) {
            Ok(shunt_tls::ReadOutcome::Data(n)) => hs.frame.extend_from_slice(&buf[..n]),
            Ok(shunt_tls::ReadOutcome::WouldBlock) => return Ok(None),
            Ok(_) => return Err("peer closed during the Shunt handshake".into()),
            Err(e) => return Err(format!("TLS: {e}")),
        }
    }
    let frame: &[u8; ANSWER_LEN] = hs.frame[..].try_into().expect("len");
    Answer::parse(frame)
        .map(Some)
        .map_err(|e| format!("bad Shunt frame: {e}"))
}
