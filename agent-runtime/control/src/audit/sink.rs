//! The runtime's way into the audit log: a bounded queue in the runtime
//! process, drained in batches to the controller's append endpoint
//! ([`crate::api::AUDIT_APPEND_SUBJECT`], platform account only: tenant
//! accounts do not import it, so no tenant can write to any log).
//!
//! # Never blocks, never silently drops
//! [`AuditSink::try_record`] takes an event or refuses it at once. The queue is
//! bounded in events and in bytes ([`AuditSinkOptions`]); at the bound the
//! event is refused with [`SinkErrorKind::Full`] and counted, and the caller
//! refuses the action the event would have recorded (the runtime refuses the
//! tool call, hands a task back instead of dead-lettering it). A denial whose
//! event does not fit is still a denial. While the controller is unreachable
//! the drain retries the batch in hand (backoff 100 ms to 5 s) and the queue
//! fills: the runtime then fails closed on audited actions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// A security decision of the runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeEvent {
    /// The tenant (its log).
    pub tenant: String,
    /// The agent that acted (the actor).
    pub agent: String,
    /// `runtime.permission_denied`, `runtime.tool_call` or
    /// `runtime.task_dead_letter` ([`RUNTIME_ACTIONS`]).
    pub action: String,
    /// What it acted on (`tool/search`, `task/<id>`, `<kind>/<name>`).
    pub resource: String,
    /// `allowed`, `denied` or `failed`.
    pub outcome: super::event::Outcome,
    /// Why, or the tool arguments' SHA-256 (never the arguments).
    pub reason: String,
    /// The task or request id, if any.
    #[serde(default)]
    pub request_id: String,
}

/// The actions the runtime may append.
pub const RUNTIME_ACTIONS: [&str; 3] = [
    "runtime.permission_denied",
    "runtime.tool_call",
    "runtime.task_dead_letter",
];

/// The longest text field of a runtime event the controller takes.
pub const MAX_FIELD: usize = 512;

/// A batch on the append endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuntimeBatch {
    /// The events, in order.
    pub events: Vec<RuntimeEvent>,
}

/// The controller's answer to a batch.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct BatchAnswer {
    /// Events appended.
    pub appended: u64,
    /// Events refused as invalid (bad tenant, action or field), not retried.
    pub rejected: u64,
}

/// Why an event was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SinkErrorKind {
    /// The queue is at its event or byte bound: refuse the audited action.
    Full,
    /// The sink's drain task is gone (the runtime is shutting down).
    Closed,
}

tenant_bus::kind_display!(SinkErrorKind {
    Full => "audit queue full",
    Closed => "audit sink closed",
});

/// An error of [`AuditSink::try_record`].
pub type SinkError = tenant_bus::error::Error<SinkErrorKind>;

/// Bounds and batching of an [`AuditSink`].
#[derive(Debug, Clone)]
pub struct AuditSinkOptions {
    max_events: usize,
    max_bytes: u64,
    batch_bytes: usize,
}

impl Default for AuditSinkOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl AuditSinkOptions {
    /// 10,000 events, 8 MiB, batches of up to 48 KiB.
    pub fn new() -> Self {
        Self {
            max_events: 10_000,
            max_bytes: 8 * 1024 * 1024,
            batch_bytes: 48 * 1024,
        }
    }

    /// The most events queued (at least 1).
    pub fn max_events(mut self, n: usize) -> Self {
        self.max_events = n.max(1);
        self
    }

    /// The most bytes queued (events' text fields plus 128 each).
    pub fn max_bytes(mut self, n: u64) -> Self {
        self.max_bytes = n.max(1);
        self
    }
}

/// The sink's counters.
#[derive(Debug, Default)]
pub struct SinkCounters {
    queued: AtomicU64,
    appended: AtomicU64,
    rejected: AtomicU64,
    refused_full: AtomicU64,
    send_failures: AtomicU64,
}

impl SinkCounters {
    /// Events taken into the queue.
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }
    /// Events the controller appended.
    pub fn appended(&self) -> u64 {
        self.appended.load(Ordering::Relaxed)
    }
    /// Events the controller refused as invalid.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }
    /// Events refused at the bound (each one an action refused).
    pub fn refused_full(&self) -> u64 {
        self.refused_full.load(Ordering::Relaxed)
    }
    /// Batches that failed to reach the controller and were retried.
    pub fn send_failures(&self) -> u64 {
        self.send_failures.load(Ordering::Relaxed)
    }
}

/// What an event costs against the byte bound.
fn cost(e: &RuntimeEvent) -> u64 {
    (e.tenant.len()
        + e.agent.len()
        + e.action.len()
        + e.resource.len()
        + e.reason.len()
        + e.request_id.len()
        + 128) as u64
}

