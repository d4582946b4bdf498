//! The tamper-evident audit log: every control-plane decision, per tenant, in an
//! RFC 6962 Merkle log with signed checkpoints (see `docs/audit.md`).
//!
//! # Storage
//! One JetStream stream, [`STREAM`] (`AUDIT`), in the platform account, with the
//! controller's replica count; the logs of tenants with a region live in their
//! region's stream instead (`AUDIT_<region>`, see [`home`]). Each log has three
//! subjects (shown for `AUDIT`):
//!
//! ```text
//! agentbus.audit.v1.log.<tenant|_platform>          events (leaves), in index order
//! agentbus.audit.v1.checkpoint.<tenant|_platform>   signed checkpoints (C2SP notes)
//! agentbus.audit.v1.anchor.<tenant|_platform>       retention anchor (after a prune)
//! ```
//!
//! Only the controller appends: admins' NATS users may publish only on their
//! `agentbus.admin.v1.…` subjects, and tenants' users live in other accounts. An
//! append carries `Nats-Expected-Last-Subject-Sequence` (the stream sequence of
//! the log's previous entry) and `Nats-Msg-Id` (the event id), so two controller
//! instances can never give two events the same index: the loser reloads the
//! log's head and retries.
//!
//! # Layout
//! - [`event`]: the v1 event and its canonical bytes.
//! - [`home`]: which stream holds each log (the shared one or its region's).
//! - [`merkle`]: RFC 6962 hashing, the compact range, proofs.
//! - [`note`]: C2SP signed-note checkpoints (Ed25519).
//! - [`verify`]: offline verification of a log and of an inclusion proof.
//! - [`export`]: JSON lines, CSV, OCSF and CEF (RFC 5424) exports.
//! - [`sink`]: the runtime's bounded queue of security events into the log.

pub mod event;
pub mod export;
pub mod home;
pub mod merkle;
pub mod note;
pub mod sink;
pub mod verify;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use base64::Engine as _;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, ErrorCode};
use crate::client::AdminClient;
use crate::kek::Kek;
use crate::store::{secret_name, unavailable, Store};
use event::{AuditEvent, PLATFORM_LOG};
use merkle::{CompactRange, Hash};
use note::{Checkpoint, Signer, Verifier};
use verify::{Anchor, InclusionBundle, StoredCheckpoint, StoredEntry, VerifyFailure, VerifyReport};

/// The stream holding every log.
pub const STREAM: &str = "AUDIT";
/// The subject prefix of the stream.
pub const SUBJECT_PREFIX: &str = "agentbus.audit.v1";
/// The largest stored event or checkpoint, bytes.
pub const MAX_ENTRY_BYTES: usize = 16 * 1024;
/// Logs whose append head or checkpoint state a controller caches.
pub const MAX_CACHED_LOGS: usize = 10_000;
/// Bytes of stored entries one `verify-data` page carries at most.
pub const PAGE_BYTES: usize = 256 * 1024;
/// The most events one `list` answers with.
pub const MAX_LIST: usize = 10_000;

/// `agentbus.audit.v1.log.<log>`.
pub fn log_subject(log: &str) -> String {
    format!("{SUBJECT_PREFIX}.log.{log}")
}

/// `agentbus.audit.v1.checkpoint.<log>`.
pub fn checkpoint_subject(log: &str) -> String {
    format!("{SUBJECT_PREFIX}.checkpoint.{log}")
}

/// `agentbus.audit.v1.anchor.<log>`: the retention anchor of a pruned log.
pub fn anchor_subject(log: &str) -> String {
    format!("{SUBJECT_PREFIX}.anchor.{log}")
}

/// One day in milliseconds.
pub const DAY_MS: u64 = 86_400_000;

/// The admin API subject `agentbus.admin.v1.audit.<log>.<verb>` (`list`,
/// `proof`, `verify-data`).
pub fn audit_subject(log: &str, verb: &str) -> String {
    format!("{}.audit.{log}.{verb}", crate::api::ADMIN_PREFIX)
}

/// A log token: a valid tenant id, or [`PLATFORM_LOG`].
pub fn check_log(log: &str) -> Result<(), ApiError> {
    if log == PLATFORM_LOG || tenant_bus::TenantId::new(log).is_ok() {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::InvalidInput,
            format!("{log:?} is neither a tenant id nor {PLATFORM_LOG}"),
        ))
    }
}

/// When checkpoints are signed, and how long an append may take.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Sign a checkpoint once a log has this many unsigned events. Default 100.
    pub checkpoint_every: u64,
    /// Sign checkpoints of every log with unsigned events this often. Default 10 s.
    pub checkpoint_interval: Duration,
    /// The longest an append waits for the stream before it is counted as
    /// failed. Default 2 s.
    pub append_timeout: Duration,
    /// How often the controller applies retention (prunes old entries). Default 1 h.
    pub retention_every: Duration,
    /// Retention of the platform-wide log (`_platform`), days. Default 365.
    pub platform_retention_days: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            checkpoint_every: 100,
            checkpoint_interval: Duration::from_secs(10),
            append_timeout: Duration::from_secs(2),
            retention_every: Duration::from_secs(3600),
            platform_retention_days: 365,
        }
    }
}

/// What the audit log of one controller instance has done.
#[derive(Debug, Default)]
pub struct AuditCounters {
    appended: AtomicU64,
    append_failed: AtomicU64,
    batches: AtomicU64,
    checkpoints: AtomicU64,
    checkpoint_failed: AtomicU64,
    tamper_detected: AtomicU64,
    pruned: AtomicU64,
}

/// A snapshot of [`AuditCounters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditCountersSnapshot {
    /// Events appended.
    pub appended: u64,
    /// Events that could not be appended within the timeout (logged at error).
    pub append_failed: u64,
    /// Appends that reached the stream: atomic batches and lone publishes
    /// (`appended / batches` is the group commit's events per round trip).
    #[serde(default)]
    pub batches: u64,
    /// Checkpoints signed and stored.
    pub checkpoints: u64,
    /// Checkpoint passes that failed (outage, or tampering: see below).
    pub checkpoint_failed: u64,
    /// Logs found altered by the appender or the checkpointer (logged at error;
    /// such a log gets no further checkpoint until repaired).
    pub tamper_detected: u64,
    /// Entries removed by retention.
    #[serde(default)]
    pub pruned: u64,
}

impl AuditCounters {
    /// The current values.
    pub fn snapshot(&self) -> AuditCountersSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        AuditCountersSnapshot {
            appended: g(&self.appended),
            append_failed: g(&self.append_failed),
            batches: g(&self.batches),
            checkpoints: g(&self.checkpoints),
            checkpoint_failed: g(&self.checkpoint_failed),
            tamper_detected: g(&self.tamper_detected),
            pruned: g(&self.pruned),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The append position of one log.
#[derive(Debug, Clone, Copy)]
struct Head {
    seq: u64,
    next_index: u64,
    prev: Option<Hash>,
}

/// What the checkpointer knows of one log.
#[derive(Debug, Clone, Default)]
struct RangeState {
    range: CompactRange,
    last_seq: u64,
    prev: Option<Hash>,
    verified_cp_size: u64,
    // The prune point of the anchor this state started from (0: none).
    anchored: u64,
}

/// A leaf this instance appended, fed to the checkpointer so that it need not
/// read the entry back: `after` is the stream sequence of the log's previous
/// entry (the expected last subject sequence the append carried, or the batch's
/// previous event of the same log), `prev` that entry's leaf hash.
#[derive(Debug, Clone, Copy)]
struct Fed {
    after: u64,
    seq: u64,
    index: u64,
    prev: Option<Hash>,
    leaf: Hash,
}

/// Fed leaves one log keeps at most; past this the log's feed is dropped and
/// its checkpointer reads the entries back instead.
const MAX_FED_PER_LOG: usize = 4096;

/// What one prune did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneReport {
    /// The log.
    pub log: String,
    /// Entries below this index are gone; the anchor's checkpoint has this size.
    pub pruned_before: u64,
    /// Entries removed by this prune.
    pub removed: u64,
    /// The cutoff applied, Unix ms.
    pub cutoff_ms: u64,
}

/// One stored message of the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawItem {
    /// Its stream sequence.
    pub seq: u64,
    /// Its bytes, standard base64.
    pub data: String,
}

