//! Session-API messages: protobuf on the wire, checked domain types in the program.
//!
//! [`Request::decode`] and [`DaemonReply::decode`] take whatever arrived on the socket. They
//! return a typed error for anything malformed, so neither side ever acts on half-valid input.

use std::net::SocketAddr;

use prost::Message;
use shunt_proto::sapi as pb;

use crate::endpoint::{self, EndpointError};
use crate::error::ErrorCode;
use crate::usage::UsageReport;

/// Largest datagram either side sends or accepts.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;
/// Longest namespace id and app name accepted.
pub const MAX_NAME_LEN: usize = 128;
/// Longest namespace secret accepted.
pub const MAX_SECRET_LEN: usize = 256;
/// Most listeners replayed on one re-attach.
pub const MAX_RESUMED: usize = 4096;
/// Most sessions in one [`Request::ResumeSessions`]: 512 of the largest fit a message with
/// room to spare, and an app with more sends several.
pub const MAX_RESUMED_PER_MESSAGE: usize = 512;
/// Most requests in one [`Request::Batch`].
pub const MAX_BATCH: usize = 256;
/// Longest peer identity a pairing offer may carry: the SPIFFE specification's limit on an id.
pub const MAX_PEER_IDENTITY_LEN: usize = 2048;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("message of {0} bytes is larger than {MAX_MESSAGE_LEN}")]
    TooLarge(usize),
    #[error("not a valid protobuf message: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("message has no body")]
    MissingBody,
    #[error("field `{field}`: {error}")]
    Endpoint {
        field: &'static str,
        error: EndpointError,
    },
    #[error("field `{0}` is too long")]
    TooLong(&'static str),
    #[error("field `{0}` has too many entries")]
    TooMany(&'static str),
    #[error("field `{0}` has an invalid value")]
    Invalid(&'static str),
}

/// Where a worker's listeners and sessions may be reached from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Only cut-through connects from the worker's own namespace.
    Local,
    /// Also connects from other namespaces on the node.
    Global,
}

impl Scope {
    fn from_wire(v: i32) -> Result<Self, DecodeError> {
        match pb::Scope::try_from(v) {
            Ok(pb::Scope::Local) | Ok(pb::Scope::Unspecified) => Ok(Scope::Local),
            Ok(pb::Scope::Global) => Ok(Scope::Global),
            Err(_) => Err(DecodeError::Invalid("scope")),
        }
    }
    fn to_wire(self) -> i32 {
        match self {
            Scope::Local => pb::Scope::Local as i32,
            Scope::Global => pb::Scope::Global as i32,
        }
    }
}

/// A session that kept flowing while shuntd was away, as its worker reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumedSession {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub is_client: bool,
    /// Its slot and FIFOs in the segment the report travels with.
    pub slot: u32,
    pub rx_offset: u32,
    pub tx_offset: u32,
}

/// What a worker carries over from an earlier shuntd when it re-attaches. Its sessions follow
/// in [`Request::ResumeSessions`], one segment at a time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resume {
    pub listeners: Vec<SocketAddr>,
}

/// What became of one resumed session: its id at this shuntd, or why it was refused.
pub type ResumeOutcome = Result<u64, ErrorCode>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Attach {
        namespace_id: String,
        namespace_secret: Vec<u8>,
        app_name: String,
        scope: Scope,
        event_queue_len: u32,
        resume: Resume,
    },
    AttachWorker {
        app_id: u64,
        app_token: Vec<u8>,
        event_queue_len: u32,
        resume: Resume,
    },
    Listen {
        endpoint: SocketAddr,
    },
    Unlisten {
        listener_id: u64,
    },
    Connect {
        remote: SocketAddr,
        /// Establish in standby (see `Event::Accepted`).
        standby: bool,
    },
    SessionClosed {
        session_id: u64,
        reset: bool,
    },
    Pair(PairOffer),
    /// Fire-and-forget: no reply.
    Usage(UsageReport),
    /// A workload certificate of the app's namespace, by name.
    GetCertificate {
        name: String,
    },
    /// Requests sent in one datagram, each with its own request id, handled in order. Never
    /// holds attaches, session resumes (their fds could not be told apart) nor batches.
    Batch(Vec<(u32, Request)>),
    /// Sessions of one segment, carried over from an earlier shuntd; travels with the
    /// segment's memfd. At most [`MAX_RESUMED_PER_MESSAGE`].
    ResumeSessions(Vec<ResumedSession>),
}

