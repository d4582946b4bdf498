//! Agents: registration against the tenant registry, handlers on the agent's
//! [`TenantNamespace`], permissions, tools, suspension, drain and deregistration.
//!
//! An [`AgentHost`] runs on every runtime instance beside a [`RegistryWatcher`].
//! [`AgentHost::register`] admits an agent only if its tenant is known and active,
//! its connection is in the tenant's NATS account as the server reports it (not
//! as the bundle's label says; see [`identity`]), its type is among the tenant's
//! `allowed_agent_types`, and the tenant has fewer than `max_agents` agents on
//! this host. The host follows the registry's change events: when a
//! tenant is suspended, every running agent of it stops (its handler loops drop
//! their subscriptions) and every operation of it is refused with
//! [`AgentErrorKind::Suspended`]; on activation the handlers subscribe again.
//!
//! Every operation of an [`Agent`] — publish, request, respond, permission check,
//! tool call, new handler — first checks the tenant's current status in the
//! watcher's cache (not only the host's last event), so there is no window after a
//! suspension is seen in which an operation slips through.
//!
//! Receive memory is bounded per tenant: every namespace [`AgentHost::connect`]
//! connects charges the tenant's one [`ByteBudget`] on this host
//! ([`AgentHost::receive_budget`], limit [`AgentHost::receive_bytes_per_tenant`],
//! 64 MiB by default) for the verified messages its subscriptions hold, so a
//! flood into one tenant's subjects (even from a raw client with the tenant's
//! credentials, into handlers that are busy) is dropped at that bound, counted
//! under `receive_budget`, instead of growing the host (see
//! `tenant_bus::subscription` and docs/bounds.md).
//!
//! Handlers run one message at a time per subscription; [`Agent::shutdown`] stops
//! accepting messages, lets each handler finish the message it is on (up to the
//! timeout), then deregisters the agent.
//!
//! # With the resource-pool scheduler
//!
//! A host made with [`AgentHost::with_scheduler`] feeds the instance's
//! [`Scheduler`] on every agent start:
//! - [`AgentHost::register`] takes one of the tenant's agent slots
//!   ([`TenantScheduler::acquire_agent_slot`]): with a JetStream scheduler
//!   ([`Scheduler::connect`]) a lease in the slot bucket, with a TTL and
//!   heartbeats, so `max_agents` holds across every instance of the cluster; a
//!   refusal is [`AgentErrorKind::TooManyAgents`] (the scheduler's error, with its
//!   retry-after, is the source). The slot is released when the agent shuts down
//!   (deregistration); if the process dies, it expires after the TTL;
//! - [`AgentHost::connect`] connects an agent's namespace with the tenant's message
//!   admission, so every publish, request and response of the agent counts
//!   against the tenant's windows (refused with the bus's typed
//!   `Rejected(reason, retry-after)`);
//! - the registry's suspensions, activations and quota changes reach the
//!   scheduler (a [`RegistryFollower`] runs with the host).
//!
//! - [`identity`]: the tenant of a connection, from the server.
//! - [`permissions`]: `resource:action` grants, evaluated only inside the tenant.
//! - [`tools`]: per-tenant tool implementations, rate limits, per-task budgets.

pub mod identity;
pub mod permissions;
pub mod tools;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use tenant_bus::error::Error;
use tenant_bus::ids::validate_slug;
use tenant_bus::subject::{IntoPattern, IntoSubject};
use tenant_bus::{
    AgentId, ByteBudget, CredentialBundle, MessageId, NamespaceOptions, TenantId, TenantMessage,
    TenantNamespace,
};
use tokio::sync::{broadcast, watch};

use crate::registry::{RegistryEvent, RegistryWatcher, Status, TenantRecord};
use crate::scheduler::{
    AgentLease, RegistryFollower, Scheduler, SchedulerError, SchedulerErrorKind, TenantScheduler,
};
use agentbus_control::audit::event::Outcome;
use agentbus_control::audit::sink::{AuditSink, RuntimeEvent};
use agentbus_control::meter::UsageMeter;
use permissions::{PermissionErrorKind, PermissionSet, Resource};
use tenant_bus::admission::RejectReason;
use tools::{ToolBudget, ToolRefusal, ToolRegistry};

pub use permissions::{Permission, PermissionError};

