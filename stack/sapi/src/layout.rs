//! Where things sit inside the segments shuntd hands to apps.
//!
//! Both sides compute offsets from these functions instead of reading them from shared memory, so
//! a hostile peer cannot redirect anyone to another place in the segment.
//!
//! A cut-through segment, shared by one (client worker, server worker) pair:
//!
//! ```text
//! 0                 segment header (shunt-shm)
//! RING_TO_SERVER    events the client posts to the server (rx-data, tx-space, closed, reset)
//! RING_TO_CLIENT    events the server posts to the client
//! FIFO_AREA         FIFO pairs, one per session, allocated by shuntd
//! ```
//!
//! A worker's event queue lives alone in a small segment: the header, then one ring that only
//! shuntd writes.

use shunt_shm::ring::ring_footprint;
use shunt_shm::segment::SEGMENT_HEADER_LEN;

/// Records per cut-through event ring.
pub const CT_RING_RECORDS: u32 = 1024;

/// Sessions per cut-through segment. Each session has at most four records outstanding in a
/// ring (rx-data and tx-space are coalesced to one each, closed and reset happen once), so a ring
/// sized for `4 * CT_MAX_SLOTS` records never overflows between well-behaved peers.
pub const CT_MAX_SLOTS: u32 = CT_RING_RECORDS / 4;

const fn align_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// Offset of the ring the client writes and the server reads.
pub fn ct_ring_to_server() -> usize {
    align_up(SEGMENT_HEADER_LEN, 64)
}

/// Offset of the ring the server writes and the client reads.
pub fn ct_ring_to_client() -> usize {
    ct_ring_to_server() + align_up(ring_footprint(CT_RING_RECORDS), 64)
}

/// First byte available for FIFOs in a cut-through segment.
pub fn ct_fifo_area() -> usize {
    align_up(ct_ring_to_client() + ring_footprint(CT_RING_RECORDS), 4096)
}

/// (inbound, outbound) ring offsets for one side of a cut-through segment.
pub fn ct_rings(is_client: bool) -> (usize, usize) {
    if is_client {
        (ct_ring_to_client(), ct_ring_to_server())
    } else {
        (ct_ring_to_server(), ct_ring_to_client())
    }
}

/// Offset of a worker's event queue inside its event-queue segment.
pub fn event_queue_offset() -> usize {
    align_up(SEGMENT_HEADER_LEN, 64)
}

/// Size of the segment holding an event queue of `records` records.
pub fn event_queue_segment_len(records: u32) -> usize {
    align_up(event_queue_offset() + ring_footprint(records), 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_do_not_overlap() {
        assert!(ct_ring_to_server() >= SEGMENT_HEADER_LEN);
        assert!(ct_ring_to_client() >= ct_ring_to_server() + ring_footprint(CT_RING_RECORDS));
        assert!(ct_fifo_area() >= ct_ring_to_client() + ring_footprint(CT_RING_RECORDS));
        assert_eq!(ct_fifo_area() % 4096, 0);
        let (c_in, c_out) = ct_rings(true);
        let (s_in, s_out) = ct_rings(false);
        assert_eq!((c_in, c_out), (s_out, s_in));
    }
}