/// Bytes in a pairing token.
pub const PAIR_TOKEN_LEN: usize = 32;

/// Which end of a connection a pairing offer comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PairRole {
    /// Opened the connection; becomes the session's client.
    Initiator,
    Responder,
}

impl PairRole {
    pub fn opposite(self) -> Self {
        match self {
            PairRole::Initiator => PairRole::Responder,
            PairRole::Responder => PairRole::Initiator,
        }
    }
}

/// One end of a pairing: see `Pair` in sapi.proto.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairOffer {
    pub token: [u8; PAIR_TOKEN_LEN],
    pub role: PairRole,
    /// The replaced connection as the offering side sees it.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Bytes per FIFO this side asks for (a power of two, at least [`MIN_FIFO_SIZE`]); `None`
    /// for shuntd's default.
    pub fifo_size: Option<u32>,
    /// The other end's identity (a SPIFFE id) as this side verified it in the handshake the
    /// pairing replaces: at most [`MAX_PEER_IDENTITY_LEN`] bytes of printable ASCII. `None`
    /// when nothing was verified (plain mode); shuntd's rules that name a principal then never
    /// match.
    pub peer_identity: Option<String>,
}

/// The smallest FIFO an app may ask for.
pub const MIN_FIFO_SIZE: u32 = 4096;

fn endpoint(field: &'static str, ep: Option<&pb::Endpoint>) -> Result<SocketAddr, DecodeError> {
    endpoint::from_proto(ep).map_err(|error| DecodeError::Endpoint { field, error })
}

fn bounded_string(field: &'static str, s: String, max: usize) -> Result<String, DecodeError> {
    if s.len() > max {
        Err(DecodeError::TooLong(field))
    } else {
        Ok(s)
    }
}

/// An identity is compared with rule patterns and shown in logs: control characters or
/// non-ASCII text could make two different ids print alike.
fn peer_identity(s: String) -> Result<Option<String>, DecodeError> {
    if s.is_empty() {
        return Ok(None);
    }
    if s.len() > MAX_PEER_IDENTITY_LEN {
        return Err(DecodeError::TooLong("peer_identity"));
    }
    if !s.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(DecodeError::Invalid("peer_identity"));
    }
    Ok(Some(s))
}

fn resume(listeners: Vec<pb::ResumedListener>) -> Result<Resume, DecodeError> {
    if listeners.len() > MAX_RESUMED {
        return Err(DecodeError::TooMany("listeners"));
    }
    Ok(Resume {
        listeners: listeners
            .iter()
            .map(|l| endpoint("listeners.endpoint", l.endpoint.as_ref()))
            .collect::<Result<_, _>>()?,
    })
}

fn resume_to_wire(r: &Resume) -> Vec<pb::ResumedListener> {
    r.listeners
        .iter()
        .map(|l| pb::ResumedListener {
            endpoint: Some(endpoint::to_proto(*l)),
        })
        .collect()
}

impl TryFrom<&pb::ResumedSession> for ResumedSession {
    type Error = DecodeError;

    fn try_from(s: &pb::ResumedSession) -> Result<Self, DecodeError> {
        Ok(ResumedSession {
            local: endpoint("sessions.local", s.local.as_ref())?,
            remote: endpoint("sessions.remote", s.remote.as_ref())?,
            is_client: s.is_client,
            slot: s.slot,
            rx_offset: s.rx_offset,
            tx_offset: s.tx_offset,
        })
    }
}

impl From<&ResumedSession> for pb::ResumedSession {
    fn from(s: &ResumedSession) -> Self {
        pb::ResumedSession {
            local: Some(endpoint::to_proto(s.local)),
            remote: Some(endpoint::to_proto(s.remote)),
            is_client: s.is_client,
            slot: s.slot,
            rx_offset: s.rx_offset,
            tx_offset: s.tx_offset,
        }
    }
}

