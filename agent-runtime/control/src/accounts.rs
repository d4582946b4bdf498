//! What the control plane signs: operator, account and user claims, the tenant
//! account limits taken from [`Quotas`], and the agent permission allow-list.
//!
//! # Agent permissions
//!
//! A tenant's agents connect to the tenant's own NATS account, so the server
//! already keeps every subject, inbox and JetStream resource of another tenant out
//! of reach: accounts share nothing without explicit exports/imports, and tenant
//! accounts export nothing and import only two services of the platform account,
//! each bound to the importing account (the key service and usage reports), and
//! the stream of their own budget alerts. The user
//! permissions below are defence in depth inside the account, and make an attempt
//! to address another tenant's subjects a *visible* permission violation instead
//! of a silent no-op:
//!
//! - publish and subscribe: `tenant.<id>.>` (the library's inbox prefix is
//!   `tenant.<id>._INBOX`, so replies need no `_INBOX.>`);
//! - publish only, for the tenant's own JetStream (see [`JetStreamScope`]):
//!   exactly the API calls task dispatch and the tenant state store make
//!   ([`agent_publish_allow`] lists them; `docs/control-plane.md` explains each),
//!   and `$JS.API.INFO` (the client reads its account limits before creating a
//!   bucket);
//! - publish only: `$SYS.REQ.USER.INFO` ([`USER_INFO_SUBJECT`]), where the
//!   server tells a connection its own user and account; the runtime asks it to
//!   learn an agent's tenant from the server (agents issued before it was
//!   allowed must be issued again to run on a runtime host).
//!
//! Not allowed: subscribing to anything outside `tenant.<id>.>` (`>`, `_INBOX.>`,
//! `$JS.API.>`, `$KV.>`, `$SYS.>`, ...), any other stream or bucket name,
//! changing, purging or deleting a stream (`STREAM.UPDATE`, `STREAM.PURGE`,
//! `STREAM.DELETE`, `STREAM.MSG.DELETE`), deleting, pausing or resetting a
//! consumer of `TASKS`, a consumer of `TASKS` that is not a worker's
//! (`CONSUMER.CREATE.TASKS.<name>.tenant.<id>.tasks.queue.<type>`) or the
//! dead-letter reader's, any consumer of `TASKS_DONE`, listing streams or
//! consumers, raw reads of `TASKS`, snapshots/restores, JetStream domains
//! (`$JS.<d>.API`) and the rest of `$SYS`.
//!
//! What a subject cannot say: the consumer create subject carries the stream,
//! the consumer's name and its filter, not its deliver subject, so the server
//! cannot tell a push consumer from a pull consumer by permission. `STATE`
//! watchers are push (ordered) consumers, so `STATE` allows them; a `TASKS`
//! consumer with an allowed name and filter may be created as a push consumer
//! for a task type no worker has claimed yet. JetStream delivers a push
//! consumer's messages only to subscriptions inside the tenant's own account,
//! all of them the tenant's (docs/control-plane.md, "Residual risk").

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
/// The durable consumer that reads a task stream's dead letters (the default
/// of `dispatch::DEAD_LETTER_CONSUMER`).
pub const DEAD_LETTER_CONSUMER: &str = "dead-letters";

/// The JetStream resources a tenant's agents may create and use, each with
/// only the API calls its use needs (see [`agent_publish_allow`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JetStreamScope {
    /// Work-queue streams of task dispatch, with its subject layout
    /// (`tenant.<id>.tasks.queue.<type>`, `tenant.<id>.tasks.dead.<type>`):
    /// created, read through worker and dead-letter pull consumers, acked.
    pub streams: Vec<String>,
    /// KV buckets agents read, write and watch (the tenant state store).
    pub kv_buckets: Vec<String>,
    /// KV buckets agents only read and write, never consume (task dispatch's
    /// done records).
    pub record_buckets: Vec<String>,
}

impl Default for JetStreamScope {
    /// The stream `TASKS`, the bucket `STATE` and the records `TASKS_DONE`.
    fn default() -> Self {
        Self {
            streams: vec![TASKS_STREAM.to_string()],
            kv_buckets: vec![STATE_BUCKET.to_string()],
            record_buckets: vec![TASKS_DONE_BUCKET.to_string()],
        }
    }
}

