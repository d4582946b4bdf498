//! The controller's typed client: what the CLI, the runtime, the tests and any
//! remote admin use. It signs every request with the admin's nkey (see
//! [`crate::api`]) and maps the answer to [`ApiError`] codes.
//!
//! ```no_run
//! # async fn f() -> Result<(), agentbus_control::api::ApiError> {
//! use agentbus_control::client::AdminClient;
//! let admin = AdminClient::connect("nats://127.0.0.1:4222", &std::fs::read_to_string("admin.creds").unwrap_or_default()).await?;
//! admin.create_tenant("acme", agentbus_control::tiers::Tier::Pro).await?;
//! let bundle = admin.issue_agent("acme", "planner", "default").await?;
//! # Ok(()) }
//! ```

use std::time::Duration;

use base64::Engine as _;
use nkeys::KeyPair;
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;
use tenant_bus::CredentialBundle;

use crate::api::{self, ApiError, ErrorCode, Response};
use crate::controller::handlers::{RotateKey, TenantView};
use crate::store::{AdminRecord, AgentRecord};
use crate::tiers::{Quotas, Tier};

/// How long a call waits for the controller.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one attempt of a call waits before asking again (same request id).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a call keeps retrying while no controller answers.
pub const NO_RESPONDERS_RETRY: Duration = Duration::from_secs(5);

/// A connection to the controller as one admin. Cheap to clone.
#[derive(Clone)]
pub struct AdminClient {
    client: async_nats::Client,
    // The server's permission violations on this connection, as they arrive: a
    // refused publish gets no answer, so a call watches for its own subject here
    // instead of waiting out its timeout.
    violations: tokio::sync::watch::Receiver<String>,
    name: String,
    key: std::sync::Arc<KeyPair>,
    timeout: Duration,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("name", &self.name)
            .finish()
    }
}

fn unavailable(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, message)
}

