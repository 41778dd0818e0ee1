use shunt_sapi::ErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("shuntd refused: {code}: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("shuntd is not reachable: {0}")]
    DaemonUnavailable(std::io::Error),
    #[error("shuntd went away")]
    DaemonGone,
    #[error("shuntd sent something malformed: {0}")]
    Protocol(String),
    #[error("timed out waiting for shuntd")]
    Timeout,
    #[error("shared memory: {0}")]
    Shm(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        use std::io::ErrorKind;
        match e {
            Error::Io(io) => io,
            Error::Refused {
                code: ErrorCode::Denied,
                ..
            } => std::io::Error::new(ErrorKind::PermissionDenied, e),
            Error::Refused {
                code: ErrorCode::NoListener,
                ..
            } => std::io::Error::new(ErrorKind::ConnectionRefused, e),
            Error::Refused {
                code: ErrorCode::AddressInUse,
                ..
            } => std::io::Error::new(ErrorKind::AddrInUse, e),
            Error::Timeout => std::io::Error::new(ErrorKind::TimedOut, e),
            other => std::io::Error::other(other),
        }
    }
}
