//! Where each audit log lives: the shared [`STREAM`](super::STREAM), or the
//! stream of its tenant's region.
//!
//! A tenant created with a region (`tenant create --region eu`) has its audit
//! log in `AUDIT_eu`, a stream placed on the servers tagged `region:eu` with
//! the deployment's replicas, under its own subjects
//! (`agentbus.audit-region.v1.eu.{log,checkpoint,anchor}.<tenant>`: the
//! shared stream captures `agentbus.audit.v1.>`, and two streams may not
//! capture the same subject). Every other log stays in `AUDIT`.
//!
//! # One home per log, decided once
//! A log's entries chain by index, so a log must never be split between two
//! streams. Its home is a create-only record in [`HOMES_BUCKET`] (key: the
//! log, value: the region, empty for the shared stream), written
//! - by `tenant create`, before the tenant exists (refused when the id's
//!   log already lives elsewhere: a deleted tenant's id is not reused in
//!   another region);
//! - or at the first append to a log without one: the shared stream when it
//!   already holds entries of the log (logs from before regional homes),
//!   else the tenant's region (a tenant created before this record
//!   existed).
//!
//! An event naming a tenant that neither exists nor has a log (a request
//! about an unknown id, a refused create) goes to the platform log instead:
//! it cannot fix the home of a tenant created later. Records never change
//! and are never deleted, so instances cache them.

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::jetstream::{self, kv, stream};
use tenant_bus::region::Region;
use tenant_bus::TenantId;

use super::event::PLATFORM_LOG;
use super::{MAX_CACHED_LOGS, MAX_ENTRY_BYTES, SUBJECT_PREFIX};
use crate::api::{ApiError, ErrorCode};
use crate::region_records::RegionRecords;
use crate::registry::{Registry, RegistryErrorKind};
use crate::store::unavailable;

/// The bucket of log homes.
pub const HOMES_BUCKET: &str = "agentbus-audit-homes";
/// The subject prefix of regional logs: `<prefix>.<region>.log.<tenant>`.
pub const REGION_SUBJECT_PREFIX: &str = "agentbus.audit-region.v1";

/// The stream of `region`'s logs: `AUDIT_<region>`.
pub fn region_stream(region: &Region) -> String {
    format!("{}_{region}", super::STREAM)
}

/// A stream holding logs, and the subjects of a log in it.
#[derive(Debug, Clone)]
pub struct Home {
    /// The region, `None` for the shared stream.
    pub region: Option<Region>,
    pub(super) stream: stream::Stream,
    prefix: String,
}

impl Home {
    /// `<prefix>.log.<log>`: the events.
    pub fn log_subject(&self, log: &str) -> String {
        format!("{}.log.{log}", self.prefix)
    }

    /// `<prefix>.checkpoint.<log>`: signed checkpoints.
    pub fn checkpoint_subject(&self, log: &str) -> String {
        format!("{}.checkpoint.{log}", self.prefix)
    }

    /// `<prefix>.anchor.<log>`: the retention anchor.
    pub fn anchor_subject(&self, log: &str) -> String {
        format!("{}.anchor.{log}", self.prefix)
    }

    /// The stream (for inspection: only the controller appends).
    pub fn stream(&self) -> stream::Stream {
        self.stream.clone()
    }

    /// The stream's name.
    pub fn stream_name(&self) -> String {
        self.region
            .as_ref()
            .map_or_else(|| super::STREAM.to_string(), region_stream)
    }
}

/// Where an append goes.
pub(super) enum AppendHome {
    /// The log's home.
    Log(Arc<Home>),
    /// The log has no home and names no tenant: the event goes to the
    /// platform log.
    Platform,
}

/// The homes of the logs, as one controller instance knows them.
pub(super) struct Homes {
    js: jetstream::Context,
    registry: Registry,
    replicas: usize,
    central: Arc<Home>,
    /// Opened regional streams (one per region: few).
    regions: tokio::sync::Mutex<HashMap<Region, Arc<Home>>>,
    /// log -> its region (`None`: the shared stream).
    records: RegionRecords,
}

