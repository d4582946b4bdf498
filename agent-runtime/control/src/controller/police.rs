//! Policing: message and byte rates that hold against raw clients.
//!
//! The runtime's scheduler admits exactly what a tenant may send, but only
//! for code that asks it; a raw NATS client with a tenant's credentials asks
//! nobody. The servers count every message anyway, so the controller polices
//! from their counters:
//!
//! 1. Every [`crate::ControllerConfig::police_every`] (1 s) one controller (the
//!    holder of a lease record; any takes over within 3 s) reads every
//!    server's account statistics and computes each tenant's publish rate
//!    since the previous poll.
//! 2. A tenant above `messages_per_window` or `bytes_per_window` per
//!    `window_ms` by more than [`TOLERANCE`] is an offender. Its connections
//!    that published in the interval are listed (CONNZ per server, by
//!    account) and the heaviest are cut until the rest fit the cap:
//!    - a user with issued credentials is revoked in the tenant's account
//!      (the server closes its connections and refuses the same credentials)
//!      until its backoff ends, then unrevoked;
//!    - a login by API key or platform JWT is kicked, and the callout refuses
//!      that key or subject until the backoff ends.
//! 3. Backoffs grow ([`BACKOFF`]); the [`STRIKES_TO_SUSPEND`]th strike within
//!    [`STRIKE_WINDOW`] suspends the tenant (an admin activates it again).
//!
//! Every action is an audit event (`policing.throttle`, `policing.suspend`).
//!
//! # The bound (docs/bounds.md)
//! Detection needs two polls, so a flood runs for at most two poll intervals
//! plus the time to cut (one claim push or kick, milliseconds) before it is
//! cut: the excess is at most rate x (2 x interval + cut time) per strike.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tenant_bus::TenantId;

use super::Controller;
use crate::api::ApiError;
use crate::audit::event::{new_event_id, Actor, AuditEvent, Outcome};
use crate::registry::TenantRecord;
use crate::usage::Counters;

/// How far above its rate a tenant may go before it is cut (0.5: 150 %).
pub const TOLERANCE: f64 = 0.5;
/// Backoff per strike (the last repeats until suspension).
pub const BACKOFF: [Duration; 3] = [
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(120),
];
/// Strikes within [`STRIKE_WINDOW`] that suspend a tenant.
pub const STRIKES_TO_SUSPEND: usize = 3;
/// The window strikes are counted in.
pub const STRIKE_WINDOW: Duration = Duration::from_secs(600);
/// The lease of the policing controller.
const LEASE_MS: u64 = 3_000;

/// A tenant's policing state, KV `<tenant>.police` in the usage bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoliceState {
    /// Cut users and credentials: `user:<nkey>`, `key:<id>`, `jwt:<subject>`
    /// to the end of their backoff (Unix ms).
    #[serde(default)]
    pub throttled: BTreeMap<String, u64>,
    /// When strikes happened (Unix ms), the recent ones.
    #[serde(default)]
    pub strikes: Vec<u64>,
}

/// The lease record.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Lease {
    holder: String,
    until_ms: u64,
}

/// What the policing controller remembers between polls.
#[derive(Debug, Default)]
pub(crate) struct PoliceMemory {
    /// (server, account) -> counters and when seen.
    prev: HashMap<(String, String), (Counters, u64)>,
    /// (server, cid) -> in_msgs last seen.
    conns: HashMap<(String, u64), (u64, u64)>,
}

/// A connection as CONNZ lists it.
struct Conn {
    server: String,
    cid: u64,
    user: String,
    msgs: u64,
    bytes: u64,
}

fn state_key(tenant: &TenantId) -> String {
    format!("{tenant}.police")
}

impl Controller {
    /// The tenant's policing state (empty when none).
    pub(crate) async fn police_state(
        &self,
        tenant: &TenantId,
    ) -> Result<(PoliceState, Option<u64>), ApiError> {
        match self
            .books(tenant)
            .await?
            .get::<PoliceState>(&state_key(tenant))
            .await?
        {
            Some((s, rev)) => Ok((s, Some(rev))),
            None => Ok((PoliceState::default(), None)),
        }
    }

