//! Workers: pull tasks of one type with a concurrency cap and run a handler.
//!
//! The loop takes a free slot (a semaphore permit) before it pulls, and pulls at
//! most as many messages as it holds slots (one pull request for all of them, on
//! the worker's one pull inbox), so no task waits in the client while its ack
//! timer runs. A slot is held from the pull until the outcome is recorded. With
//! [`WorkerOptions::prefetch`] there are `concurrency + prefetch` slots but only
//! `concurrency` handlers: a task pulled ahead is opened and looked up at once
//! and waits for a handler (progress acks keep its ack timer), and a handler
//! goes to the next task as soon as it returns, while its outcome is recorded. With the tenant's scheduler
//! ([`DispatchOptions::scheduler`](super::DispatchOptions::scheduler)), a slot is
//! a local permit *and* one of the tenant's task permits: the first is awaited
//! (the scheduler's overflow policy: FIFO queue or refusal with a retry-after),
//! further ones are taken only if free at once, so the worker never holds more
//! than it can run and `max_concurrent_tasks` holds across all workers of the
//! tenant on the instance. Each task then goes through (see the module docs of
//! [`dispatch`](super) for why): open and verify -> already done? -> tenant
//! suspended? (hold it, sending progress, until active) -> expired? -> delivery
//! limit? -> run the handler (progress acks every `ack_wait / 3`, a time limit)
//! -> record (one conditional write) and publish the outcome -> ack; or
//! `Nak(backoff)`; or dead-letter and `Term`. The "already done?" lookups of the
//! tasks in hand are batched (see `done.rs`).
//!
//! [`Worker::shutdown`] stops pulling, lets running tasks finish until the
//! timeout, then naks the ones still running so another worker gets them at
//! once. [`Worker::abort`] drops everything without a word, like a crash: the
//! server redelivers those tasks after `ack_wait`.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::consumer::{self, pull};
use async_nats::jetstream::{AckKind, Message};
use bytes::Bytes;
use futures::StreamExt as _;
use tenant_bus::envelope::now_ms;
use tenant_bus::{AgentId, MessageId};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::done::{self, Lookups};
use super::wire::{DeadLetter, TaskOutcome};
use super::{unavailable, DispatchError, Dispatcher, TaskType};
use crate::scheduler::{SchedulerErrorKind, TaskGrant, TenantScheduler};
use tenant_bus::admission::RejectReason;

/// A task as a handler sees it: verified, decrypted.
#[derive(Debug, Clone)]
pub struct Task {
    /// The task's message id (its idempotency key).
    pub id: MessageId,
    /// Its type.
    pub task_type: TaskType,
    /// The decrypted payload.
    pub payload: Bytes,
    /// The dispatching agent, if it identified itself.
    pub sender: Option<AgentId>,
    /// When it was dispatched (sender's clock).
    pub dispatched_at: SystemTime,
    /// This delivery's number, from 1.
    pub delivery: u64,
    /// Deliveries allowed before the task is dead-lettered.
    pub max_deliveries: u32,
}

/// The boxed future a handler returns: the output, or why the attempt failed.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Bytes, String>> + Send + 'static>>;

/// Runs tasks. Implemented for every `Fn(Task) -> impl Future<Output =
/// Result<impl Into<Bytes>, String>>`.
pub trait TaskHandler: Send + Sync + 'static {
    /// Runs one task; an `Err` fails this attempt (retried with backoff, then
    /// dead-lettered with this text as the reason).
    fn handle(&self, task: Task) -> HandlerFuture;
}

impl<F, Fut, O> TaskHandler for F
where
    F: Fn(Task) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, String>> + Send + 'static,
    O: Into<Bytes>,
{
    fn handle(&self, task: Task) -> HandlerFuture {
        let fut = self(task);
        Box::pin(async move { fut.await.map(Into::into) })
    }
}

/// Options of one worker.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    concurrency: usize,
    prefetch: usize,
    fetch_expires: Duration,
    audit: Option<Arc<agentbus_control::audit::sink::AuditSink>>,
    meter: Option<agentbus_control::meter::UsageMeter>,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            concurrency: 4,
            prefetch: 0,
            fetch_expires: Duration::from_secs(2),
            audit: None,
            meter: None,
        }
    }
}

impl WorkerOptions {
    /// The defaults: 4 tasks at once, pulls held open for 2 s.
    pub fn new() -> Self {
        Self::default()
    }

    /// Handlers run at once by this worker (at least 1). For a tenant-wide cap
    /// (`max_concurrent_tasks` across workers), give the dispatcher the tenant's
    /// scheduler ([`DispatchOptions::scheduler`](super::DispatchOptions::scheduler)).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Records each dead letter in the audit log through `sink`
    /// (`runtime.task_dead_letter`). When the sink's queue is full the task is
    /// handed back (retried after 1 s) instead of being dead-lettered
    /// unrecorded.
    pub fn audit_sink(mut self, sink: Arc<agentbus_control::audit::sink::AuditSink>) -> Self {
        self.audit = Some(sink);
        self
    }

