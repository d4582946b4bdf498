//! The per-tenant façade ([`TenantScheduler`]) and the registry of tenants
//! ([`Scheduler`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream;
use tenant_bus::admission::{Admission, Admit, RejectReason};
use tenant_bus::error::Error;
use tenant_bus::namespace::{ConnectError, ConnectErrorKind};
use tenant_bus::{AgentId, CredentialBundle, NamespaceOptions, TenantId, TenantNamespace};

use super::concurrency::{ConcurrencyLimit, Overflow, Permit, TaskPermit};
use super::error::{from_rejection, rejected, store_error, SchedulerError, SchedulerErrorKind};
use super::kv::{KvLedger, RateBucket};
use super::layer::{
    Chain, Check, Clock, Gate, RefillFuture, SizeLimit, Suspension, SystemClock, TimeSource,
};
use super::rate::{BatchPolicy, Dimension, MemoryLedger, RateWindow, TokenLedger};
use super::slots::{AgentSlot, AgentSlots, SlotBucket, SlotStore};
use crate::registry::Registry;
use crate::tiers::Quotas;

/// The message layers of a tenant, in order: suspension, maximum size, message
/// window, byte window.
pub type MessageLayers = Chain<Suspension, Chain<SizeLimit, Chain<RateWindow, RateWindow>>>;

/// A tenant's message admission on the system clock: [`MessageLayers`] behind a
/// [`Gate`].
pub type MessageGate = Gate<MessageLayers>;

/// A tenant's gate, whatever its clock (the clock is a type parameter so that the
/// system clock costs no memory read on the hot path).
trait TenantGate: Send + Sync + 'static {
    fn layers(&self) -> &MessageLayers;
    fn check(&self, bytes: u64) -> Check;
    fn admit(&self, bytes: u64) -> RefillFuture<'_>;
}

impl<C: TimeSource> TenantGate for Gate<MessageLayers, C> {
    fn layers(&self) -> &MessageLayers {
        Gate::layers(self)
    }

    fn check(&self, bytes: u64) -> Check {
        Gate::check(self, bytes)
    }

    fn admit(&self, bytes: u64) -> RefillFuture<'_> {
        Box::pin(Gate::admit(self, bytes))
    }
}

/// Builds the gate on `clock`, as both views.
fn gate_on<C: TimeSource>(
    layers: MessageLayers,
    clock: C,
) -> (Arc<dyn TenantGate>, Arc<dyn Admission>) {
    let gate = Gate::new(layers, clock);
    (gate.clone(), gate)
}

/// Scheduler-wide settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Overflow policy of the per-tenant task limit (default: a FIFO queue of 1,024
    /// waiters, 30 s timeout).
    pub task_overflow: Overflow,
    /// Batch policy of message windows (default `K = 4`, at most 1,024).
    pub message_batch: BatchPolicy,
    /// Batch policy of byte windows (default `K = 4`, at most 4 MiB).
    pub byte_batch: BatchPolicy,
    /// The clock of rate windows (default: the system clock).
    pub clock: Clock,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            task_overflow: Overflow::Queue {
                max_waiters: 1_024,
                timeout: Duration::from_secs(30),
            },
            message_batch: BatchPolicy::for_dimension(Dimension::Messages),
            byte_batch: BatchPolicy::for_dimension(Dimension::Bytes),
            clock: Clock::System,
        }
    }
}

impl SchedulerConfig {
    /// Sets `K`, the expected number of instances, for both batch policies.
    pub fn instances(mut self, k: u32) -> Self {
        self.message_batch.instances = k;
        self.byte_batch.instances = k;
        self
    }

    /// Sets the task overflow policy.
    pub fn task_overflow(mut self, overflow: Overflow) -> Self {
        self.task_overflow = overflow;
        self
    }

    /// Sets the clock.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }
}

/// Where agent slots are counted.
#[derive(Debug, Clone)]
enum SlotBackend {
    /// Cluster-wide, in the slot bucket.
    Cluster(SlotStore),
    /// This process only.
    Local,
}

#[derive(Debug)]
enum TenantSlots {
    Cluster(AgentSlots),
    Local(ConcurrencyLimit),
}

/// A held agent slot: a cluster-wide lease or, without JetStream, a local permit.
#[derive(Debug)]
#[must_use = "the slot is released when dropped"]
pub enum AgentLease {
    /// A lease in the slot bucket.
    Cluster(AgentSlot),
    /// A permit of this process.
    Local(Permit),
}

