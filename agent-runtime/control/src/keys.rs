//! Key-set refresh for running agents: the client of the controller's key
//! service.
//!
//! Each tenant account imports the platform account's service
//! `agentbus.keys.v1.<account>`, whose export binds the fourth token to the
//! importing account (`account_token_position`), so the server lets an account
//! ask only for its own keys; the controller also checks the account against the
//! tenant's record. [`KeyRefresher`] asks periodically (and when the answer says
//! a staged rotation promotes) and installs the new set in the namespace
//! ([`tenant_bus::TenantNamespace::set_keys`]): no restart, no reconnect.

use std::time::Duration;

use tenant_bus::TenantNamespace;

use crate::api::{self, ApiError, ErrorCode, KeysAnswer, KeysRequest, Response};

/// The account public key a bundle's user belongs to (from its user JWT).
pub fn bundle_account(bundle: &tenant_bus::CredentialBundle) -> Result<String, ApiError> {
    let creds = bundle
        .creds
        .as_deref()
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidInput, "the bundle has no credentials"))?;
    let (user_jwt, _) = crate::jwt::parse_creds(creds)
        .map_err(|e| ApiError::new(ErrorCode::InvalidInput, e.to_string()))?;
    let claims: crate::jwt::UserClaims = crate::jwt::decode(&user_jwt)
        .map_err(|e| ApiError::new(ErrorCode::InvalidInput, e.to_string()))?;
    Ok(claims.nats.issuer_account.unwrap_or(claims.iss))
}

/// Asks the key service for the tenant's current key set.
pub async fn fetch(ns: &TenantNamespace, account: &str) -> Result<KeysAnswer, ApiError> {
    let body = serde_json::to_vec(&KeysRequest {
        tenant: ns.tenant().to_string(),
    })
    .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        ns.nats().request(api::keys_subject(account), body.into()),
    )
    .await
    .map_err(|_| ApiError::new(ErrorCode::Unavailable, "the key service did not answer"))?
    .map_err(|e| ApiError::new(ErrorCode::Unavailable, format!("key service: {e}")))?;
    match serde_json::from_slice::<Response<KeysAnswer>>(&reply.payload) {
        Ok(Response::Ok(a)) => Ok(a),
        Ok(Response::Error(e)) => Err(e),
        Err(e) => Err(ApiError::new(
            ErrorCode::Internal,
            format!("key service answer: {e}"),
        )),
    }
}

/// Fetches and installs the current key set once; returns how long to wait
/// before the next refresh (at most `every`, sooner when a staged rotation
/// promotes). A failure is logged and retried after `every`.
pub async fn refresh_once(ns: &TenantNamespace, account: &str, every: Duration) -> Duration {
    let mut wait = every;
    match fetch(ns, account).await {
        Ok(answer) => {
            if let Err(e) = ns.set_keys(answer.keys) {
                tracing::warn!(tenant = %ns.tenant(), error = %e, "refreshed key set refused");
            }
            let now = tenant_bus::envelope::now_ms();
            if answer.refresh_at_ms > now {
                wait = wait.min(Duration::from_millis(answer.refresh_at_ms - now));
            }
        }
        Err(e) => {
            tracing::debug!(tenant = %ns.tenant(), error = %e, "key refresh failed; retrying")
        }
    }
    wait.max(Duration::from_millis(50))
}

/// Reports `amount` of a custom `unit` (e.g. `llm.tokens`) for the agent's
/// tenant; counted once per `idempotency_key` within 24 h (a retry after a
/// timeout is safe). `account` is the namespace's account
/// ([`bundle_account`]). Returns whether this call counted it.
pub async fn report_usage(
    ns: &TenantNamespace,
    account: &str,
    unit: &str,
    amount: u64,
    idempotency_key: &str,
) -> Result<bool, ApiError> {
    let body = serde_json::to_vec(&crate::usage::UsageReport {
        tenant: ns.tenant().to_string(),
        unit: unit.to_string(),
        amount,
        idempotency_key: idempotency_key.to_string(),
    })
    .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        ns.nats()
            .request(api::usage_report_subject(account), body.into()),
    )
    .await
    .map_err(|_| ApiError::new(ErrorCode::Unavailable, "the usage service did not answer"))?
    .map_err(|e| ApiError::new(ErrorCode::Unavailable, format!("usage service: {e}")))?;
    match serde_json::from_slice::<Response<crate::usage::UsageReportAnswer>>(&reply.payload) {
        Ok(Response::Ok(a)) => Ok(a.counted),
        Ok(Response::Error(e)) => Err(e),
        Err(e) => Err(ApiError::new(
            ErrorCode::Internal,
            format!("usage service answer: {e}"),
        )),
    }
}

/// The inbox prefix a key client uses before it knows its tenant:
/// `_INBOX.<key id>` (the auth callout lets a key's logins subscribe there).
pub fn bootstrap_inbox(key_id: &str) -> String {
    format!("_INBOX.{key_id}")
}

/// The agent id a key client acts as: `key-<key id in lowercase>`.
pub fn key_agent_id(key_id: &str) -> Result<tenant_bus::AgentId, ApiError> {
    tenant_bus::AgentId::new(&format!("key-{}", key_id.to_ascii_lowercase()))
        .map_err(|e| ApiError::new(ErrorCode::InvalidInput, e.to_string()))
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, format!("{what}: {e}"))
}