    /// Whether `credential` of `tenant` is cut now (the callout's check).
    pub(crate) async fn is_throttled(&self, tenant: &TenantId, credential: &str) -> bool {
        let now = tenant_bus::envelope::now_ms();
        match self.police_state(tenant).await {
            Ok((s, _)) => s
                .throttled
                .get(credential)
                .is_some_and(|until| *until > now),
            Err(_) => false,
        }
    }

    pub(super) async fn hold_lease(&self) -> bool {
        let now = tenant_bus::envelope::now_ms();
        let key = "police.lease";
        let current = self.store.usage_get::<Lease>(key).await.ok().flatten();
        let mine = Lease {
            holder: self.id.clone(),
            until_ms: now + LEASE_MS,
        };
        match current {
            None => self
                .store
                .usage_put(key, &mine, None)
                .await
                .unwrap_or(false),
            Some((l, rev)) if l.holder == self.id || l.until_ms < now => self
                .store
                .usage_put(key, &mine, Some(rev))
                .await
                .unwrap_or(false),
            Some(_) => false,
        }
    }

    /// Gives the lease up at shutdown, so another controller polices at once
    /// rather than after the lease runs out.
    pub(crate) async fn release_police_lease(&self) {
        let key = "police.lease";
        if let Ok(Some((l, rev))) = self.store.usage_get::<Lease>(key).await {
            if l.holder == self.id {
                let free = Lease {
                    holder: String::new(),
                    until_ms: 0,
                };
                let _ = self.store.usage_put(key, &free, Some(rev)).await;
            }
        }
    }

    /// One policing pass over a poll's answers (server -> account -> counters).
    pub(crate) async fn police(
        &self,
        seen: &super::usage_poll::Stats,
        tenants: &HashMap<String, TenantRecord>,
        now: u64,
    ) {
        if !self.hold_lease().await {
            return;
        }
        // Rates since the previous poll, per tenant.
        let mut rates: HashMap<String, (f64, f64)> = HashMap::new();
        {
            let Ok(mut memory) = self.police_memory.lock() else {
                return;
            };
            for (server, stats) in seen {
                // The time the server's answer arrived, not the time of this
                // pass: the two differ by the poll's own duration.
                let at_now = stats.at_ms;
                for (acc, c) in &stats.accounts {
                    let key = (server.clone(), acc.clone());
                    if let Some((prev, at)) = memory.prev.get(&key) {
                        let dt = at_now.saturating_sub(*at).max(1) as f64 / 1000.0;
                        let d = c.since(prev);
                        let r = rates.entry(acc.clone()).or_default();
                        r.0 += d.msgs_in as f64 / dt;
                        r.1 += d.bytes_in as f64 / dt;
                    }
                    memory.prev.insert(key, (*c, at_now));
                }
            }
        }
        for (acc, (msgs_rate, bytes_rate)) in rates {
            let Some(record) = tenants.get(&acc) else {
                continue;
            };
            if !record.is_active() {
                continue;
            }
            let q = record.quotas();
            let window_s = q.window_ms.max(1) as f64 / 1000.0;
            let cap_msgs = q.messages_per_window as f64 / window_s;
            let cap_bytes = q.bytes_per_window as f64 / window_s;
            if msgs_rate > cap_msgs * (1.0 + TOLERANCE)
                || bytes_rate > cap_bytes * (1.0 + TOLERANCE)
            {
                let servers: Vec<String> = seen
                    .iter()
                    .filter(|(_, stats)| stats.accounts.contains_key(&acc))
                    .map(|(s, _)| s.clone())
                    .collect();
                if let Err(e) = self.cut(record, &servers, msgs_rate, cap_msgs, now).await {
                    tracing::warn!(tenant = %record.id, error = %e, "policing failed");
                }
            }
        }
        self.release_expired(tenants, now).await;
    }