impl AgentLease {
    /// Releases the slot, waiting for the key-value store if cluster-wide.
    pub async fn release(self) -> Result<(), SchedulerError> {
        match self {
            AgentLease::Cluster(slot) => slot.release().await,
            AgentLease::Local(permit) => {
                drop(permit);
                Ok(())
            }
        }
    }

    /// Whether a cluster-wide lease was lost (never for local permits).
    pub fn is_lost(&self) -> bool {
        match self {
            AgentLease::Cluster(slot) => slot.is_lost(),
            AgentLease::Local(_) => false,
        }
    }
}

/// A running task's hold on the tenant's `max_concurrent_tasks`: this
/// instance's permit and, on a JetStream scheduler, a cluster-wide task slot (a
/// lease in the slot bucket, heartbeated while held). Both are released on
/// drop; a crashed instance's slots free themselves after the lease TTL.
#[must_use = "the task permit is released when dropped"]
pub struct TaskGrant {
    _permit: TaskPermit,
    lease: Option<AgentSlot>,
}

impl TaskGrant {
    /// Whether it holds a cluster-wide slot.
    pub fn is_cluster_wide(&self) -> bool {
        self.lease.is_some()
    }

    /// Whether the cluster-wide slot's lease was lost (the bucket was
    /// unreachable past the TTL and the slot may be held by another task now).
    pub fn is_lost(&self) -> bool {
        self.lease.as_ref().is_some_and(AgentSlot::is_lost)
    }
}

impl std::fmt::Debug for TaskGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskGrant")
            .field("cluster_wide", &self.is_cluster_wide())
            .finish()
    }
}

/// One tenant's limits: message admission ([`Admission`]), tasks, agent slots,
/// fair-queueing weight, suspension.
pub struct TenantScheduler {
    id: TenantId,
    // Two views of one gate: its layers, and the `Admission` handed to namespaces.
    gate: Arc<dyn TenantGate>,
    admission: Arc<dyn Admission>,
    tasks: ConcurrencyLimit,
    /// Cluster-wide running-task slots (a JetStream scheduler only).
    task_slots: Option<AgentSlots>,
    agents: TenantSlots,
    weight: AtomicU64,
    // Windows must stay shorter than the rate ledger's key expiry, or a counter
    // expires mid-window and the cap is admitted twice; set at creation.
    max_window: Option<Duration>,
}

impl TenantScheduler {
    fn new(
        id: TenantId,
        quotas: &Quotas,
        suspended: bool,
        config: &SchedulerConfig,
        ledger: &Arc<dyn TokenLedger>,
        slots: &SlotBackend,
        max_window: Option<Duration>,
    ) -> Self {
        let window = Duration::from_millis(quotas.window_ms.max(1));
        let layers = Chain(
            Suspension::new(suspended),
            Chain(
                SizeLimit::new(quotas.max_message_bytes),
                Chain(
                    RateWindow::new(
                        id.clone(),
                        Dimension::Messages,
                        quotas.messages_per_window,
                        window,
                        config.message_batch,
                        ledger.clone(),
                    ),
                    RateWindow::new(
                        id.clone(),
                        Dimension::Bytes,
                        quotas.bytes_per_window,
                        window,
                        config.byte_batch,
                        ledger.clone(),
                    ),
                ),
            ),
        );
        let agents = match slots {
            SlotBackend::Cluster(store) => {
                TenantSlots::Cluster(store.tenant(id.clone(), quotas.max_agents))
            }
            SlotBackend::Local => TenantSlots::Local(ConcurrencyLimit::new(
                usize_of(quotas.max_agents),
                Overflow::Reject,
                "agents",
            )),
        };
        let task_slots = match slots {
            SlotBackend::Cluster(store) => {
                Some(store.tenant_tasks(id.clone(), quotas.max_concurrent_tasks))
            }
            SlotBackend::Local => None,
        };
        let (gate, admission) = match &config.clock {
            Clock::System => gate_on(layers, SystemClock),
            Clock::Manual(m) => gate_on(layers, m.clone()),
        };
        Self {
            tasks: ConcurrencyLimit::new(
                usize_of(quotas.max_concurrent_tasks),
                config.task_overflow,
                "tasks",
            ),
            task_slots,
            gate,
            admission,
            agents,
            weight: AtomicU64::new(quotas.weight.max(1)),
            max_window,
            id,
        }
    }

    /// The tenant.
    pub fn id(&self) -> &TenantId {
        &self.id
    }

