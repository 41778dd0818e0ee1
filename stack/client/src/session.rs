//! A cut-through session: reads and writes go straight to the shared FIFOs.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::task::Waker;
use std::time::Duration;

use std::sync::atomic::Ordering;

use shunt_sapi::event::{Event, FifoPair};
use shunt_sapi::message::ResumedSession;
use shunt_shm::fifo::{Consumer, Producer};

use crate::Error;
use crate::peer::SegmentKey;
use crate::worker::{State, Woke, Worker};

/// A writer blocked on a full FIFO is woken once this fraction (1/n) of it is free.
const TX_SPACE_WAKE_DIVISOR: u32 = 4;

/// How long a blocked read or write sleeps before it looks again without a wake-up. Never
/// needed when wake-ups arrive; [`crate::WorkerStats::fallback_wakeups`] counts the times it
/// was.
const FALLBACK_RECHECK: Duration = Duration::from_secs(1);

pub(crate) struct SessionState {
    /// The session's id at the shuntd of epoch `daemon_epoch`, for close reports.
    pub(crate) session_id: u64,
    pub(crate) daemon_epoch: u32,
    pub(crate) segment: SegmentKey,
    pub(crate) slot: u32,
    fifos: FifoPair,
    rx: Consumer,
    tx: Producer,
    pub(crate) local: SocketAddr,
    pub(crate) remote: SocketAddr,
    pub(crate) is_client: bool,
    /// The peer closed: it reads no more; what it wrote is still readable.
    peer_closed: bool,
    /// The peer reset, or died: nothing more will flow.
    peer_reset: bool,
    /// We asked the peer for tx-space and have not heard back.
    tx_space_pending: bool,
    write_shut: bool,
    /// The caller wakes the peer itself (see [`Session::use_external_wakeups`]).
    external_wakeups: bool,
    /// The caller looks for data by itself for now (see [`Session::set_rx_polling`]).
    rx_polling: bool,
    /// With external wake-ups: the peer must be told to look at the FIFOs.
    peer_wakeup_due: bool,
    pub(crate) read_waker: Option<Waker>,
    pub(crate) write_waker: Option<Waker>,
    /// Notifications taken for this session, to tell a late wake-up from a lost one.
    wakeups: u64,
}

fn wake(w: &mut Option<Waker>) {
    if let Some(w) = w.take() {
        w.wake();
    }
}