/// `audit.<log>.verify-data` request: one page of a log's entries or checkpoints.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyDataRequest {
    /// `log` or `checkpoint`.
    pub kind: String,
    /// Stream sequence to read after (0: from the start).
    #[serde(default)]
    pub after: u64,
}

/// `audit.<log>.verify-data` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyDataPage {
    /// The messages, in stream order.
    pub items: Vec<RawItem>,
    /// Whether more follow (ask again after the last item's `seq`).
    pub more: bool,
    /// The checkpoint signer's verifier key.
    pub verifier_key: String,
}

/// `audit.<log>.list` request: filters, all optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListRequest {
    /// Events at or after this time, Unix ms.
    #[serde(default)]
    pub since_ms: Option<u64>,
    /// Events before this time, Unix ms.
    #[serde(default)]
    pub until_ms: Option<u64>,
    /// Only this action (`tenant.create`), or a prefix ending in `.` (`tenant.`).
    #[serde(default)]
    pub action: Option<String>,
    /// Only this actor id.
    #[serde(default)]
    pub actor: Option<String>,
    /// At most this many (the newest), default and maximum [`MAX_LIST`].
    #[serde(default)]
    pub limit: Option<usize>,
}

impl ListRequest {
    /// Whether `e` passes the filters.
    pub fn matches(&self, e: &AuditEvent) -> bool {
        self.since_ms.is_none_or(|t| e.time_ms >= t)
            && self.until_ms.is_none_or(|t| e.time_ms < t)
            && self
                .action
                .as_deref()
                .is_none_or(|a| e.action == a || (a.ends_with('.') && e.action.starts_with(a)))
            && self.actor.as_deref().is_none_or(|a| e.actor.id == a)
    }
}

/// `audit.<log>.proof` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProofRequest {
    /// The event's id.
    pub event_id: String,
}

/// Striped locks: appends to one log from this instance queue up.
struct Stripes(Vec<tokio::sync::Mutex<()>>);

impl Stripes {
    fn new() -> Self {
        Self((0..64).map(|_| tokio::sync::Mutex::new(())).collect())
    }

    async fn lock(&self, key: &str) -> tokio::sync::MutexGuard<'_, ()> {
        let h = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        self.0[(h % 64) as usize].lock().await
    }
}

fn lock_err<T>(_: T) -> ApiError {
    ApiError::new(ErrorCode::Internal, "audit state lock poisoned")
}

/// The audit log as one controller instance writes and reads it.
pub struct AuditLog {
    js: jetstream::Context,
    homes: home::Homes,
    signer: Signer,
    key_name: String,
    instance: String,
    config: AuditConfig,
    heads: std::sync::Mutex<HashMap<String, Head>>,
    ranges: tokio::sync::Mutex<HashMap<String, RangeState>>,
    dirty: std::sync::Mutex<HashMap<String, u64>>,
    /// Leaves appended here and not yet taken by the checkpointer, per log.
    fed: std::sync::Mutex<HashMap<String, Vec<Fed>>>,
    wake: tokio::sync::Notify,
    locks: Stripes,
    /// One checkpoint or prune of a log at a time (per log, so logs proceed
    /// in parallel).
    cp_locks: Stripes,
    counters: AuditCounters,
    /// Events waiting to be appended and the logs being appended to (group
    /// commit, see `AuditLog::record`).
    group: std::sync::Mutex<Group>,
    /// Woken when a batch ends.
    batch_done: tokio::sync::Notify,
}

/// The group commit's shared state.
#[derive(Default)]
struct Group {
    queue: std::collections::VecDeque<Pending>,
    /// Logs with a batch in flight: their next events wait for it.
    busy: std::collections::HashSet<String>,
    /// Batches in flight.
    drainers: usize,
}

/// Batches in flight at once (over disjoint logs).
const MAX_DRAINERS: usize = 4;

/// Queued events that start a batch while another is in flight; fewer wait
/// for a batch to end (so that they go together instead of one round trip
/// each: the latency is the same, the round trips far fewer).
const PIPELINE_MIN: usize = 32;

/// An event waiting for the group commit, and where its outcome goes.
struct Pending {
    event: AuditEvent,
    home: Arc<home::Home>,
    done: tokio::sync::oneshot::Sender<Result<u64, String>>,
}

/// A batch in flight: dropping it frees its logs and its drainer slot, and
/// wakes a waiting caller to take the next batch.
struct DrainSlot<'a> {
    audit: &'a AuditLog,
    logs: Vec<String>,
}

impl Drop for DrainSlot<'_> {
    fn drop(&mut self) {
        if let Ok(mut g) = self.audit.group.lock() {
            for log in &self.logs {
                g.busy.remove(log);
            }
            g.drainers = g.drainers.saturating_sub(1);
        }
        self.audit.batch_done.notify_one();
    }
}

/// One event of a `record_many` call: what its failure is logged with, and
/// its outcome once known.
struct Waiting {
    log: String,
    id: String,
    brief: (String, String, event::Outcome, String),
    rx: Option<tokio::sync::oneshot::Receiver<Result<u64, String>>>,
    outcome: Option<Result<u64, String>>,
}

/// Logs checkpointed at once by the checkpointer.
const CHECKPOINT_CONCURRENCY: usize = 8;

/// Events appended in one atomic batch at most: the server's limit (ADR-50).
const MAX_BATCH: usize = 1_000;

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("key", &self.key_name)
            .finish()
    }
}

impl AuditLog {
    /// Opens (creating if missing) the [`STREAM`] with `replicas`, and loads the
    /// checkpoint key from the secrets bucket (creating it on first use, one
    /// winner across instances).
    pub async fn open(
        store: &Store,
        kek: &Kek,
        replicas: usize,
        platform_account: &str,
        instance: &str,
        config: AuditConfig,
    ) -> Result<Self, ApiError> {
        let js = store.jetstream().clone();
        let (stream, _) = tenant_bus::open::stream(
            &js,
            stream::Config {
                name: STREAM.to_string(),
                description: Some(
                    "agentbus audit logs (RFC 6962 leaves and signed checkpoints)".into(),
                ),
                subjects: vec![format!("{SUBJECT_PREFIX}.>")],
                storage: stream::StorageType::File,
                num_replicas: replicas,
                max_message_size: MAX_ENTRY_BYTES as i32,
                allow_direct: true,
                // Group commits append many events in one atomic batch.
                allow_atomic_publish: true,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| unavailable("opening the AUDIT stream", e))?;
        // A stream created before group commits: allow atomic batches now
        // (the lookup, or the create, answered with its configuration).
        let info = stream.cached_info().clone();
        if !info.config.allow_atomic_publish {
            let mut config = info.config.clone();
            config.allow_atomic_publish = true;
            js.update_stream(config)
                .await
                .map_err(|e| unavailable("allowing atomic batches on the AUDIT stream", e))?;
        }
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| ApiError::new(ErrorCode::Internal, "no randomness"))?;
        store
            .put_secret_if_absent(kek, secret_name::AUDIT_CHECKPOINT, &seed)
            .await?;
        let seed = store
            .secret(kek, secret_name::AUDIT_CHECKPOINT)
            .await?
            .ok_or_else(|| ApiError::new(ErrorCode::Internal, "checkpoint key vanished"))?;
        let key_name = format!("agentbus/{platform_account}/audit");
        let signer = Signer::from_seed(&key_name, &seed)
            .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
        let homes = home::Homes::open(js.clone(), stream, store.registry.clone(), replicas).await?;
        Ok(Self {
            js,
            homes,
            signer,
            key_name,
            instance: instance.to_string(),
            config,
            heads: std::sync::Mutex::new(HashMap::new()),
            ranges: tokio::sync::Mutex::new(HashMap::new()),
            dirty: std::sync::Mutex::new(HashMap::new()),
            fed: std::sync::Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
            locks: Stripes::new(),
            cp_locks: Stripes::new(),
            counters: AuditCounters::default(),
            group: std::sync::Mutex::new(Group::default()),
            batch_done: tokio::sync::Notify::new(),
        })
    }

    /// The checkpoint signer's verifier key (`name+keyid+key`).
    pub fn verifier_key(&self) -> String {
        self.signer.verifier_key()
    }