/// Joins the tenant of an API key with nothing but the server URLs and the
/// key: logs in through the auth callout, asks the server which account it
/// was placed in (`$SYS.REQ.USER.INFO`: the tenant comes from the server, not
/// from the client), fetches the tenant's key set from the key service, and
/// connects a [`TenantNamespace`] with `options`. The returned
/// [`KeyRefresher`] keeps the key set current across rotations; keep it as
/// long as the namespace.
///
/// The bootstrap connection is closed before the namespace connects, so for a
/// moment the key holds two of the tenant's `max_agents` connection slots; at
/// the cap the second login is retried for up to 3 s while the first slot is
/// freed.
///
/// Errors: [`ErrorCode::InvalidInput`] for a malformed key (checked offline),
/// [`ErrorCode::Forbidden`] when the server refuses the key,
/// [`ErrorCode::Unavailable`] when a server or the controller cannot be reached.
pub async fn connect_with_key(
    urls: &str,
    key: &str,
    options: tenant_bus::NamespaceOptions,
) -> Result<(TenantNamespace, KeyRefresher), ApiError> {
    let id = crate::identity::apikey::parse(key)
        .map_err(|e| ApiError::new(ErrorCode::InvalidInput, e.to_string()))?;
    let addrs = crate::parse_urls(urls)
        .map_err(|e| ApiError::new(ErrorCode::InvalidInput, e.to_string()))?;
    let refused = |e: async_nats::ConnectError| match e.kind() {
        async_nats::ConnectErrorKind::AuthorizationViolation
        | async_nats::ConnectErrorKind::Authentication => {
            ApiError::new(ErrorCode::Forbidden, "the server refused the key")
        }
        _ => unavailable("connecting", e),
    };
    let boot = async_nats::ConnectOptions::with_token(key.to_string())
        .custom_inbox_prefix(bootstrap_inbox(id))
        .connection_timeout(Duration::from_secs(5))
        .name("agentbus-key-bootstrap")
        .connect(addrs)
        .await
        .map_err(refused)?;
    let info = tokio::time::timeout(
        Duration::from_secs(5),
        boot.request(crate::accounts::USER_INFO_SUBJECT, bytes::Bytes::new()),
    )
    .await
    .map_err(|_| unavailable("asking the server who we are", "timed out"))?
    .map_err(|e| unavailable("asking the server who we are", e))?;
    let info: serde_json::Value = serde_json::from_slice(&info.payload)
        .map_err(|e| unavailable("the server's user info", e))?;
    let account = info
        .pointer("/data/account")
        .and_then(|v| v.as_str())
        .ok_or_else(|| unavailable("the server's user info", "no account"))?
        .to_string();
    // The account's name is `tenant-<id>`; the key service checks the pair.
    let tenant = info
        .pointer("/data/account_name")
        .and_then(|v| v.as_str())
        .and_then(|n| n.strip_prefix("tenant-"))
        .and_then(|t| tenant_bus::TenantId::new(t).ok())
        .ok_or_else(|| unavailable("the server's user info", "not a tenant account"))?;
    let body = serde_json::to_vec(&KeysRequest {
        tenant: tenant.to_string(),
    })
    .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        boot.request(api::keys_subject(&account), body.into()),
    )
    .await
    .map_err(|_| unavailable("the key service", "timed out"))?
    .map_err(|e| unavailable("the key service", e))?;
    let answer = match serde_json::from_slice::<Response<KeysAnswer>>(&reply.payload) {
        Ok(Response::Ok(a)) => a,
        Ok(Response::Error(e)) => return Err(e),
        Err(e) => return Err(unavailable("the key service's answer", e)),
    };
    let _ = boot.drain().await;
    let bundle = tenant_bus::CredentialBundle {
        url: urls.to_string(),
        tenant,
        agent: key_agent_id(id)?,
        creds: None,
        keys: answer.keys,
        placement: answer.placement,
    };
    let options = options.auth_token(key);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let ns = loop {
        match options.clone().connect(&bundle).await {
            Ok(ns) => break ns,
            Err(e)
                if e.kind() == tenant_bus::namespace::ConnectErrorKind::Authorization
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) if e.kind() == tenant_bus::namespace::ConnectErrorKind::Authorization => {
                return Err(ApiError::new(ErrorCode::Forbidden, e.to_string()))
            }
            Err(e) => return Err(unavailable("connecting", e)),
        }
    };
    let refresher = KeyRefresher::spawn(ns.clone(), account, Duration::from_secs(60));
    Ok((ns, refresher))
}

/// Keeps a namespace's key set current until dropped.
#[derive(Debug)]
pub struct KeyRefresher {
    task: tokio::task::JoinHandle<()>,
}

impl KeyRefresher {
    /// Refreshes `ns` every `every` (and at a staged rotation's promotion time).
    pub fn spawn(ns: TenantNamespace, account: String, every: Duration) -> Self {
        let task = tokio::spawn(async move {
            loop {
                let wait = refresh_once(&ns, &account, every).await;
                tokio::time::sleep(wait).await;
            }
        });
        Self { task }
    }
}

impl Drop for KeyRefresher {
    fn drop(&mut self) {
        self.task.abort();
    }
}
