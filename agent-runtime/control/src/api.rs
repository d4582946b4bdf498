//! The controller's wire API, version 1: subjects, roles, requests, responses and
//! error codes. Requests and responses are JSON.
//!
//! ```text
//! agentbus.admin.v1.status                          read     status of the installation
//! agentbus.admin.v1.tenants.list                    read     every tenant
//! agentbus.admin.v1.tenant.<id>.<verb>              create | get | stats | update | suspend |
//!                                                   activate | delete | rotate-key
//! agentbus.admin.v1.agent.<tenant>.<verb>           create | list | get | revoke
//! agentbus.admin.v1.admins.<verb>                   create | list | revoke
//! agentbus.admin.v1.budget.<tenant>.<verb>          set | list | delete
//! agentbus.keys.v1.<account>                        an agent's key set (service import)
//! ```
//!
//! Every admin request carries the headers [`HDR_ADMIN`], [`HDR_REQUEST_ID`],
//! [`HDR_TIME`] and [`HDR_SIG`]: an nkey signature by the admin's user key over
//! [`signed_text`], which the controller checks against the admin's record, so the
//! controller enforces roles itself and does not only trust the server's subject
//! permissions. A response is `{"ok": <value>}` or `{"error": {"code", "message"}}`.

use serde::{Deserialize, Serialize};
use tenant_bus::TenantId;

/// The prefix of every admin subject.
pub const ADMIN_PREFIX: &str = "agentbus.admin.v1";
/// The prefix of the key service subject; the importing account's key follows.
pub const KEYS_PREFIX: &str = "agentbus.keys.v1";
/// The queue group every controller instance serves in.
pub const QUEUE_GROUP: &str = "agentbus-controller";
/// The service name (NATS micro services API).
pub const SERVICE_NAME: &str = "agentbus-controller";
/// Header: the admin's name.
pub const HDR_ADMIN: &str = "Agentbus-Admin";
/// Header: the request id (idempotency key of a mutation).
pub const HDR_REQUEST_ID: &str = "Agentbus-Request-Id";
/// Header: the request time, Unix milliseconds.
pub const HDR_TIME: &str = "Agentbus-Time";
/// Header: base64url nkey signature over [`signed_text`].
pub const HDR_SIG: &str = "Agentbus-Sig";
/// How far a request's time may be from the controller's clock.
pub const MAX_CLOCK_SKEW_MS: u64 = 120_000;
/// The largest request body accepted, bytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The text an admin signs: subject, request id, time and the SHA-256 of the body,
/// one per line.
pub fn signed_text(subject: &str, request_id: &str, time_ms: u64, body: &[u8]) -> Vec<u8> {
    let digest = ring::digest::digest(&ring::digest::SHA256, body);
    let mut hex = String::with_capacity(64);
    for b in digest.as_ref() {
        hex.push_str(&format!("{b:02x}"));
    }
    format!("agentbus-admin-request/v1\n{subject}\n{request_id}\n{time_ms}\n{hex}").into_bytes()
}

/// The inbox prefix of admin `name` (its user may subscribe only below it).
pub fn admin_inbox(name: &str) -> String {
    format!("_INBOX.agentbus.{name}")
}

/// `agentbus.admin.v1.tenant.<id>.<verb>`.
pub fn tenant_subject(id: &str, verb: &str) -> String {
    format!("{ADMIN_PREFIX}.tenant.{id}.{verb}")
}

/// `agentbus.admin.v1.agent.<tenant>.<verb>`.
pub fn agent_subject(tenant: &str, verb: &str) -> String {
    format!("{ADMIN_PREFIX}.agent.{tenant}.{verb}")
}

/// `agentbus.admin.v1.admins.<verb>`.
pub fn admins_subject(verb: &str) -> String {
    format!("{ADMIN_PREFIX}.admins.{verb}")
}

/// `agentbus.admin.v1.apikey.<tenant>.<verb>` (create, list, revoke, rotate).
pub fn apikey_subject(tenant: &str, verb: &str) -> String {
    format!("{ADMIN_PREFIX}.apikey.{tenant}.{verb}")
}

/// `agentbus.admin.v1.usage.<tenant>.<verb>` (get).
pub fn usage_subject(tenant: &str, verb: &str) -> String {
    format!("{ADMIN_PREFIX}.usage.{tenant}.{verb}")
}