    /// Meters this worker's tasks per tenant through `meter`: `tasks.run`
    /// (handler runs), `tasks.completed`, `tasks.failed` (failed attempts,
    /// retried or dead-lettered).
    pub fn usage_meter(mut self, meter: agentbus_control::meter::UsageMeter) -> Self {
        self.meter = Some(meter);
        self
    }

    /// Tasks pulled ahead of free handlers (default 0: never more tasks in hand
    /// than handlers). A task pulled ahead is opened and looked up at once,
    /// then waits for a handler with progress acks keeping its ack timer, so
    /// pull and lookup round trips overlap running handlers: more throughput
    /// for short handlers. The cost: tasks waiting here cannot be taken by an
    /// idle worker elsewhere, and with the tenant's scheduler each holds a task
    /// permit while it waits. Keep it 0 for long handlers. Measured with 64
    /// handlers that return at once (`agentbus bench`, one node): prefetch 64
    /// ran 23k tasks/s, 448 ran 31-34k (bigger pulls and lookup batches also
    /// cost the server less per task); beyond that, nothing more.
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = n;
        self
    }

    /// How long one pull request waits for tasks. Default 2 s.
    pub fn fetch_expires(mut self, d: Duration) -> Self {
        self.fetch_expires = d.max(Duration::from_millis(100));
        self
    }
}

/// Counters of one worker.
#[derive(Debug, Default)]
pub struct WorkerStats {
    runs: AtomicU64,
    completed: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    duplicates: AtomicU64,
    running_copies: AtomicU64,
    rejected: AtomicU64,
    outage_waits: AtomicU64,
    unverified_done: AtomicU64,
    pull_requests: AtomicU64,
    lookup_requests: Arc<AtomicU64>,
}

impl WorkerStats {
    /// Handler invocations.
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }
    /// Tasks completed and acked.
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }
    /// Failed attempts handed back for a retry.
    pub fn retried(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }
    /// Tasks dead-lettered.
    pub fn dead_lettered(&self) -> u64 {
        self.dead_lettered.load(Ordering::Relaxed)
    }
    /// Failed JetStream operations a task was held through (an outage, not the
    /// task's failure).
    pub fn outage_waits(&self) -> u64 {
        self.outage_waits.load(Ordering::Relaxed)
    }
    /// Deliveries of already finished task ids (not run again).
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }
    /// Deliveries of a task that was running here at that moment (handed
    /// back, not run twice). Nonzero means the server redelivered a task in
    /// hand: its progress acks did not arrive within `ack_wait`.
    pub fn running_copies(&self) -> u64 {
        self.running_copies.load(Ordering::Relaxed)
    }
    /// Messages that failed verification (terminated).
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }
    /// Done records that did not open as the task's sealed outcome (ignored:
    /// the task ran as if there were none).
    pub fn unverified_done(&self) -> u64 {
        self.unverified_done.load(Ordering::Relaxed)
    }
    /// Pull requests sent to the task stream's consumer (each asks for as
    /// many tasks as the worker has free slots).
    pub fn pull_requests(&self) -> u64 {
        self.pull_requests.load(Ordering::Relaxed)
    }
    /// Requests sent to the done bucket to look tasks up before they run (one
    /// batched get covers every task waiting at that moment; a bucket without
    /// direct gets costs one per task).
    pub fn lookup_requests(&self) -> u64 {
        self.lookup_requests.load(Ordering::Relaxed)
    }
}

/// A running worker.
pub struct Worker {
    stop: watch::Sender<bool>,
    abandon: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    stats: Arc<WorkerStats>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("stats", &self.stats)
            .finish()
    }
}

impl Worker {
    /// The worker's counters.
    pub fn stats(&self) -> &Arc<WorkerStats> {
        &self.stats
    }

    /// Stops pulling, waits up to `timeout` for running tasks, then hands the
    /// rest back to the server (nak) for another worker.
    pub async fn shutdown(mut self, timeout: Duration) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(timeout, &mut self.task).await.is_ok() {
            return;
        }
        let _ = self.abandon.send(true);
        if tokio::time::timeout(Duration::from_secs(2), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }

    /// Stops at once without acking or naking anything (as a crash would): the
    /// server redelivers the tasks in hand after `ack_wait`.
    pub fn abort(self) {
        self.task.abort();
    }
}

