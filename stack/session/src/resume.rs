//! Sessions an app says it carried over from an earlier shuntd, checked before they are
//! believed.
//!
//! After a restart shuntd knows nothing of the sessions that kept flowing; each app reports its
//! own, one segment at a time, with the segment's memfd. A report proves little by itself (an
//! app can make a memfd and write FIFO headers into it, and claim any address), so a reported
//! half is believed in steps:
//!
//! 1. [`inspect`]: its FIFOs exist in the segment it sent: shuntd maps the segment and finds a
//!    FIFO header at each offset, in the FIFO area, for a slot the segment can hold.
//! 2. The layer checks that a connecting half's local address is its namespace's: nobody speaks
//!    for another namespace's address.
//! 3. [`ResumeHalves::claim`]: it is *confirmed* once the peer worker reports the other half of
//!    the same slot in the same segment (the same memfd, by inode), mirrored. Only a confirmed
//!    session enters the 5-tuple table and holds a port; an unconfirmed half is listed, but
//!    holds nothing a new listener or connect could want.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use shunt_sapi::ErrorCode;
use shunt_sapi::layout::{self, CT_MAX_SLOTS};
use shunt_sapi::message::ResumedSession;
use shunt_shm::fifo::FifoObserver;
use shunt_shm::segment::Segment;

use crate::app::WorkerId;

/// A segment as the kernel names it: the memfd's inode. Two processes hold the same segment
/// exactly when their memfds have the same identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SegmentIdentity {
    dev: u64,
    ino: u64,
}

/// Why a reported session was not believed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResumeRefusal {
    #[error("the fd is not a shared segment: {0}")]
    NotASegment(String),
    #[error("no FIFO at offset {0} of the segment")]
    NoFifo(u32),
    #[error("slot {0} or its FIFO offsets are outside what a segment holds")]
    BadPlacement(u32),
    #[error("local address {0} is not the namespace's")]
    NotOwnAddress(std::net::SocketAddr),
    #[error("slot {0} of this segment was already reported by the same side")]
    Duplicate(u32),
}

impl ResumeRefusal {
    pub fn code(&self) -> ErrorCode {
        match self {
            ResumeRefusal::NotOwnAddress(_) => ErrorCode::NotPermitted,
            ResumeRefusal::Duplicate(_) => ErrorCode::AddressInUse,
            _ => ErrorCode::InvalidRequest,
        }
    }

    /// A short label for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            ResumeRefusal::NotASegment(_) => "not_a_segment",
            ResumeRefusal::NoFifo(_) => "no_fifo",
            ResumeRefusal::BadPlacement(_) => "bad_placement",
            ResumeRefusal::NotOwnAddress(_) => "not_own_address",
            ResumeRefusal::Duplicate(_) => "duplicate",
        }
    }
}

/// Maps a reported segment and checks each session's FIFOs in it. Done without any lock: the
/// segment may be large, and the reporter chose it.
pub fn inspect(
    segment: OwnedFd,
    sessions: &[ResumedSession],
) -> Result<(SegmentIdentity, Vec<Result<(), ResumeRefusal>>), ResumeRefusal> {
    let stat = rustix::fs::fstat(segment.as_fd())
        .map_err(|e| ResumeRefusal::NotASegment(e.to_string()))?;
    let identity = SegmentIdentity {
        dev: stat.st_dev,
        ino: stat.st_ino,
    };
    let segment =
        Arc::new(Segment::open(segment).map_err(|e| ResumeRefusal::NotASegment(e.to_string()))?);
    let fifo_area = layout::ct_fifo_area() as u32;
    let checked = sessions
        .iter()
        .map(|s| {
            let placed = s.slot < CT_MAX_SLOTS
                && s.rx_offset != s.tx_offset
                && s.rx_offset >= fifo_area
                && s.tx_offset >= fifo_area;
            if !placed {
                return Err(ResumeRefusal::BadPlacement(s.slot));
            }
            for offset in [s.rx_offset, s.tx_offset] {
                FifoObserver::attach(segment.clone(), offset as usize)
                    .map_err(|_| ResumeRefusal::NoFifo(offset))?;
            }
            Ok(())
        })
        .collect();
    Ok((identity, checked))
}

/// One reported half, waiting for its other half.
#[derive(Debug, Clone, Copy)]
pub struct Half<S> {
    pub session: S,
    pub worker: WorkerId,
    pub report: ResumedSession,
}

/// What a claim came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed<S> {
    /// The other half has not been reported (yet).
    Unconfirmed,
    /// The other half, reported earlier as `S`, matches: both are confirmed.
    Confirmed(S),
}

/// Unconfirmed halves by (segment, slot). Lives under the registry lock.
#[derive(Debug)]
pub struct ResumeHalves<S> {
    waiting: HashMap<(SegmentIdentity, u32), Half<S>>,
}

impl<S> Default for ResumeHalves<S> {
    fn default() -> Self {
        Self {
            waiting: HashMap::new(),
        }
    }
}

/// Whether two reports are the two halves of one session: opposite roles, mirrored addresses,
/// each one's receive FIFO the other's transmit FIFO, and two different workers.
fn mirrored<S>(waiting: &Half<S>, worker: WorkerId, report: &ResumedSession) -> bool {
    let w = &waiting.report;
    waiting.worker != worker
        && w.is_client != report.is_client
        && w.local == report.remote
        && w.remote == report.local
        && w.rx_offset == report.tx_offset
        && w.tx_offset == report.rx_offset
}