/// Where agents report custom usage units: `agentbus.usage.v1`.
pub const USAGE_REPORT_PREFIX: &str = "agentbus.usage.v1";

/// Where runtime hosts append their security events (platform account only;
/// see `audit::sink`).
pub const AUDIT_APPEND_SUBJECT: &str = "agentbus.runtime.v1.audit";

/// Where runtime hosts send what they metered (platform account only; see
/// `meter`).
pub const RUNTIME_USAGE_SUBJECT: &str = "agentbus.runtime.v1.usage";

/// The prefix of the events the controller publishes for a tenant account
/// (`agentbus.events.v1.<account>.<kind>`, a stream every tenant account
/// imports for itself only, onto `tenant.<id>.events.<kind>`).
pub const EVENTS_PREFIX: &str = "agentbus.events.v1";

/// `agentbus.events.v1.<account>.<kind>`.
pub fn events_subject(account: &str, kind: &str) -> String {
    format!("{EVENTS_PREFIX}.{account}.{kind}")
}

/// `agentbus.admin.v1.budget.<tenant>.<verb>`: set | list | delete.
pub fn budget_subject(tenant: &str, verb: &str) -> String {
    format!("{ADMIN_PREFIX}.budget.{tenant}.{verb}")
}

/// `agentbus.usage.v1.<account>` (an account-bound import, as the key service).
pub fn usage_report_subject(account: &str) -> String {
    format!("{USAGE_REPORT_PREFIX}.{account}")
}

/// `agentbus.keys.v1.<account>`.
pub fn keys_subject(account: &str) -> String {
    format!("{KEYS_PREFIX}.{account}")
}

/// An admin's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Everything.
    PlatformAdmin,
    /// One tenant: its agents, settings within its tier, reading it.
    TenantAdmin,
    /// Read only (of every tenant, or of one).
    Viewer,
}

tenant_bus::kind_display!(Role {
    PlatformAdmin => "platform-admin",
    TenantAdmin => "tenant-admin",
    Viewer => "viewer",
});

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "platform-admin" => Ok(Role::PlatformAdmin),
            "tenant-admin" => Ok(Role::TenantAdmin),
            "viewer" => Ok(Role::Viewer),
            other => Err(format!(
                "unknown role {other:?} (platform-admin, tenant-admin or viewer)"
            )),
        }
    }
}

/// The subjects a role may publish on (the server enforces these on the admin's
/// NATS user; the controller checks again).
pub fn role_publish_allow(role: Role, tenant: Option<&TenantId>) -> Vec<String> {
    let p = ADMIN_PREFIX;
    match (role, tenant) {
        (Role::PlatformAdmin, _) => vec![format!("{p}.>")],
        (Role::TenantAdmin, Some(t)) => vec![
            format!("{p}.status"),
            format!("{p}.tenant.{t}.get"),
            format!("{p}.tenant.{t}.stats"),
            format!("{p}.tenant.{t}.update"),
            format!("{p}.tenant.{t}.rotate-key"),
            format!("{p}.agent.{t}.>"),
            format!("{p}.apikey.{t}.>"),
            format!("{p}.usage.{t}.>"),
            format!("{p}.budget.{t}.>"),
            format!("{p}.audit.{t}.>"),
        ],
        (Role::Viewer, Some(t)) => vec![
            format!("{p}.status"),
            format!("{p}.tenant.{t}.get"),
            format!("{p}.tenant.{t}.stats"),
            format!("{p}.agent.{t}.list"),
            format!("{p}.agent.{t}.get"),
            format!("{p}.apikey.{t}.list"),
            format!("{p}.usage.{t}.get"),
            format!("{p}.budget.{t}.list"),
            format!("{p}.audit.{t}.>"),
        ],
        (Role::Viewer, None) => vec![
            format!("{p}.status"),
            format!("{p}.tenants.list"),
            format!("{p}.tenant.*.get"),
            format!("{p}.tenant.*.stats"),
            format!("{p}.agent.*.list"),
            format!("{p}.agent.*.get"),
            format!("{p}.apikey.*.list"),
            format!("{p}.usage.*.get"),
            format!("{p}.budget.*.list"),
            format!("{p}.admins.list"),
            format!("{p}.audit.*.>"),
        ],
        // A tenant-admin always has a tenant (checked on create).
        (Role::TenantAdmin, None) => vec![],
    }
}

