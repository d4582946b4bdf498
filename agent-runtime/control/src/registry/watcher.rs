//! [`RegistryWatcher`]: every runtime instance's live, bounded copy of the registry.
//!
//! On start it reads the bucket's last sequence `L`, then watches every key
//! (`watch_with_history(">")`: the latest value of every key, then every later
//! change) and is
//! ready once it has caught up (the watch reports nothing pending, or the bucket
//! was empty). From then on, every put or delete in the bucket reaches the cache
//! and the [`RegistryEvent`] channel as soon as the server pushes it: in practice a
//! few milliseconds, far inside the one-second budget. If the watch ends (server
//! restart, consumer lost), it is re-created from the last revision seen, so no
//! change is skipped; changes older than what the cache holds are ignored, so none
//! is applied out of order.
//!
//! # Bounds
//! The cache holds at most [`WatcherOptions::max_entries`] tenants (default
//! [`DEFAULT_MAX_CACHED_TENANTS`]); a record is at most
//! [`MAX_RECORD_BYTES`](super::MAX_RECORD_BYTES) of JSON and typically a few hundred
//! bytes in memory, so the default bounds the cache to tens of MB in the worst
//! case. Past the cap a *new* tenant is not cached (counted in
//! [`RegistryWatcher::overflowed`] and logged); its changes are still broadcast as
//! events, and [`RegistryWatcher::lookup`] falls back to reading the bucket, so
//! enforcement never depends on the cache having room. Deletions free room.
//! The event channel holds [`EVENT_CAPACITY`] events; a receiver that falls further
//! behind is told so (`Lagged`) and should re-read the cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt as _;
use tenant_bus::error::Error;
use tenant_bus::settle::while_unanswered;
use tenant_bus::TenantId;
use tokio::sync::{broadcast, oneshot};

use super::{Registry, RegistryError, RegistryErrorKind, Status, TenantRecord};

/// Default cap on cached tenants.
pub const DEFAULT_MAX_CACHED_TENANTS: usize = 100_000;
/// Capacity of the event channel.
pub const EVENT_CAPACITY: usize = 1024;

/// Options of a [`RegistryWatcher`].
#[derive(Debug, Clone)]
pub struct WatcherOptions {
    max_entries: usize,
    ready_timeout: Duration,
}

impl Default for WatcherOptions {
    fn default() -> Self {
        Self {
            max_entries: DEFAULT_MAX_CACHED_TENANTS,
            ready_timeout: Duration::from_secs(10),
        }
    }
}

impl WatcherOptions {
    /// The defaults: [`DEFAULT_MAX_CACHED_TENANTS`] entries, 10 s to load.
    pub fn new() -> Self {
        Self::default()
    }

    /// The most tenants cached (at least 1).
    pub fn max_entries(mut self, max: usize) -> Self {
        self.max_entries = max.max(1);
        self
    }

    /// How long [`RegistryWatcher::start_with`] waits for the initial load.
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }
}

/// A change seen in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
// Events are rare (one per tenant change) and cloned to few subscribers; boxing the
// record would cost every reader a pointer chase for no measurable gain.
#[allow(clippy::large_enum_variant)]
pub enum RegistryEvent {
    /// A tenant was created or changed (the new record).
    Changed(TenantRecord),
    /// A tenant's record was deleted.
    Removed(TenantId),
}

impl RegistryEvent {
    /// The tenant concerned.
    pub fn tenant(&self) -> &TenantId {
        match self {
            Self::Changed(r) => &r.id,
            Self::Removed(id) => id,
        }
    }
}

struct Shared {
    registry: Registry,
    cache: RwLock<HashMap<TenantId, TenantRecord>>,
    events: broadcast::Sender<RegistryEvent>,
    max_entries: usize,
    overflowed: AtomicU64,
    last_revision: AtomicU64,
}

