//! What the control plane signs: operator, account and user claims, the tenant
//! account limits taken from [`Quotas`], and the agent permission allow-list.
//!
//! # Agent permissions
//!
//! A tenant's agents connect to the tenant's own NATS account, so the server
//! already keeps every subject, inbox and JetStream resource of another tenant out
//! of reach: accounts share nothing without explicit exports/imports, and tenant
//! accounts have none (their `imports` and `exports` limits are 0). The user
//! permissions below are defence in depth inside the account, and make an attempt
//! to address another tenant's subjects a *visible* permission violation instead
//! of a silent no-op:
//!
//! - publish and subscribe: `tenant.<id>.>` (the library's inbox prefix is
//!   `tenant.<id>._INBOX`, so replies need no `_INBOX.>`);
//! - publish only, for the tenant's own JetStream (see [`JetStreamScope`]): the
//!   JetStream API subjects of exactly the stream `TASKS` and the KV buckets
//!   `STATE` (stream `KV_STATE`) and `TASKS_DONE` (stream `KV_TASKS_DONE`, where
//!   task dispatch records finished task ids), their ack and flow-control
//!   subjects, `$KV.STATE.>`, `$KV.TASKS_DONE.>` and `$JS.API.INFO` (the client
//!   reads its account limits before creating a bucket);
//! - publish only: `$SYS.REQ.USER.INFO` ([`USER_INFO_SUBJECT`]), where the
//!   server tells a connection its own user and account; the runtime asks it to
//!   learn an agent's tenant from the server (agents issued before it was
//!   allowed must be issued again to run on a runtime host).
//!
//! Not allowed: subscribing to anything outside `tenant.<id>.>` (`>`, `_INBOX.>`,
//! `$JS.API.>`, `$KV.>`, `$SYS.>`, ...), any other stream or bucket name, listing
//! streams (`STREAM.NAMES`/`STREAM.LIST`), deleting or purging streams, raw
//! `STREAM.MSG.GET` on `TASKS`, snapshots/restores, JetStream domains (`$JS.<d>.API`)
//! and the rest of `$SYS`.

use std::collections::BTreeMap;

use nkeys::KeyPair;
use tenant_bus::TenantId;

use crate::error::ControlError;
use crate::jwt::{
    self, AccountClaims, AccountLimits, AccountNats, Claims, DeleteAccountsNats, Export, Import,
    OperatorClaims, OperatorNats, Permission, UserClaims, UserNats, NO_LIMIT,
};
use crate::registry::{Status, TenantRecord};
use crate::tiers::Quotas;

/// The work-queue stream every tenant may create in its own account.
pub const TASKS_STREAM: &str = "TASKS";
/// The KV bucket every tenant may create in its own account (stream `KV_STATE`).
pub const STATE_BUCKET: &str = "STATE";
/// The bucket of finished task ids task dispatch keeps in the tenant's account
/// (stream `KV_TASKS_DONE`; the default of `dispatch::DEFAULT_DONE_BUCKET`).
pub const TASKS_DONE_BUCKET: &str = "TASKS_DONE";

/// The JetStream resources a tenant's agents may create and use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JetStreamScope {
    /// Stream names (work queues, event logs).
    pub streams: Vec<String>,
    /// KV bucket names.
    pub kv_buckets: Vec<String>,
}

impl Default for JetStreamScope {
    /// `TASKS` and the buckets `STATE` and `TASKS_DONE`.
    fn default() -> Self {
        Self {
            streams: vec![TASKS_STREAM.to_string()],
            kv_buckets: vec![STATE_BUCKET.to_string(), TASKS_DONE_BUCKET.to_string()],
        }
    }
}