/// What went wrong with an agent operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AgentErrorKind {
    /// The tenant is suspended: nothing its agents do is allowed.
    Suspended,
    /// The registry does not know the tenant (never created, or deleted).
    UnknownTenant,
    /// The agent type is not among the tenant's allowed agent types.
    AgentTypeNotAllowed,
    /// The tenant already runs `max_agents` agents on this host.
    TooManyAgents,
    /// An agent with this id of this tenant is already registered here.
    AlreadyRegistered,
    /// The agent was shut down.
    Stopped,
    /// A permission or agent type text is invalid.
    Invalid,
    /// The resource belongs to another tenant.
    CrossTenant,
    /// No grant allows the action.
    Denied,
    /// The tool is not enabled for the tenant.
    ToolDisabled,
    /// No implementation of the tool is registered for the tenant.
    UnknownTool,
    /// The tool's rate limit for the tenant is reached.
    ToolRateLimited,
    /// The task used up its `max_tool_calls_per_task`.
    TooManyToolCalls,
    /// The tool ran and failed.
    ToolFailed,
    /// The bus refused or failed (publish, subscribe, request).
    Bus,
    /// The scheduler's shared state (the agent-slot bucket) could not be reached.
    SchedulerUnavailable,
    /// The server placed the connection in another NATS account than the one
    /// the registry names for the bundle's tenant (or refused it that tenant's
    /// subjects): the bundle's tenant label is not its own (see [`identity`]).
    WrongAccount,
    /// The server did not confirm which account the connection is in (no
    /// answer, or credentials not allowed to ask; see [`identity`]).
    IdentityUnverified,
    /// The host's audit queue is full or closed: an audited action (a tool
    /// call) is refused rather than done unrecorded.
    AuditUnavailable,
}

tenant_bus::kind_display!(AgentErrorKind {
    Suspended => "tenant is suspended",
    UnknownTenant => "tenant unknown to the registry",
    AgentTypeNotAllowed => "agent type not allowed for the tenant",
    TooManyAgents => "tenant's max_agents reached",
    AlreadyRegistered => "agent already registered",
    Stopped => "agent is stopped",
    Invalid => "invalid agent specification",
    CrossTenant => "resource belongs to another tenant",
    Denied => "permission denied",
    ToolDisabled => "tool not enabled for the tenant",
    UnknownTool => "tool not implemented",
    ToolRateLimited => "tool rate limit reached",
    TooManyToolCalls => "too many tool calls for this task",
    ToolFailed => "tool failed",
    Bus => "bus operation failed",
    SchedulerUnavailable => "scheduler state unavailable",
    WrongAccount => "the connection is not in the tenant's NATS account",
    IdentityUnverified => "the server did not confirm the connection's account",
    AuditUnavailable => "the audit queue did not take the event",
});

/// An agent error.
pub type AgentError = Error<AgentErrorKind>;

fn bus_err(e: impl std::error::Error + Send + Sync + 'static) -> AgentError {
    Error::with_source(AgentErrorKind::Bus, "", e)
}

/// Where an agent is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgentState {
    /// Handlers subscribed, operations allowed.
    Running,
    /// The tenant is suspended: handlers unsubscribed, operations refused.
    Suspended,
    /// Shut down for good.
    Stopped,
}

type AgentKey = (TenantId, AgentId);

struct HostShared {
    watcher: Arc<RegistryWatcher>,
    scheduler: Option<Arc<Scheduler>>,
    agents: Mutex<HashMap<AgentKey, Arc<AgentShared>>>,
    tools: Mutex<HashMap<TenantId, Arc<ToolRegistry>>>,
    /// One receive budget per tenant, shared by every namespace of that tenant
    /// this host connects; held weakly, so a tenant with no namespace left costs
    /// an entry only until the next budget is created.
    receive_budgets: Mutex<HashMap<TenantId, Weak<ByteBudget>>>,
    /// The limit of budgets created from now on.
    receive_bytes_per_tenant: AtomicU64,
    /// Where security decisions go (none: not recorded).
    audit: std::sync::OnceLock<Arc<AuditSink>>,
    /// Where tool calls are metered (none: not metered).
    meter: std::sync::OnceLock<UsageMeter>,
}

/// Default receive budget of one tenant on one host, across all its agents'
/// subscriptions: 64 MiB (see [`AgentHost::receive_bytes_per_tenant`]).
pub const DEFAULT_RECEIVE_BYTES_PER_TENANT: u64 = tenant_bus::budget::DEFAULT_RECEIVE_BYTES;

/// Runs agents on one runtime instance and applies registry changes to them.
pub struct AgentHost {
    shared: Arc<HostShared>,
    task: tokio::task::JoinHandle<()>,
    _follower: Option<RegistryFollower>,
}

impl std::fmt::Debug for AgentHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentHost")
            .field("agents", &self.len())
            .finish()
    }
}

impl Drop for AgentHost {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AgentHost {
    /// A host following `watcher`, without a scheduler (`max_agents` counted on
    /// this host only).
    pub fn new(watcher: Arc<RegistryWatcher>) -> Self {
        Self::build(watcher, None)
    }

