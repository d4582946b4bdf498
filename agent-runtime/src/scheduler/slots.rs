//! Concurrent agents and running tasks per tenant, cluster-wide: slots are
//! leases in a JetStream key-value bucket.
//!
//! Bucket [`SLOT_BUCKET`] (`agentbus_agent_slots`), keys `<tenant>.slot.<i>` for `i`
//! in `0..max_agents` (agents) and `<tenant>.task.<i>` for `i` in
//! `0..max_concurrent_tasks` (running tasks), value: the holder's agent id and a token unique to this
//! lease. A slot is taken with an atomic `create` (succeeds only if the key is
//! absent or deleted), so at most one holder per key and at most `max_agents`
//! holders per tenant in the whole cluster. The holder refreshes the key every
//! `ttl / 3` with `update(key, token, revision)` (compare-and-set: a slot that
//! expired and was taken by someone else is never overwritten; the old holder sees
//! [`AgentSlot::is_lost`]). Release deletes the key with the holder's revision;
//! heartbeat and release are serialised, and a write whose acknowledgement was lost
//! is recognised by the token. The bucket's `max_age` is the lease TTL: a crashed
//! agent's key stops being refreshed and the server removes it after the TTL, which
//! frees the slot (so does a `create` whose acknowledgement was lost).
//!
//! A tenant with a free slot gets one in at most `max_agents` creates (it starts
//! at a rotating index to spread racing callers); an instance that itself holds all
//! `max_agents` slots refuses without a round trip.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::kv;
use bytes::Bytes;
use tenant_bus::admission::RejectReason;
use tenant_bus::error::Error;
use tenant_bus::{AgentId, TenantId};

use super::error::{rejected, store_error, SchedulerError, SchedulerErrorKind};

/// The default agent-slot bucket.
pub const SLOT_BUCKET: &str = "agentbus_agent_slots";

/// Options of the agent-slot bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotBucket {
    /// Bucket name (default [`SLOT_BUCKET`]).
    pub bucket: String,
    /// Lease TTL: the bucket's `max_age` (default 30 s; at least 1 s). Heartbeats
    /// run every `ttl / 3`.
    pub ttl: Duration,
    /// Storage (default file: a server restart must not free every slot).
    pub storage: jetstream::stream::StorageType,
    /// Replicas in a cluster (default 1).
    pub replicas: usize,
}

impl Default for SlotBucket {
    fn default() -> Self {
        Self {
            bucket: SLOT_BUCKET.to_owned(),
            ttl: Duration::from_secs(30),
            storage: jetstream::stream::StorageType::File,
            replicas: 1,
        }
    }
}

/// The agent-slot bucket, shared by every tenant of an instance (cheap to clone:
/// a `kv::Store` is 1.5 KiB, so tenants share one behind an `Arc`).
#[derive(Debug, Clone)]
pub struct SlotStore {
    inner: Arc<StoreInner>,
}

#[derive(Debug)]
struct StoreInner {
    kv: kv::Store,
    ttl: Duration,
}

impl SlotStore {
    /// Creates (or updates) the bucket.
    pub async fn open(
        js: &jetstream::Context,
        options: &SlotBucket,
    ) -> Result<Self, SchedulerError> {
        let kv = super::kv::open_expiring_bucket(
            js,
            &options.bucket,
            "agentbus scheduler: agent slot leases",
            "agent slot TTL",
            options.ttl,
            options.storage,
            options.replicas,
        )
        .await?;
        Ok(Self {
            inner: Arc::new(StoreInner {
                kv,
                ttl: options.ttl,
            }),
        })
    }

    /// The lease TTL.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// The bucket.
    pub fn store(&self) -> &kv::Store {
        &self.inner.kv
    }

    /// The slots of `tenant`, at most `max_agents` held cluster-wide.
    pub fn tenant(&self, tenant: TenantId, max_agents: u64) -> AgentSlots {
        self.slots_of(tenant, max_agents, "slot", "agents")
    }

    /// The running-task slots of `tenant` (keys `<tenant>.task.<i>`), at most
    /// `max_concurrent_tasks` held cluster-wide.
    pub fn tenant_tasks(&self, tenant: TenantId, max_tasks: u64) -> AgentSlots {
        self.slots_of(tenant, max_tasks, "task", "tasks")
    }

