//! The tenant registry: one JetStream key-value bucket in the platform account.
//!
//! The bucket [`REGISTRY_BUCKET`] (`agentbus-tenants`, key = tenant id, value = the
//! JSON [`TenantRecord`]) is the single source of truth about tenants: their name,
//! tier, settings and status. There is no other database. The bucket never holds
//! key material: the record type has no field for keys or credentials, and the
//! control plane keeps those in its own state directory.
//!
//! - [`Registry::create`] validates the id (a [`TenantId`] slug) and uses `kv.create`,
//!   so two concurrent creations of one id cannot both succeed
//!   ([`RegistryErrorKind::Duplicate`]).
//! - [`Registry::update`] *merges* a [`SettingsPatch`] into the stored settings with
//!   compare-and-set on the entry's revision, retrying a bounded number of times
//!   ([`MAX_CAS_ATTEMPTS`]) when another writer got there first, then failing with
//!   [`RegistryErrorKind::Conflict`]; no update is ever lost or applied on a stale
//!   copy.
//! - [`Registry::suspend`] / [`Registry::activate`] flip the status the same way.
//! - [`TenantRecord::quotas`]: the tier's [`Quotas`] with the overrides applied.
//!
//! Every runtime instance keeps a [`RegistryWatcher`] ([`watcher`]): a bounded
//! in-memory copy kept current by a `watch_all` on the bucket, through which a
//! change (a suspension, say) reaches every instance in well under a second.

pub mod watcher;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use tenant_bus::error::Error;
use tenant_bus::ids::validate_slug;
use tenant_bus::TenantId;

use crate::tiers::{Quotas, Tier};

pub use watcher::{
    RegistryEvent, RegistryWatcher, TenantGate, WatcherOptions, DEFAULT_MAX_CACHED_TENANTS,
};

/// The registry bucket's name (in the platform account).
pub const REGISTRY_BUCKET: &str = "agentbus-tenants";
/// How many times [`Registry::update`] retries a compare-and-set that lost a race.
pub const MAX_CAS_ATTEMPTS: usize = 64;
/// The longest tenant display name, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// The most entries in each settings collection (overrides, agent types, tools).
pub const MAX_SETTINGS_ENTRIES: usize = 256;
/// The largest record accepted in the bucket, in bytes.
pub const MAX_RECORD_BYTES: i32 = 64 * 1024;

/// What went wrong in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RegistryErrorKind {
    /// The tenant id is not a valid slug.
    InvalidId,
    /// The name or settings are invalid (unknown quota field, bad value, bad agent
    /// type or tool name, too many entries).
    InvalidRecord,
    /// A tenant with this id already exists.
    Duplicate,
    /// No tenant with this id.
    NotFound,
    /// Compare-and-set kept losing to concurrent writers.
    Conflict,
    /// JetStream (the server, the bucket) could not be reached or refused.
    Unavailable,
    /// A stored record could not be decoded.
    Corrupt,
}

tenant_bus::kind_display!(RegistryErrorKind {
    InvalidId => "invalid tenant id",
    InvalidRecord => "invalid tenant record",
    Duplicate => "tenant already exists",
    NotFound => "tenant not found",
    Conflict => "concurrent updates kept conflicting",
    Unavailable => "tenant registry unavailable",
    Corrupt => "stored tenant record is corrupt",
});

/// A registry error.
pub type RegistryError = Error<RegistryErrorKind>;

fn unavailable(
    what: &'static str,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> RegistryError {
    move |e| Error::with_source(RegistryErrorKind::Unavailable, what, e)
}

/// Whether a tenant may operate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Operating normally.
    Active,
    /// Every operation of the tenant's agents is refused; running agents stop.
    Suspended,
}

tenant_bus::kind_display!(Status {
    Active => "active",
    Suspended => "suspended",
});

/// A per-tool rate limit: at most `calls` calls per `per_ms` milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RateLimit {
    /// Calls allowed per window.
    pub calls: u32,
    /// The window, in milliseconds.
    pub per_ms: u64,
}