    /// A host following `watcher` that feeds `scheduler` (see the module docs):
    /// agent slots on register, message admission for namespaces it connects,
    /// registry suspensions and quota changes.
    pub fn with_scheduler(watcher: Arc<RegistryWatcher>, scheduler: Arc<Scheduler>) -> Self {
        Self::build(watcher, Some(scheduler))
    }

    fn build(watcher: Arc<RegistryWatcher>, scheduler: Option<Arc<Scheduler>>) -> Self {
        let follower = scheduler.as_ref().map(|s| s.follow_registry(&watcher));
        let shared = Arc::new(HostShared {
            watcher: watcher.clone(),
            scheduler,
            agents: Mutex::new(HashMap::new()),
            tools: Mutex::new(HashMap::new()),
            receive_budgets: Mutex::new(HashMap::new()),
            receive_bytes_per_tenant: AtomicU64::new(DEFAULT_RECEIVE_BYTES_PER_TENANT),
            audit: std::sync::OnceLock::new(),
            meter: std::sync::OnceLock::new(),
        });
        let events = watcher.subscribe();
        let task = tokio::spawn(follow(Arc::downgrade(&shared), events));
        Self {
            shared,
            task,
            _follower: follower,
        }
    }

    /// Records this host's security decisions in the audit log through
    /// `sink` (a platform-account connection; see
    /// `agentbus_control::audit::sink`): permission denials (best effort: a
    /// denial stays a denial when the queue is full) and tool calls (the tool
    /// and the SHA-256 of its input; refused with
    /// [`AgentErrorKind::AuditUnavailable`] when the queue is full). Set it
    /// before starting agents; a second call is ignored.
    pub fn audit_sink(self, sink: Arc<AuditSink>) -> Self {
        let _ = self.shared.audit.set(sink);
        self
    }

    /// Meters this host's tool calls per tenant through `meter` (units
    /// `tools.calls` and `tool.<name>`, in the tenant's usage rows). Set it
    /// before starting agents; a second call is ignored.
    pub fn usage_meter(self, meter: UsageMeter) -> Self {
        let _ = self.shared.meter.set(meter);
        self
    }

    /// Sets the receive byte limit per tenant on this host (all subscriptions of
    /// all the tenant's namespaces this host connects, together) for budgets
    /// created from now on: set it before connecting agents. Default:
    /// [`DEFAULT_RECEIVE_BYTES_PER_TENANT`] (64 MiB). It must be at least the
    /// largest message a tenant's agent must receive (the server's
    /// `max_payload` plus subject and
    /// [`PER_MESSAGE_OVERHEAD`](tenant_bus::budget::PER_MESSAGE_OVERHEAD)).
    pub fn receive_bytes_per_tenant(self, limit: u64) -> Self {
        self.shared
            .receive_bytes_per_tenant
            .store(limit, Ordering::Relaxed);
        self
    }

    /// The receive budget of `tenant` on this host, shared by every namespace of
    /// the tenant that [`connect`](Self::connect) connects: the messages queued
    /// in all their subscriptions together hold at most its limit; past it,
    /// received messages are dropped (counted under
    /// [`DropReason::ReceiveBudget`](tenant_bus::DropReason::ReceiveBudget)).
    /// Created on first use; the same `Arc` while any namespace holds it.
    pub fn receive_budget(&self, tenant: &TenantId) -> Arc<ByteBudget> {
        let limit = self.shared.receive_bytes_per_tenant.load(Ordering::Relaxed);
        let Ok(mut map) = self.shared.receive_budgets.lock() else {
            return Arc::new(ByteBudget::new(limit));
        };
        if let Some(budget) = map.get(tenant).and_then(Weak::upgrade) {
            return budget;
        }
        // Forget tenants whose namespaces are all gone, so the map is bounded by
        // the tenants connected here.
        map.retain(|_, b| b.strong_count() > 0);
        let budget = Arc::new(ByteBudget::new(limit));
        map.insert(tenant.clone(), Arc::downgrade(&budget));
        budget
    }

    /// The scheduler this host feeds, if any.
    pub fn scheduler(&self) -> Option<&Arc<Scheduler>> {
        self.shared.scheduler.as_ref()
    }

    /// The scheduler of `tenant` (created from its registry record on first use),
    /// if this host has a scheduler.
    pub async fn tenant_scheduler(
        &self,
        tenant: &TenantId,
    ) -> Result<Option<Arc<TenantScheduler>>, AgentError> {
        let Some(scheduler) = &self.shared.scheduler else {
            return Ok(None);
        };
        let record = tenant_record(&self.shared.watcher, tenant).await?;
        scheduler
            .tenant(tenant, &record.quotas())
            .map(Some)
            .map_err(|e| Error::with_source(AgentErrorKind::Invalid, "tenant quotas", e))
    }