    fn slots_of(
        &self,
        tenant: TenantId,
        max: u64,
        kind: &'static str,
        what: &'static str,
    ) -> AgentSlots {
        AgentSlots {
            inner: Arc::new(SlotsInner {
                store: self.clone(),
                tenant,
                kind,
                what,
                max: AtomicU64::new(max),
                held_here: AtomicU64::new(0),
                cursor: AtomicU64::new(0),
            }),
        }
    }
}

struct SlotsInner {
    store: SlotStore,
    tenant: TenantId,
    /// The key's middle token: `slot` (agents) or `task`.
    kind: &'static str,
    /// What is counted, for messages.
    what: &'static str,
    max: AtomicU64,
    held_here: AtomicU64,
    cursor: AtomicU64,
}

/// One tenant's cluster-wide agent slots (cheap to clone).
#[derive(Clone)]
pub struct AgentSlots {
    inner: Arc<SlotsInner>,
}

impl AgentSlots {
    /// The cluster-wide limit.
    pub fn max(&self) -> u64 {
        self.inner.max.load(Ordering::Acquire)
    }

    /// Changes the limit. Lowering it never evicts a holder; slots at or above the
    /// new limit are not handed out again.
    pub fn set_max(&self, max: u64) {
        self.inner.max.store(max, Ordering::Release);
    }

    /// Slots held through this instance.
    pub fn held_here(&self) -> u64 {
        self.inner.held_here.load(Ordering::Acquire)
    }

    fn key(&self, index: u64) -> String {
        format!("{}.{}.{index}", self.inner.tenant, self.inner.kind)
    }

    /// Slots held cluster-wide right now (one read per slot; for tests and tools).
    pub async fn held_cluster_wide(&self) -> Result<u64, SchedulerError> {
        let mut n = 0;
        for i in 0..self.max() {
            let key = self.key(i);
            let entry = self
                .inner
                .store
                .store()
                .entry(&key)
                .await
                .map_err(|e| store_error(format!("reading {key}"), e))?;
            if matches!(entry, Some(e) if e.operation == kv::Operation::Put) {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Takes a free slot for `holder`, or refuses with
    /// [`RejectReason::Concurrency`] when all `max_agents` are held cluster-wide.
    pub async fn acquire(&self, holder: &AgentId) -> Result<AgentSlot, SchedulerError> {
        self.acquire_within(holder, u64::MAX).await
    }

    /// As [`acquire`](Self::acquire), trying at most `attempts` keys: a cheap
    /// try that may refuse while a slot is free elsewhere in the range.
    pub async fn acquire_within(
        &self,
        holder: &AgentId,
        attempts: u64,
    ) -> Result<AgentSlot, SchedulerError> {
        let max = self.max();
        if self.held_here() >= max {
            return Err(self.full(max));
        }
        let token = lease_token(holder);
        let start = self.inner.cursor.fetch_add(1, Ordering::Relaxed);
        for j in 0..max.min(attempts.max(1)) {
            let index = start.wrapping_add(j) % max;
            let key = self.key(index);
            match self.inner.store.store().create(&key, token.clone()).await {
                Ok(revision) => {
                    self.inner.held_here.fetch_add(1, Ordering::AcqRel);
                    return Ok(AgentSlot::start(
                        self.inner.clone(),
                        key,
                        index,
                        revision,
                        token,
                    ));
                }
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                Err(e) => return Err(store_error(format!("creating {key}"), e)),
            }
        }
        Err(self.full(max))
    }

    fn full(&self, max: u64) -> SchedulerError {
        rejected(
            RejectReason::Concurrency,
            None,
            format!(
                "tenant {} runs {max} of {max} {}",
                self.inner.tenant, self.inner.what
            ),
        )
    }
}

impl std::fmt::Debug for AgentSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSlots")
            .field("tenant", &self.inner.tenant)
            .field("max", &self.max())
            .field("held_here", &self.held_here())
            .finish()
    }
}

/// A held agent slot. Heartbeats run in a background task; dropping the slot
/// deletes the key in the background; [`release`](Self::release) does it and
/// waits. If the process dies, the slot frees itself after the TTL.
#[must_use = "the slot is released when dropped"]
pub struct AgentSlot {
    slots: Arc<SlotsInner>,
    key: String,
    index: u64,
    lease: Arc<LeaseState>,
}

/// What the holder and its heartbeat task share. The mutex serialises every write
/// of the key by this holder (heartbeat, release), so a release never races an
/// in-flight heartbeat with a stale revision.
struct LeaseState {
    token: Bytes,
    write: tokio::sync::Mutex<Written>,
    lost: AtomicBool,
}

struct Written {
    revision: u64,
    released: bool,
}

/// Distinguishes this lease from any other holder's, even of the same agent id.
fn lease_token(holder: &AgentId) -> Bytes {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    Bytes::from(format!(
        "{holder} {:x}-{nanos:x}-{seq:x}",
        std::process::id()
    ))
}

impl LeaseState {
    /// Re-reads the key after a failed compare-and-set: if it still holds this
    /// lease's token (a write of ours landed but its acknowledgement was lost),
    /// returns its revision.
    async fn recover(&self, kv: &kv::Store, key: &str) -> Option<u64> {
        match kv.entry(key).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put && e.value == self.token => {
                Some(e.revision)
            }
            _ => None,
        }
    }

