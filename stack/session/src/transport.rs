//! The one interface every transport implements.
//!
//! The session layer asks a transport to listen, connect, half-close, close, reset and clean up,
//! and reads its static [`TransportOptions`] to decide how data moves. It never asks *which*
//! protocol it holds. Cut-through is the first implementation; TCP, UDP and TLS plug in here.

use std::fmt;
use std::net::SocketAddr;

use shunt_sapi::event::FifoPair;

use crate::app::WorkerId;
use crate::link::SegmentGrant;

/// Transports known to the session layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TransportProto {
    CutThrough,
}

impl TransportProto {
    pub const ALL: [TransportProto; 1] = [TransportProto::CutThrough];

    pub fn as_str(self) -> &'static str {
        match self {
            TransportProto::CutThrough => "cut-through",
        }
    }
}

impl fmt::Display for TransportProto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the session layer moves a transport's data (VPP's `tx_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxType {
    /// The transport peeks the tx FIFO and drops bytes once acknowledged (TCP).
    Peek,
    /// The transport dequeues the tx FIFO (UDP).
    Dequeue,
    /// The transport moves data itself; the session layer stays out of the data path.
    Internal,
}

/// Connection-oriented or connectionless.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceType {
    Connection,
    Connectionless,
}

#[derive(Debug, Clone, Copy)]
pub struct TransportOptions {
    pub name: &'static str,
    pub short_name: &'static str,
    pub tx_type: TxType,
    pub service_type: ServiceType,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("no room for another FIFO pair in the segment")]
    SegmentFull,
    #[error("cannot create a shared segment: {0}")]
    Segment(String),
    #[error("connection {0:?} is unknown to this transport")]
    UnknownConnection(ConnectionId),
    #[error("the connection needs a new segment, and the connecting side may not have one")]
    NeedsSegment,
}

/// A transport's own name for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

/// What the session layer asks a transport to connect.
#[derive(Debug, Clone, Copy)]
pub struct ConnectRequest {
    pub client: WorkerId,
    pub server: WorkerId,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Bytes per FIFO the apps asked for, for transports with FIFOs; `None`: the default.
    pub fifo_size: Option<u32>,
    /// Whether the connection may make a new shared segment, which is charged to the
    /// connecting side; if it may not and needs one, the connect fails with `NeedsSegment`.
    pub may_create_segment: bool,
}

/// A shared segment a connect made, for the layer to charge to the connecting side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewSegment {
    pub id: u32,
    pub bytes: u64,
}

/// What a transport freed when a worker went away.
#[derive(Debug, Default)]
pub struct WorkerGone {
    /// Its connections, now reset and freed.
    pub connections: Vec<ConnectionId>,
    /// Segments freed with them.
    pub segments: Vec<u32>,
}

/// A new connection and what each side must be told to use it.
#[derive(Debug)]
pub struct Connected {
    pub id: ConnectionId,
    /// The FIFOs, as the client sees them.
    pub client_fifos: FifoPair,
    /// The FIFOs, as the server sees them.
    pub server_fifos: FifoPair,
    /// Shared segments each side must receive before it hears of the session.
    pub client_grant: Option<SegmentGrant>,
    pub server_grant: Option<SegmentGrant>,
    /// The segment made for this connection, if one was.
    pub new_segment: Option<NewSegment>,
}

/// Byte counters read from the transport, for listings and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionStats {
    /// Bytes the client has written.
    pub client_to_server: u64,
    /// Bytes the server has written.
    pub server_to_client: u64,
}

pub trait Transport: Send + Sync {
    fn options(&self) -> TransportOptions;

    // Setup.
    fn start_listen(&self, endpoint: SocketAddr) -> Result<(), TransportError>;
    fn stop_listen(&self, endpoint: SocketAddr);
    fn connect(&self, req: &ConnectRequest) -> Result<Connected, TransportError>;
    /// One side closed its write direction.
    fn half_close(&self, id: ConnectionId, by_client: bool) -> Result<(), TransportError>;
    /// One side closed; the connection is freed once both have.
    fn close(&self, id: ConnectionId, by_client: bool) -> Result<(), TransportError>;
    /// Abort: the peer sees a reset, unread data is dropped.
    fn reset(&self, id: ConnectionId) -> Result<(), TransportError>;
    /// Free everything the connection holds, whatever state it is in.
    fn cleanup(&self, id: ConnectionId);
    /// A worker is gone: reset its connections and release what only it held.
    fn worker_gone(&self, worker: WorkerId) -> WorkerGone;

    // Retrieval.
    fn stats(&self, id: ConnectionId) -> Option<ConnectionStats>;
}
