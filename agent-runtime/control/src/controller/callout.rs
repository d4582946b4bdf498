//! The auth callout service: logins by API key (and platform JWT) become
//! short-lived users of the tenant's account, within `max_agents` live
//! connections per tenant, cluster-wide.
//!
//! # A login
//! 1. Open the server's sealed request ([`crate::identity::callout`]).
//! 2. Check the credential: an API key's checksum offline (a bad one is
//!    refused before any lookup), then its record (keyed hash compared in
//!    constant time, revoked, expired), then the tenant's record (exists,
//!    active, agent type allowed). The tenant comes only from the verified
//!    record.
//! 3. Take a connection slot: KV key `<tenant>.<n>` in
//!    [`crate::store::SESSIONS_BUCKET`] with `n < max_agents`, created with
//!    "create if absent", so concurrent logins on any controller never exceed
//!    the cap. A full tenant's slots are checked against the servers (CONNZ by
//!    connection id) before a refusal, and dead ones freed.
//! 4. Answer with a user JWT signed by the tenant account's signing key:
//!    `sub` = the server's per-connection user key, permissions from the key's
//!    scopes (always inside `tenant.<id>.`), expiry at most one hour and never
//!    past the key's.
//!
//! Every decision is an audit event (`login`, allowed or denied with the
//! reason; the server's own log misattributes callout denials, nats-server
//! #8441). A slot is freed when the server reports the client's disconnect
//! (`$SYS.ACCOUNT.<account>.DISCONNECT`; every controller keeps an index of
//! the slots by server and connection id from a watch of the bucket). Revoking
//! a key kicks its live connections (`$SYS.REQ.SERVER.<id>.KICK`): they
//! reconnect, and the callout refuses them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use nkeys::{KeyPair, XKey};
use serde::Deserialize;
use tenant_bus::TenantId;
use tokio::sync::Semaphore;

use super::shutdown::Shutdown;
use super::Controller;
use crate::api::{ApiError, ErrorCode};
use crate::audit::event::{new_event_id, Actor, AuditEvent, Outcome};
use crate::identity::{apikey, callout, scopes};
use crate::registry::TenantRecord;
use crate::store::{SessionRecord, Store};

/// The longest a callout-issued user JWT lives.
pub const MAX_LOGIN_SECS: i64 = 3600;
/// Logins handled at once by one controller.
pub const MAX_IN_FLIGHT: usize = 256;
/// The queue group of the callout subscription (one controller answers).
pub const QUEUE_GROUP: &str = "agentbus-callout";
/// A slot younger than this is never taken for dead (its login may still be
/// in flight: the server's auth timeout is 2 s).
pub const SLOT_SETTLE_MS: u64 = 5_000;

/// Counters of the callout (for `status`, metrics and tests).
#[derive(Debug, Default)]
pub struct CalloutCounters {
    /// Logins allowed.
    pub allowed: AtomicU64,
    /// Logins denied.
    pub denied: AtomicU64,
    /// Denied before any lookup (malformed key, bad checksum, no credential).
    pub refused_offline: AtomicU64,
    /// Key record lookups.
    pub key_lookups: AtomicU64,
    /// Requests that could not be opened (not answered).
    pub bad_requests: AtomicU64,
    /// Slots freed on disconnect.
    pub slots_freed: AtomicU64,
    /// Dead slots reclaimed after a server check.
    pub slots_reclaimed: AtomicU64,
    /// Connections kicked on revocation.
    pub kicked: AtomicU64,
}

/// Where a slot is: its KV key, revision and holder.
#[derive(Debug, Clone)]
struct Held {
    key: String,
    revision: u64,
    record: SessionRecord,
}

/// Every controller's view of the slots, from a watch of the bucket.
#[derive(Debug, Default)]
struct SessionIndex {
    by_key: HashMap<String, Held>,
    by_conn: HashMap<(String, u64), String>,
}

