//! The resources the adapter accepted, shared by its streams (ADS and a separate SDS socket),
//! and the tables translated from them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::resource::{Resource, ResourceType};
use crate::tables::Tables;
use crate::translate::{self, Context, Invalid, ResourceSet};

/// One resource refused, as `name: reason` for the NACK's error detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub name: String,
    pub reason: String,
}

/// A change to one type's resources, as a response describes it.
#[derive(Debug, Default)]
pub struct Change {
    /// Added or updated, with their versions (Delta; empty strings for SotW).
    pub upserts: Vec<(Resource, String)>,
    pub removals: Vec<String>,
    /// SotW responses of wildcard types carry the whole set: anything not in it is gone.
    pub replace_all: bool,
}

#[derive(Debug, Default)]
struct Accepted {
    resources: ResourceSet,
    versions: BTreeMap<ResourceType, BTreeMap<String, String>>,
}

pub struct State {
    accepted: Mutex<Accepted>,
    context: Context,
    tables: watch::Sender<Arc<Tables>>,
    metrics: Arc<Metrics>,
}

impl State {
    pub fn new(context: Context, metrics: Arc<Metrics>) -> Arc<Self> {
        let (tables, _) = watch::channel(Arc::new(Tables::default()));
        Arc::new(Self {
            accepted: Mutex::new(Accepted::default()),
            context,
            tables,
            metrics,
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn context(&self) -> &Context {
        &self.context
    }

    /// The latest translated tables; changes whenever an update is accepted.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Tables>> {
        self.tables.subscribe()
    }

    pub fn tables(&self) -> Arc<Tables> {
        self.tables.borrow().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Accepted> {
        // A panic elsewhere must not wedge the adapter: the data is replaced whole on every
        // accepted update, so it is never left half-written.
        self.accepted.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Names and versions of what is accepted of `kind`, for Delta's `initial_resource_versions`.
    pub fn versions(&self, kind: ResourceType) -> BTreeMap<String, String> {
        self.lock().versions.get(&kind).cloned().unwrap_or_default()
    }

    /// The endpoint assignments the accepted clusters need.
    pub fn eds_names(&self) -> BTreeSet<String> {
        let accepted = self.lock();
        accepted
            .resources
            .get(&ResourceType::Cluster)
            .into_iter()
            .flat_map(|m| m.values())
            .filter_map(|r| match r {
                Resource::Cluster(c) => translate::eds_service_name(c).map(str::to_owned),
                _ => None,
            })
            .collect()
    }

    /// Applies `change` to `kind` if every resource in it is valid; otherwise keeps the last
    /// good state and returns the rejections.
    pub fn apply(&self, kind: ResourceType, change: Change) -> Result<(), Vec<Rejection>> {
        let mut rejections = Vec::new();
        for (r, _) in &change.upserts {
            if let Err(e) = translate::check(r, &self.context) {
                rejections.push(Rejection {
                    name: r.name().to_owned(),
                    reason: e.to_string(),
                });
                self.metrics.translation_error(reason_of(&e));
            }
        }
        if !rejections.is_empty() {
            return Err(rejections);
        }
        let tables = {
            let mut accepted = self.lock();
            let Accepted {
                resources,
                versions,
            } = &mut *accepted;
            let resources = resources.entry(kind).or_default();
            let versions = versions.entry(kind).or_default();
            if change.replace_all {
                resources.clear();
                versions.clear();
            }
            for name in &change.removals {
                resources.remove(name);
                versions.remove(name);
            }
            for (r, version) in change.upserts {
                versions.insert(r.name().to_owned(), version);
                resources.insert(r.name().to_owned(), r);
            }
            self.metrics.resources(kind, resources.len());
            translate::translate(&accepted.resources, &self.context)
        };
        self.metrics.update(kind, true);
        self.metrics.updated_at(SystemTime::now());
        self.tables.send_replace(Arc::new(tables));
        Ok(())
    }
}

fn reason_of(e: &Invalid) -> &'static str {
    match e {
        Invalid::Cluster(_) => "invalid_cluster",
        Invalid::Listener(_) => "invalid_listener",
        Invalid::Secret(_) => "invalid_secret",
    }
}

/// The NACK message: every rejection, capped so a huge response cannot make a huge reply.
pub fn error_detail(rejections: &[Rejection]) -> String {
    const MAX: usize = 4096;
    let mut out = String::new();
    for r in rejections {
        let line = format!("{}: {}", r.name, r.reason);
        if out.len() + line.len() + 2 > MAX {
            out.push_str("; ...");
            break;
        }
        if !out.is_empty() {
            out.push_str("; ");
        }
        out.push_str(&line);
    }
    out
}
