//! API key operations: `agentbus.admin.v1.apikey.<tenant>.<verb>`.
//!
//! - `create`: a new key (shown once); the record keeps its keyed hash.
//! - `list`: the tenant's keys (never a key).
//! - `revoke`: refused at the next login at once; live connections made with it
//!   are closed (kicked) at once.
//! - `rotate`: a new key with the old one's settings; the old one keeps working
//!   until the grace ends (its `expires_at` becomes the end of the grace, so its
//!   logins never outlive it either).

use serde_json::Value;
use tenant_bus::TenantId;

use super::auth::Caller;
use super::Controller;
use crate::api::{ApiError, ApiKeyRef, CreateApiKey, ErrorCode, IssuedApiKey, RotateApiKey};
use crate::identity::{apikey, scopes};
use crate::install::now_unix;
use crate::store::ApiKeyRecord;

type Result<T> = std::result::Result<T, ApiError>;

/// The longest lifetime or grace accepted: ten years.
pub(super) const MAX_LIFETIME_SECS: u64 = 10 * 365 * 86_400;

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidInput, message)
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))
}

fn slug_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Controller {
    pub(super) async fn apikey_api(
        &self,
        caller: &Caller,
        tenant: &TenantId,
        verb: &str,
        body: &[u8],
    ) -> Result<Value> {
        let parse = |body: &[u8]| -> Result<Value> {
            serde_json::from_slice(body).map_err(|e| bad(format!("invalid request: {e}")))
        };
        match verb {
            "create" => {
                let req: CreateApiKey =
                    serde_json::from_value(parse(body)?).map_err(|e| bad(e.to_string()))?;
                to_json(&self.create_apikey(caller, tenant, req).await?)
            }
            "list" => {
                self.tenant(tenant).await?;
                to_json(&self.store.apikeys(tenant).await?)
            }
            "revoke" => {
                let req: ApiKeyRef =
                    serde_json::from_value(parse(body)?).map_err(|e| bad(e.to_string()))?;
                to_json(&self.revoke_apikey(tenant, &req.id).await?)
            }
            "rotate" => {
                let req: RotateApiKey =
                    serde_json::from_value(parse(body)?).map_err(|e| bad(e.to_string()))?;
                to_json(&self.rotate_apikey(caller, tenant, req).await?)
            }
            other => Err(bad(format!("unknown apikey verb {other:?}"))),
        }
    }

    async fn create_apikey(
        &self,
        caller: &Caller,
        tenant: &TenantId,
        req: CreateApiKey,
    ) -> Result<IssuedApiKey> {
        if !slug_ok(&req.name) {
            return Err(bad("key name: 1 to 64 letters, digits, '-' or '_'"));
        }
        let agent_type = req.agent_type.unwrap_or_else(|| "default".to_string());
        if !slug_ok(&agent_type) {
            return Err(bad("agent type: 1 to 64 letters, digits, '-' or '_'"));
        }
        scopes::validate(&req.scopes).map_err(bad)?;
        if req
            .expires_in_secs
            .is_some_and(|s| s == 0 || s > MAX_LIFETIME_SECS)
        {
            return Err(bad(format!("expiry: 1 s to {MAX_LIFETIME_SECS} s")));
        }
        let record = self.tenant(tenant).await?;
        if !record.is_active() {
            return Err(ApiError::new(
                ErrorCode::Refused,
                format!("tenant {tenant} is suspended; no keys are issued"),
            ));
        }
        if !record.allows_agent_type(&agent_type) {
            return Err(ApiError::new(
                ErrorCode::Refused,
                format!("agent type {agent_type:?} is not allowed for tenant {tenant}"),
            ));
        }
        let now = now_unix();
        self.issue_key(
            tenant,
            req.name,
            agent_type,
            req.scopes,
            req.expires_in_secs
                .map(|s| now.saturating_add(i64::try_from(s).unwrap_or(i64::MAX))),
            &caller.request_id,
        )
        .await
    }

    async fn issue_key(
        &self,
        tenant: &TenantId,
        name: String,
        agent_type: String,
        scopes: Vec<String>,
        expires_at: Option<i64>,
        request: &str,
    ) -> Result<IssuedApiKey> {
        // A fresh id collides with probability 62^-12 per key; retry a few times
        // rather than fail.
        for _ in 0..4 {
            let new = apikey::generate()
                .map_err(|_| ApiError::new(ErrorCode::Internal, "the OS random source failed"))?;
            let record = ApiKeyRecord {
                id: new.id.clone(),
                tenant: tenant.clone(),
                name: name.clone(),
                agent_type: agent_type.clone(),
                scopes: scopes.clone(),
                hash: apikey::hash(&self.pepper, &new.key),
                created_at: now_unix(),
                expires_at,
                last_used_at: None,
                revoked_at: None,
                rotated_to: None,
                request: request.to_string(),
            };
            if self.store.create_apikey(&record).await?.is_some() {
                return Ok(IssuedApiKey {
                    id: new.id,
                    key: new.key,
                    record,
                });
            }
        }
        Err(ApiError::new(
            ErrorCode::Conflict,
            "could not allocate a key id; retry",
        ))
    }

    async fn key_of(&self, tenant: &TenantId, id: &str) -> Result<(ApiKeyRecord, u64)> {
        if !apikey::is_key_id(id) {
            return Err(bad(format!("{id:?} is not a key id")));
        }
        match self.store.apikey(id).await? {
            Some((r, rev)) if &r.tenant == tenant => Ok((r, rev)),
            // Another tenant's key is "not found" here, not "forbidden": a
            // tenant-admin learns nothing about other tenants' ids.
            _ => Err(ApiError::new(
                ErrorCode::NotFound,
                format!("key {id} of tenant {tenant}"),
            )),
        }
    }

    async fn revoke_apikey(&self, tenant: &TenantId, id: &str) -> Result<ApiKeyRecord> {
        let (mut record, rev) = self.key_of(tenant, id).await?;
        if record.revoked_at.is_some() {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("key {id} is already revoked"),
            ));
        }
        record.revoked_at = Some(now_unix());
        if self.store.update_apikey(&record, rev).await?.is_none() {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                "key changed concurrently; retry",
            ));
        }
        // The record refuses new logins now; close the live ones.
        self.kick_credential(&format!("key:{id}")).await;
        Ok(record)
    }

    async fn rotate_apikey(
        &self,
        caller: &Caller,
        tenant: &TenantId,
        req: RotateApiKey,
    ) -> Result<IssuedApiKey> {
        if req.grace_secs > MAX_LIFETIME_SECS {
            return Err(bad(format!("grace: at most {MAX_LIFETIME_SECS} s")));
        }
        let (old, rev) = self.key_of(tenant, &req.id).await?;
        let now = now_unix();
        if old.status(now) != "active" {
            return Err(ApiError::new(
                ErrorCode::Refused,
                format!(
                    "key {} is {}; only an active key rotates",
                    old.id,
                    old.status(now)
                ),
            ));
        }
        if old.rotated_to.is_some() {
            return Err(ApiError::new(
                ErrorCode::Refused,
                format!("key {} was already rotated", old.id),
            ));
        }
        let issued = self
            .issue_key(
                tenant,
                old.name.clone(),
                old.agent_type.clone(),
                old.scopes.clone(),
                old.expires_at,
                &caller.request_id,
            )
            .await?;
        let grace_end = now.saturating_add(i64::try_from(req.grace_secs).unwrap_or(i64::MAX));
        let mut updated = old.clone();
        updated.rotated_to = Some(issued.id.clone());
        updated.expires_at = Some(old.expires_at.map_or(grace_end, |e| e.min(grace_end)));
        if self.store.update_apikey(&updated, rev).await?.is_none() {
            // Someone else changed the old key meanwhile: void the new one.
            let mut void = issued.record.clone();
            void.revoked_at = Some(now);
            if let Ok(Some((_, new_rev))) = self.store.apikey(&issued.id).await {
                let _ = self.store.update_apikey(&void, new_rev).await;
            }
            return Err(ApiError::new(
                ErrorCode::Conflict,
                "key changed concurrently; retry",
            ));
        }
        Ok(issued)
    }
}
