//! Where the control plane's facts live: JetStream KV buckets of the platform
//! account, one source of truth per fact.
//!
//! | bucket | key | value |
//! |---|---|---|
//! | [`REGISTRY_BUCKET`] | `<tenant>` | [`TenantRecord`]: tier, settings, status, account, key versions, revocations |
//! | [`AGENTS_BUCKET`] | `<tenant>.<agent>` | [`AgentRecord`]: type, user public key, issued, revoked |
//! | [`ADMINS_BUCKET`] | `<name>` | [`AdminRecord`]: role, tenant, user public key, created, revoked |
//! | [`SECRETS_BUCKET`] | see [`secret_name`] | a seed or key root sealed under the KEK ([`crate::kek`]) |
//!
//! Every bucket is created with the deployment's replica count (1 on one node, 3
//! on a cluster). Creations use `kv.create` (one winner per key, across every
//! controller instance); changes are compare-and-set on the entry's revision.

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt as _;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tenant_bus::{AgentId, TenantId};

use crate::api::{ApiError, ErrorCode, Role};
use crate::kek::Kek;
pub use crate::registry::{Registry, RegistryOptions, TenantRecord, REGISTRY_BUCKET};

/// Issued agents.
pub const AGENTS_BUCKET: &str = "agentbus-agents";
/// Admin identities.
pub const ADMINS_BUCKET: &str = "agentbus-admins";
/// Sealed secrets.
pub const SECRETS_BUCKET: &str = "agentbus-secrets";
/// API keys (their keyed hashes and metadata), by key id.
pub const APIKEYS_BUCKET: &str = "agentbus-apikeys";
/// Live connections of callout logins: `<tenant>.<slot>`, slot < `max_agents`.
pub const SESSIONS_BUCKET: &str = "agentbus-sessions";
/// Every bucket the controller owns (for `status`).
pub const BUCKETS: [&str; 7] = [
    REGISTRY_BUCKET,
    AGENTS_BUCKET,
    ADMINS_BUCKET,
    SECRETS_BUCKET,
    APIKEYS_BUCKET,
    SESSIONS_BUCKET,
    crate::usage::USAGE_BUCKET,
];
/// How many compare-and-set attempts a change makes before [`ErrorCode::Conflict`].
pub const CAS_ATTEMPTS: usize = 64;

/// The name of a secret in [`SECRETS_BUCKET`] (also its AAD).
pub mod secret_name {
    /// The operator's seed.
    pub const OPERATOR: &str = "operator";
    /// The platform account's identity seed.
    pub const PLATFORM_ACCOUNT: &str = "platform.account";
    /// The platform account's signing seed (signs admins and controllers).
    pub const PLATFORM_SIGNING: &str = "platform.signing";
    /// The system account's identity seed.
    pub const SYSTEM_ACCOUNT: &str = "system.account";
    /// The Ed25519 seed that signs audit checkpoints ([`crate::audit`]).
    pub const AUDIT_CHECKPOINT: &str = "audit.checkpoint";
    /// The auth account's identity seed (signs callout answers).
    pub const AUTH_ACCOUNT: &str = "auth.account";
    /// The auth callout service's xkey seed (requests are sealed to it).
    pub const AUTH_XKEY: &str = "auth.xkey";
    /// The pepper of API key hashes ([`crate::identity::apikey::hash`]).
    pub const APIKEY_PEPPER: &str = "apikey.pepper";

    /// A tenant's account identity seed.
    pub fn tenant_account(tenant: &str) -> String {
        format!("tenant.{tenant}.account")
    }
    /// A tenant's account signing seed (signs its agents).
    pub fn tenant_signing(tenant: &str) -> String {
        format!("tenant.{tenant}.signing")
    }
    /// A tenant's key root (its message keys derive from it; destroyed on delete).
    pub fn tenant_key_root(tenant: &str) -> String {
        format!("tenant.{tenant}.keyroot")
    }
}

/// An issued agent, stored under `<tenant>.<agent>` in [`AGENTS_BUCKET`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// The tenant.
    pub tenant: TenantId,
    /// The agent.
    pub agent: AgentId,
    /// The agent type.
    pub agent_type: String,
    /// The public key of the agent's NATS user.
    pub user: String,
    /// When its credentials were issued, Unix seconds.
    pub issued_at: i64,
    /// When it was revoked, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
    /// The request id that issued it (a retried request is recognised).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request: String,
}