/// A tenant's configuration of one tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ToolSettings {
    /// Whether the tool may run at all.
    pub enabled: bool,
    /// Its rate limit for the tenant, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

impl ToolSettings {
    /// An enabled tool without a rate limit.
    pub fn enabled() -> Self {
        Self {
            enabled: true,
            rate_limit: None,
        }
    }

    /// A disabled tool.
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            rate_limit: None,
        }
    }

    /// With a rate limit of `calls` per `per`.
    pub fn rate_limited(mut self, calls: u32, per: Duration) -> Self {
        self.rate_limit = Some(RateLimit {
            calls,
            per_ms: per.as_millis() as u64,
        });
        self
    }
}

/// A tenant's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TenantSettings {
    /// Quota overrides (`field -> value`), validated by [`Quotas::set`].
    #[serde(default)]
    pub quota_overrides: BTreeMap<String, String>,
    /// The agent types the tenant may run (slugs). Empty: none.
    #[serde(default)]
    pub allowed_agent_types: BTreeSet<String>,
    /// Tool configuration by tool name (slugs). A tool not listed is disabled.
    #[serde(default)]
    pub tools: BTreeMap<String, ToolSettings>,
    /// Data residency: the region whose servers (tagged `region:<name>`) hold
    /// every stream and bucket of the tenant's account. Set at creation only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

impl TenantSettings {
    /// No overrides, no agent types, no tools.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a quota override.
    pub fn quota(mut self, field: &str, value: &str) -> Self {
        self.quota_overrides
            .insert(field.to_string(), value.to_string());
        self
    }

    /// Allows an agent type.
    pub fn allow_agent_type(mut self, agent_type: &str) -> Self {
        self.allowed_agent_types.insert(agent_type.to_string());
        self
    }

    /// Configures a tool.
    pub fn tool(mut self, name: &str, settings: ToolSettings) -> Self {
        self.tools.insert(name.to_string(), settings);
        self
    }

    fn validate(&self, tier: Tier) -> Result<Quotas, RegistryError> {
        let invalid = |d: String| Error::new(RegistryErrorKind::InvalidRecord, d);
        if self.quota_overrides.len() > MAX_SETTINGS_ENTRIES
            || self.allowed_agent_types.len() > MAX_SETTINGS_ENTRIES
            || self.tools.len() > MAX_SETTINGS_ENTRIES
        {
            return Err(invalid(format!(
                "at most {MAX_SETTINGS_ENTRIES} entries per settings collection"
            )));
        }
        let quotas = effective_quotas(tier, &self.quota_overrides)?;
        for t in &self.allowed_agent_types {
            validate_slug(t).map_err(|k| invalid(format!("agent type {t:?}: {k}")))?;
        }
        for (name, tool) in &self.tools {
            validate_slug(name).map_err(|k| invalid(format!("tool {name:?}: {k}")))?;
            if let Some(rl) = tool.rate_limit {
                if rl.per_ms == 0 {
                    return Err(invalid(format!("tool {name:?}: rate window is 0 ms")));
                }
            }
        }
        Ok(quotas)
    }
}

fn effective_quotas(
    tier: Tier,
    overrides: &BTreeMap<String, String>,
) -> Result<Quotas, RegistryError> {
    let mut q = Quotas::for_tier(tier);
    for (k, v) in overrides {
        q.set(k, v).map_err(|e| {
            Error::with_source(RegistryErrorKind::InvalidRecord, "quota override", e)
        })?;
    }
    Ok(q)
}

/// A change to a tenant's settings, merged into the stored ones: entries named
/// here are set or removed, everything else is kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SettingsPatch {
    /// A new display name.
    pub name: Option<String>,
    /// A new tier.
    pub tier: Option<Tier>,
    /// Quota overrides to set (`Some`) or remove (`None`).
    pub quota_overrides: BTreeMap<String, Option<String>>,
    /// Agent types to allow.
    pub allow_agent_types: BTreeSet<String>,
    /// Agent types to stop allowing.
    pub disallow_agent_types: BTreeSet<String>,
    /// Tools to configure (`Some`) or remove (`None`, i.e. disable).
    pub tools: BTreeMap<String, Option<ToolSettings>>,
}