    /// The message admission to hand to the tenant's namespace: the gate itself,
    /// so a check is one virtual call on the tenant's own state.
    pub fn message_admission(&self) -> Arc<dyn Admission> {
        self.admission.clone()
    }

    /// `base` with this tenant's message admission: a namespace connected with
    /// these options feeds every publish, request and response to the scheduler.
    pub fn namespace_options(&self, base: NamespaceOptions) -> NamespaceOptions {
        base.admission(self.message_admission())
    }

    /// Connects `bundle` (which must be this tenant's) with this tenant's message
    /// admission. Only the bundle's tenant label is compared here; that the
    /// connection really is in this tenant's NATS account is checked by
    /// [`AgentHost::connect`](crate::agent::AgentHost::connect) (see
    /// [`agent::identity`](crate::agent::identity)), which callers handing
    /// bundles they did not issue should use instead.
    pub async fn connect(
        &self,
        bundle: &CredentialBundle,
        base: NamespaceOptions,
    ) -> Result<TenantNamespace, ConnectError> {
        if bundle.tenant != self.id {
            return Err(Error::new(
                ConnectErrorKind::Keys,
                format!(
                    "bundle of {} for the scheduler of {}",
                    bundle.tenant, self.id
                ),
            ));
        }
        self.namespace_options(base).connect(bundle).await
    }

    /// The message layers (suspension, size, message window, byte window).
    pub fn layers(&self) -> &MessageLayers {
        self.gate.layers()
    }

    /// The synchronous message check (no waiting).
    pub fn check_message(&self, bytes: u64) -> Check {
        self.gate.check(bytes)
    }

    /// Admits one message of `bytes` bytes, waiting for a lease if needed.
    pub async fn admit(&self, bytes: u64) -> Result<(), SchedulerError> {
        self.gate.admit(bytes).await.map_err(from_rejection)
    }

    fn suspension(&self) -> &Suspension {
        &self.gate.layers().0
    }

    /// The message window.
    pub fn message_window(&self) -> &RateWindow {
        &self.gate.layers().1 .1 .0
    }

    /// The byte window.
    pub fn byte_window(&self) -> &RateWindow {
        &self.gate.layers().1 .1 .1
    }

    /// Suspends the tenant: every admission returns
    /// [`RejectReason::Suspended`](tenant_bus::admission::RejectReason::Suspended).
    pub fn suspend(&self) {
        self.suspension().set(true);
    }

    /// Lifts a suspension.
    pub fn resume(&self) {
        self.suspension().set(false);
    }

    /// Whether suspended.
    pub fn is_suspended(&self) -> bool {
        self.suspension().is_set()
    }

    fn check_suspended(&self) -> Result<(), SchedulerError> {
        if self.is_suspended() {
            return Err(from_rejection(Suspension::rejection()));
        }
        Ok(())
    }

    /// The weight in fair queueing.
    pub fn weight(&self) -> u64 {
        self.weight.load(Ordering::Relaxed)
    }

    /// The task limit.
    pub fn tasks(&self) -> &ConcurrencyLimit {
        &self.tasks
    }

    /// Takes a task permit: this instance's (limit `max_concurrent_tasks`,
    /// with the configured overflow policy), then, on a JetStream scheduler,
    /// one of the tenant's cluster-wide task slots, so `max_concurrent_tasks`
    /// holds across every runtime instance. With every cluster slot held the
    /// permit is given back and the call refused with
    /// [`RejectReason::Concurrency`] (retry after 100 ms).
    pub async fn acquire_task(&self) -> Result<TaskGrant, SchedulerError> {
        self.check_suspended()?;
        let permit = self.tasks.acquire().await?;
        // A suspension while queued wins over the permit.
        self.check_suspended()?;
        self.with_cluster_slot(permit, u64::MAX).await
    }

    /// Takes a task permit only if one is free now (no queueing); for the
    /// cluster-wide slot it tries at most 2 keys (a cheap try: it may refuse
    /// while a slot is free elsewhere).
    pub async fn try_acquire_task(&self) -> Result<TaskGrant, SchedulerError> {
        self.check_suspended()?;
        let permit = self.tasks.try_acquire()?;
        self.with_cluster_slot(permit, 2).await
    }

