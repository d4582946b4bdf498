//! Task dispatch on JetStream, inside the tenant's own account.
//!
//! # Streams, buckets, subjects (relative to `tenant.<id>.`)
//!
//! | what | name / subject | notes |
//! |---|---|---|
//! | work-queue stream | `TASKS` ([`DEFAULT_STREAM`]) | subjects `tasks.queue.>` and `tasks.dead.>`; retention WorkQueue, file storage, duplicate window (default 2 min) |
//! | a task | `tasks.queue.<type>` (`tasks.queue.<type>.<id hex>` with one copy per id) | sealed for `tasks.queue.<type>`; `Nats-Msg-Id` = the message id in hex |
//! | worker consumer | durable `work-<type>` | pull, explicit ack, filter `tasks.queue.<type>` (`tasks.queue.<type>.*` with one copy per id) |
//! | dead letter | `tasks.dead.<type>` (`tasks.dead.<type>.<task id hex>` with one copy per id) | sealed JSON [`DeadLetter`] with the reason; `Nats-Msg-Id` = `dead-<task id>`; kept in the stream until read through [`Dispatcher::dead_letters`] (durable `dead-letters`) |
//! | result | `tasks.results.<task id hex>` | sealed [`TaskOutcome`], core NATS (not stored in the stream) |
//! | done bucket | `TASKS_DONE` ([`DEFAULT_DONE_BUCKET`]) | key = task id hex, value = the sealed result; `max_age` = done retention (default 7 days); republishes every write to `tasks.results.<key>` |
//!
//! In an operator-mode deployment every tenant has its own account, so these
//! names are the same for every tenant and the server keeps them apart. On a
//! server where tenants share one account (a development server without auth),
//! use [`DispatchOptions::per_tenant_names`] (`TASKS_<id>`, `TASKS_DONE_<id>`).
//! A dispatcher refuses a stream whose subjects are not exactly its tenant's
//! task subjects, one whose configuration would lose, move or copy queued tasks
//! (not a work queue; a message, byte or age limit; a subject transform,
//! republish, mirror or sources; sealed), and a done bucket that forgets sooner
//! than the task max age ([`DispatchErrorKind::StreamConflict`]). In operator
//! mode agents may create these but never change them (no `STREAM.UPDATE` in
//! the control plane's allow-list), so the first creator fixes the
//! configuration, and a stream set up to lose tasks is refused, not used.
//!
//! # Delivery: at least once, idempotent by message id
//!
//! - **Dispatch** seals the task exactly like every bus message
//!   (`ns.sealer().seal(full_subject, None, payload)`) and publishes it with
//!   `Nats-Msg-Id` = the message id, awaiting the stream's ack. A
//!   [`SealedTask`] can be submitted again (a retry after a lost ack): JetStream
//!   drops the copy inside the duplicate window ([`Submitted::duplicate`]).
//! - **Workers** pull with a concurrency cap (never more messages than free
//!   slots: one pull request for all the slots free at that moment, answered on
//!   one long-lived inbox; with [`WorkerOptions::prefetch`] a worker also holds
//!   that many tasks ahead of its handlers, looked up and waiting for a handler
//!   with progress acks), send progress acks while a handler runs, ack on
//!   success, and `Nak(backoff)` on failure. The delivery count is the server's.
//!   After `max_deliveries` failures the task is dead-lettered (sealed, with the
//!   reason) and terminated (`AckKind::Term`). The consumer itself has no
//!   delivery limit, so a task whose worker died mid-run is redelivered, and one
//!   that reaches `max_deliveries` without any outcome is dead-lettered as such:
//!   never stuck, never looping.
//! - **Outages are not failures.** When the done bucket (or JetStream) cannot be
//!   read or written, the worker holds the task with progress acks and retries
//!   until it answers: the outage neither counts as a delivery nor dead-letters a
//!   task that never ran (`WorkerStats::outage_waits` counts the waits). Only a
//!   handler's own failure, or a worker that dies mid-task, uses up deliveries.
//! - **Already done?** Every delivery is looked up in the done bucket before it
//!   runs. The lookups of all the tasks a worker has in hand at that moment go
//!   to the server as one batched direct get (`multi_last`, nats-server 2.11+;
//!   one get per key on a bucket without direct gets). A task whose id is there
//!   (a lost ack, a server restart, a second copy outside the duplicate window)
//!   is not run again: its stored result is re-published and it is acked
//!   (`WorkerStats::duplicates`). The stored result must open as this task's
//!   sealed outcome (sealed under the tenant's key for `tasks.results.<this
//!   id>`): a record that does not (written without the key, or another task's
//!   outcome copied under this id) is ignored and counted
//!   (`WorkerStats::unverified_done`), and the task runs and replaces it.
//! - **Completion** is recorded before the ack, with one conditional write: the
//!   sealed result is stored in the done bucket under the task id only if the
//!   key is still as the lookup saw it (absent, or the unverified record being
//!   replaced: `Nats-Expected-Last-Subject-Sequence`), then published to the
//!   requester, then the message is acked (a plain ack: the outcome is already
//!   durable, so a lost ack only means a redelivery that finds it done). The
//!   bucket republishes the write to the result subject, so the server, not
//!   the worker, hands the outcome to the requester (a bucket created before
//!   it did, which agents cannot change, leaves that publish to the worker). If
//!   another copy of the task recorded a genuine outcome in between, the write
//!   is refused and that outcome stands: it is re-published, this copy is acked
//!   and counted as a duplicate, so a requester only ever sees one outcome per
//!   id.
//! - **When a handler can run twice** for one message id: (1) a worker dies (or
//!   loses its connection for longer than `ack_wait`) between the handler's end
//!   and the done record: the redelivery finds no record and runs it again
//!   (inherent to at-least-once); (2) two copies of the id are in hand at the
//!   same time in two workers (two deliveries racing, e.g. a redelivery after
//!   `ack_wait` while the first worker still runs it, or a copy submitted
//!   outside the duplicate window while the first is running): both run, the
//!   first record wins and the second copy is counted as a duplicate. Copies in
//!   one worker never overlap (a second one is handed back for 1 s). A copy
//!   delivered after the outcome is recorded is not run (on a replicated
//!   bucket, a direct get answered by a replica that has not applied the record
//!   yet can miss it for a moment: that copy then runs and ends as in (2)).
//! - **One copy per id** ([`DispatchOptions::one_copy_per_id`], off by
//!   default): the stream keeps at most one message per subject and refuses
//!   new ones (`max_msgs_per_subject` 1, discard new per subject), and tasks
//!   are published on `tasks.queue.<type>.<task id hex>` (dead letters on
//!   `tasks.dead.<type>.<task id hex>`), still sealed for the subject without
//!   the id token; a worker refuses a task whose id token does not name its
//!   sealed id (moved to another id's subject). The server then refuses a
//!   second copy of an id while one is queued or running, whatever the
//!   duplicate window ([`Submitted::duplicate`], sequence 0), so case (2)
//!   above cannot arise from copies: two workers hold copies of one id at once
//!   only through a redelivery after `ack_wait` to a worker that lost contact.
//!   It is the stream's setting, fixed by its creator; every dispatcher and
//!   worker (Rust and Python) follows the stream it finds, and an older one
//!   refuses such a stream (a per-subject limit) instead of misreading it.
//!   Cost, measured on one node with raw async-nats (128-byte messages, a
//!   subject per message against one subject): publish 130k/s against 157k/s
//!   (-18%), consume 119k/s against 137k/s (-12%).
//! - **Server work per task** (one delivery, nothing failing): its share of one
//!   pull request, its share of one batched lookup, one conditional write (a
//!   stored message the bucket republishes to the requester) and one plain
//!   ack; with a JetStream scheduler also a task-slot create and delete (see
//!   below). Before, each task cost its own lookup request and an unconditional
//!   put, and each pull its own inbox subscription.
//! - **Durability**: the stream and bucket use file storage and consumers are
//!   durable, so a queued or in-flight task survives a worker or a nats-server
//!   restart (the client reconnects by itself; every JetStream step is retried).
//!
//! # Freshness and replay of queued tasks
//!
//! Bus messages older than the 5-minute replay window are refused as stale, but a
//! task may legitimately wait in the queue for hours, and JetStream redelivers the
//! *same* sealed message on every retry. So the worker does not run queued tasks
//! through the namespace's replay guard. It opens each with
//! [`tenant_bus::envelope::open`] (authentic, sealed for this tenant, under a key
//! version it holds, for exactly the subject it arrived on — a task cannot be moved
//! to another type), refuses tasks stamped further in the future than the clock
//! skew, and then:
//! - replay protection is the message id: JetStream de-duplicates inside the
//!   duplicate window, and the done bucket remembers every finished id for the
//!   done retention, so a re-injected copy of a finished task is never run again;
//! - freshness is the task's own maximum age ([`DispatchOptions::task_max_age`],
//!   default 24 h): an older task is dead-lettered as expired instead of run. The
//!   done retention is never shorter than the maximum age, so every copy of a
//!   finished task is either recognised as done or refused as expired.
//!
//! Only the tenant's own users can publish into its account's stream at all (the
//! server enforces the account boundary and the control plane's allow-list).
//! Results are keyed by task id and sealed for their subject, so a replayed result
//! is the same result: requesters open them without a freshness check either.
//!
//! # The tenant's scheduler
//!
//! With [`DispatchOptions::scheduler`] (the tenant's
//! [`TenantScheduler`]), dispatch is fed to the
//! resource-pool scheduler like every other message of the tenant:
//! - every [`Dispatcher::dispatch`] and [`Dispatcher::submit`] is one message of
//!   the payload's size through the tenant's message admission (suspension, size,
//!   message and byte windows). A refusal is
//!   [`DispatchErrorKind::Rejected`], carrying the reason and the retry-after;
//!   nothing is published;
//! - every worker holds one of the tenant's task permits
//!   ([`acquire_task`](crate::scheduler::TenantScheduler::acquire_task)) per task
//!   it holds (from before it pulls the task until its outcome is recorded), so
//!   `max_concurrent_tasks` caps the tenant across all of its workers (with
//!   prefetch it caps the tasks held, running or waiting), and no pulled task
//!   waits in a worker for a permit while its ack timer runs. With a JetStream scheduler
//!   ([`Scheduler::connect`](crate::scheduler::Scheduler::connect)) the permit
//!   includes a cluster-wide task slot (a KV lease, as agent slots), so the cap
//!   holds across every runtime instance; this costs one KV create and one
//!   delete per task, plus a heartbeat every `ttl / 3` while it runs.