impl SessionState {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        session_id: u64,
        segment: SegmentKey,
        fifos: FifoPair,
        mut rx: Consumer,
        tx: Producer,
        local: SocketAddr,
        remote: SocketAddr,
        is_client: bool,
        peer_dead: bool,
    ) -> Self {
        // The peer may have written, closed or reset before this side opened the session (an
        // accept still in the backlog); its events found no session here and were dropped. So
        // take the state from the FIFOs, and clear the data event before the first read:
        // otherwise has_event stays set and the peer never notifies again.
        rx.clear_event();
        // A writer waiting for space wakes to a quarter of the FIFO, not to every small read:
        // fewer wake-ups, each followed by a worthwhile write (kernel TCP likewise wakes a
        // blocked sender only once a good part of its buffer is free).
        rx.set_tx_space_threshold(rx.capacity() / TX_SPACE_WAKE_DIVISOR);
        let peer_closed = tx.is_reader_closed();
        let peer_reset = rx.is_reset() || tx.is_reset();
        let mut state = Self {
            session_id,
            daemon_epoch: segment.0,
            segment,
            slot: fifos.slot,
            fifos,
            rx,
            tx,
            local,
            remote,
            is_client,
            peer_closed,
            peer_reset,
            tx_space_pending: false,
            write_shut: false,
            external_wakeups: false,
            rx_polling: false,
            peer_wakeup_due: false,
            read_waker: None,
            write_waker: None,
            wakeups: 0,
        };
        if peer_dead {
            state.peer_died();
        }
        state
    }

    /// Whether a session nobody used yet can still carry a connection: its peer has neither
    /// closed, reset nor died.
    pub(crate) fn is_usable(&self) -> bool {
        !self.peer_closed && !self.peer_reset
    }

    /// The session as a restarted shuntd is told of it.
    pub(crate) fn report(&self) -> ResumedSession {
        ResumedSession {
            local: self.local,
            remote: self.remote,
            is_client: self.is_client,
            slot: self.slot,
            rx_offset: self.fifos.rx_offset,
            tx_offset: self.fifos.tx_offset,
        }
    }

    /// With external wake-ups, a read that found the FIFO empty asks the peer's next write
    /// to wake us, and then says whether the FIFO must be looked at again: bytes written
    /// before the request may not have rung.
    fn arm_rx_event(&self) -> bool {
        if !self.external_wakeups || self.rx_polling {
            return false;
        }
        self.rx.clear_event();
        true
    }

    pub(crate) fn on_rx_data(&mut self) {
        self.wakeups += 1;
        // Clear before the app reads, so a write after this read signals again.
        self.rx.clear_event();
        wake(&mut self.read_waker);
    }

    pub(crate) fn on_tx_space(&mut self) {
        self.wakeups += 1;
        self.tx_space_pending = false;
        wake(&mut self.write_waker);
    }

    pub(crate) fn peer_closed(&mut self) {
        self.wakeups += 1;
        self.peer_closed = true;
        wake(&mut self.read_waker);
        wake(&mut self.write_waker);
    }

    pub(crate) fn peer_reset(&mut self) {
        self.wakeups += 1;
        self.peer_reset = true;
        wake(&mut self.read_waker);
        wake(&mut self.write_waker);
    }

    /// The peer's process is gone. A session it closed cleanly keeps its data and EOF.
    pub(crate) fn peer_died(&mut self) {
        self.wakeups += 1;
        let clean_eof = self.peer_closed || self.rx.is_writer_shutdown();
        if !clean_eof {
            self.peer_reset = true;
        }
        self.peer_closed = true;
        wake(&mut self.read_waker);
        wake(&mut self.write_waker);
    }

    fn reset_error() -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionReset,
            "cut-through peer reset the session",
        )
    }

    fn corrupt(e: impl std::fmt::Display) -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("cut-through FIFO corrupt: {e}"),
        )
    }
}

/// Empty polls between two event dispatches in [`Session::read_busy_poll`] (about 10-50 µs of
/// spinning, so a peer's close or death is still noticed promptly).
pub const BUSY_POLL_DISPATCH_INTERVAL: u32 = 1 << 12;

/// Empty polls between two looks at the clock (and yields of the core) while a blocking call
/// polls within its [`crate::AttachOptions::busy_poll`] budget.
const POLL_CLOCK_INTERVAL: u32 = 1 << 6;

/// One established session. Dropping it closes it.
pub struct Session {
    worker: Worker,
    index: usize,
    closed: bool,
}

/// Where a session goes, for logs and listings.
#[derive(Debug, Clone, Copy)]
pub struct SessionInfo {
    pub session_id: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub is_client: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("index", &self.index)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

enum Notify {
    RxData,
    TxSpace,
}

impl Session {
    pub(crate) fn new(worker: Worker, index: usize) -> Self {
        Self {
            worker,
            index,
            closed: false,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State, &mut SessionState) -> T) -> T {
        let mut st = self.worker.lock();
        let mut s = st.sessions[self.index]
            .take()
            .expect("a live Session owns its slot");
        let out = f(&mut st, &mut s);
        st.sessions[self.index] = Some(s);
        out
    }

    fn notify(st: &mut State, s: &mut SessionState, what: Notify) -> io::Result<()> {
        if s.external_wakeups {
            s.peer_wakeup_due = true;
            return Ok(());
        }
        let Some(peer) = st.peers.get_mut(&s.segment) else {
            return Ok(());
        };
        let slot = s.slot;
        peer.notify(match what {
            Notify::RxData => Event::RxData { slot },
            Notify::TxSpace => Event::TxSpace { slot },
        })
    }

    pub fn info(&self) -> SessionInfo {
        self.with(|_, s| SessionInfo {
            session_id: s.session_id,
            local: s.local,
            remote: s.remote,
            is_client: s.is_client,
        })
    }

    pub fn worker(&self) -> &Worker {
        &self.worker
    }