/// The subjects of the JetStream API, ack and flow control for one stream.
fn stream_api_subjects(stream: &str, out: &mut Vec<String>) {
    for api in [
        "STREAM.CREATE",
        "STREAM.UPDATE",
        "STREAM.INFO",
        "CONSUMER.CREATE",
    ] {
        out.push(format!("$JS.API.{api}.{stream}"));
    }
    // `CONSUMER.CREATE.<stream>.<consumer>[.<filter>]`, the named-consumer form.
    out.push(format!("$JS.API.CONSUMER.CREATE.{stream}.>"));
    for api in [
        "CONSUMER.DURABLE.CREATE",
        "CONSUMER.INFO",
        "CONSUMER.DELETE",
        "CONSUMER.MSG.NEXT",
    ] {
        out.push(format!("$JS.API.{api}.{stream}.*"));
    }
    // Acks: `$JS.ACK.<stream>.<consumer>...` (v1) and
    // `$JS.ACK.<domain>.<account hash>.<stream>...` (v2).
    out.push(format!("$JS.ACK.{stream}.>"));
    out.push(format!("$JS.ACK.*.*.{stream}.>"));
    // Flow-control replies of push/ordered consumers (KV watchers).
    out.push(format!("$JS.FC.{stream}.>"));
}

/// The server's "who am I" service: it answers any connection with its own
/// user, account and permissions (nats-server's `userInfoReqSubj`).
pub const USER_INFO_SUBJECT: &str = "$SYS.REQ.USER.INFO";

/// The publish allow-list of an agent of `tenant` (see the module docs).
pub fn agent_publish_allow(
    tenant: &TenantId,
    account: &str,
    scope: &JetStreamScope,
) -> Vec<String> {
    let mut allow = vec![
        format!("tenant.{tenant}.>"),
        "$JS.API.INFO".to_string(),
        // The key service imported from the platform account (its own account only).
        crate::api::keys_subject(account),
        // The server's answer to "who am I": this connection's own user, account
        // and permissions, nothing about anyone else. The runtime asks it before
        // it gives an agent its tenant's resources, so the tenant comes from the
        // account the server placed the connection in, not from the bundle's
        // label (agent-runtime's `agent::identity`).
        USER_INFO_SUBJECT.to_string(),
    ];
    for stream in &scope.streams {
        stream_api_subjects(stream, &mut allow);
    }
    for bucket in &scope.kv_buckets {
        let stream = format!("KV_{bucket}");
        stream_api_subjects(&stream, &mut allow);
        allow.push(format!("$JS.API.DIRECT.GET.{stream}"));
        allow.push(format!("$JS.API.DIRECT.GET.{stream}.>"));
        allow.push(format!("$JS.API.STREAM.MSG.GET.{stream}"));
        allow.push(format!("$KV.{bucket}.>"));
    }
    allow
}

/// The subscribe allow-list of an agent of `tenant`.
pub fn agent_subscribe_allow(tenant: &TenantId) -> Vec<String> {
    vec![format!("tenant.{tenant}.>")]
}

/// Clamps a quota to the server's 32-bit limit fields (it reads `subs`, `payload`
/// and `conn` as int32; a wrapped value would turn negative, i.e. unlimited).
fn limit32(v: u64) -> i64 {
    i64::from(i32::try_from(v).unwrap_or(i32::MAX))
}

fn limit64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A tenant account's limits from its quotas; `suspended` sets connections and
/// leaf nodes to 0.
pub fn tenant_limits(quotas: &Quotas, suspended: bool) -> AccountLimits {
    AccountLimits {
        subs: limit32(quotas.max_subscriptions),
        data: NO_LIMIT,
        payload: limit32(quotas.max_payload),
        // One import: the key service of the platform account.
        imports: 1,
        exports: 0,
        wildcards: false,
        disallow_bearer: true,
        conn: if suspended {
            0
        } else {
            limit32(quotas.max_connections)
        },
        leaf: 0,
        mem_storage: limit64(quotas.js_max_memory),
        disk_storage: limit64(quotas.js_max_storage),
        streams: limit64(quotas.js_max_streams),
        consumer: limit64(quotas.js_max_consumers),
    }
}

fn account_nats(
    limits: AccountLimits,
    revocations: BTreeMap<String, i64>,
    tags: Vec<String>,
) -> AccountNats {
    AccountNats {
        limits,
        revocations,
        signing_keys: vec![],
        imports: vec![],
        exports: vec![],
        tags,
        kind: "account".to_string(),
        version: 2,
    }
}