mod acks;
mod done;
pub mod wire;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use bytes::Bytes;
use futures::StreamExt as _;
use tenant_bus::admission::{RejectReason, Rejection};
use tenant_bus::error::Error;
use tenant_bus::ids::validate_slug;
use tenant_bus::subject::scope;
use tenant_bus::{MessageId, TenantNamespace};

use crate::registry::TenantGate;
use crate::scheduler::{SchedulerErrorKind, TenantScheduler};

pub use wire::{DeadLetter, TaskOutcome};
pub use worker::{Task, TaskHandler, Worker, WorkerOptions, WorkerStats};

/// The default work-queue stream name (the control plane's allow-list names it).
pub const DEFAULT_STREAM: &str = "TASKS";
/// The default bucket of finished task ids.
pub const DEFAULT_DONE_BUCKET: &str = "TASKS_DONE";
/// The durable consumer that reads dead letters.
pub const DEAD_LETTER_CONSUMER: &str = "dead-letters";

/// What went wrong dispatching or working.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DispatchErrorKind {
    /// The task type is not a valid slug.
    InvalidTaskType,
    /// The tenant is suspended (or unknown to the registry).
    Suspended,
    /// A stream or bucket with our name exists with other subjects (another
    /// tenant's, on a shared account: use [`DispatchOptions::per_tenant_names`]),
    /// or with a configuration that would lose or leak tasks (limits, a
    /// transform, republishing; a done bucket that forgets before the task max
    /// age). Agents cannot change a stream, so an administrator must replace it.
    StreamConflict,
    /// JetStream refused or could not be reached.
    Unavailable,
    /// Sealing failed.
    Seal,
    /// No outcome arrived in time.
    TimedOut,
    /// A stored or received result failed to open or decode.
    Corrupt,
    /// The tenant's scheduler refused the dispatch (message or byte window spent,
    /// message too large): why, and when a retry may succeed.
    Rejected(Rejection),
    /// The options do not fit the namespace (a scheduler of another tenant)
    /// or are out of range (replicas outside 1 to 5).
    InvalidOptions,
    /// The server refused this connection a JetStream API subject the step
    /// needs (its credentials' permissions, e.g. issued before the
    /// allow-list had the entry): the message names the subject. Reissue the
    /// credentials; retrying does not help.
    PermissionDenied,
}

