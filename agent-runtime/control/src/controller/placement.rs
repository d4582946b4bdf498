//! Placement policing: every stream the deployment holds keeps the
//! deployment's replicas, and every stream of a region-bound tenant lives in
//! its region.
//!
//! Every `placement_every` (default 30 s,
//! [`ControllerConfig::placement_every`](super::ControllerConfig::placement_every))
//! the policing controller (the holder of the policing lease, so one instance
//! of an HA deployment does it) makes one pass:
//!
//! - **Replicas (a deployment that grew).** A laptop's single server keeps
//!   everything R1; when the deployment grows into a cluster and the
//!   controllers are started with `--replicas 3`, the buckets and streams
//!   that already exist are still R1: one node's loss would lose them. The
//!   pass raises every stream of the platform account (registry, controller
//!   and scheduler buckets, audit logs) and of every tenant's account
//!   (`TASKS`, `KV_TASKS_DONE`, `KV_STATE`) kept with fewer replicas than
//!   the deployment's to that count; JetStream copies the data to the new
//!   peers while the stream keeps serving. Raise only: a stream with more
//!   replicas is left alone, so two controllers started with different
//!   counts never undo each other's work (lowering is an operator's explicit
//!   `nats stream edit`). Each raise is an audit event (`replicas.raise`).
//! - **Residency.** The servers check the name of a stream an agent creates
//!   against its permissions (`TASKS`, `KV_STATE`, `KV_TASKS_DONE`), not its
//!   placement, so an agent's raw client can create one on another region's
//!   servers; the library never does. The pass asks the servers once where
//!   every account's streams live (JSZ, paged by 1,024 accounts: what
//!   `tenant stats` shows for one tenant) and updates each stream found
//!   outside its tenant's region with the region's placement, as a
//!   short-lived user of the tenant's account. JetStream then moves the
//!   stream: new replicas catch up on the region's servers and the old ones
//!   are dropped. Each move is an audit event (`residency.move`).
//!
//! Policed, not exact: a misplaced stream lives outside its region from its
//! creation until the next pass plus the time its move takes, and a stream
//! below the deployment's replicas is that fragile until the next pass plus
//! its catch-up. A stream already placed with the region's tag whose
//! replicas are still elsewhere is a move in progress and is left to finish;
//! JetStream refuses to move and scale a stream in one update, so a stream
//! both misplaced and under-replicated is moved first and raised at a later
//! pass. A region (or cluster) with too few servers to hold the stream makes
//! the update fail: the stream stays as it is, the failure is logged, and the
//! next pass tries again.

use tenant_bus::region::Region;

use super::Controller;
use crate::api::{ApiError, ErrorCode, TenantStream};
use crate::audit::event::PLATFORM_LOG;
use crate::registry::TenantRecord;

/// What one stream needs, judged from what the servers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fix {
    /// Found outside its tenant's region: move it in.
    MoveIn,
    /// Kept with fewer replicas than the deployment's: raise to this count.
    Raise(usize),
}

impl Fix {
    /// What `stream` needs in a deployment keeping `replicas`; `None` when it
    /// is as it should be (or is known too little to judge). A move comes
    /// first: JetStream cannot move and scale a stream in one update.
    pub(super) fn of(stream: &TenantStream, replicas: usize) -> Option<Self> {
        if stream.in_region == Some(false) {
            Some(Self::MoveIn)
        } else if stream.replicas < replicas {
            Some(Self::Raise(replicas))
        } else {
            None
        }
    }
}

