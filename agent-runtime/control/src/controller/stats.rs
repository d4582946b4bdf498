//! `agentbus.admin.v1.tenant.<id>.stats`: one tenant's state in one answer,
//! the same figures the metrics endpoint exports for it: live connections and
//! the servers' counters now, metered usage this hour and today, budgets,
//! policing, issued agents and API keys, and where the account's streams
//! live (their nodes, and whether those are in the tenant's region).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use tenant_bus::region::Region;
use tenant_bus::TenantId;

use super::Controller;
use crate::api::{ApiError, LiveStats, TenantStats, TenantStream, UsageTotals};
use crate::usage::{hour_of, HOUR_MS};

/// How long the servers get to answer the statistics ping.
const STATZ_WINDOW: Duration = Duration::from_millis(500);

/// Accounts one JSZ answer of a residency pass carries at most.
const JSZ_PAGE: usize = 1024;

/// Pages one [`Controller::all_placements`] reads at most (a million accounts).
const MAX_JSZ_PAGES: usize = 1024;

impl Controller {
    pub(super) async fn tenant_stats(&self, id: &TenantId) -> Result<TenantStats, ApiError> {
        let record = self.tenant(id).await?;
        let now = tenant_bus::envelope::now_ms();
        let live = self.live_stats(&record.account).await?;
        let books = self.books(id).await?;
        let (hour, today) = match books.usage_ledger(id).await? {
            Some((ledger, _)) => {
                let this_hour = hour_of(now);
                let day_start = now - now % (24 * HOUR_MS);
                let mut hour = UsageTotals::default();
                let mut today = UsageTotals::default();
                for (h, c) in &ledger.hours {
                    if *h == this_hour {
                        hour.counters.add(c);
                    }
                    if *h >= day_start {
                        today.counters.add(c);
                    }
                }
                for (h, units) in &ledger.units {
                    for (unit, amount) in units {
                        if *h == this_hour {
                            add_unit(&mut hour.units, unit, *amount);
                        }
                        if *h >= day_start {
                            add_unit(&mut today.units, unit, *amount);
                        }
                    }
                }
                (hour, today)
            }
            None => (UsageTotals::default(), UsageTotals::default()),
        };
        let mut budgets = Vec::new();
        for spec in books.budgets(id).await? {
            budgets.push(self.budget_view(id, spec).await?);
        }
        let (police, _) = self.police_state(id).await?;
        let agents = self.store.agents(id).await?;
        let keys = self.store.apikeys(id).await?;
        let now_s = crate::install::now_unix();
        let streams = self.tenant_streams(&record).await?;
        let audit_log = self.audit.home(id.as_str()).await?.stream_name();
        Ok(TenantStats {
            tenant: id.to_string(),
            status: record.status.to_string(),
            tier: record.tier.to_string(),
            quotas: record.quotas(),
            live,
            usage_this_hour: hour,
            usage_today: today,
            budgets,
            throttled: police
                .throttled
                .into_iter()
                .filter(|(_, until)| *until > now)
                .collect(),
            strikes_last_10m: police
                .strikes
                .iter()
                .filter(|t| now.saturating_sub(**t) < 600_000)
                .count(),
            agents_issued: agents.iter().filter(|a| a.revoked_at.is_none()).count(),
            agents_revoked: agents.iter().filter(|a| a.revoked_at.is_some()).count(),
            api_keys_active: keys.iter().filter(|k| k.status(now_s) == "active").count(),
            streams,
            replicas: self.config.replicas,
            audit_log,
        })
    }

    /// The streams of the tenant's account and the servers holding them, from
    /// every server's JSZ (with the account's stream details): what the
    /// servers say, so a stream a raw client created without the region's
    /// placement shows up here (`in_region: false`) whatever the library did.
    pub(super) async fn tenant_streams(
        &self,
        record: &crate::registry::TenantRecord,
    ) -> Result<Vec<TenantStream>, ApiError> {
        if record.account.is_empty() {
            return Ok(Vec::new());
        }
        let answers = self
            .placement_ping(serde_json::json!({"account": record.account}))
            .await?;
        Ok(Placements::of(&answers).streams(&record.account, record_region(record).as_ref()))
    }

    /// One JSZ ping with the accounts' stream details and configs, plus
    /// `filter`'s fields (an account, or a page): every server's answer.
    async fn placement_ping(
        &self,
        mut filter: Value,
    ) -> Result<Vec<super::ping::Answer>, ApiError> {
        if let Some(fields) = filter.as_object_mut() {
            for field in ["accounts", "streams", "config"] {
                fields.insert(field.to_string(), Value::Bool(true));
            }
        }
        self.ping_servers(
            "$SYS.REQ.SERVER.PING.JSZ",
            filter.to_string(),
            STATZ_WINDOW,
            Some(&self.js_servers_seen),
            "stream placement",
        )
        .await
    }