impl AdminClient {
    /// Connects to `urls` (comma-separated) with an admin's `.creds` text.
    pub async fn connect(urls: &str, creds: &str) -> Result<Self, ApiError> {
        let (user_jwt, seed) = crate::jwt::parse_creds(creds).map_err(|e| {
            ApiError::new(ErrorCode::InvalidInput, format!("admin credentials: {e}"))
        })?;
        let claims: crate::jwt::UserClaims = crate::jwt::decode(&user_jwt).map_err(|e| {
            ApiError::new(ErrorCode::InvalidInput, format!("admin credentials: {e}"))
        })?;
        let key = KeyPair::from_seed(seed.trim()).map_err(|e| {
            ApiError::new(ErrorCode::InvalidInput, format!("admin credentials: {e}"))
        })?;
        let addrs = crate::parse_urls(urls)
            .map_err(|e| ApiError::new(ErrorCode::InvalidInput, e.to_string()))?;
        let (tx, violations) = tokio::sync::watch::channel(String::new());
        let tx = std::sync::Arc::new(tx);
        let client = async_nats::ConnectOptions::with_credentials(creds)
            .map_err(|e| ApiError::new(ErrorCode::InvalidInput, format!("admin credentials: {e}")))?
            .event_callback(move |event| {
                let tx = tx.clone();
                async move {
                    let text = event.to_string();
                    if text.to_lowercase().contains("permissions violation") {
                        let _ = tx.send(text);
                    }
                }
            })
            .name(format!("agentbus-admin-{}", claims.name))
            .custom_inbox_prefix(api::admin_inbox(&claims.name))
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            .connect(addrs)
            .await
            .map_err(|e| unavailable(format!("cannot reach the server at {urls}: {e}")))?;
        Ok(Self {
            client,
            violations,
            name: claims.name,
            key: std::sync::Arc::new(key),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// With another call timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The admin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The underlying connection.
    pub fn nats(&self) -> &async_nats::Client {
        &self.client
    }

    /// Calls `subject` with `body` and a fresh request id.
    pub async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        subject: &str,
        body: &B,
    ) -> Result<R, ApiError> {
        let id = format!(
            "{:016x}{:016x}",
            crate::controller::rand_u64(),
            crate::controller::rand_u64()
        );
        self.call_with_id(subject, body, &id).await
    }

    /// Calls `subject` with `body` under request id `request_id` (a retry with the
    /// same id is recognised by the controller).
    pub async fn call_with_id<B: Serialize, R: DeserializeOwned>(
        &self,
        subject: &str,
        body: &B,
        request_id: &str,
    ) -> Result<R, ApiError> {
        let payload = serde_json::to_vec(body)
            .map_err(|e| ApiError::new(ErrorCode::InvalidInput, e.to_string()))?;
        let time = tenant_bus::envelope::now_ms();
        let sig = self
            .key
            .sign(&api::signed_text(subject, request_id, time, &payload))
            .map_err(|e| ApiError::new(ErrorCode::Internal, format!("signing: {e}")))?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(api::HDR_ADMIN, self.name.as_str());
        headers.insert(api::HDR_REQUEST_ID, request_id);
        headers.insert(api::HDR_TIME, time.to_string().as_str());
        headers.insert(
            api::HDR_SIG,
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(sig)
                .as_str(),
        );
        // No responders: no controller is subscribed right now (starting, or a
        // failover in progress). Retry the same request id for a few seconds.
        let deadline = tokio::time::Instant::now() + NO_RESPONDERS_RETRY;
        let overall = tokio::time::Instant::now() + self.timeout;
        let attempt_timeout = self.timeout.min(ATTEMPT_TIMEOUT);
        let mut violations = self.violations.clone();
        violations.mark_unchanged();
        let refused = async move {
            loop {
                if violations.changed().await.is_err() {
                    return std::future::pending::<String>().await;
                }
                let text = violations.borrow_and_update().clone();
                if text.contains(subject) {
                    return text;
                }
            }
        };
        tokio::pin!(refused);
        let reply = loop {
            let request = self.client.request_with_headers(
                subject.to_string(),
                headers.clone(),
                payload.clone().into(),
            );
            let answer = tokio::select! {
                a = tokio::time::timeout(attempt_timeout, request) => a,
                text = &mut refused => {
                    return Err(ApiError::new(
                        ErrorCode::Forbidden,
                        format!("the server refused the request for this admin's role: {}", crate::one_line(&text)),
                    ));
                }
            };
            match answer {
                // No answer within one attempt: the request may have reached an
                // instance that was stopping. Ask again with the same request id
                // (the controller recognises a retried mutation) until the overall
                // timeout.
                Err(_) if tokio::time::Instant::now() + attempt_timeout <= overall => {
                    tracing::debug!(subject, "no answer; retrying the same request");
                }
                Err(_) => return Err(unavailable("the controller did not answer in time")),
                Ok(Err(e)) => {
                    use async_nats::RequestErrorKind as K;
                    match e.kind() {
                        K::NoResponders if tokio::time::Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        K::NoResponders => {
                            return Err(unavailable("no controller is running (no responders)"))
                        }
                        K::TimedOut => {
                            return Err(unavailable("the controller did not answer in time"))
                        }
                        _ => return Err(unavailable(format!("request failed: {e}"))),
                    }
                }
                Ok(Ok(m)) => break m,
            }
        };
        if reply.payload.is_empty() {
            // An empty answer with a status header: the server refused the publish
            // (a permission violation on our subject is reported asynchronously,
            // and the request then times out or finds no responders).
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "the server refused the request",
            ));
        }
        let answer: Response<R> = serde_json::from_slice(&reply.payload).map_err(|e| {
            ApiError::new(
                ErrorCode::Internal,
                format!("bad answer from the controller: {e}"),
            )
        })?;
        match answer {
            Response::Ok(v) => Ok(v),
            Response::Error(e) => Err(e),
        }
    }

    // ----- typed calls ---------------------------------------------------------------

    /// The installation's status.
    pub async fn status(&self) -> Result<api::Status, ApiError> {
        self.call(&format!("{}.status", api::ADMIN_PREFIX), &Value::Null)
            .await
    }

    /// Creates a tenant with its tier's defaults and agent type `default`.
    pub async fn create_tenant(&self, id: &str, tier: Tier) -> Result<TenantView, ApiError> {
        self.create_tenant_with(
            id,
            &api::CreateTenant {
                tier: Some(tier.to_string()),
                ..Default::default()
            },
        )
        .await
    }