struct Ctx {
    audit: Option<Arc<agentbus_control::audit::sink::AuditSink>>,
    meter: Option<agentbus_control::meter::UsageMeter>,
    d: Dispatcher,
    task_type: TaskType,
    handler: Arc<dyn TaskHandler>,
    stats: Arc<WorkerStats>,
    in_flight: Mutex<HashSet<MessageId>>,
    abandon: watch::Receiver<bool>,
    lookups: Lookups,
    /// With prefetch: the handler slots (the pull slots also count the tasks
    /// pulled ahead). Without: none, a pull slot is a handler slot.
    handlers: Option<Arc<Semaphore>>,
}

pub(crate) async fn start(
    d: Dispatcher,
    task_type: TaskType,
    handler: Arc<dyn TaskHandler>,
    options: WorkerOptions,
) -> Result<Worker, DispatchError> {
    let durable = format!("work-{task_type}");
    let consumer = super::api_call(
        &d.shared.ns,
        format!("consumer {durable}"),
        &format!("{}.{durable}", d.shared.stream_name),
        tenant_bus::open::consumer(
            &d.shared.js,
            &d.shared.stream,
            &durable,
            pull::Config {
                durable_name: Some(durable.clone()),
                // One copy per id: `tasks.queue.<type>.<id hex>`.
                filter_subject: if d.shared.per_id {
                    format!("{}.*", d.task_subject(&task_type))
                } else {
                    d.task_subject(&task_type)
                },
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: d.shared.options.ack_wait,
                // No server-side limit: the worker dead-letters at max_deliveries,
                // so a task never sits undelivered after its last attempt.
                max_deliver: -1,
                ..Default::default()
            },
        ),
    )
    .await?;
    let (stop, stop_rx) = watch::channel(false);
    let (abandon, abandon_rx) = watch::channel(false);
    let stats = Arc::new(WorkerStats::default());
    // One inbox for all of this worker's pull requests (`<inbox>.<n>`, one
    // subject per request), instead of a subscription per pull.
    let nats = d.shared.ns.nats().clone();
    let inbox = nats.new_inbox();
    let pulls = nats
        .subscribe(format!("{inbox}.*"))
        .await
        .map_err(|e| unavailable("pull inbox", e))?;
    let lookups = Lookups::start(nats, d.shared.done.clone(), stats.lookup_requests.clone());
    let ctx = Arc::new(Ctx {
        audit: options.audit.clone(),
        meter: options.meter.clone(),
        d,
        task_type,
        handler,
        stats: stats.clone(),
        in_flight: Mutex::new(HashSet::new()),
        abandon: abandon_rx,
        lookups,
        handlers: (options.prefetch > 0).then(|| Arc::new(Semaphore::new(options.concurrency))),
    });
    let task = tokio::spawn(run(
        ctx,
        consumer,
        Pulls {
            sub: pulls,
            inbox,
            n: 0,
        },
        options,
        stop_rx,
    ));
    Ok(Worker {
        stop,
        abandon,
        task,
        stats,
    })
}

fn gate_active(d: &Dispatcher) -> bool {
    d.ensure_active().is_ok()
}

/// What a running task holds: a slot of this worker and, with a scheduler, one
/// of the tenant's task permits. Both are released on drop.
struct Slot {
    _local: OwnedSemaphorePermit,
    _task: Option<TaskGrant>,
}

/// Waits for the first slot: a local permit, then the tenant's task permit.
/// `Err(pause)`: the scheduler refused (suspended, queue full, timed out); try
/// again after `pause`.
async fn first_slot(
    slots: &Arc<Semaphore>,
    tenant: Option<&Arc<TenantScheduler>>,
) -> Result<Option<Slot>, Duration> {
    let Ok(local) = slots.clone().acquire_owned().await else {
        return Ok(None);
    };
    let task = match tenant {
        None => None,
        Some(t) => match t.acquire_task().await {
            Ok(p) => Some(p),
            Err(e) => {
                let pause = match e.kind() {
                    SchedulerErrorKind::Rejected(r) if r.reason == RejectReason::Suspended => {
                        Duration::from_millis(250)
                    }
                    SchedulerErrorKind::Rejected(r) => r
                        .retry_after
                        .unwrap_or(Duration::from_millis(50))
                        .clamp(Duration::from_millis(1), Duration::from_secs(1)),
                    _ => Duration::from_millis(250),
                };
                tracing::debug!(error = %e, "no task permit; pausing the pull");
                return Err(pause);
            }
        },
    };
    Ok(Some(Slot {
        _local: local,
        _task: task,
    }))
}

/// A further slot, only if both permits are free right now (the tenant's
/// cluster-wide slot is one KV write).
async fn try_slot(slots: &Arc<Semaphore>, tenant: Option<&Arc<TenantScheduler>>) -> Option<Slot> {
    let local = slots.clone().try_acquire_owned().ok()?;
    let task = match tenant {
        None => None,
        Some(t) => Some(t.try_acquire_task().await.ok()?),
    };
    Some(Slot {
        _local: local,
        _task: task,
    })
}

