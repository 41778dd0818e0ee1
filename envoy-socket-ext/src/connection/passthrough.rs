//! Plain mode's fallback: the TCP connection carries the payload itself.

use super::{CHUNK, Connection, IoResult};
use crate::host::{Host, Io};
use crate::stats::{self, Mode};

impl Connection {
    /// Hands Envoy the payload that arrived with the handshake bytes, then reads on (unless
    /// the peer already ended its stream).
    pub(super) fn hand_over_early_payload(&mut self, host: &mut dyn Host, eof: bool) -> IoResult {
        let early = std::mem::take(&mut self.inbound);
        host.read_buffer_add(&early);
        stats::bytes(Mode::Plain, early.len());
        if eof {
            return IoResult::keep(early.len(), true);
        }
        let more = self.plain_read(host);
        IoResult {
            bytes: early.len() as u64 + more.bytes,
            ..more
        }
    }

    pub(super) fn plain_read(&mut self, host: &mut dyn Host) -> IoResult {
        let mut total = 0;
        loop {
            if total >= self.config().max_read_per_event || host.should_drain_read_buffer() {
                host.set_readable();
                return IoResult::keep(total, false);
            }
            match host.io_read_into_buffer(CHUNK) {
                Io::Done(n) => {
                    total += n;
                    stats::bytes(Mode::Plain, n);
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

    pub(super) fn plain_write(&mut self, host: &mut dyn Host, end_stream: bool) -> IoResult {
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
}