    /// The origin line of `log`'s checkpoints.
    pub fn origin(&self, log: &str) -> String {
        format!("{}/{log}", self.key_name)
    }

    /// This instance's counters.
    pub fn counters(&self) -> &AuditCounters {
        &self.counters
    }

    /// The controller instance id events are stamped with.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Appends `event` to its log (its `index`, `prev`, `controller` and
    /// `version` are set here), waiting at most the append timeout. A failure is
    /// logged at error level with the event and counted; it never fails the
    /// caller. Returns the index, or `None` if it was not appended.
    ///
    /// # Group commit
    /// Callers queue their events. Up to four of them at a time take what is
    /// queued for logs with no batch in flight (each log's events in order;
    /// a second batch starts while one is in flight only once 32 events
    /// wait) and append it in one round trip: with one event per log, as
    /// plain publishes sent together, each with its log's expected last
    /// sequence and its id (de-duplication); with several events of a log,
    /// as one atomic JetStream batch (each log's first event in it carries
    /// the log's expected last sequence, so a concurrent controller's append
    /// fails the whole batch, which is re-read and retried). The others wait
    /// for their event to be done. Events per round trip grow with the
    /// callers waiting.
    pub async fn record(&self, event: AuditEvent) -> Option<u64> {
        self.record_many(vec![event]).await.pop().flatten()
    }

