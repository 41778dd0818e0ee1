//! Certificate verifiers for mesh peers: the chain must lead to the trust bundle and the leaf's
//! SPIFFE id must be allowed by the [`IdentityPolicy`]. No hostname is checked: workload
//! certificates carry only a `spiffe://` URI SAN.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{
    CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::error::TlsError;
use crate::identity::{IdentityPolicy, spiffe_id_from_cert};

/// Verifies a server's certificate for a client: chain to the trust bundle (with the server-auth
/// key purpose, no name check), then the SPIFFE id against the policy.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    policy: IdentityPolicy,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    /// A verifier trusting `roots`, accepting the identities `policy` allows, and checking
    /// signatures with `provider`'s algorithms.
    pub fn new(
        roots: Arc<RootCertStore>,
        policy: IdentityPolicy,
        provider: &CryptoProvider,
    ) -> Self {
        Self {
            roots,
            policy,
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        check_identity(end_entity, &self.policy, "server")?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Verifies a client's certificate for a server: a certificate is mandatory, its chain must lead
/// to the trust bundle (with the client-auth key purpose), and its SPIFFE id must be allowed by
/// the policy.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    /// rustls' own WebPKI client verifier does the chain building; it never checks names.
    chain: Arc<dyn ClientCertVerifier>,
    policy: IdentityPolicy,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    /// A verifier trusting `roots`, accepting the identities `policy` allows, and checking
    /// signatures with `provider`'s algorithms.
    pub fn new(
        roots: Arc<RootCertStore>,
        policy: IdentityPolicy,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let algorithms = provider.signature_verification_algorithms;
        let chain = WebPkiClientVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| TlsError::Material {
                item: "trust bundle",
                origin: "the loaded material".into(),
                problem: e.to_string(),
            })?;
        Ok(Self {
            chain,
            policy,
            algorithms,
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.chain
            .verify_client_cert(end_entity, intermediates, now)?;
        check_identity(end_entity, &self.policy, "client")?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The identity half of verification, once the chain is known to be good.
///
/// A certificate without exactly one valid SPIFFE id fails with
/// `CertificateError::Other(IdentityError)` (the peer receives `certificate_unknown`); an
/// identity outside the policy fails with `ApplicationVerificationFailure` (the peer receives
/// `access_denied`), so both ends can label the failure `identity_mismatch`.
fn check_identity(
    end_entity: &CertificateDer<'_>,
    policy: &IdentityPolicy,
    role: &'static str,
) -> Result<(), rustls::Error> {
    let id = spiffe_id_from_cert(end_entity).map_err(|e| {
        tracing::debug!(role, error = %e, "peer certificate has no usable SPIFFE id");
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    })?;
    if !policy.allows(&id) {
        tracing::debug!(role, peer = %id, "peer identity is not allowed by the policy");
        return Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ));
    }
    Ok(())
}