/// The `iat` for re-signing an account whose previous JWT had `previous`: now, or
/// one second after the previous one if that is not earlier. Cluster resolvers
/// keep the JWT with the newer `iat` and skip an equal `jti` when they sync, so
/// every update must be strictly newer to reach every node.
pub fn next_iat(now: i64, previous: Option<i64>) -> i64 {
    match previous {
        Some(p) if p >= now => p + 1,
        _ => now,
    }
}

/// The self-signed operator JWT.
pub fn operator_jwt(
    operator: &KeyPair,
    system_account: &str,
    iat: i64,
) -> Result<String, ControlError> {
    let mut claims: OperatorClaims = Claims::new(
        operator.public_key(),
        "agentbus",
        iat,
        OperatorNats {
            system_account: system_account.to_string(),
            signing_keys: vec![],
            tags: vec![],
            kind: "operator".to_string(),
            version: 2,
        },
    );
    jwt::encode(&mut claims, operator)
}

/// The system account JWT (no limits, no JetStream).
pub fn system_account_jwt(
    operator: &KeyPair,
    account: &str,
    iat: i64,
) -> Result<String, ControlError> {
    let mut claims: AccountClaims = Claims::new(
        account,
        crate::SYSTEM_ACCOUNT,
        iat,
        account_nats(
            AccountLimits::unlimited_without_jetstream(),
            BTreeMap::new(),
            vec![],
        ),
    );
    jwt::encode(&mut claims, operator)
}

/// The platform account JWT: no limits, JetStream unlimited (for the runtime's
/// registry KV and its own streams).
pub fn platform_account_jwt(
    operator: &KeyPair,
    account: &str,
    signing_key: &str,
    iat: i64,
) -> Result<String, ControlError> {
    platform_account_jwt_with_revocations(operator, account, signing_key, BTreeMap::new(), iat)
}

/// The platform account JWT with user revocations (revoked admins: the server
/// closes their connections and refuses their credentials).
pub fn platform_account_jwt_with_revocations(
    operator: &KeyPair,
    account: &str,
    signing_key: &str,
    revocations: BTreeMap<String, i64>,
    iat: i64,
) -> Result<String, ControlError> {
    let mut limits = AccountLimits::unlimited_without_jetstream();
    limits.mem_storage = NO_LIMIT;
    limits.disk_storage = NO_LIMIT;
    limits.streams = NO_LIMIT;
    limits.consumer = NO_LIMIT;
    let mut nats = account_nats(limits, revocations, vec![]);
    nats.signing_keys = vec![signing_key.to_string()];
    nats.exports = vec![Export {
        name: "agentbus-keys".to_string(),
        subject: format!("{}.*", crate::api::KEYS_PREFIX),
        kind: "service".to_string(),
        // agentbus.keys.v1.<account>: token 4 is the importer.
        account_token_position: 4,
    }];
    let mut claims: AccountClaims = Claims::new(account, crate::PLATFORM_ACCOUNT, iat, nats);
    jwt::encode(&mut claims, operator)
}

/// A tenant's account JWT from its record: limits from its quotas, connections 0
/// and a `*` revocation while suspended, its user revocations.
pub fn tenant_account_jwt(
    operator: &KeyPair,
    record: &TenantRecord,
    platform_account: &str,
    iat: i64,
) -> Result<String, ControlError> {
    let suspended = record.status == Status::Suspended && !record.deleting;
    let mut limits = tenant_limits(&record.quotas(), suspended);
    if record.deleting {
        // Every user is revoked (`*`); one connection stays for the controller's
        // clean-up user, issued after the revocation.
        limits.conn = 1;
    }
    let mut nats = account_nats(
        limits,
        record.revocations.clone(),
        vec![
            format!("tenant:{}", record.id),
            format!("tier:{}", record.tier),
        ],
    );
    nats.signing_keys = vec![record.signing_key.clone()];
    nats.imports = vec![Import {
        name: "agentbus-keys".to_string(),
        subject: crate::api::keys_subject(&record.account),
        account: platform_account.to_string(),
        kind: "service".to_string(),
    }];
    let mut claims: AccountClaims = Claims::new(
        record.account.clone(),
        format!("tenant-{}", record.id),
        iat,
        nats,
    );
    jwt::encode(&mut claims, operator)
}