impl DispatchErrorKind {
    /// The scheduler's reason, if it refused.
    pub fn reason(&self) -> Option<RejectReason> {
        match self {
            Self::Rejected(r) => Some(r.reason),
            _ => None,
        }
    }

    /// When a retry may succeed, if the scheduler refused and knows.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Rejected(r) => r.retry_after,
            _ => None,
        }
    }
}

impl std::fmt::Display for DispatchErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::InvalidTaskType => "invalid task type",
            Self::Suspended => "tenant is suspended",
            Self::StreamConflict => {
                "task stream or done bucket belongs to another tenant or would lose tasks"
            }
            Self::Unavailable => "JetStream unavailable",
            Self::Seal => "sealing failed",
            Self::TimedOut => "timed out waiting for the task outcome",
            Self::Corrupt => "task result failed verification",
            Self::Rejected(r) => return write!(f, "not admitted by the scheduler: {r}"),
            Self::InvalidOptions => "dispatch options do not fit the namespace",
            Self::PermissionDenied => "the server's permissions refuse this step",
        })
    }
}

/// A dispatch error.
pub type DispatchError = Error<DispatchErrorKind>;

pub(crate) fn unavailable(
    what: impl Into<std::borrow::Cow<'static, str>>,
    e: impl std::error::Error + Send + Sync + 'static,
) -> DispatchError {
    Error::with_source(DispatchErrorKind::Unavailable, what, e)
}

/// Runs `op`, a JetStream API call about `name` (a stream name, or
/// `<stream>.<durable>` for a consumer): its error is
/// [`DispatchErrorKind::Unavailable`], unless meanwhile the server refuses
/// this connection a `$JS.API` subject naming `name` ([`refuses`]). The
/// server answers a denied request with nothing (the client only hears a
/// permissions violation on the connection), so that fails at once with
/// [`DispatchErrorKind::PermissionDenied`] naming the subject, instead of
/// as an outage after the request's timeout.
pub(crate) async fn api_call<T, E, Fut>(
    ns: &TenantNamespace,
    what: String,
    name: &str,
    op: Fut,
) -> Result<T, DispatchError>
where
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    use tenant_bus::events::BusEvent;
    use tokio::sync::broadcast::error::RecvError;
    // Subscribed before `op` first runs, so no refusal is missed.
    let mut events = ns.events();
    let mut watching = true;
    tokio::pin!(op);
    loop {
        tokio::select! {
            r = &mut op => return r.map_err(|e| unavailable(what, e)),
            event = events.recv(), if watching => match event {
                Ok(BusEvent::PermissionViolation { detail }) if refuses(&detail, name) => {
                    return Err(Error::new(
                        DispatchErrorKind::PermissionDenied,
                        format!(
                            "{what}: the server refused this connection ({detail}); \
                             its credentials do not allow this step, reissue them"
                        ),
                    ));
                }
                Err(RecvError::Closed) => watching = false,
                _ => {}
            },
        }
    }
}