impl SettingsPatch {
    /// An empty patch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Renames the tenant.
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    /// Moves the tenant to `tier`.
    pub fn tier(mut self, tier: Tier) -> Self {
        self.tier = Some(tier);
        self
    }

    /// Sets a quota override.
    pub fn set_quota(mut self, field: &str, value: &str) -> Self {
        self.quota_overrides
            .insert(field.to_string(), Some(value.to_string()));
        self
    }

    /// Removes a quota override (back to the tier default).
    pub fn clear_quota(mut self, field: &str) -> Self {
        self.quota_overrides.insert(field.to_string(), None);
        self
    }

    /// Allows an agent type.
    pub fn allow_agent_type(mut self, agent_type: &str) -> Self {
        self.allow_agent_types.insert(agent_type.to_string());
        self
    }

    /// Stops allowing an agent type.
    pub fn disallow_agent_type(mut self, agent_type: &str) -> Self {
        self.disallow_agent_types.insert(agent_type.to_string());
        self
    }

    /// Configures a tool.
    pub fn tool(mut self, name: &str, settings: ToolSettings) -> Self {
        self.tools.insert(name.to_string(), Some(settings));
        self
    }

    /// Removes a tool's configuration (it becomes disabled).
    pub fn remove_tool(mut self, name: &str) -> Self {
        self.tools.insert(name.to_string(), None);
        self
    }

    fn apply(&self, record: &mut TenantRecord) {
        if let Some(name) = &self.name {
            record.name = name.clone();
        }
        if let Some(tier) = self.tier {
            record.tier = tier;
        }
        let s = &mut record.settings;
        for (k, v) in &self.quota_overrides {
            match v {
                Some(v) => {
                    s.quota_overrides.insert(k.clone(), v.clone());
                }
                None => {
                    s.quota_overrides.remove(k);
                }
            }
        }
        for t in &self.allow_agent_types {
            s.allowed_agent_types.insert(t.clone());
        }
        for t in &self.disallow_agent_types {
            s.allowed_agent_types.remove(t);
        }
        for (k, v) in &self.tools {
            match v {
                Some(v) => {
                    s.tools.insert(k.clone(), *v);
                }
                None => {
                    s.tools.remove(k);
                }
            }
        }
    }
}

/// One tenant, as stored (JSON) under its id in [`REGISTRY_BUCKET`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TenantRecord {
    /// The tenant id (also the key).
    pub id: TenantId,
    /// Display name.
    pub name: String,
    /// Service tier.
    pub tier: Tier,
    /// Overrides, allowed agent types, tools.
    #[serde(default)]
    pub settings: TenantSettings,
    /// Active or suspended.
    pub status: Status,
    /// Creation time, ms since the Unix epoch.
    pub created_at: u64,
    /// Last change, ms since the Unix epoch.
    pub updated_at: u64,
    /// The public key of the tenant's NATS account (set by the controller).
    #[serde(default)]
    pub account: String,
    /// The public key of the account's signing key, which signs its users.
    #[serde(default)]
    pub signing_key: String,
    /// Key versions agents accept, ascending.
    #[serde(default)]
    pub key_versions: Vec<u32>,
    /// The newest key version; agents seal with it from `key_promote_at_ms` on
    /// (a staged rotation gives every agent time to learn it first).
    #[serde(default)]
    pub current_key: u32,
    /// When `current_key` becomes the sealing key, Unix ms (0: at once).
    #[serde(default)]
    pub key_promote_at_ms: u64,
    /// User revocations (user public key, or `*` while suspended, to Unix
    /// seconds), copied into the account JWT.
    #[serde(default)]
    pub revocations: BTreeMap<String, i64>,
    /// The `iat` of the last account JWT signed from this record (strictly
    /// increasing, so every node keeps the newest).
    #[serde(default)]
    pub account_iat: i64,
    /// Set while a delete is in progress (the controller resumes it on start).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
    /// The request id of the last change (a retried request is recognised).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_request: String,
    /// The bucket revision this copy was read at (not stored).
    #[serde(skip)]
    pub revision: u64,
}