    /// Hands peer wake-ups to the caller, for callers whose event loop cannot watch the
    /// worker's readiness fd but already share a channel with the peer (Envoy's transport
    /// sockets have their TCP connection). From now on a read or write that must wake the peer
    /// only records it: [`Session::take_peer_wakeup`] says when to send one, and the receiving
    /// side calls [`Session::on_peer_wakeup`] before reading. Closes travel on that channel too.
    ///
    /// The peer is asked for a data wake-up only by a read that finds the FIFO empty, so a
    /// reader that keeps up costs its writer nothing: the caller must go on reading (or
    /// reschedule itself) until a read says `WouldBlock` or end of stream.
    pub fn use_external_wakeups(&mut self) {
        self.with(|_, s| s.external_wakeups = true);
    }

    /// Whether the peer must be woken since the last call (with external wake-ups). Coalesced:
    /// no new wake-up is due until the peer has taken the last one.
    pub fn take_peer_wakeup(&mut self) -> bool {
        self.with(|_, s| std::mem::take(&mut s.peer_wakeup_due))
    }

    /// With external wake-ups: while polling, a read that finds the FIFO empty leaves the
    /// peer's data wake-up unarmed, so the peer writes without waking us and the caller must
    /// look again by itself, soon. Stopping arms the wake-up and returns whether bytes came
    /// in the meantime; if so the caller must read them, as no wake-up will announce them.
    pub fn set_rx_polling(&mut self, polling: bool) -> bool {
        self.with(|_, s| {
            let was_polling = std::mem::replace(&mut s.rx_polling, polling);
            if polling || !was_polling {
                return false;
            }
            s.rx.clear_event();
            // A corrupt FIFO counts as readable: the read reports it.
            !s.rx.is_empty().unwrap_or(false)
        })
    }

    /// The peer woke us (with external wake-ups): its next freed space wakes us again. The
    /// data direction re-arms itself when a read finds the FIFO empty.
    pub fn on_peer_wakeup(&mut self) {
        self.with(|_, s| s.tx_space_pending = false);
    }

    /// Reads what is available without blocking; `WouldBlock` when nothing is.
    pub fn try_read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        self.with(|st, s| {
            if s.peer_reset {
                return Err(SessionState::reset_error());
            }
            let mut n = s.rx.dequeue_vectored(bufs).map_err(SessionState::corrupt)?;
            if n == 0 && s.arm_rx_event() {
                n = s.rx.dequeue_vectored(bufs).map_err(SessionState::corrupt)?;
            }
            if n > 0 {
                if s.rx.take_tx_space_request() {
                    Self::notify(st, s, Notify::TxSpace)?;
                }
                return Ok(n);
            }
            if s.rx.at_eof().map_err(SessionState::corrupt)? || bufs.iter().all(|b| b.is_empty()) {
                return Ok(0);
            }
            Err(io::ErrorKind::WouldBlock.into())
        })
    }

    /// Zero-copy read: hands `consume` up to `max` readable bytes, straight from the FIFO, as
    /// one or two slices in order, and then frees them. Returns how many were consumed: 0 at
    /// end of stream, `WouldBlock` when nothing is readable. The bytes are the peer's and
    /// untrusted.
    pub fn try_read_with(
        &mut self,
        max: usize,
        mut consume: impl FnMut(&[u8]),
    ) -> io::Result<usize> {
        self.with(|st, s| {
            if s.peer_reset {
                return Err(SessionState::reset_error());
            }
            let mut slices = s.rx.read_slices().map_err(SessionState::corrupt)?;
            if slices.is_empty() && s.arm_rx_event() {
                slices = s.rx.read_slices().map_err(SessionState::corrupt)?;
            }
            let first = &slices.first[..slices.first.len().min(max)];
            let second = &slices.second[..slices.second.len().min(max - first.len())];
            let n = first.len() + second.len();
            if n > 0 {
                consume(first);
                if !second.is_empty() {
                    consume(second);
                }
                s.rx.release(n).map_err(SessionState::corrupt)?;
                if s.rx.take_tx_space_request() {
                    Self::notify(st, s, Notify::TxSpace)?;
                }
                return Ok(n);
            }
            if s.rx.at_eof().map_err(SessionState::corrupt)? || max == 0 {
                return Ok(0);
            }
            Err(io::ErrorKind::WouldBlock.into())
        })
    }

