//! The JetStream key-value side of the scheduler: the rate-window ledger.
//!
//! Bucket [`RATE_BUCKET`] (`agentbus_sched_rate`), keys `<tenant>.msgs.<window>` and
//! `<tenant>.bytes.<window>`, value: the tokens leased so far in that window, as
//! ASCII decimal. Every change is a compare-and-set on the key's revision
//! (`kv.update(key, value, revision)`, revision 0 meaning "absent"), so concurrent
//! instances can never lease past the cap. The bucket keeps one revision per key
//! and ages keys out after `max_age` (default 10 min, which must exceed the longest
//! window, else a live window's counter could vanish and restart at zero).

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::kv;
use bytes::Bytes;
use tenant_bus::error::Error;

use super::error::{store_error, SchedulerError, SchedulerErrorKind};
use super::rate::{Lease, LeaseFuture, LeaseHint, LeaseRequest, TokenLedger};

/// The default rate-window bucket.
pub const RATE_BUCKET: &str = "agentbus_sched_rate";

/// How many compare-and-set rounds a lease tries before reporting contention.
const CAS_ATTEMPTS: usize = 64;

/// Options of the rate-window bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateBucket {
    /// Bucket name (default [`RATE_BUCKET`]).
    pub bucket: String,
    /// How long a window counter outlives its last lease (default 10 minutes; must
    /// exceed the longest `window_ms`).
    pub max_age: Duration,
    /// Storage (default memory: counters are per window and short-lived; a server
    /// restart forgets the current window's leases, which can over-admit in that one
    /// window only).
    pub storage: jetstream::stream::StorageType,
    /// Replicas in a cluster (default 1).
    pub replicas: usize,
}

impl Default for RateBucket {
    fn default() -> Self {
        Self {
            bucket: RATE_BUCKET.to_owned(),
            max_age: Duration::from_secs(600),
            storage: jetstream::stream::StorageType::Memory,
            replicas: 1,
        }
    }
}

/// Opens (creating if missing) a history-1 key-value bucket whose entries
/// expire after `max_age` (at least 1 s): the shape of both scheduler buckets.
///
/// An existing bucket is looked up, asked again while its stream elects a
/// leader ([`tenant_bus::open::bucket`]): an instance starting while a node
/// is down starts as soon as the election ends, where an update request sent
/// during it waited out its whole timeout. Only a bucket with another
/// `max_age` or fewer replicas is updated (this setting wins, as before),
/// keeping the bucket's replicas when it has more (the controller's
/// placement pass raises them; an instance never lowers them).
pub(crate) async fn open_expiring_bucket(
    js: &jetstream::Context,
    bucket: &str,
    description: &str,
    what: &str,
    max_age: Duration,
    storage: jetstream::stream::StorageType,
    replicas: usize,
) -> Result<kv::Store, SchedulerError> {
    if max_age < Duration::from_secs(1) {
        return Err(Error::new(
            SchedulerErrorKind::InvalidConfig,
            format!("{what} must be at least 1 s"),
        ));
    }
    let config = kv::Config {
        bucket: bucket.to_string(),
        description: description.to_string(),
        history: 1,
        max_age,
        storage,
        num_replicas: replicas,
        ..Default::default()
    };
    let (store, created) = tenant_bus::open::bucket(js, config.clone())
        .await
        .map_err(|e| store_error(format!("opening bucket {bucket:?}"), e))?;
    let have = &store.stream.cached_info().config;
    if created || (have.max_age == max_age && have.num_replicas >= replicas) {
        return Ok(store);
    }
    let want = replicas.max(have.num_replicas);
    let store = js
        .create_or_update_key_value(kv::Config {
            num_replicas: want,
            ..config
        })
        .await
        .map_err(|e| store_error(format!("updating bucket {bucket:?}"), e))?;
    if want > have.num_replicas {
        settled(&store, want).await;
    }
    Ok(store)
}

