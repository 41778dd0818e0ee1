//! Cut-through: two co-located app workers joined FIFO-to-FIFO in a shared segment.
//!
//! Each (client worker, server worker) pair gets its own segments, so memory is only ever shared
//! between the two processes that use it. A segment holds two event rings (one per direction)
//! and up to [`CT_MAX_SLOTS`] FIFO pairs; when a pair's segments are full another is made.
//! After the connect, shuntd is out of the data path: peers notify each other through the rings
//! and a wake-up pipe per direction (each write end held by its ringer alone), and notice each
//! other's death when the other's pipe closes, so a session keeps flowing even if shuntd is
//! killed.
//!
//! The allocator state stays in shuntd's private memory: a peer can scribble on the segment but
//! cannot make shuntd hand out overlapping FIFOs.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use shunt_sapi::event::FifoPair;
use shunt_sapi::layout::{self, CT_MAX_SLOTS, CT_RING_RECORDS};
use shunt_shm::alloc::SegmentAllocator;
use shunt_shm::fifo::{self, FifoObserver};
use shunt_shm::ring;
use shunt_shm::segment::Segment;
use shunt_shm::wake::{self, WakeReceiver, WakeSender};

use crate::app::WorkerId;
use crate::link::SegmentGrant;
use crate::transport::{
    ConnectRequest, Connected, ConnectionId, ConnectionStats, NewSegment, ServiceType, Transport,
    TransportError, TransportOptions, TxType, WorkerGone,
};

#[derive(Debug, Clone, Copy)]
pub struct CutThroughConfig {
    /// Bytes per FIFO (one per direction per session); a power of two.
    pub fifo_size: u32,
    /// Bytes per segment.
    pub segment_size: usize,
}

impl Default for CutThroughConfig {
    fn default() -> Self {
        Self {
            fifo_size: 1 << 20,
            segment_size: 64 << 20,
        }
    }
}

struct CtSegment {
    id: u32,
    client: WorkerId,
    server: WorkerId,
    segment: Arc<Segment>,
    allocator: SegmentAllocator,
    slots: Vec<bool>,
    live: usize,
    /// Each side's ends of the pair's wake-up channels, handed out with the first grant to it;
    /// shuntd keeps none, so each side's death closes the other's channel.
    client_ends: Option<(WakeSender, WakeReceiver)>,
    server_ends: Option<(WakeSender, WakeReceiver)>,
}

struct CtConnection {
    segment: u32,
    slot: u32,
    /// Written by the client, read by the server.
    to_server: u32,
    /// Written by the server, read by the client.
    to_client: u32,
    client_closed: bool,
    server_closed: bool,
}

/// Counters of connections already freed, so totals stay monotonic.
#[derive(Default, Clone, Copy)]
struct Retired {
    bytes: u64,
    full_events: u64,
    notifications: u64,
}

#[derive(Default)]
struct State {
    retired: Retired,
    next_segment: u32,
    next_connection: u64,
    segments: BTreeMap<u32, CtSegment>,
    pairs: HashMap<(WorkerId, WorkerId), Vec<u32>>,
    connections: BTreeMap<ConnectionId, CtConnection>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CutThroughTotals {
    pub bytes: u64,
    pub full_events: u64,
    pub notifications: u64,
}

pub struct CutThrough {
    config: CutThroughConfig,
    state: Mutex<State>,
}

impl CutThrough {
    pub fn new(config: CutThroughConfig) -> Self {
        Self {
            config,
            state: Mutex::new(State::default()),
        }
    }