/// Whether the server's permissions-violation text `detail` (`... to
/// "<subject>"`) names a `$JS.API` subject that carries `name`'s tokens
/// consecutively: `TASKS` is in `$JS.API.STREAM.INFO.TASKS` but not in
/// `$JS.API.STREAM.INFO.KV_TASKS_DONE`; `TASKS.work-a` is in a create of
/// consumer `work-a` on `TASKS` but not of `work-ab`.
fn refuses(detail: &str, name: &str) -> bool {
    let Some(subject) = detail.split('"').nth(1) else {
        return false;
    };
    if !subject.starts_with("$JS.API.") {
        return false;
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    let want: Vec<&str> = name.split('.').collect();
    !want.is_empty() && tokens.windows(want.len()).any(|w| w == want.as_slice())
}

/// A task type: a slug (`a-z 0-9 -`), one subject token.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskType(Arc<str>);

impl TaskType {
    /// Validates `s`.
    pub fn new(s: &str) -> Result<Self, DispatchError> {
        validate_slug(s).map_err(|k| {
            Error::new(
                DispatchErrorKind::InvalidTaskType,
                format!("{:?}: {k}", s.chars().take(80).collect::<String>()),
            )
        })?;
        Ok(Self(Arc::from(s)))
    }

    /// The type as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TaskType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Options of a [`Dispatcher`] (and its workers). A `Clone` builder.
#[derive(Debug, Clone)]
pub struct DispatchOptions {
    pub(crate) stream: String,
    pub(crate) done_bucket: String,
    pub(crate) per_tenant_names: bool,
    pub(crate) duplicate_window: Duration,
    pub(crate) max_deliveries: u32,
    pub(crate) backoff: Vec<Duration>,
    pub(crate) ack_wait: Duration,
    pub(crate) handler_timeout: Duration,
    pub(crate) task_max_age: Duration,
    pub(crate) done_retention: Duration,
    pub(crate) result_poll: Duration,
    pub(crate) gate: Option<TenantGate>,
    pub(crate) scheduler: Option<Arc<TenantScheduler>>,
    pub(crate) replicas: Option<usize>,
    pub(crate) region: Option<tenant_bus::region::Region>,
    pub(crate) one_copy_per_id: bool,
    pub(crate) max_unanswered: usize,
}

impl Default for DispatchOptions {
    fn default() -> Self {
        Self {
            stream: DEFAULT_STREAM.to_string(),
            done_bucket: DEFAULT_DONE_BUCKET.to_string(),
            per_tenant_names: false,
            duplicate_window: Duration::from_secs(120),
            max_deliveries: 5,
            backoff: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ],
            ack_wait: Duration::from_secs(30),
            handler_timeout: Duration::from_secs(300),
            task_max_age: Duration::from_secs(24 * 3600),
            done_retention: Duration::from_secs(7 * 24 * 3600),
            result_poll: Duration::from_secs(1),
            gate: None,
            scheduler: None,
            replicas: None,
            region: None,
            one_copy_per_id: false,
            max_unanswered: acks::MAX_PENDING,
        }
    }
}

impl DispatchOptions {
    /// The defaults (each documented on its setter).
    pub fn new() -> Self {
        Self::default()
    }

    /// Replicas of the stream and the done bucket when they are created (1 to
    /// 5; another count makes [`Dispatcher::new`] fail with
    /// [`DispatchErrorKind::InvalidOptions`] rather than create something
    /// other than asked). Default: the bundle's placement
    /// ([`TenantNamespace::placement`], which the control plane sets to the
    /// deployment's setting), else 1. A runtime instance can also read the
    /// setting from the registry bucket
    /// ([`Registry::replicas`](crate::registry::Registry::replicas)).
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = Some(replicas);
        self
    }

    /// Keeps the stream and the done bucket in `region` (data residency, see
    /// [`tenant_bus::region`]). Default: the bundle's placement. They are
    /// created with the region's placement tag (refused, never placed
    /// elsewhere, when its servers cannot take them), and an existing stream
    /// or bucket without that tag is refused
    /// ([`DispatchErrorKind::StreamConflict`]).
    pub fn region(mut self, region: tenant_bus::region::Region) -> Self {
        self.region = Some(region);
        self
    }

    /// Stream name. Default [`DEFAULT_STREAM`].
    pub fn stream(mut self, name: &str) -> Self {
        self.stream = name.to_string();
        self
    }

    /// Done-bucket name. Default [`DEFAULT_DONE_BUCKET`].
    pub fn done_bucket(mut self, name: &str) -> Self {
        self.done_bucket = name.to_string();
        self
    }

    /// Suffix the stream and bucket names with `_<tenant id>`, for servers where
    /// tenants share one account. Default off (one account per tenant).
    pub fn per_tenant_names(mut self, on: bool) -> Self {
        self.per_tenant_names = on;
        self
    }

    /// JetStream's de-duplication window. Default 2 minutes.
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    /// Whether a stream this dispatcher creates admits at most one queued
    /// copy of each task id, enforced by the server (see "One copy per id"
    /// in the module docs). Default off. It is the stream's setting, fixed
    /// by whoever creates the stream: every dispatcher and worker follows the
    /// stream it finds, whatever this option says.
    pub fn one_copy_per_id(mut self, on: bool) -> Self {
        self.one_copy_per_id = on;
        self
    }

    /// Deliveries before a failing task is dead-lettered (at least 1). Default 5.
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = n.max(1);
        self
    }

    /// Redelivery delays after the 1st, 2nd, ... failure (the last repeats).
    /// Default 1 s, 5 s, 30 s.
    pub fn backoff(mut self, delays: Vec<Duration>) -> Self {
        self.backoff = delays;
        self
    }

    /// How long the server waits for an ack before redelivering to another
    /// worker (workers send progress while a handler runs). Default 30 s.
    pub fn ack_wait(mut self, wait: Duration) -> Self {
        self.ack_wait = wait.max(Duration::from_millis(500));
        self
    }

    /// A handler running longer than this fails the attempt. Default 5 min.
    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.handler_timeout = timeout;
        self
    }

    /// Older tasks are dead-lettered as expired instead of run (see the module
    /// docs on freshness). Default 24 h.
    pub fn task_max_age(mut self, age: Duration) -> Self {
        self.task_max_age = age;
        self
    }

    /// How long finished task ids (and their results) are remembered; raised to
    /// at least the task max age. Default 7 days.
    pub fn done_retention(mut self, retention: Duration) -> Self {
        self.done_retention = retention;
        self
    }

    /// Publishes (tasks and the workers' done records) awaiting the server's
    /// answer at most, per dispatcher; one more waits for a place (each
    /// answer is awaited at most 5 s). Default 8,192; at least 1.
    pub fn max_unanswered(mut self, n: usize) -> Self {
        self.max_unanswered = n.max(1);
        self
    }

    /// How often a waiting requester re-reads the done bucket, in case it missed
    /// the result message (a reconnect). Default 1 s.
    pub fn result_poll(mut self, every: Duration) -> Self {
        self.result_poll = every.max(Duration::from_millis(50));
        self
    }

    /// Consult this tenant gate (the registry's view of the tenant) on every
    /// dispatch and before every task a worker runs: a suspended tenant dispatches
    /// nothing and its workers hold their tasks (and fetch no more) until it is
    /// active again. Default: no gate.
    pub fn gate(mut self, gate: TenantGate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Feed this tenant's scheduler (see the module docs): each dispatch and
    /// submit passes its message admission, and workers hold one of its task
    /// permits per running task. It must be the namespace's tenant's. Default:
    /// none (nothing admitted or capped beyond the worker's own concurrency).
    pub fn scheduler(mut self, scheduler: Arc<TenantScheduler>) -> Self {
        self.scheduler = Some(scheduler);
        self
    }

    fn names(&self, ns: &TenantNamespace) -> (String, String) {
        if self.per_tenant_names {
            (
                format!("{}_{}", self.stream, ns.tenant()),
                format!("{}_{}", self.done_bucket, ns.tenant()),
            )
        } else {
            (self.stream.clone(), self.done_bucket.clone())
        }
    }

    pub(crate) fn backoff_for(&self, delivered: u64) -> Duration {
        let i = usize::try_from(delivered.saturating_sub(1)).unwrap_or(usize::MAX);
        self.backoff
            .get(i)
            .or(self.backoff.last())
            .copied()
            .unwrap_or(Duration::from_secs(1))
    }
}

/// A sealed task, ready to submit (and to submit again after a lost ack).
#[derive(Debug, Clone)]
pub struct SealedTask {
    id: MessageId,
    task_type: TaskType,
    subject: String,
    body: Bytes,
    payload_len: usize,
}

