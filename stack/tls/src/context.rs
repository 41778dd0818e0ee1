//! [`TlsContext`]: the rustls configurations of one workload identity, rebuilt when its
//! certificate files are rotated.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::server::NoServerSessionStorage;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, ServerConfig};

use crate::error::TlsError;
use crate::identity::{IdentityPolicy, SpiffeId};
use crate::material::{self, CertSource, Material, SourceStamp};
use crate::stream::SHUNT_ALPN;
use crate::verify::{SpiffeClientVerifier, SpiffeServerVerifier};

/// How often, at most, certificate files are checked for changes by default.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// What a [`TlsContext`] is built from.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// This workload's certificate chain and key, and the trust bundle.
    pub source: CertSource,
    /// Which peer identities are accepted.
    pub policy: IdentityPolicy,
    /// Ordinary ALPN protocols (e.g. `h2`, `http/1.1`), in order of preference, offered by
    /// clients after Shunt's and accepted by servers when the client does not offer Shunt.
    pub alpn: Vec<Vec<u8>>,
    /// The least time between two checks of the certificate files for changes; the check runs
    /// when a connection is created.
    pub reload_interval: Duration,
}

impl TlsSettings {
    /// Settings accepting any identity the trust bundle vouches for, with no ordinary ALPN
    /// protocols and the default reload interval.
    pub fn new(source: CertSource) -> Self {
        Self {
            source,
            policy: IdentityPolicy::any(),
            alpn: Vec::new(),
            reload_interval: DEFAULT_RELOAD_INTERVAL,
        }
    }
}

/// The TLS configuration of one workload: certificate, trust bundle, identity policy and ALPN
/// protocols, ready to start [`TlsStream`](crate::TlsStream)s.
///
/// Cloning is cheap (a reference count) and clones share state, including reloads.
///
/// With [`CertSource::Files`], creating a connection checks the files' metadata (at most once
/// per [`TlsSettings::reload_interval`]) and, when it changed, loads them again. New material
/// applies to connections created afterwards. Material that does not load (a half-written
/// rotation) is ignored with one warning per change, and the last good configuration stays in
/// use.
#[derive(Clone)]
pub struct TlsContext {
    inner: Arc<Inner>,
}

struct Inner {
    source: CertSource,
    policy: IdentityPolicy,
    alpn: Vec<Vec<u8>>,
    reload_interval: Duration,
    provider: Arc<CryptoProvider>,
    state: Mutex<State>,
}

struct State {
    configs: Arc<Configs>,
    /// The files' metadata when `configs` was loaded.
    loaded: Option<SourceStamp>,
    /// The metadata of files that failed to load, so that they are neither retried nor warned
    /// about again until they change.
    rejected: Option<SourceStamp>,
    next_check: Instant,
    generation: u64,
}

impl TlsContext {
    /// Loads the material and builds the configurations.
    pub fn new(settings: TlsSettings) -> Result<Self, TlsError> {
        let TlsSettings {
            source,
            policy,
            alpn,
            reload_interval,
        } = settings;
        validate_alpn(&alpn)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = source.stamp();
        let configs = build(source.load()?, &policy, &alpn, &provider)?;
        Ok(Self {
            inner: Arc::new(Inner {
                source,
                policy,
                alpn,
                reload_interval,
                provider,
                state: Mutex::new(State {
                    configs: Arc::new(configs),
                    loaded,
                    rejected: None,
                    next_check: Instant::now() + reload_interval,
                    generation: 0,
                }),
            }),
        })
    }

    /// How many times new material has been loaded since the context was created.
    pub fn generation(&self) -> u64 {
        self.state().generation
    }

    /// The SPIFFE id of the certificate currently presented to peers.
    pub fn local_identity(&self) -> SpiffeId {
        self.state().configs.identity.clone()
    }

    /// The ordinary ALPN protocols, in order of preference.
    pub fn alpn(&self) -> &[Vec<u8>] {
        &self.inner.alpn
    }

    /// The configurations for a new connection, after reloading changed files if a check is due.
    pub(crate) fn configs_for_new_connection(&self) -> Arc<Configs> {
        let mut state = self.state();
        if state.loaded.is_some() {
            let now = Instant::now();
            if now >= state.next_check {
                state.next_check = now + self.inner.reload_interval;
                self.reload_if_changed(&mut state);
            }
        }
        Arc::clone(&state.configs)
    }

    fn reload_if_changed(&self, state: &mut State) {
        let inner = &*self.inner;
        // The metadata is read before the contents, so a change racing with the read is seen
        // by the next check.
        let stamp = inner.source.stamp();
        if stamp == state.loaded || stamp == state.rejected {
            return;
        }
        let built = inner
            .source
            .load()
            .and_then(|material| build(material, &inner.policy, &inner.alpn, &inner.provider));
        match built {
            Ok(configs) => {
                state.generation += 1;
                tracing::info!(
                    identity = %configs.identity,
                    generation = state.generation,
                    "TLS certificate files changed; new connections use the new certificate"
                );
                state.configs = Arc::new(configs);
                state.loaded = stamp;
                state.rejected = None;
            }
            Err(error) => {
                tracing::warn!(
                    %error,
                    "TLS certificate files changed but cannot be used; keeping the previous certificate"
                );
                state.rejected = stamp;
            }
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is replaced whole, never left half-updated: a panic elsewhere cannot corrupt it.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("TlsContext")
            .field("identity", &state.configs.identity)
            .field("generation", &state.generation)
            .field("policy", &self.inner.policy)
            .field("source", &self.inner.source)
            .finish_non_exhaustive()
    }
}

/// The configurations built from one version of the material. Server configurations differ
/// only in their ALPN list, which holds exactly the protocol chosen for the connection (or
/// nothing), so that rustls never aborts a handshake for lack of a common protocol.
pub(crate) struct Configs {
    pub(crate) identity: SpiffeId,
    client_offering_shunt: Arc<ClientConfig>,
    client_not_offering_shunt: Arc<ClientConfig>,
    server_without_alpn: Arc<ServerConfig>,
    server_shunt: Arc<ServerConfig>,
    /// One per ordinary protocol, in order of preference.
    server_ordinary: Vec<(Vec<u8>, Arc<ServerConfig>)>,
}

impl Configs {
    pub(crate) fn client(&self, offer_shunt: bool) -> Arc<ClientConfig> {
        if offer_shunt {
            Arc::clone(&self.client_offering_shunt)
        } else {
            Arc::clone(&self.client_not_offering_shunt)
        }
    }