/// The worker's pull requests: one subscription, one reply subject per request.
struct Pulls {
    sub: async_nats::Subscriber,
    inbox: String,
    n: u64,
}

impl Pulls {
    /// Sends a pull request for `batch` messages; returns its reply subject.
    async fn request(
        &mut self,
        consumer: &consumer::Consumer<pull::Config>,
        batch: usize,
        expires: Duration,
    ) -> Result<String, DispatchError> {
        self.n += 1;
        let reply = format!("{}.{}", self.inbox, self.n);
        consumer
            .request_batch(
                pull::BatchConfig {
                    batch,
                    expires: Some(expires),
                    ..Default::default()
                },
                reply.clone().into(),
            )
            .await
            .map_err(|e| unavailable("pull request", e))?;
        Ok(reply)
    }

    /// The next task for request `reply` (or, late, for an earlier one), until
    /// `deadline`. `None`: nothing more is coming for it (its end status: 408
    /// expired, 409 refused or leadership change; the deadline; a closed inbox).
    async fn next(
        &mut self,
        ctx: &Ctx,
        reply: &str,
        deadline: tokio::time::Instant,
    ) -> Option<Message> {
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.sub.next()).await {
                Ok(Some(m)) => m,
                Ok(None) | Err(_) => return None,
            };
            match msg.status {
                None | Some(async_nats::StatusCode::OK) if msg.reply.is_some() => {
                    return Some(Message {
                        message: msg,
                        context: ctx.d.shared.js.clone(),
                    })
                }
                Some(async_nats::StatusCode::IDLE_HEARTBEAT) => {}
                // This request is over. The status of an earlier one is stale.
                _ if msg.subject.as_str() == reply => return None,
                _ => {}
            }
        }
    }
}

