//! Agents: registration against the tenant registry, handlers on the agent's
//! [`TenantNamespace`], permissions, tools, suspension, drain and deregistration.
//!
//! An [`AgentHost`] runs on every runtime instance beside a [`RegistryWatcher`].
//! [`AgentHost::register`] admits an agent only if its tenant is known and active,
//! its type is among the tenant's `allowed_agent_types`, and the tenant has fewer
//! than `max_agents` agents on this host (cluster-wide agent slots are the
//! scheduler's `AgentSlots`). The host follows the registry's change events: when a
//! tenant is suspended, every running agent of it stops (its handler loops drop
//! their subscriptions) and every operation of it is refused with
//! [`AgentErrorKind::Suspended`]; on activation the handlers subscribe again.
//!
//! Every operation of an [`Agent`] — publish, request, respond, permission check,
//! tool call, new handler — first checks the tenant's current status in the
//! watcher's cache (not only the host's last event), so there is no window after a
//! suspension is seen in which an operation slips through.
//!
//! Handlers run one message at a time per subscription; [`Agent::shutdown`] stops
//! accepting messages, lets each handler finish the message it is on (up to the
//! timeout), then deregisters the agent.
//!
//! - [`permissions`]: `resource:action` grants, evaluated only inside the tenant.
//! - [`tools`]: per-tenant tool implementations, rate limits, per-task budgets.

pub mod permissions;
pub mod tools;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use tenant_bus::error::Error;
use tenant_bus::ids::validate_slug;
use tenant_bus::subject::{IntoPattern, IntoSubject};
use tenant_bus::{AgentId, MessageId, TenantId, TenantMessage, TenantNamespace};
use tokio::sync::{broadcast, watch};

use crate::registry::{RegistryEvent, RegistryWatcher, Status, TenantRecord};
use permissions::{PermissionErrorKind, PermissionSet, Resource};
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
    agents: Mutex<HashMap<AgentKey, Arc<AgentShared>>>,
    tools: Mutex<HashMap<TenantId, Arc<ToolRegistry>>>,
}

/// Runs agents on one runtime instance and applies registry changes to them.
pub struct AgentHost {
    shared: Arc<HostShared>,
    task: tokio::task::JoinHandle<()>,
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
    /// A host following `watcher`.
    pub fn new(watcher: Arc<RegistryWatcher>) -> Self {
        let shared = Arc::new(HostShared {
            watcher: watcher.clone(),
            agents: Mutex::new(HashMap::new()),
            tools: Mutex::new(HashMap::new()),
        });
        let events = watcher.subscribe();
        let task = tokio::spawn(follow(Arc::downgrade(&shared), events));
        Self { shared, task }
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
    /// `permissions` grants (`resource:action`).
    pub async fn register<S: AsRef<str>>(
        &self,
        ns: TenantNamespace,
        agent_type: &str,
        permissions: impl IntoIterator<Item = S>,
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
        if !record.allows_agent_type(agent_type) {
            return Err(Error::new(
                AgentErrorKind::AgentTypeNotAllowed,
                format!("{agent_type:?} for {tenant}"),
            ));
        }
        let max_agents = record.quotas().max_agents;
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
            agents.insert(key, shared.clone());
        }
        // The suspension may have landed between the read above and the insert,
        // before the host could see this agent: re-read the cache once.
        if self.shared.watcher.status(&tenant) == Some(Status::Suspended) {
            shared.set_state(AgentState::Suspended);
        }
        Ok(Agent { shared })
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
                Error::with_source(kind, "", e)
            })
    }

    /// A resource of `kind` in the agent's own tenant.
    pub fn resource(&self, kind: &str) -> Resource {
        Resource::new(self.tenant(), kind)
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
        tool.call(input.into())
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
    /// (aborted after `timeout`), then the agent is deregistered from its host.
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
    }
}