impl SealedTask {
    /// The task's message id.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// Its type.
    pub fn task_type(&self) -> &TaskType {
        &self.task_type
    }

    /// The full subject it is published on.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The sealed bytes.
    pub fn body(&self) -> &Bytes {
        &self.body
    }
}

/// What the stream said about a submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submitted {
    /// The task's message id.
    pub id: MessageId,
    /// The stream sequence of the stored copy.
    pub sequence: u64,
    /// Whether the stream already had this message id (nothing new stored).
    pub duplicate: bool,
}

pub(crate) struct Shared {
    pub(crate) ns: TenantNamespace,
    pub(crate) js: jetstream::Context,
    pub(crate) stream: stream::Stream,
    /// The stream admits one queued copy per task id: tasks and dead letters
    /// are published on `<subject>.<task id hex>`.
    pub(crate) per_id: bool,
    pub(crate) done: kv::Store,
    /// The done bucket republishes each write to the task's result subject.
    pub(crate) republishes: bool,
    pub(crate) options: DispatchOptions,
    pub(crate) stream_name: String,
    /// Publish acknowledgements of tasks and done records, on one inbox.
    pub(crate) acks: acks::AckInbox,
}

/// A task sent by [`Dispatcher::send`], whose stream ack is still to come.
pub struct SubmitAck {
    id: MessageId,
    ack: acks::AckFuture,
    per_id: bool,
}

impl std::fmt::Debug for SubmitAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubmitAck").field("id", &self.id).finish()
    }
}

impl SubmitAck {
    /// The task's message id.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// Waits for the stream's ack. On a stream that admits one copy per id,
    /// a copy refused because another copy of the id is still queued or
    /// running is a duplicate (sequence 0: nothing was stored).
    pub async fn ack(self) -> Result<Submitted, DispatchError> {
        let ack = match self.ack.wait().await {
            Ok(ack) => ack,
            Err(e) if self.per_id && is_copy_refused(&e) => {
                return Ok(Submitted {
                    id: self.id,
                    sequence: 0,
                    duplicate: true,
                })
            }
            Err(e) => return Err(unavailable("task publish ack", e)),
        };
        Ok(Submitted {
            id: self.id,
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }
}

/// Dispatches tasks of one tenant and starts its workers. Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("tenant", self.shared.ns.tenant())
            .field("stream", &self.shared.stream_name)
            .field("done_bucket", &self.shared.done.name)
            .finish()
    }
}

impl Dispatcher {
    /// Creates (or opens) the tenant's stream and done bucket on the namespace's
    /// connection.
    pub async fn new(
        ns: &TenantNamespace,
        mut options: DispatchOptions,
    ) -> Result<Self, DispatchError> {
        options.done_retention = options.done_retention.max(options.task_max_age);
        if let Some(s) = &options.scheduler {
            if s.id() != ns.tenant() {
                return Err(Error::new(
                    DispatchErrorKind::InvalidOptions,
                    format!(
                        "scheduler of tenant {} for a namespace of {}",
                        s.id(),
                        ns.tenant()
                    ),
                ));
            }
        }
        let (stream_name, bucket) = options.names(ns);
        let placement = ns.placement();
        let replicas = options.replicas.or(placement.replicas).unwrap_or(1);
        tenant_bus::region::check_replicas(replicas)
            .map_err(|e| Error::new(DispatchErrorKind::InvalidOptions, format!("replicas {e}")))?;
        if options.region.is_none() {
            options.region = placement.region.clone();
        }
        let region = options.region.clone();
        // Named in a creation error: a region that cannot hold the stream is
        // the usual reason, and it is never placed elsewhere instead.
        let where_ = region
            .as_ref()
            .map(|r| format!(" in region {r} (servers tagged {})", r.tag()))
            .unwrap_or_default();
        let js = jetstream::new(ns.nats().clone());
        let subjects = vec![
            scope(ns.tenant(), "tasks.queue.>"),
            scope(ns.tenant(), "tasks.dead.>"),
        ];
        let config = stream::Config {
            name: stream_name.clone(),
            description: Some(format!("agentbus tasks of tenant {}", ns.tenant())),
            subjects: subjects.clone(),
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: options.duplicate_window,
            num_replicas: replicas,
            placement: region.as_ref().map(|r| r.placement()),
            ..Default::default()
        };
        let config = if options.one_copy_per_id {
            stream::Config {
                max_messages_per_subject: 1,
                discard: stream::DiscardPolicy::New,
                discard_new_per_subject: true,
                ..config
            }
        } else {
            config
        };
        // A tenant created a moment ago may not be known to JetStream on
        // every server yet (see `tenant_bus::settle`).
        let (stream, _) = api_call(
            ns,
            format!("stream {stream_name}{where_}"),
            &stream_name,
            tenant_bus::open::stream(&js, config),
        )
        .await?;
        // Agents may create the stream but never change it afterwards (the
        // control plane's allow-list has no STREAM.UPDATE), so whoever creates it
        // first fixes its configuration. One that would drop, move or copy queued
        // tasks is refused here instead of used.
        let config = &stream.cached_info().config;
        if let Some(why) = unusable_task_stream(config, &subjects) {
            return Err(Error::new(
                DispatchErrorKind::StreamConflict,
                format!("stream {stream_name}: {why}"),
            ));
        }
        let per_id = one_copy_per_id(config);
        if let Some(r) = &region {
            if !r.holds(config.placement.as_ref()) {
                return Err(Error::new(
                    DispatchErrorKind::StreamConflict,
                    format!("stream {stream_name} is not placed in region {r}"),
                ));
            }
        }
        // The server hands each recorded outcome to its requester: the done
        // bucket republishes every write to the result subject, so a worker
        // sends one message per outcome instead of two.
        let republish = stream::Republish {
            source: format!("$KV.{bucket}.>"),
            destination: scope(ns.tenant(), "tasks.results.>"),
            headers_only: false,
        };
        let config = kv::Config {
            bucket: bucket.clone(),
            description: format!("agentbus finished tasks of tenant {}", ns.tenant()),
            history: 1,
            max_age: options.done_retention,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            placement: region.as_ref().map(|r| r.placement()),
            republish: Some(republish.clone()),
            ..Default::default()
        };
        let (done, created) = api_call(
            ns,
            format!("bucket {bucket}{where_}"),
            &format!("KV_{bucket}"),
            tenant_bus::open::bucket(&js, config),
        )
        .await?;
        let republishes = if created {
            true
        } else {
            // Someone else created it. A done record must outlive the task's
            // maximum age, or a replayed copy of a finished task would be
            // neither recognised as done nor refused as expired (see the
            // module docs); agents cannot change a bucket, so one that forgets
            // sooner is refused. (One created here has our retention, which is
            // never shorter than the maximum age.)
            // The lookup answered with the bucket's configuration.
            let config = &done.stream.cached_info().config;
            if let Some(r) = &region {
                if !r.holds(config.placement.as_ref()) {
                    return Err(Error::new(
                        DispatchErrorKind::StreamConflict,
                        format!("bucket {bucket} is not placed in region {r}"),
                    ));
                }
            }
            let kept = config.max_age;
            if !kept.is_zero() && kept < options.task_max_age {
                return Err(Error::new(
                    DispatchErrorKind::StreamConflict,
                    format!(
                        "bucket {bucket} keeps records {} s, less than the task max age of {} s",
                        kept.as_secs(),
                        options.task_max_age.as_secs()
                    ),
                ));
            }
            // A bucket created before outcomes were republished (agents
            // cannot change it): workers publish each outcome themselves.
            config.republish.as_ref() == Some(&republish)
        };
        let acks = acks::AckInbox::start(ns.nats().clone(), options.max_unanswered)
            .await
            .map_err(|e| unavailable("publish acknowledgement inbox", e))?;
        Ok(Self {
            shared: Arc::new(Shared {
                acks,
                ns: ns.clone(),
                js,
                stream,
                per_id,
                done,
                republishes,
                options,
                stream_name,
            }),
        })
    }