impl TenantRecord {
    /// The effective quotas: the tier's defaults with the overrides applied.
    /// Overrides were validated on write; one that no longer parses (a field
    /// renamed in a later release) is ignored rather than failing every lookup.
    pub fn quotas(&self) -> Quotas {
        let mut q = Quotas::for_tier(self.tier);
        for (k, v) in &self.settings.quota_overrides {
            if let Err(e) = q.set(k, v) {
                tracing::warn!(tenant = %self.id, error = %e, "ignoring an invalid quota override");
            }
        }
        q
    }

    /// Whether the tenant is active.
    pub fn is_active(&self) -> bool {
        self.status == Status::Active
    }

    /// Whether `agent_type` is among the allowed agent types.
    pub fn allows_agent_type(&self, agent_type: &str) -> bool {
        self.settings.allowed_agent_types.contains(agent_type)
    }

    fn validate(&self) -> Result<(), RegistryError> {
        let name_ok = !self.name.trim().is_empty()
            && self.name.chars().count() <= MAX_NAME_CHARS
            && !self.name.chars().any(char::is_control);
        if !name_ok {
            return Err(Error::new(
                RegistryErrorKind::InvalidRecord,
                format!("name must be 1 to {MAX_NAME_CHARS} characters without control characters"),
            ));
        }
        self.settings.validate(self.tier).map(|_| ())
    }

    /// A record with every control field empty (the controller fills them).
    pub fn empty(id: TenantId) -> Self {
        Self {
            name: id.to_string(),
            id,
            tier: Tier::Free,
            settings: TenantSettings::default(),
            status: Status::Active,
            created_at: 0,
            updated_at: 0,
            account: String::new(),
            signing_key: String::new(),
            key_versions: vec![],
            current_key: 0,
            key_promote_at_ms: 0,
            revocations: BTreeMap::new(),
            account_iat: 0,
            deleting: false,
            last_request: String::new(),
            revision: 0,
        }
    }

    /// The key version agents seal with at `now_ms` (the previous one until a
    /// staged rotation's promotion time).
    pub fn sealing_key_at(&self, now_ms: u64) -> u32 {
        if now_ms >= self.key_promote_at_ms || self.key_versions.len() < 2 {
            return self.current_key;
        }
        self.key_versions
            .iter()
            .copied()
            .filter(|v| *v < self.current_key)
            .max()
            .unwrap_or(self.current_key)
    }

    /// Checks the name and settings (the controller validates before writing).
    pub fn check(&self) -> Result<Quotas, RegistryError> {
        self.validate()?;
        self.settings.validate(self.tier)
    }

    fn encode(&self) -> Result<Bytes, RegistryError> {
        serde_json::to_vec(self)
            .map(Bytes::from)
            .map_err(|e| Error::with_source(RegistryErrorKind::InvalidRecord, "encoding", e))
    }

    /// Decodes a stored value read at `revision`, checking it is stored under `key`.
    pub(crate) fn decode(key: &str, value: &[u8], revision: u64) -> Result<Self, RegistryError> {
        let mut record: TenantRecord = serde_json::from_slice(value)
            .map_err(|e| Error::with_source(RegistryErrorKind::Corrupt, key.to_string(), e))?;
        if record.id.as_str() != key {
            return Err(Error::new(
                RegistryErrorKind::Corrupt,
                format!("record for {} stored under {key:?}", record.id),
            ));
        }
        record.revision = revision;
        Ok(record)
    }
}

fn parse_id(id: &str) -> Result<TenantId, RegistryError> {
    TenantId::new(id).map_err(|e| Error::with_source(RegistryErrorKind::InvalidId, "", e))
}