/// A live, bounded in-memory copy of the registry. Cheap to share (`Arc`); the
/// background watch stops when the watcher is dropped.
pub struct RegistryWatcher {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for RegistryWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryWatcher")
            .field("cached", &self.len())
            .field("last_revision", &self.last_revision())
            .finish()
    }
}

impl Drop for RegistryWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RegistryWatcher {
    /// Starts watching with default options; returns once the cache is loaded.
    pub async fn start(registry: &Registry) -> Result<Self, RegistryError> {
        Self::start_with(registry, WatcherOptions::new()).await
    }

    /// Starts watching with `options`; returns once the cache is loaded.
    pub async fn start_with(
        registry: &Registry,
        options: WatcherOptions,
    ) -> Result<Self, RegistryError> {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let shared = Arc::new(Shared {
            registry: registry.clone(),
            cache: RwLock::new(HashMap::new()),
            events,
            max_entries: options.max_entries,
            overflowed: AtomicU64::new(0),
            last_revision: AtomicU64::new(0),
        });
        // Both requests are sent again while unanswered: a bucket whose
        // stream (or the cluster's meta leader) is being elected answers
        // nothing, and a request sent before the election ends never gets an
        // answer (see `tenant_bus::settle::while_unanswered`). A watch
        // request cut short may still create its consumer: an ephemeral one
        // nobody listens to, which the server removes.
        let info = while_unanswered(|| registry.store().stream.get_info())
            .await
            .map_err(|e| {
                Error::with_source(RegistryErrorKind::Unavailable, "registry bucket info", e)
            })?;
        let empty = info.state.messages == 0;
        // `watch_with_history(">")` is `watch_all` starting with the latest value of
        // every key (deliver policy last-per-subject); plain `watch_all` delivers
        // only changes made after it starts.
        let watch = while_unanswered(|| registry.store().watch_with_history(">"))
            .await
            .map_err(|e| Error::with_source(RegistryErrorKind::Unavailable, "registry watch", e))?;
        let (ready_tx, ready_rx) = oneshot::channel();
        let ready_tx = if empty {
            let _ = ready_tx.send(());
            None
        } else {
            Some(ready_tx)
        };
        let task = tokio::spawn(run(shared.clone(), watch, ready_tx));
        let watcher = Self { shared, task };
        if !empty {
            match tokio::time::timeout(options.ready_timeout, ready_rx).await {
                Ok(Ok(())) => {}
                _ => {
                    return Err(Error::new(
                        RegistryErrorKind::Unavailable,
                        "the registry watch did not catch up in time",
                    ))
                }
            }
        }
        Ok(watcher)
    }

    /// The cached record of `tenant`, if cached.
    pub fn get(&self, tenant: &TenantId) -> Option<TenantRecord> {
        self.shared
            .cache
            .read()
            .ok()
            .and_then(|c| c.get(tenant).cloned())
    }

    /// The cached status of `tenant`, if cached.
    pub fn status(&self, tenant: &TenantId) -> Option<Status> {
        self.shared
            .cache
            .read()
            .ok()
            .and_then(|c| c.get(tenant).map(|r| r.status))
    }

    /// The record of `tenant`: from the cache, or read from the bucket on a miss.
    pub async fn lookup(&self, tenant: &TenantId) -> Result<TenantRecord, RegistryError> {
        match self.get(tenant) {
            Some(r) => Ok(r),
            None => self.shared.registry.get(tenant).await,
        }
    }

    /// Every cached record.
    pub fn snapshot(&self) -> Vec<TenantRecord> {
        self.shared
            .cache
            .read()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }

    /// How many tenants are cached.
    pub fn len(&self) -> usize {
        self.shared.cache.read().map(|c| c.len()).unwrap_or(0)
    }

    /// Whether no tenant is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// New tenants not cached because the cache was full.
    pub fn overflowed(&self) -> u64 {
        self.shared.overflowed.load(Ordering::Relaxed)
    }

    /// The highest bucket revision applied.
    pub fn last_revision(&self) -> u64 {
        self.shared.last_revision.load(Ordering::Relaxed)
    }