    /// The namespace.
    pub fn namespace(&self) -> &TenantNamespace {
        &self.shared.ns
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        &self.shared.stream_name
    }

    /// The done bucket's name.
    pub fn done_bucket(&self) -> &str {
        &self.shared.done.name
    }

    /// The options in force.
    pub fn options(&self) -> &DispatchOptions {
        &self.shared.options
    }

    pub(crate) fn ensure_active(&self) -> Result<(), DispatchError> {
        match &self.shared.options.gate {
            Some(g) if !g.is_active() => Err(Error::new(
                DispatchErrorKind::Suspended,
                self.shared.ns.tenant().to_string(),
            )),
            _ => Ok(()),
        }
    }

    /// Admits one message of `bytes` payload bytes through the tenant's scheduler,
    /// if one is configured.
    pub(crate) async fn admit(&self, bytes: usize) -> Result<(), DispatchError> {
        let Some(s) = &self.shared.options.scheduler else {
            return Ok(());
        };
        let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
        s.admit(bytes).await.map_err(|e| match e.kind() {
            SchedulerErrorKind::Rejected(r) if r.reason == RejectReason::Suspended => {
                Error::new(DispatchErrorKind::Suspended, s.id().to_string())
            }
            SchedulerErrorKind::Rejected(r) => Error::with_source(
                DispatchErrorKind::Rejected(r),
                format!("tenant {}", s.id()),
                e,
            ),
            _ => unavailable("scheduler admission", e),
        })
    }

    /// The full subject of tasks of `task_type`, which their seals are
    /// bound to (and which they are published on, unless the stream admits
    /// one copy per id: see [`queue_subject`](Self::queue_subject)).
    pub fn task_subject(&self, task_type: &TaskType) -> String {
        scope(self.shared.ns.tenant(), &format!("tasks.queue.{task_type}"))
    }

    /// The full subject task `id` of `task_type` is published on:
    /// `tasks.queue.<type>`, or `tasks.queue.<type>.<id hex>` on a stream
    /// that admits one copy per id.
    pub fn queue_subject(&self, task_type: &TaskType, id: &MessageId) -> String {
        per_id_subject(self.task_subject(task_type), self.shared.per_id, id)
    }

    /// Whether the stream admits at most one queued copy of each task id
    /// (see [`DispatchOptions::one_copy_per_id`]).
    pub fn one_copy_per_id(&self) -> bool {
        self.shared.per_id
    }

    /// The full subject the outcome of task `id` is published on.
    pub fn result_subject(&self, id: &MessageId) -> String {
        scope(
            self.shared.ns.tenant(),
            &format!("tasks.results.{}", id.to_hex()),
        )
    }

    /// Seals a task (not yet submitted).
    pub fn seal(&self, task_type: &str, payload: &[u8]) -> Result<SealedTask, DispatchError> {
        self.ensure_active()?;
        let task_type = TaskType::new(task_type)?;
        let sealed_for = self.task_subject(&task_type);
        let (id, body) = self
            .shared
            .ns
            .sealer()
            .seal(&sealed_for, None, payload)
            .map_err(|e| Error::with_source(DispatchErrorKind::Seal, "", e))?;
        let subject = per_id_subject(sealed_for, self.shared.per_id, &id);
        Ok(SealedTask {
            id,
            task_type,
            subject,
            body,
            payload_len: payload.len(),
        })
    }

    /// Publishes a sealed task with `Nats-Msg-Id` = its id and waits for the
    /// stream's ack. Safe to call again with the same task (each call is one
    /// message for the tenant's scheduler, if configured).
    pub async fn submit(&self, task: &SealedTask) -> Result<Submitted, DispatchError> {
        self.ensure_active()?;
        self.admit(task.payload_len).await?;
        self.publish_sealed(task).await
    }

    /// Publishes a sealed task like [`submit`](Self::submit) but returns as soon
    /// as it is sent, before the stream's ack: await [`SubmitAck::ack`] for it.
    /// For many submissions in flight at once (the way raw JetStream publishers
    /// pipeline), each still de-duplicated by its message id.
    pub async fn send(&self, task: &SealedTask) -> Result<SubmitAck, DispatchError> {
        self.ensure_active()?;
        self.admit(task.payload_len).await?;
        self.send_sealed(task).await
    }

