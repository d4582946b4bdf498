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