impl TryFrom<pb::AppRequest> for Request {
    type Error = DecodeError;

    fn try_from(req: pb::AppRequest) -> Result<Self, DecodeError> {
        use pb::app_request::Body;
        Ok(match req.body.ok_or(DecodeError::MissingBody)? {
            Body::Attach(a) => {
                if a.namespace_secret.len() > MAX_SECRET_LEN {
                    return Err(DecodeError::TooLong("namespace_secret"));
                }
                Request::Attach {
                    namespace_id: bounded_string("namespace_id", a.namespace_id, MAX_NAME_LEN)?,
                    namespace_secret: a.namespace_secret,
                    app_name: bounded_string("app_name", a.app_name, MAX_NAME_LEN)?,
                    scope: Scope::from_wire(a.scope)?,
                    event_queue_len: a.event_queue_len,
                    resume: resume(a.listeners)?,
                }
            }
            Body::AttachWorker(a) => {
                if a.app_token.len() > MAX_SECRET_LEN {
                    return Err(DecodeError::TooLong("app_token"));
                }
                Request::AttachWorker {
                    app_id: a.app_id,
                    app_token: a.app_token,
                    event_queue_len: a.event_queue_len,
                    resume: resume(a.listeners)?,
                }
            }
            Body::ResumeSessions(r) => {
                if r.sessions.len() > MAX_RESUMED_PER_MESSAGE {
                    return Err(DecodeError::TooMany("sessions"));
                }
                Request::ResumeSessions(
                    r.sessions
                        .iter()
                        .map(ResumedSession::try_from)
                        .collect::<Result<_, _>>()?,
                )
            }
            Body::Listen(l) => Request::Listen {
                endpoint: endpoint("endpoint", l.endpoint.as_ref())?,
            },
            Body::Unlisten(u) => Request::Unlisten {
                listener_id: u.listener_id,
            },
            Body::Connect(c) => Request::Connect {
                remote: endpoint("remote", c.remote.as_ref())?,
                standby: c.standby,
            },
            Body::SessionClosed(c) => Request::SessionClosed {
                session_id: c.session_id,
                reset: c.reset,
            },
            Body::UsageReport(r) => Request::Usage(r.try_into()?),
            Body::GetCertificate(g) => Request::GetCertificate {
                name: bounded_string("name", g.name, MAX_NAME_LEN)?,
            },
            Body::Batch(b) => {
                if b.requests.len() > MAX_BATCH {
                    return Err(DecodeError::TooMany("batch"));
                }
                let mut requests = Vec::with_capacity(b.requests.len());
                for r in b.requests {
                    // Checked before decoding, so nesting never recurses.
                    if matches!(r.body, Some(Body::Batch(_))) {
                        return Err(DecodeError::Invalid("batch"));
                    }
                    let id = r.request_id;
                    let r = Request::try_from(r)?;
                    if !r.may_be_batched() {
                        return Err(DecodeError::Invalid("batch"));
                    }
                    requests.push((id, r));
                }
                Request::Batch(requests)
            }
            Body::Pair(p) => Request::Pair(PairOffer {
                token: p
                    .token
                    .as_slice()
                    .try_into()
                    .map_err(|_| DecodeError::Invalid("token"))?,
                role: match pb::PairRole::try_from(p.role) {
                    Ok(pb::PairRole::Initiator) => PairRole::Initiator,
                    Ok(pb::PairRole::Responder) => PairRole::Responder,
                    Ok(pb::PairRole::Unspecified) | Err(_) => {
                        return Err(DecodeError::Invalid("role"));
                    }
                },
                local: endpoint("local", p.local.as_ref())?,
                remote: endpoint("remote", p.remote.as_ref())?,
                fifo_size: match p.fifo_size {
                    0 => None,
                    n if n.is_power_of_two() && n >= MIN_FIFO_SIZE => Some(n),
                    _ => return Err(DecodeError::Invalid("fifo_size")),
                },
                peer_identity: peer_identity(p.peer_identity)?,
            }),
        })
    }
}

