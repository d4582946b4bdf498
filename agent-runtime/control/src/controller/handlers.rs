//! The controller's operations. Each validates everything before it writes,
//! writes KV with create or compare-and-set, then pushes the account.

use std::time::Duration;

use nkeys::KeyPair;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tenant_bus::{AgentId, CredentialBundle, MasterSecret, TenantId, TenantKeySet};

use super::auth::Caller;
use super::{claims, Controller};
use crate::accounts::{self, JetStreamScope};
use crate::api::{
    self, AdminRef, AgentRef, ApiError, CreateAdmin, CreateAgent, CreateTenant, ErrorCode,
    IssuedAdmin, IssuedAgent, KeysAnswer, KeysRequest, Role, UpdateTenant,
};
use crate::install::now_unix;
use crate::jwt::{Permission, REVOKE_ALL};
use crate::registry::{Status, TenantRecord, TenantSettings};
use crate::store::{registry_error, secret_name, AdminRecord, AgentRecord, BUCKETS};
use crate::tiers::{Quotas, Tier};

type Result<T> = std::result::Result<T, ApiError>;

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidInput, message)
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Internal, e.to_string())
}

fn json<T: Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(internal)
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T> {
    let body = if body.is_empty() {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| bad(format!("request body: {e}")))
}

fn tenant_id(s: &str) -> Result<TenantId> {
    TenantId::new(s).map_err(|e| bad(format!("invalid tenant id {s:?}: {e}")))
}

fn agent_id(s: &str) -> Result<AgentId> {
    AgentId::new(s).map_err(|e| bad(format!("invalid agent id {s:?}: {e}")))
}

fn slug(what: &str, s: &str) -> Result<()> {
    tenant_bus::ids::validate_slug(s).map_err(|k| bad(format!("invalid {what} {s:?}: {k}")))
}

fn now_ms() -> u64 {
    tenant_bus::envelope::now_ms()
}

/// Striped per-tenant locks: changes to one tenant from this instance queue up
/// instead of racing (CAS still guards against other instances). Bounded: 64.
pub struct Stripes(Vec<tokio::sync::Mutex<()>>);

impl Stripes {
    /// 64 stripes.
    pub fn new() -> Self {
        Self((0..64).map(|_| tokio::sync::Mutex::new(())).collect())
    }

    pub(super) async fn lock(&self, key: &str) -> tokio::sync::MutexGuard<'_, ()> {
        let h = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        self.0[(h % 64) as usize].lock().await
    }
}

impl Default for Stripes {
    fn default() -> Self {
        Self::new()
    }
}

/// A tenant as the API shows it: the record and its effective quotas.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantView {
    /// The record.
    #[serde(flatten)]
    pub record: TenantRecord,
    /// Effective quotas.
    pub quotas: Quotas,
}

impl TenantView {
    fn of(record: TenantRecord) -> Self {
        Self {
            quotas: record.quotas(),
            record,
        }
    }
}

