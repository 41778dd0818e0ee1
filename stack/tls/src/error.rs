//! The crate's error type and the coarse classification of handshake failures used as metric
//! labels.

use std::fmt;
use std::io;

use rustls::{AlertDescription, CertificateError};

use crate::identity::IdentityError;

/// Errors from loading certificate material, building a [`TlsContext`](crate::TlsContext) or
/// running a [`TlsStream`](crate::TlsStream).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A certificate chain, private key or trust bundle could not be read or is unusable.
    #[error("{item} from {origin}: {problem}")]
    Material {
        /// Which piece: `certificate chain`, `private key` or `trust bundle`.
        item: &'static str,
        /// Where it came from: a file path, or `in-memory PEM`.
        origin: String,
        /// What is wrong.
        problem: String,
    },
    /// An ALPN protocol name given in the settings is empty, too long or reserved.
    #[error("invalid ALPN protocol {0:?}: {1}")]
    InvalidAlpn(Vec<u8>, &'static str),
    /// rustls refused the configuration built from the material.
    #[error("TLS configuration rejected: {0}")]
    Config(#[source] rustls::Error),
    /// A SPIFFE id or identity pattern is malformed, or a certificate does not carry exactly one.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The TLS connection failed (handshake, verification, alert, or protocol error).
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// rustls could not take the received bytes in.
    #[error("TLS input: {0}")]
    Input(#[source] io::Error),
}

impl TlsError {
    /// The metrics label for this error, whichever side detected it: a failure found while
    /// verifying the peer and the alert the peer sent after finding it map to the same label.
    pub fn failure(&self) -> HandshakeFailure {
        match self {
            Self::Material { .. } | Self::InvalidAlpn(..) | Self::Config(_) => {
                HandshakeFailure::Config
            }
            Self::Identity(IdentityError::InvalidPattern { .. }) => HandshakeFailure::Config,
            Self::Identity(IdentityError::Certificate(_)) => HandshakeFailure::BadCertificate,
            Self::Identity(_) => HandshakeFailure::NoSpiffeId,
            Self::Tls(error) => classify(error),
            Self::Input(_) => HandshakeFailure::Protocol,
        }
    }
}

fn classify(error: &rustls::Error) -> HandshakeFailure {
    use HandshakeFailure as F;
    match error {
        rustls::Error::InvalidCertificate(cert) => classify_certificate(cert),
        rustls::Error::NoCertificatesPresented => F::NoClientCertificate,
        rustls::Error::AlertReceived(alert) => match alert {
            AlertDescription::UnknownCA => F::UntrustedCa,
            AlertDescription::CertificateExpired => F::Expired,
            AlertDescription::AccessDenied => F::IdentityMismatch,
            AlertDescription::CertificateRequired => F::NoClientCertificate,
            AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateRevoked => F::BadCertificate,
            _ => F::PeerAlert,
        },
        _ => F::Protocol,
    }
}

fn classify_certificate(error: &CertificateError) -> HandshakeFailure {
    use HandshakeFailure as F;
    match error {
        CertificateError::UnknownIssuer => F::UntrustedCa,
        CertificateError::Expired
        | CertificateError::ExpiredContext { .. }
        | CertificateError::NotValidYet
        | CertificateError::NotValidYetContext { .. } => F::Expired,
        CertificateError::ApplicationVerificationFailure => F::IdentityMismatch,
        CertificateError::Other(other) => match other.0.downcast_ref::<IdentityError>() {
            Some(IdentityError::Certificate(_)) => F::BadCertificate,
            Some(_) => F::NoSpiffeId,
            None => F::BadCertificate,
        },
        _ => F::BadCertificate,
    }
}

/// Why a handshake failed, coarse enough to be a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HandshakeFailure {
    /// The peer's chain does not lead to the trust bundle (`unknown_ca` alert).
    UntrustedCa,
    /// The peer's SPIFFE id is not allowed by the policy (`access_denied` alert).
    IdentityMismatch,
    /// The client presented no certificate (`certificate_required` alert).
    NoClientCertificate,
    /// The peer's certificate has no, several, or a malformed `spiffe://` URI SAN.
    NoSpiffeId,
    /// A certificate is outside its validity period (`certificate_expired` alert).
    Expired,
    /// Another certificate problem: bad encoding, wrong key usage, revoked, unsupported algorithm.
    BadCertificate,
    /// A TLS protocol error: malformed or unexpected messages, no common cipher suite, decryption
    /// failure.
    Protocol,
    /// The peer aborted with an alert not covered by a more specific label.
    PeerAlert,
    /// Local configuration or certificate material is unusable.
    Config,
}

impl HandshakeFailure {
    /// The label, e.g. `untrusted_ca`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UntrustedCa => "untrusted_ca",
            Self::IdentityMismatch => "identity_mismatch",
            Self::NoClientCertificate => "no_client_certificate",
            Self::NoSpiffeId => "no_spiffe_id",
            Self::Expired => "expired",
            Self::BadCertificate => "bad_certificate",
            Self::Protocol => "protocol",
            Self::PeerAlert => "peer_alert",
            Self::Config => "config",
        }
    }
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::OtherError;

    use super::*;

    #[test]
    fn local_verification_failures_and_peer_alerts_share_labels() {
        let cases = [
            (CertificateError::UnknownIssuer, "untrusted_ca"),
            (CertificateError::Expired, "expired"),
            (CertificateError::NotValidYet, "expired"),
            (
                CertificateError::ApplicationVerificationFailure,
                "identity_mismatch",
            ),
            (CertificateError::BadEncoding, "bad_certificate"),
        ];
        for (cert_error, label) in cases {
            let alert = AlertDescription::from(cert_error.clone());
            let local = TlsError::Tls(rustls::Error::InvalidCertificate(cert_error));
            let remote = TlsError::Tls(rustls::Error::AlertReceived(alert));
            assert_eq!(local.failure().as_str(), label, "{local}");
            assert_eq!(remote.failure().as_str(), label, "{remote}");
        }
    }

    #[test]
    fn identity_errors_inside_rustls_are_recognised() {
        let other = OtherError(Arc::new(IdentityError::NoSpiffeId));
        let error = TlsError::Tls(rustls::Error::InvalidCertificate(CertificateError::Other(
            other,
        )));
        assert_eq!(error.failure(), HandshakeFailure::NoSpiffeId);
        let error = TlsError::from(IdentityError::SeveralSpiffeIds(2));
        assert_eq!(error.failure().to_string(), "no_spiffe_id");
    }

    #[test]
    fn other_errors() {
        let no_cert = TlsError::Tls(rustls::Error::NoCertificatesPresented);
        assert_eq!(no_cert.failure(), HandshakeFailure::NoClientCertificate);
        let required = TlsError::Tls(rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired,
        ));
        assert_eq!(required.failure(), HandshakeFailure::NoClientCertificate);
        let alert = TlsError::Tls(rustls::Error::AlertReceived(
            AlertDescription::HandshakeFailure,
        ));
        assert_eq!(alert.failure(), HandshakeFailure::PeerAlert);
        let protocol = TlsError::Tls(rustls::Error::DecryptError);
        assert_eq!(protocol.failure(), HandshakeFailure::Protocol);
        let config = TlsError::InvalidAlpn(Vec::new(), "empty");
        assert_eq!(config.failure(), HandshakeFailure::Config);
    }
}