/// Whether `role` (scoped to `tenant`) may call `subject` (the controller's check).
pub fn role_allows(role: Role, tenant: Option<&TenantId>, subject: &str) -> bool {
    role_publish_allow(role, tenant)
        .iter()
        .any(|pattern| subject_matches(pattern, subject))
}

/// NATS subject matching (`*` one token, `>` the rest).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A typed error code on the wire. The CLI maps each to a distinct exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Bad input (ids, fields, values).
    InvalidInput,
    /// The tenant, agent or admin does not exist.
    NotFound,
    /// It exists already.
    AlreadyExists,
    /// Not allowed in the current state (suspended tenant, wrong transition,
    /// setting outside the tier) or for this admin's role.
    Refused,
    /// Unauthenticated or not permitted.
    Forbidden,
    /// Concurrent writers kept winning; retry.
    Conflict,
    /// NATS, JetStream or the controller is unreachable: an outage, not a user error.
    Unavailable,
    /// A bug or corrupt state.
    Internal,
    /// A budget's hard cap refused the charge (see `budget`); retry after
    /// the time the message names.
    BudgetExceeded,
}

tenant_bus::kind_display!(ErrorCode {
    InvalidInput => "invalid input",
    NotFound => "not found",
    AlreadyExists => "already exists",
    Refused => "refused",
    Forbidden => "forbidden",
    Conflict => "conflict",
    Unavailable => "unavailable",
    Internal => "internal error",
    BudgetExceeded => "budget exceeded",
});

/// An error on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// The code.
    pub code: ErrorCode,
    /// One line for a human.
    pub message: String,
}

impl ApiError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

/// A response envelope.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response<T> {
    /// Success.
    Ok(T),
    /// Failure.
    Error(ApiError),
}

/// `tenant.<id>.create`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateTenant {
    /// Tier name (default free).
    #[serde(default)]
    pub tier: Option<String>,
    /// Display name (default: the id).
    #[serde(default)]
    pub name: Option<String>,
    /// Allowed agent types (default: `default`).
    #[serde(default)]
    pub agent_types: Vec<String>,
    /// Quota overrides, field to value.
    #[serde(default)]
    pub quotas: std::collections::BTreeMap<String, String>,
    /// Create it without JetStream (every JetStream limit 0) instead of
    /// refusing when its reservation does not fit the servers.
    #[serde(default)]
    pub no_jetstream: bool,
    /// Data residency: keep the tenant's streams and buckets on the servers
    /// tagged `region:<name>` (refused when no such server answers, or fewer
    /// than the deployment's replica count). Cannot change later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// One server's JetStream limits and reservations, as it reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerJetStream {
    /// The server's name.
    pub server: String,
    /// Its `max_memory_store`, bytes.
    pub max_memory: i64,
    /// Its `max_file_store`, bytes.
    pub max_storage: i64,
    /// What the accounts it has loaded reserve now (lazily: only accounts
    /// that have connected), bytes.
    pub server_reserved_memory: i64,
    /// The same for storage.
    pub server_reserved_storage: i64,
    /// The server's tags (`server_tags` in its config; `region:<name>` places
    /// region-bound tenants).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// JetStream reserved by the tenants' records against what the servers allow
/// (`agentbus status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JetStreamCapacity {
    /// The sum of every tenant's `js_max_memory`.
    pub tenants_memory: u64,
    /// The sum of every tenant's `js_max_storage`.
    pub tenants_storage: u64,
    /// Each server's limits.
    pub servers: Vec<ServerJetStream>,
}

/// `tenant.<id>.update`: `set` fields then `unset` fields.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UpdateTenant {
    /// `name`, `tier`, `allow-agent-type`, `disallow-agent-type` or a quota field.
    #[serde(default)]
    pub set: Vec<(String, String)>,
    /// Quota fields whose override is removed (back to the tier's default).
    #[serde(default)]
    pub unset: Vec<String>,
}

