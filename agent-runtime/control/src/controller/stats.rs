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

impl Controller {
    pub(super) async fn tenant_stats(&self, id: &TenantId) -> Result<TenantStats, ApiError> {
        let record = self.tenant(id).await?;
        let now = tenant_bus::envelope::now_ms();
        let live = self.live_stats(&record.account).await?;
        let (hour, today) = match self.store.usage_ledger(id).await? {
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
        for spec in self.store.budgets(id).await? {
            budgets.push(self.budget_view(id, spec).await?);
        }
        let (police, _) = self.police_state(id).await?;
        let agents = self.store.agents(id).await?;
        let keys = self.store.apikeys(id).await?;
        let now_s = crate::install::now_unix();
        let streams = self.tenant_streams(&record).await?;
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
        let body = serde_json::json!({
            "account": record.account,
            "accounts": true,
            "streams": true,
            "config": true,
        })
        .to_string();
        let answers = self
            .ping_servers(
                "$SYS.REQ.SERVER.PING.JSZ",
                body,
                STATZ_WINDOW,
                None,
                "stream placement",
            )
            .await?;
        let mut regions_of: BTreeMap<String, Vec<Region>> = BTreeMap::new();
        let mut streams: BTreeMap<String, TenantStream> = BTreeMap::new();
        for answer in &answers {
            let v = &answer.value;
            let Some(server) = v.pointer("/server/name").and_then(Value::as_str) else {
                continue;
            };
            regions_of.insert(
                server.to_string(),
                Region::of_tags(super::ping::server_tags(v)),
            );
            for detail in v
                .pointer("/data/account_details")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|a| a.get("id").and_then(Value::as_str) == Some(record.account.as_str()))
                .filter_map(|a| a.get("stream_detail").and_then(Value::as_array))
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
                // Every holder reports the stream; the leader's view is the
                // one to keep (it lists the others as its replicas).
                let from_leader = leader == server;
                let entry = streams.entry(name.to_string()).or_insert(TenantStream {
                    name: name.to_string(),
                    replicas,
                    nodes: nodes.clone(),
                    in_region: None,
                });
                if from_leader {
                    entry.nodes = nodes;
                    entry.replicas = replicas;
                }
            }
        }
        let region = record
            .settings
            .region
            .as_deref()
            .and_then(|r| Region::new(r).ok());
        let mut out: Vec<TenantStream> = streams.into_values().collect();
        // A holder that did not answer (down) has unknown tags: it does not
        // make a stream look misplaced; one known to be elsewhere does.
        if let Some(region) = region {
            for s in &mut out {
                s.in_region = Some(
                    s.nodes
                        .iter()
                        .all(|n| regions_of.get(n).is_none_or(|rs| rs.contains(&region))),
                );
            }
        }
        Ok(out)
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