    /// Connects an agent's namespace from its bundle, with `options` plus the
    /// tenant's receive budget on this host ([`receive_budget`](Self::receive_budget),
    /// replacing any budget in `options`) and, if this host has a scheduler, the
    /// tenant's message admission: every publish, request and response of the
    /// agent then counts against the tenant's windows. Refused for an unknown or
    /// suspended tenant, and for a connection the server did not place in the
    /// account the registry names for the bundle's tenant
    /// ([`AgentErrorKind::WrongAccount`], [`AgentErrorKind::IdentityUnverified`];
    /// see [`identity`]): the namespace is closed before anything of the tenant
    /// was spent.
    pub async fn connect(
        &self,
        bundle: &CredentialBundle,
        options: NamespaceOptions,
    ) -> Result<TenantNamespace, AgentError> {
        let record = tenant_record(&self.shared.watcher, &bundle.tenant).await?;
        if record.status == Status::Suspended {
            return Err(Error::new(
                AgentErrorKind::Suspended,
                bundle.tenant.to_string(),
            ));
        }
        let options = match self.tenant_scheduler(&bundle.tenant).await? {
            Some(t) => t.namespace_options(options),
            None => options,
        }
        .receive_budget(self.receive_budget(&bundle.tenant));
        let ns = options.connect(bundle).await.map_err(bus_err)?;
        // Nothing was sent through the admission yet: the check comes first.
        if let Err(e) = identity::verify_account(&ns, &record).await {
            tracing::warn!(
                tenant = %bundle.tenant,
                agent = %bundle.agent,
                error = %e,
                "refused a connection outside the tenant's account"
            );
            let _ = ns.close().await;
            return Err(e);
        }
        Ok(ns)
    }

    /// Connects (see [`connect`](Self::connect)) and registers (see
    /// [`register`](Self::register)) in one step.
    pub async fn start<S: AsRef<str>>(
        &self,
        bundle: &CredentialBundle,
        options: NamespaceOptions,
        agent_type: &str,
        permissions: impl IntoIterator<Item = S>,
    ) -> Result<Agent, AgentError> {
        let ns = self.connect(bundle, options).await?;
        // `connect` just checked the connection's account.
        let agent = self
            .register_checked(ns, agent_type, permissions, AccountChecked::Yes)
            .await?;
        // Key rotations reach the agent without a restart: it asks the
        // controller's key service (its account's import) every
        // KEY_REFRESH_EVERY, and at a staged rotation's promotion time.
        if let Ok(account) = agentbus_control::keys::bundle_account(bundle) {
            let task = tokio::spawn(refresh_keys(
                agent.shared.ns.clone(),
                account,
                agent.shared.state.subscribe(),
                agent.shared.watcher.subscribe(),
            ));
            if let Ok(mut h) = agent.shared.handlers.lock() {
                h.push(task);
            }
        }
        Ok(agent)
    }

    /// The tool registry of `tenant` (created empty on first use).
    pub fn tools(&self, tenant: &TenantId) -> Arc<ToolRegistry> {
        let Ok(mut map) = self.shared.tools.lock() else {
            return Arc::new(ToolRegistry::new(tenant.clone()));
        };
        map.entry(tenant.clone())
            .or_insert_with(|| Arc::new(ToolRegistry::new(tenant.clone())))
            .clone()
    }

    /// Agents registered on this host.
    pub fn len(&self) -> usize {
        self.shared.agents.lock().map(|a| a.len()).unwrap_or(0)
    }

    /// Whether no agent is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Agents of `tenant` registered on this host.
    pub fn agents_of(&self, tenant: &TenantId) -> usize {
        self.shared
            .agents
            .lock()
            .map(|a| a.keys().filter(|(t, _)| t == tenant).count())
            .unwrap_or(0)
    }

    /// Registers the agent connected through `ns`, of `agent_type`, holding the
    /// `permissions` grants (`resource:action`). The tenant is `ns`'s, confirmed
    /// by the server: a connection outside the account the registry names for
    /// it is refused ([`AgentErrorKind::WrongAccount`],
    /// [`AgentErrorKind::IdentityUnverified`]; see [`identity`]) before a slot is
    /// taken.
    pub async fn register<S: AsRef<str>>(
        &self,
        ns: TenantNamespace,
        agent_type: &str,
        permissions: impl IntoIterator<Item = S>,
    ) -> Result<Agent, AgentError> {
        self.register_checked(ns, agent_type, permissions, AccountChecked::No)
            .await
    }