/// An API key, stored under its key id in [`APIKEYS_BUCKET`]. The key itself
/// is never stored: only `hash`, HMAC-SHA-256 under the controllers' pepper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    /// The key id (public; the 12 characters after the prefix).
    pub id: String,
    /// The tenant its logins belong to.
    pub tenant: TenantId,
    /// A label.
    pub name: String,
    /// The agent type its connections act as.
    pub agent_type: String,
    /// Narrower permissions than the tenant's (`pub:<pattern>`, `sub:<pattern>`,
    /// `js`), relative to `tenant.<id>.`; empty: an agent's full allow-list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// HMAC-SHA-256(pepper, key), hex.
    pub hash: String,
    /// Created, Unix seconds.
    pub created_at: i64,
    /// Expires (also the end of a rotation's grace), Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// The last login, Unix seconds (updated at most once a minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<i64>,
    /// Revoked, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
    /// The key id that replaced it (`key rotate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_to: Option<String>,
    /// The request that created it (a retried request is recognised).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request: String,
}

impl ApiKeyRecord {
    /// `active`, `revoked` or `expired` at `now` (Unix seconds).
    pub fn status(&self, now: i64) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if self.expires_at.is_some_and(|e| e <= now) {
            "expired"
        } else {
            "active"
        }
    }
}

/// One live connection of a callout login, stored under `<tenant>.<slot>` in
/// [`SESSIONS_BUCKET`]; a tenant has at most `max_agents` slots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The server the client connected to (its id).
    pub server: String,
    /// The server's connection id of the client.
    pub client: u64,
    /// The per-connection user key the callout issued to.
    pub user: String,
    /// What it logged in with: `key:<id>` or `jwt:<subject>`.
    pub credential: String,
    /// When, Unix milliseconds.
    pub at_ms: u64,
}

/// An admin identity, stored under its name in [`ADMINS_BUCKET`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminRecord {
    /// The admin's name (a slug).
    pub name: String,
    /// The role.
    pub role: Role,
    /// The tenant of a tenant-admin or tenant viewer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantId>,
    /// The public key of the admin's NATS user (it signs requests).
    pub user: String,
    /// When it was created, Unix seconds.
    pub created_at: i64,
    /// When it was revoked, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
}

/// An infrastructure failure as an API error ([`ErrorCode::Unavailable`]).
pub fn unavailable(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, format!("{what}: {e}"))
}

pub(crate) fn corrupt(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        ErrorCode::Internal,
        format!("stored {what} is corrupt: {e}"),
    )
}

/// The controller's buckets. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    js: jetstream::Context,
    /// The tenant registry.
    pub registry: Registry,
    agents: kv::Store,
    admins: kv::Store,
    secrets: kv::Store,
    apikeys: kv::Store,
    sessions: kv::Store,
    usage_reports: kv::Store,
    /// Where each tenant's books (usage ledger, policing state, budgets)
    /// live, and the shared ones (which also hold the policing lease).
    pub books: std::sync::Arc<crate::books::BookHomes>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

async fn open_bucket(
    js: &jetstream::Context,
    bucket: &str,
    description: &str,
    replicas: usize,
    history: i64,
) -> Result<kv::Store, ApiError> {
    let config = kv::Config {
        bucket: bucket.to_string(),
        description: description.to_string(),
        history,
        max_value_size: 64 * 1024,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    };
    tenant_bus::open::bucket(js, config)
        .await
        .map(|(kv, _)| kv)
        .map_err(|e| unavailable(&format!("bucket {bucket}"), e))
}