/// Options of the registry bucket.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    bucket: String,
    history: i64,
    replicas: usize,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            bucket: REGISTRY_BUCKET.to_string(),
            history: 5,
            replicas: 1,
        }
    }
}

impl RegistryOptions {
    /// The defaults: bucket [`REGISTRY_BUCKET`], 5 revisions of history per tenant.
    pub fn new() -> Self {
        Self::default()
    }

    /// Another bucket name (tests, side-by-side deployments).
    pub fn bucket(mut self, bucket: &str) -> Self {
        self.bucket = bucket.to_string();
        self
    }

    /// Revisions kept per tenant (1 to 64). Default 5.
    pub fn history(mut self, history: i64) -> Self {
        self.history = history.clamp(1, 64);
        self
    }

    /// Replicas when the bucket is created, held to
    /// [`tenant_bus::region::REPLICAS`] (1 to 5). Default 1; the controller
    /// passes the deployment's setting (3 on a cluster).
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas.clamp(
            *tenant_bus::region::REPLICAS.start(),
            *tenant_bus::region::REPLICAS.end(),
        );
        self
    }
}

/// The tenant registry: reads and writes records in the bucket. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    kv: kv::Store,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("bucket", &self.kv.name)
            .finish()
    }
}

impl Registry {
    /// Opens (creating if needed) the registry bucket with default options, on a
    /// connection to the platform account.
    pub async fn open(client: async_nats::Client) -> Result<Self, RegistryError> {
        Self::open_with(client, RegistryOptions::new()).await
    }

    /// Opens (creating if needed) the registry bucket with `options`.
    pub async fn open_with(
        client: async_nats::Client,
        options: RegistryOptions,
    ) -> Result<Self, RegistryError> {
        let js = jetstream::new(client);
        let config = kv::Config {
            bucket: options.bucket.clone(),
            description: "agentbus tenant registry (no key material)".to_string(),
            history: options.history,
            max_value_size: MAX_RECORD_BYTES,
            storage: jetstream::stream::StorageType::File,
            num_replicas: options.replicas,
            ..Default::default()
        };
        let (kv, _) = tenant_bus::open::bucket(&js, config)
            .await
            .map_err(|e| unavailable("opening the registry bucket")(Box::new(e)))?;
        Ok(Self { kv })
    }

    /// The deployment's replica count: the registry bucket's own, which the
    /// controller created from the installation's setting (1 on one node, 3 on a
    /// cluster). Runtime instances use it for every stream and bucket they create
    /// (scheduler buckets, task streams), so one setting governs them all.
    pub async fn replicas(&self) -> Result<usize, RegistryError> {
        // Asked again while unanswered: read when a runtime instance starts,
        // perhaps while the registry's stream elects a new leader.
        let status = tenant_bus::settle::while_unanswered(|| self.kv.status())
            .await
            .map_err(|e| unavailable("reading the registry's replicas")(Box::new(e)))?;
        Ok(status.info.config.num_replicas.max(1))
    }

    /// The underlying bucket (for the watcher).
    pub fn store(&self) -> &kv::Store {
        &self.kv
    }