    async fn connections(&self, server: &str, account: &str) -> Vec<Conn> {
        let subject = format!("$SYS.REQ.SERVER.{server}.CONNZ");
        let body = serde_json::json!({ "acc": account, "auth": true, "limit": 4096 }).to_string();
        let Ok(Ok(msg)) = tokio::time::timeout(
            Duration::from_secs(2),
            self.sys.request(subject, body.into()),
        )
        .await
        else {
            return vec![];
        };
        let Ok(v) = serde_json::from_slice::<Value>(&msg.payload) else {
            return vec![];
        };
        v.pointer("/data/connections")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| {
                Some(Conn {
                    server: server.to_string(),
                    cid: c.get("cid")?.as_u64()?,
                    user: c
                        .get("authorized_user")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    msgs: c.get("in_msgs").and_then(Value::as_u64).unwrap_or(0),
                    bytes: c.get("in_bytes").and_then(Value::as_u64).unwrap_or(0),
                })
            })
            .collect()
    }

    async fn cut(
        &self,
        record: &TenantRecord,
        servers: &[String],
        rate: f64,
        cap: f64,
        now: u64,
    ) -> Result<(), ApiError> {
        // The connections that published since the last look, heaviest first.
        let mut conns = Vec::new();
        for server in servers {
            conns.extend(self.connections(server, &record.account).await);
        }
        let mut deltas: Vec<(u64, Conn)> = {
            let Ok(mut memory) = self.police_memory.lock() else {
                return Ok(());
            };
            conns
                .into_iter()
                .map(|c| {
                    let key = (c.server.clone(), c.cid);
                    let (pm, _) = memory.conns.get(&key).copied().unwrap_or((0, 0));
                    memory.conns.insert(key, (c.msgs, c.bytes));
                    (c.msgs.saturating_sub(pm), c)
                })
                .filter(|(d, _)| *d > 0)
                .collect()
        };
        deltas.sort_by_key(|d| std::cmp::Reverse(d.0));
        let total: u64 = deltas.iter().map(|(d, _)| d).sum();
        // Cut the heaviest until what is left fits the cap's share.
        let keep = if rate > 0.0 {
            (total as f64 * (cap / rate)) as u64
        } else {
            total
        };
        let mut left = total;
        let mut offenders = Vec::new();
        for (d, c) in deltas {
            if left <= keep {
                break;
            }
            left = left.saturating_sub(d);
            offenders.push(c);
        }
        if offenders.is_empty() {
            return Ok(());
        }
        let tenant = &record.id;
        let (mut state, rev) = self.police_state(tenant).await?;
        let horizon = now.saturating_sub(STRIKE_WINDOW.as_millis() as u64);
        state.strikes.retain(|t| *t >= horizon);
        state.strikes.push(now);
        let strike = state.strikes.len();
        let backoff = BACKOFF[(strike - 1).min(BACKOFF.len() - 1)];
        let until = now + backoff.as_millis() as u64;
        let mut users = Vec::new();
        let mut kicks = Vec::new();
        for c in &offenders {
            let credential = self.session_credential(&c.server, c.cid);
            match credential {
                Some(cred) => {
                    state.throttled.insert(cred, until);
                    kicks.push((c.server.clone(), c.cid));
                }
                None if !c.user.is_empty() => {
                    state.throttled.insert(format!("user:{}", c.user), until);
                    users.push(c.user.clone());
                }
                None => kicks.push((c.server.clone(), c.cid)),
            }
        }
        if !self
            .books(tenant)
            .await?
            .put(&state_key(tenant), &state, rev)
            .await?
        {
            // Another write won; the next poll looks again.
            return Ok(());
        }
        if !users.is_empty() {
            let at = crate::install::now_unix();
            self.change(&system_caller("police"), tenant, |r| {
                for u in &users {
                    r.revocations.entry(u.clone()).or_insert(at);
                }
                Ok(())
            })
            .await?;
        }
        for (server, cid) in kicks {
            self.kick(&server, cid).await;
        }
        let reason = format!(
            "publishing {rate:.0} msg/s against a cap of {cap:.0} (tolerance {:.0} %): cut {} connection(s) for {}s (strike {strike})",
            TOLERANCE * 100.0,
            offenders.len(),
            backoff.as_secs()
        );
        tracing::warn!(%tenant, %reason, "policing");
        self.audit_system(tenant, "policing.throttle", &reason)
            .await;
        metrics::counter!("agentbus_policing_actions_total", "action" => "throttle").increment(1);
        if strike >= STRIKES_TO_SUSPEND {
            let reason = format!(
                "{strike} strikes within {}s: suspended",
                STRIKE_WINDOW.as_secs()
            );
            match self
                .set_status(
                    &system_caller("police"),
                    tenant,
                    crate::registry::Status::Suspended,
                )
                .await
            {
                Ok(_) => {
                    metrics::counter!("agentbus_policing_actions_total", "action" => "suspend")
                        .increment(1);
                    self.audit_system(tenant, "policing.suspend", &reason).await
                }
                Err(e) => tracing::warn!(%tenant, error = %e, "policing: suspending failed"),
            }
        }
        Ok(())
    }

    /// Ends backoffs that are over: unrevokes users (unless revoked for good
    /// meanwhile) and lets keys and subjects log in again.
    async fn release_expired(&self, tenants: &HashMap<String, TenantRecord>, now: u64) {
        for record in tenants.values() {
            let Ok((mut state, rev)) = self.police_state(&record.id).await else {
                continue;
            };
            let expired: Vec<String> = state
                .throttled
                .iter()
                .filter(|(_, until)| **until <= now)
                .map(|(k, _)| k.clone())
                .collect();
            if expired.is_empty() {
                continue;
            }
            for k in &expired {
                state.throttled.remove(k);
            }
            let Ok(books) = self.books(&record.id).await else {
                continue;
            };
            if !books
                .put(&state_key(&record.id), &state, rev)
                .await
                .unwrap_or(false)
            {
                continue;
            }
            let users: Vec<String> = expired
                .iter()
                .filter_map(|k| k.strip_prefix("user:").map(str::to_string))
                .collect();
            if users.is_empty() {
                continue;
            }
            // A user revoked for good (agent revoke) stays revoked.
            let revoked: Vec<String> = match self.store.agents(&record.id).await {
                Ok(agents) => agents
                    .into_iter()
                    .filter(|a| a.revoked_at.is_some())
                    .map(|a| a.user)
                    .collect(),
                Err(_) => continue,
            };
            let _ = self
                .change(&system_caller("police"), &record.id, |r| {
                    for u in &users {
                        if !revoked.contains(u) {
                            r.revocations.remove(u);
                        }
                    }
                    Ok(())
                })
                .await;
        }
    }

    /// Asks `server` to close connection `cid`; whether it answered.
    pub(super) async fn kick(&self, server: &str, cid: u64) -> bool {
        let subject = format!("$SYS.REQ.SERVER.{server}.KICK");
        let body = serde_json::json!({ "cid": cid }).to_string();
        let answered = matches!(
            tokio::time::timeout(
                Duration::from_secs(2),
                self.sys.request(subject, body.into()),
            )
            .await,
            Ok(Ok(_))
        );
        if !answered {
            tracing::warn!(%server, cid, "kick failed");
        }
        answered
    }

    /// Appends an audit event the controller decided on its own about `tenant`.
    pub(super) async fn audit_system(&self, tenant: &TenantId, action: &str, reason: &str) {
        self.audit_controller_event(tenant.as_str(), &format!("tenant/{tenant}"), action, reason)
            .await;
    }

    /// Appends an audit event the controller decided on its own to `log` (a
    /// tenant's or [`crate::audit::event::PLATFORM_LOG`]) about `resource`.
    pub(super) async fn audit_controller_event(
        &self,
        log: &str,
        resource: &str,
        action: &str,
        reason: &str,
    ) {
        let event = AuditEvent {
            action: action.to_string(),
            actor: Actor::controller(&self.id),
            controller: String::new(),
            id: new_event_id(),
            index: 0,
            outcome: Outcome::Allowed,
            prev: String::new(),
            reason: reason.to_string(),
            request_id: String::new(),
            resource: resource.to_string(),
            tenant: log.to_string(),
            time_ms: tenant_bus::envelope::now_ms(),
            version: crate::audit::event::SCHEMA_VERSION,
        };
        self.audit.record(event).await;
    }
}

/// The caller of a change the controller makes on its own.
pub(super) fn system_caller(what: &str) -> super::auth::Caller {
    super::auth::Caller {
        admin: crate::store::AdminRecord {
            name: String::new(),
            role: crate::api::Role::PlatformAdmin,
            tenant: None,
            user: String::new(),
            created_at: 0,
            revoked_at: None,
        },
        request_id: format!("{what}-{:016x}", super::rand_u64()),
    }
}

/// The policing controller's memory.
pub(crate) type Memory = Mutex<PoliceMemory>;