impl Controller {
    pub(super) async fn dispatch(
        &self,
        caller: &Caller,
        subject: &str,
        body: &[u8],
    ) -> Result<Value> {
        let rest = subject
            .strip_prefix(api::ADMIN_PREFIX)
            .and_then(|r| r.strip_prefix('.'))
            .ok_or_else(|| bad("unknown subject"))?;
        let tokens: Vec<&str> = rest.split('.').collect();
        match tokens.as_slice() {
            ["status"] => json(&self.status().await?),
            ["tenants", "list"] => {
                let list = self.store.registry.list().await.map_err(registry_error)?;
                json(&list.into_iter().map(TenantView::of).collect::<Vec<_>>())
            }
            ["tenant", id, verb] => {
                let id = tenant_id(id)?;
                let _guard = self.locks.lock(id.as_str()).await;
                match *verb {
                    "create" => json(&self.create_tenant(caller, &id, parse(body)?).await?),
                    "get" => json(&TenantView::of(self.tenant(&id).await?)),
                    "stats" => json(&self.tenant_stats(&id).await?),
                    "update" => json(&self.update_tenant(caller, &id, parse(body)?).await?),
                    "suspend" => json(&self.set_status(caller, &id, Status::Suspended).await?),
                    "activate" => json(&self.set_status(caller, &id, Status::Active).await?),
                    "delete" => json(&self.delete_tenant(caller, &id).await?),
                    "rotate-key" => json(&self.rotate_key(caller, &id, parse(body)?).await?),
                    other => Err(bad(format!("unknown tenant verb {other:?}"))),
                }
            }
            ["agent", tenant, verb] => {
                let tenant = tenant_id(tenant)?;
                match *verb {
                    "create" => {
                        let _guard = self.locks.lock(tenant.as_str()).await;
                        json(&self.create_agent(caller, &tenant, parse(body)?).await?)
                    }
                    "list" => {
                        self.tenant(&tenant).await?;
                        json(&self.store.agents(&tenant).await?)
                    }
                    "get" => {
                        let r: AgentRef = parse(body)?;
                        json(&self.agent(&tenant, &agent_id(&r.agent)?).await?.0)
                    }
                    "revoke" => {
                        let r: AgentRef = parse(body)?;
                        let _guard = self.locks.lock(tenant.as_str()).await;
                        json(&self.revoke_agent(&tenant, &agent_id(&r.agent)?).await?)
                    }
                    other => Err(bad(format!("unknown agent verb {other:?}"))),
                }
            }
            ["usage", tenant, "get"] => {
                let tenant = tenant_id(tenant)?;
                json(&self.usage_rows(&tenant, parse(body)?).await?)
            }
            ["budget", tenant, verb] => {
                let tenant = tenant_id(tenant)?;
                self.budget_api(caller, &tenant, verb, body).await
            }
            ["apikey", tenant, verb] => {
                let tenant = tenant_id(tenant)?;
                self.apikey_api(caller, &tenant, verb, body).await
            }
            ["admins", "create"] => json(&self.create_admin(parse(body)?).await?),
            ["admins", "list"] => json(&self.store.admins().await?),
            ["admins", "revoke"] => json(&self.revoke_admin(parse(body)?).await?),
            ["audit", log, verb] => self.audit_api(log, verb, body).await,
            _ => Err(bad(format!("unknown subject {subject}"))),
        }
    }

    /// Where the streams and buckets of `record`'s agents go: the deployment's
    /// replica count and the tenant's region (written into its bundles).
    pub(super) fn placement_of(&self, record: &TenantRecord) -> tenant_bus::region::StorePlacement {
        tenant_bus::region::StorePlacement {
            replicas: Some(self.config.replicas),
            region: record
                .settings
                .region
                .as_deref()
                .and_then(|r| tenant_bus::region::Region::new(r).ok()),
        }
    }