impl Request {
    /// Decodes one datagram into its request id and request.
    pub fn decode(bytes: &[u8]) -> Result<(u32, Request), DecodeError> {
        if bytes.len() > MAX_MESSAGE_LEN {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        let msg = pb::AppRequest::decode(bytes)?;
        let id = msg.request_id;
        Ok((id, Request::try_from(msg)?))
    }

    pub fn encode(&self, request_id: u32) -> Vec<u8> {
        self.to_wire(request_id).encode_to_vec()
    }

    /// Whether the request may travel in a [`Request::Batch`].
    pub fn may_be_batched(&self) -> bool {
        !matches!(
            self,
            Request::Attach { .. }
                | Request::AttachWorker { .. }
                | Request::ResumeSessions(_)
                | Request::Batch(_)
        )
    }

    fn to_wire(&self, request_id: u32) -> pb::AppRequest {
        use pb::app_request::Body;
        let body = match self {
            Request::Attach {
                namespace_id,
                namespace_secret,
                app_name,
                scope,
                event_queue_len,
                resume,
            } => Body::Attach(pb::Attach {
                namespace_id: namespace_id.clone(),
                namespace_secret: namespace_secret.clone(),
                app_name: app_name.clone(),
                scope: scope.to_wire(),
                event_queue_len: *event_queue_len,
                listeners: resume_to_wire(resume),
            }),
            Request::AttachWorker {
                app_id,
                app_token,
                event_queue_len,
                resume,
            } => Body::AttachWorker(pb::AttachWorker {
                app_id: *app_id,
                app_token: app_token.clone(),
                event_queue_len: *event_queue_len,
                listeners: resume_to_wire(resume),
            }),
            Request::ResumeSessions(sessions) => Body::ResumeSessions(pb::ResumeSessions {
                sessions: sessions.iter().map(pb::ResumedSession::from).collect(),
            }),
            Request::Listen { endpoint: ep } => Body::Listen(pb::Listen {
                endpoint: Some(endpoint::to_proto(*ep)),
            }),
            Request::Unlisten { listener_id } => Body::Unlisten(pb::Unlisten {
                listener_id: *listener_id,
            }),
            Request::Connect { remote, standby } => Body::Connect(pb::Connect {
                remote: Some(endpoint::to_proto(*remote)),
                standby: *standby,
            }),
            Request::SessionClosed { session_id, reset } => {
                Body::SessionClosed(pb::SessionClosed {
                    session_id: *session_id,
                    reset: *reset,
                })
            }
            Request::Usage(report) => Body::UsageReport(report.into()),
            Request::GetCertificate { name } => {
                Body::GetCertificate(pb::GetCertificate { name: name.clone() })
            }
            Request::Pair(offer) => Body::Pair(pb::Pair {
                token: offer.token.to_vec(),
                role: match offer.role {
                    PairRole::Initiator => pb::PairRole::Initiator,
                    PairRole::Responder => pb::PairRole::Responder,
                } as i32,
                local: Some(endpoint::to_proto(offer.local)),
                remote: Some(endpoint::to_proto(offer.remote)),
                fifo_size: offer.fifo_size.unwrap_or(0),
                peer_identity: offer.peer_identity.clone().unwrap_or_default(),
            }),
            Request::Batch(requests) => Body::Batch(pb::Batch {
                requests: requests.iter().map(|(id, r)| r.to_wire(*id)).collect(),
            }),
        };
        pb::AppRequest {
            request_id,
            body: Some(body),
        }
    }
}

/// What shuntd sends an app worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonReply {
    /// Followed by two fds: the event-queue segment and the read end of the worker's wake-up
    /// pipe.
    Attached {
        app_id: u64,
        app_token: Vec<u8>,
        worker_id: u32,
        event_queue_offset: u64,
        namespace_address: SocketAddr,
    },
    Listening {
        listener_id: u64,
        endpoint: SocketAddr,
    },
    Ack,
    Failure {
        code: ErrorCode,
        message: String,
    },
    /// Followed by four fds: segment memfd; this side's wake-up sender (the write end of the
    /// pipe to the peer, and its anchor); and its receiver (the read end of the pipe from the
    /// peer).
    SegmentAdded {
        segment_id: u32,
        is_client: bool,
    },
    Certificate(CertificateMaterial),
    /// The answer to [`Request::ResumeSessions`]: one outcome per session, in order.
    Resumed(Vec<ResumeOutcome>),
}

