//! The controller: a stateless NATS service (the micro-services API of
//! async-nats) in the platform account that owns every control-plane change.
//!
//! Any number of instances serve in one queue group; each keeps no state of its
//! own beyond caches it can rebuild: facts live in KV ([`crate::store`]), secrets
//! there sealed under the KEK. A mutation is compare-and-set on its record, and
//! carries a request id so a retried request is recognised.
//!
//! # Order of writes, and repair
//! Every change writes its KV record first and pushes the account JWT second. A
//! crash (or a server outage) between the two leaves KV ahead of the server; the
//! reconcile pass ([`Controller::reconcile`], at start and every
//! [`ControllerConfig::reconcile_every`]) re-signs and pushes every tenant's
//! account from its record, finishes interrupted deletes, and deletes accounts
//! the server holds that no record names. The record is the truth; the server
//! converges to it.
//!
//! # Layout
//! - [`auth`]: request signatures and roles.
//! - [`callout`]: the NATS auth callout (logins by API key).
//! - [`police`]: rate caps enforced from the servers' counters.
//! - `placement`: streams kept with fewer replicas than the deployment's are
//!   raised, and those of a region-bound tenant found outside its region are
//!   moved into it (policed every `placement_every`).
//! - [`claims`]: pushing, listing and deleting accounts on the server.
//! - [`handlers`]: the operations; `apikeys`: API key operations.

mod apikeys;
mod audit_api;
pub mod auth;
mod budgets;
pub mod callout;
pub mod claims;
pub mod handlers;
mod jetstream;
mod ping;
mod placement;
pub mod police;
mod stats;
mod usage_poll;

use std::sync::Arc;
use std::time::Duration;

use async_nats::service::ServiceExt as _;
use futures::StreamExt as _;
use nkeys::KeyPair;
use tokio::sync::Semaphore;

use crate::api::{self, ApiError, ErrorCode};
use crate::error::{ControlError, ControlErrorKind};
use crate::install::{Bootstrap, Installation};
use crate::kek::Kek;
use crate::store::{secret_name, Store};
use tenant_bus::error::Error;

/// How long a stopping controller answers requests already delivered to it.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

/// How long [`Controller::connect`] waits for JetStream to accept the buckets.
pub const STORE_OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// How a controller instance runs.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    urls: String,
    replicas: usize,
    rotation_grace: Duration,
    reconcile_every: Duration,
    max_in_flight: usize,
    fault: Option<String>,
    audit: crate::audit::AuditConfig,
    platform_jwt: Option<Arc<crate::identity::platform_jwt::JwksVerifier>>,
    usage_every: Duration,
    police_every: Duration,
    placement_every: Duration,
}

impl ControllerConfig {
    /// Serving the servers at `urls` (comma-separated), replicas 1, defaults.
    pub fn new(urls: impl Into<String>) -> Self {
        Self {
            urls: urls.into(),
            replicas: 1,
            rotation_grace: Duration::from_secs(30),
            reconcile_every: Duration::from_secs(60),
            max_in_flight: 64,
            fault: std::env::var("AGENTBUS_FAULT").ok(),
            audit: crate::audit::AuditConfig::default(),
            platform_jwt: None,
            usage_every: Duration::from_secs(10),
            police_every: Duration::from_secs(1),
            placement_every: Duration::from_secs(30),
        }
    }

    /// How often the servers' counters are read for policing (default 1 s;
    /// see `controller::police`): a flood is cut within two of these.
    pub fn police_every(mut self, every: Duration) -> Self {
        self.police_every = every.max(Duration::from_millis(100));
        self
    }

    /// How often every stream's replicas and placement are checked: one
    /// kept with fewer replicas than the deployment's is raised, one of a
    /// region-bound tenant found outside its region is moved into it
    /// (default 30 s; see `controller::placement`).
    pub fn placement_every(mut self, every: Duration) -> Self {
        self.placement_every = every.max(Duration::from_millis(100));
        self
    }