    /// Appends `events` as [`AuditLog::record`] does, all queued at once (so
    /// they share batches), each log's in the order given; their indices, or
    /// `None` for each one not appended (logged and counted like a failed
    /// `record`). Waits at most the append timeout.
    pub async fn record_many(&self, events: Vec<AuditEvent>) -> Vec<Option<u64>> {
        let mut waiting = Vec::with_capacity(events.len());
        let mut pending = Vec::with_capacity(events.len());
        for mut event in events {
            event.controller = self.instance.clone();
            event.version = event::SCHEMA_VERSION;
            // The log's stream; an event naming a tenant that neither
            // exists nor has a log goes to the platform log (see `home`).
            let home = match check_log(&event.tenant) {
                Err(e) => Err(e),
                Ok(()) => match self.homes.for_append(&event.tenant).await {
                    Ok(home::AppendHome::Log(h)) => Ok(h),
                    Ok(home::AppendHome::Platform) => {
                        event.tenant = PLATFORM_LOG.to_string();
                        Ok(self.homes.central().clone())
                    }
                    Err(e) => Err(e),
                },
            };
            let mut w = Waiting {
                log: event.tenant.clone(),
                id: event.id.clone(),
                brief: (
                    event.action.clone(),
                    event.actor.id.clone(),
                    event.outcome,
                    event.request_id.clone(),
                ),
                rx: None,
                outcome: None,
            };
            match home {
                Err(e) => w.outcome = Some(Err(e.to_string())),
                Ok(home) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    w.rx = Some(rx);
                    pending.push(Pending {
                        event,
                        home,
                        done: tx,
                    });
                }
            }
            waiting.push(w);
        }
        if !pending.is_empty() {
            match self.group.lock() {
                Ok(mut g) => g.queue.extend(pending),
                Err(_) => return waiting.iter().map(|_| None).collect(),
            }
        }
        let deadline = tokio::time::Instant::now() + self.config.append_timeout;
        loop {
            let mut open = false;
            for w in &mut waiting {
                if let Some(rx) = &mut w.rx {
                    match rx.try_recv() {
                        Ok(r) => {
                            w.outcome = Some(r);
                            w.rx = None;
                        }
                        Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                            w.outcome = Some(Err("its batch ended without an answer".into()));
                            w.rx = None;
                        }
                        Err(tokio::sync::oneshot::error::TryRecvError::Empty) => open = true,
                    }
                }
            }
            if !open {
                break;
            }
            if self.drain_once().await {
                continue;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                self.give_up(&mut waiting);
                break;
            }
            // Wait for an answer, or for a batch to end (then this caller may
            // take the next one). The end of a batch wakes one waiter, and a
            // waiter leaving passes it on (below); the timeout is a safety net.
            let Some(w) = waiting.iter_mut().find(|w| w.rx.is_some()) else {
                break;
            };
            let Some(rx) = w.rx.as_mut() else {
                break;
            };
            let nap = (deadline - now).min(Duration::from_millis(20));
            let got = tokio::select! {
                r = rx => Some(r),
                () = self.batch_done.notified() => None,
                () = tokio::time::sleep(nap) => None,
            };
            if let Some(r) = got {
                w.rx = None;
                w.outcome =
                    Some(r.unwrap_or_else(|_| Err("its batch ended without an answer".into())));
            }
        }
        // A wake-up meant for the next batch may have come to this caller.
        if self.group.lock().is_ok_and(|g| !g.queue.is_empty()) {
            self.batch_done.notify_one();
        }
        waiting.into_iter().map(|w| self.settle(w)).collect()
    }

    /// At the deadline: events still queued are taken out (so certainly not
    /// appended); those already taken may still land with their batch.
    fn give_up(&self, waiting: &mut [Waiting]) {
        let ids: std::collections::HashSet<String> = waiting
            .iter()
            .filter(|w| w.rx.is_some())
            .map(|w| w.id.clone())
            .collect();
        let mut removed = std::collections::HashSet::new();
        if let Ok(mut g) = self.group.lock() {
            g.queue.retain(|p| {
                let mine = ids.contains(&p.event.id);
                if mine {
                    removed.insert(p.event.id.clone());
                }
                !mine
            });
        }
        for w in waiting.iter_mut() {
            if w.rx.take().is_some() {
                w.outcome = Some(Err(if removed.contains(&w.id) {
                    "timed out".to_string()
                } else {
                    "timed out while its batch was in flight (it may be appended)".to_string()
                }));
            }
        }
    }

    /// Counts one event's outcome; a failure is logged at error level.
    fn settle(&self, w: Waiting) -> Option<u64> {
        let reason = match w.outcome {
            Some(Ok(index)) => {
                bump(&self.counters.appended);
                self.mark_dirty(&w.log);
                return Some(index);
            }
            Some(Err(reason)) => reason,
            None => "no outcome".to_string(),
        };
        bump(&self.counters.append_failed);
        // Dropping the cached head makes the next append re-read it.
        if let Ok(mut heads) = self.heads.lock() {
            heads.remove(&w.log);
        }
        let (action, actor, outcome, request_id) = w.brief;
        let log = w.log;
        tracing::error!(
            %log, %action, %actor, %outcome, %request_id, error = %reason,
            "audit event NOT appended"
        );
        None
    }

    /// Takes one batch of queued events for logs with nothing in flight (if
    /// fewer than [`MAX_DRAINERS`] batches are) and appends it. Whether it
    /// appended anything.
    async fn drain_once(&self) -> bool {
        let batch: Vec<Pending> = {
            let Ok(mut g) = self.group.lock() else {
                return false;
            };
            if g.drainers >= MAX_DRAINERS
                || g.queue.is_empty()
                || (g.drainers > 0 && g.queue.len() < PIPELINE_MIN)
            {
                return false;
            }
            let mut taken: Vec<Pending> = Vec::new();
            let mut left = std::collections::VecDeque::new();
            let mut mine = std::collections::HashSet::new();
            // Logs with an event left behind: their later events stay too.
            let mut held = std::collections::HashSet::new();
            while let Some(p) = g.queue.pop_front() {
                let log = &p.event.tenant;
                let free = mine.contains(log) || !g.busy.contains(log);
                // One stream per batch (an atomic batch is one stream's):
                // logs of other homes wait for another batch.
                let same_home = taken.first().is_none_or(|t| Arc::ptr_eq(&t.home, &p.home));
                // A log cut off by the size limit waits whole for the next batch.
                if free && same_home && taken.len() < MAX_BATCH && !held.contains(log) {
                    mine.insert(log.clone());
                    taken.push(p);
                } else {
                    held.insert(log.clone());
                    left.push_back(p);
                }
            }
            g.queue = left;
            if taken.is_empty() {
                return false;
            }
            for log in &mine {
                g.busy.insert(log.clone());
            }
            g.drainers += 1;
            taken
        };
        // Frees the logs and the drainer slot however this ends, also if the
        // caller's future is dropped mid-batch (its events then fail).
        let _release = DrainSlot {
            audit: self,
            logs: batch.iter().map(|p| p.event.tenant.clone()).collect(),
        };
        let Some(home) = batch.first().map(|p| p.home.clone()) else {
            return false;
        };
        let (mut events, senders): (Vec<AuditEvent>, Vec<_>) =
            batch.into_iter().map(|p| (p.event, p.done)).unzip();
        let mut logs = std::collections::HashSet::new();
        if events.iter().all(|e| logs.insert(e.tenant.as_str())) {
            // One event per log (a lone event too): plain publishes, each with
            // its log's expected last sequence and its id, sent together and
            // acknowledged each on its own; no atomic batch to stage.
            let results =
                futures::future::join_all(events.iter_mut().map(|e| self.append(&home, e))).await;
            if results.iter().any(Result::is_ok) {
                bump(&self.counters.batches);
            }
            for (tx, r) in senders.into_iter().zip(results) {
                let _ = tx.send(r.map_err(|e| e.to_string()));
            }
            return true;
        }
        let result = { self.append_batch(&home, &mut events).await };
        match result {
            Ok(indices) => {
                bump(&self.counters.batches);
                for (tx, index) in senders.into_iter().zip(indices) {
                    let _ = tx.send(Ok(index));
                }
            }
            Err(e) => {
                for tx in senders {
                    let _ = tx.send(Err(e.to_string()));
                }
            }
        }
        true
    }

    /// Appends `events` (at least two, any logs) in one atomic batch; their
    /// indices in order.
    async fn append_batch(
        &self,
        home: &home::Home,
        events: &mut [AuditEvent],
    ) -> Result<Vec<u64>, ApiError> {
        let client = self.js.client();
        for _attempt in 0..8 {
            // Each log's head: cached, or read from the stream.
            let mut heads: HashMap<String, Head> = HashMap::new();
            for e in events.iter() {
                if heads.contains_key(&e.tenant) {
                    continue;
                }
                let cached = self.heads.lock().map_err(lock_err)?.get(&e.tenant).copied();
                let head = match cached {
                    Some(h) => h,
                    None => self.load_head(home, &e.tenant).await?,
                };
                heads.insert(e.tenant.clone(), head);
            }
            let mut next = heads.clone();
            let mut first_of_log = std::collections::HashSet::new();
            let mut messages = Vec::with_capacity(events.len());
            let mut leaves = Vec::with_capacity(events.len());
            for e in events.iter_mut() {
                let Some(h) = next.get_mut(&e.tenant) else {
                    return Err(ApiError::new(ErrorCode::Internal, "a log's head vanished"));
                };
                e.index = h.next_index;
                e.prev = h.prev.map(|x| merkle::hex(&x)).unwrap_or_default();
                let bytes = e.canonical();
                let expected = first_of_log.insert(e.tenant.clone()).then_some(h.seq);
                h.next_index += 1;
                let leaf = merkle::leaf_hash(&bytes);
                h.prev = Some(leaf);
                leaves.push(leaf);
                messages.push((home.log_subject(&e.tenant), bytes, expected));
            }
            let batch_id = format!("audit-{}", event::new_event_id());
            let n = messages.len();
            let mut answer = None;
            for (i, (subject, bytes, expected)) in messages.into_iter().enumerate() {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Batch-Id", batch_id.as_str());
                headers.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
                if let Some(seq) = expected {
                    headers.insert(
                        "Nats-Expected-Last-Subject-Sequence",
                        seq.to_string().as_str(),
                    );
                }
                if i + 1 == n {
                    headers.insert("Nats-Batch-Commit", "1");
                    let reply = tokio::time::timeout(
                        Duration::from_secs(5),
                        client.request_with_headers(subject, headers, bytes.into()),
                    )
                    .await
                    .map_err(|_| unavailable("appending to the audit log", "timed out"))?
                    .map_err(|e| unavailable("appending to the audit log", e))?;
                    answer = Some(reply.payload);
                } else {
                    client
                        .publish_with_headers(subject, headers, bytes.into())
                        .await
                        .map_err(|e| unavailable("appending to the audit log", e))?;
                }
            }
            let payload = answer.unwrap_or_default();
            let ack: serde_json::Value = serde_json::from_slice(&payload)
                .map_err(|e| unavailable("appending to the audit log", e))?;
            if let Some(err) = ack.get("error") {
                // 10071: a log's last sequence moved (another instance
                // appended, or the log was altered): re-read and retry.
                if err.get("err_code").and_then(serde_json::Value::as_u64) == Some(10071) {
                    let mut cache = self.heads.lock().map_err(lock_err)?;
                    for log in heads.keys() {
                        cache.remove(log);
                    }
                    continue;
                }
                return Err(unavailable("appending to the audit log", err));
            }
            let last = ack
                .get("seq")
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| {
                    unavailable("appending to the audit log", "no sequence in the ack")
                })?;
            // The batch is stored contiguously, ending at `last`.
            let first = last + 1 - n as u64;
            // Each log's leaves, for the checkpointer, chained from the head
            // this batch was appended after.
            let mut fed: HashMap<&str, Vec<Fed>> = HashMap::new();
            let mut tip: HashMap<&str, (u64, Option<Hash>)> = heads
                .iter()
                .map(|(log, h)| (log.as_str(), (h.seq, h.prev)))
                .collect();
            for (i, (e, leaf)) in events.iter().zip(&leaves).enumerate() {
                let seq = first + i as u64;
                if let Some(t) = tip.get_mut(e.tenant.as_str()) {
                    fed.entry(e.tenant.as_str()).or_default().push(Fed {
                        after: t.0,
                        seq,
                        index: e.index,
                        prev: t.1,
                        leaf: *leaf,
                    });
                    *t = (seq, Some(*leaf));
                }
            }
            {
                let mut cache = self.heads.lock().map_err(lock_err)?;
                if cache.len() >= MAX_CACHED_LOGS {
                    cache.clear();
                }
                for (log, h) in &mut next {
                    if let Some(t) = tip.get(log.as_str()) {
                        h.seq = t.0;
                    }
                }
                for (log, h) in next {
                    cache.insert(log, h);
                }
            }
            for (log, leaves) in fed {
                self.feed(log, leaves);
            }
            return Ok(events.iter().map(|e| e.index).collect());
        }
        Err(ApiError::new(
            ErrorCode::Conflict,
            "concurrent audit appends kept winning",
        ))
    }

    fn mark_dirty(&self, log: &str) {
        let Ok(mut dirty) = self.dirty.lock() else {
            return;
        };
        let n = dirty.entry(log.to_string()).or_insert(0);
        *n += 1;
        if *n >= self.config.checkpoint_every || dirty.len() >= MAX_CACHED_LOGS {
            self.wake.notify_one();
        }
    }

    /// Hands leaves this instance appended (acknowledged by the stream) to
    /// the checkpointer, in append order.
    fn feed(&self, log: &str, leaves: Vec<Fed>) {
        let Ok(mut fed) = self.fed.lock() else {
            return;
        };
        if fed.len() >= MAX_CACHED_LOGS && !fed.contains_key(log) {
            fed.clear();
        }
        let mine = fed.entry(log.to_string()).or_default();
        if mine.len() + leaves.len() > MAX_FED_PER_LOG {
            // The checkpointer is behind: it reads these back instead.
            mine.clear();
            return;
        }
        mine.extend(leaves);
    }

    fn take_fed(&self, log: &str) -> Vec<Fed> {
        self.fed
            .lock()
            .ok()
            .and_then(|mut f| f.remove(log))
            .unwrap_or_default()
    }

    /// The stream sequence of `log`'s newest entry (0: none).
    async fn head_seq(&self, home: &home::Home, log: &str) -> Result<u64, ApiError> {
        match home
            .stream
            .get_last_raw_message_by_subject(&home.log_subject(log))
            .await
        {
            Ok(msg) => Ok(msg.sequence),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(e) => Err(unavailable("reading the audit log head", e)),
        }
    }

    async fn load_head(&self, home: &home::Home, log: &str) -> Result<Head, ApiError> {
        match home
            .stream
            .get_last_raw_message_by_subject(&home.log_subject(log))
            .await
        {
            Ok(msg) => {
                let index = match AuditEvent::decode(&msg.payload) {
                    Ok(e) => e.index,
                    Err(e) => {
                        bump(&self.counters.tamper_detected);
                        tracing::error!(%log, seq = msg.sequence, error = %e, "the last audit entry is altered");
                        serde_json::from_slice::<serde_json::Value>(&msg.payload)
                            .ok()
                            .and_then(|v| v.get("index").and_then(serde_json::Value::as_u64))
                            .ok_or_else(|| {
                                ApiError::new(
                                    ErrorCode::Internal,
                                    "the last audit entry is unreadable",
                                )
                            })?
                    }
                };
                Ok(Head {
                    seq: msg.sequence,
                    next_index: index + 1,
                    prev: Some(merkle::leaf_hash(&msg.payload)),
                })
            }
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(Head {
                seq: 0,
                next_index: 0,
                prev: None,
            }),
            Err(e) => Err(unavailable("reading the audit log head", e)),
        }
    }

    async fn append(&self, home: &home::Home, event: &mut AuditEvent) -> Result<u64, ApiError> {
        let log = event.tenant.clone();
        check_log(&log)?;
        let subject = home.log_subject(&log);
        let _guard = self.locks.lock(&log).await;
        let cached = self.heads.lock().map_err(lock_err)?.get(&log).copied();
        let mut head = match cached {
            Some(h) => h,
            None => self.load_head(home, &log).await?,
        };
        for _attempt in 0..8 {
            event.index = head.next_index;
            event.prev = head.prev.map(|h| merkle::hex(&h)).unwrap_or_default();
            let bytes = event.canonical();
            let publish = jetstream::message::PublishMessage::build()
                .payload(bytes.clone().into())
                .message_id(&event.id)
                .expected_last_subject_sequence(head.seq);
            let ack = self
                .js
                .send_publish(subject.clone(), publish)
                .await
                .map_err(|e| unavailable("appending to the audit log", e))?
                .await;
            match ack {
                Ok(ack) => {
                    let leaf = merkle::leaf_hash(&bytes);
                    {
                        let mut heads = self.heads.lock().map_err(lock_err)?;
                        if heads.len() >= MAX_CACHED_LOGS {
                            heads.clear();
                        }
                        heads.insert(
                            log.clone(),
                            Head {
                                seq: ack.sequence,
                                next_index: event.index + 1,
                                prev: Some(leaf),
                            },
                        );
                    }
                    // A duplicate (an earlier attempt landed) is read back
                    // by the checkpointer instead.
                    if !ack.duplicate {
                        self.feed(
                            &log,
                            vec![Fed {
                                after: head.seq,
                                seq: ack.sequence,
                                index: event.index,
                                prev: head.prev,
                                leaf,
                            }],
                        );
                    }
                    return Ok(event.index);
                }
                Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                    // Another instance appended (or the log was altered): re-read.
                    let fresh = self.load_head(home, &log).await?;
                    if fresh.next_index < head.next_index {
                        bump(&self.counters.tamper_detected);
                        tracing::error!(%log, had = head.next_index, now = fresh.next_index,
                            "the audit log lost entries since this controller appended (tampering?)");
                    }
                    head = fresh;
                }
                Err(e) => return Err(unavailable("appending to the audit log", e)),
            }
        }
        Err(ApiError::new(
            ErrorCode::Conflict,
            "concurrent audit appends kept winning",
        ))
    }

    /// Reads `subject` after stream sequence `after`, up to about `max_bytes`
    /// of payload. Returns the messages and whether more follow.
    ///
    /// Each read is an ordered consumer, deleted when the read ends:
    /// checkpoints read often, and consumers left to expire after their
    /// inactivity threshold (30 s) piled up to the consumer limit under load.
    pub async fn read(
        &self,
        home: &home::Home,
        subject: &str,
        after: u64,
        max_bytes: usize,
    ) -> Result<(Vec<StoredEntry>, bool), ApiError> {
        let consumer = home
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subject.to_string(),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: after + 1,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable("reading the audit log", e))?;
        let name = consumer.cached_info().name.clone();
        let result = Self::read_from(consumer, max_bytes).await;
        let _ = home.stream.delete_consumer(&name).await;
        result
    }

    async fn read_from(
        mut consumer: consumer::Consumer<consumer::pull::OrderedConfig>,
        max_bytes: usize,
    ) -> Result<(Vec<StoredEntry>, bool), ApiError> {
        let pending = consumer
            .info()
            .await
            .map_err(|e| unavailable("reading the audit log", e))?
            .num_pending;
        let mut out = Vec::new();
        if pending == 0 {
            return Ok((out, false));
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| unavailable("reading the audit log", e))?;
        let mut bytes = 0usize;
        // Bounded: each message within 5 s, until nothing is pending or the
        // byte budget is spent.
        loop {
            let next = tokio::time::timeout(Duration::from_secs(5), messages.next())
                .await
                .map_err(|_| unavailable("reading the audit log", "timed out"))?;
            let Some(msg) = next else {
                return Ok((out, false));
            };
            let msg = msg.map_err(|e| unavailable("reading the audit log", e))?;
            let info = msg
                .info()
                .map_err(|e| unavailable("reading the audit log", e))?;
            let (seq, left) = (info.stream_sequence, info.pending);
            bytes += msg.payload.len();
            out.push(StoredEntry {
                seq,
                data: msg.payload.to_vec(),
            });
            if left == 0 {
                return Ok((out, false));
            }
            if bytes >= max_bytes {
                return Ok((out, true));
            }
        }
    }

    /// Every stored entry of `log`.
    pub async fn entries(&self, log: &str) -> Result<Vec<StoredEntry>, ApiError> {
        let home = self.homes.for_read(log).await?;
        Ok(self
            .read(&home, &home.log_subject(log), 0, usize::MAX)
            .await?
            .0)
    }

    /// The stream holding `log` (its region's, or the shared one).
    pub async fn home(&self, log: &str) -> Result<Arc<home::Home>, ApiError> {
        check_log(log)?;
        self.homes.for_read(log).await
    }

    /// Fixes where the log of `id` lives: `region`'s stream, or the shared
    /// one (see [`home`]). `tenant create` calls it before the tenant
    /// exists; a log of an id that is no tenant needs it too, or its events
    /// go to the platform log. Refused (`invalid_input`) when the log already
    /// lives elsewhere; `unavailable` when the region's stream cannot be
    /// opened.
    pub async fn claim_home(
        &self,
        id: &tenant_bus::TenantId,
        region: Option<&tenant_bus::region::Region>,
    ) -> Result<(), ApiError> {
        self.homes.claim_for_tenant(id, region).await
    }

    /// Every stored checkpoint of `log`.
    pub async fn checkpoints(&self, log: &str) -> Result<Vec<StoredCheckpoint>, ApiError> {
        let home = self.homes.for_read(log).await?;
        let (items, _) = self
            .read(&home, &home.checkpoint_subject(log), 0, usize::MAX)
            .await?;
        Ok(items
            .into_iter()
            .map(|e| StoredCheckpoint {
                seq: e.seq,
                note: String::from_utf8_lossy(&e.data).into_owned(),
            })
            .collect())
    }

    async fn last_checkpoint(
        &self,
        home: &home::Home,
        log: &str,
    ) -> Result<Option<(u64, Checkpoint)>, ApiError> {
        match home
            .stream
            .get_last_raw_message_by_subject(&home.checkpoint_subject(log))
            .await
        {
            Ok(msg) => {
                let verifier: Verifier = self
                    .signer
                    .verifier_key()
                    .parse()
                    .map_err(|e: note::NoteError| ApiError::new(ErrorCode::Internal, e.0))?;
                let cp = verifier
                    .verify(&String::from_utf8_lossy(&msg.payload))
                    .map_err(|e| {
                        ApiError::new(
                            ErrorCode::Internal,
                            format!("the last checkpoint of {log} is not ours: {e}"),
                        )
                    })?;
                Ok(Some((msg.sequence, cp)))
            }
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable("reading the last checkpoint", e)),
        }
    }

    fn tampered(&self, log: &str, message: String) -> ApiError {
        bump(&self.counters.tamper_detected);
        tracing::error!(%log, %message, "audit log altered: no checkpoint signed");
        ApiError::new(ErrorCode::Internal, format!("audit log {log}: {message}"))
    }

    /// The entries of `log` a signed checkpoint of `size` covers hash to
    /// another root: they were altered since it was signed.
    fn checkpoint_mismatch(&self, log: &str, size: u64) -> ApiError {
        self.tampered(
            log,
            format!(
                "entries up to {} do not match the checkpoint of size {size}",
                size.saturating_sub(1)
            ),
        )
    }

    /// Signs and stores a checkpoint of `log` if it has entries no checkpoint
    /// covers. The entries since the last one this instance saw are checked
    /// (canonical, contiguous, chained, and the previous checkpoint's root):
    /// an altered log is refused and counted, never signed. Returns the new
    /// checkpoint, or `None` if there was nothing to sign (or another instance
    /// signed it first).
    pub async fn checkpoint(&self, log: &str) -> Result<Option<Checkpoint>, ApiError> {
        check_log(log)?;
        let result = self.checkpoint_inner(log, true).await;
        if result.is_err() {
            bump(&self.counters.checkpoint_failed);
        }
        result
    }

    /// A checkpoint of `log`: of every stored entry when `to_head`, else (the
    /// checkpointer's pass) at least of the leaves this instance appended.
    async fn checkpoint_inner(
        &self,
        log: &str,
        to_head: bool,
    ) -> Result<Option<Checkpoint>, ApiError> {
        let _guard = self.cp_locks.lock(log).await;
        let home = self.homes.for_read(log).await?;
        let last = self.last_checkpoint(&home, log).await?;
        let mut st = self.ranges.lock().await.remove(log).unwrap_or_default();
        if let Some((_, cp)) = &last {
            if cp.size != st.verified_cp_size && cp.size < st.range.size() {
                // Signed elsewhere at a size this state passed unchecked: start over.
                st = RangeState::default();
            }
        }
        if st.last_seq == 0 && st.range.size() == 0 {
            st = self.fresh_state(&home, log).await?;
        }
        // The leaves this instance appended right after what the state has
        // seen need no reading back: this instance wrote those bytes, and the
        // stream acknowledged each one directly after its predecessor.
        let (mut fed, mut broken) = (false, false);
        for f in self.take_fed(log) {
            if f.seq <= st.last_seq {
                continue;
            }
            if f.after != st.last_seq || f.index != st.range.size() || f.prev != st.prev {
                // Another instance appended in between, or this state started
                // elsewhere: the rest is read from the stream below.
                broken = true;
                break;
            }
            self.absorb(log, &mut st, last.as_ref(), f.seq, f.leaf)?;
            fed = true;
        }
        // Anything newer (another instance's entries, or what the feed did
        // not cover) is read back and checked: always when asked for a
        // checkpoint of the whole log, else when the feed did not suffice.
        let head = if to_head || broken || !fed {
            self.head_seq(&home, log).await?
        } else {
            st.last_seq
        };
        if head < st.last_seq {
            // Entries already checked are gone (truncated). Counted and
            // logged; the checkpoint below still signs them as appended, so
            // `verify` names the missing ones even if the stored checkpoints
            // went with them.
            bump(&self.counters.tamper_detected);
            tracing::error!(
                %log, had = st.last_seq, head,
                "audit log truncated: its newest entries are gone"
            );
        }
        let entries = if head > st.last_seq {
            self.read(&home, &home.log_subject(log), st.last_seq, usize::MAX)
                .await?
                .0
        } else {
            Vec::new()
        };
        for e in entries {
            let i = st.range.size();
            let event = AuditEvent::decode(&e.data).map_err(|err| {
                self.tampered(log, format!("entry {i} (stream seq {}): {err}", e.seq))
            })?;
            if event.index < st.anchored && i == st.anchored {
                // Below the prune point (a prune interrupted before its purge).
                st.last_seq = e.seq;
                continue;
            }
            if event.index != i {
                return Err(self.tampered(
                    log,
                    format!(
                        "stream seq {} holds entry {} where entry {i} belongs",
                        e.seq, event.index
                    ),
                ));
            }
            let first_kept = st.anchored > 0 && i == st.anchored;
            if !first_kept && event.prev != st.prev.map(|h| merkle::hex(&h)).unwrap_or_default() {
                return Err(self.tampered(
                    log,
                    format!("entry {i} does not chain to entry {}", i.saturating_sub(1)),
                ));
            }
            self.absorb(
                log,
                &mut st,
                last.as_ref(),
                e.seq,
                merkle::leaf_hash(&e.data),
            )?;
        }
        let size = st.range.size();
        let last_seq = match &last {
            Some((seq, cp)) => {
                if cp.size > size {
                    return Err(self.tampered(
                        log,
                        format!("entries {size} to {} are missing (truncated)", cp.size - 1),
                    ));
                }
                if cp.size == size {
                    self.ranges.lock().await.insert(log.to_string(), st);
                    return Ok(None);
                }
                *seq
            }
            None if size == 0 => return Ok(None),
            None => 0,
        };
        let cp = Checkpoint {
            origin: self.origin(log),
            size,
            root: st.range.root(),
            time_ms: tenant_bus::envelope::now_ms(),
        };
        let note = self.signer.sign(&cp);
        let publish = jetstream::message::PublishMessage::build()
            .payload(note.into_bytes().into())
            .expected_last_subject_sequence(last_seq);
        let ack = self
            .js
            .send_publish(home.checkpoint_subject(log), publish)
            .await
            .map_err(|e| unavailable("storing a checkpoint", e))?
            .await;
        let signed = match ack {
            Ok(_) => {
                st.verified_cp_size = size;
                bump(&self.counters.checkpoints);
                Some(cp)
            }
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => None,
            Err(e) => return Err(unavailable("storing a checkpoint", e)),
        };
        let mut ranges = self.ranges.lock().await;
        if ranges.len() >= MAX_CACHED_LOGS {
            ranges.clear();
        }
        ranges.insert(log.to_string(), st);
        Ok(signed)
    }

    /// Adds the leaf at stream sequence `seq` to the checkpointer's state of
    /// `log`, checking the root against `last` (the newest stored checkpoint)
    /// when the tree reaches its size.
    fn absorb(
        &self,
        log: &str,
        st: &mut RangeState,
        last: Option<&(u64, Checkpoint)>,
        seq: u64,
        leaf: Hash,
    ) -> Result<(), ApiError> {
        st.range.push_leaf_hash(leaf);
        st.prev = Some(leaf);
        st.last_seq = seq;
        if let Some((_, cp)) = last {
            if cp.size == st.range.size() {
                if cp.root != st.range.root() {
                    return Err(self.checkpoint_mismatch(log, cp.size));
                }
                st.verified_cp_size = cp.size;
            }
        }
        Ok(())
    }

    /// Signs checkpoints of every log with events appended here since the last
    /// pass, every [`AuditConfig::checkpoint_interval`] or as soon as one log has
    /// [`AuditConfig::checkpoint_every`] unsigned events, until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: crate::controller::shutdown::Shutdown) {
        let mut tick = tokio::time::interval(self.config.checkpoint_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tick.tick() => {}
                _ = self.wake.notified() => {}
            }
            let logs: Vec<String> = match self.dirty.lock() {
                Ok(mut d) => d.drain().map(|(k, _)| k).collect(),
                Err(_) => return,
            };
            // Several logs at once: each is its own round trips.
            futures::stream::iter(logs)
                .for_each_concurrent(CHECKPOINT_CONCURRENCY, |log| {
                    let me = &self;
                    async move {
                        let result = me.checkpoint_inner(&log, false).await;
                        if result.is_err() {
                            bump(&me.counters.checkpoint_failed);
                        }
                        if let Err(e) = result {
                            tracing::warn!(%log, error = %e, "audit checkpoint failed");
                        }
                    }
                })
                .await;
        }
    }

    fn verifier(&self) -> Result<Verifier, ApiError> {
        self.signer
            .verifier_key()
            .parse()
            .map_err(|e: note::NoteError| ApiError::new(ErrorCode::Internal, e.0))
    }

    /// The newest retention anchor of `log`, checked (our signature, the
    /// frontier hashing to the signed root): its stream sequence, the anchor,
    /// its checkpoint and the tree of the pruned prefix.
    pub async fn load_anchor(
        &self,
        log: &str,
    ) -> Result<Option<(u64, Anchor, Checkpoint, merkle::PartialTree)>, ApiError> {
        let home = self.homes.for_read(log).await?;
        self.anchor_in(&home, log).await
    }

    async fn anchor_in(
        &self,
        home: &home::Home,
        log: &str,
    ) -> Result<Option<(u64, Anchor, Checkpoint, merkle::PartialTree)>, ApiError> {
        match home
            .stream
            .get_last_raw_message_by_subject(&home.anchor_subject(log))
            .await
        {
            Ok(msg) => {
                let stored = StoredEntry {
                    seq: msg.sequence,
                    data: msg.payload.to_vec(),
                };
                let (anchor, cp, tree) =
                    verify::check_anchor(&stored, &self.origin(log), &self.verifier()?)
                        .map_err(|f| self.tampered(log, f.message))?;
                Ok(Some((msg.sequence, anchor, cp, tree)))
            }
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable("reading the retention anchor", e)),
        }
    }

    /// The checkpointer's starting state: empty, or the anchor's pruned prefix.
    async fn fresh_state(&self, home: &home::Home, log: &str) -> Result<RangeState, ApiError> {
        let Some((_, anchor, cp, _)) = self.anchor_in(home, log).await? else {
            return Ok(RangeState::default());
        };
        let frontier = verify::parse_hashes(&anchor.frontier)
            .ok_or_else(|| self.tampered(log, "retention anchor: bad frontier".into()))?;
        let range = CompactRange::from_frontier(cp.size, &frontier)
            .map_err(|e| self.tampered(log, format!("retention anchor: {e}")))?;
        Ok(RangeState {
            range,
            last_seq: 0,
            prev: None,
            verified_cp_size: cp.size,
            anchored: cp.size,
        })
    }

    /// Applies retention to `log`: prunes the entries older than `cutoff_ms`
    /// up to the largest signed checkpoint that covers only such entries (and
    /// never the newest entry, the append head). First the log is checked
    /// (every retained entry canonical, contiguous and chained, the chosen
    /// checkpoint's root recomputed): an altered log is never pruned. Then the
    /// anchor (that checkpoint and the frontier of its tree) is stored on
    /// [`anchor_subject`], and the entries below it, the checkpoints before it
    /// and older anchors are purged. Returns `None` if there was nothing to
    /// prune (or another instance pruned first).
    pub async fn prune(&self, log: &str, cutoff_ms: u64) -> Result<Option<PruneReport>, ApiError> {
        check_log(log)?;
        // One prune or checkpoint of a log at a time on this instance.
        let _guard = self.cp_locks.lock(log).await;
        let home = self.homes.for_read(log).await?;
        let prior = self.anchor_in(&home, log).await?;
        let (prior_seq, first) = match &prior {
            Some((seq, _, cp, _)) => (*seq, cp.size),
            None => (0, 0),
        };
        let verifier = self.verifier()?;
        let origin = self.origin(log);
        let (raw_cps, _) = self
            .read(&home, &home.checkpoint_subject(log), 0, usize::MAX)
            .await?;
        let mut cps = Vec::with_capacity(raw_cps.len());
        for c in &raw_cps {
            let text = String::from_utf8_lossy(&c.data).into_owned();
            let cp = verifier.verify(&text).map_err(|e| {
                self.tampered(log, format!("checkpoint at stream seq {}: {e}", c.seq))
            })?;
            if cp.origin != origin {
                return Err(self.tampered(log, format!("checkpoint at seq {} is foreign", c.seq)));
            }
            cps.push((c.seq, cp, text));
        }
        let (entries, _) = self
            .read(&home, &home.log_subject(log), 0, usize::MAX)
            .await?;
        let mut leaves: Vec<(u64, Hash)> = Vec::with_capacity(entries.len());
        let mut eligible = first;
        let mut prev: Option<Hash> = None;
        for e in &entries {
            let i = first + leaves.len() as u64;
            let event = AuditEvent::decode(&e.data).map_err(|err| {
                self.tampered(log, format!("entry {i} (stream seq {}): {err}", e.seq))
            })?;
            if event.index < first && leaves.is_empty() {
                continue;
            }
            if event.index != i {
                return Err(self.tampered(
                    log,
                    format!(
                        "stream seq {} holds entry {} where entry {i} belongs",
                        e.seq, event.index
                    ),
                ));
            }
            let first_kept = first > 0 && i == first;
            if !first_kept && event.prev != prev.map(|h| merkle::hex(&h)).unwrap_or_default() {
                return Err(self.tampered(
                    log,
                    format!("entry {i} does not chain to entry {}", i.saturating_sub(1)),
                ));
            }
            let leaf = merkle::leaf_hash(&e.data);
            prev = Some(leaf);
            if event.time_ms < cutoff_ms && eligible == i {
                eligible = i + 1;
            }
            leaves.push((e.seq, leaf));
        }
        let size = first + leaves.len() as u64;
        // The newest entry stays: it is the append head.
        let limit = eligible.min(size.saturating_sub(1));
        let Some((cp_seq, cp, note)) = cps
            .iter()
            .filter(|(_, cp, _)| cp.size > first && cp.size <= limit)
            .max_by_key(|(_, cp, _)| cp.size)
            .map(|(seq, cp, note)| (*seq, cp.clone(), note.clone()))
        else {
            return Ok(None);
        };
        let mut range = match &prior {
            Some((_, anchor, cp0, _)) => verify::parse_hashes(&anchor.frontier)
                .and_then(|f| CompactRange::from_frontier(cp0.size, &f).ok())
                .ok_or_else(|| self.tampered(log, "retention anchor: bad frontier".into()))?,
            None => CompactRange::new(),
        };
        for (_, leaf) in &leaves[..(cp.size - first) as usize] {
            range.push_leaf_hash(*leaf);
        }
        if range.root() != cp.root {
            return Err(self.checkpoint_mismatch(log, cp.size));
        }
        let now = tenant_bus::envelope::now_ms();
        let anchor = Anchor {
            checkpoint: note,
            frontier: range.frontier().iter().map(|h| merkle::hex(h)).collect(),
            cutoff_ms,
            pruned_at_ms: now,
        };
        let body = serde_json::to_vec(&anchor)
            .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
        let publish = jetstream::message::PublishMessage::build()
            .payload(body.into())
            .expected_last_subject_sequence(prior_seq);
        let ack = self
            .js
            .send_publish(home.anchor_subject(log), publish)
            .await
            .map_err(|e| unavailable("storing a retention anchor", e))?
            .await;
        let anchor_seq = match ack {
            Ok(ack) => ack.sequence,
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                return Ok(None)
            }
            Err(e) => return Err(unavailable("storing a retention anchor", e)),
        };
        let keep_from = leaves
            .get((cp.size - first) as usize)
            .map(|(seq, _)| *seq)
            .ok_or_else(|| ApiError::new(ErrorCode::Internal, "prune point past the head"))?;
        for (subject, seq) in [
            (home.log_subject(log), keep_from),
            (home.checkpoint_subject(log), cp_seq),
            (home.anchor_subject(log), anchor_seq),
        ] {
            home.stream
                .purge()
                .filter(subject)
                .sequence(seq)
                .await
                .map_err(|e| unavailable("purging pruned audit entries", e))?;
        }
        let removed = cp.size - first;
        self.counters.pruned.fetch_add(removed, Ordering::Relaxed);
        tracing::info!(%log, pruned_before = cp.size, removed, cutoff_ms, "audit log pruned");
        Ok(Some(PruneReport {
            log: log.to_string(),
            pruned_before: cp.size,
            removed,
            cutoff_ms,
        }))
    }

    /// One page of raw entries or checkpoints (`verify-data`).
    pub async fn verify_data(
        &self,
        log: &str,
        req: &VerifyDataRequest,
    ) -> Result<VerifyDataPage, ApiError> {
        let home = self.homes.for_read(log).await?;
        let subject = match req.kind.as_str() {
            "log" => home.log_subject(log),
            "checkpoint" => home.checkpoint_subject(log),
            "anchor" => home.anchor_subject(log),
            other => {
                return Err(ApiError::new(
                    ErrorCode::InvalidInput,
                    format!("kind {other:?} (log, checkpoint or anchor)"),
                ))
            }
        };
        let (items, more) = self.read(&home, &subject, req.after, PAGE_BYTES).await?;
        let b64 = base64::engine::general_purpose::STANDARD;
        Ok(VerifyDataPage {
            items: items
                .into_iter()
                .map(|e| RawItem {
                    seq: e.seq,
                    data: b64.encode(&e.data),
                })
                .collect(),
            more,
            verifier_key: self.verifier_key(),
        })
    }

    /// The events of `log` passing `req`'s filters (the newest `limit`).
    /// Entries that do not decode are skipped here (`verify` names them).
    pub async fn list(&self, log: &str, req: &ListRequest) -> Result<Vec<AuditEvent>, ApiError> {
        let limit = req.limit.unwrap_or(MAX_LIST).clamp(1, MAX_LIST);
        let mut out = std::collections::VecDeque::new();
        for e in self.entries(log).await? {
            if let Ok(event) = AuditEvent::decode(&e.data) {
                if req.matches(&event) {
                    if out.len() == limit {
                        out.pop_front();
                    }
                    out.push_back(event);
                }
            }
        }
        Ok(out.into())
    }

    /// An inclusion proof of event `event_id` against the newest checkpoint,
    /// signing one first if the event is not covered yet.
    pub async fn proof(&self, log: &str, event_id: &str) -> Result<InclusionBundle, ApiError> {
        if let Err(e) = self.checkpoint(log).await {
            tracing::warn!(%log, error = %e, "checkpoint before a proof failed");
        }
        let home = self.homes.for_read(log).await?;
        let Some((_, cp)) = self.last_checkpoint(&home, log).await? else {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("log {log} has no checkpoint"),
            ));
        };
        let entries = self.entries(log).await?;
        let mut tree = match self.anchor_in(&home, log).await? {
            Some((_, _, _, tree)) => tree,
            None => merkle::PartialTree::new(),
        };
        let mut found = None;
        for e in &entries {
            if tree.len() >= cp.size {
                break;
            }
            let decoded = AuditEvent::decode(&e.data).ok();
            if decoded.as_ref().is_some_and(|ev| ev.index < tree.first()) {
                continue;
            }
            if found.is_none() && decoded.is_some_and(|ev| ev.id == event_id) {
                found = Some((tree.len(), e.data.clone()));
            }
            tree.push(&e.data);
        }
        let Some((index, data)) = found else {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("event {event_id} is not in a checkpoint of log {log}"),
            ));
        };
        if tree.len() != cp.size || tree.root() != cp.root {
            return Err(ApiError::new(
                ErrorCode::Internal,
                format!("log {log} does not match its checkpoint (run audit verify)"),
            ));
        }
        let path = tree
            .inclusion_proof(index)
            .map_err(|e| ApiError::new(ErrorCode::Internal, e.0))?;
        let event = String::from_utf8(data)
            .map_err(|_| ApiError::new(ErrorCode::Internal, "event is not UTF-8"))?;
        let checkpoint = self.signer.sign(&cp);
        Ok(InclusionBundle {
            log: log.to_string(),
            event_id: event_id.to_string(),
            index,
            leaf_hash: merkle::hex(&merkle::leaf_hash(event.as_bytes())),
            event,
            tree_size: cp.size,
            path: path.iter().map(|h| merkle::hex(h)).collect(),
            checkpoint,
            verifier_key: self.verifier_key(),
        })
    }
}