    pub fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.try_read_vectored(&mut [IoSliceMut::new(buf)])
    }

    /// Writes what fits without blocking; `WouldBlock` when the FIFO is full.
    pub fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.with(|st, s| {
            if s.peer_reset {
                return Err(SessionState::reset_error());
            }
            if s.peer_closed || s.tx.is_reader_closed() {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "cut-through peer closed the session",
                ));
            }
            if s.write_shut {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "session was shut down for writing",
                ));
            }
            let want: usize = bufs.iter().map(|b| b.len()).sum();
            if want == 0 {
                return Ok(0);
            }
            // A peer that forges its head makes the FIFO corrupt, not full: fail, do not wait.
            let mut n =
                s.tx.try_enqueue_vectored(bufs)
                    .map_err(SessionState::corrupt)?;
            if n == 0 {
                // Full: ask to be told when the reader frees space, then look again so a
                // dequeue that raced with the request is not missed.
                if !s.tx_space_pending {
                    s.tx.request_tx_space();
                    s.tx_space_pending = true;
                }
                n =
                    s.tx.try_enqueue_vectored(bufs)
                        .map_err(SessionState::corrupt)?;
                if n == 0 {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
            }
            if s.tx.set_event() {
                Self::notify(st, s, Notify::RxData)?;
            }
            Ok(n)
        })
    }

    pub fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.try_write_vectored(&[IoSlice::new(buf)])
    }

    fn blocking<T>(&mut self, mut op: impl FnMut(&mut Self) -> io::Result<T>) -> io::Result<T> {
        let budget = self.worker.inner.busy_poll;
        if !budget.is_zero()
            && let Some(done) = self.poll_for(budget, &mut op)
        {
            return done;
        }
        loop {
            let seen = self.worker.generation();
            match op(self) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Polling, if any, is done: sleep, unless another thread's dispatch came
                    // since we looked (it may have taken our notification).
                    let woke = self
                        .worker
                        .sleep(Some(FALLBACK_RECHECK), Some(seen))
                        .map_err(io::Error::from)?;
                    if woke == Woke::TimedOut
                        && let Some(done) = self.recheck(&mut op)
                    {
                        return done;
                    }
                }
                other => return other,
            }
        }
    }

    /// After a sleep that ran out: takes any wake-up that is only late, then tries again
    /// (`None`: still blocked). If the call can go on and no wake-up said so, one was lost:
    /// counted, never hidden.
    fn recheck<T>(
        &mut self,
        op: &mut impl FnMut(&mut Self) -> io::Result<T>,
    ) -> Option<io::Result<T>> {
        let before = self.with(|_, s| s.wakeups);
        if let Err(e) = self.worker.dispatch() {
            return Some(Err(e.into()));
        }
        let announced = self.with(|_, s| s.wakeups) != before;
        match op(self) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            other => {
                if !announced {
                    self.worker
                        .inner
                        .fallback_wakeups
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("a blocked session went on without a wake-up");
                }
                Some(other)
            }
        }
    }

    /// Retries `op` on shared memory alone for up to `budget`; `None` if it still would block.
    ///
    /// Like [`Session::read_busy_poll`], the spin reads the FIFO without dispatching, so the
    /// data event stays set and a writer that finds it set sends no notification and makes no
    /// system call. Sleeping afterwards is safe: between blocking sessions the event is only
    /// ever set together with a queued notification (external wake-ups queue none, and do not
    /// block), which wakes the sleep at once and clears the event. Another thread's dispatch
    /// may take that notification first; [`Worker::sleep`] then wakes this one too.
    fn poll_for<T>(
        &mut self,
        budget: Duration,
        op: &mut impl FnMut(&mut Self) -> io::Result<T>,
    ) -> Option<io::Result<T>> {
        let start = std::time::Instant::now();
        let mut idle = 0u32;
        loop {
            match op(self) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return Some(other),
            }
            idle = idle.wrapping_add(1);
            if idle.is_multiple_of(POLL_CLOCK_INTERVAL) {
                if start.elapsed() >= budget {
                    break;
                }
                // A peer sharing this core gets to run.
                std::thread::yield_now();
            }
            if idle.is_multiple_of(BUSY_POLL_DISPATCH_INTERVAL)
                && let Err(e) = self.worker.dispatch()
            {
                return Some(Err(e.into()));
            }
            std::hint::spin_loop();
        }
        None
    }

    /// Spins on the FIFO without sleeping: the lowest latency, at the price of a busy core.
    ///
    /// The spin touches shared memory only. Events (the peer's close or reset, a dead peer) are
    /// dispatched every [`BUSY_POLL_DISPATCH_INTERVAL`] empty polls, not on each: a dispatch is a
    /// system call, and it clears the FIFO's data event, which would make the writer ring our
    /// doorbell (another system call) for every message. Left set, the event tells the writer
    /// that we are awake anyway.
    pub fn read_busy_poll(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut idle = 0u32;
        loop {
            match self.try_read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    idle += 1;
                    if idle.is_multiple_of(BUSY_POLL_DISPATCH_INTERVAL) {
                        self.worker.dispatch().map_err(io::Error::from)?;
                    }
                    std::hint::spin_loop();
                }
                other => return other,
            }
        }
    }

    /// Shuts the write direction: the peer reads what was written, then end-of-stream.
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        self.with(|st, s| {
            if s.write_shut {
                return Ok(());
            }
            s.write_shut = true;
            s.tx.shutdown();
            if s.tx.set_event() {
                Self::notify(st, s, Notify::RxData)?;
            }
            Ok(())
        })
    }

    fn finish(&mut self, reset: bool) {
        if self.closed {
            return;
        }
        self.closed = true;
        let mut st = self.worker.lock();
        self.worker.finish_session(&mut st, self.index, reset);
    }

    /// Closes both directions; the peer reads what is left, then end-of-stream.
    pub fn close(mut self) {
        self.finish(false);
    }

    /// Aborts: the peer sees a reset and unread data is discarded.
    pub fn reset(mut self) {
        self.finish(true);
    }

    #[cfg(feature = "tokio")]
    pub(crate) fn register_read(&self, waker: &Waker) {
        self.with(|_, s| s.read_waker = Some(waker.clone()));
    }

    #[cfg(feature = "tokio")]
    pub(crate) fn register_write(&self, waker: &Waker) {
        self.with(|_, s| s.write_waker = Some(waker.clone()));
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.finish(false);
    }
}