    /// How often usage is collected from the servers' counters (default 10 s;
    /// the servers' own statistics cadence). See [`crate::usage`].
    pub fn usage_every(mut self, every: Duration) -> Self {
        self.usage_every = every.max(Duration::from_millis(100));
        self
    }

    /// Accept logins by the platform identity provider's JWTs (as the NATS
    /// token), verified with `verifier`. Default: none (API keys only).
    pub fn platform_jwt(mut self, verifier: crate::identity::platform_jwt::JwksVerifier) -> Self {
        self.platform_jwt = Some(Arc::new(verifier));
        self
    }

    /// Replicas of the buckets it creates, held to
    /// [`tenant_bus::region::REPLICAS`] (1 to 5; the CLI refuses other counts
    /// before it gets here).
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas.clamp(
            *tenant_bus::region::REPLICAS.start(),
            *tenant_bus::region::REPLICAS.end(),
        );
        self
    }

    /// How long after a key rotation agents start sealing with the new version
    /// (they accept it at once). Default 30 s: at least twice the agents' key
    /// refresh interval.
    pub fn rotation_grace(mut self, grace: Duration) -> Self {
        self.rotation_grace = grace;
        self
    }

    /// How often the reconcile pass runs. Default 60 s.
    pub fn reconcile_every(mut self, every: Duration) -> Self {
        self.reconcile_every = every;
        self
    }

    /// Requests handled at once by this instance. Default 64.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// When audit checkpoints are signed and how long an append may wait.
    pub fn audit(mut self, audit: crate::audit::AuditConfig) -> Self {
        self.audit = audit;
        self
    }

    /// Test hook: `exit-after-kv-write` makes the process exit between a
    /// tenant's KV record and its claim push (the crash the reconcile repairs).
    /// Also read from `AGENTBUS_FAULT`.
    pub fn fault(mut self, fault: Option<String>) -> Self {
        self.fault = fault;
        self
    }
}

/// What a controller needs: its connections, the buckets and the keys it signs with.
pub struct Controller {
    pub(crate) store: Store,
    pub(crate) client: async_nats::Client,
    pub(crate) sys: async_nats::Client,
    pub(crate) kek: Arc<Kek>,
    pub(crate) operator: Arc<KeyPair>,
    pub(crate) platform_signing: Arc<KeyPair>,
    pub(crate) platform_account: String,
    pub(crate) system_account: String,
    /// The auth account (empty before the callout): never an orphan.
    pub(crate) auth_account: String,
    pub(crate) urls: String,
    pub(crate) config: ControllerConfig,
    pub(crate) id: String,
    pub(crate) locks: handlers::Stripes,
    pub(crate) platform_iat: std::sync::Mutex<i64>,
    /// Held around a JetStream reservation check and the write it allows.
    pub(crate) js_reservations: tokio::sync::Mutex<()>,
    /// The servers' JetStream limits, when last asked (see `jetstream`).
    pub(crate) js_limits: std::sync::Mutex<Option<(std::time::Instant, Vec<api::ServerJetStream>)>>,
    /// How many servers answered the last JSZ ping.
    pub(crate) js_servers_seen: std::sync::atomic::AtomicUsize,
    pub(crate) audit: Arc<crate::audit::AuditLog>,
    /// The pepper of API key hashes.
    pub(crate) pepper: Vec<u8>,
    /// The auth callout (installations with an auth account).
    pub(crate) callout: Option<Arc<callout::CalloutState>>,
    /// What policing remembers between polls.
    pub(crate) police_memory: police::Memory,
    /// How many servers answered the last statistics poll.
    pub(crate) servers_answering: std::sync::atomic::AtomicUsize,
    /// Cursors of the usage metrics.
    pub(crate) metric_cursors: std::sync::Mutex<usage_poll::MetricCursors>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").field("id", &self.id).finish()
    }
}