    /// Creates a tenant with explicit quotas (every field an override).
    pub async fn create_tenant_with_quotas(
        &self,
        id: &str,
        tier: Tier,
        quotas: Quotas,
    ) -> Result<TenantView, ApiError> {
        let mut req = api::CreateTenant {
            tier: Some(tier.to_string()),
            ..Default::default()
        };
        let base = Quotas::for_tier(tier);
        for field in Quotas::FIELDS {
            if let (Some(v), Some(b)) = (quotas.get(field), base.get(field)) {
                if v != b {
                    req.quotas.insert((*field).to_string(), v);
                }
            }
        }
        self.create_tenant_with(id, &req).await
    }

    /// Creates a tenant.
    pub async fn create_tenant_with(
        &self,
        id: &str,
        req: &api::CreateTenant,
    ) -> Result<TenantView, ApiError> {
        self.call(&api::tenant_subject(id, "create"), req).await
    }

    /// One tenant.
    pub async fn tenant(&self, id: &str) -> Result<TenantView, ApiError> {
        self.call(&api::tenant_subject(id, "get"), &Value::Null)
            .await
    }

    /// Every tenant.
    pub async fn tenants(&self) -> Result<Vec<TenantView>, ApiError> {
        self.call(&format!("{}.tenants.list", api::ADMIN_PREFIX), &Value::Null)
            .await
    }

    /// Changes a tenant.
    pub async fn update_tenant(
        &self,
        id: &str,
        req: &api::UpdateTenant,
    ) -> Result<TenantView, ApiError> {
        self.call(&api::tenant_subject(id, "update"), req).await
    }

    /// Suspends a tenant (the server closes its connections).
    pub async fn suspend_tenant(&self, id: &str) -> Result<TenantView, ApiError> {
        self.call(&api::tenant_subject(id, "suspend"), &Value::Null)
            .await
    }

    /// Re-activates a tenant.
    pub async fn activate_tenant(&self, id: &str) -> Result<TenantView, ApiError> {
        self.call(&api::tenant_subject(id, "activate"), &Value::Null)
            .await
    }

    /// Deletes a tenant: account, JetStream data, records and keys.
    pub async fn delete_tenant(&self, id: &str) -> Result<Value, ApiError> {
        self.call(&api::tenant_subject(id, "delete"), &Value::Null)
            .await
    }

    /// Rotates a tenant's key; agents seal with it after `grace` (default: the
    /// controller's).
    pub async fn rotate_key(
        &self,
        id: &str,
        grace: Option<Duration>,
    ) -> Result<TenantView, ApiError> {
        let req = RotateKey {
            grace_ms: grace.map(|g| g.as_millis() as u64),
        };
        self.call(&api::tenant_subject(id, "rotate-key"), &req)
            .await
    }

    /// A tenant's usage rows in `[from_ms, to_ms)`, per hour or day.
    pub async fn usage(
        &self,
        tenant: &str,
        req: &crate::usage::UsageRequest,
    ) -> Result<Vec<crate::usage::UsageRow>, ApiError> {
        self.call(&api::usage_subject(tenant, "get"), req).await
    }

    /// One tenant's live figures, metered usage, budgets and policing state.
    pub async fn tenant_stats(&self, id: &str) -> Result<api::TenantStats, ApiError> {
        self.call(&api::tenant_subject(id, "stats"), &serde_json::json!({}))
            .await
    }

    /// Creates or replaces a budget of `tenant` (the answer: it with this
    /// period's total).
    pub async fn set_budget(
        &self,
        tenant: &str,
        spec: &crate::budget::BudgetSpec,
    ) -> Result<crate::budget::BudgetView, ApiError> {
        self.call(&api::budget_subject(tenant, "set"), spec).await
    }

    /// The budgets of `tenant` with this period's totals.
    pub async fn budgets(&self, tenant: &str) -> Result<Vec<crate::budget::BudgetView>, ApiError> {
        self.call(&api::budget_subject(tenant, "list"), &serde_json::json!({}))
            .await
    }