    /// A receiver of changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<RegistryEvent> {
        self.shared.events.subscribe()
    }

    /// The registry this watcher follows.
    pub fn registry(&self) -> &Registry {
        &self.shared.registry
    }
}

async fn run(shared: Arc<Shared>, mut watch: kv::Watch, mut ready: Option<oneshot::Sender<()>>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        while let Some(item) = watch.next().await {
            match item {
                Ok(entry) => {
                    backoff = Duration::from_millis(100);
                    let caught_up = entry.delta == 0;
                    apply(&shared, entry);
                    if caught_up {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "registry watch error; re-creating the watch");
                    break;
                }
            }
        }
        // The watch ended or failed: resume after the last revision applied.
        loop {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            let from = shared.last_revision.load(Ordering::Relaxed) + 1;
            match shared.registry.store().watch_all_from_revision(from).await {
                Ok(w) => {
                    watch = w;
                    break;
                }
                Err(e) => tracing::warn!(error = %e, "re-creating the registry watch"),
            }
        }
    }
}

fn apply(shared: &Shared, entry: kv::Entry) {
    shared
        .last_revision
        .fetch_max(entry.revision, Ordering::Relaxed);
    let Ok(id) = TenantId::new(&entry.key) else {
        tracing::warn!(key = %entry.key.escape_debug(), "registry key is not a tenant id");
        return;
    };
    let event = match entry.operation {
        kv::Operation::Put => {
            match TenantRecord::decode(&entry.key, &entry.value, entry.revision) {
                Ok(record) => record,
                Err(e) => {
                    tracing::warn!(tenant = %id, error = %e, "ignoring a corrupt registry record");
                    return;
                }
            }
        }
        kv::Operation::Delete | kv::Operation::Purge => {
            let Ok(mut cache) = shared.cache.write() else {
                return;
            };
            if let Some(old) = cache.get(&id) {
                if old.revision > entry.revision {
                    return;
                }
            }
            cache.remove(&id);
            drop(cache);
            let _ = shared.events.send(RegistryEvent::Removed(id));
            return;
        }
    };
    {
        let Ok(mut cache) = shared.cache.write() else {
            return;
        };
        match cache.get(&id) {
            Some(old) if old.revision >= event.revision => return,
            Some(_) => {
                cache.insert(id, event.clone());
            }
            None if cache.len() < shared.max_entries => {
                cache.insert(id, event.clone());
            }
            None => {
                let n = shared.overflowed.fetch_add(1, Ordering::Relaxed) + 1;
                if n <= 10 || n.is_power_of_two() {
                    tracing::warn!(tenant = %id, count = n, "registry cache full; not caching");
                }
            }
        }
    }
    let _ = shared.events.send(RegistryEvent::Changed(event));
}

/// One tenant's view of a [`RegistryWatcher`]: whether the tenant may operate now.
/// Layers that act for a tenant (agents, task dispatch and workers) consult it on
/// every operation; it reads the cache only (no I/O).
#[derive(Clone)]
pub struct TenantGate {
    watcher: Arc<RegistryWatcher>,
    tenant: TenantId,
}

impl std::fmt::Debug for TenantGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantGate")
            .field("tenant", &self.tenant)
            .field("status", &self.status())
            .finish()
    }
}

impl TenantGate {
    /// The gate of `tenant`.
    pub fn new(watcher: Arc<RegistryWatcher>, tenant: TenantId) -> Self {
        Self { watcher, tenant }
    }

    /// The tenant.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// The tenant's status, or `None` if the registry does not (or, past the cache
    /// bound, cannot cheaply) know it. Callers treat `None` as not active.
    pub fn status(&self) -> Option<Status> {
        self.watcher.status(&self.tenant)
    }

    /// Whether the tenant is known and active.
    pub fn is_active(&self) -> bool {
        self.status() == Some(Status::Active)
    }

    /// The watcher.
    pub fn watcher(&self) -> &Arc<RegistryWatcher> {
        &self.watcher
    }
}
