//! A tenant's books: its usage ledger and archived hours, its policing
//! state, its budgets with their counters and marks. They live with the
//! platform's buckets, or, for a tenant created with a region, in that
//! region (data residency, issue 13).
//!
//! | what | shared (no region) | region `<r>` |
//! |---|---|---|
//! | usage ledger, archived hours, policing state | bucket [`USAGE_BUCKET`] | bucket `agentbus-usage-<r>` |
//! | budget specs | bucket [`BUDGETS_BUCKET`] | bucket `agentbus-budgets-<r>` |
//! | alert claims, throttle slots | bucket [`MARKS_BUCKET`] | bucket `agentbus-budget-marks-<r>` |
//! | counters | stream [`COUNTER_STREAM`], subjects `agentbus.budget.>` | stream `agentbus-budget-counters-<r>`, subjects `agentbus.budget-region.<r>.>` |
//!
//! Keys are the same in both (a regional counter stream needs its own
//! subjects: two streams may not capture the same one). Regional buckets are
//! placed on the servers tagged `region:<r>` with the deployment's replicas,
//! created at a region's first use; a region that cannot hold them is an
//! error, never placement elsewhere.
//!
//! # One home per tenant, decided once
//! A ledger carries the servers' counter cursors and a budget counter
//! carries the period's total: split between two places, usage would be
//! counted twice or budgets reset. So the books' home is a create-only
//! record (key `books.<tenant>` in the homes bucket
//! [`HOMES_BUCKET`](crate::audit::home::HOMES_BUCKET), value the region,
//! empty for the shared buckets), written
//! - by `tenant create`, before the tenant exists;
//! - or at the first use by a tenant without one: the shared buckets when
//!   they already hold its ledger or a budget (books from before regional
//!   homes stay where they are, never moved), else its region.
//!
//! Records never change and are never deleted (a deleted tenant's id keeps
//! its home, as its audit log does), so instances cache them.

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};
use tenant_bus::region::Region;
use tenant_bus::TenantId;

use crate::api::{ApiError, ErrorCode};
use crate::budget::{
    BudgetSpec, BUDGETS_BUCKET, COUNTER_MAX_AGE, COUNTER_PREFIX, COUNTER_STREAM, MARKS_BUCKET,
};
use crate::region_records::RegionRecords;
use crate::registry::{Registry, RegistryErrorKind};
use crate::store::{corrupt, create_json, get_json, list_json, unavailable, update_json};
use crate::usage::USAGE_BUCKET;
use tenant_bus::settle::while_unrouted;

/// The subject prefix of a region's budget counters:
/// `<prefix>.<region>.<tenant>.<budget>.<period>`.
pub const REGION_COUNTER_PREFIX: &str = "agentbus.budget-region";

/// Books home records cached per instance at most (then forgotten and read
/// again).
const MAX_CACHED_HOMES: usize = 100_000;

/// One place holding tenants' books: the shared buckets or one region's.
pub struct Books {
    /// The region, `None` for the shared buckets.
    pub region: Option<Region>,
    js: jetstream::Context,
    usage_bucket: String,
    budgets_bucket: String,
    usage: kv::Store,
    budgets: kv::Store,
    marks: kv::Store,
    counters: stream::Stream,
    counter_prefix: String,
}

impl std::fmt::Debug for Books {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Books")
            .field("region", &self.region)
            .finish()
    }
}

/// `name` in `region` (`<name>-<region>`), or `name` itself.
fn named(name: &str, region: Option<&Region>) -> String {
    match region {
        Some(r) => format!("{name}-{r}"),
        None => name.to_string(),
    }
}

/// A bucket's settings that differ between the books' buckets.
struct BucketSpec<'a> {
    name: String,
    description: &'a str,
    history: i64,
    max_age: std::time::Duration,
    max_value_size: i32,
}

async fn open_bucket(
    js: &jetstream::Context,
    spec: BucketSpec<'_>,
    replicas: usize,
    region: Option<&Region>,
) -> Result<kv::Store, ApiError> {
    let config = kv::Config {
        bucket: spec.name.clone(),
        description: spec.description.to_string(),
        history: spec.history,
        max_age: spec.max_age,
        max_value_size: spec.max_value_size,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        placement: region.map(Region::placement),
        ..Default::default()
    };
    let (store, _) = tenant_bus::open::bucket(js, config)
        .await
        .map_err(|e| unavailable(&where_(&format!("bucket {}", spec.name), region), e))?;
    if let Some(region) = region {
        // The lookup (or the create) answered with the bucket's configuration.
        check_placed(&spec.name, store.stream.cached_info(), region)?;
    }
    Ok(store)
}

/// "`what` in region r (servers tagged region:r)", or `what`.
fn where_(what: &str, region: Option<&Region>) -> String {
    match region {
        Some(r) => format!("{what} in region {r} (servers tagged {})", r.tag()),
        None => what.to_string(),
    }
}