// ----- client side: through the controller -------------------------------------

/// The events of `log` passing the filters (`audit.<log>.list`).
pub async fn list(
    admin: &AdminClient,
    log: &str,
    req: &ListRequest,
) -> Result<Vec<AuditEvent>, ApiError> {
    admin.call(&audit_subject(log, "list"), req).await
}

/// An inclusion proof of one event (`audit.<log>.proof`).
pub async fn proof(
    admin: &AdminClient,
    log: &str,
    event_id: &str,
) -> Result<InclusionBundle, ApiError> {
    let req = ProofRequest {
        event_id: event_id.to_string(),
    };
    admin.call(&audit_subject(log, "proof"), &req).await
}

async fn fetch_pages(
    admin: &AdminClient,
    log: &str,
    kind: &str,
) -> Result<(Vec<StoredEntry>, String), ApiError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = Vec::new();
    let mut after = 0;
    // Bounded by the log: every page advances `after` (checked).
    loop {
        let req = VerifyDataRequest {
            kind: kind.to_string(),
            after,
        };
        let page: VerifyDataPage = admin.call(&audit_subject(log, "verify-data"), &req).await?;
        for item in page.items {
            let data = b64
                .decode(item.data.as_bytes())
                .map_err(|_| ApiError::new(ErrorCode::Internal, "controller sent bad base64"))?;
            if item.seq <= after {
                return Err(ApiError::new(
                    ErrorCode::Internal,
                    "controller sent pages out of order",
                ));
            }
            after = item.seq;
            out.push(StoredEntry {
                seq: item.seq,
                data,
            });
        }
        if !page.more {
            return Ok((out, page.verifier_key));
        }
    }
}

