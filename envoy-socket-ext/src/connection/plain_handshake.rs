//! Plain mode's handshake, and the responder's first look at a connection.
//!
//! The initiator offers a pairing to its shuntd and sends a hello with a nonce; the responder
//! offers the same token to its own shuntd (the same one, if the two sidecars share a node)
//! and answers. The token is keyed by the namespace secret, so only apps of that namespace can
//! present it.

use sha2::{Digest, Sha256};
use shunt_sapi::message::{PAIR_TOKEN_LEN, PairRole};

use super::pairing::{NoPair, Pairing};
use super::{Connection, IoResult, Side, State};
use crate::host::Host;
use crate::stats;
use crate::wire::{self, ANSWER_LEN, Answer, HELLO_LEN, Hello, NONCE_LEN, RefuseReason, Sniff};

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
    /// Initiator: offers the pairing to shuntd and queues the hello that lets the peer offer
    /// the same token. The offer goes first, so it is waiting when the peer's arrives.
    pub(super) fn start_plain_initiator(&mut self, host: &mut dyn Host) {
        let mut nonce = [0u8; NONCE_LEN];
        let offered = getrandom::fill(&mut nonce)
            .map_err(|_| NoPair {
                reason: "no_randomness",
                tell_peer: RefuseReason::Refused,
            })
            .and_then(|()| {
                let token = plain_token(self.config().namespace.secret.as_bytes(), &nonce);
                // Nothing proves the peer's identity in plain mode.
                Pairing::offer(host, self.config(), token, PairRole::Initiator, None)
            });
        match offered {
            Ok(pairing) => {
                self.state = State::AwaitAnswer(pairing);
                self.outbound.extend_from_slice(&Hello { nonce }.emit());
                self.flush_outbound(host);
            }
            Err(no_pair) => {
                self.fall_back_to_plain(host, no_pair.reason);
                host.raise_connected();
            }
        }
    }

    /// Responder: learns from the first bytes what the peer speaks: TLS, Shunt's plain
    /// handshake, or neither (then those bytes are its payload).
    pub(super) fn sniff(&mut self, host: &mut dyn Host) -> IoResult {
        let eof = loop {
            let verdict = wire::sniff(&self.inbound);
            let want = match verdict {
                Sniff::NeedMore => self.inbound.len() + 1,
                Sniff::Shunt => HELLO_LEN,
                Sniff::Tls | Sniff::Other => break false,
            };
            if self.inbound.len() >= want {
                break false;
            }
            match self.read_inbound(host, want) {
                Ok(true) => break true,
                Ok(false) if self.inbound.len() < want => return IoResult::keep(0, false),
                Ok(false) => {}
                Err(()) => return self.fail(host, "connection reset during the handshake".into()),
            }
        };
        match wire::sniff(&self.inbound) {
            Sniff::Tls if self.settings.uses_tls() => return self.start_tls_server(host),
            Sniff::Shunt if !eof => {}
            _ => {
                if let Some(refused) = self.refuse_if_strict(host, "peer does not speak Shunt") {
                    return refused;
                }
                self.fall_back_to_plain(host, "peer_without_shunt");
                host.flush_write_buffer();
                return self.hand_over_early_payload(host, eof);
            }
        }
        if self.settings.uses_tls()
            && let Some(refused) = self.refuse_if_strict(host, "peer speaks Shunt without TLS")
        {
            return refused;
        }
        let hello = match Hello::parse(self.inbound[..HELLO_LEN].try_into().expect("len")) {
            Ok(h) => h,
            Err(e) => return self.fail(host, format!("bad Shunt hello: {e}")),
        };
        self.inbound.drain(..HELLO_LEN);
        let answer = self.answer(host, &hello);
        self.outbound.extend_from_slice(&answer.emit());
        self.flush_outbound(host);
        match (answer, &self.state) {
            (Answer::Refuse(RefuseReason::Denied), _) => {
                self.fail(host, "shuntd's rules deny this pair".into())
            }
            (_, State::CutThrough(_)) => {
                // Envoy may already have written (a server that speaks first); now it can go.
                host.flush_write_buffer();
                self.cut_through_read(host)
            }
            _ => {
                host.flush_write_buffer();
                self.plain_read(host)
            }
        }
    }

    /// Responder: offers the same token and waits, briefly, for shuntd to pair the two ends.
    fn answer(&mut self, host: &dyn Host, hello: &Hello) -> Answer {
        let token = plain_token(self.config().namespace.secret.as_bytes(), &hello.nonce);
        let paired = Pairing::offer(host, self.config(), token, PairRole::Responder, None)
            .and_then(|pairing| pairing.finish(host, self.config()));
        match paired {
            Ok((session, took)) => {
                stats::pairing(took);
                self.start_cut_through(session);
                Answer::Accept
            }
            // A denied pair closes (the caller fails the connection): it never had a mode.
            Err(no_pair) if no_pair == NoPair::DENIED => {
                self.count_fallback(no_pair.reason);
                Answer::Refuse(no_pair.tell_peer)
            }
            Err(no_pair) => {
                self.fall_back_to_plain(host, no_pair.reason);
                Answer::Refuse(no_pair.tell_peer)
            }
        }
    }

    /// Initiator: reads the responder's answer and switches mode.
    pub(super) fn await_answer(&mut self, host: &mut dyn Host) -> IoResult {
        let complete = |this: &Self| this.inbound.len() >= ANSWER_LEN;
        match self.read_inbound(host, ANSWER_LEN) {
            Ok(_) if complete(self) => {}
            Ok(false) => return IoResult::keep(0, false),
            Ok(true) | Err(()) => {
                return self.fail(
                    host,
                    "peer closed the connection during the handshake".into(),
                );
            }
        }
        let State::AwaitAnswer(pairing) = std::mem::replace(&mut self.state, State::Start) else {
            unreachable!("await_answer runs in AwaitAnswer")
        };
        let answer = Answer::parse(self.inbound[..ANSWER_LEN].try_into().expect("len"));
        self.inbound.drain(..ANSWER_LEN);
        match answer {
            Ok(Answer::Accept) => {
                // The responder was told after us, so our session is already queued.
                match pairing.finish(host, self.config()) {
                    Ok((session, took)) => {
                        stats::pairing(took);
                        self.start_cut_through(session);
                    }
                    Err(no_pair) => {
                        // The responder already moved to the FIFOs: there is no way back.
                        return self.fail(
                            host,
                            format!("peer accepted, shuntd did not: {}", no_pair.reason),
                        );
                    }
                }
            }
            Ok(Answer::Refuse(RefuseReason::Denied)) => {
                pairing.abandon();
                self.count_fallback(RefuseReason::Denied.as_str());
                return self.fail(host, "shuntd's rules deny this pair".into());
            }
            Ok(Answer::Refuse(reason)) => {
                pairing.abandon();
                self.fall_back_to_plain(host, reason.as_str());
            }
            Err(e) => {
                pairing.abandon();
                return self.fail(host, format!("bad Shunt answer: {e}"));
            }
        }
        self.mode_decided(host)
    }

    /// The initiator knows the mode: tells Envoy the transport is up, lets its held writes
    /// go, and hands over whatever followed the handshake (payload, doorbells or records).
    pub(super) fn mode_decided(&mut self, host: &mut dyn Host) -> IoResult {
        debug_assert_eq!(self.side, Side::Initiator);
        host.raise_connected();
        host.flush_write_buffer();
        match self.state {
            State::CutThrough(_) => self.cut_through_read(host),
            State::Tls(_) => self.tls_read(host),
            _ => self.hand_over_early_payload(host, false),
        }
    }
}