impl Store {
    /// Opens (creating if missing, with `replicas`) every bucket, as a user of the
    /// platform account.
    pub async fn open(client: async_nats::Client, replicas: usize) -> Result<Self, ApiError> {
        let js = jetstream::new(client.clone());
        let registry = Registry::open_with(client, RegistryOptions::new().replicas(replicas))
            .await
            .map_err(|e| unavailable("opening the tenant registry", e))?;
        let agents = open_bucket(&js, AGENTS_BUCKET, "agentbus issued agents", replicas, 5).await?;
        let admins = open_bucket(&js, ADMINS_BUCKET, "agentbus admins", replicas, 5).await?;
        let secrets = open_bucket(
            &js,
            SECRETS_BUCKET,
            "agentbus secrets, sealed under the controllers' KEK",
            replicas,
            1,
        )
        .await?;
        let apikeys = open_bucket(
            &js,
            APIKEYS_BUCKET,
            "agentbus API keys (hashes)",
            replicas,
            5,
        )
        .await?;
        let sessions = open_bucket(
            &js,
            SESSIONS_BUCKET,
            "agentbus connection slots of callout logins",
            replicas,
            1,
        )
        .await?;
        // Idempotency keys of usage reports: each counts once within 24 h.
        let usage_reports = tenant_bus::open::bucket(
            &js,
            kv::Config {
                bucket: crate::usage::REPORTS_BUCKET.to_string(),
                description: "agentbus usage report idempotency keys (24 h)".to_string(),
                history: 1,
                max_age: crate::usage::REPORT_DEDUPE_WINDOW,
                max_value_size: 1024,
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await
        .map(|(kv, _)| kv)
        .map_err(|e| unavailable("the usage reports bucket", e))?;
        let books = std::sync::Arc::new(
            crate::books::BookHomes::open(&js, registry.clone(), replicas).await?,
        );
        Ok(Self {
            js,
            registry,
            agents,
            admins,
            secrets,
            apikeys,
            sessions,
            usage_reports,
            books,
        })
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    // ----- secrets ------------------------------------------------------------------

    /// Stores a secret sealed under `kek`, only if absent (`Ok(false)` if it exists).
    pub async fn put_secret_if_absent(
        &self,
        kek: &Kek,
        name: &str,
        plaintext: &[u8],
    ) -> Result<bool, ApiError> {
        let sealed = kek
            .seal(name, plaintext)
            .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
        match self.secrets.create(name, Bytes::from(sealed)).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(unavailable("storing a secret", e)),
        }
    }

    /// Reads and opens a secret; `Ok(None)` if absent.
    pub async fn secret(&self, kek: &Kek, name: &str) -> Result<Option<Vec<u8>>, ApiError> {
        let Some(sealed) = self
            .secrets
            .get(name)
            .await
            .map_err(|e| unavailable("reading a secret", e))?
        else {
            return Ok(None);
        };
        kek.open(name, &sealed)
            .map(Some)
            .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))
    }

