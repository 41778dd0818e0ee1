//! Cut-through: payload through the FIFO pair shuntd set up, one-byte doorbells on the TCP
//! connection.
//!
//! With `busy_poll_us`, a connection that just moved bytes keeps looking for the peer's next
//! ones for that long (Envoy calls `do_read` again on its next loop turn) before it arms the
//! data wake-up and sleeps; meanwhile the peer writes without ringing.
//!
//! A half-close is the FIFO's writer-shutdown flag plus a doorbell, not a TCP FIN: the peer's
//! reads must still be able to wake us for space after our writes end, and a shut TCP write
//! side could no longer carry that doorbell back. The TCP connection closes when the
//! connection does; a close that arrives before the FIFO's end of stream means the peer died.

use std::io::{ErrorKind, IoSlice};
use std::time::Instant;

use shunt_client::Session;

use super::{Connection, IoResult, State, log};
use crate::host::{Host, Io, LogLevel};
use crate::stats::{self, Mode};
use crate::wire;

pub(super) struct CutThrough {
    session: Session,
    /// The FIFO was full; a peer doorbell means space may have freed.
    write_blocked: bool,
    /// The peer's FIN (or reset) arrived on the TCP connection.
    tcp_closed: bool,
    write_shut: bool,
    /// A doorbell could not be written yet.
    doorbell_owed: bool,
    /// Looking for the peer's bytes without a wake-up until then (`busy_poll_us`).
    polling_until: Option<Instant>,
    /// The peer's stream has ended: nothing more to look for.
    rx_ended: bool,
}

impl CutThrough {
    pub(super) fn close(self, abort: bool) {
        if abort {
            self.session.reset();
        } else {
            self.session.close();
        }
    }
}

impl Connection {
    pub(super) fn start_cut_through(&mut self, mut session: Session) {
        session.use_external_wakeups();
        self.count_mode(Mode::CutThrough);
        self.state = State::CutThrough(CutThrough {
            session,
            write_blocked: false,
            tcp_closed: false,
            write_shut: false,
            doorbell_owed: false,
            polling_until: None,
            rx_ended: false,
        });
    }

    /// Bytes just moved: the peer's next ones are likely close behind, so look for them by
    /// ourselves for a while, from the next loop turn on.
    fn keep_polling(&mut self, host: &mut dyn Host) {
        let budget = self.settings.config.busy_poll();
        let State::CutThrough(ct) = &mut self.state else {
            return;
        };
        if budget.is_zero() || ct.rx_ended {
            return;
        }
        if ct.polling_until.is_none() {
            ct.session.set_rx_polling(true);
        }
        ct.polling_until = Some(Instant::now() + budget);
        host.set_readable();
    }

    /// The FIFO was empty: go on polling while the window lasts, then arm the wake-up, and come
    /// back at once if bytes came as it was armed.
    fn poll_or_sleep(&mut self, host: &mut dyn Host) {
        let State::CutThrough(ct) = &mut self.state else {
            return;
        };
        let Some(until) = ct.polling_until else {
            return;
        };
        if Instant::now() < until {
            host.set_readable();
            return;
        }
        ct.polling_until = None;
        if ct.session.set_rx_polling(false) {
            host.set_readable();
        }
    }

    pub(super) fn cut_through_read(&mut self, host: &mut dyn Host) -> IoResult {
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
        let limit = self.settings.config.max_read_per_event;
        while total < limit && !host.should_drain_read_buffer() {
            // Straight from the FIFO into Envoy's buffer: one copy.
            match ct
                .session
                .try_read_with(limit - total, |bytes| host.read_buffer_add(bytes))
            {
                Ok(0) => {
                    end_stream = true;
                    ct.rx_ended = true;
                    break;
                }
                Ok(n) => total += n,
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
        stats::bytes(Mode::CutThrough, total);
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
        if total > 0 {
            self.keep_polling(host);
        } else if fifo_empty && !end_stream {
            self.poll_or_sleep(host);
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

    pub(super) fn cut_through_write(&mut self, host: &mut dyn Host, end_stream: bool) -> IoResult {
        let State::CutThrough(ct) = &mut self.state else {
            unreachable!("cut_through_write runs in CutThrough")
        };
        if ct.write_shut {
            self.ring_if_due(host);
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
            if !bells.is_empty() {
                // The bells taken here may also have announced data: let the read path look.
                host.set_readable();
            }
            host.set_writable();
        }
        log(host, LogLevel::Trace, || {
            format!("shunt: wrote {total} to the FIFO, blocked={blocked}, end_stream={end_stream}")
        });
        if end_stream && !blocked {
            if let Err(e) = ct.session.shutdown_write() {
                self.failure = Some(format!("cut-through session: {e}"));
                return IoResult::closed();
            }
            ct.write_shut = true;
        }
        if total > 0 {
            // An answer may follow what was just sent.
            self.keep_polling(host);
        }
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
        if !self.outbound.is_empty() {
            // The last handshake frame is still going out; the doorbell must follow it.
            ct.doorbell_owed = true;
            return;
        }
        let result = host.io_write(&[wire::DOORBELL]);
        log(host, LogLevel::Trace, || {
            format!("shunt: doorbell sent: {result:?}")
        });
        match result {
            Io::Done(_) => ct.doorbell_owed = false,
            // The socket raises a write event when it has room.
            Io::Again => ct.doorbell_owed = true,
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