/// A task stream: created (an existing stream is never changed by a create),
/// read, and consumed only through a worker's consumer of one task type or the
/// dead-letter reader. No update, purge, delete, message delete, raw read,
/// consumer delete, legacy or unfiltered consumer create: each of those could
/// drop queued tasks or read around the workers.
fn task_stream_subjects(tenant: &TenantId, stream: &str, out: &mut Vec<String>) {
    out.push(format!("$JS.API.STREAM.CREATE.{stream}"));
    out.push(format!("$JS.API.STREAM.INFO.{stream}"));
    // `CONSUMER.CREATE.<stream>.<name>.<filter>`: the server checks that the
    // filter in the subject is the consumer's filter, so the filter is pinned to
    // one task type (or the dead letters). Names are free (a NATS wildcard is a
    // whole token, so `work-*` cannot be said); a work-queue stream refuses a
    // second consumer whose filter overlaps a worker's.
    out.push(format!(
        "$JS.API.CONSUMER.CREATE.{stream}.*.tenant.{tenant}.tasks.queue.*"
    ));
    // The same type's tasks on a one-copy-per-id stream
    // (`tasks.queue.<type>.<id hex>`, filter `tasks.queue.<type>.*`).
    out.push(format!(
        "$JS.API.CONSUMER.CREATE.{stream}.*.tenant.{tenant}.tasks.queue.*.*"
    ));
    out.push(format!(
        "$JS.API.CONSUMER.CREATE.{stream}.{DEAD_LETTER_CONSUMER}.tenant.{tenant}.tasks.dead.>"
    ));
    out.push(format!("$JS.API.CONSUMER.INFO.{stream}.*"));
    out.push(format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.*"));
    // Acks: `$JS.ACK.<stream>.<consumer>...` (v1) and
    // `$JS.ACK.<domain>.<account hash>.<stream>...` (v2).
    out.push(format!("$JS.ACK.{stream}.>"));
    out.push(format!("$JS.ACK.*.*.{stream}.>"));
}

/// Reads and writes of a KV bucket: create, info, direct and message gets, and
/// its keys (put, delete and purge markers are publishes on `$KV.<bucket>.<key>`).
fn bucket_subjects(bucket: &str, out: &mut Vec<String>) {
    let stream = format!("KV_{bucket}");
    out.push(format!("$JS.API.STREAM.CREATE.{stream}"));
    out.push(format!("$JS.API.STREAM.INFO.{stream}"));
    out.push(format!("$JS.API.DIRECT.GET.{stream}"));
    out.push(format!("$JS.API.DIRECT.GET.{stream}.>"));
    out.push(format!("$JS.API.STREAM.MSG.GET.{stream}"));
    out.push(format!("$KV.{bucket}.>"));
}

/// Watches of a KV bucket: ordered push consumers, created without a name
/// (async-nats, nats-py) or, when re-created after a gap, with a generated name
/// and a filter under `$KV.<bucket>.`; the replaced one is deleted; flow control
/// is answered. The bucket's content is readable through gets anyway.
fn watch_subjects(bucket: &str, out: &mut Vec<String>) {
    let stream = format!("KV_{bucket}");
    out.push(format!("$JS.API.CONSUMER.CREATE.{stream}"));
    out.push(format!("$JS.API.CONSUMER.CREATE.{stream}.*"));
    out.push(format!("$JS.API.CONSUMER.CREATE.{stream}.*.$KV.{bucket}.>"));
    out.push(format!("$JS.API.CONSUMER.INFO.{stream}.*"));
    out.push(format!("$JS.API.CONSUMER.DELETE.{stream}.*"));
    out.push(format!("$JS.FC.{stream}.>"));
}

/// The server's "who am I" service: it answers any connection with its own
/// user, account and permissions (nats-server's `userInfoReqSubj`).
pub const USER_INFO_SUBJECT: &str = "$SYS.REQ.USER.INFO";

/// The publish allow-list of an agent of `tenant` (see the module docs), for
/// the default scope:
///
/// ```text
/// tenant.<id>.>
/// $JS.API.INFO
/// agentbus.keys.v1.<account>
/// $SYS.REQ.USER.INFO
/// $JS.API.STREAM.CREATE.TASKS
/// $JS.API.STREAM.INFO.TASKS
/// $JS.API.CONSUMER.CREATE.TASKS.*.tenant.<id>.tasks.queue.*
/// $JS.API.CONSUMER.CREATE.TASKS.dead-letters.tenant.<id>.tasks.dead.>
/// $JS.API.CONSUMER.INFO.TASKS.*
/// $JS.API.CONSUMER.MSG.NEXT.TASKS.*
/// $JS.ACK.TASKS.>
/// $JS.ACK.*.*.TASKS.>
/// $JS.API.STREAM.CREATE.KV_STATE            (and the same six for KV_TASKS_DONE)
/// $JS.API.STREAM.INFO.KV_STATE
/// $JS.API.DIRECT.GET.KV_STATE
/// $JS.API.DIRECT.GET.KV_STATE.>
/// $JS.API.STREAM.MSG.GET.KV_STATE
/// $KV.STATE.>
/// $JS.API.CONSUMER.CREATE.KV_STATE          (watchers: STATE only)
/// $JS.API.CONSUMER.CREATE.KV_STATE.*
/// $JS.API.CONSUMER.CREATE.KV_STATE.*.$KV.STATE.>
/// $JS.API.CONSUMER.INFO.KV_STATE.*
/// $JS.API.CONSUMER.DELETE.KV_STATE.*
/// $JS.FC.KV_STATE.>
/// ```
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
        // Usage units the agent reports (its own account only).
        crate::api::usage_report_subject(account),
        // The server's answer to "who am I": this connection's own user, account
        // and permissions, nothing about anyone else. The runtime asks it before
        // it gives an agent its tenant's resources, so the tenant comes from the
        // account the server placed the connection in, not from the bundle's
        // label (agent-runtime's `agent::identity`).
        USER_INFO_SUBJECT.to_string(),
    ];
    for stream in &scope.streams {
        task_stream_subjects(tenant, stream, &mut allow);
    }
    for bucket in &scope.kv_buckets {
        bucket_subjects(bucket, &mut allow);
        watch_subjects(bucket, &mut allow);
    }
    for bucket in &scope.record_buckets {
        bucket_subjects(bucket, &mut allow);
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
        // The key service and the usage-report service, both imported from
        // the platform account and bound to this account, and the budget
        // alerts stream (its own alerts only).
        imports: 3,
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
        authorization: None,
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
    nats.exports = vec![
        Export {
            name: "agentbus-keys".to_string(),
            subject: format!("{}.*", crate::api::KEYS_PREFIX),
            kind: "service".to_string(),
            // agentbus.keys.v1.<account>: token 4 is the importer.
            account_token_position: 4,
        },
        Export {
            name: "agentbus-usage".to_string(),
            subject: format!("{}.*", crate::api::USAGE_REPORT_PREFIX),
            kind: "service".to_string(),
            // agentbus.usage.v1.<account>: token 4 is the importer.
            account_token_position: 4,
        },
        Export {
            name: "agentbus-events".to_string(),
            subject: format!("{}.*.>", crate::api::EVENTS_PREFIX),
            kind: "stream".to_string(),
            // agentbus.events.v1.<account>.<kind>: token 4 is the importer,
            // so an account can import only its own events.
            account_token_position: 4,
        },
    ];
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
    nats.imports = vec![
        Import {
            name: "agentbus-keys".to_string(),
            subject: crate::api::keys_subject(&record.account),
            account: platform_account.to_string(),
            kind: "service".to_string(),
            local_subject: String::new(),
        },
        Import {
            name: "agentbus-usage".to_string(),
            subject: crate::api::usage_report_subject(&record.account),
            account: platform_account.to_string(),
            kind: "service".to_string(),
            local_subject: String::new(),
        },
        // Budget alerts the controller publishes for this account appear on
        // the tenant's own events subject.
        Import {
            name: "agentbus-budget-events".to_string(),
            subject: crate::api::events_subject(&record.account, "budget"),
            account: platform_account.to_string(),
            kind: "stream".to_string(),
            local_subject: format!("tenant.{}.{}", record.id, crate::budget::ALERT_SUBJECT),
        },
    ];
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
            bearer_token: false,
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
        // The exact list: anything added here widens what every agent may do.
        let mut expected = vec![
            "tenant.acme.>".to_string(),
            "$JS.API.INFO".to_string(),
            crate::api::keys_subject("ATENANTACCOUNT"),
            crate::api::usage_report_subject("ATENANTACCOUNT"),
            USER_INFO_SUBJECT.to_string(),
            "$JS.API.STREAM.CREATE.TASKS".to_string(),
            "$JS.API.STREAM.INFO.TASKS".to_string(),
            "$JS.API.CONSUMER.CREATE.TASKS.*.tenant.acme.tasks.queue.*".to_string(),
            "$JS.API.CONSUMER.CREATE.TASKS.*.tenant.acme.tasks.queue.*.*".to_string(),
            "$JS.API.CONSUMER.CREATE.TASKS.dead-letters.tenant.acme.tasks.dead.>".to_string(),
            "$JS.API.CONSUMER.INFO.TASKS.*".to_string(),
            "$JS.API.CONSUMER.MSG.NEXT.TASKS.*".to_string(),
            "$JS.ACK.TASKS.>".to_string(),
            "$JS.ACK.*.*.TASKS.>".to_string(),
        ];
        for bucket in ["STATE", "TASKS_DONE"] {
            let stream = format!("KV_{bucket}");
            expected.extend([
                format!("$JS.API.STREAM.CREATE.{stream}"),
                format!("$JS.API.STREAM.INFO.{stream}"),
                format!("$JS.API.DIRECT.GET.{stream}"),
                format!("$JS.API.DIRECT.GET.{stream}.>"),
                format!("$JS.API.STREAM.MSG.GET.{stream}"),
                format!("$KV.{bucket}.>"),
            ]);
            if bucket == "STATE" {
                expected.extend([
                    "$JS.API.CONSUMER.CREATE.KV_STATE".to_string(),
                    "$JS.API.CONSUMER.CREATE.KV_STATE.*".to_string(),
                    "$JS.API.CONSUMER.CREATE.KV_STATE.*.$KV.STATE.>".to_string(),
                    "$JS.API.CONSUMER.INFO.KV_STATE.*".to_string(),
                    "$JS.API.CONSUMER.DELETE.KV_STATE.*".to_string(),
                    "$JS.FC.KV_STATE.>".to_string(),
                ]);
            }
        }
        assert_eq!(allow, expected);

        // What is refused, spelled out: nothing changes, empties or deletes a
        // stream, nothing deletes a task consumer, no consumer of the done
        // records, no unfiltered or legacy consumer create on TASKS.
        for api in [
            "STREAM.UPDATE",
            "STREAM.PURGE",
            "STREAM.DELETE",
            "STREAM.MSG.DELETE",
            "STREAM.SNAPSHOT",
            "STREAM.RESTORE",
            "STREAM.NAMES",
            "STREAM.LIST",
            "CONSUMER.DURABLE.CREATE",
            "CONSUMER.PAUSE",
            "CONSUMER.RESET",
            "CONSUMER.UNPIN",
            "CONSUMER.LIST",
            "CONSUMER.NAMES",
        ] {
            assert!(!allow.iter().any(|s| s.contains(api)), "{api}");
        }
        assert!(!allow.iter().any(|s| s.contains("CONSUMER.DELETE.TASKS")));
        assert!(!allow.iter().any(|s| s.contains("KV_TASKS_DONE")
            && (s.contains("CONSUMER.") || s.starts_with("$JS.FC") || s.starts_with("$JS.ACK"))));
        assert!(!allow.contains(&"$JS.API.CONSUMER.CREATE.TASKS".to_string()));
        assert!(!allow.contains(&"$JS.API.CONSUMER.CREATE.TASKS.>".to_string()));
        assert!(!allow.iter().any(|s| s.starts_with("$JS.FC.TASKS")));
        assert!(!allow
            .iter()
            .any(|s| s.starts_with("$JS.API.DIRECT.GET.TASKS") || s.contains("MSG.GET.TASKS")));
        assert!(!allow
            .iter()
            .any(|s| s.starts_with("$SYS.") && s != USER_INFO_SUBJECT));
        assert!(!allow.iter().any(|s| s.starts_with("$KV.*") || s == "$KV.>"));
        assert!(!allow
            .iter()
            .any(|s| s == ">" || s == "$JS.API.>" || s.starts_with("_INBOX")));
        // Every consumer create on TASKS pins the filter to this tenant's tasks.
        for s in allow
            .iter()
            .filter(|s| s.starts_with("$JS.API.CONSUMER.CREATE.TASKS"))
        {
            assert!(s.contains(".tenant.acme.tasks."), "{s}");
        }
    }
}