impl SessionIndex {
    fn put(&mut self, held: Held) {
        self.remove(&held.key);
        self.by_conn.insert(
            (held.record.server.clone(), held.record.client),
            held.key.clone(),
        );
        self.by_key.insert(held.key.clone(), held);
    }

    fn remove(&mut self, key: &str) {
        if let Some(old) = self.by_key.remove(key) {
            let conn = (old.record.server, old.record.client);
            if self.by_conn.get(&conn).is_some_and(|k| k == key) {
                self.by_conn.remove(&conn);
            }
        }
    }
}

/// The callout's state in a controller.
pub struct CalloutState {
    conn: async_nats::Client,
    auth: KeyPair,
    xkey: XKey,
    index: Mutex<SessionIndex>,
    signing: Mutex<HashMap<String, Arc<KeyPair>>>,
    counters: CalloutCounters,
}

impl std::fmt::Debug for CalloutState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CalloutState")
            .field("auth", &self.auth.public_key())
            .finish_non_exhaustive()
    }
}

impl CalloutState {
    /// The callout's connection (a user of the auth account), its signing key
    /// and its xkey.
    pub fn new(conn: async_nats::Client, auth: KeyPair, xkey: XKey) -> Self {
        Self {
            conn,
            auth,
            xkey,
            index: Mutex::new(SessionIndex::default()),
            signing: Mutex::new(HashMap::new()),
            counters: CalloutCounters::default(),
        }
    }

    /// Its counters.
    pub fn counters(&self) -> &CalloutCounters {
        &self.counters
    }
}

/// A refusal: the reason recorded (stable, short) and the tenant if known.
#[derive(Debug)]
struct Denial {
    reason: String,
    tenant: Option<TenantId>,
    credential: String,
}

fn deny(reason: impl Into<String>) -> Denial {
    Denial {
        reason: reason.into(),
        tenant: None,
        credential: String::new(),
    }
}

/// What a verified credential allows.
struct Login {
    tenant: TenantRecord,
    credential: String,
    name: String,
    agent_type: String,
    scopes: Vec<scopes::Scope>,
    expires_at: Option<i64>,
}

/// `$SYS.ACCOUNT.<account>.DISCONNECT` (the parts read here).
#[derive(Deserialize)]
struct DisconnectEvent {
    server: EventServer,
    client: EventClient,
}

#[derive(Deserialize)]
struct EventServer {
    id: String,
}

#[derive(Deserialize)]
struct EventClient {
    #[serde(default)]
    id: u64,
}

/// Three base64url parts, the first a JSON object (`eyJ`).
fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.matches('.').count() == 2
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn now_ms() -> u64 {
    tenant_bus::envelope::now_ms()
}