fn cerr(kind: ControlErrorKind, detail: impl Into<std::borrow::Cow<'static, str>>) -> ControlError {
    Error::new(kind, detail)
}

fn from_api(e: ApiError) -> ControlError {
    let kind = match e.code {
        ErrorCode::Unavailable => ControlErrorKind::Connect,
        _ => ControlErrorKind::InvalidState,
    };
    cerr(kind, e.message)
}

/// Connects to `urls` with `creds`, naming the connection.
pub async fn connect(
    urls: &str,
    creds: &str,
    name: &str,
) -> Result<async_nats::Client, ControlError> {
    let addrs = crate::parse_urls(urls)?;
    async_nats::ConnectOptions::with_credentials(creds)
        .map_err(|e| {
            Error::with_source(
                ControlErrorKind::InvalidState,
                format!("{name} credentials"),
                e,
            )
        })?
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        .connect(addrs)
        .await
        .map_err(|e| Error::with_source(ControlErrorKind::Connect, urls.to_string(), e))
}

fn seed_key(bytes: Vec<u8>, name: &str) -> Result<KeyPair, ControlError> {
    let text = String::from_utf8(bytes).map_err(|_| {
        cerr(
            ControlErrorKind::InvalidState,
            format!("secret {name} is not text"),
        )
    })?;
    KeyPair::from_seed(text.trim()).map_err(|e| {
        Error::with_source(ControlErrorKind::InvalidState, format!("secret {name}"), e)
    })
}

