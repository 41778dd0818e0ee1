//! A pairing offered to shuntd, from the offer to the FIFO pair (or the reason there is none).

use std::time::{Duration, Instant};

use shunt_client::{Error as ClientError, PendingConnect, Session, Worker};
use shunt_sapi::ErrorCode;
use shunt_sapi::message::{PAIR_TOKEN_LEN, PairOffer, PairRole};

use crate::attach;
use crate::config::SocketConfig;
use crate::host::{Host, LogLevel};
use crate::wire::RefuseReason;

/// An offer waiting at shuntd.
pub(super) struct Pairing {
    worker: Worker,
    pending: PendingConnect,
    since: Instant,
}

/// Why no FIFO pair came of an offer: a fallback label, and what to tell the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct NoPair {
    pub(super) reason: &'static str,
    pub(super) tell_peer: RefuseReason,
}

impl NoPair {
    pub(super) const SHUNTD_DOWN: NoPair = NoPair {
        reason: "shuntd_down",
        tell_peer: RefuseReason::ShuntdDown,
    };
    /// shuntd's rules forbid these two to talk: the connection closes rather than carry on
    /// over TCP, which would bypass the rules.
    pub(super) const DENIED: NoPair = NoPair {
        reason: "pairing_denied",
        tell_peer: RefuseReason::Denied,
    };
    const NO_ADDRESS: NoPair = NoPair {
        reason: "no_address",
        tell_peer: RefuseReason::Refused,
    };
}

impl Pairing {
    /// Offers `token` to this thread's shuntd for `config`'s namespace. `peer_identity` is
    /// the SPIFFE id the TLS handshake verified (`None` in plain mode): shuntd matches it
    /// against rules that name principals, so a rule can refuse the pair by identity.
    pub(super) fn offer(
        host: &dyn Host,
        config: &SocketConfig,
        token: [u8; PAIR_TOKEN_LEN],
        role: PairRole,
        peer_identity: Option<&str>,
    ) -> Result<Pairing, NoPair> {
        let (Some(local), Some(remote)) = (host.local_address(), host.remote_address()) else {
            return Err(NoPair::NO_ADDRESS);
        };
        let worker = attach::worker_for(config).ok_or(NoPair::SHUNTD_DOWN)?;
        let offer = PairOffer {
            token,
            role,
            local,
            remote,
            fifo_size: Some(config.fifo_size),
            peer_identity: peer_identity.map(str::to_owned),
        };
        match worker.start_pair(offer) {
            Ok(pending) => Ok(Pairing {
                worker,
                pending,
                since: Instant::now(),
            }),
            Err(_) => {
                attach::forget(config);
                Err(NoPair::SHUNTD_DOWN)
            }
        }
    }

    /// Waits until shuntd answers, at most the pairing timeout. The wait blocks this Envoy
    /// worker, but only for one shuntd round trip: the peer offered first.
    pub(super) fn finish(
        self,
        host: &dyn Host,
        config: &SocketConfig,
    ) -> Result<(Session, Duration), NoPair> {
        let deadline = Instant::now() + config.pairing_timeout();
        let failed = |e: ClientError| {
            let no_pair = refusal(&e);
            if no_pair == NoPair::DENIED {
                // A policy decision, worth a line at the default level. Only the code arrives
                // here (a fixed-size event); shuntd's own log names the rule that denied.
                super::log(host, LogLevel::Info, || {
                    format!("shunt: pairing refused: {e}")
                });
            }
            if no_pair == NoPair::SHUNTD_DOWN {
                attach::forget(config);
            }
            no_pair
        };
        loop {
            match self.worker.poll_connect(&self.pending) {
                Ok(Some(session)) => return Ok((session, self.since.elapsed())),
                Ok(None) => {}
                Err(e) => return Err(failed(e)),
            }
            let now = Instant::now();
            if now >= deadline {
                self.abandon();
                return Err(failed(ClientError::Timeout));
            }
            if let Err(e) = self.worker.wait(Some(deadline - now)) {
                return Err(failed(e));
            }
        }
    }

    pub(super) fn abandon(self) {
        self.worker.abandon_connect(self.pending);
    }
}

fn refusal(e: &ClientError) -> NoPair {
    match e {
        ClientError::Refused {
            code: ErrorCode::PairTimeout,
            ..
        }
        | ClientError::Timeout => NoPair {
            reason: "pairing_timeout",
            tell_peer: RefuseReason::Timeout,
        },
        ClientError::Refused {
            code: ErrorCode::Denied,
            ..
        } => NoPair::DENIED,
        ClientError::Refused { .. } => NoPair {
            reason: "pairing_refused",
            tell_peer: RefuseReason::Refused,
        },
        _ => NoPair::SHUNTD_DOWN,
    }
}