impl<S: Copy> ResumeHalves<S> {
    /// Takes a half reported by `worker` as `session`.
    pub fn claim(
        &mut self,
        segment: SegmentIdentity,
        worker: WorkerId,
        session: S,
        report: ResumedSession,
    ) -> Result<Claimed<S>, ResumeRefusal> {
        match self.waiting.entry((segment, report.slot)) {
            Entry::Vacant(v) => {
                v.insert(Half {
                    session,
                    worker,
                    report,
                });
                Ok(Claimed::Unconfirmed)
            }
            Entry::Occupied(o) if mirrored(o.get(), worker, &report) => {
                Ok(Claimed::Confirmed(o.remove().session))
            }
            // The same side twice, or a half that does not fit the one waiting: whoever came
            // first keeps the slot, and the newcomer proves nothing.
            Entry::Occupied(_) => Err(ResumeRefusal::Duplicate(report.slot)),
        }
    }

    /// Forgets the waiting halves `gone` picks (their session closed, or their worker left).
    pub fn forget(&mut self, mut gone: impl FnMut(&Half<S>) -> bool) {
        self.waiting.retain(|_, h| !gone(h));
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shunt_shm::fifo::init_fifo;

    fn report(is_client: bool, slot: u32) -> ResumedSession {
        let (a, b) = (
            "127.0.0.1:4000".parse().unwrap(),
            "127.0.0.1:80".parse().unwrap(),
        );
        let area = layout::ct_fifo_area() as u32;
        let (x, y) = (area, area + 8192);
        if is_client {
            ResumedSession {
                local: a,
                remote: b,
                is_client,
                slot,
                rx_offset: x,
                tx_offset: y,
            }
        } else {
            ResumedSession {
                local: b,
                remote: a,
                is_client,
                slot,
                rx_offset: y,
                tx_offset: x,
            }
        }
    }

    fn id(ino: u64) -> SegmentIdentity {
        SegmentIdentity { dev: 1, ino }
    }

    #[test]
    fn two_mirrored_halves_confirm_each_other() {
        let mut h = ResumeHalves::default();
        let (client, server) = (WorkerId(1), WorkerId(2));
        assert_eq!(
            h.claim(id(9), client, 10u64, report(true, 3)),
            Ok(Claimed::Unconfirmed)
        );
        assert_eq!(
            h.claim(id(9), server, 11u64, report(false, 3)),
            Ok(Claimed::Confirmed(10))
        );
        assert!(h.is_empty());
    }

    #[test]
    fn forgeries_confirm_nothing() {
        let mut h = ResumeHalves::default();
        let (victim, forger) = (WorkerId(1), WorkerId(2));
        h.claim(id(9), victim, 1u64, report(true, 3)).unwrap();
        // Another segment (the forger's own memfd), another slot, the same side, or a half
        // that does not mirror: none of them confirms the victim's half.
        assert_eq!(
            h.claim(id(8), forger, 2, report(false, 3)),
            Ok(Claimed::Unconfirmed)
        );
        assert_eq!(
            h.claim(id(9), forger, 3, report(false, 4)),
            Ok(Claimed::Unconfirmed)
        );
        assert_eq!(
            h.claim(id(9), forger, 4, report(true, 3)),
            Err(ResumeRefusal::Duplicate(3))
        );
        let mut wrong = report(false, 3);
        wrong.local = "127.0.0.1:81".parse().unwrap();
        assert_eq!(
            h.claim(id(9), forger, 5, wrong),
            Err(ResumeRefusal::Duplicate(3))
        );
        // One worker cannot confirm its own half either.
        assert_eq!(
            h.claim(id(9), victim, 6, report(false, 3)),
            Err(ResumeRefusal::Duplicate(3))
        );
        assert_eq!(h.len(), 3);
        h.forget(|half| half.worker == forger);
        assert_eq!(h.len(), 1);
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd/mmap syscalls")]
    fn inspection_finds_fifos_only_where_they_are() {
        let len = layout::ct_fifo_area() + (64 << 10);
        let seg = Segment::create("resume-test", len).unwrap();
        let good = report(true, 3);
        for off in [good.rx_offset, good.tx_offset] {
            init_fifo(seg.region(), off as usize, 4096).unwrap();
        }
        let mut nowhere = good;
        nowhere.tx_offset += 32 << 10;
        let mut in_rings = good;
        in_rings.rx_offset = 64;
        let mut slot = good;
        slot.slot = CT_MAX_SLOTS;
        let (_, results) = inspect(
            seg.try_clone_fd().unwrap(),
            &[good, nowhere, in_rings, slot],
        )
        .unwrap();
        assert_eq!(
            results,
            [
                Ok(()),
                Err(ResumeRefusal::NoFifo(nowhere.tx_offset)),
                Err(ResumeRefusal::BadPlacement(3)),
                Err(ResumeRefusal::BadPlacement(CT_MAX_SLOTS)),
            ]
        );
        let (r, _w) = rustix::pipe::pipe().unwrap();
        assert!(matches!(
            inspect(r, &[good]),
            Err(ResumeRefusal::NotASegment(_))
        ));
    }
}
