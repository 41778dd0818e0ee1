//! Session events: fixed 64-byte records in shared-memory rings.
//!
//! Two kinds of ring carry them. Each app worker's *event queue* is written only by `shuntd`
//! (accepted, connected, connect failed, reset, standby revoked). Each cut-through segment holds
//! one ring per direction written only by the peer app (opened, rx-data, tx-space, peer closed,
//! peer reset), so data notifications go app to app without a daemon hop. A record is decoded from bytes a hostile
//! process may have written: every field is checked, and nothing here panics.
//!
//! Layout: byte 0 is the kind, bytes 1..4 are zero, then little-endian fields in the order of the
//! variant's declaration, then zero padding.

use std::net::SocketAddr;

use crate::endpoint::{self, EndpointError, PACKED_LEN};
use crate::error::ErrorCode;

/// Size of one record; matches the ring's record size.
pub const RECORD_LEN: usize = 64;

/// Where a cut-through session's FIFO pair sits, as named in accepted/connected events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FifoPair {
    /// The cut-through segment, as announced by `SegmentAdded`.
    pub segment_id: u32,
    /// The session's slot in that segment; peers name the session by it in ring events.
    pub slot: u32,
    /// Offset of the FIFO this side reads.
    pub rx_offset: u32,
    /// Offset of the FIFO this side writes.
    pub tx_offset: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// shuntd: a connect reached one of this worker's listeners. A session in `standby` is
    /// held back from accept until the peer sends [`Event::Opened`] for its slot.
    Accepted {
        listener_id: u64,
        session_id: u64,
        fifos: FifoPair,
        peer: SocketAddr,
        standby: bool,
    },
    /// shuntd: the connect with this request id is established.
    Connected {
        request_id: u32,
        session_id: u64,
        fifos: FifoPair,
        local: SocketAddr,
    },
    /// shuntd: the connect with this request id failed.
    ConnectFailed { request_id: u32, code: ErrorCode },
    /// shuntd: the session was torn down by the node (its peer died, or policy changed).
    Reset { session_id: u64 },
    /// shuntd: policy changed; drop every standby session that has not been opened, since
    /// shuntd decided it under the old policy.
    StandbyRevoked,
    /// peer: it opened the standby session in this slot; it may now be accepted.
    Opened { slot: u32 },
    /// peer: new bytes (or a half-close) are waiting in the slot's rx FIFO.
    RxData { slot: u32 },
    /// peer: the slot's tx FIFO has room again.
    TxSpace { slot: u32 },
    /// peer: it closed the session; it reads no more and writes no more.
    PeerClosed { slot: u32 },
    /// peer: it reset the session; unread data is discarded.
    PeerReset { slot: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventDecodeError {
    #[error("unknown event kind {0}")]
    UnknownKind(u8),
    #[error("reserved bytes are not zero")]
    ReservedNotZero,
    #[error("bad endpoint: {0}")]
    Endpoint(#[from] EndpointError),
}

mod kind {
    pub(super) const ACCEPTED: u8 = 1;
    pub(super) const CONNECTED: u8 = 2;
    pub(super) const CONNECT_FAILED: u8 = 3;
    pub(super) const RESET: u8 = 4;
    pub(super) const ACCEPTED_STANDBY: u8 = 5;
    pub(super) const STANDBY_REVOKED: u8 = 6;
    pub(super) const RX_DATA: u8 = 16;
    pub(super) const TX_SPACE: u8 = 17;
    pub(super) const PEER_CLOSED: u8 = 18;
    pub(super) const PEER_RESET: u8 = 19;
    pub(super) const OPENED: u8 = 20;
}

const HEADER_LEN: usize = 4;

struct Writer {
    buf: [u8; RECORD_LEN],
    at: usize,
}

impl Writer {
    fn new(kind: u8) -> Self {
        let mut buf = [0u8; RECORD_LEN];
        buf[0] = kind;
        Self {
            buf,
            at: HEADER_LEN,
        }
    }
    fn put(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf[self.at..self.at + bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.put(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.put(&v.to_le_bytes())
    }
    fn fifos(&mut self, f: &FifoPair) -> &mut Self {
        self.u32(f.segment_id)
            .u32(f.slot)
            .u32(f.rx_offset)
            .u32(f.tx_offset)
    }
    fn addr(&mut self, addr: SocketAddr) -> &mut Self {
        let mut packed = [0u8; PACKED_LEN];
        endpoint::pack(addr, &mut packed);
        self.put(&packed)
    }
}

struct Reader<'a> {
    buf: &'a [u8; RECORD_LEN],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        // Every variant's fields fit in RECORD_LEN - HEADER_LEN bytes (checked by the tests), so
        // the range is always in bounds.
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[self.at..self.at + N]);
        self.at += N;
        out
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn fifos(&mut self) -> FifoPair {
        FifoPair {
            segment_id: self.u32(),
            slot: self.u32(),
            rx_offset: self.u32(),
            tx_offset: self.u32(),
        }
    }
    fn addr(&mut self) -> Result<SocketAddr, EndpointError> {
        endpoint::unpack(&self.take::<PACKED_LEN>())
    }
}

impl Event {
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let w = match *self {
            Event::Accepted {
                listener_id,
                session_id,
                fifos,
                peer,
                standby,
            } => {
                let mut w = Writer::new(if standby {
                    kind::ACCEPTED_STANDBY
                } else {
                    kind::ACCEPTED
                });
                w.u64(listener_id).u64(session_id).fifos(&fifos).addr(peer);
                w
            }
            Event::Connected {
                request_id,
                session_id,
                fifos,
                local,
            } => {
                let mut w = Writer::new(kind::CONNECTED);
                w.u32(request_id).u64(session_id).fifos(&fifos).addr(local);
                w
            }
            Event::ConnectFailed { request_id, code } => {
                let mut w = Writer::new(kind::CONNECT_FAILED);
                w.u32(request_id).u32(code.to_wire() as u32);
                w
            }
            Event::Reset { session_id } => {
                let mut w = Writer::new(kind::RESET);
                w.u64(session_id);
                w
            }
            Event::StandbyRevoked => Writer::new(kind::STANDBY_REVOKED),
            Event::Opened { slot } => Self::slot_record(kind::OPENED, slot),
            Event::RxData { slot } => Self::slot_record(kind::RX_DATA, slot),
            Event::TxSpace { slot } => Self::slot_record(kind::TX_SPACE, slot),
            Event::PeerClosed { slot } => Self::slot_record(kind::PEER_CLOSED, slot),
            Event::PeerReset { slot } => Self::slot_record(kind::PEER_RESET, slot),
        };
        w.buf
    }

    fn slot_record(kind: u8, slot: u32) -> Writer {
        let mut w = Writer::new(kind);
        w.u32(slot);
        w
    }

    pub fn decode(buf: &[u8; RECORD_LEN]) -> Result<Event, EventDecodeError> {
        if buf[1..HEADER_LEN].iter().any(|&b| b != 0) {
            return Err(EventDecodeError::ReservedNotZero);
        }
        let mut r = Reader {
            buf,
            at: HEADER_LEN,
        };
        Ok(match buf[0] {
            k @ (kind::ACCEPTED | kind::ACCEPTED_STANDBY) => Event::Accepted {
                listener_id: r.u64(),
                session_id: r.u64(),
                fifos: r.fifos(),
                peer: r.addr()?,
                standby: k == kind::ACCEPTED_STANDBY,
            },
            kind::CONNECTED => Event::Connected {
                request_id: r.u32(),
                session_id: r.u64(),
                fifos: r.fifos(),
                local: r.addr()?,
            },
            kind::CONNECT_FAILED => Event::ConnectFailed {
                request_id: r.u32(),
                code: ErrorCode::from_wire(r.u32() as i32),
            },
            kind::RESET => Event::Reset {
                session_id: r.u64(),
            },
            kind::STANDBY_REVOKED => Event::StandbyRevoked,
            kind::OPENED => Event::Opened { slot: r.u32() },
            kind::RX_DATA => Event::RxData { slot: r.u32() },
            kind::TX_SPACE => Event::TxSpace { slot: r.u32() },
            kind::PEER_CLOSED => Event::PeerClosed { slot: r.u32() },
            kind::PEER_RESET => Event::PeerReset { slot: r.u32() },
            other => return Err(EventDecodeError::UnknownKind(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fifos() -> FifoPair {
        FifoPair {
            segment_id: 7,
            slot: 255,
            rx_offset: 0x1000,
            tx_offset: 0xffff_f000,
        }
    }

    #[test]
    fn every_variant_round_trips() {
        let v6: SocketAddr = "[fd00::abcd]:65535".parse().unwrap();
        let v4: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let events = [
            Event::Accepted {
                listener_id: u64::MAX,
                session_id: 1 << 40,
                fifos: fifos(),
                peer: v6,
                standby: false,
            },
            Event::Connected {
                request_id: u32::MAX,
                session_id: 3,
                fifos: fifos(),
                local: v4,
            },
            Event::ConnectFailed {
                request_id: 9,
                code: ErrorCode::Denied,
            },
            Event::Accepted {
                listener_id: 2,
                session_id: u64::MAX,
                fifos: fifos(),
                peer: v4,
                standby: true,
            },
            Event::Reset { session_id: 5 },
            Event::StandbyRevoked,
            Event::Opened { slot: 6 },
            Event::RxData { slot: 1 },
            Event::TxSpace { slot: 2 },
            Event::PeerClosed { slot: 3 },
            Event::PeerReset { slot: 4 },
        ];
        for ev in events {
            assert_eq!(Event::decode(&ev.encode()), Ok(ev), "{ev:?}");
        }
    }

    #[test]
    fn rejects_unknown_kind_and_reserved_bytes() {
        let mut rec = Event::RxData { slot: 1 }.encode();
        rec[0] = 200;
        assert_eq!(Event::decode(&rec), Err(EventDecodeError::UnknownKind(200)));
        let mut rec = Event::RxData { slot: 1 }.encode();
        rec[2] = 1;
        assert_eq!(Event::decode(&rec), Err(EventDecodeError::ReservedNotZero));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), RECORD_LEN)) {
            let rec: [u8; RECORD_LEN] = bytes.try_into().unwrap();
            if let Ok(ev) = Event::decode(&rec) {
                // Whatever decodes must survive a round trip unchanged.
                prop_assert_eq!(Event::decode(&ev.encode()), Ok(ev));
            }
        }
    }
}
