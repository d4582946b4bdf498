//! What only the runtime sees, metered: tasks run and failed, tool calls per
//! tool. A runtime host adds to a [`UsageMeter`] (a bounded in-memory count
//! per tenant and unit) and the meter flushes it to the controller every
//! [`UsageMeter::every`] on `agentbus.runtime.v1.usage` (platform account
//! only), which adds the units to the tenants' usage ledgers: they appear in
//! `agentbus usage` rows and `tenant stats` beside the servers' counters.
//!
//! # Exactly once
//! Each flush is a batch with the host's random id and a sequence number. A
//! batch that got no answer is sent again, unchanged, until one comes (new
//! counts wait in the next batch); the controller claims `<host>.<seq>.<tenant>`
//! once per tenant before adding, so a resent batch (or a tenant of it the
//! controller already added before failing) is never counted twice.
//!
//! # Bounds
//! At most [`MAX_PENDING_KEYS`] distinct (tenant, unit) pairs wait between
//! flushes; beyond that a count is dropped and counted
//! ([`UsageMeter::dropped`], metric `agentbus_meter_dropped_total`). A
//! tenant's hour holds at most [`crate::usage::MAX_UNITS`] distinct units;
//! the controller skips units past it (counted in the answer).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::api::{ApiError, ErrorCode};

/// Distinct (tenant, unit) pairs a meter holds between flushes.
pub const MAX_PENDING_KEYS: usize = 10_000;

/// A batch on `agentbus.runtime.v1.usage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeUsage {
    /// The runtime host's random id (a token: `rt-<hex>`).
    pub host: String,
    /// The batch's number on that host.
    pub seq: u64,
    /// Tenant -> unit -> amount.
    pub tenants: BTreeMap<String, BTreeMap<String, u64>>,
}

/// The controller's answer to a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeUsageAnswer {
    /// Tenants whose units were added by this request.
    pub added: u64,
    /// Tenants already added by an earlier send of the same batch.
    pub duplicates: u64,
    /// Tenants or units refused (unknown tenant, bad unit, unit limit).
    pub skipped: u64,
}

#[derive(Default)]
struct State {
    counts: BTreeMap<String, BTreeMap<String, u64>>,
    keys: usize,
    /// The batch sent but not yet answered.
    pending: Option<RuntimeUsage>,
    seq: u64,
}

struct Shared {
    client: async_nats::Client,
    host: String,
    state: Mutex<State>,
    dropped: AtomicU64,
    flushed: AtomicU64,
}

/// A bounded per-host usage meter that flushes to the controller (see the
/// module docs). Cheap to share (`Arc` inside); the flush task stops when the
/// last clone is dropped.
#[derive(Clone)]
pub struct UsageMeter {
    shared: Arc<Shared>,
    every: Duration,
    _task: Arc<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl std::fmt::Debug for UsageMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageMeter")
            .field("host", &self.shared.host)
            .field("every", &self.every)
            .finish()
    }
}

fn random_host() -> String {
    let mut b = [0u8; 8];
    // A failing system RNG leaves zeros: the id is then only as unique as
    // the time below, still never shared by two live hosts in practice.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    let t = tenant_bus::envelope::now_ms();
    format!("rt-{}-{t:x}", data_encoding::HEXLOWER.encode(&b))
}

impl UsageMeter {
    /// A meter flushing through `client` (a platform-account connection, as
    /// the runtime's registry watcher uses) every `every` (at least 100 ms).
    pub fn new(client: async_nats::Client, every: Duration) -> Self {
        let every = every.max(Duration::from_millis(100));
        let shared = Arc::new(Shared {
            client,
            host: random_host(),
            state: Mutex::new(State::default()),
            dropped: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&shared);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(shared) = weak.upgrade() else { return };
                if let Err(e) = flush(&shared).await {
                    tracing::warn!(error = %e.message, "usage meter flush failed; the batch is kept and sent again");
                }
            }
        });
        Self {
            shared,
            every,
            _task: Arc::new(AbortOnDrop(task)),
        }
    }

    /// The flush interval.
    pub fn every(&self) -> Duration {
        self.every
    }

    /// This host's id in the batches.
    pub fn host(&self) -> &str {
        &self.shared.host
    }

    /// Adds `amount` of `unit` for `tenant` (never blocks; dropped and
    /// counted at the bound).
    pub fn add(&self, tenant: &str, unit: &str, amount: u64) {
        let Ok(mut s) = self.shared.state.lock() else {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let known = s
            .counts
            .get(tenant)
            .is_some_and(|units| units.contains_key(unit));
        if !known && s.keys >= MAX_PENDING_KEYS {
            drop(s);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("agentbus_meter_dropped_total").increment(1);
            return;
        }
        if !known {
            s.keys += 1;
        }
        let v = s
            .counts
            .entry(tenant.to_string())
            .or_default()
            .entry(unit.to_string())
            .or_default();
        *v = v.saturating_add(amount);
    }

    /// Counts dropped at the bound.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Batches the controller answered.
    pub fn flushed(&self) -> u64 {
        self.shared.flushed.load(Ordering::Relaxed)
    }

    /// Sends what is pending now (a batch that got no answer first).
    pub async fn flush(&self) -> Result<(), ApiError> {
        flush(&self.shared).await
    }
}

/// Sends the unanswered batch, if any, then the counts gathered since.
async fn flush(shared: &Shared) -> Result<(), ApiError> {
    for _ in 0..2 {
        let batch = {
            let Ok(mut s) = shared.state.lock() else {
                return Err(ApiError::new(
                    ErrorCode::Internal,
                    "usage meter lock poisoned",
                ));
            };
            match &s.pending {
                Some(b) => b.clone(),
                None => {
                    if s.counts.is_empty() {
                        return Ok(());
                    }
                    s.seq += 1;
                    let batch = RuntimeUsage {
                        host: shared.host.clone(),
                        seq: s.seq,
                        tenants: std::mem::take(&mut s.counts),
                    };
                    s.keys = 0;
                    s.pending = Some(batch.clone());
                    batch
                }
            }
        };
        match send(&shared.client, &batch).await {
            Ok(_) => {}
            // An outage: the same batch goes again next time.
            Err(e) if e.code == ErrorCode::Unavailable => return Err(e),
            // Refused as such (malformed): sending it again cannot help.
            Err(e) => {
                tracing::error!(code = %e.code, message = %e.message, seq = batch.seq, "the controller refused a usage batch; dropped");
                let n: usize = batch.tenants.values().map(|u| u.len()).sum();
                shared.dropped.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        shared.flushed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut s) = shared.state.lock() {
            if s.pending.as_ref().map(|b| b.seq) == Some(batch.seq) {
                s.pending = None;
            }
        }
    }
    Ok(())
}

async fn send(
    client: &async_nats::Client,
    batch: &RuntimeUsage,
) -> Result<RuntimeUsageAnswer, ApiError> {
    let body =
        serde_json::to_vec(batch).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        client.request(crate::api::RUNTIME_USAGE_SUBJECT, body.into()),
    )
    .await
    .map_err(|_| ApiError::new(ErrorCode::Unavailable, "the controller did not answer"))?
    .map_err(|e| ApiError::new(ErrorCode::Unavailable, e.to_string()))?;
    match serde_json::from_slice::<crate::api::Response<RuntimeUsageAnswer>>(&reply.payload) {
        Ok(crate::api::Response::Ok(a)) => Ok(a),
        Ok(crate::api::Response::Error(e)) => Err(e),
        Err(e) => Err(ApiError::new(ErrorCode::Internal, format!("answer: {e}"))),
    }
}
