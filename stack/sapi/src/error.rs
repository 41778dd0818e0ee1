//! Why shuntd refused something, as both sides name it.

use shunt_proto::sapi as pb;

/// A refusal reason. Unknown wire values are kept, so a newer shuntd never confuses an older app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ErrorCode {
    #[error("wrong namespace secret")]
    WrongSecret,
    #[error("unknown namespace")]
    UnknownNamespace,
    #[error("denied by a rule")]
    Denied,
    #[error("no listener at that endpoint")]
    NoListener,
    #[error("no room left in the shared-memory segment")]
    SegmentFull,
    #[error("address already in use")]
    AddressInUse,
    #[error("invalid request")]
    InvalidRequest,
    #[error("not attached")]
    NotAttached,
    #[error("the peer is gone")]
    PeerGone,
    #[error("the peer's event queue is full")]
    EventQueueFull,
    #[error("internal error in shuntd")]
    Internal,
    #[error("no matching end of the pairing arrived in time")]
    PairTimeout,
    #[error("another offer with the same pairing token is waiting")]
    PairConflict,
    #[error("no certificate of that name in the namespace")]
    UnknownCertificate,
    #[error("a limit of shuntd's was reached")]
    LimitExceeded,
    #[error("not permitted for this user")]
    NotPermitted,
    #[error("unknown error code {0}")]
    Unknown(i32),
}

impl ErrorCode {
    /// A short label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WrongSecret => "wrong_secret",
            Self::UnknownNamespace => "unknown_namespace",
            Self::Denied => "denied",
            Self::NoListener => "no_listener",
            Self::SegmentFull => "segment_full",
            Self::AddressInUse => "address_in_use",
            Self::InvalidRequest => "invalid_request",
            Self::NotAttached => "not_attached",
            Self::PeerGone => "peer_gone",
            Self::EventQueueFull => "event_queue_full",
            Self::Internal => "internal",
            Self::PairTimeout => "pair_timeout",
            Self::PairConflict => "pair_conflict",
            Self::UnknownCertificate => "unknown_certificate",
            Self::LimitExceeded => "limit_exceeded",
            Self::NotPermitted => "not_permitted",
            Self::Unknown(_) => "unknown",
        }
    }

    pub fn to_wire(self) -> i32 {
        let code = match self {
            Self::WrongSecret => pb::ErrorCode::WrongSecret,
            Self::UnknownNamespace => pb::ErrorCode::UnknownNamespace,
            Self::Denied => pb::ErrorCode::Denied,
            Self::NoListener => pb::ErrorCode::NoListener,
            Self::SegmentFull => pb::ErrorCode::SegmentFull,
            Self::AddressInUse => pb::ErrorCode::AddressInUse,
            Self::InvalidRequest => pb::ErrorCode::InvalidRequest,
            Self::NotAttached => pb::ErrorCode::NotAttached,
            Self::PeerGone => pb::ErrorCode::PeerGone,
            Self::EventQueueFull => pb::ErrorCode::EventQueueFull,
            Self::Internal => pb::ErrorCode::Internal,
            Self::PairTimeout => pb::ErrorCode::PairTimeout,
            Self::PairConflict => pb::ErrorCode::PairConflict,
            Self::UnknownCertificate => pb::ErrorCode::UnknownCertificate,
            Self::LimitExceeded => pb::ErrorCode::LimitExceeded,
            Self::NotPermitted => pb::ErrorCode::NotPermitted,
            Self::Unknown(n) => return n,
        };
        code as i32
    }

    pub fn from_wire(value: i32) -> Self {
        match pb::ErrorCode::try_from(value) {
            Ok(pb::ErrorCode::WrongSecret) => Self::WrongSecret,
            Ok(pb::ErrorCode::UnknownNamespace) => Self::UnknownNamespace,
            Ok(pb::ErrorCode::Denied) => Self::Denied,
            Ok(pb::ErrorCode::NoListener) => Self::NoListener,
            Ok(pb::ErrorCode::SegmentFull) => Self::SegmentFull,
            Ok(pb::ErrorCode::AddressInUse) => Self::AddressInUse,
            Ok(pb::ErrorCode::InvalidRequest) => Self::InvalidRequest,
            Ok(pb::ErrorCode::NotAttached) => Self::NotAttached,
            Ok(pb::ErrorCode::PeerGone) => Self::PeerGone,
            Ok(pb::ErrorCode::EventQueueFull) => Self::EventQueueFull,
            Ok(pb::ErrorCode::Internal) => Self::Internal,
            Ok(pb::ErrorCode::PairTimeout) => Self::PairTimeout,
            Ok(pb::ErrorCode::PairConflict) => Self::PairConflict,
            Ok(pb::ErrorCode::UnknownCertificate) => Self::UnknownCertificate,
            Ok(pb::ErrorCode::LimitExceeded) => Self::LimitExceeded,
            Ok(pb::ErrorCode::NotPermitted) => Self::NotPermitted,
            Ok(pb::ErrorCode::Unspecified) | Err(_) => Self::Unknown(value),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_round_trip_keeps_unknown_values() {
        for code in [
            ErrorCode::WrongSecret,
            ErrorCode::Denied,
            ErrorCode::SegmentFull,
            ErrorCode::Internal,
            ErrorCode::PairTimeout,
            ErrorCode::PairConflict,
            ErrorCode::UnknownCertificate,
            ErrorCode::LimitExceeded,
            ErrorCode::NotPermitted,
            ErrorCode::Unknown(4242),
        ] {
            assert_eq!(ErrorCode::from_wire(code.to_wire()), code);
        }
        assert_eq!(ErrorCode::from_wire(0), ErrorCode::Unknown(0));
    }
}