    /// The server configuration for a client offering `offered` (`None`: no ALPN extension):
    /// Shunt if offered, else the first ordinary protocol (in our order) offered, else none.
    pub(crate) fn server<'a>(
        &self,
        offered: Option<impl Iterator<Item = &'a [u8]>>,
    ) -> Arc<ServerConfig> {
        let offered: Vec<&[u8]> = offered.map(Iterator::collect).unwrap_or_default();
        let config = if offered.contains(&SHUNT_ALPN) {
            &self.server_shunt
        } else {
            self.server_ordinary
                .iter()
                .find(|(protocol, _)| offered.contains(&protocol.as_slice()))
                .map_or(&self.server_without_alpn, |(_, config)| config)
        };
        Arc::clone(config)
    }
}

fn validate_alpn(alpn: &[Vec<u8>]) -> Result<(), TlsError> {
    for (index, protocol) in alpn.iter().enumerate() {
        let invalid = |reason| Err(TlsError::InvalidAlpn(protocol.clone(), reason));
        if protocol.is_empty() {
            return invalid("empty");
        }
        if protocol.len() > 255 {
            return invalid("longer than 255 bytes");
        }
        if protocol == SHUNT_ALPN {
            return invalid("Shunt's own protocol is offered and accepted separately");
        }
        if alpn[..index].contains(protocol) {
            return invalid("listed twice");
        }
    }
    Ok(())
}

fn build(
    material: Material,
    policy: &IdentityPolicy,
    alpn: &[Vec<u8>],
    provider: &Arc<CryptoProvider>,
) -> Result<Configs, TlsError> {
    let Material {
        chain,
        key,
        roots,
        identity,
        key_origin,
    } = material;
    let certified =
        CertifiedKey::from_der(chain, key, provider).map_err(|e| TlsError::Material {
            item: material::KEY,
            origin: key_origin,
            problem: format!("unusable with the certificate chain: {e}"),
        })?;
    let certified = Arc::new(SingleCertAndKey::from(certified));

    let server_verifier = SpiffeServerVerifier::new(Arc::clone(&roots), policy.clone(), provider);
    let mut client = ClientConfig::builder_with_provider(Arc::clone(provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(server_verifier))
        .with_client_cert_resolver(certified.clone());
    // Every connection verifies the peer against the current bundle and policy; mesh
    // connections are long-lived, so resumption would save little.
    client.resumption = Resumption::disabled();
    // Mesh peers are addressed by IP; the server name given to rustls is a placeholder.
    client.enable_sni = false;
    // Without the extended master secret, a TLS 1.2 exporter value (the pairing token) is not
    // bound to the whole handshake (RFC 7627).
    client.require_ems = true;
    let mut client_not_offering_shunt = client.clone();
    client_not_offering_shunt.alpn_protocols = alpn.to_vec();
    client.alpn_protocols = std::iter::once(SHUNT_ALPN.to_vec())
        .chain(alpn.iter().cloned())
        .collect();

    let client_verifier = SpiffeClientVerifier::new(roots, policy.clone(), Arc::clone(provider))?;
    let mut server = ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(Arc::new(client_verifier))
        .with_cert_resolver(certified);
    server.session_storage = Arc::new(NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    server.require_ems = true;
    let with_alpn = |protocol: &[u8]| {
        let mut config = server.clone();
        config.alpn_protocols = vec![protocol.to_vec()];
        Arc::new(config)
    };

    Ok(Configs {
        identity,
        client_offering_shunt: Arc::new(client),
        client_not_offering_shunt: Arc::new(client_not_offering_shunt),
        server_shunt: with_alpn(SHUNT_ALPN),
        server_ordinary: alpn.iter().map(|p| (p.clone(), with_alpn(p))).collect(),
        server_without_alpn: Arc::new(server),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpn_lists_are_validated() {
        let list = |ps: &[&[u8]]| ps.iter().map(|p| p.to_vec()).collect::<Vec<_>>();
        assert!(validate_alpn(&list(&[b"h2", b"http/1.1"])).is_ok());
        assert!(validate_alpn(&[]).is_ok());
        for bad in [
            list(&[b""]),
            list(&[SHUNT_ALPN]),
            list(&[b"h2", b"http/1.1", b"h2"]),
            vec![vec![b'x'; 256]],
        ] {
            assert!(
                matches!(validate_alpn(&bad), Err(TlsError::InvalidAlpn(..))),
                "{bad:?} was accepted"
            );
        }
    }
}