impl Controller {
    /// Connects as the installation's controller and system users, opens the
    /// buckets, stores the bootstrap secrets if this is the first start, and loads
    /// the signing keys. Does not serve yet ([`Controller::serve`]).
    pub async fn connect(
        install: &Installation,
        config: ControllerConfig,
    ) -> Result<Arc<Self>, ControlError> {
        let kek = Arc::new(install.kek()?);
        let client = connect(
            &config.urls,
            &install.creds("controller.creds")?,
            "agentbus-controller",
        )
        .await?;
        let sys = connect(
            &config.urls,
            &install.creds("sys.creds")?,
            "agentbus-controller-sys",
        )
        .await?;
        // JetStream may still be electing its leaders (a cluster just started, a
        // node restarting): retry for a bounded time before giving up.
        let deadline = tokio::time::Instant::now() + STORE_OPEN_TIMEOUT;
        let store = loop {
            match Store::open(client.clone(), config.replicas).await {
                Ok(store) => break store,
                Err(e)
                    if e.code == ErrorCode::Unavailable
                        && tokio::time::Instant::now() < deadline =>
                {
                    tracing::info!(error = %e, "JetStream not ready; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(from_api(e)),
            }
        };
        let bootstrap_path = install.path("bootstrap.sealed");
        if bootstrap_path.is_file() {
            let sealed = std::fs::read(&bootstrap_path)
                .map_err(|e| crate::error::io_err("reading", &bootstrap_path, e))?;
            let plain = kek.open("bootstrap", &sealed)?;
            let boot: Bootstrap = serde_json::from_slice(&plain)
                .map_err(|e| Error::with_source(ControlErrorKind::InvalidState, "bootstrap", e))?;
            for (name, seed) in &boot.secrets {
                store
                    .put_secret_if_absent(&kek, name, seed.as_bytes())
                    .await
                    .map_err(from_api)?;
            }
            store.create_admin(&boot.admin).await.map_err(from_api)?;
            // Stored in NATS: the local copy goes.
            std::fs::remove_file(&bootstrap_path)
                .map_err(|e| crate::error::io_err("removing", &bootstrap_path, e))?;
        }
        let load = |name: &'static str| {
            let store = store.clone();
            let kek = kek.clone();
            async move {
                let bytes = store.secret(&kek, name).await.map_err(from_api)?.ok_or_else(|| {
                    cerr(
                        ControlErrorKind::NotInitialized,
                        format!("secret {name} is not in the secrets bucket (was the first controller started with bootstrap.sealed?)"),
                    )
                })?;
                seed_key(bytes, name)
            }
        };
        let operator = load(secret_name::OPERATOR).await?;
        let platform_signing = load(secret_name::PLATFORM_SIGNING).await?;
        if operator.public_key() != install.facts().operator {
            return Err(cerr(
                ControlErrorKind::InvalidState,
                "the operator seed in NATS does not match install.json (another installation's KEK or server?)",
            ));
        }
        // The API key pepper: the first controller makes it, everyone reads it.
        let mut fresh = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut fresh)
            .map_err(|_| cerr(ControlErrorKind::Crypto, "the OS random source failed"))?;
        let fresh = data_encoding::HEXLOWER.encode(&fresh);
        store
            .put_secret_if_absent(&kek, secret_name::APIKEY_PEPPER, fresh.as_bytes())
            .await
            .map_err(from_api)?;
        let pepper = store
            .secret(&kek, secret_name::APIKEY_PEPPER)
            .await
            .map_err(from_api)?
            .ok_or_else(|| cerr(ControlErrorKind::NotInitialized, "the API key pepper"))?;
        let callout = callout::open(install, &config.urls, &store, &kek).await?;
        let id = format!("{:016x}", rand_u64());
        // The AUDIT stream: the same bounded wait as the buckets.
        let audit = loop {
            match crate::audit::AuditLog::open(
                &store,
                &kek,
                config.replicas,
                &install.facts().platform_account,
                &id,
                config.audit.clone(),
            )
            .await
            {
                Ok(audit) => break audit,
                Err(e)
                    if e.code == ErrorCode::Unavailable
                        && tokio::time::Instant::now() < deadline =>
                {
                    tracing::info!(error = %e, "JetStream not ready for the audit log; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(from_api(e)),
            }
        };
        Ok(Arc::new(Self {
            store,
            client,
            sys,
            kek,
            operator: Arc::new(operator),
            platform_signing: Arc::new(platform_signing),
            platform_account: install.facts().platform_account.clone(),
            system_account: install.facts().system_account.clone(),
            auth_account: install.facts().auth_account.clone(),
            urls: install.url_list(),
            config,
            id,
            locks: handlers::Stripes::new(),
            platform_iat: std::sync::Mutex::new(install.facts().created_at),
            js_reservations: tokio::sync::Mutex::new(()),
            js_limits: std::sync::Mutex::new(None),
            js_servers_seen: std::sync::atomic::AtomicUsize::new(0),
            audit: Arc::new(audit),
            pepper,
            callout,
            police_memory: Default::default(),
            servers_answering: Default::default(),
            metric_cursors: Default::default(),
        }))
    }

    /// The buckets.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The auth callout's counters (`None` without an auth account).
    pub fn callout_counters(&self) -> Option<&callout::CalloutCounters> {
        self.callout.as_ref().map(|c| c.counters())
    }

    /// The audit log this instance appends to and checkpoints.
    pub fn audit(&self) -> &Arc<crate::audit::AuditLog> {
        &self.audit
    }

    /// Reconciles, then serves until the connection closes or `shutdown` fires;
    /// reconciles again every [`ControllerConfig::reconcile_every`].
    pub async fn serve(self: Arc<Self>, shutdown: shutdown::Shutdown) -> Result<(), ControlError> {
        if let Err(e) = self.reconcile().await {
            tracing::warn!(error = %e, "reconcile at start failed; retrying on schedule");
        }
        let service = self
            .client
            .service_builder()
            .description("agentbus control plane")
            .queue_group(api::QUEUE_GROUP)
            .start(api::SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await
            .map_err(|e| {
                Error::with_source(ControlErrorKind::Connect, "starting the service", e)
            })?;
        let mut endpoints = Vec::new();
        for (name, subject) in [
            ("status", format!("{}.status", api::ADMIN_PREFIX)),
            ("tenants", format!("{}.tenants.*", api::ADMIN_PREFIX)),
            ("tenant", format!("{}.tenant.*.*", api::ADMIN_PREFIX)),
            ("agent", format!("{}.agent.*.*", api::ADMIN_PREFIX)),
            ("apikey", format!("{}.apikey.*.*", api::ADMIN_PREFIX)),
            ("usage", format!("{}.usage.*.*", api::ADMIN_PREFIX)),
            ("budget", format!("{}.budget.*.*", api::ADMIN_PREFIX)),
            ("admins", format!("{}.admins.*", api::ADMIN_PREFIX)),
            ("audit", format!("{}.audit.*.*", api::ADMIN_PREFIX)),
            ("keys", format!("{}.*", api::KEYS_PREFIX)),
            ("usage-report", format!("{}.*", api::USAGE_REPORT_PREFIX)),
            ("audit-append", api::AUDIT_APPEND_SUBJECT.to_string()),
            ("runtime-usage", api::RUNTIME_USAGE_SUBJECT.to_string()),
        ] {
            let endpoint = service
                .endpoint_builder()
                .name(name)
                .add(subject)
                .await
                .map_err(|e| {
                    Error::with_source(ControlErrorKind::Connect, "adding an endpoint", e)
                })?;
            endpoints.push(endpoint);
        }
        tokio::spawn(self.audit.clone().run(shutdown.clone()));
        tokio::spawn(self.clone().run_usage(shutdown.clone()));
        tokio::spawn(self.clone().run_placement(shutdown.clone()));
        if let Some(state) = self.callout.clone() {
            tokio::spawn(self.clone().run_callout(state, shutdown.clone()));
        }
        let mut retention = tokio::time::interval(self.config.audit.retention_every);
        retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        retention.tick().await;
        let limit = Arc::new(Semaphore::new(self.config.max_in_flight));
        let mut merged = futures::stream::select_all(endpoints);
        let mut tick = tokio::time::interval(self.config.reconcile_every);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = retention.tick() => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        let pruned = me.apply_audit_retention(tenant_bus::envelope::now_ms()).await;
                        tracing::debug!(pruned, "audit retention applied");
                    });
                }
                _ = tick.tick() => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = me.reconcile().await {
                            tracing::warn!(error = %e, "reconcile failed");
                        }
                    });
                }
                next = merged.next() => {
                    let Some(request) = next else { break };
                    let Ok(permit) = limit.clone().acquire_owned().await else { break };
                    let me = self.clone();
                    tokio::spawn(async move {
                        me.handle(request).await;
                        drop(permit);
                    });
                }
            }
        }
        // Graceful stop: unsubscribe first, so the server routes new requests to
        // the other instances, then answer what was already delivered here and
        // let the running handlers finish (bounded), so no caller waits out its
        // timeout on a request this instance swallowed.
        let _ = service.stop().await;
        let drain = async {
            while let Some(request) = merged.next().await {
                let Ok(permit) = limit.clone().acquire_owned().await else {
                    break;
                };
                let me = self.clone();
                tokio::spawn(async move {
                    me.handle(request).await;
                    drop(permit);
                });
            }
            let all = u32::try_from(self.config.max_in_flight).unwrap_or(u32::MAX);
            let _ = limit.acquire_many(all).await;
        };
        if tokio::time::timeout(SHUTDOWN_DRAIN, drain).await.is_err() {
            tracing::warn!("requests still running at shutdown after {SHUTDOWN_DRAIN:?}");
        }
        Ok(())
    }

    async fn handle(&self, request: async_nats::service::Request) {
        let subject = request.message.subject.to_string();
        let reply_ok =
            request.message.reply.as_ref().is_some_and(|r| {
                r.as_str().starts_with("_INBOX.") || r.as_str().starts_with("_R_.")
            });
        if !reply_ok {
            // Never answer onto a subject of the caller's choosing: only inboxes
            // (`_INBOX.`) and service-import reply subjects (`_R_.`).
            tracing::warn!(%subject, "request without an inbox reply subject ignored");
            return;
        }
        let mut revoke = None;
        let body = if request.message.payload.len() > api::MAX_REQUEST_BYTES {
            Err(ApiError::new(ErrorCode::InvalidInput, "request too large"))
        } else if subject.starts_with(api::KEYS_PREFIX) {
            self.keys(&subject, &request.message.payload).await
        } else if subject == api::RUNTIME_USAGE_SUBJECT {
            self.runtime_usage(&request.message.payload).await
        } else if subject == api::AUDIT_APPEND_SUBJECT {
            self.runtime_append(&request.message.payload).await
        } else if subject.starts_with(api::USAGE_REPORT_PREFIX) {
            let (result, pending) = self.usage_report(&subject, &request.message.payload).await;
            revoke = pending;
            result
        } else {
            let caller = auth::authenticate(&self.store, &request.message).await;
            let result = match &caller {
                Ok(caller) => {
                    self.dispatch(caller, &subject, &request.message.payload)
                        .await
                }
                Err(e) => Err(e.clone()),
            };
            // One audit event per mutation and per refusal (docs/audit.md).
            self.audit_request(&request.message, caller.as_ref().ok(), &result)
                .await;
            result
        };
        let bytes = match body {
            Ok(value) => serde_json::to_vec(&api::Response::Ok(value)),
            Err(e) => serde_json::to_vec(&api::Response::<serde_json::Value>::Error(e)),
        };
        let bytes = bytes.unwrap_or_else(|_| {
            b"{\"error\":{\"code\":\"internal\",\"message\":\"encoding\"}}".to_vec()
        });
        if let Err(e) = request.respond(Ok(bytes.into())).await {
            tracing::warn!(error = %e, %subject, "could not answer a request");
        }
        if let Some(pending) = revoke {
            // The refusal reaches the agent before its tenant is suspended.
            let _ = self.client.flush().await;
            self.budget_revoke(pending).await;
        }
    }

    /// Applies audit retention as of `now_ms`: each tenant's log keeps its
    /// `audit_retention_days` (the tier default or the tenant's override), the
    /// platform log [`crate::audit::AuditConfig::platform_retention_days`]; logs
    /// of deleted tenants are kept. Pruning stops at the newest signed
    /// checkpoint covering only older entries (see
    /// [`crate::audit::AuditLog::prune`]). Failures are logged per log. Returns
    /// how many logs were pruned.
    pub async fn apply_audit_retention(&self, now_ms: u64) -> usize {
        let mut logs = vec![(
            crate::audit::event::PLATFORM_LOG.to_string(),
            self.config.audit.platform_retention_days,
        )];
        match self.store.registry.list().await {
            Ok(tenants) => logs.extend(
                tenants
                    .into_iter()
                    .filter(|r| !r.deleting)
                    .map(|r| (r.id.to_string(), r.quotas().audit_retention_days)),
            ),
            Err(e) => tracing::warn!(error = %e, "audit retention: listing tenants failed"),
        }
        let mut pruned = 0;
        for (log, days) in logs {
            let cutoff = now_ms.saturating_sub(days.saturating_mul(crate::audit::DAY_MS));
            match self.audit.prune(&log, cutoff).await {
                Ok(Some(_)) => pruned += 1,
                Ok(None) => {}
                Err(e) => tracing::warn!(%log, error = %e, "audit retention failed"),
            }
        }
        pruned
    }

    /// Brings the server in line with the records: finishes interrupted deletes,
    /// pushes every tenant's account, and deletes accounts no record names.
    /// Returns how many accounts were pushed.
    pub async fn reconcile(&self) -> Result<usize, ControlError> {
        let tenants = self
            .store
            .registry
            .list()
            .await
            .map_err(|e| cerr(ControlErrorKind::Connect, e.to_string()))?;
        let mut pushed = 0;
        let mut known = std::collections::BTreeSet::new();
        known.insert(self.system_account.clone());
        known.insert(self.platform_account.clone());
        if !self.auth_account.is_empty() {
            known.insert(self.auth_account.clone());
        }
        for record in tenants {
            if record.account.is_empty() {
                continue;
            }
            known.insert(record.account.clone());
            if record.deleting {
                if let Err(e) = self.finish_delete(&record).await {
                    tracing::warn!(tenant = %record.id, error = %e, "resuming a delete failed");
                }
                continue;
            }
            let jwt = claims::tenant_jwt(&self.operator, &record, &self.platform_account)
                .map_err(from_api)?;
            self.push_claims(&jwt).await.map_err(from_api)?;
            pushed += 1;
        }
        self.push_platform().await.map_err(from_api)?;
        // An account whose seed is still in the secrets bucket belongs to a tenant
        // record we could not read (corrupt, or skipped): never delete it.
        known.extend(self.store.secret_accounts().await.map_err(from_api)?);
        let on_server = claims::list(&self.sys).await.map_err(from_api)?;
        let orphans: Vec<String> = on_server
            .into_iter()
            .filter(|a| !known.contains(a))
            .collect();
        if !orphans.is_empty() {
            tracing::info!(
                count = orphans.len(),
                "deleting accounts no tenant record names"
            );
            claims::delete(&self.sys, &self.operator, orphans)
                .await
                .map_err(from_api)?;
        }
        Ok(pushed)
    }
}