/// Refuses a regional bucket or stream someone created without the
/// region's placement: it is not used.
fn check_placed(name: &str, info: &stream::Info, region: &Region) -> Result<(), ApiError> {
    if region.holds(info.config.placement.as_ref()) {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::Internal,
            format!("{name} exists without the placement of region {region}; not used"),
        ))
    }
}

impl Books {
    /// Opens (creating if missing, with `replicas`, placed in `region`) the
    /// books' buckets and counter stream of `region`, or the shared ones.
    pub async fn open(
        js: &jetstream::Context,
        replicas: usize,
        region: Option<&Region>,
    ) -> Result<Self, ApiError> {
        let in_region = |what: &str| match region {
            Some(r) => format!("{what} of the tenants of region {r}"),
            None => what.to_string(),
        };
        let usage_bucket = named(USAGE_BUCKET, region);
        let budgets_bucket = named(BUDGETS_BUCKET, region);
        let usage = open_bucket(
            js,
            BucketSpec {
                name: usage_bucket.clone(),
                description: &in_region(
                    "agentbus usage per tenant per hour, from the servers' counters",
                ),
                history: 1,
                max_age: std::time::Duration::ZERO,
                max_value_size: 64 * 1024,
            },
            replicas,
            region,
        )
        .await?;
        let budgets = open_bucket(
            js,
            BucketSpec {
                name: budgets_bucket.clone(),
                description: &in_region("agentbus budgets per tenant"),
                history: 5,
                max_age: std::time::Duration::ZERO,
                max_value_size: 64 * 1024,
            },
            replicas,
            region,
        )
        .await?;
        let marks = open_bucket(
            js,
            BucketSpec {
                name: named(MARKS_BUCKET, region),
                description: &in_region("agentbus budget alert claims and throttle slots"),
                history: 1,
                max_age: COUNTER_MAX_AGE,
                max_value_size: 1024,
            },
            replicas,
            region,
        )
        .await?;
        let counter_prefix = match region {
            Some(r) => format!("{REGION_COUNTER_PREFIX}.{r}"),
            None => COUNTER_PREFIX.to_string(),
        };
        let counter_stream = named(COUNTER_STREAM, region);
        // JetStream counters (nats-server 2.12+): the leader applies each
        // Nats-Incr in turn and acknowledges it with the new total.
        let (counters, _) = tenant_bus::open::stream(
            js,
            stream::Config {
                name: counter_stream.clone(),
                description: Some(in_region(
                    "agentbus budget counters per tenant, budget and period",
                )),
                subjects: vec![format!("{counter_prefix}.>")],
                allow_message_counter: true,
                allow_direct: true,
                max_messages_per_subject: 1,
                max_age: COUNTER_MAX_AGE,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                placement: region.map(Region::placement),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| {
            unavailable(
                &where_(&format!("opening stream {counter_stream}"), region),
                e,
            )
        })?;
        if let Some(region) = region {
            check_placed(&counter_stream, counters.cached_info(), region)?;
        }
        Ok(Self {
            region: region.cloned(),
            js: js.clone(),
            usage_bucket,
            budgets_bucket,
            usage,
            budgets,
            marks,
            counters,
            counter_prefix,
        })
    }

    // ----- usage --------------------------------------------------------------------

    /// A tenant's usage ledger and its revision.
    pub async fn usage_ledger(
        &self,
        tenant: &TenantId,
    ) -> Result<Option<(crate::usage::Ledger, u64)>, ApiError> {
        get_json(&self.usage, tenant.as_str(), "usage ledger").await
    }

    /// Writes a ledger: created when `revision` is `None`, else compare-and-set.
    /// `Ok(false)` when someone else wrote first.
    pub async fn write_usage_ledger(
        &self,
        tenant: &TenantId,
        ledger: &crate::usage::Ledger,
        revision: Option<u64>,
    ) -> Result<bool, ApiError> {
        self.put(tenant.as_str(), ledger, revision).await
    }

    /// Archives one closed hour (idempotent: the same values every time).
    pub async fn archive_usage_hour(
        &self,
        tenant: &TenantId,
        hour: &crate::usage::ArchivedHour,
    ) -> Result<(), ApiError> {
        let bytes = Bytes::from(serde_json::to_vec(hour).map_err(|e| corrupt("usage", e))?);
        let key = crate::usage::archive_key(tenant, hour.hour_ms);
        while_unrouted(|| self.usage.put(key.as_str(), bytes.clone()))
            .await
            .map_err(|e| unavailable("archiving usage", e))?;
        Ok(())
    }

    /// Every archived hour of `tenant`.
    pub async fn archived_usage(
        &self,
        tenant: &TenantId,
    ) -> Result<Vec<crate::usage::ArchivedHour>, ApiError> {
        let filter = format!("$KV.{}.{tenant}.h.*", self.usage_bucket);
        list_json(&self.js, &self.usage_bucket, &filter).await
    }

    /// Any JSON record of the usage bucket (policing state, leases).
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, u64)>, ApiError> {
        get_json(&self.usage, key, "usage record").await
    }