    pub fn config(&self) -> CutThroughConfig {
        self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves only bookkeeping behind; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_segment(
        &self,
        st: &mut State,
        client: WorkerId,
        server: WorkerId,
    ) -> Result<u32, TransportError> {
        let id = st.next_segment;
        st.next_segment = st.next_segment.wrapping_add(1);
        let name = format!("shunt-ct-{client}-{server}-{id}");
        let segment = Segment::create(&name, self.config.segment_size)
            .map_err(|e| TransportError::Segment(e.to_string()))?;
        for offset in [layout::ct_ring_to_server(), layout::ct_ring_to_client()] {
            ring::init_ring(segment.region(), offset, CT_RING_RECORDS)
                .map_err(|e| TransportError::Segment(e.to_string()))?;
        }
        let io = |e: std::io::Error| TransportError::Segment(e.to_string());
        let (to_server, from_client) = wake::channel().map_err(io)?;
        let (to_client, from_server) = wake::channel().map_err(io)?;
        let mut allocator = SegmentAllocator::new(self.config.segment_size);
        // Reserve everything before the FIFO area so FIFOs never overlap the rings.
        allocator
            .alloc(
                layout::ct_fifo_area() - shunt_shm::segment::SEGMENT_HEADER_LEN,
                64,
            )
            .ok_or(TransportError::SegmentFull)?;
        st.segments.insert(
            id,
            CtSegment {
                id,
                client,
                server,
                segment: Arc::new(segment),
                allocator,
                slots: vec![false; CT_MAX_SLOTS as usize],
                live: 0,
                client_ends: Some((to_server, from_server)),
                server_ends: Some((to_client, from_client)),
            },
        );
        st.pairs.entry((client, server)).or_default().push(id);
        Ok(id)
    }

    /// The FIFO size for a request: what the apps asked for, within a quarter of a segment
    /// (so that a segment always holds a pair), or the configured default.
    fn fifo_size_for(&self, req: &ConnectRequest) -> u32 {
        let most = u32::try_from(self.config.segment_size / 4).unwrap_or(u32::MAX);
        let most = 1u32 << most.max(4096).ilog2();
        req.fifo_size
            .map_or(self.config.fifo_size, |asked| asked.clamp(4096, most))
    }

    fn connect_pair(&self, req: &ConnectRequest) -> Result<Connected, TransportError> {
        let fifo_size = self.fifo_size_for(req);
        let footprint = fifo::fifo_footprint(fifo_size);
        let mut st = self.lock();
        let candidates = st
            .pairs
            .get(&(req.client, req.server))
            .cloned()
            .unwrap_or_default();
        let mut chosen = None;
        for id in candidates {
            let seg = &st.segments[&id];
            if seg.live < CT_MAX_SLOTS as usize && seg.allocator.free_bytes() >= 2 * footprint {
                chosen = Some(id);
                break;
            }
        }
        let (seg_id, new_segment) = match chosen {
            Some(id) => (id, None),
            None if !req.may_create_segment => return Err(TransportError::NeedsSegment),
            None => {
                let id = self.new_segment(&mut st, req.client, req.server)?;
                let bytes = self.config.segment_size as u64;
                (id, Some(NewSegment { id, bytes }))
            }
        };
        let conn_id = ConnectionId(st.next_connection);
        st.next_connection += 1;
        let seg = st
            .segments
            .get_mut(&seg_id)
            .expect("segment just found or made");
        let slot = seg
            .slots
            .iter()
            .position(|used| !used)
            .ok_or(TransportError::SegmentFull)?;
        let to_server = seg
            .allocator
            .alloc(footprint, 64)
            .ok_or(TransportError::SegmentFull)?;
        let Some(to_client) = seg.allocator.alloc(footprint, 64) else {
            seg.allocator.free(to_server);
            return Err(TransportError::SegmentFull);
        };
        for off in [to_server, to_client] {
            if let Err(e) = fifo::init_fifo(seg.segment.region(), off, fifo_size) {
                seg.allocator.free(to_server);
                seg.allocator.free(to_client);
                return Err(TransportError::Segment(e.to_string()));
            }
        }
        seg.slots[slot] = true;
        seg.live += 1;
        let client_grant = grant(seg, true);
        let server_grant = grant(seg, false);
        let (to_server, to_client) = (to_server as u32, to_client as u32);
        let slot = slot as u32;
        st.connections.insert(
            conn_id,
            CtConnection {
                segment: seg_id,
                slot,
                to_server,
                to_client,
                client_closed: false,
                server_closed: false,
            },
        );
        let connected = Connected {
            id: conn_id,
            client_fifos: FifoPair {
                segment_id: seg_id,
                slot,
                rx_offset: to_client,
                tx_offset: to_server,
            },
            server_fifos: FifoPair {
                segment_id: seg_id,
                slot,
                rx_offset: to_server,
                tx_offset: to_client,
            },
            client_grant,
            server_grant,
            new_segment,
        };
        Ok(connected)
    }

    fn free_connection(st: &mut State, id: ConnectionId) {
        let Some(conn) = st.connections.get(&id) else {
            return;
        };
        for off in [conn.to_server, conn.to_client] {
            if let Some(o) = Self::observe(st, conn, off) {
                let s = o.stats();
                st.retired.bytes += s.bytes_written;
                st.retired.full_events += s.full_events;
                st.retired.notifications += s.notifications;
            }
        }
        let conn = st.connections.remove(&id).expect("present");
        if let Some(seg) = st.segments.get_mut(&conn.segment) {
            seg.allocator.free(conn.to_server as usize);
            seg.allocator.free(conn.to_client as usize);
            if let Some(used) = seg.slots.get_mut(conn.slot as usize) {
                *used = false;
            }
            seg.live -= 1;
        }
    }

    fn observe(st: &State, conn: &CtConnection, offset: u32) -> Option<FifoObserver> {
        let seg = st.segments.get(&conn.segment)?;
        FifoObserver::attach(seg.segment.clone(), offset as usize).ok()
    }

    /// Number of live segments, for metrics.
    pub fn segment_count(&self) -> usize {
        self.lock().segments.len()
    }

    /// Bytes written, FIFO-full events and notifications sent, over every connection this
    /// shuntd made, live or freed.
    pub fn totals(&self) -> CutThroughTotals {
        let st = self.lock();
        let live = st
            .connections
            .values()
            .flat_map(|c| [c.to_server, c.to_client].map(|off| Self::observe(&st, c, off)))
            .flatten()
            .map(|o| o.stats());
        let mut t = CutThroughTotals {
            bytes: st.retired.bytes,
            full_events: st.retired.full_events,
            notifications: st.retired.notifications,
        };
        for s in live {
            t.bytes += s.bytes_written;
            t.full_events += s.full_events;
            t.notifications += s.notifications;
        }
        t
    }
}

fn grant(seg: &mut CtSegment, is_client: bool) -> Option<SegmentGrant> {
    let ends = if is_client {
        &mut seg.client_ends
    } else {
        &mut seg.server_ends
    };
    let (sender, receiver) = ends.take()?;
    Some(SegmentGrant {
        segment_id: seg.id,
        is_client,
        segment: seg.segment.clone(),
        sender,
        receiver,
    })
}

impl Transport for CutThrough {
    fn options(&self) -> TransportOptions {
        TransportOptions {
            name: "cut-through",
            short_name: "CT",
            tx_type: TxType::Internal,
            service_type: ServiceType::Connection,
        }
    }