    /// Every account's streams on every server, one JSZ ping per page of
    /// [`JSZ_PAGE`] accounts: what a residency pass reads once for all
    /// tenants. The servers sort accounts by name only for a request with a
    /// non-zero offset (with offset 0 a limited page is an arbitrary
    /// subset), so the pages start at offset 1 and the first account of each
    /// server's order is missing: [`Placements::covers`] says which
    /// accounts were seen, and the caller asks for the others one by one.
    pub(super) async fn all_placements(&self) -> Result<Placements, ApiError> {
        let mut all = Placements::default();
        for page in 0..MAX_JSZ_PAGES {
            let answers = self
                .placement_ping(serde_json::json!({
                    "offset": 1 + page * JSZ_PAGE,
                    "limit": JSZ_PAGE,
                }))
                .await?;
            // A server with a full page may have more accounts past it.
            let full = answers.iter().any(|a| {
                a.value
                    .pointer("/data/account_details")
                    .and_then(Value::as_array)
                    .is_some_and(|d| d.len() >= JSZ_PAGE)
            });
            all.add(&answers);
            if !full {
                break;
            }
        }
        Ok(all)
    }

    /// The servers' live figures for one account, summed over the servers
    /// that answer within [`STATZ_WINDOW`].
    async fn live_stats(&self, account: &str) -> Result<LiveStats, ApiError> {
        let body = serde_json::json!({ "accounts": [account], "include_unused": true }).to_string();
        let answers = self
            .ping_servers(
                "$SYS.REQ.ACCOUNT.PING.STATZ",
                body,
                STATZ_WINDOW,
                None,
                "server statistics",
            )
            .await?;
        let mut live = LiveStats::default();
        for answer in answers {
            live.servers += 1;
            for stat in answer
                .value
                .pointer("/data/account_statz")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|s| s.get("acc").and_then(Value::as_str) == Some(account))
            {
                let n = |k: &str| stat.get(k).and_then(Value::as_u64).unwrap_or(0);
                live.connections += n("conns");
                live.subscriptions += n("num_subscriptions");
                live.slow_consumers += n("slow_consumers");
                live.since_server_start
                    .add(&super::usage_poll::counters_of(stat));
            }
        }
        Ok(live)
    }
}

fn add_unit(units: &mut BTreeMap<String, u64>, unit: &str, amount: u64) {
    let v = units.entry(unit.to_string()).or_default();
    *v = v.saturating_add(amount);
}

pub(super) fn record_region(record: &crate::registry::TenantRecord) -> Option<Region> {
    record
        .settings
        .region
        .as_deref()
        .and_then(|r| Region::new(r).ok())
}

/// Where streams live, from servers' JSZ answers: each server's regions,
/// and each account's streams with the nodes holding them.
#[derive(Debug, Default)]
pub(super) struct Placements {
    regions_of: BTreeMap<String, Vec<Region>>,
    /// account -> stream name -> the stream (every account a server
    /// reported, also one without streams).
    streams: BTreeMap<String, BTreeMap<String, TenantStream>>,
}

impl Placements {
    fn of(answers: &[super::ping::Answer]) -> Self {
        let mut p = Self::default();
        p.add(answers);
        p
    }