    async fn register_checked<S: AsRef<str>>(
        &self,
        ns: TenantNamespace,
        agent_type: &str,
        permissions: impl IntoIterator<Item = S>,
        checked: AccountChecked,
    ) -> Result<Agent, AgentError> {
        validate_slug(agent_type).map_err(|k| {
            Error::new(
                AgentErrorKind::Invalid,
                format!("agent type {agent_type:?}: {k}"),
            )
        })?;
        let tenant = ns.tenant().clone();
        let permissions = PermissionSet::parse(tenant.clone(), permissions)
            .map_err(|e| Error::with_source(AgentErrorKind::Invalid, "permissions", e))?;
        let record = tenant_record(&self.shared.watcher, &tenant).await?;
        if record.status == Status::Suspended {
            return Err(Error::new(AgentErrorKind::Suspended, tenant.to_string()));
        }
        if checked == AccountChecked::No {
            identity::verify_account(&ns, &record).await?;
        }
        if !record.allows_agent_type(agent_type) {
            return Err(Error::new(
                AgentErrorKind::AgentTypeNotAllowed,
                format!("{agent_type:?} for {tenant}"),
            ));
        }
        let quotas = record.quotas();
        let max_agents = quotas.max_agents;
        let tenant_scheduler = match &self.shared.scheduler {
            Some(s) => Some(
                s.tenant(&tenant, &quotas)
                    .map_err(|e| Error::with_source(AgentErrorKind::Invalid, "tenant quotas", e))?,
            ),
            None => None,
        };
        let (state_tx, _) = watch::channel(AgentState::Running);
        let shared = Arc::new(AgentShared {
            ns,
            agent_type: agent_type.to_string(),
            permissions,
            state: state_tx,
            handlers: Mutex::new(Vec::new()),
            tools: self.tools(&tenant),
            watcher: self.shared.watcher.clone(),
            host: Arc::downgrade(&self.shared),
            slot: Mutex::new(None),
        });
        let key = (tenant.clone(), shared.ns.agent().clone());
        {
            let mut agents = self
                .shared
                .agents
                .lock()
                .map_err(|_| Error::new(AgentErrorKind::Bus, "agent table poisoned"))?;
            if agents.contains_key(&key) {
                return Err(Error::new(
                    AgentErrorKind::AlreadyRegistered,
                    format!("{}/{}", key.0, key.1),
                ));
            }
            let count = agents.keys().filter(|(t, _)| *t == tenant).count() as u64;
            if count >= max_agents {
                return Err(Error::new(
                    AgentErrorKind::TooManyAgents,
                    format!("{tenant}: {max_agents}"),
                ));
            }
            agents.insert(key.clone(), shared.clone());
        }
        // The cluster-wide slot, taken with the key reserved here (so a second
        // registration of the same agent is refused before it takes a slot).
        if let Some(t) = tenant_scheduler {
            match t.acquire_agent_slot(&key.1).await {
                Ok(lease) => {
                    if let Ok(mut slot) = shared.slot.lock() {
                        *slot = Some(lease);
                    }
                }
                Err(e) => {
                    if let Ok(mut agents) = self.shared.agents.lock() {
                        agents.remove(&key);
                    }
                    return Err(slot_error(&tenant, max_agents, e));
                }
            }
        }
        // The suspension may have landed between the read above and the insert,
        // before the host could see this agent: re-read the cache once.
        if self.shared.watcher.status(&tenant) == Some(Status::Suspended) {
            shared.set_state(AgentState::Suspended);
        }
        Ok(Agent { shared })
    }
}

/// Whether a namespace's account was already checked against the registry (by
/// [`AgentHost::connect`], moments before).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AccountChecked {
    Yes,
    No,
}

/// How often a started agent asks the key service for its tenant's key set (the
/// controller's rotation grace, 30 s by default, must be longer).
pub const KEY_REFRESH_EVERY: Duration = Duration::from_secs(10);

/// Keeps `ns`'s key set current until the agent stops: at once when the
/// registry shows a change of the tenant's record (a rotation is seen in well
/// under a second), at a staged rotation's promotion time, and every
/// [`KEY_REFRESH_EVERY`] regardless.
async fn refresh_keys(
    ns: TenantNamespace,
    account: String,
    mut state: watch::Receiver<AgentState>,
    mut events: broadcast::Receiver<RegistryEvent>,
) {
    let mut watching = true;
    loop {
        let wait = agentbus_control::keys::refresh_once(&ns, &account, KEY_REFRESH_EVERY).await;
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                _ = state.wait_for(|s| *s == AgentState::Stopped) => return,
                event = events.recv(), if watching => match event {
                    Ok(e) if e.tenant() == ns.tenant() => break,
                    Ok(_) => {}
                    // Missed events: refresh to be sure.
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    // The watcher is gone: only the timer and the agent's stop remain.
                    Err(broadcast::error::RecvError::Closed) => watching = false,
                },
            }
        }
    }
}