    pub(super) async fn tenant(&self, id: &TenantId) -> Result<TenantRecord> {
        let r = self.store.registry.get(id).await.map_err(registry_error)?;
        if r.deleting {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("tenant {id} is being deleted"),
            ));
        }
        Ok(r)
    }

    async fn push(&self, record: &TenantRecord) -> Result<()> {
        let jwt = claims::tenant_jwt(&self.operator, record, &self.platform_account)?;
        self.push_claims(&jwt).await.map_err(|e| {
            ApiError::new(
                ErrorCode::Unavailable,
                format!("saved, but the server did not take the account yet (the controller retries on reconcile): {}", e.message),
            )
        })
    }

    /// Changes a record (CAS with retries) and pushes its account.
    pub(super) async fn change(
        &self,
        caller: &Caller,
        id: &TenantId,
        change: impl Fn(&mut TenantRecord) -> std::result::Result<(), crate::registry::RegistryError>,
    ) -> Result<TenantRecord> {
        let request = caller.request_id.clone();
        let record = self
            .store
            .registry
            .modify_with(id, |r| {
                if r.deleting {
                    return Err(tenant_bus::error::Error::new(
                        crate::registry::RegistryErrorKind::NotFound,
                        format!("{id} is being deleted"),
                    ));
                }
                change(r)?;
                r.account_iat = accounts::next_iat(now_unix(), Some(r.account_iat));
                r.last_request = request.clone();
                Ok(())
            })
            .await
            .map_err(registry_error)?;
        self.push(&record).await?;
        Ok(record)
    }

    async fn create_tenant(
        &self,
        caller: &Caller,
        id: &TenantId,
        req: CreateTenant,
    ) -> Result<TenantView> {
        let tier: Tier = match &req.tier {
            Some(t) => t.parse().map_err(|e| bad(format!("{e}")))?,
            None => Tier::Free,
        };
        let mut settings = TenantSettings::new();
        let types = if req.agent_types.is_empty() {
            vec!["default".to_string()]
        } else {
            req.agent_types.clone()
        };
        for t in &types {
            slug("agent type", t)?;
            settings = settings.allow_agent_type(t);
        }
        for (k, v) in &req.quotas {
            settings = settings.quota(k, v);
        }
        if req.no_jetstream {
            for k in [
                "js_max_memory",
                "js_max_storage",
                "js_max_streams",
                "js_max_consumers",
            ] {
                settings = settings.quota(k, "0");
            }
        }
        if let Some(name) = &req.region {
            let region = tenant_bus::region::Region::new(name).map_err(|e| bad(e.to_string()))?;
            settings.region = Some(region.to_string());
        }
        let account = KeyPair::new_account();
        let signing = KeyPair::new_account();
        let now = now_ms();
        let mut record = TenantRecord::empty(id.clone());
        record.name = req.name.clone().unwrap_or_else(|| id.to_string());
        record.tier = tier;
        record.settings = settings;
        record.created_at = now;
        record.updated_at = now;
        record.account = account.public_key();
        record.signing_key = signing.public_key();
        record.key_versions = vec![1];
        record.current_key = 1;
        record.account_iat = now_unix();
        record.last_request = caller.request_id.clone();
        record.check().map_err(registry_error)?;
        if let Ok(existing) = self.store.registry.get(id).await {
            return self.existing_create(caller, existing).await;
        }
        if let Some(name) = &record.settings.region {
            let region = tenant_bus::region::Region::new(name).map_err(|e| bad(e.to_string()))?;
            self.check_region(&region).await?;
        }
        // Check and write under one lock: no two creates fit the same room.
        let _reservation = self.js_reservations.lock().await;
        self.check_jetstream_reservation(id, &record.quotas())
            .await?;
        // The audit log's home before the tenant exists: its first event
        // (this create) lands in its region's stream, never the shared one.
        let region = match &record.settings.region {
            Some(name) => {
                Some(tenant_bus::region::Region::new(name).map_err(|e| bad(e.to_string()))?)
            }
            None => None,
        };
        self.audit.claim_home(id, region.as_ref()).await?;
        // The books (usage ledger, policing state, budgets) live in the
        // same place, decided now; opening them refuses a region that
        // cannot hold them.
        let books = self.store.books.claim(id, region.as_ref()).await?;
        if books.as_ref() != region.as_ref() {
            let at = books.map_or_else(
                || "the shared buckets".to_string(),
                |r| format!("region {r}"),
            );
            return Err(ApiError::new(
                ErrorCode::InvalidInput,
                format!("tenant id {id} was used before and its usage and budgets live in {at}; an id keeps its region: choose another id"),
            ));
        }
        self.store.books.books(region.as_ref()).await?;
        // Secrets first, named by the account key: a crashed or losing attempt
        // leaves only unreferenced secrets, never a record without its keys.
        let mut root = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut root)
            .map_err(|_| internal("no randomness"))?;
        let a = record.account.clone();
        for (name, value) in [
            (
                secret_name::tenant_account(&a),
                seed(&account)?.into_bytes(),
            ),
            (
                secret_name::tenant_signing(&a),
                seed(&signing)?.into_bytes(),
            ),
            (secret_name::tenant_key_root(&a), root.to_vec()),
        ] {
            self.store
                .put_secret_if_absent(&self.kek, &name, &value)
                .await?;
        }
        match self.store.registry.create_record(&record).await {
            Ok(rev) => record.revision = rev,
            Err(e) if e.kind() == crate::registry::RegistryErrorKind::Duplicate => {
                self.purge_account_secrets(&a).await;
                let existing = self.store.registry.get(id).await.map_err(registry_error)?;
                return self.existing_create(caller, existing).await;
            }
            Err(e) => return Err(registry_error(e)),
        }
        if self.config.fault.as_deref() == Some("exit-after-kv-write") {
            tracing::error!("fault injection: exiting between the KV write and the claim push");
            std::process::exit(86);
        }
        self.push(&record).await?;
        Ok(TenantView::of(record))
    }

    /// A create that finds the id taken: the same request retried (push again and
    /// answer as before), or a real duplicate.
    async fn existing_create(&self, caller: &Caller, existing: TenantRecord) -> Result<TenantView> {
        if existing.last_request == caller.request_id && !existing.deleting {
            self.push(&existing).await?;
            return Ok(TenantView::of(existing));
        }
        Err(ApiError::new(
            ErrorCode::AlreadyExists,
            format!("tenant {} already exists", existing.id),
        ))
    }

    async fn purge_account_secrets(&self, account: &str) {
        for name in [
            secret_name::tenant_account(account),
            secret_name::tenant_signing(account),
            secret_name::tenant_key_root(account),
        ] {
            if let Err(e) = self.store.purge_secret(&name).await {
                tracing::warn!(error = %e, "could not destroy a secret");
            }
        }
    }

    async fn update_tenant(
        &self,
        caller: &Caller,
        id: &TenantId,
        req: UpdateTenant,
    ) -> Result<TenantView> {
        if req.set.is_empty() && req.unset.is_empty() {
            return Err(bad("nothing to change (set or unset a field)"));
        }
        let before = self.tenant(id).await?;
        let tenant_admin = caller.admin.role != Role::PlatformAdmin;
        // Validate everything against a copy before writing anything.
        let mut trial = before.clone();
        apply_update(&mut trial, &req, tenant_admin)?;
        trial.check().map_err(registry_error)?;
        let (old, new) = (before.quotas(), trial.quotas());
        let _reservation =
            if new.js_max_memory > old.js_max_memory || new.js_max_storage > old.js_max_storage {
                let guard = self.js_reservations.lock().await;
                self.check_jetstream_reservation(id, &new).await?;
                Some(guard)
            } else {
                None
            };
        let record = self
            .change(caller, id, |r| {
                apply_update(r, &req, tenant_admin).map_err(|e| {
                    tenant_bus::error::Error::new(
                        crate::registry::RegistryErrorKind::InvalidRecord,
                        e.message,
                    )
                })
            })
            .await?;
        Ok(TenantView::of(record))
    }

    pub(super) async fn set_status(
        &self,
        caller: &Caller,
        id: &TenantId,
        status: Status,
    ) -> Result<TenantView> {
        let current = self.tenant(id).await?;
        if current.status == status && current.last_request != caller.request_id {
            return Err(ApiError::new(
                ErrorCode::Refused,
                format!("tenant {id} is already {status}"),
            ));
        }
        let record = self
            .change(caller, id, |r| {
                r.status = status;
                if status == Status::Suspended {
                    r.revocations
                        .entry(REVOKE_ALL.to_string())
                        .or_insert_with(now_unix);
                } else {
                    r.revocations.remove(REVOKE_ALL);
                }
                Ok(())
            })
            .await?;
        Ok(TenantView::of(record))
    }

    async fn rotate_key(
        &self,
        caller: &Caller,
        id: &TenantId,
        req: RotateKey,
    ) -> Result<TenantView> {
        let grace = req
            .grace_ms
            .map(Duration::from_millis)
            .unwrap_or(self.config.rotation_grace);
        let current = self.tenant(id).await?;
        if current.last_request == caller.request_id {
            return Ok(TenantView::of(current));
        }
        let record = self
            .change(caller, id, |r| {
                let next = r.current_key.checked_add(1).ok_or_else(|| {
                    tenant_bus::error::Error::new(
                        crate::registry::RegistryErrorKind::InvalidRecord,
                        "key version overflow",
                    )
                })?;
                // Keep the version agents seal with now and add the new one; every
                // older version is dropped (and rejected from now on).
                let sealing = r.sealing_key_at(now_ms());
                r.key_versions = vec![sealing, next];
                r.current_key = next;
                r.key_promote_at_ms = now_ms() + grace.as_millis() as u64;
                Ok(())
            })
            .await?;
        Ok(TenantView::of(record))
    }

    async fn delete_tenant(&self, caller: &Caller, id: &TenantId) -> Result<Value> {
        let record = self
            .store
            .registry
            .modify_with(id, |r| {
                r.deleting = true;
                r.status = Status::Suspended;
                r.revocations.insert(REVOKE_ALL.to_string(), now_unix());
                r.account_iat = accounts::next_iat(now_unix(), Some(r.account_iat));
                r.last_request = caller.request_id.clone();
                Ok(())
            })
            .await
            .map_err(registry_error)?;
        self.finish_delete(&record).await?;
        Ok(serde_json::json!({ "tenant": id, "deleted": true }))
    }

    /// The rest of a delete, resumable: close the tenant's connections, remove its
    /// JetStream data, remove the account from the server, destroy its records and
    /// secrets.
    pub(super) async fn finish_delete(&self, record: &TenantRecord) -> Result<()> {
        // Revoke every user issued so far (connections close), leaving one
        // connection for our clean-up user, issued after the revocation.
        self.push(record).await?;
        self.remove_jetstream(record).await?;
        claims::delete(&self.sys, &self.operator, vec![record.account.clone()]).await?;
        self.store.purge_agents(&record.id).await?;
        self.purge_budgets(&record.id).await?;
        self.purge_account_secrets(&record.account).await;
        self.store
            .registry
            .purge(&record.id)
            .await
            .map_err(registry_error)?;
        Ok(())
    }

    /// A connection as a fresh user of `record`'s account, named `name`,
    /// with the account's full permissions (the controller's own JetStream
    /// administration of the tenant: cleanup, residency moves). `None` when
    /// the account's signing key is gone (the tenant is being deleted).
    pub(super) async fn tenant_client(
        &self,
        record: &TenantRecord,
        name: &str,
    ) -> Result<Option<async_nats::Client>> {
        let Some(creds) = self.tenant_creds(record, name).await? else {
            return Ok(None);
        };
        super::connect(&self.urls, &creds, name)
            .await
            .map(Some)
            .map_err(|e| ApiError::new(ErrorCode::Unavailable, e.to_string()))
    }

    /// The credentials of a fresh user of `tenant`'s account, named `name`,
    /// with the account's full permissions: what the controller's own
    /// administration of the tenant's JetStream uses (and `agentbus up
    /// --from-single`, copying it to another server). `None` when the
    /// tenant is being deleted (its signing key is gone).
    pub async fn tenant_user_creds(&self, tenant: &TenantId, name: &str) -> Result<Option<String>> {
        let record = self.tenant(tenant).await?;
        self.tenant_creds(&record, name).await
    }

    async fn tenant_creds(&self, record: &TenantRecord, name: &str) -> Result<Option<String>> {
        let Some(signing) = self.tenant_signing(record).await? else {
            return Ok(None);
        };
        let revoked_at = record.revocations.get(REVOKE_ALL).copied().unwrap_or(0);
        let user = KeyPair::new_user();
        let jwt = accounts::user_jwt(
            &signing,
            Some(&record.account),
            &user.public_key(),
            name,
            Permission::default(),
            Permission::default(),
            vec![],
            revoked_at.max(now_unix()) + 1,
        )
        .map_err(internal)?;
        Ok(Some(crate::jwt::format_creds(&jwt, &seed(&user)?)))
    }

    async fn remove_jetstream(&self, record: &TenantRecord) -> Result<()> {
        use futures::TryStreamExt as _;
        let Some(client) = self.tenant_client(record, "agentbus-cleanup").await? else {
            return Ok(()); // secrets already gone: an earlier attempt got past this
        };
        let js = async_nats::jetstream::new(client.clone());
        // A tenant created a moment ago may not be known to JetStream on
        // every server yet (see `tenant_bus::settle`).
        let names: Vec<String> = tenant_bus::settle::while_settling(|| async {
            js.stream_names().try_collect::<Vec<String>>().await
        })
        .await
        .map_err(|e| ApiError::new(ErrorCode::Unavailable, format!("listing streams: {e}")))?;
        for name in names {
            js.delete_stream(&name).await.map_err(|e| {
                ApiError::new(
                    ErrorCode::Unavailable,
                    format!("deleting stream {name}: {e}"),
                )
            })?;
        }
        let _ = client.drain().await;
        Ok(())
    }

    pub(super) async fn tenant_signing(&self, record: &TenantRecord) -> Result<Option<KeyPair>> {
        let name = secret_name::tenant_signing(&record.account);
        match self.store.secret(&self.kek, &name).await? {
            Some(bytes) => {
                let text = String::from_utf8(bytes).map_err(internal)?;
                KeyPair::from_seed(text.trim()).map(Some).map_err(internal)
            }
            None => Ok(None),
        }
    }

    pub(super) async fn key_set(&self, record: &TenantRecord, at_ms: u64) -> Result<TenantKeySet> {
        let root = self
            .store
            .secret(&self.kek, &secret_name::tenant_key_root(&record.account))
            .await?
            .ok_or_else(|| internal(format!("tenant {} has no key root", record.id)))?;
        let master = MasterSecret::from_bytes(&root).map_err(internal)?;
        master
            .key_set(
                &record.id,
                record.key_versions.iter().copied(),
                record.sealing_key_at(at_ms),
            )
            .map_err(internal)
    }

    async fn agent(&self, tenant: &TenantId, agent: &AgentId) -> Result<(AgentRecord, u64)> {
        self.tenant(tenant).await?;
        self.store
            .agent(tenant, agent)
            .await?
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("agent {tenant}/{agent}")))
    }

    async fn create_agent(
        &self,
        caller: &Caller,
        tenant: &TenantId,
        req: CreateAgent,
    ) -> Result<IssuedAgent> {
        let aid = agent_id(&req.agent)?;
        let agent_type = req.agent_type.unwrap_or_else(|| "default".to_string());
        slug("agent type", &agent_type)?;
        let record = self.tenant(tenant).await?;
        if !record.is_active() {
            return Err(ApiError::new(
                ErrorCode::Refused,
                format!("tenant {tenant} is suspended; no credentials are issued"),
            ));
        }
        if !record.allows_agent_type(&agent_type) {
            let allowed: Vec<&str> = record
                .settings
                .allowed_agent_types
                .iter()
                .map(String::as_str)
                .collect();
            return Err(ApiError::new(
                ErrorCode::Refused,
                format!(
                    "agent type {agent_type:?} is not allowed for tenant {tenant} (allowed: {})",
                    if allowed.is_empty() {
                        "none".to_string()
                    } else {
                        allowed.join(", ")
                    }
                ),
            ));
        }
        // `max_agents` counts issued, unrevoked agents here (and live
        // connections at the auth callout). Checked under this instance's
        // tenant lock; two controllers creating at the same instant can both
        // pass (documented in docs/control-plane.md).
        let cap = record.quotas().max_agents;
        let issued = self
            .store
            .agents(tenant)
            .await?
            .into_iter()
            .filter(|a| a.revoked_at.is_none() && a.agent != aid)
            .count() as u64;
        if issued >= cap {
            return Err(ApiError::new(
                ErrorCode::Refused,
                format!(
                    "tenant {tenant} has {issued} issued agents, its max_agents is {cap}: revoke one or raise max_agents"
                ),
            ));
        }
        let signing = self
            .tenant_signing(&record)
            .await?
            .ok_or_else(|| internal(format!("tenant {tenant} has no signing key")))?;
        let user = KeyPair::new_user();
        let now = now_unix();
        let agent = AgentRecord {
            tenant: tenant.clone(),
            agent: aid.clone(),
            agent_type: agent_type.clone(),
            user: user.public_key(),
            issued_at: now,
            revoked_at: None,
            request: caller.request_id.clone(),
        };
        // One winner per agent id: create, or re-issue a revoked one (or the same
        // request retried) with compare-and-set.
        let mut replaced_user = None;
        if self.store.create_agent(&agent).await?.is_none() {
            let Some((existing, rev)) = self.store.agent(tenant, &aid).await? else {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    "agent changed concurrently; retry",
                ));
            };
            let retried = existing.request == caller.request_id;
            if existing.revoked_at.is_none() && !retried {
                return Err(ApiError::new(
                    ErrorCode::AlreadyExists,
                    format!("agent {tenant}/{aid} already exists (revoke it first)"),
                ));
            }
            if self.store.update_agent(&agent, rev).await?.is_none() {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    "agent changed concurrently; retry",
                ));
            }
            if existing.revoked_at.is_none() {
                replaced_user = Some(existing.user);
            }
        }
        if let Some(old) = replaced_user {
            // A retried create re-issued the credentials: the first copy is void.
            self.change(caller, tenant, |r| {
                r.revocations.insert(old.clone(), now_unix());
                Ok(())
            })
            .await?;
        }
        let user_jwt = accounts::user_jwt(
            &signing,
            Some(&record.account),
            &user.public_key(),
            aid.as_str(),
            Permission {
                allow: accounts::agent_publish_allow(
                    tenant,
                    &record.account,
                    &JetStreamScope::default(),
                ),
                deny: vec![],
            },
            Permission {
                allow: accounts::agent_subscribe_allow(tenant),
                deny: vec![],
            },
            vec![
                format!("tenant:{tenant}"),
                format!("agent:{aid}"),
                format!("type:{agent_type}"),
            ],
            now,
        )
        .map_err(internal)?;
        let keys = self.key_set(&record, now_ms()).await?;
        let bundle = CredentialBundle {
            url: self.urls.clone(),
            tenant: tenant.clone(),
            agent: aid,
            creds: Some(crate::jwt::format_creds(&user_jwt, &seed(&user)?)),
            keys,
            placement: self.placement_of(&record),
        };
        Ok(IssuedAgent { agent, bundle })
    }

    async fn revoke_agent(&self, tenant: &TenantId, aid: &AgentId) -> Result<AgentRecord> {
        let (mut agent, rev) = self.agent(tenant, aid).await?;
        if agent.revoked_at.is_some() {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("agent {tenant}/{aid} is already revoked"),
            ));
        }
        let now = now_unix();
        // The revocation in the account is what the server enforces: first.
        let caller = Caller {
            admin: AdminRecord {
                name: String::new(),
                role: Role::PlatformAdmin,
                tenant: None,
                user: String::new(),
                created_at: 0,
                revoked_at: None,
            },
            request_id: format!("revoke-{}", agent.user),
        };
        let user = agent.user.clone();
        self.change(&caller, tenant, |r| {
            r.revocations.insert(user.clone(), now);
            Ok(())
        })
        .await?;
        agent.revoked_at = Some(now);
        if self.store.update_agent(&agent, rev).await?.is_none() {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                "agent changed concurrently; retry",
            ));
        }
        Ok(agent)
    }

    async fn create_admin(&self, req: CreateAdmin) -> Result<IssuedAdmin> {
        slug("admin name", &req.name)?;
        let tenant = match (&req.role, &req.tenant) {
            (Role::TenantAdmin, None) => return Err(bad("a tenant-admin needs --tenant")),
            (Role::PlatformAdmin, Some(_)) => return Err(bad("a platform-admin has no tenant")),
            (_, Some(t)) => {
                let t = tenant_id(t)?;
                self.tenant(&t).await?;
                Some(t)
            }
            (_, None) => None,
        };
        let user = KeyPair::new_user();
        let admin = AdminRecord {
            name: req.name.clone(),
            role: req.role,
            tenant,
            user: user.public_key(),
            created_at: now_unix(),
            revoked_at: None,
        };
        if self.store.create_admin(&admin).await?.is_none() {
            let Some((existing, rev)) = self.store.admin(&req.name).await? else {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    "admin changed concurrently; retry",
                ));
            };
            if existing.revoked_at.is_none() {
                return Err(ApiError::new(
                    ErrorCode::AlreadyExists,
                    format!("admin {:?} already exists", req.name),
                ));
            }
            if self.store.update_admin(&admin, rev).await?.is_none() {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    "admin changed concurrently; retry",
                ));
            }
        }
        let creds = crate::install::admin_creds(
            &self.platform_signing,
            &self.platform_account,
            &admin,
            &user,
        )
        .map_err(internal)?;
        Ok(IssuedAdmin { admin, creds })
    }

    async fn revoke_admin(&self, req: AdminRef) -> Result<AdminRecord> {
        let Some((mut admin, rev)) = self.store.admin(&req.name).await? else {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("admin {:?}", req.name),
            ));
        };
        if admin.revoked_at.is_some() {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("admin {:?} is already revoked", req.name),
            ));
        }
        admin.revoked_at = Some(now_unix());
        if self.store.update_admin(&admin, rev).await?.is_none() {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                "admin changed concurrently; retry",
            ));
        }
        // The record refuses it at the controller now; the platform account's
        // revocation makes the server close its connections and refuse it too.
        self.push_platform().await?;
        Ok(admin)
    }

    pub(super) async fn keys(&self, subject: &str, body: &[u8]) -> Result<Value> {
        let account = subject
            .strip_prefix(api::KEYS_PREFIX)
            .and_then(|r| r.strip_prefix('.'))
            .ok_or_else(|| bad("bad key-service subject"))?;
        let req: KeysRequest = parse(body)?;
        let id = tenant_id(&req.tenant)?;
        let record = self.tenant(&id).await?;
        // The server binds the subject's account token to the importer; the record
        // must name that account too.
        if record.account != account {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "this account is not that tenant's",
            ));
        }
        let now = now_ms();
        let keys = self.key_set(&record, now).await?;
        let refresh_at_ms = if record.key_promote_at_ms > now {
            record.key_promote_at_ms
        } else {
            now + 60_000
        };
        json(&KeysAnswer {
            keys,
            refresh_at_ms,
            placement: self.placement_of(&record),
        })
    }

    async fn status(&self) -> Result<api::Status> {
        use futures::TryStreamExt as _;
        let js = self.store.jetstream();
        // Every stream of the platform account: the controller's buckets, the
        // runtime's (registry, scheduler) and the audit log, each with its
        // replicas. A missing controller bucket is an outage, not a fact.
        let mut infos: Vec<async_nats::jetstream::stream::Info> =
            js.streams().try_collect().await.map_err(|e| {
                ApiError::new(ErrorCode::Unavailable, format!("listing streams: {e}"))
            })?;
        infos.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        let mut buckets = Vec::new();
        for info in &infos {
            let name = &info.config.name;
            let (bucket, kind) = match name.strip_prefix("KV_") {
                Some(b) => (b.to_string(), "bucket"),
                None => (name.clone(), "stream"),
            };
            buckets.push(api::BucketStatus {
                bucket,
                kind: kind.to_string(),
                replicas: info.config.num_replicas,
                values: info.state.messages,
                leader: info.cluster.as_ref().and_then(|c| c.leader.clone()),
            });
        }
        for b in BUCKETS {
            if !buckets.iter().any(|s| s.bucket == b) {
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    format!("bucket {b} is missing"),
                ));
            }
        }
        let info = self.client.server_info();
        let tenants = self
            .store
            .registry
            .list()
            .await
            .map_err(registry_error)?
            .len();
        let controllers = self.count_controllers().await;
        let mut nodes = Vec::new();
        if let Ok(mut s) = js.get_stream(format!("KV_{}", BUCKETS[0])).await {
            if let Ok(info) = s.info().await {
                if let Some(c) = info.cluster.clone() {
                    nodes.extend(c.leader);
                    nodes.extend(c.replicas.into_iter().map(|r| r.name));
                }
            }
        }
        Ok(api::Status {
            server: format!("{} {}", info.server_name, info.version),
            urls: self.urls.split(',').map(str::to_string).collect(),
            controllers,
            controller_id: self.id.clone(),
            replicas: self.config.replicas,
            buckets,
            tenants,
            nodes,
            jetstream: self.jetstream_capacity(None).await?,
        })
    }

    async fn count_controllers(&self) -> usize {
        use futures::StreamExt as _;
        let inbox = self.client.new_inbox();
        let Ok(mut sub) = self.client.subscribe(inbox.clone()).await else {
            return 0;
        };
        let subject = format!("$SRV.PING.{}", api::SERVICE_NAME);
        if self
            .client
            .publish_with_reply(subject, inbox, "".into())
            .await
            .is_err()
        {
            return 0;
        }
        let mut n = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        while let Ok(Some(_)) = tokio::time::timeout_at(deadline, sub.next()).await {
            n += 1;
            if n >= 1024 {
                break;
            }
        }
        n
    }
}