/// Metered usage over a span: the servers' counters and reported units.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageTotals {
    /// Messages and bytes in and out, as the servers counted them.
    #[serde(flatten)]
    pub counters: crate::usage::Counters,
    /// Reported units, unit -> amount.
    #[serde(default)]
    pub units: std::collections::BTreeMap<String, u64>,
}

/// What the servers report for an account now, summed over the servers
/// that answered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveStats {
    /// Servers that answered.
    pub servers: u64,
    /// Live client connections.
    pub connections: u64,
    /// Live subscriptions.
    pub subscriptions: u64,
    /// Slow-consumer events the servers counted.
    pub slow_consumers: u64,
    /// The servers' counters since each started (in-memory, per server).
    pub since_server_start: crate::usage::Counters,
}

/// `tenant.<id>.stats` (`agentbus tenant stats`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantStats {
    /// The tenant.
    pub tenant: String,
    /// `active` or `suspended`.
    pub status: String,
    /// Its tier.
    pub tier: String,
    /// Its effective quotas.
    pub quotas: crate::tiers::Quotas,
    /// The servers' live figures.
    pub live: LiveStats,
    /// Metered usage in the current hour.
    pub usage_this_hour: UsageTotals,
    /// Metered usage since 00:00 UTC.
    pub usage_today: UsageTotals,
    /// Budgets with this period's spending.
    pub budgets: Vec<crate::budget::BudgetView>,
    /// Credentials policing has cut, to the end of their backoff (Unix ms).
    pub throttled: std::collections::BTreeMap<String, u64>,
    /// Policing strikes in the last 10 minutes.
    pub strikes_last_10m: usize,
    /// Issued agents not revoked.
    pub agents_issued: usize,
    /// Revoked agents.
    pub agents_revoked: usize,
    /// API keys that work now.
    pub api_keys_active: usize,
    /// The streams of the tenant's account (buckets are `KV_<bucket>`), as the
    /// servers report them: where each one's replicas are, and for a tenant
    /// bound to a region whether all of them are on that region's servers.
    #[serde(default)]
    pub streams: Vec<TenantStream>,
    /// The deployment's replica count. The placement pass raises a stream
    /// kept with fewer; one that stays below could not be raised (for
    /// example, the account's JetStream limits cannot hold the copies: the
    /// controller's log says why). 0 from a controller that predates it.
    #[serde(default)]
    pub replicas: usize,
    /// The platform stream holding the tenant's audit log: `AUDIT`, or
    /// `AUDIT_<region>` for a tenant created with a region (docs/audit.md).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub audit_log: String,
}

/// One stream of a tenant's account and where it lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantStream {
    /// The stream's name (`KV_<bucket>` for a bucket).
    pub name: String,
    /// Its configured replica count.
    pub replicas: usize,
    /// The servers holding it, leader first.
    pub nodes: Vec<String>,
    /// For a tenant with a region: whether every node holding the stream is
    /// tagged with that region. Absent for a tenant without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_region: Option<bool>,
}

/// `agent.<tenant>.create`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateAgent {
    /// The agent id.
    pub agent: String,
    /// Its type (default `default`).
    #[serde(default)]
    pub agent_type: Option<String>,
}

/// `agent.<tenant>.get` and `agent.<tenant>.revoke`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentRef {
    /// The agent id.
    pub agent: String,
}

/// `apikey.<tenant>.create`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateApiKey {
    /// A label (a slug).
    pub name: String,
    /// The agent type its logins act as (default `default`).
    #[serde(default)]
    pub agent_type: Option<String>,
    /// Scopes narrower than the tenant ([`crate::identity::scopes`]).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Lifetime in seconds (none: until revoked).
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
}

/// `apikey.<tenant>.revoke`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKeyRef {
    /// The key id.
    pub id: String,
}

/// `apikey.<tenant>.rotate`: a new key with the old one's settings; the old
/// key keeps working for `grace_secs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotateApiKey {
    /// The key id to replace.
    pub id: String,
    /// How long the old key keeps working, seconds.
    pub grace_secs: u64,
}

/// A created (or rotated-in) key: `key` is shown only here, once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IssuedApiKey {
    /// The key id.
    pub id: String,
    /// The key.
    pub key: String,
    /// The stored record (its hash, not the key).
    pub record: crate::store::ApiKeyRecord,
}