    /// The accounts that have a seed in the secrets bucket (`tenant.<account>.account`).
    pub async fn secret_accounts(&self) -> Result<Vec<String>, ApiError> {
        let mut keys = self
            .secrets
            .keys()
            .await
            .map_err(|e| unavailable("listing secrets", e))?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| unavailable("listing secrets", e))?;
            if let Some(account) = key
                .strip_prefix("tenant.")
                .and_then(|k| k.strip_suffix(".account"))
            {
                out.push(account.to_string());
            }
        }
        Ok(out)
    }

    /// Destroys a secret and its history.
    pub async fn purge_secret(&self, name: &str) -> Result<(), ApiError> {
        self.secrets
            .purge(name)
            .await
            .map_err(|e| unavailable("destroying a secret", e))
    }

    // ----- agents -------------------------------------------------------------------

    fn agent_key(tenant: &TenantId, agent: &AgentId) -> String {
        format!("{tenant}.{agent}")
    }

    /// One agent record with its revision.
    pub async fn agent(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
    ) -> Result<Option<(AgentRecord, u64)>, ApiError> {
        get_json(&self.agents, &Self::agent_key(tenant, agent), "agent").await
    }

    /// Creates an agent record; `Ok(None)` if one exists under the key.
    pub async fn create_agent(&self, record: &AgentRecord) -> Result<Option<u64>, ApiError> {
        create_json(
            &self.agents,
            &Self::agent_key(&record.tenant, &record.agent),
            record,
        )
        .await
    }

    /// Replaces an agent record if it is still at `revision`; `Ok(None)` if not.
    pub async fn update_agent(
        &self,
        record: &AgentRecord,
        revision: u64,
    ) -> Result<Option<u64>, ApiError> {
        update_json(
            &self.agents,
            &Self::agent_key(&record.tenant, &record.agent),
            record,
            revision,
        )
        .await
    }

    /// Every agent of `tenant`, by id.
    pub async fn agents(&self, tenant: &TenantId) -> Result<Vec<AgentRecord>, ApiError> {
        let filter = format!("$KV.{AGENTS_BUCKET}.{tenant}.*");
        let mut out: Vec<AgentRecord> = list_json(&self.js, AGENTS_BUCKET, &filter).await?;
        out.sort_by(|a, b| a.agent.cmp(&b.agent));
        Ok(out)
    }

    /// Removes every agent record of `tenant`.
    pub async fn purge_agents(&self, tenant: &TenantId) -> Result<(), ApiError> {
        for a in self.agents(tenant).await? {
            self.agents
                .purge(Self::agent_key(tenant, &a.agent))
                .await
                .map_err(|e| unavailable("purging an agent", e))?;
        }
        Ok(())
    }

    // ----- API keys -----------------------------------------------------------------

    /// One API key record with its revision.
    pub async fn apikey(&self, id: &str) -> Result<Option<(ApiKeyRecord, u64)>, ApiError> {
        get_json(&self.apikeys, id, "API key").await
    }

    /// Creates an API key record; `Ok(None)` if the id exists.
    pub async fn create_apikey(&self, record: &ApiKeyRecord) -> Result<Option<u64>, ApiError> {
        create_json(&self.apikeys, &record.id, record).await
    }

    /// Replaces an API key record if it is still at `revision`.
    pub async fn update_apikey(
        &self,
        record: &ApiKeyRecord,
        revision: u64,
    ) -> Result<Option<u64>, ApiError> {
        update_json(&self.apikeys, &record.id, record, revision).await
    }

    /// Every API key of `tenant`, by creation time (a scan of the bucket: keys
    /// are few next to messages, and listing is an admin action).
    pub async fn apikeys(&self, tenant: &TenantId) -> Result<Vec<ApiKeyRecord>, ApiError> {
        let filter = format!("$KV.{APIKEYS_BUCKET}.>");
        let mut out: Vec<ApiKeyRecord> = list_json(&self.js, APIKEYS_BUCKET, &filter).await?;
        out.retain(|k| &k.tenant == tenant);
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    // ----- sessions (connection slots) ----------------------------------------------

    /// The KV key of a tenant's connection slot.
    pub fn session_key(tenant: &TenantId, slot: u64) -> String {
        format!("{tenant}.{slot}")
    }

    /// Takes slot `slot` of `tenant` for `record`; `Ok(None)` if it is held.
    pub async fn take_slot(
        &self,
        tenant: &TenantId,
        slot: u64,
        record: &SessionRecord,
    ) -> Result<Option<u64>, ApiError> {
        create_json(&self.sessions, &Self::session_key(tenant, slot), record).await
    }

    /// A slot's holder and revision.
    pub async fn slot(
        &self,
        tenant: &TenantId,
        slot: u64,
    ) -> Result<Option<(SessionRecord, u64)>, ApiError> {
        get_json(&self.sessions, &Self::session_key(tenant, slot), "session").await
    }

    /// Frees a slot if it is still at `revision` (`Ok(false)` if it changed).
    pub async fn free_slot(&self, key: &str, revision: u64) -> Result<bool, ApiError> {
        match self
            .sessions
            .delete_expect_revision(key, Some(revision))
            .await
        {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => Ok(false),
            Err(e) => Err(unavailable("freeing a connection slot", e)),
        }
    }

    /// The sessions bucket (the callout's index watches it).
    pub fn sessions(&self) -> &kv::Store {
        &self.sessions
    }

    // ----- usage --------------------------------------------------------------------

    /// A JSON record of the shared usage bucket (the policing lease).
    pub async fn usage_get<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<(T, u64)>, ApiError> {
        self.books.central().get(key).await
    }

    /// Writes a JSON record of the shared usage bucket (the policing lease):
    /// created when `revision` is `None`, else compare-and-set.
    pub async fn usage_put<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        revision: Option<u64>,
    ) -> Result<bool, ApiError> {
        self.books.central().put(key, value, revision).await
    }

    /// Claims a usage report's idempotency key (`Ok(false)`: seen within the
    /// last 24 h).
    pub async fn claim_report(&self, key: &str) -> Result<bool, ApiError> {
        Ok(create_json(&self.usage_reports, key, &1u8).await?.is_some())
    }

    /// Gives an idempotency key back (the report could not be counted).
    pub async fn unclaim_report(&self, key: &str) {
        let _ = self.usage_reports.purge(key).await;
    }

    // ----- admins -------------------------------------------------------------------

    /// One admin record with its revision.
    pub async fn admin(&self, name: &str) -> Result<Option<(AdminRecord, u64)>, ApiError> {
        get_json(&self.admins, name, "admin").await
    }

    /// Creates an admin record; `Ok(None)` if the name exists.
    pub async fn create_admin(&self, record: &AdminRecord) -> Result<Option<u64>, ApiError> {
        create_json(&self.admins, &record.name, record).await
    }

    /// Replaces an admin record if it is still at `revision`.
    pub async fn update_admin(
        &self,
        record: &AdminRecord,
        revision: u64,
    ) -> Result<Option<u64>, ApiError> {
        update_json(&self.admins, &record.name, record, revision).await
    }

    /// Every admin, by name.
    pub async fn admins(&self) -> Result<Vec<AdminRecord>, ApiError> {
        let filter = format!("$KV.{ADMINS_BUCKET}.>");
        let mut out: Vec<AdminRecord> = list_json(&self.js, ADMINS_BUCKET, &filter).await?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

pub(crate) async fn get_json<T: DeserializeOwned>(
    kv: &kv::Store,
    key: &str,
    what: &str,
) -> Result<Option<(T, u64)>, ApiError> {
    let entry = kv
        .entry(key)
        .await
        .map_err(|e| unavailable(&format!("reading {what}"), e))?;
    match entry {
        Some(e) if e.operation == kv::Operation::Put => {
            let value = serde_json::from_slice(&e.value).map_err(|err| corrupt(what, err))?;
            Ok(Some((value, e.revision)))
        }
        _ => Ok(None),
    }
}

pub(crate) async fn create_json<T: Serialize>(
    kv: &kv::Store,
    key: &str,
    value: &T,
) -> Result<Option<u64>, ApiError> {
    let bytes = serde_json::to_vec(value).map_err(|e| corrupt("record", e))?;
    let bytes = Bytes::from(bytes);
    // A bucket created a moment ago on a cluster: see tenant_bus::settle.
    match tenant_bus::settle::while_unrouted(|| kv.create(key, bytes.clone())).await {
        Ok(rev) => Ok(Some(rev)),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(unavailable("creating a record", e)),
    }
}

pub(crate) async fn update_json<T: Serialize>(
    kv: &kv::Store,
    key: &str,
    value: &T,
    revision: u64,
) -> Result<Option<u64>, ApiError> {
    let bytes = serde_json::to_vec(value).map_err(|e| corrupt("record", e))?;
    let bytes = Bytes::from(bytes);
    match tenant_bus::settle::while_unrouted(|| kv.update(key, bytes.clone(), revision)).await {
        Ok(rev) => Ok(Some(rev)),
        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
        Err(e) => Err(unavailable("updating a record", e)),
    }
}

/// The latest value of every key matching `filter` in `bucket`: an ordered
/// consumer delivering the last message per subject, read until nothing is
/// pending. Deleted and purged keys are skipped.
pub(crate) async fn list_json<T: DeserializeOwned>(
    js: &jetstream::Context,
    bucket: &str,
    filter: &str,
) -> Result<Vec<T>, ApiError> {
    use jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
    let stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(|e| unavailable("listing", e))?;
    let mut consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: filter.to_string(),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable("listing", e))?;
    let mut out = Vec::new();
    let pending = consumer
        .info()
        .await
        .map_err(|e| unavailable("listing", e))?
        .num_pending;
    if pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| unavailable("listing", e))?;
    // Bounded: at most `pending` plus what arrives meanwhile, each within 5 s.
    loop {
        let next = tokio::time::timeout(std::time::Duration::from_secs(5), messages.next())
            .await
            .map_err(|_| unavailable("listing", "timed out"))?;
        let Some(msg) = next else { break };
        let msg = msg.map_err(|e| unavailable("listing", e))?;
        let op = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .map(|v| v.as_str().to_string());
        let left = msg.info().map(|i| i.pending).unwrap_or(0);
        if op.is_none() && !msg.payload.is_empty() {
            match serde_json::from_slice(&msg.payload) {
                Ok(v) => out.push(v),
                Err(e) => {
                    tracing::warn!(subject = %msg.subject, error = %e, "skipping a corrupt record")
                }
            }
        }
        if left == 0 {
            break;
        }
    }
    Ok(out)
}

/// Maps a registry error onto the wire.
pub fn registry_error(e: crate::registry::RegistryError) -> ApiError {
    use crate::registry::RegistryErrorKind as K;
    let code = match e.kind() {
        K::InvalidId | K::InvalidRecord => ErrorCode::InvalidInput,
        K::Duplicate => ErrorCode::AlreadyExists,
        K::NotFound => ErrorCode::NotFound,
        K::Conflict => ErrorCode::Conflict,
        K::Unavailable => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    };
    ApiError::new(code, crate::one_line(&e.to_string()))
}

/// Maps a control error onto the wire.
pub fn control_error(e: crate::error::ControlError) -> ApiError {
    use crate::error::ControlErrorKind as K;
    let code = match e.kind() {
        K::InvalidId | K::InvalidUrl => ErrorCode::InvalidInput,
        K::DuplicateTenant | K::DuplicateAgent => ErrorCode::AlreadyExists,
        K::UnknownTenant | K::UnknownAgent => ErrorCode::NotFound,
        K::TenantSuspended | K::InvalidTransition => ErrorCode::Refused,
        K::Connect | K::Push => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    };
    ApiError::new(code, crate::one_line(&e.to_string()))
}