impl io::Read for Session {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.blocking(|s| s.try_read(buf))
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        self.blocking(|s| s.try_read_vectored(bufs))
    }
}

impl io::Write for Session {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.blocking(|s| s.try_write(buf))
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.blocking(|s| s.try_write_vectored(bufs))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl From<Error> for io::ErrorKind {
    fn from(e: Error) -> Self {
        io::Error::from(e).kind()
    }
}

impl Worker {
    /// Closes (or resets) the session at `index`: the peer is told, then shuntd.
    pub(crate) fn finish_session(&self, st: &mut State, index: usize, reset: bool) {
        let Some(s) = st.sessions[index].take() else {
            return;
        };
        if reset {
            s.tx.reset();
            s.rx.reset();
        } else {
            s.tx.shutdown();
            s.rx.close_reader();
        }
        let event = if reset {
            Event::PeerReset { slot: s.slot }
        } else {
            Event::PeerClosed { slot: s.slot }
        };
        if let Some(peer) = st.peers.get_mut(&s.segment) {
            // A peer that closed has dropped the slot and would ignore a close; waking it for
            // nothing costs it a wake-up and us the system call that rings it.
            let peer_listens = reset || !s.peer_closed;
            if !s.external_wakeups && peer_listens {
                let _ = peer.notify(event);
            }
            peer.slots.remove(&s.slot);
        }
        let (epoch, session_id) = (s.daemon_epoch, s.session_id);
        self.report_closed(st, epoch, session_id, reset);
        self.gc_peer(st, s.segment);
    }
}