/// A bounded, non-blocking queue of runtime audit events and the task that
/// drains it. Dropping the sink stops the task (queued events are lost; call
/// [`AuditSink::flush`] first on a clean shutdown).
#[derive(Debug)]
pub struct AuditSink {
    tx: mpsc::Sender<(RuntimeEvent, u64)>,
    held: Arc<AtomicU64>,
    counters: Arc<SinkCounters>,
    max_bytes: u64,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AuditSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AuditSink {
    /// A sink appending through `client` (a platform-account connection, as
    /// the runtime's registry watcher uses).
    pub fn new(client: async_nats::Client, options: AuditSinkOptions) -> Self {
        let (tx, rx) = mpsc::channel(options.max_events);
        let held = Arc::new(AtomicU64::new(0));
        let counters = Arc::new(SinkCounters::default());
        let task = tokio::spawn(drain(
            client,
            rx,
            held.clone(),
            counters.clone(),
            options.batch_bytes,
        ));
        Self {
            tx,
            held,
            counters,
            max_bytes: options.max_bytes,
            task,
        }
    }

    /// Queues `event`, or refuses it at once at the bound.
    pub fn try_record(&self, event: RuntimeEvent) -> Result<(), SinkError> {
        let n = cost(&event);
        let mut current = self.held.load(Ordering::Relaxed);
        loop {
            if current.saturating_add(n) > self.max_bytes {
                self.counters.refused_full.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("agentbus_audit_sink_refused_total").increment(1);
                return Err(SinkError::new(SinkErrorKind::Full, "bytes"));
            }
            match self.held.compare_exchange_weak(
                current,
                current + n,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => current = now,
            }
        }
        match self.tx.try_send((event, n)) {
            Ok(()) => {
                self.counters.queued.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.held.fetch_sub(n, Ordering::AcqRel);
                match e {
                    mpsc::error::TrySendError::Full(_) => {
                        self.counters.refused_full.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("agentbus_audit_sink_refused_total").increment(1);
                        Err(SinkError::new(SinkErrorKind::Full, "events"))
                    }
                    mpsc::error::TrySendError::Closed(_) => {
                        Err(SinkError::new(SinkErrorKind::Closed, ""))
                    }
                }
            }
        }
    }

    /// The counters.
    pub fn counters(&self) -> &SinkCounters {
        &self.counters
    }

    /// Bytes queued now.
    pub fn held_bytes(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Waits until everything queued so far was appended or rejected, at most
    /// `timeout`; whether it got there.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let target = self.counters.queued();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.counters.appended() + self.counters.rejected() >= target {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn drain(
    client: async_nats::Client,
    mut rx: mpsc::Receiver<(RuntimeEvent, u64)>,
    held: Arc<AtomicU64>,
    counters: Arc<SinkCounters>,
    batch_bytes: usize,
) {
    let mut batch: Vec<RuntimeEvent> = Vec::new();
    let mut bytes: u64 = 0;
    loop {
        if batch.is_empty() {
            match rx.recv().await {
                Some((e, n)) => {
                    batch.push(e);
                    bytes += n;
                }
                None => return,
            }
        }
        while bytes < batch_bytes as u64 {
            match rx.try_recv() {
                Ok((e, n)) => {
                    batch.push(e);
                    bytes += n;
                }
                Err(_) => break,
            }
        }
        let count = batch.len() as u64;
        let body = match serde_json::to_vec(&RuntimeBatch { events: batch }) {
            Ok(b) => b,
            Err(e) => {
                // Cannot happen for these types; never loop on it.
                tracing::error!(error = %e, "audit batch not encodable; dropped");
                batch = Vec::new();
                held.fetch_sub(bytes, Ordering::AcqRel);
                bytes = 0;
                continue;
            }
        };
        let mut backoff = Duration::from_millis(100);
        let answer = loop {
            match send(&client, &body, count).await {
                Ok(a) => break a,
                Err(e) => {
                    counters.send_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, retry_in = ?backoff, "audit batch not appended; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        counters
            .appended
            .fetch_add(answer.appended, Ordering::Relaxed);
        counters
            .rejected
            .fetch_add(answer.rejected, Ordering::Relaxed);
        held.fetch_sub(bytes, Ordering::AcqRel);
        bytes = 0;
        batch = Vec::new();
    }
}

/// One batch to the controller. An outage is an error (the batch is
/// retried); a refusal of the batch as such counts its events as rejected.
async fn send(client: &async_nats::Client, body: &[u8], count: u64) -> Result<BatchAnswer, String> {
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        client.request(crate::api::AUDIT_APPEND_SUBJECT, body.to_vec().into()),
    )
    .await
    .map_err(|_| "the controller did not answer".to_string())?
    .map_err(|e| e.to_string())?;
    match serde_json::from_slice::<crate::api::Response<BatchAnswer>>(&reply.payload) {
        Ok(crate::api::Response::Ok(a)) => Ok(a),
        Ok(crate::api::Response::Error(e)) if e.code == crate::api::ErrorCode::Unavailable => {
            Err(format!("{}: {}", e.code, e.message))
        }
        Ok(crate::api::Response::Error(e)) => {
            tracing::error!(code = %e.code, message = %e.message, events = count, "the controller refused an audit batch");
            Ok(BatchAnswer {
                appended: 0,
                rejected: count,
            })
        }
        Err(e) => Err(format!("answer: {e}")),
    }
}
