//! The tls mode: payload in TLS records over the TCP connection, for peers that cannot pair
//! (another node, no shuntd, Envoy's own TLS).
//!
//! Envoy's write buffer keeps the plaintext until its records are wholly on the socket: Envoy
//! flush-closes a connection once that buffer is empty, so records held only here could be
//! cut off.

use shunt_tls::{ReadOutcome, TlsStream};

use super::{CHUNK, Connection, IoResult, State};
use crate::host::{Host, Io};
use crate::stats::{self, Mode};

pub(super) struct TlsPayload {
    pub(super) tls: TlsStream,
    /// Plaintext taken from Envoy's write buffer whose records are still in `outbound`.
    undrained: usize,
    /// `close_notify` queued: our half of the stream is over.
    close_notify_sent: bool,
    /// The socket's write side is shut, after the `close_notify`.
    fin_sent: bool,
}

impl TlsPayload {
    pub(super) fn new(tls: TlsStream) -> Self {
        Self {
            tls,
            undrained: 0,
            close_notify_sent: false,
            fin_sent: false,
        }
    }
}

impl Connection {
    pub(super) fn tls_read(&mut self, host: &mut dyn Host) -> IoResult {
        let limit = self.settings.config.max_read_per_event;
        let mut total = 0;
        let result = loop {
            let State::Tls(payload) = &mut self.state else {
                unreachable!("tls_read runs in Tls")
            };
            if total >= limit || host.should_drain_read_buffer() {
                host.set_readable();
                break IoResult::keep(total, false);
            }
            let want = CHUNK.min(limit - total);
            match payload.tls.read_plaintext(&mut self.scratch[..want]) {
                Ok(ReadOutcome::Data(n)) => {
                    host.read_buffer_add(&self.scratch[..n]);
                    total += n;
                    continue;
                }
                Ok(ReadOutcome::Closed) => break IoResult::keep(total, true),
                Ok(ReadOutcome::UncleanEof) => {
                    // Without close_notify the stream may be cut short: a reset, not an end.
                    self.failure = Some("peer closed without TLS close_notify".into());
                    break IoResult {
                        close: true,
                        ..IoResult::keep(total, false)
                    };
                }
                Err(e) => {
                    self.failure = Some(format!("TLS: {e}"));
                    break IoResult {
                        close: true,
                        ..IoResult::keep(total, false)
                    };
                }
                Ok(ReadOutcome::WouldBlock) => {}
            }
            // No plaintext: decrypt what has arrived, or read more.
            if !self.inbound.is_empty() {
                match payload.tls.feed(&self.inbound) {
                    Ok(n) => {
                        self.inbound.drain(..n);
                        if n > 0 {
                            continue;
                        }
                    }
                    Err(e) => {
                        self.failure = Some(format!("TLS: {e}"));
                        break IoResult {
                            close: true,
                            ..IoResult::keep(total, false)
                        };
                    }
                }
            }
            match host.io_read(&mut self.scratch) {
                Io::Done(n) => self.inbound.extend_from_slice(&self.scratch[..n]),
                Io::Again => break IoResult::keep(total, false),
                Io::Eof => payload.tls.feed_eof(),
                Io::Error => {
                    self.failure = Some("connection reset".into());
                    break IoResult {
                        close: true,
                        ..IoResult::keep(total, false)
                    };
                }
            }
        };
        stats::bytes(Mode::Tls, total);
        // Reading may have produced output (a key update, an alert).
        self.send_tls_output(host);
        result
    }

    pub(super) fn tls_write(&mut self, host: &mut dyn Host, end_stream: bool) -> IoResult {
        // do_write already sent what it could of `outbound`.
        if !self.outbound.is_empty() {
            return IoResult::keep(0, false);
        }
        let State::Tls(payload) = &mut self.state else {
            unreachable!("tls_write runs in Tls")
        };
        let mut total = std::mem::take(&mut payload.undrained);
        if total > 0 {
            host.write_drain(total);
        }
        loop {
            let State::Tls(payload) = &mut self.state else {
                unreachable!()
            };
            let taken = match host.write_slices().iter().find(|s| !s.is_empty()) {
                Some(slice) => payload
                    .tls
                    .write_plaintext(&slice[..slice.len().min(CHUNK)]),
                None => break,
            };
            if taken == 0 {
                break;
            }
            payload.tls.pending_output(&mut self.outbound);
            if self.flush_outbound(host) {
                host.write_drain(taken);
                total += taken;
            } else {
                // The socket raises a write event when it has room; drain then.
                let State::Tls(payload) = &mut self.state else {
                    unreachable!()
                };
                payload.undrained = taken;
                return IoResult::keep(total, false);
            }
        }
        let State::Tls(payload) = &mut self.state else {
            unreachable!()
        };
        if end_stream && !payload.close_notify_sent {
            // TLS's half-close; the FIN after it serves a peer that does not read alerts.
            payload.close_notify_sent = true;
            payload.tls.send_close_notify();
            payload.tls.pending_output(&mut self.outbound);
        }
        if payload.close_notify_sent && !payload.fin_sent && self.flush_outbound(host) {
            let State::Tls(payload) = &mut self.state else {
                unreachable!()
            };
            payload.fin_sent = true;
            host.io_shutdown_write();
        }
        IoResult::keep(total, false)
    }
}