async fn run(
    ctx: Arc<Ctx>,
    consumer: consumer::Consumer<pull::Config>,
    mut pulls: Pulls,
    options: WorkerOptions,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(
        options.concurrency.saturating_add(options.prefetch),
    ));
    let tenant = ctx.d.shared.options.scheduler.clone();
    let mut running = JoinSet::new();
    let mut backoff = Duration::from_millis(100);
    while !*stop.borrow() {
        while running.try_join_next().is_some() {}
        if !gate_active(&ctx.d) {
            // Suspended: pull nothing; tasks stay queued.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let first = tokio::select! {
            p = first_slot(&slots, tenant.as_ref()) => match p {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(pause) => {
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stop.changed() => {}
                    }
                    continue;
                }
            },
            _ = stop.changed() => continue,
        };
        let mut permits: Vec<Slot> = vec![first];
        while let Some(p) = try_slot(&slots, tenant.as_ref()).await {
            permits.push(p);
        }
        let wanted = permits.len();
        let reply = match pulls
            .request(&consumer, wanted, options.fetch_expires)
            .await
        {
            Ok(r) => {
                ctx.stats.pull_requests.fetch_add(1, Ordering::Relaxed);
                backoff = Duration::from_millis(100);
                r
            }
            Err(e) => {
                tracing::debug!(error = %e, "task pull failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        // The server ends an unfilled request with a 408 when it expires; a
        // request lost with the connection ends at this deadline instead.
        let deadline = tokio::time::Instant::now() + options.fetch_expires + Duration::from_secs(2);
        let mut got = 0;
        // Read the pull to its end even when stopping: messages it delivers are
        // handed straight back, so none waits out its ack timer unseen.
        while got < wanted {
            let Some(msg) = pulls.next(&ctx, &reply, deadline).await else {
                break;
            };
            got += 1;
            let permit = if *stop.borrow() { None } else { permits.pop() };
            match permit {
                Some(p) => {
                    let ctx = ctx.clone();
                    running.spawn(async move { process(&ctx, msg, p).await });
                }
                None => {
                    let _ = msg.ack_with(AckKind::Nak(None)).await;
                }
            }
        }
    }
    while running.join_next().await.is_some() {}
}

/// Retries `f` with a growing pause, for about 30 s in all: long enough to ride
/// out a nats-server restart.
/// Runs `f` until it succeeds, holding `msg` with progress acks meanwhile (an
/// infrastructure outage is waited out, not blamed on the task). `None` if the
/// worker is told to stop first: the message is then handed back (Nak), which a
/// later delivery resumes. Pauses grow from 100 ms to 2 s; the first failure is
/// logged at warn, the rest at debug.
async fn hold_until_ok<T, E, F, Fut>(
    ctx: &Ctx,
    msg: &Message,
    progress_every: Duration,
    what: &str,
    mut f: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut pause = Duration::from_millis(100);
    let mut last_progress = tokio::time::Instant::now();
    let mut failures: u64 = 0;
    loop {
        match f().await {
            Ok(v) => {
                if failures > 0 {
                    tracing::info!(what, failures, "JetStream reachable again; task resumed");
                }
                return Some(v);
            }
            Err(e) => {
                if failures == 0 {
                    tracing::warn!(what, error = %e, "JetStream unavailable; holding the task and retrying");
                } else {
                    tracing::debug!(what, error = %e, failures, "still unavailable");
                }
                failures += 1;
                ctx.stats.outage_waits.fetch_add(1, Ordering::Relaxed);
            }
        }
        if *ctx.abandon.borrow() {
            settle(msg, AckKind::Nak(None)).await;
            return None;
        }
        if last_progress.elapsed() >= progress_every {
            settle(msg, AckKind::Progress).await;
            last_progress = tokio::time::Instant::now();
        }
        tokio::time::sleep(pause.min(progress_every)).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

async fn retry<T, E, F, Fut>(what: &str, mut f: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut pause = Duration::from_millis(100);
    let mut attempt = 0;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < 16 => {
                tracing::debug!(what, error = %e, attempt, "retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn settle(msg: &Message, kind: AckKind) {
    // Boxed: async-nats' ack future is large, and it would be part of every
    // task's future (moved on each spawn and poll) for an await that is rare.
    if let Err(e) = Box::pin(msg.ack_with(kind)).await {
        tracing::debug!(error = %e, ?kind, "ack failed; the server will redeliver");
    }
}

struct InFlight<'a> {
    ctx: &'a Ctx,
    id: MessageId,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.ctx.in_flight.lock() {
            s.remove(&self.id);
        }
    }
}

async fn process(ctx: &Ctx, msg: Message, _slot: Slot) {
    let d = &ctx.d;
    let opts = &d.shared.options;
    let delivered = msg
        .info()
        .map(|i| u64::try_from(i.delivered).unwrap_or(1).max(1))
        .unwrap_or(1);
    let subject = msg.subject.to_string();
    // On a stream with one copy per id the seal is bound to the subject
    // without its id token, and that token must name the sealed id: a task
    // moved to another id's subject is refused like a broken seal.
    let (sealed_for, named) = super::sealed_for(&subject, d.shared.per_id);
    let opened =
        match tenant_bus::envelope::open(&d.shared.ns.keys(), sealed_for, None, &msg.payload) {
            Ok((stamp, _)) if d.shared.per_id && named != Some(stamp.msg_id.to_hex().as_str()) => {
                Err(tenant_bus::verify::DropReason::Authentication)
            }
            other => other,
        };
    let (stamp, payload) = match opened {
        Ok(x) => x,
        Err(reason) => {
            ctx.stats.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(subject = %subject.escape_debug(), reason = reason.as_str(), "terminating a task that failed verification");
            settle(&msg, AckKind::Term).await;
            return;
        }
    };
    let now = now_ms();
    let skew = d.shared.ns.verifier().freshness().clock_skew().as_millis() as u64;
    if stamp.timestamp_ms > now.saturating_add(skew) {
        ctx.stats.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(task = %stamp.msg_id, "terminating a task stamped in the future");
        settle(&msg, AckKind::Term).await;
        return;
    }
    let id = stamp.msg_id;
    let hex = id.to_hex();
    let fresh = ctx
        .in_flight
        .lock()
        .map(|mut s| s.insert(id))
        .unwrap_or(false);
    if !fresh {
        // Another copy of this id is running here right now.
        ctx.stats.running_copies.fetch_add(1, Ordering::Relaxed);
        settle(&msg, AckKind::Nak(Some(Duration::from_secs(1)))).await;
        return;
    }
    let _guard = InFlight { ctx, id };

    // An outage (the done bucket, its leader, the server) is not the task's
    // failure: the task is held with progress acks while the lookup is retried, so
    // the outage neither counts as a delivery nor dead-letters a task that never ran.
    // The lookups of all tasks arriving together go out as one batched get.
    let progress_every = (opts.ack_wait / 3).max(Duration::from_millis(100));
    let done = match hold_until_ok(ctx, &msg, progress_every, "done lookup", || {
        ctx.lookups.get(&hex)
    })
    .await
    {
        Some(v) => v,
        None => return, // abandoned (the worker is stopping): handed back
    };
    // The revision the outcome record expects: 0 (no record), or that of a
    // record seen here and found not to be this task's outcome.
    let mut expect = 0;
    if let Some(record) = done {
        expect = record.revision;
        if record.live {
            // Any agent of the tenant may write the done bucket (workers are agents),
            // so a record is trusted only if it opens as this task's sealed outcome:
            // sealed under the tenant's key for this task's result subject. Garbage,
            // or another task's outcome copied under this id, would otherwise make
            // the task look finished without ever running.
            match d.open_result(&d.result_subject(&id), &record.value) {
                Ok(_) => {
                    Box::pin(already_done(ctx, &msg, &id, record.value)).await;
                    return;
                }
                Err(e) => {
                    ctx.stats.unverified_done.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(task = %id, error = %e, "ignoring a done record that fails verification; running the task");
                }
            }
        }
    }

    // A suspended tenant's tasks are held, not failed: keep the ack timer alive.
    let mut last_progress = tokio::time::Instant::now();
    while !gate_active(d) {
        if *ctx.abandon.borrow() {
            settle(&msg, AckKind::Nak(None)).await;
            return;
        }
        if last_progress.elapsed() >= progress_every {
            settle(&msg, AckKind::Progress).await;
            last_progress = tokio::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let task = Task {
        id,
        task_type: ctx.task_type.clone(),
        payload: payload.clone(),
        sender: stamp.sender.clone(),
        dispatched_at: UNIX_EPOCH + Duration::from_millis(stamp.timestamp_ms),
        delivery: delivered,
        max_deliveries: opts.max_deliveries,
    };
    let give_up = |reason: String| Box::pin(give_up(ctx, &msg, &task, reason, expect));

    let age = Duration::from_millis(now.saturating_sub(stamp.timestamp_ms));
    if age > opts.task_max_age {
        give_up(format!(
            "expired: queued {} s, longer than the task max age of {} s",
            age.as_secs(),
            opts.task_max_age.as_secs()
        ))
        .await;
        return;
    }
    if delivered > u64::from(opts.max_deliveries) {
        give_up(format!(
            "delivery limit of {} reached without an outcome (a worker stopped or timed out mid-task)",
            opts.max_deliveries
        ))
        .await;
        return;
    }

    // Pulled ahead (prefetch): wait for a handler, keeping the ack timer alive.
    let handler_slot = match &ctx.handlers {
        None => None,
        // A free handler: taken at once, no timer.
        Some(h) => match h.clone().try_acquire_owned() {
            Ok(p) if !*ctx.abandon.borrow() => Some(p),
            _ => match Box::pin(wait_for_handler(ctx, &msg, h, progress_every)).await {
                Some(p) => Some(p),
                None => return,
            },
        },
    };
    ctx.stats.runs.fetch_add(1, Ordering::Relaxed);
    let meter = |unit: &str| {
        if let Some(m) = &ctx.meter {
            m.add(ctx.d.shared.ns.tenant().as_str(), unit, 1);
        }
    };
    meter("tasks.run");
    let mut run = ctx.handler.handle(task.clone());
    // One timer for both the progress acks and the time limit, armed only if
    // the handler does not finish at its first poll (`biased`: the handler is
    // polled first).
    let limit_at = tokio::time::Instant::now() + opts.handler_timeout;
    let timer =
        tokio::time::sleep_until((tokio::time::Instant::now() + progress_every).min(limit_at));
    tokio::pin!(timer);
    let mut abandon = ctx.abandon.clone();
    let result = loop {
        tokio::select! {
            biased;
            r = &mut run => break Some(r),
            _ = &mut timer => {
                let now = tokio::time::Instant::now();
                if now >= limit_at {
                    break Some(Err(format!(
                        "handler timed out after {} ms", opts.handler_timeout.as_millis()
                    )));
                }
                settle(&msg, AckKind::Progress).await;
                timer.as_mut().reset((now + progress_every).min(limit_at));
            }
            changed = abandon.changed() => {
                if changed.is_err() || *abandon.borrow() { break None; }
            }
        }
    };
    let Some(result) = result else {
        settle(&msg, AckKind::Nak(None)).await;
        return;
    };
    // The handler is done: with prefetch, its handler slot goes to a task
    // pulled ahead while this outcome is recorded. The pull slot (and the
    // tenant's task permit) is held until the outcome is recorded, so at most
    // `concurrency + prefetch` tasks of a worker are ever between their
    // handler's end and their record.
    drop(handler_slot);
    match result {
        Ok(output) => {
            let outcome = TaskOutcome::Completed(output);
            // The record, ack, dead-letter and already-done futures are boxed:
            // inline they made every task's future 8.4 KB (release), held by
            // each task in hand, pulled ahead ones too; boxed it is 2.8 KB and
            // they take memory only while they run.
            match Box::pin(finish(ctx, &msg, &id, &outcome, expect)).await {
                Finished::Recorded => {
                    // A plain ack, not a confirmed one: the outcome is already durable
                    // in the done bucket, so a lost ack only means a redelivery, which
                    // finds the task done and acks it without running it again.
                    if retry("ack", || Box::pin(msg.ack())).await.is_err() {
                        tracing::debug!(task = %id, "ack not sent; a redelivery will find it done");
                    }
                    ctx.stats.completed.fetch_add(1, Ordering::Relaxed);
                    meter("tasks.completed");
                }
                Finished::AlreadyDone(stored) => {
                    Box::pin(already_done(ctx, &msg, &id, stored)).await
                }
                Finished::HandedBack => {}
            }
        }
        Err(reason) if delivered >= u64::from(opts.max_deliveries) => {
            meter("tasks.failed");
            give_up(reason).await
        }
        Err(reason) => {
            meter("tasks.failed");
            tracing::debug!(task = %id, delivered, %reason, "task attempt failed; retrying");
            ctx.stats.retried.fetch_add(1, Ordering::Relaxed);
            settle(&msg, AckKind::Nak(Some(opts.backoff_for(delivered)))).await;
        }
    }
}

/// Waits for a free handler for a task pulled ahead, keeping its ack timer
/// alive with progress acks. `None`: the worker is stopping (or the handler
/// slots are closed); the task was handed back (Nak).
async fn wait_for_handler(
    ctx: &Ctx,
    msg: &Message,
    handlers: &Arc<Semaphore>,
    progress_every: Duration,
) -> Option<OwnedSemaphorePermit> {
    let acquire = handlers.clone().acquire_owned();
    tokio::pin!(acquire);
    let mut abandon = ctx.abandon.clone();
    if *abandon.borrow_and_update() {
        settle(msg, AckKind::Nak(None)).await;
        return None;
    }
    loop {
        tokio::select! {
            p = &mut acquire => match p {
                Ok(p) => return Some(p),
                Err(_) => {
                    settle(msg, AckKind::Nak(None)).await;
                    return None;
                }
            },
            _ = tokio::time::sleep(progress_every) => settle(msg, AckKind::Progress).await,
            changed = abandon.changed() => {
                if changed.is_err() || *abandon.borrow() {
                    settle(msg, AckKind::Nak(None)).await;
                    return None;
                }
            }
        }
    }
}

/// Acks a delivery of a task whose sealed outcome `stored` is in the done
/// bucket, re-publishing that outcome to the requester; counts a duplicate.
async fn already_done(ctx: &Ctx, msg: &Message, id: &MessageId, stored: Bytes) {
    ctx.stats.duplicates.fetch_add(1, Ordering::Relaxed);
    let d = &ctx.d;
    let _ = d
        .shared
        .ns
        .nats()
        .publish(d.result_subject(id), stored)
        .await;
    settle(msg, AckKind::Ack).await;
}

/// How [`finish`] ended.
enum Finished {
    /// This outcome is the task's record, and was published (by the bucket's
    /// republish, or by the worker on a bucket without one).
    Recorded,
    /// Another copy of the task recorded its outcome first (sealed, verified):
    /// this one was not written.
    AlreadyDone(Bytes),
    /// Not recorded (the worker is stopping, or sealing failed): the message
    /// was handed back.
    HandedBack,
}

/// Records `outcome` (sealed, in the done bucket: one conditional write that
/// expects the key's revision to be `expect`, 0 for none) and publishes it to
/// the requester. If another copy recorded a genuine outcome first, that one
/// stays ([`Finished::AlreadyDone`]); a record that fails verification (or a
/// delete marker) is replaced, expecting its revision.
async fn finish(
    ctx: &Ctx,
    msg: &Message,
    id: &MessageId,
    outcome: &TaskOutcome,
    mut expect: u64,
) -> Finished {
    let d = &ctx.d;
    let subject = d.result_subject(id);
    let sealed = match d.shared.ns.sealer().seal(&subject, None, &outcome.encode()) {
        Ok((_, body)) => body,
        Err(e) => {
            tracing::warn!(task = %id, error = %e, "cannot seal the task outcome");
            settle(msg, AckKind::Nak(Some(Duration::from_secs(1)))).await;
            return Finished::HandedBack;
        }
    };
    let hex = id.to_hex();
    // Hold the task (progress acks) until the outcome is durable: an outage must
    // not turn a task that ran into a redelivery that counts against its limit.
    let progress_every = (d.shared.options.ack_wait / 3).max(Duration::from_millis(100));
    let mut seen = std::collections::HashSet::new();
    loop {
        let written = hold_until_ok(ctx, msg, progress_every, "done record", || {
            Box::pin(done::record(
                &d.shared.done,
                // Through the dispatcher's acknowledgement inbox, unless the
                // bucket is reached through a JetStream domain or API prefix
                // (then async-nats' KV client, which knows those).
                (!d.shared.done.use_jetstream_prefix).then_some(&d.shared.acks),
                &hex,
                sealed.clone(),
                expect,
            ))
        })
        .await;
        let Some(written) = written else {
            tracing::warn!(task = %id, "worker stopping before the outcome was recorded; handed back");
            return Finished::HandedBack;
        };
        let now = match written {
            done::Recorded::Written => break,
            done::Recorded::Conflict(now) => now,
        };
        match now {
            // Our own write, whose ack was lost and which was retried.
            Some(r) if r.live && r.value == sealed => break,
            Some(r) if r.live => {
                if d.open_result(&subject, &r.value).is_ok() {
                    return Finished::AlreadyDone(r.value);
                }
                // Written since our lookup and not this task's outcome: count it
                // once per record, and replace it.
                if seen.insert(r.revision) {
                    ctx.stats.unverified_done.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(task = %id, "replacing a done record that fails verification");
                }
                expect = r.revision;
            }
            Some(r) => expect = r.revision,
            None => expect = 0,
        }
    }
    // The bucket republished the write to the requester; an older bucket did
    // not. Best effort either way: a requester that misses it reads the bucket.
    if !d.shared.republishes {
        let _ = d.shared.ns.nats().publish(subject, sealed).await;
    }
    Finished::Recorded
}

/// Dead-letters the task with `reason`, records the outcome, terminates it.
async fn give_up(ctx: &Ctx, msg: &Message, task: &Task, reason: String, expect: u64) {
    let d = &ctx.d;
    let deliveries = u32::try_from(task.delivery).unwrap_or(u32::MAX);
    let letter = DeadLetter::new(
        task.id.to_hex(),
        task.task_type.to_string(),
        reason.clone(),
        deliveries,
        task.dispatched_at
            .duration_since(UNIX_EPOCH)
            .map(|t| t.as_millis() as u64)
            .unwrap_or(0),
        task.sender.as_ref().map(|s| s.to_string()),
        &task.payload,
    );
    let sealed_for = tenant_bus::subject::scope(
        d.shared.ns.tenant(),
        &format!("tasks.dead.{}", task.task_type),
    );
    let sealed = serde_json::to_vec(&letter)
        .map_err(|e| e.to_string())
        .and_then(|json| {
            d.shared
                .ns
                .sealer()
                .seal(&sealed_for, None, &json)
                .map_err(|e| e.to_string())
        });
    // One copy per id: one dead letter per task id, on its own subject.
    let subject = super::per_id_subject(sealed_for, d.shared.per_id, &task.id);
    let body = match sealed {
        Ok((_, body)) => body,
        Err(e) => {
            tracing::warn!(task = %task.id, error = %e, "cannot seal the dead letter");
            settle(msg, AckKind::Nak(Some(Duration::from_secs(1)))).await;
            return;
        }
    };
    if let Some(sink) = &ctx.audit {
        let event = agentbus_control::audit::sink::RuntimeEvent {
            tenant: d.shared.ns.tenant().to_string(),
            agent: d.shared.ns.agent().to_string(),
            action: "runtime.task_dead_letter".to_string(),
            resource: format!("task/{}", task.id.to_hex()),
            outcome: agentbus_control::audit::event::Outcome::Failed,
            reason: format!(
                "{} after {deliveries} deliveries: {}",
                task.task_type,
                reason.chars().take(256).collect::<String>()
            ),
            request_id: task.id.to_hex(),
        };
        if let Err(e) = sink.try_record(event) {
            tracing::warn!(task = %task.id, error = %e, "audit queue full: dead letter not recorded; handing the task back");
            settle(msg, AckKind::Nak(Some(Duration::from_secs(1)))).await;
            return;
        }
    }
    let dedupe = format!("dead-{}", task.id.to_hex());
    let published = retry("dead letter", || async {
        d.shared
            .js
            .send_publish(
                subject.clone(),
                async_nats::jetstream::message::PublishMessage::build()
                    .payload(body.clone())
                    .message_id(dedupe.clone()),
            )
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    if let Err(e) = published {
        tracing::warn!(task = %task.id, error = %e, "cannot publish the dead letter; handing it back");
        settle(msg, AckKind::Nak(Some(Duration::from_secs(1)))).await;
        return;
    }
    let outcome = TaskOutcome::DeadLettered { reason, deliveries };
    match finish(ctx, msg, &task.id, &outcome, expect).await {
        Finished::Recorded => {
            settle(msg, AckKind::Term).await;
            ctx.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            tracing::info!(task = %task.id, task_type = %task.task_type, deliveries, "task dead-lettered");
        }
        // Another copy finished meanwhile: its outcome stands (the dead letter
        // published above is then a stale one, kept for the record).
        Finished::AlreadyDone(stored) => already_done(ctx, msg, &task.id, stored).await,
        Finished::HandedBack => {}
    }
}