    /// Writes a JSON record of the usage bucket: created when `revision` is
    /// `None`, else compare-and-set; `Ok(false)` when someone else wrote first.
    pub async fn put<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        revision: Option<u64>,
    ) -> Result<bool, ApiError> {
        let done = match revision {
            None => create_json(&self.usage, key, value).await?,
            Some(rev) => update_json(&self.usage, key, value, rev).await?,
        };
        Ok(done.is_some())
    }

    // ----- budgets ------------------------------------------------------------------

    /// A tenant's budget specs, by name.
    pub async fn budgets(&self, tenant: &TenantId) -> Result<Vec<BudgetSpec>, ApiError> {
        let filter = format!(
            "$KV.{}.{}*",
            self.budgets_bucket,
            crate::budget::spec_prefix(tenant.as_str())
        );
        let mut out: Vec<BudgetSpec> = list_json(&self.js, &self.budgets_bucket, &filter).await?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Writes a budget spec (creates or replaces).
    pub async fn put_budget(&self, tenant: &TenantId, spec: &BudgetSpec) -> Result<(), ApiError> {
        let bytes = Bytes::from(serde_json::to_vec(spec).map_err(|e| corrupt("budget", e))?);
        let key = crate::budget::spec_key(tenant.as_str(), &spec.name);
        while_unrouted(|| self.budgets.put(key.as_str(), bytes.clone()))
            .await
            .map_err(|e| unavailable("writing a budget", e))?;
        Ok(())
    }

    /// Deletes a budget spec; `Ok(false)` if there was none.
    pub async fn delete_budget(&self, tenant: &TenantId, name: &str) -> Result<bool, ApiError> {
        let key = crate::budget::spec_key(tenant.as_str(), name);
        let existed = get_json::<BudgetSpec>(&self.budgets, &key, "budget")
            .await?
            .is_some();
        if existed {
            self.budgets
                .purge(&key)
                .await
                .map_err(|e| unavailable("deleting a budget", e))?;
        }
        Ok(existed)
    }

    /// Whether these books hold anything of `tenant` (a ledger or a budget).
    async fn hold(&self, tenant: &TenantId) -> Result<bool, ApiError> {
        if self.usage_ledger(tenant).await?.is_some() {
            return Ok(true);
        }
        Ok(!self.budgets(tenant).await?.is_empty())
    }

    /// The counter subject of `tenant`'s budget `name` in `period`.
    pub fn counter_subject(&self, tenant: &str, name: &str, period: &str) -> String {
        format!("{}.{tenant}.{name}.{period}", self.counter_prefix)
    }

    /// Adds `delta` to a budget counter and returns the new total (the
    /// stream leader applies increments one at a time).
    pub async fn budget_incr(&self, subject: &str, delta: i64) -> Result<i128, ApiError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Incr", format!("{delta:+}").as_str());
        // "No responders" means no counter applied it: retried (a stream
        // created a moment ago on a cluster, see tenant_bus::settle).
        let ack = while_unrouted(|| async {
            self.js
                .publish_with_headers(subject.to_string(), headers.clone(), Bytes::new())
                .await?
                .await
        })
        .await
        .map_err(|e| unavailable("charging a budget", e))?;
        let value = ack
            .value
            .ok_or_else(|| corrupt("budget counter", "the server returned no total"))?;
        value
            .parse::<i128>()
            .map_err(|e| corrupt("budget counter", e))
    }

    /// A budget counter's total (0 if it was never charged).
    pub async fn budget_total(&self, subject: &str) -> Result<i128, ApiError> {
        #[derive(serde::Deserialize)]
        struct Val {
            val: String,
        }
        match self.counters.direct_get_last_for_subject(subject).await {
            Ok(msg) => {
                let v: Val = serde_json::from_slice(&msg.payload)
                    .map_err(|e| corrupt("budget counter", e))?;
                v.val
                    .parse::<i128>()
                    .map_err(|e| corrupt("budget counter", e))
            }
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(0),
            Err(e) => Err(unavailable("reading a budget counter", e)),
        }
    }

    /// Removes every budget counter of `tenant` (it was deleted; an id used
    /// again starts from zero).
    pub async fn purge_budget_counters(&self, tenant: &TenantId) -> Result<(), ApiError> {
        self.counters
            .purge()
            .filter(format!("{}.{tenant}.>", self.counter_prefix))
            .await
            .map_err(|e| unavailable("purging budget counters", e))?;
        Ok(())
    }

    /// Claims a mark (an alert or a throttle slot) once: `Ok(true)` for the
    /// one caller that created it.
    pub async fn claim_budget_mark(&self, key: &str, at_ms: u64) -> Result<bool, ApiError> {
        Ok(create_json(&self.marks, key, &at_ms).await?.is_some())
    }

    /// A mark's value (Unix ms) and revision.
    pub async fn budget_mark(&self, key: &str) -> Result<Option<(u64, u64)>, ApiError> {
        get_json(&self.marks, key, "budget mark").await
    }

    /// Moves a mark to `at_ms` if it is still at `revision`.
    pub async fn move_budget_mark(
        &self,
        key: &str,
        at_ms: u64,
        revision: u64,
    ) -> Result<bool, ApiError> {
        Ok(update_json(&self.marks, key, &at_ms, revision)
            .await?
            .is_some())
    }

    /// Gives a mark back (what it stood for did not happen).
    pub async fn drop_budget_mark(&self, key: &str) {
        let _ = self.marks.purge(key).await;
    }
}

