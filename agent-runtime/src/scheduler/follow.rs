//! Keeps a [`Scheduler`] in step with the tenant registry: suspensions,
//! activations and quota changes seen by a [`RegistryWatcher`] reach the tenant's
//! scheduler as soon as the watcher sees them.
//!
//! - a tenant changed to `suspended`, or removed from the registry:
//!   [`Scheduler::suspend`] (every admission, task permit and agent slot of it is
//!   refused with `Suspended`, also for a tenant scheduler created later);
//! - a tenant changed to `active`: [`Scheduler::resume`];
//! - any change of a tenant that has a scheduler here: its quotas are applied in
//!   place ([`TenantScheduler::set_quotas`](super::TenantScheduler::set_quotas)).
//!
//! The watcher's cache is applied once at start, and again whenever the event
//! channel reports that this follower fell behind, so no change is missed.

use std::sync::{Arc, Weak};

use tokio::sync::broadcast;

use super::Scheduler;
use crate::registry::{Registry, RegistryEvent, RegistryWatcher, Status, TenantRecord};

/// Applies one tenant's record to the scheduler.
pub(crate) fn apply_record(scheduler: &Scheduler, record: &TenantRecord) {
    if record.status == Status::Active {
        scheduler.resume(&record.id);
    } else {
        scheduler.suspend(&record.id);
    }
    if let Some(t) = scheduler.get(&record.id) {
        t.set_quotas(&record.quotas());
    }
}

/// Applies one registry event to the scheduler.
pub(crate) fn apply_event(scheduler: &Scheduler, event: &RegistryEvent) {
    match event {
        RegistryEvent::Changed(record) => apply_record(scheduler, record),
        RegistryEvent::Removed(id) => scheduler.suspend(id),
    }
}

/// Applies every cached record.
pub(crate) fn apply_snapshot(scheduler: &Scheduler, watcher: &RegistryWatcher) {
    for record in watcher.snapshot() {
        apply_record(scheduler, &record);
    }
}

/// A running follower; stops when dropped (or with [`RegistryFollower::stop`]).
#[derive(Debug)]
pub struct RegistryFollower {
    task: tokio::task::JoinHandle<()>,
}

impl RegistryFollower {
    /// Starts following `watcher` for `scheduler` (held weakly: the follower ends
    /// when the scheduler is dropped). The watcher's current cache is applied
    /// before this returns.
    pub fn start(scheduler: &Arc<Scheduler>, watcher: &RegistryWatcher) -> Self {
        // Subscribe before reading the cache, so no change falls between the two.
        let events = watcher.subscribe();
        apply_snapshot(scheduler, watcher);
        let task = tokio::spawn(follow(
            Arc::downgrade(scheduler),
            events,
            watcher.registry().clone(),
        ));
        Self { task }
    }

    /// Stops following.
    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for RegistryFollower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn follow(
    scheduler: Weak<Scheduler>,
    mut events: broadcast::Receiver<RegistryEvent>,
    registry: Registry,
) {
    loop {
        let event = events.recv().await;
        let Some(scheduler) = scheduler.upgrade() else {
            return;
        };
        match event {
            Ok(event) => apply_event(&scheduler, &event),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                // Missed events: re-read every record (the bucket, not the cache,
                // which may be bounded below the number of tenants).
                tracing::warn!(missed, "scheduler fell behind the registry; re-reading it");
                match registry.list().await {
                    Ok(records) => {
                        for record in &records {
                            apply_record(&scheduler, record);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "re-reading the registry"),
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