    async fn publish_sealed(&self, task: &SealedTask) -> Result<Submitted, DispatchError> {
        // Right after the stream was created on a cluster, this client's
        // server may not know its subjects yet ("no responders"): retried
        // briefly (the message id makes a retry safe).
        tenant_bus::settle::while_unrouted(|| async { self.send_sealed(task).await?.ack().await })
            .await
    }

    async fn send_sealed(&self, task: &SealedTask) -> Result<SubmitAck, DispatchError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            task.id.to_hex().as_str(),
        );
        let ack = self
            .shared
            .acks
            .publish(task.subject.clone(), headers, task.body.clone())
            .await
            .map_err(|e| unavailable("publish task", e))?;
        Ok(SubmitAck {
            id: task.id,
            ack,
            per_id: self.shared.per_id,
        })
    }

    /// Seals and submits a task, returning a handle to await its outcome. With a
    /// scheduler, the task is admitted first ([`DispatchErrorKind::Rejected`]
    /// with a retry-after when the tenant's window is spent).
    pub async fn dispatch(
        &self,
        task_type: &str,
        payload: impl AsRef<[u8]>,
    ) -> Result<TaskHandle, DispatchError> {
        let task = self.seal(task_type, payload.as_ref())?;
        self.admit(task.payload_len).await?;
        let handle = self.handle(task.id).await?;
        self.ensure_active()?;
        self.publish_sealed(&task).await?;
        Ok(handle)
    }

    /// A handle on the outcome of task `id` (subscribes to its result subject).
    pub async fn handle(&self, id: MessageId) -> Result<TaskHandle, DispatchError> {
        let subject = self.result_subject(&id);
        let sub = self
            .shared
            .ns
            .nats()
            .subscribe(subject.clone())
            .await
            .map_err(|e| unavailable("result subscribe", e))?;
        Ok(TaskHandle {
            id,
            subject,
            sub,
            dispatcher: self.clone(),
        })
    }

    /// The recorded outcome of task `id`, if it has finished (from the done bucket).
    pub async fn outcome(&self, id: &MessageId) -> Result<Option<TaskOutcome>, DispatchError> {
        let stored = self
            .shared
            .done
            .get(id.to_hex())
            .await
            .map_err(|e| unavailable("done bucket read", e))?;
        match stored {
            Some(body) => self.open_result(&self.result_subject(id), &body).map(Some),
            None => Ok(None),
        }
    }

    pub(crate) fn open_result(
        &self,
        subject: &str,
        body: &[u8],
    ) -> Result<TaskOutcome, DispatchError> {
        let (_, plain) = tenant_bus::envelope::open(&self.shared.ns.keys(), subject, None, body)
            .map_err(|r| Error::new(DispatchErrorKind::Corrupt, r.as_str()))?;
        TaskOutcome::decode(plain)
            .ok_or_else(|| Error::new(DispatchErrorKind::Corrupt, "undecodable outcome"))
    }

    /// Starts a worker for `task_type` running `handler`.
    pub async fn worker(
        &self,
        task_type: &str,
        handler: impl TaskHandler,
        options: WorkerOptions,
    ) -> Result<Worker, DispatchError> {
        let task_type = TaskType::new(task_type)?;
        worker::start(self.clone(), task_type, Arc::new(handler), options).await
    }

    /// A reader of dead letters (a durable consumer on `tasks.dead.>`; reading
    /// one removes it from the stream).
    pub async fn dead_letters(&self) -> Result<DeadLetters, DispatchError> {
        let consumer = api_call(
            &self.shared.ns,
            "dead-letter consumer".to_string(),
            &format!("{}.{DEAD_LETTER_CONSUMER}", self.shared.stream_name),
            tenant_bus::open::consumer(
                &self.shared.js,
                &self.shared.stream,
                DEAD_LETTER_CONSUMER,
                consumer::pull::Config {
                    durable_name: Some(DEAD_LETTER_CONSUMER.to_string()),
                    filter_subject: scope(self.shared.ns.tenant(), "tasks.dead.>"),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ..Default::default()
                },
            ),
        )
        .await?;
        Ok(DeadLetters {
            consumer,
            dispatcher: self.clone(),
        })
    }
}

/// Why an existing task stream cannot be used, if it cannot: its subjects are
/// not exactly the tenant's task subjects (another tenant's stream, or one that
/// would also capture other traffic), or its configuration would lose or leak
/// queued tasks (not a work queue, a message, byte or age limit, a subject
/// transform that breaks the seals' subject binding, republishing, a mirror or
/// sources, sealed).
fn unusable_task_stream(config: &stream::Config, subjects: &[String]) -> Option<String> {
    let have = &config.subjects;
    if have.len() != subjects.len() || subjects.iter().any(|s| !have.contains(s)) {
        return Some(format!("has subjects {have:?}"));
    }
    if config.retention != stream::RetentionPolicy::WorkQueue {
        return Some(format!(
            "retention {:?}, not a work queue",
            config.retention
        ));
    }
    // One message per subject with new ones refused (one copy per id)
    // drops nothing queued: a copy is refused to its publisher instead.
    let per_subject_drops = config.max_messages_per_subject > 0 && !one_copy_per_id(config);
    if config.max_messages > 0
        || config.max_bytes > 0
        || per_subject_drops
        || !config.max_age.is_zero()
    {
        return Some(format!(
            "limits would drop queued tasks (max_msgs {}, max_bytes {}, max_msgs_per_subject {}, max_age {} s)",
            config.max_messages,
            config.max_bytes,
            config.max_messages_per_subject,
            config.max_age.as_secs()
        ));
    }
    if config.subject_transform.is_some()
        || config.republish.is_some()
        || config.mirror.is_some()
        || config.sources.as_ref().is_some_and(|s| !s.is_empty())
        || config.sealed
    {
        return Some(
            "a subject transform, republish, mirror, sources or seal would move, copy or stop tasks"
                .to_string(),
        );
    }
    None
}