    /// Adds the answers of one JSZ ping (streams reported by several
    /// servers keep the leader's view: it lists the others as replicas).
    fn add(&mut self, answers: &[super::ping::Answer]) {
        for answer in answers {
            let v = &answer.value;
            let Some(server) = v.pointer("/server/name").and_then(Value::as_str) else {
                continue;
            };
            self.regions_of.insert(
                server.to_string(),
                Region::of_tags(super::ping::server_tags(v)),
            );
            for account in v
                .pointer("/data/account_details")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(id) = account.get("id").and_then(Value::as_str) else {
                    continue;
                };
                self.streams.entry(id.to_string()).or_default();
                for detail in account
                    .get("stream_detail")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let Some(name) = detail.get("name").and_then(Value::as_str) else {
                        continue;
                    };
                    let leader = detail
                        .pointer("/cluster/leader")
                        .and_then(Value::as_str)
                        .unwrap_or(server);
                    let mut nodes = vec![leader.to_string()];
                    for peer in detail
                        .pointer("/cluster/replicas")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(|p| p.get("name").and_then(Value::as_str))
                    {
                        if !nodes.iter().any(|n| n == peer) {
                            nodes.push(peer.to_string());
                        }
                    }
                    let replicas = detail
                        .pointer("/config/num_replicas")
                        .and_then(Value::as_u64)
                        .map_or(1, |r| usize::try_from(r).unwrap_or(1).max(1));
                    let entry = self
                        .streams
                        .entry(id.to_string())
                        .or_default()
                        .entry(name.to_string())
                        .or_insert(TenantStream {
                            name: name.to_string(),
                            replicas,
                            nodes: nodes.clone(),
                            in_region: None,
                        });
                    if leader == server {
                        entry.nodes = nodes;
                        entry.replicas = replicas;
                    }
                }
            }
        }
    }

    /// Whether some server reported `account` (else its streams are
    /// unknown, not absent).
    pub(super) fn covers(&self, account: &str) -> bool {
        self.streams.contains_key(account)
    }

    /// `account`'s streams; with `region`, each says whether every node
    /// holding it is in the region. A holder that did not answer (down) has
    /// unknown tags: it does not make a stream look misplaced; one known to
    /// be elsewhere does.
    pub(super) fn streams(&self, account: &str, region: Option<&Region>) -> Vec<TenantStream> {
        let mut out: Vec<TenantStream> = self
            .streams
            .get(account)
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default();
        if let Some(region) = region {
            for s in &mut out {
                s.in_region = Some(
                    s.nodes
                        .iter()
                        .all(|n| self.regions_of.get(n).is_none_or(|rs| rs.contains(region))),
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::ping::Answer;

    fn answer(server: &str, tags: &[&str], accounts: Value) -> Answer {
        Answer {
            at_ms: 0,
            value: serde_json::json!({
                "server": {"name": server, "tags": tags},
                "data": {"account_details": accounts},
            }),
        }
    }

    fn stream(name: &str, leader: &str, replicas: &[&str]) -> Value {
        serde_json::json!({
            "name": name,
            "config": {"num_replicas": 1 + replicas.len()},
            "cluster": {
                "leader": leader,
                "replicas": replicas.iter().map(|r| serde_json::json!({"name": r})).collect::<Vec<_>>(),
            },
        })
    }

    #[test]
    fn placements_keep_the_leaders_view_and_judge_each_stream_by_its_nodes() {
        let eu = Region::new("eu").unwrap_or_else(|e| panic!("{e}"));
        let answers = vec![
            answer(
                "n1",
                &["region:eu"],
                serde_json::json!([
                    {"id": "ACME", "stream_detail": [stream("KV_STATE", "n1", &["n2"])]},
                    {"id": "EMPTY", "stream_detail": []},
                ]),
            ),
            // A replica's partial view (the leader, no peers) does not
            // replace the leader's.
            answer(
                "n2",
                &["region:eu"],
                serde_json::json!([
                    {"id": "ACME", "stream_detail": [stream("KV_STATE", "n1", &[])]},
                ]),
            ),
            answer(
                "n3",
                &["region:us"],
                serde_json::json!([
                    {"id": "ACME", "stream_detail": [stream("TASKS", "n3", &[])]},
                ]),
            ),
        ];
        let p = Placements::of(&answers);
        assert!(p.covers("ACME") && p.covers("EMPTY"));
        assert!(!p.covers("GLOBEX"), "an account no server reported");
        assert!(p.streams("EMPTY", Some(&eu)).is_empty());
        let acme = p.streams("ACME", Some(&eu));
        assert_eq!(acme.len(), 2, "{acme:?}");
        let state = acme.iter().find(|s| s.name == "KV_STATE");
        assert_eq!(
            state.map(|s| s.nodes.clone()),
            Some(vec!["n1".into(), "n2".into()])
        );
        assert_eq!(
            state.map(|s| (s.replicas, s.in_region)),
            Some((2, Some(true)))
        );
        let tasks = acme.iter().find(|s| s.name == "TASKS");
        assert_eq!(tasks.map(|s| s.in_region), Some(Some(false)));
        // Without a region nothing is judged.
        assert!(p
            .streams("ACME", None)
            .iter()
            .all(|s| s.in_region.is_none()));
    }

    #[test]
    fn a_holder_that_did_not_answer_does_not_make_a_stream_misplaced() {
        let eu = Region::new("eu").unwrap_or_else(|e| panic!("{e}"));
        let p = Placements::of(&[answer(
            "n1",
            &["region:eu"],
            serde_json::json!([
                {"id": "ACME", "stream_detail": [stream("TASKS", "n1", &["n9"])]},
            ]),
        )]);
        assert_eq!(
            p.streams("ACME", Some(&eu))
                .first()
                .and_then(|s| s.in_region),
            Some(true)
        );
    }
}
