//! Mutual TLS between mesh workloads, sans-IO, for Shunt's Envoy transport socket (and a TLS
//! transport of the host stack).
//!
//! # Why it looks like this
//!
//! In a service mesh every workload holds a short-lived certificate issued by the mesh CA whose
//! only name is a SPIFFE id, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, in a
//! URI SAN. Peers authenticate each other with that certificate in both directions, so:
//!
//! * verification ([`verify`]) builds the chain to the trust bundle *without* any hostname check,
//!   then reads the peer's single SPIFFE id ([`identity`]) and matches it against an
//!   [`IdentityPolicy`] (exact ids or whole trust domains; empty = anyone the CA vouches for);
//! * a client certificate is always required;
//! * certificates rotate often, so a [`TlsContext`] built from files notices new files when the
//!   next connection is created (checking at most once a second) and keeps the last good
//!   material when the new files are not usable yet.
//!
//! Two Shunt endpoints recognise each other during the handshake through ALPN: a Shunt client
//! offers [`SHUNT_ALPN`] first, and a Shunt server picks it whenever offered. Otherwise the
//! server picks one of its ordinary protocols the client offers, or none at all: unlike plain
//! rustls it never aborts for lack of a common protocol, so a client configured like Istio's
//! `ISTIO_MUTUAL` (offering `istio-peer-exchange`, `istio`, `h2`, ...) still connects.
//!
//! Once connected, both ends derive the same [`pairing token`](TlsStream::pairing_token) from
//! the TLS exporter. It is unique to the TLS session, so a side channel (e.g. shared memory set
//! up out of band) can prove it belongs to this authenticated connection by presenting it.
//!
//! [`TlsStream`] does no I/O: the event loop that owns the socket feeds it ciphertext and sends
//! what it produces. The crypto provider is rustls' `ring`.
//!
//! Failures carry a [`HandshakeFailure`] label for metrics, the same on both ends where the
//! TLS alert allows: a client rejecting the server's CA and the server receiving the resulting
//! alert both report `untrusted_ca`.

mod context;
#[cfg(feature = "dev-pki")]
pub mod dev_pki;
mod error;
pub mod identity;
mod material;
mod stream;
pub mod verify;

pub use context::{DEFAULT_RELOAD_INTERVAL, TlsContext, TlsSettings};
pub use error::{HandshakeFailure, TlsError};
pub use identity::{IdentityError, IdentityPattern, IdentityPolicy, SpiffeId, spiffe_id_from_cert};
pub use material::CertSource;
pub use stream::{PeerInfo, ReadOutcome, SHUNT_ALPN, TlsStream};

/// The rustls version this crate is built on, for the types that appear in its API
/// (e.g. [`rustls::ProtocolVersion`]).
pub use rustls;