/// Everything stored for `log`: entries, checkpoints, and the verifier key the
/// controller reports.
pub async fn fetch(
    admin: &AdminClient,
    log: &str,
) -> Result<(Vec<StoredEntry>, Vec<StoredCheckpoint>, String), ApiError> {
    let (entries, _) = fetch_pages(admin, log, "log").await?;
    let (cps, key) = fetch_pages(admin, log, "checkpoint").await?;
    let cps = cps
        .into_iter()
        .map(|e| StoredCheckpoint {
            seq: e.seq,
            note: String::from_utf8_lossy(&e.data).into_owned(),
        })
        .collect();
    Ok((entries, cps, key))
}

/// Every stored event of `log` (through `verify-data`, so not capped like
/// `list`), oldest first, and how many stored entries did not decode (skipped:
/// `verify` names them).
pub async fn fetch_events(
    admin: &AdminClient,
    log: &str,
) -> Result<(Vec<AuditEvent>, usize), ApiError> {
    let (entries, _) = fetch_pages(admin, log, "log").await?;
    let total = entries.len();
    let events: Vec<AuditEvent> = entries
        .iter()
        .filter_map(|e| AuditEvent::decode(&e.data).ok())
        .collect();
    let skipped = total - events.len();
    Ok((events, skipped))
}