    /// Deletes a budget (its counters stay until they age out).
    pub async fn delete_budget(&self, tenant: &str, name: &str) -> Result<Value, ApiError> {
        let req = crate::budget::BudgetRef {
            name: name.to_string(),
        };
        self.call(&api::budget_subject(tenant, "delete"), &req)
            .await
    }

    /// Creates an API key for `tenant`; the answer holds the key, once.
    pub async fn create_apikey(
        &self,
        tenant: &str,
        req: &api::CreateApiKey,
    ) -> Result<api::IssuedApiKey, ApiError> {
        self.call(&api::apikey_subject(tenant, "create"), req).await
    }

    /// The API keys of `tenant` (records, never keys).
    pub async fn apikeys(&self, tenant: &str) -> Result<Vec<crate::store::ApiKeyRecord>, ApiError> {
        self.call(&api::apikey_subject(tenant, "list"), &serde_json::json!({}))
            .await
    }

    /// Revokes an API key; its live connections are closed.
    pub async fn revoke_apikey(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<crate::store::ApiKeyRecord, ApiError> {
        let req = api::ApiKeyRef { id: id.to_string() };
        self.call(&api::apikey_subject(tenant, "revoke"), &req)
            .await
    }

    /// Replaces an API key; the old one works for `grace` more.
    pub async fn rotate_apikey(
        &self,
        tenant: &str,
        id: &str,
        grace: std::time::Duration,
    ) -> Result<api::IssuedApiKey, ApiError> {
        let req = api::RotateApiKey {
            id: id.to_string(),
            grace_secs: grace.as_secs(),
        };
        self.call(&api::apikey_subject(tenant, "rotate"), &req)
            .await
    }

    /// Issues an agent's credentials (the full answer: record and bundle).
    pub async fn create_agent(
        &self,
        tenant: &str,
        agent: &str,
        agent_type: &str,
    ) -> Result<api::IssuedAgent, ApiError> {
        let req = api::CreateAgent {
            agent: agent.to_string(),
            agent_type: Some(agent_type.to_string()),
        };
        self.call(&api::agent_subject(tenant, "create"), &req).await
    }

    /// Issues an agent's credentials and returns its bundle.
    pub async fn issue_agent(
        &self,
        tenant: &str,
        agent: &str,
        agent_type: &str,
    ) -> Result<CredentialBundle, ApiError> {
        Ok(self.create_agent(tenant, agent, agent_type).await?.bundle)
    }

    /// The tenant's agents.
    pub async fn agents(&self, tenant: &str) -> Result<Vec<AgentRecord>, ApiError> {
        self.call(&api::agent_subject(tenant, "list"), &Value::Null)
            .await
    }

    /// One agent.
    pub async fn agent(&self, tenant: &str, agent: &str) -> Result<AgentRecord, ApiError> {
        let req = api::AgentRef {
            agent: agent.to_string(),
        };
        self.call(&api::agent_subject(tenant, "get"), &req).await
    }

    /// Revokes an agent (the server closes its connections and refuses it).
    pub async fn revoke_agent(&self, tenant: &str, agent: &str) -> Result<AgentRecord, ApiError> {
        let req = api::AgentRef {
            agent: agent.to_string(),
        };
        self.call(&api::agent_subject(tenant, "revoke"), &req).await
    }

    /// Creates an admin and returns its `.creds` (shown once).
    pub async fn create_admin(
        &self,
        name: &str,
        role: api::Role,
        tenant: Option<&str>,
    ) -> Result<api::IssuedAdmin, ApiError> {
        let req = api::CreateAdmin {
            name: name.to_string(),
            role,
            tenant: tenant.map(str::to_string),
        };
        self.call(&api::admins_subject("create"), &req).await
    }

    /// Every admin.
    pub async fn admins(&self) -> Result<Vec<AdminRecord>, ApiError> {
        self.call(&api::admins_subject("list"), &Value::Null).await
    }

    /// Revokes an admin.
    pub async fn revoke_admin(&self, name: &str) -> Result<AdminRecord, ApiError> {
        let req = api::AdminRef {
            name: name.to_string(),
        };
        self.call(&api::admins_subject("revoke"), &req).await
    }
}