impl Controller {
    /// Runs a placement pass every `placement_every` until `shutdown`. Its
    /// own task, not a step of the policing loop: a pass waits for the
    /// servers' JSZ answers, and that must not hold up the per-second rate
    /// policing.
    pub(crate) async fn run_placement(
        self: std::sync::Arc<Self>,
        shutdown: super::shutdown::Shutdown,
    ) {
        let mut tick = tokio::time::interval(self.config.placement_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tick.tick() => {}
            }
            match self.store.registry.list().await {
                Ok(tenants) => self.police_placement(&tenants).await,
                Err(e) => tracing::warn!(error = %e, "placement pass: listing tenants failed"),
            }
        }
    }

    /// One placement pass over the platform's streams and `tenants`', if
    /// this instance holds the policing lease: one JSZ ping per 1,024
    /// accounts says where every account's streams live and with how many
    /// replicas (plus one ping for each account the pages miss, see
    /// [`Controller::all_placements`]), instead of one per tenant.
    async fn police_placement(&self, tenants: &[TenantRecord]) {
        let replicas = self.config.replicas;
        let policed: Vec<(&TenantRecord, Option<Region>)> = tenants
            .iter()
            .filter(|r| !r.account.is_empty() && !r.deleting)
            .map(|r| (r, super::stats::record_region(r)))
            .filter(|(_, region)| region.is_some() || replicas > 1)
            .collect();
        if (policed.is_empty() && replicas <= 1) || !self.hold_lease().await {
            return;
        }
        if replicas > 1 {
            self.raise_platform_replicas().await;
        }
        if policed.is_empty() {
            return;
        }
        let placements = match self.all_placements().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "placement pass: asking the servers failed; retried at the next pass");
                return;
            }
        };
        for (record, region) in policed {
            // The first account of a server's order is not in the pages;
            // nor is one without JetStream: asked for on its own.
            let streams = if placements.covers(&record.account) {
                placements.streams(&record.account, region.as_ref())
            } else {
                match self.tenant_streams(record).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(tenant = %record.id, error = %e, "placement check failed; retried at the next pass");
                        continue;
                    }
                }
            };
            let fixes: Vec<(String, Fix)> = streams
                .into_iter()
                .filter_map(|s| Fix::of(&s, replicas).map(|f| (s.name, f)))
                .collect();
            if fixes.is_empty() {
                continue;
            }
            if let Err(e) = self.fix_streams(record, region.as_ref(), fixes).await {
                tracing::warn!(tenant = %record.id, error = %e, "placement check failed; retried at the next pass");
            }
        }
    }

    /// Raises every stream of the platform account kept with fewer replicas
    /// than the deployment's; failures are logged and retried at the next
    /// pass.
    async fn raise_platform_replicas(&self) {
        use futures::TryStreamExt as _;
        let want = self.config.replicas;
        let js = self.store.jetstream();
        let infos: Vec<async_nats::jetstream::stream::Info> = match js.streams().try_collect().await
        {
            Ok(infos) => infos,
            Err(e) => {
                tracing::warn!(error = %e, "placement pass: listing the platform's streams failed; retried at the next pass");
                return;
            }
        };
        for info in infos {
            let mut config = info.config;
            if config.num_replicas >= want {
                continue;
            }
            let (name, from) = (config.name.clone(), config.num_replicas);
            config.num_replicas = want;
            if let Err(e) = js.update_stream(config).await {
                tracing::warn!(stream = %name, replicas = want, error = %e, "raising a platform stream's replicas failed; retried at the next pass");
                continue;
            }
            tracing::info!(stream = %name, from, to = want, "platform stream raised to the deployment's replicas");
            self.audit_controller_event(
                PLATFORM_LOG,
                &format!("stream/{name}"),
                "replicas.raise",
                &format!("stream {name} was kept with {from} replica(s), the deployment keeps {want}; raised to {want}"),
            )
            .await;
        }
    }

    /// Applies `fixes` to `record`'s streams (moving them into `region`,
    /// raising their replicas) as a short-lived user of its account;
    /// returns the names of the streams it changed.
    pub(super) async fn fix_streams(
        &self,
        record: &TenantRecord,
        region: Option<&Region>,
        fixes: Vec<(String, Fix)>,
    ) -> Result<Vec<String>, ApiError> {
        let Some(client) = self.tenant_client(record, "agentbus-placement").await? else {
            return Ok(Vec::new()); // the tenant is being deleted
        };
        let js = async_nats::jetstream::new(client.clone());
        let mut changed = Vec::new();
        let mut failed = None;
        for (name, fix) in fixes {
            let stream = match js.get_stream(&name).await {
                Ok(s) => s,
                Err(e) => {
                    failed = Some(format!("reading stream {name}: {e}"));
                    continue;
                }
            };
            let mut config = stream.cached_info().config.clone();
            let (action, reason) = match (fix, region) {
                (Fix::MoveIn, Some(region)) => {
                    if region.holds(config.placement.as_ref()) {
                        continue; // placed in the region already: a move in progress
                    }
                    let from = config
                        .placement
                        .as_ref()
                        .map(|p| p.tags.join(","))
                        .unwrap_or_default();
                    config.placement = Some(region.placement());
                    let reason = if from.is_empty() {
                        format!("stream {name} was created without placement outside region {region}; moved to servers tagged {}", region.tag())
                    } else {
                        format!(
                            "stream {name} was placed on servers tagged {from}, outside region {region}; moved to servers tagged {}",
                            region.tag()
                        )
                    };
                    ("residency.move", reason)
                }
                (Fix::MoveIn, None) => continue, // no region: nothing is outside it
                (Fix::Raise(want), _) => {
                    let from = config.num_replicas;
                    if from >= want {
                        continue; // raised since the servers reported it
                    }
                    config.num_replicas = want;
                    ("replicas.raise", format!("stream {name} was kept with {from} replica(s), the deployment keeps {want}; raised to {want}"))
                }
            };
            if let Err(e) = js.update_stream(config).await {
                failed = Some(format!("{action} of stream {name}: {e}"));
                continue;
            }
            tracing::warn!(tenant = %record.id, stream = %name, action, "{reason}");
            self.audit_system(&record.id, action, &reason).await;
            changed.push(name);
        }
        let _ = client.drain().await;
        match failed {
            Some(e) if changed.is_empty() => Err(ApiError::new(ErrorCode::Unavailable, e)),
            Some(e) => {
                tracing::warn!(tenant = %record.id, error = %e, "placement: some streams not changed");
                Ok(changed)
            }
            None => Ok(changed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(replicas: usize, in_region: Option<bool>) -> TenantStream {
        TenantStream {
            name: "TASKS".into(),
            replicas,
            nodes: vec!["n1".into()],
            in_region,
        }
    }

    #[test]
    fn a_stream_below_the_deployments_replicas_is_raised_never_lowered() {
        assert_eq!(Fix::of(&stream(1, None), 3), Some(Fix::Raise(3)));
        assert_eq!(Fix::of(&stream(2, Some(true)), 3), Some(Fix::Raise(3)));
        assert_eq!(Fix::of(&stream(3, None), 3), None);
        assert_eq!(Fix::of(&stream(5, None), 3), None, "never lowered");
        assert_eq!(Fix::of(&stream(1, None), 1), None);
    }

    #[test]
    fn a_misplaced_stream_is_moved_before_it_is_raised() {
        assert_eq!(Fix::of(&stream(1, Some(false)), 3), Some(Fix::MoveIn));
        assert_eq!(Fix::of(&stream(3, Some(false)), 3), Some(Fix::MoveIn));
        assert_eq!(Fix::of(&stream(1, Some(true)), 1), None);
    }
}
