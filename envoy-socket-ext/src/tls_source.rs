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
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let due = state
            .checked_at
            .is_none_or(|t| t.elapsed() >= STORE_CHECK_INTERVAL);
        let mut problem = None;
        if due {
            state.checked_at = Some(Instant::now());
            match self.fetch(config, state.current.as_ref().map(|(v, _)| *v)) {
                Ok(Some(fresh)) => state.current = Some(fresh),
                Ok(None) => {}
                Err(e) => problem = Some(e),
            }
        }
        match &state.current {
            Some((_, context)) => Ok(context.clone()),
            None => Err(problem
                .unwrap_or_else(|| format!("no certificate `{}` from shuntd yet", self.name))),
        }
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