/// Opens (creating if missing, with `replicas`) the homes bucket: the home
/// of each audit log (key: the log) and of each tenant's books (key
/// `books.<tenant>`, see [`crate::books`]).
pub(crate) async fn open_homes_bucket(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<kv::Store, ApiError> {
    let config = kv::Config {
        bucket: HOMES_BUCKET.to_string(),
        description: "agentbus homes: the region of each audit log and tenant's books".into(),
        history: 1,
        max_value_size: 256,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    };
    tenant_bus::open::bucket(js, config)
        .await
        .map(|(kv, _)| kv)
        .map_err(|e| unavailable("the homes bucket", e))
}

impl Homes {
    /// Opens (creating if missing) the homes bucket with `replicas`.
    pub(super) async fn open(
        js: jetstream::Context,
        central: stream::Stream,
        registry: Registry,
        replicas: usize,
    ) -> Result<Self, ApiError> {
        let kv = open_homes_bucket(&js, replicas).await?;
        Ok(Self {
            js,
            registry,
            replicas,
            central: Arc::new(Home {
                region: None,
                stream: central,
                prefix: SUBJECT_PREFIX.to_string(),
            }),
            regions: tokio::sync::Mutex::new(HashMap::new()),
            records: RegionRecords::new(kv, "an audit log home", MAX_CACHED_LOGS),
        })
    }

    /// The shared stream.
    pub(super) fn central(&self) -> &Arc<Home> {
        &self.central
    }

    /// The stream of `region` (created, placed in the region, on first use;
    /// a region without servers to hold it is an error, never placement
    /// elsewhere).
    async fn regional(&self, region: &Region) -> Result<Arc<Home>, ApiError> {
        let mut regions = self.regions.lock().await;
        if let Some(h) = regions.get(region) {
            return Ok(h.clone());
        }
        let prefix = format!("{REGION_SUBJECT_PREFIX}.{region}");
        let name = region_stream(region);
        let (stream, _) = tenant_bus::open::stream(
            &self.js,
            stream::Config {
                name: name.clone(),
                description: Some(format!(
                    "agentbus audit logs of the tenants of region {region}"
                )),
                subjects: vec![format!("{prefix}.>")],
                storage: stream::StorageType::File,
                num_replicas: self.replicas,
                max_message_size: MAX_ENTRY_BYTES as i32,
                allow_direct: true,
                allow_atomic_publish: true,
                placement: Some(region.placement()),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| {
            unavailable(
                &format!(
                    "opening stream {name} in region {region} (servers tagged {})",
                    region.tag()
                ),
                e,
            )
        })?;
        if !region.holds(stream.cached_info().config.placement.as_ref()) {
            return Err(ApiError::new(
                ErrorCode::Internal,
                format!("stream {name} exists outside region {region}"),
            ));
        }
        let home = Arc::new(Home {
            region: Some(region.clone()),
            stream,
            prefix,
        });
        regions.insert(region.clone(), home.clone());
        Ok(home)
    }

    async fn home(&self, region: Option<&Region>) -> Result<Arc<Home>, ApiError> {
        match region {
            None => Ok(self.central.clone()),
            Some(r) => self.regional(r).await,
        }
    }

    /// The stored home record of `log`, if any (cached once seen).
    async fn recorded(&self, log: &str) -> Result<Option<Option<Region>>, ApiError> {
        if log == PLATFORM_LOG {
            return Ok(Some(None));
        }
        self.records.recorded(log).await
    }

    /// Writes `log`'s home unless it has one; the home it has afterwards.
    async fn claim(&self, log: &str, region: Option<&Region>) -> Result<Option<Region>, ApiError> {
        self.records.claim(log, region).await
    }

    /// Whether the shared stream holds entries of `log` (a log from before
    /// regional homes).
    async fn central_holds(&self, log: &str) -> Result<bool, ApiError> {
        match self
            .central
            .stream
            .get_last_raw_message_by_subject(&self.central.log_subject(log))
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(false),
            Err(e) => Err(unavailable("reading the shared audit stream", e)),
        }
    }

    /// Where `log` is read: its home, or the shared stream for a log without
    /// one (nothing was appended to it since homes exist).
    pub(super) async fn for_read(&self, log: &str) -> Result<Arc<Home>, ApiError> {
        let region = self.recorded(log).await?.flatten();
        self.home(region.as_ref()).await
    }

    /// Where an event of `log` is appended (see the module docs).
    pub(super) async fn for_append(&self, log: &str) -> Result<AppendHome, ApiError> {
        if let Some(region) = self.recorded(log).await? {
            return self.home(region.as_ref()).await.map(AppendHome::Log);
        }
        let decided = if self.central_holds(log).await? {
            Some(None)
        } else {
            let id = TenantId::new(log)
                .map_err(|e| ApiError::new(ErrorCode::InvalidInput, e.to_string()))?;
            match self.registry.get(&id).await {
                Ok(record) => Some(
                    record
                        .settings
                        .region
                        .as_deref()
                        .and_then(|r| Region::new(r).ok()),
                ),
                Err(e) if e.kind() == RegistryErrorKind::NotFound => None,
                Err(e) => return Err(unavailable("reading the tenant of an audit log", e)),
            }
        };
        match decided {
            Some(region) => {
                let region = self.claim(log, region.as_ref()).await?;
                self.home(region.as_ref()).await.map(AppendHome::Log)
            }
            None => Ok(AppendHome::Platform),
        }
    }

    /// Fixes the home of a tenant about to be created: its region's stream
    /// (or the shared one). Refused when the id's log already lives
    /// elsewhere (a deleted tenant's id in another region, or a log from
    /// before regional homes for a tenant with a region); the stream is
    /// opened, so a region that cannot hold it refuses the tenant now.
    pub(super) async fn claim_for_tenant(
        &self,
        id: &TenantId,
        region: Option<&Region>,
    ) -> Result<(), ApiError> {
        let log = id.as_str();
        if region.is_some()
            && self.recorded(log).await?.is_none()
            && self.central_holds(log).await?
        {
            return Err(ApiError::new(
                ErrorCode::InvalidInput,
                format!(
                    "tenant id {log} has audit history in the shared log (from before regional logs); create it without a region or choose another id"
                ),
            ));
        }
        let home = self.claim(log, region).await?;
        if home.as_ref() != region {
            let at = home.map_or_else(|| "the shared log".to_string(), |r| format!("region {r}"));
            return Err(ApiError::new(
                ErrorCode::InvalidInput,
                format!(
                    "tenant id {log} was used before and its audit log lives in {at}; an id keeps its region: choose another id"
                ),
            ));
        }
        self.home(region).await.map(|_| ())
    }
}