/// Whether a task stream admits exactly one queued copy per subject, new
/// copies refused: the form [`DispatchOptions::one_copy_per_id`] creates.
fn one_copy_per_id(config: &stream::Config) -> bool {
    config.max_messages_per_subject == 1
        && config.discard == stream::DiscardPolicy::New
        && config.discard_new_per_subject
}

/// `subject`, with `.<id hex>` appended on a stream that admits one copy
/// per id.
pub(crate) fn per_id_subject(subject: String, per_id: bool, id: &MessageId) -> String {
    if per_id {
        format!("{subject}.{}", id.to_hex())
    } else {
        subject
    }
}

/// The subject a stored message's seal is bound to, and on a stream that
/// admits one copy per id the task id its subject names
/// (`<sealed subject>.<32 hex>`). A per-id subject without that last token
/// (never published by a dispatcher) gives an empty subject, which no seal
/// opens for: refused like a failed seal.
pub(crate) fn sealed_for(subject: &str, per_id: bool) -> (&str, Option<&str>) {
    if !per_id {
        return (subject, None);
    }
    match subject.rsplit_once('.') {
        Some((sealed_for, id))
            if id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            (sealed_for, Some(id))
        }
        _ => ("", None),
    }
}

/// Whether a publish was refused because its subject already holds a
/// message (a stream with one copy per id and another copy still queued).
fn is_copy_refused(error: &jetstream::context::PublishError) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        if let Some(api) = e.downcast_ref::<jetstream::Error>() {
            return api.error_code() == jetstream::ErrorCode::STREAM_STORE_FAILED
                && api
                    .to_string()
                    .starts_with("maximum messages per subject exceeded");
        }
        next = e.source();
    }
    false
}

/// Awaits one task's outcome.
pub struct TaskHandle {
    id: MessageId,
    subject: String,
    sub: async_nats::Subscriber,
    dispatcher: Dispatcher,
}

impl std::fmt::Debug for TaskHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskHandle").field("id", &self.id).finish()
    }
}

impl TaskHandle {
    /// The task's message id.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// Waits up to `timeout` for the outcome: the sealed result message, or the
    /// done bucket (re-read every `result_poll`, so a result published while this
    /// client was disconnected is not missed).
    pub async fn wait(&mut self, timeout: Duration) -> Result<TaskOutcome, DispatchError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let poll = self.dispatcher.shared.options.result_poll;
        loop {
            if let Ok(Some(outcome)) = self.dispatcher.outcome(&self.id).await {
                return Ok(outcome);
            }
            let next_poll = (tokio::time::Instant::now() + poll).min(deadline);
            loop {
                match tokio::time::timeout_at(next_poll, self.sub.next()).await {
                    Ok(Some(msg)) => match self.dispatcher.open_result(&self.subject, &msg.payload)
                    {
                        Ok(outcome) => return Ok(outcome),
                        Err(e) => {
                            tracing::warn!(task = %self.id, error = %e, "dropped a task result");
                        }
                    },
                    // Subscription closed (connection gone): fall back to polling.
                    Ok(None) => {
                        tokio::time::sleep_until(next_poll).await;
                        break;
                    }
                    Err(_) => break,
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::new(
                    DispatchErrorKind::TimedOut,
                    format!("task {} after {} ms", self.id, timeout.as_millis()),
                ));
            }
        }
    }
}

/// Reads dead letters of the tenant.
pub struct DeadLetters {
    consumer: consumer::Consumer<consumer::pull::Config>,
    dispatcher: Dispatcher,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters").finish()
    }
}

impl DeadLetters {
    /// The next dead letter, waiting up to `timeout`; `None` if none came.
    /// Letters that fail verification are terminated and skipped.
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<DeadLetter>, DispatchError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut batch = self
                .consumer
                .batch()
                .max_messages(1)
                .expires(left.max(Duration::from_millis(100)))
                .messages()
                .await
                .map_err(|e| unavailable("dead-letter fetch", e))?;
            let Some(msg) = batch.next().await else {
                continue;
            };
            let msg = msg.map_err(|e| {
                Error::new(
                    DispatchErrorKind::Unavailable,
                    format!("dead-letter fetch: {e}"),
                )
            })?;
            // One copy per id: sealed for the subject without its id token,
            // which must name the letter's task.
            let (sealed_for, named) =
                sealed_for(msg.subject.as_str(), self.dispatcher.shared.per_id);
            let opened = tenant_bus::envelope::open(
                &self.dispatcher.shared.ns.keys(),
                sealed_for,
                None,
                &msg.payload,
            );
            let letter = opened
                .ok()
                .and_then(|(_, plain)| serde_json::from_slice::<DeadLetter>(&plain).ok())
                .filter(|l| named.is_none_or(|id| id == l.task_id));
            match letter {
                Some(letter) => {
                    msg.ack()
                        .await
                        .map_err(|e| Error::new(DispatchErrorKind::Unavailable, e.to_string()))?;
                    return Ok(Some(letter));
                }
                None => {
                    tracing::warn!(subject = %msg.subject, "terminating an unverifiable dead letter");
                    let _ = msg.ack_with(jetstream::AckKind::Term).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::refuses;

    #[test]
    fn a_refusal_names_a_step_only_by_whole_tokens_of_a_jetstream_subject() {
        let info = r#"Permissions Violation for Publish to "$JS.API.STREAM.INFO.TASKS""#;
        assert!(refuses(info, "TASKS"));
        let bucket = r#"Permissions Violation for Publish to "$JS.API.STREAM.INFO.KV_TASKS_DONE""#;
        assert!(!refuses(bucket, "TASKS"));
        assert!(refuses(bucket, "KV_TASKS_DONE"));
        let create = r#"Permissions Violation for Publish to "$JS.API.CONSUMER.CREATE.TASKS.work-a.tenant.x.tasks.queue.a""#;
        assert!(refuses(create, "TASKS.work-a"));
        assert!(!refuses(create, "TASKS.work-ab"));
        assert!(!refuses(create, "OTHER.work-a"));
        // Not a JetStream API subject, or no subject at all.
        let plain = r#"Permissions Violation for Publish to "tenant.x.TASKS""#;
        assert!(!refuses(plain, "TASKS"));
        assert!(!refuses("Permissions Violation", "TASKS"));
    }
}