impl Controller {
    /// Serves the auth callout until `shutdown`: the request subscription, the
    /// slot index watch and the disconnect events.
    pub(crate) async fn run_callout(self: Arc<Self>, state: Arc<CalloutState>, shutdown: Shutdown) {
        let requests = match state
            .conn
            .queue_subscribe(callout::AUTH_SUBJECT, QUEUE_GROUP.to_string())
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "auth callout: cannot subscribe; logins by key are refused");
                return;
            }
        };
        tokio::spawn(self.clone().watch_sessions(state.clone(), shutdown.clone()));
        tokio::spawn(
            self.clone()
                .follow_disconnects(state.clone(), shutdown.clone()),
        );
        let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut requests = requests;
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                next = requests.next() => {
                    let Some(msg) = next else { break };
                    let Ok(permit) = limit.clone().acquire_owned().await else { break };
                    let me = self.clone();
                    let state = state.clone();
                    tokio::spawn(async move {
                        me.answer_login(&state, msg).await;
                        drop(permit);
                    });
                }
            }
        }
        let _ = requests.unsubscribe().await;
    }

    async fn answer_login(&self, state: &CalloutState, msg: async_nats::Message) {
        let Some(reply) = msg.reply.clone() else {
            bump(&state.counters.bad_requests);
            return;
        };
        let server_xkey = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(callout::XKEY_HEADER))
            .map(|v| v.as_str().to_string());
        let now = crate::install::now_unix();
        let request =
            match callout::open_request(&msg.payload, server_xkey.as_deref(), &state.xkey, now) {
                Ok(r) => r,
                Err(e) => {
                    // Without a valid request there is no user key to answer to:
                    // the server times the login out.
                    bump(&state.counters.bad_requests);
                    tracing::warn!(error = %e, "auth callout: unusable request");
                    return;
                }
            };
        let outcome = match self.login(state, &request, now).await {
            Ok(jwt) => {
                bump(&state.counters.allowed);
                metrics::counter!("agentbus_logins_total", "outcome" => "allowed", "reason" => "")
                    .increment(1);
                Ok(jwt)
            }
            Err(d) => {
                bump(&state.counters.denied);
                // The reason's code only (before any detail): a bounded label.
                let code = d.reason.split(':').next().unwrap_or("").trim().to_string();
                metrics::counter!("agentbus_logins_total", "outcome" => "denied", "reason" => code)
                    .increment(1);
                tracing::info!(reason = %d.reason, tenant = ?d.tenant, credential = %d.credential, "login denied");
                self.audit_login(
                    &request,
                    Outcome::Denied,
                    &d.reason,
                    d.tenant.as_ref(),
                    &d.credential,
                )
                .await;
                Err(d.reason)
            }
        };
        match callout::answer(&request, outcome, &state.auth, &state.xkey, now) {
            Ok(body) => {
                if let Err(e) = state.conn.publish(reply, body.into()).await {
                    tracing::warn!(error = %e, "auth callout: could not answer");
                }
            }
            Err(e) => tracing::error!(error = %e, "auth callout: could not sign an answer"),
        }
    }

    async fn login(
        &self,
        state: &CalloutState,
        request: &callout::AuthRequest,
        now: i64,
    ) -> Result<String, Denial> {
        let opts = &request.nats().connect_opts;
        let token = if !opts.auth_token.is_empty() {
            opts.auth_token.as_str()
        } else {
            // `nats://apikey:<key>@host` works too (some tools have no token flag).
            opts.pass.as_str()
        };
        let login = if token.starts_with(apikey::PREFIX) {
            self.key_login(state, token, now).await?
        } else if looks_like_jwt(token) {
            self.jwt_login(state, token, now).await?
        } else {
            bump(&state.counters.refused_offline);
            return Err(deny(if token.is_empty() {
                "no_credential"
            } else {
                "unknown_credential"
            }));
        };
        let tenant_id = login.tenant.id.clone();
        let credential = login.credential.clone();
        let with = |reason: String| Denial {
            reason,
            tenant: Some(tenant_id.clone()),
            credential: credential.clone(),
        };
        if self.is_throttled(&tenant_id, &credential).await {
            return Err(with(
                "throttled: over the tenant's rate; retry after the backoff".to_string(),
            ));
        }
        let slot = self
            .take_slot(state, request, &login)
            .await
            .map_err(|e| with(format!("unavailable: {}", e.message)))?;
        let Some(slot) = slot else {
            return Err(with(format!(
                "max_agents: tenant has {} live connections",
                login.tenant.quotas().max_agents
            )));
        };
        let jwt = match self.issue_login(state, request, &login, now).await {
            Ok(jwt) => jwt,
            Err(e) => {
                let _ = self.store.free_slot(&slot.0, slot.1).await;
                return Err(with(e));
            }
        };
        self.audit_login(request, Outcome::Allowed, "", Some(&tenant_id), &credential)
            .await;
        Ok(jwt)
    }

    async fn jwt_login(
        &self,
        state: &CalloutState,
        token: &str,
        now: i64,
    ) -> Result<Login, Denial> {
        let Some(verifier) = &self.config.platform_jwt else {
            bump(&state.counters.refused_offline);
            return Err(deny("jwt_not_configured"));
        };
        // Signature, issuer, audience, times, tenant and role: all offline.
        let identity = match verifier.verify(token, u64::try_from(now).unwrap_or(0)) {
            Ok(i) => i,
            Err(e) => {
                bump(&state.counters.refused_offline);
                return Err(deny(format!("jwt_{}", e.kind().reason())));
            }
        };
        let subject: String = identity.subject.chars().take(64).collect();
        let credential = format!("jwt:{subject}");
        let tenant = Some(&identity.tenant);
        let denied = |reason: &str| Denial {
            reason: reason.to_string(),
            tenant: tenant.cloned(),
            credential: credential.clone(),
        };
        let record = match self.store.registry.get(&identity.tenant).await {
            Ok(r) => r,
            Err(e) => return Err(denied(&format!("tenant: {e}"))),
        };
        if record.deleting || record.account.is_empty() {
            return Err(denied("tenant_deleted"));
        }
        if !record.is_active() {
            return Err(denied("tenant_suspended"));
        }
        if !record.allows_agent_type(&identity.agent_type) {
            return Err(denied("agent_type_not_allowed"));
        }
        Ok(Login {
            tenant: record,
            credential: credential.clone(),
            name: subject,
            agent_type: identity.agent_type.clone(),
            scopes: vec![],
            expires_at: i64::try_from(identity.expires_at).ok(),
        })
    }

    async fn key_login(&self, state: &CalloutState, key: &str, now: i64) -> Result<Login, Denial> {
        let id = match apikey::parse(key) {
            Ok(id) => id,
            Err(e) => {
                bump(&state.counters.refused_offline);
                return Err(deny(e.reason()));
            }
        };
        let credential = format!("key:{id}");
        let denied = |reason: &str, tenant: Option<&TenantId>| Denial {
            reason: reason.to_string(),
            tenant: tenant.cloned(),
            credential: credential.clone(),
        };
        bump(&state.counters.key_lookups);
        let (record, rev) = match self.store.apikey(id).await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(denied("unknown_key", None)),
            Err(e) => return Err(denied(&format!("unavailable: {}", e.message), None)),
        };
        if !apikey::verify(&self.pepper, key, &record.hash) {
            return Err(denied("bad_key", None));
        }
        let tenant = Some(&record.tenant);
        match record.status(now) {
            "active" => {}
            status => return Err(denied(status, tenant)),
        }
        let tenant_record = match self.store.registry.get(&record.tenant).await {
            Ok(r) => r,
            Err(e) => return Err(denied(&format!("tenant: {e}"), tenant)),
        };
        if tenant_record.deleting || tenant_record.account.is_empty() {
            return Err(denied("tenant_deleted", tenant));
        }
        if !tenant_record.is_active() {
            return Err(denied("tenant_suspended", tenant));
        }
        if !tenant_record.allows_agent_type(&record.agent_type) {
            return Err(denied("agent_type_not_allowed", tenant));
        }
        let parsed = scopes::validate(&record.scopes).map_err(|_| denied("bad_scopes", tenant))?;
        // Last use, at most once a minute, off the login's path.
        if record.last_used_at.is_none_or(|t| now - t >= 60) {
            let store = self.store.clone();
            let mut updated = record.clone();
            updated.last_used_at = Some(now);
            tokio::spawn(async move {
                let _ = store.update_apikey(&updated, rev).await;
            });
        }
        Ok(Login {
            tenant: tenant_record,
            credential,
            name: record.id.clone(),
            agent_type: record.agent_type.clone(),
            scopes: parsed,
            expires_at: record.expires_at,
        })
    }

    async fn issue_login(
        &self,
        state: &CalloutState,
        request: &callout::AuthRequest,
        login: &Login,
        now: i64,
    ) -> Result<String, String> {
        let account = &login.tenant.account;
        let cached = state
            .signing
            .lock()
            .ok()
            .and_then(|m| m.get(account).cloned());
        let signing = match cached {
            Some(k) => k,
            None => {
                let key = self
                    .tenant_signing(&login.tenant)
                    .await
                    .map_err(|e| format!("unavailable: {}", e.message))?
                    .ok_or_else(|| "tenant_has_no_signing_key".to_string())?;
                let key = Arc::new(key);
                if let Ok(mut m) = state.signing.lock() {
                    // Bounded: a full cache starts over (keys reload on demand).
                    if m.len() >= 10_000 {
                        m.clear();
                    }
                    m.insert(account.clone(), key.clone());
                }
                key
            }
        };
        let (publish, mut subscribe) =
            scopes::permissions(&login.tenant.id, account, &login.scopes);
        if let Some(id) = login.credential.strip_prefix("key:") {
            // The bootstrap inbox of `keys::connect_with_key`: before a key
            // client knows its tenant (and with it its inboxes) it asks the
            // server who it is and fetches its key set with replies here. Only
            // the server and the key service answer there: no agent may publish
            // on `_INBOX.` subjects.
            subscribe
                .allow
                .push(format!("{}.>", crate::keys::bootstrap_inbox(id)));
        }
        let exp = login
            .expires_at
            .map_or(now + MAX_LOGIN_SECS, |e| e.min(now + MAX_LOGIN_SECS));
        callout::issue_user(
            &signing,
            account,
            &request.nats().user_nkey,
            &login.name,
            publish,
            subscribe,
            vec![
                format!("tenant:{}", login.tenant.id),
                format!("type:{}", login.agent_type),
                login.credential.clone(),
            ],
            now,
            exp,
        )
        .map_err(|e| e.to_string())
    }

    /// Takes a free slot `< max_agents` for this connection: `Ok(None)` when the
    /// tenant is at its cap (after reclaiming dead slots once).
    async fn take_slot(
        &self,
        state: &CalloutState,
        request: &callout::AuthRequest,
        login: &Login,
    ) -> Result<Option<(String, u64)>, ApiError> {
        let cap = login.tenant.quotas().max_agents;
        let tenant = &login.tenant.id;
        let record = SessionRecord {
            server: request.nats().server_id.id.clone(),
            client: request.nats().client_info.id,
            user: request.nats().user_nkey.clone(),
            credential: login.credential.clone(),
            at_ms: now_ms(),
        };
        for attempt in 0..2 {
            // Probe from a random slot: concurrent logins rarely collide.
            let start = if cap == 0 { 0 } else { super::rand_u64() % cap };
            for i in 0..cap {
                let n = (start + i) % cap;
                if let Some(rev) = self.store.take_slot(tenant, n, &record).await? {
                    return Ok(Some((Store::session_key(tenant, n), rev)));
                }
            }
            if attempt == 0 && self.reclaim_dead_slots(state, tenant, cap).await == 0 {
                break;
            }
        }
        Ok(None)
    }

    /// Frees the slots of `tenant` whose connection the servers no longer
    /// have. Returns how many.
    async fn reclaim_dead_slots(&self, state: &CalloutState, tenant: &TenantId, cap: u64) -> usize {
        let mut freed = 0;
        let now = now_ms();
        for n in 0..cap {
            let Ok(Some((held, rev))) = self.store.slot(tenant, n).await else {
                continue;
            };
            if now.saturating_sub(held.at_ms) < SLOT_SETTLE_MS {
                continue;
            }
            if self.connection_alive(&held.server, held.client).await == Some(false)
                && self
                    .store
                    .free_slot(&Store::session_key(tenant, n), rev)
                    .await
                    .unwrap_or(false)
            {
                bump(&state.counters.slots_reclaimed);
                freed += 1;
            }
        }
        freed
    }

    /// Whether server `server` still has connection `cid`: `None` when it cannot
    /// tell (timeout), `Some(false)` when it answered without it or is gone.
    async fn connection_alive(&self, server: &str, cid: u64) -> Option<bool> {
        let subject = format!("$SYS.REQ.SERVER.{server}.CONNZ");
        let body = serde_json::json!({ "cid": cid }).to_string();
        let reply = tokio::time::timeout(
            Duration::from_secs(2),
            self.sys.request(subject, body.into()),
        )
        .await
        .ok()?;
        match reply {
            Ok(msg) => {
                let v: serde_json::Value = serde_json::from_slice(&msg.payload).ok()?;
                let conns = v.pointer("/data/connections")?.as_array()?;
                Some(
                    conns
                        .iter()
                        .any(|c| c.get("cid").and_then(|x| x.as_u64()) == Some(cid)),
                )
            }
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Some(false),
            Err(_) => None,
        }
    }

    /// The credential (`key:<id>`, `jwt:<sub>`) a callout login on `server`
    /// with connection id `cid` used, if it is one.
    pub(crate) fn session_credential(&self, server: &str, cid: u64) -> Option<String> {
        let state = self.callout.as_ref()?;
        let index = state.index.lock().ok()?;
        let key = index.by_conn.get(&(server.to_string(), cid))?;
        index.by_key.get(key).map(|h| h.record.credential.clone())
    }

    /// Closes every live connection that logged in with `credential`
    /// (`key:<id>`): the server kicks it; its reconnect meets the callout.
    pub(crate) async fn kick_credential(&self, credential: &str) {
        let Some(state) = &self.callout else { return };
        let targets: Vec<(String, u64)> = match state.index.lock() {
            Ok(index) => index
                .by_key
                .values()
                .filter(|h| h.record.credential == credential)
                .map(|h| (h.record.server.clone(), h.record.client))
                .collect(),
            Err(_) => return,
        };
        for (server, cid) in targets {
            if self.kick(&server, cid).await {
                bump(&state.counters.kicked);
            }
        }
    }

    /// Keeps the slot index current from a watch of the sessions bucket
    /// (restarted with a pause if it ends).
    async fn watch_sessions(self: Arc<Self>, state: Arc<CalloutState>, shutdown: Shutdown) {
        loop {
            let watch = self.store.sessions().watch_with_history(">").await;
            match watch {
                Ok(mut watch) => {
                    if let Ok(mut index) = state.index.lock() {
                        *index = SessionIndex::default();
                    }
                    loop {
                        tokio::select! {
                            _ = shutdown.wait() => return,
                            next = watch.next() => {
                                let Some(Ok(entry)) = next else { break };
                                let Ok(mut index) = state.index.lock() else { return };
                                match entry.operation {
                                    async_nats::jetstream::kv::Operation::Put => {
                                        if let Ok(record) = serde_json::from_slice::<SessionRecord>(&entry.value) {
                                            index.put(Held { key: entry.key.clone(), revision: entry.revision, record });
                                        }
                                    }
                                    _ => index.remove(&entry.key),
                                }
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "auth callout: watching sessions failed"),
            }
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Frees a slot when the server reports its client's disconnect.
    async fn follow_disconnects(self: Arc<Self>, state: Arc<CalloutState>, shutdown: Shutdown) {
        let mut events = match self.sys.subscribe("$SYS.ACCOUNT.*.DISCONNECT").await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "auth callout: cannot follow disconnects");
                return;
            }
        };
        loop {
            let msg = tokio::select! {
                _ = shutdown.wait() => return,
                next = events.next() => match next { Some(m) => m, None => return },
            };
            let Ok(event) = serde_json::from_slice::<DisconnectEvent>(&msg.payload) else {
                continue;
            };
            let conn = (event.server.id, event.client.id);
            let me = self.clone();
            let state = state.clone();
            tokio::spawn(async move {
                // The watch may not have delivered a brand-new slot yet: look
                // twice, a second apart.
                for _ in 0..2 {
                    let held =
                        state.index.lock().ok().and_then(|i| {
                            i.by_conn.get(&conn).and_then(|k| i.by_key.get(k).cloned())
                        });
                    if let Some(held) = held {
                        if me
                            .store
                            .free_slot(&held.key, held.revision)
                            .await
                            .unwrap_or(false)
                        {
                            bump(&state.counters.slots_freed);
                        }
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
        }
    }

    async fn audit_login(
        &self,
        request: &callout::AuthRequest,
        outcome: Outcome,
        reason: &str,
        tenant: Option<&TenantId>,
        credential: &str,
    ) {
        let (kind, id) = credential
            .split_once(':')
            .map(|(k, i)| (k.to_string(), i.to_string()))
            .unwrap_or_else(|| ("unknown".to_string(), String::new()));
        let nats = request.nats();
        let event = AuditEvent {
            action: "login".to_string(),
            actor: Actor {
                id,
                key: nats.user_nkey.clone(),
                kind,
                role: String::new(),
            },
            controller: String::new(),
            id: new_event_id(),
            index: 0,
            outcome,
            prev: String::new(),
            reason: reason.chars().take(120).collect(),
            request_id: format!("{}/{}", nats.server_id.name, nats.client_info.id),
            resource: match tenant {
                Some(t) => format!("tenant/{t}"),
                None => "platform".to_string(),
            },
            tenant: tenant
                .map(|t| t.to_string())
                .unwrap_or_else(|| crate::audit::event::PLATFORM_LOG.to_string()),
            time_ms: now_ms(),
            version: crate::audit::event::SCHEMA_VERSION,
        };
        self.audit.record(event).await;
    }
}

/// Loads the callout's keys from the secrets bucket and connects its user.
pub(crate) async fn open(
    install: &crate::install::Installation,
    urls: &str,
    store: &Store,
    kek: &crate::kek::Kek,
) -> Result<Option<Arc<CalloutState>>, crate::error::ControlError> {
    use crate::store::secret_name;
    if !install.has_callout() {
        return Ok(None);
    }
    let read = |name: &'static str| async move {
        let bytes = store
            .secret(kek, name)
            .await
            .map_err(super::from_api)?
            .ok_or_else(|| {
                super::cerr(
                    crate::error::ControlErrorKind::NotInitialized,
                    format!("secret {name} is not in the secrets bucket"),
                )
            })?;
        String::from_utf8(bytes).map_err(|_| {
            super::cerr(
                crate::error::ControlErrorKind::InvalidState,
                format!("secret {name} is not text"),
            )
        })
    };
    let auth = KeyPair::from_seed(read(secret_name::AUTH_ACCOUNT).await?.trim()).map_err(|e| {
        tenant_bus::error::Error::with_source(
            crate::error::ControlErrorKind::InvalidState,
            "auth account seed",
            e,
        )
    })?;
    let xkey = XKey::from_seed(read(secret_name::AUTH_XKEY).await?.trim()).map_err(|e| {
        tenant_bus::error::Error::with_source(
            crate::error::ControlErrorKind::InvalidState,
            "auth xkey seed",
            e,
        )
    })?;
    if auth.public_key() != install.facts().auth_account {
        return Err(super::cerr(
            crate::error::ControlErrorKind::InvalidState,
            "the auth account seed in NATS does not match install.json",
        ));
    }
    let conn = super::connect(urls, &install.creds("callout.creds")?, "agentbus-callout").await?;
    Ok(Some(Arc::new(CalloutState::new(conn, auth, xkey))))
}

impl From<ApiError> for Denial {
    fn from(e: ApiError) -> Self {
        deny(match e.code {
            ErrorCode::Unavailable => format!("unavailable: {}", e.message),
            _ => e.message,
        })
    }
}