    async fn with_cluster_slot(
        &self,
        permit: TaskPermit,
        attempts: u64,
    ) -> Result<TaskGrant, SchedulerError> {
        let lease = match &self.task_slots {
            None => None,
            Some(slots) => match slots
                .acquire_within(
                    // The holder in the lease (its token adds what is unique).
                    &AgentId::new("task").map_err(|e| {
                        Error::new(SchedulerErrorKind::InvalidConfig, e.to_string())
                    })?,
                    attempts,
                )
                .await
            {
                Ok(slot) => Some(slot),
                Err(e) => {
                    drop(permit);
                    return Err(match e.kind() {
                        SchedulerErrorKind::Rejected(_) => rejected(
                            RejectReason::Concurrency,
                            Some(Duration::from_millis(100)),
                            e.to_string(),
                        ),
                        _ => e,
                    });
                }
            },
        };
        Ok(TaskGrant {
            _permit: permit,
            lease,
        })
    }

    /// Takes one of the tenant's `max_agents` slots for `agent` (cluster-wide when
    /// the scheduler runs on JetStream).
    pub async fn acquire_agent_slot(&self, agent: &AgentId) -> Result<AgentLease, SchedulerError> {
        self.check_suspended()?;
        let lease = match &self.agents {
            TenantSlots::Cluster(slots) => AgentLease::Cluster(slots.acquire(agent).await?),
            TenantSlots::Local(limit) => AgentLease::Local(limit.try_acquire()?),
        };
        if self.is_suspended() {
            lease.release().await?;
            return Err(from_rejection(Suspension::rejection()));
        }
        Ok(lease)
    }

    /// Agent slots held through this instance.
    pub fn agents_held_here(&self) -> u64 {
        match &self.agents {
            TenantSlots::Cluster(slots) => slots.held_here(),
            TenantSlots::Local(limit) => {
                u64::try_from(limit.limit().saturating_sub(limit.available())).unwrap_or(0)
            }
        }
    }

    /// The current rate window, in milliseconds.
    pub fn window_ms(&self) -> u64 {
        self.gate.layers().1 .1 .0.window_ms()
    }

    /// Applies changed quotas in place (holders keep what they hold).
    ///
    /// A `window_ms` not shorter than the rate ledger's key expiry is refused
    /// here as on creation (the window keeps its old length, and a warning is
    /// logged): live updates get the same check as new tenants.
    pub fn set_quotas(&self, quotas: &Quotas) {
        let layers = self.gate.layers();
        layers.1 .0.set(quotas.max_message_bytes);
        let window = Duration::from_millis(quotas.window_ms.max(1));
        let window_ok = self.max_window.is_none_or(|max| window < max);
        if !window_ok {
            tracing::warn!(
                tenant = %self.id,
                window_ms = quotas.window_ms,
                "window_ms not shorter than the rate ledger's expiry; keeping the old window"
            );
        }
        layers.1 .1 .0.set_cap(quotas.messages_per_window);
        layers.1 .1 .1.set_cap(quotas.bytes_per_window);
        if window_ok {
            layers.1 .1 .0.set_window(window);
            layers.1 .1 .1.set_window(window);
        }
        self.tasks.set_limit(usize_of(quotas.max_concurrent_tasks));
        if let Some(slots) = &self.task_slots {
            slots.set_max(quotas.max_concurrent_tasks);
        }
        match &self.agents {
            TenantSlots::Cluster(slots) => slots.set_max(quotas.max_agents),
            TenantSlots::Local(limit) => limit.set_limit(usize_of(quotas.max_agents)),
        }
        self.weight.store(quotas.weight.max(1), Ordering::Relaxed);
    }
}

impl std::fmt::Debug for TenantScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantScheduler")
            .field("id", &self.id)
            .field("suspended", &self.is_suspended())
            .field("message_window", self.message_window())
            .field("byte_window", self.byte_window())
            .field("tasks", &self.tasks)
            .field("agents", &self.agents)
            .field("weight", &self.weight())
            .finish()
    }
}

impl Admission for TenantScheduler {
    #[inline]
    fn admit_message(&self, bytes: usize) -> Admit {
        self.admission.admit_message(bytes)
    }
}