    /// Creates a tenant, active, with `settings`. Fails with
    /// [`RegistryErrorKind::Duplicate`] if the id exists (atomically, by `kv.create`).
    pub async fn create(
        &self,
        id: &str,
        name: &str,
        tier: Tier,
        settings: TenantSettings,
    ) -> Result<TenantRecord, RegistryError> {
        let id = parse_id(id)?;
        let now = tenant_bus::envelope::now_ms();
        let mut record = TenantRecord {
            id: id.clone(),
            name: name.to_string(),
            tier,
            settings,
            status: Status::Active,
            created_at: now,
            updated_at: now,
            ..TenantRecord::empty(id)
        };
        record.validate()?;
        let value = record.encode()?;
        match self.kv.create(record.id.as_str(), value).await {
            Ok(revision) => {
                record.revision = revision;
                Ok(record)
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Err(Error::new(
                RegistryErrorKind::Duplicate,
                record.id.to_string(),
            )),
            Err(e) => Err(unavailable("create")(Box::new(e))),
        }
    }

    /// Stores a new, complete record (the controller's create); fails with
    /// [`RegistryErrorKind::Duplicate`] if the id exists.
    pub async fn create_record(&self, record: &TenantRecord) -> Result<u64, RegistryError> {
        record.validate()?;
        let value = record.encode()?;
        match self.kv.create(record.id.as_str(), value).await {
            Ok(revision) => Ok(revision),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Err(Error::new(
                RegistryErrorKind::Duplicate,
                record.id.to_string(),
            )),
            Err(e) => Err(unavailable("create")(Box::new(e))),
        }
    }

    /// Read, change, validate, compare-and-set, with bounded retries on a lost
    /// race: the controller's way to change any field of a record.
    pub async fn modify_with(
        &self,
        id: &TenantId,
        change: impl Fn(&mut TenantRecord) -> Result<(), RegistryError>,
    ) -> Result<TenantRecord, RegistryError> {
        self.modify(id, change).await
    }

    /// Removes the record and its history (the last step of a tenant delete).
    pub async fn purge(&self, id: &TenantId) -> Result<(), RegistryError> {
        self.kv
            .purge(id.as_str())
            .await
            .map_err(|e| unavailable("purge")(Box::new(e)))
    }

    /// Reads a tenant.
    pub async fn get(&self, id: &TenantId) -> Result<TenantRecord, RegistryError> {
        let entry = self
            .kv
            .entry(id.as_str())
            .await
            .map_err(|e| unavailable("get")(Box::new(e)))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                TenantRecord::decode(&e.key, &e.value, e.revision)
            }
            _ => Err(Error::new(RegistryErrorKind::NotFound, id.to_string())),
        }
    }

    /// Reads a tenant by id text, validating it first.
    pub async fn get_str(&self, id: &str) -> Result<TenantRecord, RegistryError> {
        self.get(&parse_id(id)?).await
    }

    /// Every tenant, ordered by id. Records that fail to decode are skipped (and
    /// logged), so one bad record cannot hide the others.
    pub async fn list(&self) -> Result<Vec<TenantRecord>, RegistryError> {
        use futures::StreamExt as _;
        let mut keys = self
            .kv
            .keys()
            .await
            .map_err(|e| unavailable("list")(Box::new(e)))?;
        let mut ids = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| unavailable("list")(Box::new(e)))?;
            ids.push(key);
        }
        ids.sort();
        let mut out = Vec::with_capacity(ids.len());
        for key in ids {
            let Ok(id) = TenantId::new(&key) else {
                tracing::warn!(key = %key.escape_debug(), "registry key is not a tenant id");
                continue;
            };
            match self.get(&id).await {
                Ok(r) => out.push(r),
                // Deleted between listing and reading.
                Err(e) if e.kind() == RegistryErrorKind::NotFound => {}
                Err(e) if e.kind() == RegistryErrorKind::Corrupt => {
                    tracing::warn!(tenant = %id, error = %e, "skipping a corrupt registry record");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Merges `patch` into the tenant's record with compare-and-set, retrying up to
    /// [`MAX_CAS_ATTEMPTS`] times on a concurrent write.
    pub async fn update(
        &self,
        id: &TenantId,
        patch: &SettingsPatch,
    ) -> Result<TenantRecord, RegistryError> {
        self.modify(id, |r| {
            patch.apply(r);
            Ok(())
        })
        .await
    }

    /// Suspends the tenant (idempotent).
    pub async fn suspend(&self, id: &TenantId) -> Result<TenantRecord, RegistryError> {
        self.set_status(id, Status::Suspended).await
    }

    /// Re-activates the tenant (idempotent).
    pub async fn activate(&self, id: &TenantId) -> Result<TenantRecord, RegistryError> {
        self.set_status(id, Status::Active).await
    }

    async fn set_status(
        &self,
        id: &TenantId,
        status: Status,
    ) -> Result<TenantRecord, RegistryError> {
        self.modify(id, |r| {
            r.status = status;
            Ok(())
        })
        .await
    }

    /// Deletes the tenant's record (its agents then see it as unknown).
    pub async fn delete(&self, id: &TenantId) -> Result<(), RegistryError> {
        self.get(id).await?;
        self.kv
            .delete(id.as_str())
            .await
            .map_err(|e| unavailable("delete")(Box::new(e)))
    }

    /// Read, change, validate, compare-and-set; bounded retries on a lost race.
    async fn modify(
        &self,
        id: &TenantId,
        change: impl Fn(&mut TenantRecord) -> Result<(), RegistryError>,
    ) -> Result<TenantRecord, RegistryError> {
        for attempt in 0..MAX_CAS_ATTEMPTS {
            let mut record = self.get(id).await?;
            let revision = record.revision;
            change(&mut record)?;
            record.updated_at = tenant_bus::envelope::now_ms().max(record.updated_at);
            record.validate()?;
            let value = record.encode()?;
            match self.kv.update(id.as_str(), value, revision).await {
                Ok(new_revision) => {
                    record.revision = new_revision;
                    return Ok(record);
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    // Another writer won; re-read and re-apply. A short, growing,
                    // jittered pause keeps contending writers from lock-stepping.
                    let jitter = u64::from(tenant_bus::envelope::now_ms() as u8 % 8);
                    let pause = (1u64 << attempt.min(6)) + jitter;
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                Err(e) => return Err(unavailable("update")(Box::new(e))),
            }
        }
        Err(Error::new(
            RegistryErrorKind::Conflict,
            format!("{id}: {MAX_CAS_ATTEMPTS} attempts"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> TenantRecord {
        TenantRecord {
            id: TenantId::new("acme").unwrap(),
            name: "Acme".into(),
            tier: Tier::Free,
            settings: TenantSettings::new()
                .quota("max_agents", "20")
                .allow_agent_type("planner")
                .tool("search", ToolSettings::enabled()),
            status: Status::Active,
            created_at: 1,
            updated_at: 1,
            ..TenantRecord::empty(TenantId::new("acme").unwrap())
        }
    }

    #[test]
    fn patch_merges() {
        let mut r = record();
        SettingsPatch::new()
            .set_quota("max_concurrent_tasks", "9")
            .allow_agent_type("writer")
            .tool("fetch", ToolSettings::disabled())
            .apply(&mut r);
        assert_eq!(r.settings.quota_overrides.len(), 2);
        assert_eq!(r.quotas().max_agents, 20);
        assert_eq!(r.quotas().max_concurrent_tasks, 9);
        assert!(r.allows_agent_type("planner") && r.allows_agent_type("writer"));
        assert_eq!(r.settings.tools.len(), 2);
        SettingsPatch::new()
            .clear_quota("max_agents")
            .disallow_agent_type("planner")
            .apply(&mut r);
        assert_eq!(
            r.quotas().max_agents,
            Quotas::for_tier(Tier::Free).max_agents
        );
        assert!(!r.allows_agent_type("planner"));
    }

    #[test]
    fn validation() {
        let mut r = record();
        assert!(r.validate().is_ok());
        r.settings.quota_overrides.insert("nope".into(), "1".into());
        assert_eq!(
            r.validate().unwrap_err().kind(),
            RegistryErrorKind::InvalidRecord
        );
        let mut r = record();
        r.settings.allowed_agent_types.insert("a.b".into());
        assert!(r.validate().is_err());
        let mut r = record();
        r.name = "\n".into();
        assert!(r.validate().is_err());
    }

    #[test]
    fn decode_checks_key() {
        let r = record();
        let bytes = r.encode().unwrap();
        assert!(TenantRecord::decode("acme", &bytes, 3).is_ok());
        assert_eq!(
            TenantRecord::decode("other", &bytes, 3).unwrap_err().kind(),
            RegistryErrorKind::Corrupt
        );
    }
}
