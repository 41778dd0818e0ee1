//! Where a factory's TLS material comes from: files, which the TLS context re-reads when they
//! change, or a named certificate in shuntd's store, which is fetched over the session API and
//! checked for a new version at most once a second, when a connection starts.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use shunt_tls::{CertSource, IdentityPolicy, TlsContext, TlsSettings};

use crate::attach;
use crate::config::SocketConfig;

/// How often, at most, the store is asked whether the certificate changed.
const STORE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

pub enum TlsSource {
    Files(TlsContext),
    Store(StoreCertificate),
}

pub struct StoreCertificate {
    name: String,
    policy: IdentityPolicy,
    alpn: Vec<Vec<u8>>,
    state: Mutex<StoreState>,
}

#[derive(Default)]
struct StoreState {
    current: Option<(u64, TlsContext)>,
    checked_at: Option<Instant>,
}

impl TlsSource {
    pub fn store(name: String, policy: IdentityPolicy, alpn: Vec<Vec<u8>>) -> Self {
        Self::Store(StoreCertificate {
            name,
            policy,
            alpn,
            state: Mutex::default(),
        })
    }

    /// The context for a new connection, or why there is none.
    pub fn context(&self, config: &SocketConfig) -> Result<TlsContext, String> {
        match self {
            Self::Files(context) => Ok(context.clone()),
            Self::Store(store) => store.context(config),
        }
    }
}

impl StoreCertificate {
    /// Unusable material, no certificate or no shuntd keep what there is: connections go on
    /// with the last good certificate, and only fail while there has never been one.
    fn context(&self, config: &SocketConfig) -> Result<TlsContext, String> {
        // The fetch is a shuntd round trip: it runs outside the lock, so Envoy's other workers
        // keep starting connections with the current certificate meanwhile. Marking the check
        // under the lock makes one thread per interval do it; while there is no certificate
        // yet, every connection asks rather than fail behind another's fetch.
        let have = {
            let mut state = self.lock();
            let due = state.current.is_none()
                || state
                    .checked_at
                    .is_none_or(|t| t.elapsed() >= STORE_CHECK_INTERVAL);
            if !due {
                return current(&state, &self.name, None);
            }
            state.checked_at = Some(Instant::now());
            state.current.as_ref().map(|(v, _)| *v)
        };
        let fetched = self.fetch(config, have);
        let mut state = self.lock();
        match fetched {
            Ok(Some(fresh)) => {
                // Another thread may have installed a newer one in the meantime.
                if state.current.as_ref().is_none_or(|(v, _)| *v < fresh.0) {
                    state.current = Some(fresh);
                }
                current(&state, &self.name, None)
            }
            Ok(None) => current(&state, &self.name, None),
            Err(problem) => current(&state, &self.name, Some(problem)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StoreState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The certificate from shuntd, if it is newer than `have`.
    fn fetch(
        &self,
        config: &SocketConfig,
        have: Option<u64>,
    ) -> Result<Option<(u64, TlsContext)>, String> {
        let worker = attach::worker_for(config).ok_or("shuntd is unreachable")?;
        let material = worker
            .certificate(&self.name)
            .map_err(|e| format!("certificate `{}` from shuntd: {e}", self.name))?;
        if have == Some(material.version) {
            return Ok(None);
        }
        let mut settings = TlsSettings::new(CertSource::Pem {
            cert_chain: material.cert_chain,
            private_key: material.private_key,
            trust_bundle: material.trust_bundle,
        });
        settings.policy = self.policy.clone();
        settings.alpn = self.alpn.clone();
        let context = TlsContext::new(settings)
            .map_err(|e| format!("certificate `{}` from shuntd: {e}", self.name))?;
        Ok(Some((material.version, context)))
    }
}

/// The certificate in use, or why there is none yet.
fn current(state: &StoreState, name: &str, problem: Option<String>) -> Result<TlsContext, String> {
    match &state.current {
        Some((_, context)) => Ok(context.clone()),
        None => Err(problem.unwrap_or_else(|| format!("no certificate `{name}` from shuntd yet"))),
    }
}