/// The operator-signed request that deletes `accounts` from full resolvers
/// (`$SYS.REQ.CLAIMS.DELETE`; the servers need `allow_delete: true`).
pub fn delete_accounts_jwt(
    operator: &KeyPair,
    accounts: Vec<String>,
    iat: i64,
) -> Result<String, ControlError> {
    let mut claims = Claims::new(
        operator.public_key(),
        "",
        iat,
        DeleteAccountsNats { accounts },
    );
    jwt::encode(&mut claims, operator)
}

/// A user JWT with the given permissions, signed by `signer`: the account's
/// identity key (`issuer_account` `None`) or one of its signing keys
/// (`issuer_account` = the account's public key).
#[allow(clippy::too_many_arguments)]
pub fn user_jwt(
    signer: &KeyPair,
    issuer_account: Option<&str>,
    user: &str,
    name: &str,
    publish: Permission,
    subscribe: Permission,
    tags: Vec<String>,
    iat: i64,
) -> Result<String, ControlError> {
    let mut claims: UserClaims = Claims::new(
        user,
        name,
        iat,
        UserNats {
            publish,
            subscribe,
            subs: NO_LIMIT,
            data: NO_LIMIT,
            payload: NO_LIMIT,
            issuer_account: issuer_account.map(str::to_string),
            tags,
            kind: "user".to_string(),
            version: 2,
        },
    );
    jwt::encode(&mut claims, signer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iat_is_strictly_increasing() {
        assert_eq!(next_iat(100, None), 100);
        assert_eq!(next_iat(100, Some(90)), 100);
        assert_eq!(next_iat(100, Some(100)), 101);
        assert_eq!(next_iat(100, Some(105)), 106);
    }

    #[test]
    fn limits_clamp_and_suspend() {
        let mut q = Quotas::for_tier(crate::tiers::Tier::Free);
        q.max_payload = u64::MAX;
        let l = tenant_limits(&q, false);
        assert_eq!(l.payload, i64::from(i32::MAX));
        assert_eq!(l.conn, 10);
        assert_eq!(tenant_limits(&q, true).conn, 0);
    }

    #[test]
    fn allow_list_is_scoped() {
        let t = TenantId::new("acme").unwrap();
        let allow = agent_publish_allow(&t, "ATENANTACCOUNT", &JetStreamScope::default());
        assert!(allow.contains(&"tenant.acme.>".to_string()));
        assert!(allow.contains(&USER_INFO_SUBJECT.to_string()));
        assert!(!allow
            .iter()
            .any(|s| s.starts_with("$SYS.") && s != USER_INFO_SUBJECT));
        assert!(allow.contains(&"$JS.API.STREAM.CREATE.TASKS".to_string()));
        assert!(allow.contains(&"$KV.STATE.>".to_string()));
        // Task dispatch's done bucket, narrowly: its stream's API and its keys.
        assert!(allow.contains(&"$KV.TASKS_DONE.>".to_string()));
        assert!(allow.contains(&"$JS.API.STREAM.CREATE.KV_TASKS_DONE".to_string()));
        assert!(allow.contains(&"$JS.API.DIRECT.GET.KV_TASKS_DONE.>".to_string()));
        assert!(!allow.iter().any(|s| s.contains("TASKS_DONE")
            && (s.contains("PURGE") || s.contains("STREAM.DELETE") || s.contains("SNAPSHOT"))));
        assert!(!allow.iter().any(|s| s.starts_with("$KV.*") || s == "$KV.>"));
        assert!(!allow
            .iter()
            .any(|s| s == ">" || s == "$JS.API.>" || s.starts_with("_INBOX")));
    }
}