/// `admins.create`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateAdmin {
    /// A slug.
    pub name: String,
    /// The role.
    pub role: Role,
    /// The tenant (required for tenant-admin, optional for viewer).
    #[serde(default)]
    pub tenant: Option<String>,
}

/// `admins.revoke`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminRef {
    /// The admin's name.
    pub name: String,
}

/// What `admins.create` returns: the record and the `.creds` text (shown once).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IssuedAdmin {
    /// The record.
    pub admin: crate::store::AdminRecord,
    /// The admin's `.creds` text.
    pub creds: String,
}

/// What `agent.<tenant>.create` returns: the record and the bundle (shown once).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IssuedAgent {
    /// The record.
    pub agent: crate::store::AgentRecord,
    /// The credential bundle.
    pub bundle: tenant_bus::CredentialBundle,
}

/// A key-service request (`agentbus.keys.v1.<account>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeysRequest {
    /// The tenant the caller belongs to (checked against the account).
    pub tenant: String,
}

/// A key-service answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeysAnswer {
    /// The key set to use now.
    pub keys: tenant_bus::TenantKeySet,
    /// When to ask again at the latest (a staged rotation promotes then), Unix ms.
    pub refresh_at_ms: u64,
    /// Replicas and region of the streams and buckets the agent creates (the
    /// deployment's replica count, the tenant's region).
    #[serde(
        default,
        skip_serializing_if = "tenant_bus::region::StorePlacement::is_unset"
    )]
    pub placement: tenant_bus::region::StorePlacement,
}

/// `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The server's name and version as the controller sees them.
    pub server: String,
    /// The URLs the installation advertises.
    pub urls: Vec<String>,
    /// Controller instances answering the micro-service ping.
    pub controllers: usize,
    /// The instance that answered.
    pub controller_id: String,
    /// The replicas the answering controller keeps (the deployment's
    /// setting): a bucket below it is raised by the next placement pass.
    #[serde(default)]
    pub replicas: usize,
    /// Every bucket with its replicas.
    pub buckets: Vec<BucketStatus>,
    /// Tenants.
    pub tenants: usize,
    /// Cluster peers seen by JetStream (the meta group), if clustered.
    pub nodes: Vec<String>,
    /// JetStream the tenants reserve against what the servers allow.
    #[serde(default)]
    pub jetstream: JetStreamCapacity,
}

/// One bucket in `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BucketStatus {
    /// The bucket (a KV bucket's name) or stream.
    pub bucket: String,
    /// `bucket` or `stream`.
    #[serde(default)]
    pub kind: String,
    /// Its replicas.
    pub replicas: usize,
    /// Entries (including history).
    pub values: u64,
    /// The leader node, if known.
    #[serde(default)]
    pub leader: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_scope_subjects() {
        let acme = TenantId::new("acme").unwrap();
        let ta = |s: &str| role_allows(Role::TenantAdmin, Some(&acme), s);
        assert!(ta(&agent_subject("acme", "create")));
        assert!(ta(&tenant_subject("acme", "rotate-key")));
        assert!(!ta(&agent_subject("globex", "create")));
        assert!(!ta(&tenant_subject("acme", "delete")));
        assert!(!ta(&tenant_subject("acme", "suspend")));
        assert!(!ta(&format!("{ADMIN_PREFIX}.tenants.list")));
        assert!(ta(&format!("{ADMIN_PREFIX}.audit.acme.list")));
        assert!(!ta(&format!("{ADMIN_PREFIX}.audit.globex.list")));
        assert!(!ta(&format!("{ADMIN_PREFIX}.audit._platform.list")));
        let v = |s: &str| role_allows(Role::Viewer, None, s);
        assert!(v(&tenant_subject("globex", "get")));
        assert!(!v(&tenant_subject("globex", "update")));
        assert!(!v(&agent_subject("globex", "create")));
        assert!(role_allows(
            Role::PlatformAdmin,
            None,
            &admins_subject("create")
        ));
    }

    #[test]
    fn subject_matching() {
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(subject_matches("a.*.c", "a.b.c"));
        assert!(!subject_matches("a.*.c", "a.b.d"));
        assert!(!subject_matches("a.b", "a.b.c"));
    }
}