fn usize_of(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// The registry of tenant schedulers of one instance. Tenants are created lazily,
/// on first use; the registry is consulted when a namespace or agent starts, never
/// per message (a namespace holds its tenant's [`Admission`] directly).
pub struct Scheduler {
    config: SchedulerConfig,
    ledger: Arc<dyn TokenLedger>,
    slots: SlotBackend,
    // Windows must be shorter than the rate bucket's max_age (cluster mode).
    rate_max_age: Option<Duration>,
    tenants: RwLock<HashMap<TenantId, Arc<TenantScheduler>>>,
    suspended: RwLock<HashSet<TenantId>>,
}

impl Scheduler {
    /// A scheduler for a single instance: windows and agent slots counted in this
    /// process.
    pub fn local(config: SchedulerConfig) -> Self {
        Self::with_ledger(config, Arc::new(MemoryLedger::new()))
    }

    /// A scheduler with its own ledger and local agent slots.
    pub fn with_ledger(config: SchedulerConfig, ledger: Arc<dyn TokenLedger>) -> Self {
        Self {
            config,
            ledger,
            slots: SlotBackend::Local,
            rate_max_age: None,
            tenants: RwLock::new(HashMap::new()),
            suspended: RwLock::new(HashSet::new()),
        }
    }

    /// A cluster-wide scheduler: rate windows in the `rate` bucket, agent slots in
    /// the `slots` bucket (both created if missing). Every instance of the cluster
    /// opens the same buckets; there is no other shared state.
    pub async fn connect(
        js: &jetstream::Context,
        config: SchedulerConfig,
        rate: &RateBucket,
        slots: &SlotBucket,
    ) -> Result<Self, SchedulerError> {
        let ledger = KvLedger::open(js, rate).await?;
        let slots = SlotStore::open(js, slots).await?;
        Ok(Self {
            config,
            rate_max_age: Some(ledger.max_age()),
            ledger: Arc::new(ledger),
            slots: SlotBackend::Cluster(slots),
            tenants: RwLock::new(HashMap::new()),
            suspended: RwLock::new(HashSet::new()),
        })
    }

    /// A cluster-wide scheduler on the default buckets ([`RateBucket`],
    /// [`SlotBucket`]) with the deployment's replica count: the registry
    /// bucket's own ([`Registry::replicas`]), which the controller created
    /// from the installation's setting (1 on one node, 3 on a cluster). What a
    /// runtime instance of a deployment uses; [`connect`](Self::connect)
    /// takes buckets and replicas chosen by hand.
    pub async fn connect_for_deployment(
        js: &jetstream::Context,
        config: SchedulerConfig,
        registry: &Registry,
    ) -> Result<Self, SchedulerError> {
        let replicas = registry
            .replicas()
            .await
            .map_err(|e| store_error("reading the deployment's replicas from the registry", e))?;
        Self::connect(
            js,
            config,
            &RateBucket {
                replicas,
                ..RateBucket::default()
            },
            &SlotBucket {
                replicas,
                ..SlotBucket::default()
            },
        )
        .await
    }

    /// The tenant's scheduler, created from `quotas` on first use (later calls
    /// return the same one; use [`TenantScheduler::set_quotas`] to change quotas).
    pub fn tenant(
        &self,
        id: &TenantId,
        quotas: &Quotas,
    ) -> Result<Arc<TenantScheduler>, SchedulerError> {
        if let Some(t) = self.get(id) {
            return Ok(t);
        }
        if let Some(max_age) = self.rate_max_age {
            if Duration::from_millis(quotas.window_ms) >= max_age {
                return Err(Error::new(
                    SchedulerErrorKind::InvalidConfig,
                    format!(
                        "window_ms {} is not shorter than the rate bucket's max_age",
                        quotas.window_ms
                    ),
                ));
            }
        }
        let suspended = self.read_suspended().contains(id);
        let mut map = self
            .tenants
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let t = map.entry(id.clone()).or_insert_with(|| {
            Arc::new(TenantScheduler::new(
                id.clone(),
                quotas,
                suspended,
                &self.config,
                &self.ledger,
                &self.slots,
                self.rate_max_age,
            ))
        });
        Ok(t.clone())
    }

    /// The tenant's scheduler, if created.
    pub fn get(&self, id: &TenantId) -> Option<Arc<TenantScheduler>> {
        self.tenants
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// Forgets a tenant (its namespaces keep their handle until dropped).
    pub fn remove(&self, id: &TenantId) -> Option<Arc<TenantScheduler>> {
        self.tenants
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id)
    }

    /// Tenants created so far.
    pub fn len(&self) -> usize {
        self.tenants
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Whether no tenant was created.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read_suspended(&self) -> std::sync::RwLockReadGuard<'_, HashSet<TenantId>> {
        self.suspended
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Suspends a tenant, now and for schedulers created later.
    pub fn suspend(&self, id: &TenantId) {
        self.suspended
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.clone());
        if let Some(t) = self.get(id) {
            t.suspend();
        }
    }

    /// Lifts a suspension.
    pub fn resume(&self, id: &TenantId) {
        self.suspended
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
        if let Some(t) = self.get(id) {
            t.resume();
        }
    }

    /// Whether a tenant is suspended.
    pub fn is_suspended(&self, id: &TenantId) -> bool {
        self.read_suspended().contains(id)
    }

    /// Follows `watcher`: the registry's suspensions, activations and quota
    /// changes reach this scheduler while the returned follower lives.
    pub fn follow_registry(
        self: &Arc<Self>,
        watcher: &crate::registry::RegistryWatcher,
    ) -> super::RegistryFollower {
        super::RegistryFollower::start(self, watcher)
    }
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("config", &self.config)
            .field("slots", &self.slots)
            .field("tenants", &self.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiers::Tier;
    use tenant_bus::admission::RejectReason;

    fn id(s: &str) -> TenantId {
        TenantId::new(s).unwrap()
    }

    #[test]
    fn message_layers_fill_one_cache_line() {
        assert_eq!(std::mem::size_of::<MessageLayers>(), 64);
        assert_eq!(std::mem::align_of::<MessageGate>(), 64);
    }

    #[tokio::test]
    async fn tenants_are_created_lazily_and_once() {
        let sched = Scheduler::local(SchedulerConfig::default());
        assert!(sched.is_empty());
        let q = Quotas::for_tier(Tier::Free);
        let a = sched.tenant(&id("a"), &q).unwrap();
        let again = sched.tenant(&id("a"), &q).unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        assert_eq!(sched.len(), 1);
        assert!(sched.get(&id("b")).is_none());
        assert!(sched.remove(&id("a")).is_some());
        assert!(sched.is_empty());
    }

    #[tokio::test]
    async fn message_admission_checks_size_and_windows() {
        let clock = super::super::ManualClock::new(10_000);
        let sched =
            Scheduler::local(SchedulerConfig::default().clock(Clock::Manual(clock.clone())));
        let mut q = Quotas::for_tier(Tier::Free);
        q.messages_per_window = 5;
        q.bytes_per_window = 1_000;
        q.max_message_bytes = 400;
        let t = sched.tenant(&id("a"), &q).unwrap();
        let e = t.admit(401).await.unwrap_err();
        assert_eq!(e.kind().reason(), Some(RejectReason::TooLarge));
        for _ in 0..2 {
            t.admit(400).await.unwrap();
        }
        // 800 bytes spent: a 300-byte message exceeds the byte window.
        let e = t.admit(300).await.unwrap_err();
        assert_eq!(e.kind().reason(), Some(RejectReason::ByteRate));
        for _ in 0..3 {
            t.admit(10).await.unwrap();
        }
        let e = t.admit(10).await.unwrap_err();
        assert_eq!(e.kind().reason(), Some(RejectReason::MessageRate));
        assert_eq!(e.kind().retry_after(), Some(Duration::from_millis(1_000)));
        // A refused byte check gave its message token back: 5 admitted in total.
        clock.advance(Duration::from_millis(1_000));
        t.admit(10).await.unwrap();
    }

    #[tokio::test]
    async fn suspension_and_quota_changes_apply_in_place() {
        let sched = Scheduler::local(SchedulerConfig::default().task_overflow(Overflow::Reject));
        let mut q = Quotas::for_tier(Tier::Free);
        q.max_concurrent_tasks = 1;
        q.max_agents = 1;
        sched.suspend(&id("a"));
        let t = sched.tenant(&id("a"), &q).unwrap();
        assert!(t.is_suspended());
        match t.admit_message(1) {
            Admit::Rejected(r) => assert_eq!(r.reason, RejectReason::Suspended),
            _ => panic!("suspended tenant admitted"),
        }
        sched.resume(&id("a"));
        let _p = t.acquire_task().await.unwrap();
        assert!(t.acquire_task().await.is_err());
        let agent = AgentId::new("bot").unwrap();
        let _s = t.acquire_agent_slot(&agent).await.unwrap();
        let e = t.acquire_agent_slot(&agent).await.unwrap_err();
        assert_eq!(e.kind().reason(), Some(RejectReason::Concurrency));
        q.max_concurrent_tasks = 2;
        q.weight = 7;
        t.set_quotas(&q);
        let _p2 = t.acquire_task().await.unwrap();
        assert_eq!(t.weight(), 7);
    }
}