/// `tenant.<id>.rotate-key`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RotateKey {
    /// Milliseconds until agents seal with the new key (default: the controller's).
    #[serde(default)]
    pub grace_ms: Option<u64>,
}

fn seed(kp: &KeyPair) -> Result<String> {
    kp.seed().map_err(internal)
}

/// Applies an update; a tenant-admin may change only the name, agent types and
/// quota overrides that stay within the tier's defaults.
fn apply_update(r: &mut TenantRecord, req: &UpdateTenant, tenant_admin: bool) -> Result<()> {
    for (key, value) in &req.set {
        let (key, value) = (key.trim(), value.trim());
        match key {
            "name" => r.name = value.to_string(),
            "tier" => {
                if tenant_admin {
                    return Err(ApiError::new(
                        ErrorCode::Refused,
                        "only a platform-admin changes the tier",
                    ));
                }
                r.tier = value.parse().map_err(|e| bad(format!("{e}")))?;
            }
            "allow-agent-type" => {
                slug("agent type", value)?;
                r.settings.allowed_agent_types.insert(value.to_string());
            }
            "disallow-agent-type" => {
                r.settings.allowed_agent_types.remove(value);
            }
            "region" => {
                return Err(ApiError::new(
                    ErrorCode::Refused,
                    "the region is set at creation and cannot change: the tenant's data lives there",
                ));
            }
            field => {
                let mut q = Quotas::for_tier(r.tier);
                let default = q
                    .get(field)
                    .ok_or_else(|| bad(format!("unknown field {field:?}")))?;
                q.set(field, value)
                    .map_err(|e| bad(format!("{field}={value}: {e}")))?;
                if tenant_admin {
                    let (Ok(new), Ok(max)) = (value.parse::<u64>(), default.parse::<u64>()) else {
                        return Err(ApiError::new(
                            ErrorCode::Refused,
                            format!("{field}: a tenant-admin may only lower numeric quotas"),
                        ));
                    };
                    if new > max {
                        return Err(ApiError::new(
                            ErrorCode::Refused,
                            format!("{field}={new} is above the {} tier's {max}", r.tier),
                        ));
                    }
                }
                r.settings
                    .quota_overrides
                    .insert(field.to_string(), value.to_string());
            }
        }
    }
    for field in &req.unset {
        let field = field.trim();
        if Quotas::for_tier(r.tier).get(field).is_none() {
            return Err(bad(format!("unknown field {field:?}")));
        }
        r.settings.quota_overrides.remove(field);
    }
    r.updated_at = now_ms().max(r.updated_at);
    Ok(())
}