    fn start_listen(&self, _endpoint: std::net::SocketAddr) -> Result<(), TransportError> {
        // Cut-through listeners exist only in the session tables; nothing to bind.
        Ok(())
    }

    fn stop_listen(&self, _endpoint: std::net::SocketAddr) {}

    fn connect(&self, req: &ConnectRequest) -> Result<Connected, TransportError> {
        self.connect_pair(req)
    }

    fn half_close(&self, id: ConnectionId, _by_client: bool) -> Result<(), TransportError> {
        // Apps signal half-close to each other through the FIFO's shutdown flag; shuntd only
        // checks the connection exists.
        let st = self.lock();
        st.connections
            .get(&id)
            .map(|_| ())
            .ok_or(TransportError::UnknownConnection(id))
    }

    fn close(&self, id: ConnectionId, by_client: bool) -> Result<(), TransportError> {
        let mut st = self.lock();
        let conn = st
            .connections
            .get_mut(&id)
            .ok_or(TransportError::UnknownConnection(id))?;
        if by_client {
            conn.client_closed = true;
        } else {
            conn.server_closed = true;
        }
        if conn.client_closed && conn.server_closed {
            Self::free_connection(&mut st, id);
        }
        Ok(())
    }

    fn reset(&self, id: ConnectionId) -> Result<(), TransportError> {
        let st = self.lock();
        let conn = st
            .connections
            .get(&id)
            .ok_or(TransportError::UnknownConnection(id))?;
        for off in [conn.to_server, conn.to_client] {
            if let Some(o) = Self::observe(&st, conn, off) {
                o.reset();
            }
        }
        Ok(())
    }

    fn cleanup(&self, id: ConnectionId) {
        Self::free_connection(&mut self.lock(), id);
    }

    fn worker_gone(&self, worker: WorkerId) -> WorkerGone {
        let mut st = self.lock();
        let dead: Vec<u32> = st
            .segments
            .values()
            .filter(|s| s.client == worker || s.server == worker)
            .map(|s| s.id)
            .collect();
        let gone: Vec<ConnectionId> = st
            .connections
            .iter()
            .filter(|(_, c)| dead.contains(&c.segment))
            .map(|(id, _)| *id)
            .collect();
        for id in &gone {
            if let Some(conn) = st.connections.get(id) {
                // A worker that half-closed before going left complete data and an end of
                // stream; resetting would throw away what its peer has not read yet.
                let gone_is_client = st
                    .segments
                    .get(&conn.segment)
                    .is_some_and(|s| s.client == worker);
                let written_by_gone = if gone_is_client {
                    conn.to_server
                } else {
                    conn.to_client
                };
                let clean = Self::observe(&st, conn, written_by_gone)
                    .is_some_and(|o| o.is_writer_shutdown());
                if !clean {
                    for off in [conn.to_server, conn.to_client] {
                        if let Some(o) = Self::observe(&st, conn, off) {
                            o.reset();
                        }
                    }
                }
            }
            Self::free_connection(&mut st, *id);
        }
        // The surviving peer keeps its own mapping; shuntd's copy of the segment goes.
        for id in &dead {
            if let Some(seg) = st.segments.remove(id)
                && let Some(list) = st.pairs.get_mut(&(seg.client, seg.server))
            {
                list.retain(|s| s != id);
            }
        }
        WorkerGone {
            connections: gone,
            segments: dead,
        }
    }

    fn stats(&self, id: ConnectionId) -> Option<ConnectionStats> {
        let st = self.lock();
        let conn = st.connections.get(&id)?;
        let written = |off| Self::observe(&st, conn, off).map(|o| o.stats().bytes_written);
        Some(ConnectionStats {
            client_to_server: written(conn.to_server)?,
            server_to_client: written(conn.to_client)?,
        })
    }
}
