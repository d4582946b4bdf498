//! Residency policing: a stream of a region-bound tenant that lives outside
//! its region is moved into it.
//!
//! The servers check the name of a stream an agent creates against its
//! permissions (`TASKS`, `KV_STATE`, `KV_TASKS_DONE`), not its placement, so
//! an agent's raw client can create one on another region's servers; the
//! library never does. Every `residency_every` (default 30 s,
//! [`ControllerConfig::residency_every`](super::ControllerConfig::residency_every))
//! the policing controller (the holder of the policing lease, so one instance
//! of an HA deployment does it) asks the servers once where every account's
//! streams live (JSZ, paged by 1,024 accounts: what `tenant stats` shows for
//! one tenant) and updates
//! each stream found outside the region with the region's placement, as a
//! short-lived user of the tenant's account. JetStream then moves the stream:
//! new replicas catch up on the region's servers and the old ones are
//! dropped. Each move is an audit event (`residency.move`).
//!
//! Policed, not exact: such a stream lives outside its region from its
//! creation until the next pass plus the time its move takes. A stream
//! already placed with the region's tag whose replicas are still elsewhere is
//! a move in progress and is left to finish. A region with too few servers to
//! hold the stream makes the update fail: the stream stays where it is, the
//! failure is logged, and the next pass tries again.

use tenant_bus::region::Region;

use super::Controller;
use crate::api::{ApiError, ErrorCode};
use crate::registry::TenantRecord;

impl Controller {
    /// Runs a residency pass every `residency_every` until `shutdown`. Its own
    /// task, not a step of the policing loop: a pass waits for the servers'
    /// JSZ answers, and that must not hold up the per-second rate policing.
    pub(crate) async fn run_residency(
        self: std::sync::Arc<Self>,
        shutdown: super::shutdown::Shutdown,
    ) {
        let mut tick = tokio::time::interval(self.config.residency_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tick.tick() => {}
            }
            match self.store.registry.list().await {
                Ok(tenants) => self.police_residency(&tenants).await,
                Err(e) => tracing::warn!(error = %e, "residency pass: listing tenants failed"),
            }
        }
    }

    /// One residency pass over `tenants`, if this instance holds the policing
    /// lease: one JSZ ping per 1,024 accounts says where every account's
    /// streams live (plus one ping for each account the pages miss, see
    /// [`Controller::all_placements`]), instead of one per region-bound
    /// tenant.
    async fn police_residency(&self, tenants: &[TenantRecord]) {
        let bound: Vec<(&TenantRecord, Region)> = tenants
            .iter()
            .filter(|r| !r.account.is_empty() && !r.deleting)
            .filter_map(|r| {
                let region = Region::new(r.settings.region.as_deref()?).ok()?;
                Some((r, region))
            })
            .collect();
        if bound.is_empty() || !self.hold_lease().await {
            return;
        }
        let placements = match self.all_placements().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "residency pass: asking the servers failed; retried at the next pass");
                return;
            }
        };
        for (record, region) in bound {
            // The first account of a server's order is not in the pages;
            // nor is one without JetStream: asked for on its own.
            let streams = if placements.covers(&record.account) {
                placements.streams(&record.account, Some(&region))
            } else {
                match self.tenant_streams(record).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(tenant = %record.id, error = %e, "residency check failed; retried at the next pass");
                        continue;
                    }
                }
            };
            let misplaced: Vec<String> = streams
                .into_iter()
                .filter(|s| s.in_region == Some(false))
                .map(|s| s.name)
                .collect();
            if misplaced.is_empty() {
                continue;
            }
            if let Err(e) = self.move_misplaced(record, &region, misplaced).await {
                tracing::warn!(tenant = %record.id, %region, error = %e, "residency check failed; retried at the next pass");
            }
        }
    }

    /// Moves `record`'s streams named in `misplaced` (found outside
    /// `region`) into it; returns the names of the streams it moved.
    pub(super) async fn move_misplaced(
        &self,
        record: &TenantRecord,
        region: &Region,
        misplaced: Vec<String>,
    ) -> Result<Vec<String>, ApiError> {
        let Some(client) = self.tenant_client(record, "agentbus-residency").await? else {
            return Ok(Vec::new()); // the tenant is being deleted
        };
        let js = async_nats::jetstream::new(client.clone());
        let mut moved = Vec::new();
        let mut failed = None;
        for name in misplaced {
            let stream = match js.get_stream(&name).await {
                Ok(s) => s,
                Err(e) => {
                    failed = Some(format!("reading stream {name}: {e}"));
                    continue;
                }
            };
            let mut config = stream.cached_info().config.clone();
            if region.holds(config.placement.as_ref()) {
                continue; // placed in the region already: a move in progress
            }
            let from = config
                .placement
                .as_ref()
                .map(|p| p.tags.join(","))
                .unwrap_or_default();
            config.placement = Some(region.placement());
            if let Err(e) = js.update_stream(config).await {
                failed = Some(format!("moving stream {name} into {region}: {e}"));
                continue;
            }
            tracing::warn!(tenant = %record.id, stream = %name, %region, "stream outside the tenant's region; moving it in");
            let reason = if from.is_empty() {
                format!("stream {name} was created without placement outside region {region}; moved to servers tagged {}", region.tag())
            } else {
                format!(
                    "stream {name} was placed on servers tagged {from}, outside region {region}; moved to servers tagged {}",
                    region.tag()
                )
            };
            self.audit_system(&record.id, "residency.move", &reason)
                .await;
            moved.push(name);
        }
        let _ = client.drain().await;
        match failed {
            Some(e) if moved.is_empty() => Err(ApiError::new(ErrorCode::Unavailable, e)),
            Some(e) => {
                tracing::warn!(tenant = %record.id, error = %e, "residency: some streams not moved");
                Ok(moved)
            }
            None => Ok(moved),
        }
    }
}