impl Controller {
    /// Re-signs and pushes the platform account with a revocation for every
    /// revoked admin, so the server itself refuses their credentials.
    pub(crate) async fn push_platform(&self) -> Result<(), ApiError> {
        let mut revocations = std::collections::BTreeMap::new();
        for admin in self.store.admins().await? {
            if let Some(at) = admin.revoked_at {
                revocations.insert(admin.user, at);
            }
        }
        // Strictly newer than the preloaded JWT and every earlier push by this
        // instance; another instance's push in the same second is overtaken by the
        // next reconcile.
        let iat = {
            let mut last = self
                .platform_iat
                .lock()
                .map_err(|_| ApiError::new(ErrorCode::Internal, "lock"))?;
            *last = crate::accounts::next_iat(crate::install::now_unix(), Some(*last));
            *last
        };
        let jwt = crate::accounts::platform_account_jwt_with_revocations(
            &self.operator,
            &self.platform_account,
            &self.platform_signing.public_key(),
            revocations,
            iat,
        )
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
        self.push_claims(&jwt).await
    }

    /// Pushes an account JWT to every server ([`claims::push`]), expecting an
    /// answer from each server the connected one has a route to, plus itself.
    pub(crate) async fn push_claims(&self, jwt: &str) -> Result<(), ApiError> {
        let expected = claims::live_servers(&self.sys).await;
        claims::push(&self.sys, jwt, expected).await.map(|_| ())
    }
}

/// A random u64 (ids of instances and requests).
pub fn rand_u64() -> u64 {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 8];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    u64::from_le_bytes(b)
}

/// A one-shot shutdown signal shared by the tasks of one controller.
pub mod shutdown {
    use std::sync::Arc;
    use tokio::sync::watch;

    /// Fires once; every clone sees it.
    #[derive(Debug, Clone)]
    pub struct Shutdown {
        rx: watch::Receiver<bool>,
        tx: Arc<watch::Sender<bool>>,
    }

    impl Default for Shutdown {
        fn default() -> Self {
            Self::new()
        }
    }

    impl Shutdown {
        /// Not fired.
        pub fn new() -> Self {
            let (tx, rx) = watch::channel(false);
            Self {
                rx,
                tx: Arc::new(tx),
            }
        }
        /// Fires it.
        pub fn fire(&self) {
            let _ = self.tx.send(true);
        }
        /// Waits until fired.
        pub async fn wait(&self) {
            let mut rx = self.rx.clone();
            let _ = rx.wait_for(|v| *v).await;
        }
    }
}