/// The key of `tenant`'s books home in the homes bucket.
fn home_key(tenant: &TenantId) -> String {
    format!("books.{tenant}")
}

/// Where each tenant's books live, as one controller instance knows it.
pub struct BookHomes {
    js: jetstream::Context,
    /// `books.<tenant>` -> its region (`None`: shared).
    records: RegionRecords,
    registry: Registry,
    replicas: usize,
    central: Arc<Books>,
    /// Opened regional books (one per region: few).
    regions: tokio::sync::Mutex<HashMap<Region, Arc<Books>>>,
}

impl std::fmt::Debug for BookHomes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BookHomes")
    }
}

impl BookHomes {
    /// Opens the shared books and the homes bucket (creating them if
    /// missing, with `replicas`).
    pub async fn open(
        js: &jetstream::Context,
        registry: Registry,
        replicas: usize,
    ) -> Result<Self, ApiError> {
        let central = Arc::new(Books::open(js, replicas, None).await?);
        let homes = crate::audit::home::open_homes_bucket(js, replicas).await?;
        Ok(Self {
            js: js.clone(),
            records: RegionRecords::new(homes, "a books home", MAX_CACHED_HOMES),
            registry,
            replicas,
            central,
            regions: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The shared books (the policing lease lives there too).
    pub fn central(&self) -> &Arc<Books> {
        &self.central
    }

    /// The books of `region` (opened, and created in the region, on first
    /// use), or the shared ones.
    pub async fn books(&self, region: Option<&Region>) -> Result<Arc<Books>, ApiError> {
        let Some(region) = region else {
            return Ok(self.central.clone());
        };
        let mut regions = self.regions.lock().await;
        if let Some(b) = regions.get(region) {
            return Ok(b.clone());
        }
        let books = Arc::new(Books::open(&self.js, self.replicas, Some(region)).await?);
        regions.insert(region.clone(), books.clone());
        Ok(books)
    }

    /// Writes `tenant`'s books home unless it has one; the home it has
    /// afterwards. `tenant create` calls it before the tenant exists.
    pub async fn claim(
        &self,
        tenant: &TenantId,
        region: Option<&Region>,
    ) -> Result<Option<Region>, ApiError> {
        self.records.claim(&home_key(tenant), region).await
    }

    /// Where `tenant`'s books live (see the module docs): its record, else
    /// decided now and recorded. A tenant that does not exist is answered
    /// with the shared books and nothing is recorded.
    pub async fn of(&self, tenant: &TenantId) -> Result<Arc<Books>, ApiError> {
        if let Some(region) = self.records.recorded(&home_key(tenant)).await? {
            return self.books(region.as_ref()).await;
        }
        if self.central.hold(tenant).await? {
            self.claim(tenant, None).await?;
            return Ok(self.central.clone());
        }
        let region = match self.registry.get(tenant).await {
            Ok(record) => record
                .settings
                .region
                .as_deref()
                .and_then(|r| Region::new(r).ok()),
            Err(e) if e.kind() == RegistryErrorKind::NotFound => return Ok(self.central.clone()),
            Err(e) => return Err(unavailable("reading the tenant of its books", e)),
        };
        let region = self.claim(tenant, region.as_ref()).await?;
        self.books(region.as_ref()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regional_names_and_home_keys() {
        let eu = Region::new("eu").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(named(USAGE_BUCKET, Some(&eu)), "agentbus-usage-eu");
        assert_eq!(
            named(COUNTER_STREAM, Some(&eu)),
            "agentbus-budget-counters-eu"
        );
        assert_eq!(named(USAGE_BUCKET, None), USAGE_BUCKET);
        let t = TenantId::new("acme").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(home_key(&t), "books.acme");
    }
}