/// The newest retention anchor of `log`, as stored, if it was pruned.
pub async fn fetch_anchor(admin: &AdminClient, log: &str) -> Result<Option<StoredEntry>, ApiError> {
    let (mut anchors, _) = fetch_pages(admin, log, "anchor").await?;
    Ok(anchors.pop())
}

/// Why `audit verify` failed: the log could not be read, or it does not verify.
#[derive(Debug, Clone)]
pub enum VerifyError {
    /// Reading through the controller failed.
    Api(ApiError),
    /// The pinned or reported verifier key is malformed.
    Key(String),
    /// The log does not verify: the first bad entry or checkpoint.
    Bad(VerifyFailure),
}

impl std::fmt::Display for VerifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Api(e) => write!(f, "{}", e.message),
            Self::Key(e) => write!(f, "verifier key: {e}"),
            Self::Bad(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for VerifyError {}

/// Fetches `log` through the controller and verifies it locally, against
/// `pinned` if given (else the key the controller reports). Returns the report
/// and the verifier key used.
pub async fn verify_remote(
    admin: &AdminClient,
    log: &str,
    pinned: Option<&str>,
) -> Result<(VerifyReport, String), VerifyError> {
    check_log(log).map_err(VerifyError::Api)?;
    // The anchor last: a prune between the reads leaves entries and checkpoints
    // below its prune point, which verification skips.
    let (entries, cps, reported) = fetch(admin, log).await.map_err(VerifyError::Api)?;
    let anchor = fetch_anchor(admin, log).await.map_err(VerifyError::Api)?;
    let key = pinned.map(str::to_string).unwrap_or(reported);
    let verifier: Verifier = key
        .parse()
        .map_err(|e: note::NoteError| VerifyError::Key(e.0))?;
    let origin = format!("{}/{log}", verifier.name());
    let report = verify::verify_retained(log, &origin, &verifier, anchor.as_ref(), &entries, &cps)
        .map_err(VerifyError::Bad)?;
    Ok((report, key))
}