/// A workload certificate as PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct CertificateMaterial {
    pub cert_chain: String,
    pub private_key: String,
    pub trust_bundle: String,
    pub version: u64,
}

impl std::fmt::Debug for CertificateMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateMaterial")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl DaemonReply {
    /// How many fds travel with this message.
    pub fn fd_count(&self) -> usize {
        match self {
            DaemonReply::Attached { .. } => 2,
            DaemonReply::SegmentAdded { .. } => 4,
            _ => 0,
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<(u32, DaemonReply), DecodeError> {
        use pb::daemon_message::Body;
        if bytes.len() > MAX_MESSAGE_LEN {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        let msg = pb::DaemonMessage::decode(bytes)?;
        let reply = match msg.body.ok_or(DecodeError::MissingBody)? {
            Body::AttachReply(a) => DaemonReply::Attached {
                app_id: a.app_id,
                app_token: a.app_token,
                worker_id: a.worker_id,
                event_queue_offset: a.event_queue_offset,
                namespace_address: endpoint("namespace_address", a.namespace_address.as_ref())?,
            },
            Body::ListenReply(l) => DaemonReply::Listening {
                listener_id: l.listener_id,
                endpoint: endpoint("endpoint", l.endpoint.as_ref())?,
            },
            Body::Ack(_) => DaemonReply::Ack,
            Body::Failure(f) => DaemonReply::Failure {
                code: ErrorCode::from_wire(f.code),
                message: f.message,
            },
            Body::SegmentAdded(s) => DaemonReply::SegmentAdded {
                segment_id: s.segment_id,
                is_client: s.is_client,
            },
            Body::Certificate(c) => DaemonReply::Certificate(CertificateMaterial {
                cert_chain: c.cert_chain,
                private_key: c.private_key,
                trust_bundle: c.trust_bundle,
                version: c.version,
            }),
            Body::ResumeReply(r) => {
                if r.outcomes.len() > MAX_RESUMED_PER_MESSAGE {
                    return Err(DecodeError::TooMany("outcomes"));
                }
                DaemonReply::Resumed(
                    r.outcomes
                        .iter()
                        .map(|o| match (o.session_id, o.refused) {
                            (id, 0) if id != 0 => Ok(Ok(id)),
                            (0, code) if code != 0 => Ok(Err(ErrorCode::from_wire(code))),
                            _ => Err(DecodeError::Invalid("outcomes")),
                        })
                        .collect::<Result<_, _>>()?,
                )
            }
        };
        Ok((msg.request_id, reply))
    }

    pub fn encode(&self, request_id: u32) -> Vec<u8> {
        use pb::daemon_message::Body;
        let body = match self {
            DaemonReply::Attached {
                app_id,
                app_token,
                worker_id,
                event_queue_offset,
                namespace_address,
            } => Body::AttachReply(pb::AttachReply {
                app_id: *app_id,
                app_token: app_token.clone(),
                worker_id: *worker_id,
                event_queue_offset: *event_queue_offset,
                namespace_address: Some(endpoint::to_proto(*namespace_address)),
            }),
            DaemonReply::Listening {
                listener_id,
                endpoint: ep,
            } => Body::ListenReply(pb::ListenReply {
                listener_id: *listener_id,
                endpoint: Some(endpoint::to_proto(*ep)),
            }),
            DaemonReply::Ack => Body::Ack(pb::Ack {}),
            DaemonReply::Failure { code, message } => Body::Failure(pb::Failure {
                code: code.to_wire(),
                message: message.clone(),
            }),
            DaemonReply::SegmentAdded {
                segment_id,
                is_client,
            } => Body::SegmentAdded(pb::SegmentAdded {
                segment_id: *segment_id,
                is_client: *is_client,
            }),
            DaemonReply::Certificate(c) => Body::Certificate(pb::CertificateReply {
                cert_chain: c.cert_chain.clone(),
                private_key: c.private_key.clone(),
                trust_bundle: c.trust_bundle.clone(),
                version: c.version,
            }),
            DaemonReply::Resumed(outcomes) => Body::ResumeReply(pb::ResumeReply {
                outcomes: outcomes
                    .iter()
                    .map(|o| match o {
                        Ok(id) => pb::ResumeOutcome {
                            session_id: *id,
                            refused: 0,
                        },
                        Err(code) => pb::ResumeOutcome {
                            session_id: 0,
                            refused: code.to_wire(),
                        },
                    })
                    .collect(),
            }),
        };
        pb::DaemonMessage {
            request_id,
            body: Some(body),
        }
        .encode_to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_round_trip() {
        let reqs = [
            Request::Attach {
                namespace_id: "default".into(),
                namespace_secret: b"s3cret".to_vec(),
                app_name: "envoy".into(),
                scope: Scope::Global,
                event_queue_len: 4096,
                resume: Resume {
                    listeners: vec!["127.0.0.1:80".parse().unwrap()],
                },
            },
            Request::ResumeSessions(vec![ResumedSession {
                local: "10.0.0.1:4000".parse().unwrap(),
                remote: "[::1]:80".parse().unwrap(),
                is_client: true,
                slot: 3,
                rx_offset: 1 << 20,
                tx_offset: 2 << 20,
            }]),
            Request::Listen {
                endpoint: "[::]:9000".parse().unwrap(),
            },
            Request::Connect {
                remote: "127.0.0.1:9000".parse().unwrap(),
                standby: false,
            },
            Request::Connect {
                remote: "[fd00::1]:80".parse().unwrap(),
                standby: true,
            },
            Request::SessionClosed {
                session_id: 77,
                reset: true,
            },
            Request::GetCertificate {
                name: "default".into(),
            },
            Request::Usage(UsageReport {
                connections: vec![("tls".into(), 2)],
                pairing_latency_us: vec![90],
                ..UsageReport::default()
            }),
            Request::Pair(PairOffer {
                token: [7; PAIR_TOKEN_LEN],
                role: PairRole::Responder,
                local: "10.0.0.2:15006".parse().unwrap(),
                remote: "10.0.0.1:40000".parse().unwrap(),
                fifo_size: Some(1 << 22),
                peer_identity: Some("spiffe://cluster.local/ns/default/sa/client".into()),
            }),
            Request::Pair(PairOffer {
                token: [8; PAIR_TOKEN_LEN],
                role: PairRole::Initiator,
                local: "10.0.0.1:40000".parse().unwrap(),
                remote: "10.0.0.2:15006".parse().unwrap(),
                fifo_size: None,
                peer_identity: None,
            }),
        ];
        for req in reqs.clone() {
            assert_eq!(Request::decode(&req.encode(5)), Ok((5, req)));
        }
        let batchable: Vec<(u32, Request)> = reqs
            .into_iter()
            .filter(Request::may_be_batched)
            .zip(10..)
            .map(|(r, id)| (id, r))
            .collect();
        assert_eq!(batchable.len(), 8);
        let batch = Request::Batch(batchable);
        assert_eq!(Request::decode(&batch.encode(0)), Ok((0, batch)));
    }

    #[test]
    fn batches_refuse_attaches_nesting_and_excess() {
        let closed = |id| Request::SessionClosed {
            session_id: id,
            reset: false,
        };
        let attach = Request::AttachWorker {
            app_id: 1,
            app_token: vec![1],
            event_queue_len: 64,
            resume: Resume::default(),
        };
        let nested = Request::Batch(vec![(1, Request::Batch(vec![(2, closed(1))]))]);
        let with_attach = Request::Batch(vec![(1, closed(1)), (2, attach)]);
        let too_many = Request::Batch((0..=MAX_BATCH as u64).map(|i| (0, closed(i))).collect());
        for bad in [nested, with_attach] {
            assert_eq!(
                Request::decode(&bad.encode(0)),
                Err(DecodeError::Invalid("batch"))
            );
        }
        assert_eq!(
            Request::decode(&too_many.encode(0)),
            Err(DecodeError::TooMany("batch"))
        );
    }

    #[test]
    fn replies_round_trip() {
        let replies = [
            DaemonReply::Failure {
                code: ErrorCode::WrongSecret,
                message: "no".into(),
            },
            DaemonReply::SegmentAdded {
                segment_id: 3,
                is_client: true,
            },
            DaemonReply::Ack,
            DaemonReply::Certificate(CertificateMaterial {
                cert_chain: "chain".into(),
                private_key: "key".into(),
                trust_bundle: "ca".into(),
                version: 9,
            }),
            DaemonReply::Resumed(vec![Ok(7), Err(ErrorCode::NotPermitted), Ok(9)]),
        ];
        for r in replies {
            assert_eq!(DaemonReply::decode(&r.encode(1)), Ok((1, r)));
        }
    }

    #[test]
    fn rejects_oversized_fields_and_missing_parts() {
        let long = Request::Attach {
            namespace_id: "x".repeat(MAX_NAME_LEN + 1),
            namespace_secret: vec![],
            app_name: String::new(),
            scope: Scope::Local,
            event_queue_len: 0,
            resume: Resume::default(),
        };
        assert_eq!(
            Request::decode(&long.encode(1)),
            Err(DecodeError::TooLong("namespace_id"))
        );
        let no_body = pb::AppRequest {
            request_id: 1,
            body: None,
        }
        .encode_to_vec();
        assert_eq!(Request::decode(&no_body), Err(DecodeError::MissingBody));
        let no_remote = pb::AppRequest {
            request_id: 1,
            body: Some(pb::app_request::Body::Connect(pb::Connect {
                remote: None,
                standby: false,
            })),
        }
        .encode_to_vec();
        assert!(matches!(
            Request::decode(&no_remote),
            Err(DecodeError::Endpoint {
                field: "remote",
                ..
            })
        ));
        let pair_with = |token: Vec<u8>, fifo_size: u32, peer_identity: String| {
            pb::AppRequest {
                request_id: 1,
                body: Some(pb::app_request::Body::Pair(pb::Pair {
                    token,
                    role: pb::PairRole::Initiator as i32,
                    local: Some(endpoint::to_proto("127.0.0.1:1".parse().unwrap())),
                    remote: Some(endpoint::to_proto("127.0.0.1:2".parse().unwrap())),
                    fifo_size,
                    peer_identity,
                })),
            }
            .encode_to_vec()
        };
        let pair = |token: Vec<u8>, fifo_size: u32| pair_with(token, fifo_size, String::new());
        for bad_size in [3000, 1 << 11, 5 << 20] {
            assert_eq!(
                Request::decode(&pair(vec![1; 32], bad_size)),
                Err(DecodeError::Invalid("fifo_size")),
                "{bad_size}"
            );
        }
        assert_eq!(
            Request::decode(&pair(vec![1; 31], 0)),
            Err(DecodeError::Invalid("token"))
        );
        assert_eq!(
            Request::decode(&pair_with(
                vec![1; 32],
                0,
                "x".repeat(MAX_PEER_IDENTITY_LEN + 1)
            )),
            Err(DecodeError::TooLong("peer_identity"))
        );
        for bad in ["spiffe://a/b\n", "spiffe://a/\u{7f}", "spiffe://a/\u{e9}"] {
            assert_eq!(
                Request::decode(&pair_with(vec![1; 32], 0, bad.into())),
                Err(DecodeError::Invalid("peer_identity")),
                "{bad:?}"
            );
        }
        let longest = "x".repeat(MAX_PEER_IDENTITY_LEN);
        assert!(matches!(
            Request::decode(&pair_with(vec![1; 32], 0, longest.clone())),
            Ok((_, Request::Pair(PairOffer { peer_identity: Some(id), .. }))) if id == longest
        ));
        assert_eq!(
            Request::decode(&vec![0u8; MAX_MESSAGE_LEN + 1]),
            Err(DecodeError::TooLarge(MAX_MESSAGE_LEN + 1))
        );
    }

    proptest! {
        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Request::decode(&bytes);
            let _ = DaemonReply::decode(&bytes);
        }
    }
}