/// The agent error of a refused or failed slot acquisition.
fn slot_error(tenant: &TenantId, max_agents: u64, e: SchedulerError) -> AgentError {
    match e.kind() {
        SchedulerErrorKind::Rejected(r) if r.reason == RejectReason::Suspended => {
            Error::with_source(AgentErrorKind::Suspended, tenant.to_string(), e)
        }
        SchedulerErrorKind::Rejected(_) => Error::with_source(
            AgentErrorKind::TooManyAgents,
            format!("{tenant}: {max_agents}, cluster-wide"),
            e,
        ),
        _ => Error::with_source(AgentErrorKind::SchedulerUnavailable, tenant.to_string(), e),
    }
}

async fn tenant_record(
    watcher: &RegistryWatcher,
    tenant: &TenantId,
) -> Result<TenantRecord, AgentError> {
    watcher.lookup(tenant).await.map_err(|e| {
        if e.kind() == crate::registry::RegistryErrorKind::NotFound {
            Error::new(AgentErrorKind::UnknownTenant, tenant.to_string())
        } else {
            Error::with_source(AgentErrorKind::UnknownTenant, tenant.to_string(), e)
        }
    })
}

/// Applies registry events to the host's agents until the host is dropped.
async fn follow(host: std::sync::Weak<HostShared>, mut events: broadcast::Receiver<RegistryEvent>) {
    loop {
        let event = events.recv().await;
        let Some(host) = host.upgrade() else { return };
        let agents: Vec<Arc<AgentShared>> = match host.agents.lock() {
            Ok(a) => a.values().cloned().collect(),
            Err(_) => return,
        };
        match event {
            Ok(event) => {
                let tenant = event.tenant().clone();
                let next = match &event {
                    RegistryEvent::Changed(r) if r.status == Status::Active => AgentState::Running,
                    _ => AgentState::Suspended,
                };
                for a in agents.iter().filter(|a| a.ns.tenant() == &tenant) {
                    a.set_state(next);
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // Missed events: re-derive every agent's state from the cache.
                for a in &agents {
                    let next = match host.watcher.status(a.ns.tenant()) {
                        Some(Status::Active) => AgentState::Running,
                        _ => AgentState::Suspended,
                    };
                    a.set_state(next);
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

struct AgentShared {
    ns: TenantNamespace,
    agent_type: String,
    permissions: PermissionSet,
    state: watch::Sender<AgentState>,
    handlers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    tools: Arc<ToolRegistry>,
    watcher: Arc<RegistryWatcher>,
    host: std::sync::Weak<HostShared>,
    /// The agent slot held while registered (with a scheduler).
    slot: Mutex<Option<AgentLease>>,
}

impl AgentShared {
    /// Moves between Running and Suspended; Stopped is final.
    fn set_state(&self, next: AgentState) {
        self.state.send_if_modified(|s| {
            if *s == AgentState::Stopped || *s == next {
                false
            } else {
                *s = next;
                true
            }
        });
    }
}

/// A registered agent. Cheap to clone; every clone is the same agent.
#[derive(Clone)]
pub struct Agent {
    shared: Arc<AgentShared>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("tenant", self.tenant())
            .field("id", self.id())
            .field("type", &self.shared.agent_type)
            .field("state", &self.state())
            .finish()
    }
}

impl Agent {
    /// The agent's id.
    pub fn id(&self) -> &AgentId {
        self.shared.ns.agent()
    }

    /// The agent's tenant.
    pub fn tenant(&self) -> &TenantId {
        self.shared.ns.tenant()
    }

    /// The agent's type.
    pub fn agent_type(&self) -> &str {
        &self.shared.agent_type
    }

    /// The agent's grants.
    pub fn permissions(&self) -> &PermissionSet {
        &self.shared.permissions
    }

    /// The agent's current state.
    pub fn state(&self) -> AgentState {
        *self.shared.state.borrow()
    }

    /// A receiver of state changes.
    pub fn state_changes(&self) -> watch::Receiver<AgentState> {
        self.shared.state.subscribe()
    }

    /// Whether the agent holds a scheduler agent slot (hosts with a scheduler).
    pub fn holds_slot(&self) -> bool {
        self.shared
            .slot
            .lock()
            .map(|s| s.is_some())
            .unwrap_or(false)
    }

    /// Whether the agent's cluster-wide slot lease was lost (its heartbeats could
    /// not refresh it before the TTL): another agent may hold the slot now.
    pub fn slot_lost(&self) -> bool {
        self.shared
            .slot
            .lock()
            .map(|s| s.as_ref().is_some_and(AgentLease::is_lost))
            .unwrap_or(false)
    }

    /// Refuses unless the agent is running and its tenant is known and active
    /// (read from the registry cache now, not only from the last event).
    pub fn ensure_active(&self) -> Result<(), AgentError> {
        if self.state() == AgentState::Stopped {
            return Err(Error::new(AgentErrorKind::Stopped, self.id().to_string()));
        }
        match self.shared.watcher.status(self.tenant()) {
            Some(Status::Active) if self.state() == AgentState::Running => Ok(()),
            // Cached active but the host has not resumed the agent yet.
            Some(Status::Active) => Err(Error::new(
                AgentErrorKind::Suspended,
                self.tenant().to_string(),
            )),
            Some(Status::Suspended) => Err(Error::new(
                AgentErrorKind::Suspended,
                self.tenant().to_string(),
            )),
            // Uncached (past the cache bound) or removed: trust the host's state,
            // which every registry event updates.
            None if self.state() == AgentState::Running => Ok(()),
            None => Err(Error::new(
                AgentErrorKind::Suspended,
                self.tenant().to_string(),
            )),
        }
    }

    /// Checks that the agent may do `action` on `resource` (which must be its own
    /// tenant's).
    pub fn authorize(&self, resource: &Resource, action: &str) -> Result<(), AgentError> {
        self.ensure_active()?;
        self.shared
            .permissions
            .check(resource, action)
            .map_err(|e| {
                let kind = match e.kind() {
                    PermissionErrorKind::CrossTenant => AgentErrorKind::CrossTenant,
                    PermissionErrorKind::Invalid => AgentErrorKind::Invalid,
                    _ => AgentErrorKind::Denied,
                };
                // Recorded if the queue takes it; refused either way.
                let _ = self.audit(
                    "runtime.permission_denied",
                    format!("{resource}"),
                    Outcome::Denied,
                    format!("{action}: {e}"),
                );
                Error::with_source(kind, "", e)
            })
    }

    /// Queues a security event for the host's audit sink (`Ok` without one).
    fn audit(
        &self,
        action: &str,
        resource: String,
        outcome: Outcome,
        reason: String,
    ) -> Result<(), AgentError> {
        let Some(sink) = self
            .shared
            .host
            .upgrade()
            .and_then(|h| h.audit.get().cloned())
        else {
            return Ok(());
        };
        sink.try_record(RuntimeEvent {
            tenant: self.tenant().to_string(),
            agent: self.id().to_string(),
            action: action.to_string(),
            resource,
            outcome,
            reason,
            request_id: String::new(),
        })
        .map_err(|e| Error::with_source(AgentErrorKind::AuditUnavailable, action.to_string(), e))
    }

    /// A resource of `kind` in the agent's own tenant.
    pub fn resource(&self, kind: &str) -> Resource {
        Resource::new(self.tenant(), kind)
    }

    /// The agent's namespace (its connection, keys and counters).
    pub fn namespace(&self) -> &TenantNamespace {
        &self.shared.ns
    }

    /// Publishes on the agent's namespace.
    pub async fn publish(
        &self,
        subject: impl IntoSubject,
        payload: impl AsRef<[u8]>,
    ) -> Result<MessageId, AgentError> {
        self.ensure_active()?;
        self.shared
            .ns
            .publish(subject, payload)
            .await
            .map_err(bus_err)
    }

    /// Sends a request on the agent's namespace and waits for the response.
    pub async fn request(
        &self,
        subject: impl IntoSubject,
        payload: impl AsRef<[u8]>,
    ) -> Result<TenantMessage, AgentError> {
        self.ensure_active()?;
        self.shared
            .ns
            .request(subject, payload)
            .await
            .map_err(bus_err)
    }

    /// Responds to a verified request.
    pub async fn respond(
        &self,
        to: &TenantMessage,
        payload: impl AsRef<[u8]>,
    ) -> Result<MessageId, AgentError> {
        self.ensure_active()?;
        self.shared.ns.respond(to, payload).await.map_err(bus_err)
    }

    /// A tool-call budget for one task: the tenant's `max_tool_calls_per_task`.
    pub async fn task_budget(&self) -> Result<ToolBudget, AgentError> {
        self.ensure_active()?;
        let record = tenant_record(&self.shared.watcher, self.tenant()).await?;
        Ok(ToolBudget::new(record.quotas().max_tool_calls_per_task))
    }

    /// Calls the tool `name` for the task owning `budget` (see [`tools`] for the
    /// order of checks).
    pub async fn call_tool(
        &self,
        budget: &ToolBudget,
        name: &str,
        input: impl Into<Bytes>,
    ) -> Result<Bytes, AgentError> {
        self.authorize(&self.resource("tool").named(name), name)?;
        let record = tenant_record(&self.shared.watcher, self.tenant()).await?;
        let settings = record
            .settings
            .tools
            .get(name)
            .copied()
            .filter(|s| s.enabled)
            .ok_or_else(|| Error::new(AgentErrorKind::ToolDisabled, name.to_string()))?;
        let tool = self
            .shared
            .tools
            .implementation(name)
            .map_err(|_| Error::new(AgentErrorKind::UnknownTool, name.to_string()))?;
        if !budget.take() {
            return Err(Error::new(
                AgentErrorKind::TooManyToolCalls,
                format!("{} of {}", budget.used(), budget.max()),
            ));
        }
        if let Some(limit) = settings.rate_limit {
            self.shared
                .tools
                .take_rate(name, limit, tenant_bus::envelope::now_ms())
                .map_err(|r| match r {
                    ToolRefusal::RateLimited => {
                        Error::new(AgentErrorKind::ToolRateLimited, name.to_string())
                    }
                    ToolRefusal::Unknown => {
                        Error::new(AgentErrorKind::UnknownTool, name.to_string())
                    }
                })?;
        }
        let input: Bytes = input.into();
        // Recorded before it runs, or not run at all.
        let digest = ring::digest::digest(&ring::digest::SHA256, &input);
        self.audit(
            "runtime.tool_call",
            format!("tool/{name}"),
            Outcome::Allowed,
            format!(
                "input sha256={}",
                data_encoding::HEXLOWER.encode(digest.as_ref())
            ),
        )?;
        if let Some(meter) = self
            .shared
            .host
            .upgrade()
            .and_then(|h| h.meter.get().cloned())
        {
            let tenant = self.tenant().as_str();
            meter.add(tenant, "tools.calls", 1);
            meter.add(tenant, &format!("tool.{name}"), 1);
        }
        tool.call(input)
            .await
            .map_err(|e| Error::new(AgentErrorKind::ToolFailed, format!("{name}: {e}")))
    }

    /// Runs `handler` for every verified message on `pattern` while the agent is
    /// running: the loop unsubscribes while the tenant is suspended, subscribes
    /// again on activation, and ends on shutdown. One message at a time.
    pub async fn handle<P, F, Fut>(&self, pattern: P, handler: F) -> Result<(), AgentError>
    where
        P: IntoPattern,
        F: Fn(Agent, TenantMessage) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.ensure_active()?;
        let pattern = pattern
            .into_pattern()
            .map_err(|e| Error::with_source(AgentErrorKind::Bus, "pattern", e))?;
        // Subscribe now, so the handler is live when this returns.
        let first = self.shared.ns.subscribe(&pattern).await.map_err(bus_err)?;
        let agent = self.clone();
        let task = tokio::spawn(async move {
            let mut sub = Some(first);
            let mut states = agent.shared.state.subscribe();
            loop {
                // Wait to be running (suspended: no subscription held).
                loop {
                    let s = *states.borrow_and_update();
                    match s {
                        AgentState::Running => break,
                        AgentState::Stopped => return,
                        AgentState::Suspended => {
                            sub = None;
                            if states.changed().await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let mut current = match sub.take() {
                    Some(s) => s,
                    None => match agent.shared.ns.subscribe(&pattern).await {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!(agent = %agent.id(), error = %e, "re-subscribing");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                    },
                };
                loop {
                    tokio::select! {
                        biased;
                        changed = states.changed() => {
                            if changed.is_err() { return; }
                            if *states.borrow() != AgentState::Running { break; }
                        }
                        msg = current.next() => match msg {
                            Some(m) => {
                                if agent.ensure_active().is_ok() {
                                    handler(agent.clone(), m).await;
                                }
                            }
                            // The connection closed for good.
                            None => return,
                        },
                    }
                }
                // Dropping the subscription unsubscribes at the server.
                drop(current);
            }
        });
        if let Ok(mut h) = self.shared.handlers.lock() {
            h.retain(|t| !t.is_finished());
            h.push(task);
        }
        Ok(())
    }

    /// Stops the agent: handlers stop taking messages and finish the one in hand
    /// (aborted after `timeout`), then the agent is deregistered from its host and
    /// its scheduler agent slot, if any, released.
    pub async fn shutdown(&self, timeout: Duration) {
        self.shared.state.send_replace(AgentState::Stopped);
        let handlers: Vec<_> = self
            .shared
            .handlers
            .lock()
            .map(|mut h| h.drain(..).collect())
            .unwrap_or_default();
        let deadline = tokio::time::Instant::now() + timeout;
        for mut h in handlers {
            if tokio::time::timeout_at(deadline, &mut h).await.is_err() {
                h.abort();
            }
        }
        if let Some(host) = self.shared.host.upgrade() {
            if let Ok(mut agents) = host.agents.lock() {
                agents.remove(&(self.tenant().clone(), self.id().clone()));
            }
        }
        let lease = self.shared.slot.lock().ok().and_then(|mut s| s.take());
        if let Some(lease) = lease {
            if let Err(e) = lease.release().await {
                // The key expires after the lease TTL.
                tracing::warn!(tenant = %self.tenant(), agent = %self.id(), error = %e, "agent slot not released");
            }
        }
    }
}