/// Waits (at most 10 s) until `store`'s stream has a leader and `replicas`
/// peers that are current. A raise from fewer replicas answers before the
/// new peers have joined, and a write sent meanwhile got no answer (the
/// first agent slot after a raise waited out the 5 s publish timeout on
/// three nodes). Not ready after the wait: returned anyway, its writes then
/// fail as an outage.
async fn settled(store: &kv::Store, replicas: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        let info = tenant_bus::settle::while_unanswered(|| store.stream.get_info()).await;
        if let Ok(info) = info {
            if let Some(cluster) = &info.cluster {
                let current = cluster.replicas.iter().filter(|p| p.current).count();
                if cluster.leader.is_some() && current + 1 >= replicas {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A [`TokenLedger`] in a JetStream key-value bucket, shared by every instance.
#[derive(Debug, Clone)]
pub struct KvLedger {
    kv: kv::Store,
    max_age: Duration,
}

impl KvLedger {
    /// Creates (or updates) the bucket and returns the ledger.
    pub async fn open(
        js: &jetstream::Context,
        options: &RateBucket,
    ) -> Result<Self, SchedulerError> {
        let kv = open_expiring_bucket(
            js,
            &options.bucket,
            "agentbus scheduler: tokens leased per tenant and window",
            "rate bucket max_age",
            options.max_age,
            options.storage,
            options.replicas,
        )
        .await?;
        Ok(Self {
            kv,
            max_age: options.max_age,
        })
    }

    /// A ledger over an already opened bucket (whose `max_age` is `max_age`).
    pub fn from_store(kv: kv::Store, max_age: Duration) -> Self {
        Self { kv, max_age }
    }

    /// The bucket.
    pub fn store(&self) -> &kv::Store {
        &self.kv
    }

    /// How long counters live; windows must be shorter.
    pub fn max_age(&self) -> Duration {
        self.max_age
    }

    /// Tokens leased so far in `window` of `scope` (`<tenant>.msgs` / `.bytes`).
    pub async fn leased(&self, scope: &str, window: u64) -> Result<u64, SchedulerError> {
        let key = format!("{scope}.{window}");
        Ok(self.read(&key).await?.0)
    }

    /// `(leased, revision)` of `key`; `(0, 0)` when absent, `(0, rev)` when deleted.
    async fn read(&self, key: &str) -> Result<(u64, u64), SchedulerError> {
        let entry = self
            .kv
            .entry(key)
            .await
            .map_err(|e| store_error(format!("reading {key}"), e))?;
        match entry {
            None => Ok((0, 0)),
            Some(e) if e.operation == kv::Operation::Put => {
                let n = std::str::from_utf8(&e.value)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| {
                        Error::new(SchedulerErrorKind::Store, format!("{key} holds no counter"))
                    })?;
                Ok((n, e.revision))
            }
            Some(e) => Ok((0, e.revision)),
        }
    }

    async fn lease_kv(
        &self,
        r: LeaseRequest<'_>,
        hint: &mut LeaseHint,
    ) -> Result<Lease, SchedulerError> {
        let key = format!("{}.{}", r.scope, r.window);
        // The last value this instance wrote, if it is for this window: when nobody
        // else leased since, the first compare-and-set succeeds without a read.
        let mut known =
            (hint.window == r.window && hint.revision != 0).then_some((hint.leased, hint.revision));
        for _ in 0..CAS_ATTEMPTS {
            let (leased, revision) = match known.take() {
                Some(k) => k,
                None => self.read(&key).await?,
            };
            let left = r.cap.saturating_sub(leased);
            if left < r.min.max(1) {
                return Ok(Lease { granted: 0, left });
            }
            let granted = r.want.min(left);
            let value = Bytes::from((leased + granted).to_string());
            match self.kv.update(&key, value, revision).await {
                Ok(revision) => {
                    *hint = LeaseHint {
                        window: r.window,
                        leased: leased + granted,
                        revision,
                    };
                    return Ok(Lease {
                        granted,
                        left: left - granted,
                    });
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(store_error(format!("leasing from {key}"), e)),
            }
        }
        Err(Error::new(
            SchedulerErrorKind::Store,
            format!("{key}: no lease after {CAS_ATTEMPTS} compare-and-set attempts"),
        ))
    }
}

impl TokenLedger for KvLedger {
    fn lease<'a>(&'a self, request: LeaseRequest<'a>, hint: &'a mut LeaseHint) -> LeaseFuture<'a> {
        Box::pin(self.lease_kv(request, hint))
    }
}