    async fn release(&self, kv: &kv::Store, key: &str) -> Result<(), SchedulerError> {
        let mut w = self.write.lock().await;
        if w.released || self.lost.load(Ordering::Acquire) {
            w.released = true;
            return Ok(());
        }
        w.released = true;
        let mut revision = w.revision;
        for _ in 0..2 {
            match kv.delete_expect_revision(key, Some(revision)).await {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    match self.recover(kv, key).await {
                        Some(r) => revision = r,
                        // Expired, or someone else's now: nothing of ours to delete.
                        None => return Ok(()),
                    }
                }
                Err(e) => return Err(store_error(format!("deleting {key}"), e)),
            }
        }
        Err(Error::new(
            SchedulerErrorKind::Store,
            format!("deleting {key}: revision keeps moving"),
        ))
    }
}

impl AgentSlot {
    fn start(slots: Arc<SlotsInner>, key: String, index: u64, revision: u64, token: Bytes) -> Self {
        let lease = Arc::new(LeaseState {
            token,
            write: tokio::sync::Mutex::new(Written {
                revision,
                released: false,
            }),
            lost: AtomicBool::new(false),
        });
        tokio::spawn(heartbeat(
            slots.store.clone(),
            key.clone(),
            (slots.store.inner.ttl / 3).max(Duration::from_millis(100)),
            Arc::downgrade(&lease),
        ));
        Self {
            slots,
            key,
            index,
            lease,
        }
    }

    /// The slot index (`0..max_agents`).
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The key-value key (`<tenant>.slot.<i>`).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether the lease was lost (a heartbeat found the key expired or taken): the
    /// agent should stop, its slot may belong to another agent now.
    pub fn is_lost(&self) -> bool {
        self.lease.lost.load(Ordering::Acquire)
    }

    /// Stops the heartbeats and deletes the key, waiting for the server.
    pub async fn release(self) -> Result<(), SchedulerError> {
        self.lease
            .release(self.slots.store.store(), &self.key)
            .await
        // Drop finds the lease released and only updates the local count.
    }
}

impl Drop for AgentSlot {
    fn drop(&mut self) {
        self.slots.held_here.fetch_sub(1, Ordering::AcqRel);
        // Without a runtime the key simply expires after the TTL (the heartbeat
        // task cannot run either).
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let store = self.slots.store.clone();
            let key = std::mem::take(&mut self.key);
            let lease = self.lease.clone();
            rt.spawn(async move {
                if let Err(e) = lease.release(store.store(), &key).await {
                    tracing::debug!(key, error = %e, "agent slot not deleted; it expires after the TTL");
                }
            });
        }
    }
}

impl std::fmt::Debug for AgentSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSlot")
            .field("key", &self.key)
            .field("lost", &self.is_lost())
            .finish()
    }
}

/// Refreshes the key every `every` until the lease is released, lost or dropped.
async fn heartbeat(store: SlotStore, key: String, every: Duration, lease: Weak<LeaseState>) {
    let kv = store.store();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(lease) = lease.upgrade() else { return };
        let mut w = lease.write.lock().await;
        if w.released {
            return;
        }
        match kv.update(&key, lease.token.clone(), w.revision).await {
            Ok(next) => w.revision = next,
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                match lease.recover(kv, &key).await {
                    Some(r) => w.revision = r,
                    None => {
                        tracing::warn!(key, "agent slot lease lost");
                        lease.lost.store(true, Ordering::Release);
                        return;
                    }
                }
            }
            // Transient (timeout, reconnect): try again next tick; the TTL is three
            // ticks long.
            Err(e) => tracing::debug!(key, error = %e, "agent slot heartbeat failed"),
        }
    }
}
