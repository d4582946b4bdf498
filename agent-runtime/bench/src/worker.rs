//! The measurements, each run in its own process (`agentbus bench-worker ...`) so
//! that peak memory is per variant and one run's heap cannot slow the next. Each
//! prints one JSON line with its result on stdout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, ValueEnum};
use futures::StreamExt as _;
use tenant_bus::{AgentId, CredentialBundle, MasterSecret, NamespaceOptions, Subject, TenantId};

use super::stats::{peak_rss_kib, quantile, rss_kib};
use crate::BenchError;
use agent_runtime::scheduler::{Scheduler, SchedulerConfig};
use agentbus_control::tiers::{Quotas, Tier};

/// Raw async-nats or the namespaced, sealed bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum Mode {
    /// Plain async-nats.
    Raw,
    /// `TenantNamespace`: scoping, stamping, sealing, verification, admission.
    Sealed,
}

/// One measurement.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum WorkerCommand {
    /// Publish -> subscribe throughput.
    Throughput(ThroughputArgs),
    /// Request/reply latency.
    Latency(LatencyArgs),
    /// A receiver at full speed for a while, RSS sampled.
    Soak(SoakArgs),
    /// Admission cost and per-tenant memory with N tenants.
    Tenants(TenantsArgs),
    /// JetStream: raw publish + consume against task dispatch.
    Jetstream(JetstreamArgs),
    /// Connects of a raw client by `.creds` or by API key (auth callout).
    Logins(crate::logins::LoginsArgs),
    /// A raw client flooding above its tenant's rate until policing cuts it.
    Flood(crate::metering::FloodArgs),
}

/// Arguments of the JetStream measurement.
#[derive(Debug, Clone, Args)]
pub struct JetstreamArgs {
    /// Server URL (JetStream enabled).
    #[arg(long)]
    pub url: String,
    /// Raw JetStream or sealed task dispatch.
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Payload size in bytes.
    #[arg(long)]
    pub size: usize,
    /// Tasks (messages).
    #[arg(long)]
    pub count: u64,
    /// A distinct name for this run's stream, so runs do not share state.
    #[arg(long)]
    pub run: String,
    /// Replicas of the streams and buckets (3 on a three-node cluster).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Tasks the dispatch worker pulls ahead of its handlers (sealed mode).
    #[arg(long, default_value_t = JS_PREFETCH)]
    pub prefetch: usize,
    /// Raw mode only: before each ack, store a small outcome record under the
    /// message's sequence in a KV bucket with a conditional create (one
    /// durable write per task, what dispatch also pays): the floor of any
    /// consumer that records its outcomes, measured against plain raw.
    #[arg(long)]
    pub record_outcomes: bool,
    /// Sealed mode only: a task stream that admits one queued copy per task
    /// id (`DispatchOptions::one_copy_per_id`: a subject per task and a
    /// one-message-per-subject limit).
    #[arg(long)]
    pub one_copy_per_id: bool,
}

/// Arguments of the throughput measurement.
#[derive(Debug, Clone, Args)]
pub struct ThroughputArgs {
    /// Server URL.
    #[arg(long)]
    pub url: String,
    /// Raw or sealed.
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Payload size in bytes.
    #[arg(long)]
    pub size: usize,
    /// Messages to send.
    #[arg(long)]
    pub count: u64,
    /// Raw mode only: connect both clients with this issued agent's `.creds`
    /// file (an operator-mode server). A file, not an argument: argument lists
    /// are visible to every user of the machine. Default: no credentials.
    #[arg(long)]
    pub creds: Option<std::path::PathBuf>,
    /// Raw mode only: the tenant whose subjects are used
    /// (`tenant.<tenant>.load`).
    #[arg(long, default_value = "bench")]
    pub tenant: String,
}

/// Arguments of the latency measurement.
#[derive(Debug, Clone, Args)]
pub struct LatencyArgs {
    /// Server URL.
    #[arg(long)]
    pub url: String,
    /// Raw or sealed.
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Sequential round trips.
    #[arg(long)]
    pub count: u64,
}

/// Arguments of the soak measurement.
#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    /// Server URL.
    #[arg(long)]
    pub url: String,
    /// Raw or sealed.
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// How long to receive, in seconds.
    #[arg(long)]
    pub secs: u64,
}

/// Arguments of the tenants measurement.
#[derive(Debug, Clone, Args)]
pub struct TenantsArgs {
    /// Tenants to register.
    #[arg(long)]
    pub tenants: usize,
    /// Admission checks to time.
    #[arg(long)]
    pub checks: u64,
}

/// Runs one measurement and prints its JSON result line.
pub fn run(cmd: WorkerCommand) -> Result<(), BenchError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| BenchError(format!("runtime: {e}")))?;
    let value = rt.block_on(async move {
        match cmd {
            WorkerCommand::Throughput(a) => throughput(a).await,
            WorkerCommand::Latency(a) => latency(a).await,
            WorkerCommand::Soak(a) => soak(a).await,
            WorkerCommand::Tenants(a) => tenants(a).await,
            WorkerCommand::Jetstream(a) => jetstream(a).await,
            WorkerCommand::Logins(a) => crate::logins::measure(a).await,
            WorkerCommand::Flood(a) => crate::metering::flood(a).await,
        }
    })?;
    println!("{value}");
    Ok(())
}

fn fail(what: &str) -> impl FnOnce(String) -> BenchError + '_ {
    move |e| BenchError(format!("{what}: {e}"))
}

/// A bundle for the benchmark tenant on a server without auth.
pub fn bench_bundle(url: &str, agent: &str) -> Result<CredentialBundle, BenchError> {
    tenant_bundle(url, "bench", agent)
}

/// A bundle for agent `agent` of tenant `tenant` on a server without auth.
fn tenant_bundle(url: &str, tenant: &str, agent: &str) -> Result<CredentialBundle, BenchError> {
    let tenant = TenantId::new(tenant).map_err(|e| BenchError(e.to_string()))?;
    // A fixed secret: every worker process must derive the same tenant key.
    let master = MasterSecret::from_bytes(&[42u8; 32]).map_err(|e| BenchError(e.to_string()))?;
    Ok(CredentialBundle {
        url: url.to_string(),
        tenant: tenant.clone(),
        agent: AgentId::new(agent).map_err(|e| BenchError(e.to_string()))?,
        creds: None,
        keys: master
            .key_set(&tenant, [1], 1)
            .map_err(|e| BenchError(e.to_string()))?,
        placement: Default::default(),
    })
}

/// `tier`'s quotas with rate budgets far above any benchmark load, and a local
/// scheduler that leases them in large batches: every admission check then takes
/// the synchronous path a real tenant's publish takes, and none is refused.
fn unbounded(tier: Tier) -> (Quotas, Scheduler) {
    let mut quotas = Quotas::for_tier(tier);
    quotas.messages_per_window = u64::MAX / 4;
    quotas.bytes_per_window = u64::MAX / 4;
    // One window for the whole run: a window roll-over re-leases tokens, which is
    // measured separately (the scheduler's own tests and bench).
    quotas.window_ms = 3_600_000;
    let mut config = SchedulerConfig::default().instances(1);
    config.message_batch.max_batch = 1 << 27;
    config.byte_batch.max_batch = 1 << 40;
    (quotas, Scheduler::local(config))
}

/// Namespace options with admission on (see [`unbounded`]) and a subscription
/// buffer large enough for the flow-control window.
fn sealed_options() -> Result<NamespaceOptions, BenchError> {
    let (mut quotas, scheduler) = unbounded(Tier::Enterprise);
    quotas.max_message_bytes = 64 * 1024 * 1024;
    let tenant = TenantId::new("bench").map_err(|e| BenchError(e.to_string()))?;
    let ts = scheduler
        .tenant(&tenant, &quotas)
        .map_err(|e| BenchError(e.to_string()))?;
    Ok(NamespaceOptions::new()
        .subscription_capacity(1 << 20)
        .admission(ts.message_admission()))
}

async fn raw_client(url: &str) -> Result<async_nats::Client, BenchError> {
    RawTarget::bench().connect(url).await
}

/// Who a raw client connects as and which tenant's subjects it uses: the
/// benchmark tenant on a server without auth (every measurement but one), or
/// an operator-mode tenant with an issued agent's `.creds` (the metering
/// section's throughput).
#[derive(Debug, Clone)]
struct RawTarget {
    tenant: String,
    creds: Option<Arc<str>>,
}

impl RawTarget {
    /// `tenant.bench.*`, no credentials.
    fn bench() -> Self {
        Self {
            tenant: "bench".into(),
            creds: None,
        }
    }

    /// From the throughput arguments (reads the `.creds` file).
    fn from_args(a: &ThroughputArgs) -> Result<Self, BenchError> {
        let tenant = TenantId::new(&a.tenant).map_err(|e| BenchError(e.to_string()))?;
        if a.mode == Mode::Sealed && (a.creds.is_some() || tenant.as_str() != "bench") {
            // Sealed clients derive the benchmark tenant's keys locally; an
            // operator-mode tenant's keys come from its controller.
            return Err(BenchError(
                "--creds and --tenant are for raw mode only".into(),
            ));
        }
        let creds = match &a.creds {
            Some(path) => Some(Arc::from(
                std::fs::read_to_string(path)
                    .map_err(|e| BenchError(format!("reading {}: {e}", path.display())))?
                    .trim(),
            )),
            None => None,
        };
        Ok(Self {
            tenant: tenant.as_str().to_string(),
            creds,
        })
    }

    /// `tenant.<tenant>.<relative>` (leaked once per process: a benchmark
    /// worker publishes to one or two subjects).
    fn subject(&self, relative: &str) -> &'static str {
        Box::leak(format!("tenant.{}.{relative}", self.tenant).into_boxed_str())
    }

    async fn connect(&self, url: &str) -> Result<async_nats::Client, BenchError> {
        let opts = match &self.creds {
            None => async_nats::ConnectOptions::new(),
            // An agent may subscribe only under `tenant.<id>.>`, so its
            // inboxes (the barrier's probe) live there too.
            Some(creds) => async_nats::ConnectOptions::with_credentials(creds)
                .map_err(|e| BenchError(format!("creds: {e}")))?
                .custom_inbox_prefix(format!("tenant.{}._INBOX", self.tenant)),
        };
        // `url` may be a comma-separated list (a cluster).
        opts.subscription_capacity(1 << 20)
            .connect(url.split(',').map(str::trim).collect::<Vec<_>>())
            .await
            .map_err(|e| BenchError(format!("connect {url}: {e}")))
    }
}

/// Bytes the publisher may run ahead of the subscriber: closed-loop flow control,
/// the same for both modes, so neither drops messages nor measures a backlog.
const WINDOW_BYTES: u64 = 8 * 1024 * 1024;

/// The publishing side: a raw client or a namespace (which seals, stamps and
/// admits every message).
enum Publisher {
    Raw(async_nats::Client, &'static str),
    Sealed(tenant_bus::TenantNamespace, Subject),
}

impl Publisher {
    async fn connect(
        url: &str,
        mode: Mode,
        target: &RawTarget,
        relative: &'static str,
    ) -> Result<Self, BenchError> {
        Ok(match mode {
            Mode::Raw => Publisher::Raw(target.connect(url).await?, target.subject(relative)),
            Mode::Sealed => Publisher::Sealed(
                sealed_options()?
                    .connect(&bench_bundle(url, "publisher")?)
                    .await
                    .map_err(|e| fail("connect")(e.to_string()))?,
                Subject::new(relative).map_err(|e| BenchError(e.to_string()))?,
            ),
        })
    }

    async fn publish(&self, payload: &Bytes) -> Result<(), BenchError> {
        match self {
            Publisher::Raw(c, subject) => c
                .publish(*subject, payload.clone())
                .await
                .map_err(|e| fail("publish")(e.to_string())),
            Publisher::Sealed(ns, subject) => ns
                .publish(subject, payload)
                .await
                .map(|_| ())
                .map_err(|e| fail("publish")(e.to_string())),
        }
    }

    async fn flush(&self) -> Result<(), BenchError> {
        match self {
            Publisher::Raw(c, _) => c.flush().await.map_err(|e| fail("flush")(e.to_string())),
            Publisher::Sealed(ns, _) => ns.flush().await.map_err(|e| fail("flush")(e.to_string())),
        }
    }
}

/// What the subscriber thread shares with the publisher.
struct Progress {
    received: AtomicU64,
    /// Signalled every [`NOTIFY_EVERY`] messages, so a publisher held by the
    /// window wakes without spinning on the core the subscriber needs.
    advanced: tokio::sync::Notify,
    stop: std::sync::atomic::AtomicBool,
}

const NOTIFY_EVERY: u64 = 256;

/// Runs the subscriber on its own OS thread with its own current-thread runtime
/// and connection, as a separate agent would: counts (and, sealed, verifies) every
/// message until `count` or `stop`. Returns once the subscription is live; the
/// handle yields when the last message arrived and how many failed verification.
async fn spawn_reader(
    url: &str,
    mode: Mode,
    target: &RawTarget,
    relative: &'static str,
    count: u64,
    progress: Arc<Progress>,
) -> Result<std::thread::JoinHandle<Result<(Instant, u64), BenchError>>, BenchError> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), BenchError>>();
    let url = url.to_string();
    let target = target.clone();
    let handle = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| BenchError(format!("runtime: {e}")))?;
        rt.block_on(async move {
            let count_one = |progress: &Progress| {
                let n = progress.received.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_multiple_of(NOTIFY_EVERY) || n == count {
                    progress.advanced.notify_one();
                }
                n
            };
            let done =
                |progress: &Progress, n: u64| n >= count || progress.stop.load(Ordering::Relaxed);
            match mode {
                Mode::Raw => {
                    let client = match target.connect(&url).await {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send(Err(BenchError(e.0.clone())));
                            return Err(e);
                        }
                    };
                    let mut sub = client
                        .subscribe(target.subject(relative))
                        .await
                        .map_err(|e| fail("subscribe")(e.to_string()))?;
                    barrier(&client).await?;
                    let _ = ready_tx.send(Ok(()));
                    while let Some(m) = sub.next().await {
                        std::hint::black_box(&m.payload);
                        if done(&progress, count_one(&progress)) {
                            break;
                        }
                    }
                    Ok((Instant::now(), 0))
                }
                Mode::Sealed => {
                    let ns = match sealed_options()?
                        .connect(&bench_bundle(&url, "subscriber")?)
                        .await
                    {
                        Ok(ns) => ns,
                        Err(e) => {
                            let _ = ready_tx.send(Err(BenchError(e.to_string())));
                            return Err(BenchError(e.to_string()));
                        }
                    };
                    // Live at the server when subscribe returns.
                    let mut sub = ns
                        .subscribe(relative)
                        .await
                        .map_err(|e| fail("subscribe")(e.to_string()))?;
                    let _ = ready_tx.send(Ok(()));
                    // Every message is verified (tenant, subject, tag, freshness,
                    // replay) by the subscription before it is counted.
                    while let Some(m) = sub.next().await {
                        std::hint::black_box(&m.payload);
                        if done(&progress, count_one(&progress)) {
                            break;
                        }
                    }
                    Ok((Instant::now(), ns.counters().snapshot().dropped_total()))
                }
            }
        })
    });
    match ready_rx.await {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(e),
        Err(_) => match handle.join() {
            Ok(Err(e)) => Err(e),
            _ => Err(BenchError(
                "the subscriber thread ended before subscribing".into(),
            )),
        },
    }
}

/// How long the publisher waits for a subscriber that stopped advancing.
const STALL_LIMIT: Duration = Duration::from_secs(20);

/// Publishes `payload` until `count` messages or `stop`, never more than `window`
/// messages ahead of the subscriber.
async fn publish_loop(
    publisher: &Publisher,
    payload: &Bytes,
    count: u64,
    window: u64,
    progress: &Progress,
) -> Result<u64, BenchError> {
    let mut sent = 0u64;
    while sent < count && !progress.stop.load(Ordering::Relaxed) {
        let mut last = progress.received.load(Ordering::Relaxed);
        let mut since = std::time::Instant::now();
        while sent.saturating_sub(progress.received.load(Ordering::Relaxed)) > window {
            // Bounded wait: a missed notification costs at most 5 ms, never a hang.
            let _ =
                tokio::time::timeout(Duration::from_millis(5), progress.advanced.notified()).await;
            // A subscriber that stops advancing (messages lost or dropped) ends the
            // run with an error instead of a hang.
            if progress.stop.load(Ordering::Relaxed) {
                break;
            }
            let now = progress.received.load(Ordering::Relaxed);
            if now != last {
                last = now;
                since = std::time::Instant::now();
            } else if since.elapsed() > STALL_LIMIT {
                return Err(BenchError(format!(
                    "the subscriber stopped advancing: {} of {sent} messages received after {STALL_LIMIT:?}",
                    now
                )));
            }
        }
        if progress.stop.load(Ordering::Relaxed) {
            break;
        }
        publisher.publish(payload).await?;
        sent += 1;
    }
    publisher.flush().await?;
    Ok(sent)
}

/// Publish -> subscribe throughput: a publisher on this thread, the subscriber on
/// its own, both raw or both sealed; the time from the first publish to the last
/// message received.
async fn throughput(a: ThroughputArgs) -> Result<serde_json::Value, BenchError> {
    let payload = Bytes::from(vec![0x5au8; a.size]);
    let window = (WINDOW_BYTES / a.size.max(1) as u64).clamp(64, 100_000);
    let progress = Arc::new(Progress {
        received: AtomicU64::new(0),
        advanced: tokio::sync::Notify::new(),
        stop: std::sync::atomic::AtomicBool::new(false),
    });
    let target = RawTarget::from_args(&a)?;
    let publisher = Publisher::connect(&a.url, a.mode, &target, "load").await?;
    let reader = spawn_reader(&a.url, a.mode, &target, "load", a.count, progress.clone()).await?;
    let start = Instant::now();
    publish_loop(&publisher, &payload, a.count, window, &progress).await?;
    let (done, drops) = join_reader(reader, &progress).await?;
    if drops > 0 {
        return Err(BenchError(format!("{drops} messages failed verification")));
    }
    let secs = done.duration_since(start).as_secs_f64().max(1e-9);
    let got = progress.received.load(Ordering::Relaxed);
    Ok(serde_json::json!({
        "msgs_per_sec": got as f64 / secs,
        "mb_per_sec": got as f64 * a.size as f64 / secs / 1e6,
        "received": got,
        "peak_rss_kib": peak_rss_kib(),
    }))
}

/// Waits (at most 60 s) for the subscriber thread, stopping it if it lags.
async fn join_reader(
    reader: std::thread::JoinHandle<Result<(Instant, u64), BenchError>>,
    progress: &Progress,
) -> Result<(Instant, u64), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !reader.is_finished() {
        if Instant::now() > deadline {
            progress.stop.store(true, Ordering::Relaxed);
            return Err(BenchError(
                "the subscriber did not receive every message within 60 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    reader
        .join()
        .map_err(|_| BenchError("the subscriber thread panicked".into()))?
}

/// Receives 1 KiB messages published as fast as the subscriber takes them for
/// `secs`, sampling this process's RSS at 10 s (or a sixth of the run, if
/// shorter) and at the end. Publisher and subscriber are set up as in the
/// throughput measurement.
async fn soak(a: SoakArgs) -> Result<serde_json::Value, BenchError> {
    let payload = Bytes::from(vec![0x5au8; 1024]);
    let progress = Arc::new(Progress {
        received: AtomicU64::new(0),
        advanced: tokio::sync::Notify::new(),
        stop: std::sync::atomic::AtomicBool::new(false),
    });
    let duration = Duration::from_secs(a.secs.max(1));
    let early = Duration::from_secs(10).min(duration / 6);
    let target = RawTarget::bench();
    let publisher = Publisher::connect(&a.url, a.mode, &target, "soak").await?;
    let reader = spawn_reader(&a.url, a.mode, &target, "soak", u64::MAX, progress.clone()).await?;
    let start = Instant::now();
    let sampler = {
        let progress = progress.clone();
        tokio::spawn(async move {
            tokio::time::sleep(early).await;
            let sample = (rss_kib(), progress.received.load(Ordering::Relaxed));
            tokio::time::sleep(duration.saturating_sub(start.elapsed())).await;
            let end = rss_kib();
            progress.stop.store(true, Ordering::Relaxed);
            (sample, end)
        })
    };
    publish_loop(
        &publisher,
        &payload,
        u64::MAX,
        WINDOW_BYTES / 1024,
        &progress,
    )
    .await?;
    let secs = start.elapsed().as_secs_f64();
    let ((rss_early, received_early), rss_end) = sampler
        .await
        .map_err(|e| BenchError(format!("sampler: {e}")))?;
    // One more message wakes a subscriber waiting for the next.
    let _ = publisher.publish(&payload).await;
    let _ = publisher.flush().await;
    let (_, drops) = join_reader(reader, &progress).await?;
    if drops > 0 {
        return Err(BenchError(format!("{drops} messages failed verification")));
    }
    let got = progress.received.load(Ordering::Relaxed);
    Ok(serde_json::json!({
        "msgs_per_sec": got as f64 / secs,
        "rss_early_kib": rss_early,
        "early_secs": early.as_secs_f64(),
        "received_early": received_early,
        "rss_end_kib": rss_end,
        "peak_rss_kib": peak_rss_kib(),
    }))
}

/// A server round trip on `client`: after it, its subscriptions are live.
async fn barrier(client: &async_nats::Client) -> Result<(), BenchError> {
    let inbox = client.new_inbox();
    let mut probe = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| fail("barrier")(e.to_string()))?;
    client
        .publish(inbox, Bytes::new())
        .await
        .map_err(|e| fail("barrier")(e.to_string()))?;
    match tokio::time::timeout(Duration::from_secs(10), probe.next()).await {
        Ok(Some(_)) => Ok(()),
        _ => Err(BenchError("barrier probe not echoed".into())),
    }
}

async fn latency(a: LatencyArgs) -> Result<serde_json::Value, BenchError> {
    let payload = Bytes::from(vec![0x5au8; 128]);
    let mut samples = Vec::with_capacity(a.count as usize);
    let warmup = (a.count / 10).max(10);
    match a.mode {
        Mode::Raw => {
            let server = raw_client(&a.url).await?;
            let client = async_nats::ConnectOptions::new()
                .custom_inbox_prefix("tenant.bench._INBOX")
                .connect(&a.url)
                .await
                .map_err(|e| fail("connect")(e.to_string()))?;
            let mut sub = server
                .subscribe("tenant.bench.svc")
                .await
                .map_err(|e| fail("subscribe")(e.to_string()))?;
            barrier(&server).await?;
            let responder = server.clone();
            tokio::spawn(async move {
                while let Some(m) = sub.next().await {
                    if let Some(reply) = m.reply {
                        let _ = responder.publish(reply, m.payload).await;
                    }
                }
            });
            for i in 0..warmup + a.count {
                let t = Instant::now();
                client
                    .request("tenant.bench.svc", payload.clone())
                    .await
                    .map_err(|e| fail("request")(e.to_string()))?;
                if i >= warmup {
                    samples.push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
        }
        Mode::Sealed => {
            let server = sealed_options()?
                .connect(&bench_bundle(&a.url, "server")?)
                .await
                .map_err(|e| fail("connect")(e.to_string()))?;
            let client = sealed_options()?
                .connect(&bench_bundle(&a.url, "client")?)
                .await
                .map_err(|e| fail("connect")(e.to_string()))?;
            let subject = Subject::new("svc").map_err(|e| BenchError(e.to_string()))?;
            let mut sub = server
                .subscribe(&subject)
                .await
                .map_err(|e| fail("subscribe")(e.to_string()))?;
            let responder = server.clone();
            tokio::spawn(async move {
                while let Some(m) = sub.next().await {
                    let _ = responder.respond(&m, &m.payload).await;
                }
            });
            for i in 0..warmup + a.count {
                let t = Instant::now();
                client
                    .request(&subject, &payload)
                    .await
                    .map_err(|e| fail("request")(e.to_string()))?;
                if i >= warmup {
                    samples.push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
        }
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    Ok(serde_json::json!({
        "p50_us": quantile(&samples, 0.5),
        "p99_us": quantile(&samples, 0.99),
        "p999_us": quantile(&samples, 0.999),
        "peak_rss_kib": peak_rss_kib(),
    }))
}

/// Registers `tenants` idle tenants the way a runtime instance holds them (a
/// registry cache entry, a scheduler state, a key set) and times the message
/// admission check on one of them and round-robin over all.
async fn tenants(a: TenantsArgs) -> Result<serde_json::Value, BenchError> {
    use tenant_bus::admission::{Admission, Admit};
    let n = a.tenants.max(1);
    let master = MasterSecret::from_bytes(&[7u8; 32]).map_err(|e| BenchError(e.to_string()))?;
    let (quotas, scheduler) = unbounded(Tier::Pro);
    let ids: Vec<TenantId> = (0..n)
        .map(|i| TenantId::new(&format!("tenant-{i}")))
        .collect::<Result<_, _>>()
        .map_err(|e| BenchError(e.to_string()))?;

    // What a runtime instance holds per tenant: a registry cache entry, a
    // scheduler state and the tenant's key set.
    let record = |id: &TenantId| agentbus_control::registry::TenantRecord {
        tier: Tier::Pro,
        revision: 1,
        ..agentbus_control::registry::TenantRecord::empty(id.clone())
    };
    let err = |e: &dyn std::fmt::Display| BenchError(e.to_string());
    // The marginal memory of one more idle tenant while `n` exist: RSS growth over
    // PROBE more tenants (RSS moves in pages and allocator arenas, so a delta over a
    // handful of tenants would measure granularity, not tenants). Containers are
    // reserved up front so their one-off growth is not counted per tenant.
    const PROBE: usize = 20_000;
    let mut cache = std::collections::HashMap::with_capacity(n + PROBE);
    let mut keys = Vec::with_capacity(n + PROBE);
    let mut gates: Vec<Arc<dyn Admission>> = Vec::with_capacity(n + PROBE);
    for id in &ids {
        gates.push(
            scheduler
                .tenant(id, &quotas)
                .map_err(|e| err(&e))?
                .message_admission(),
        );
        keys.push(master.key_set(id, [1], 1).map_err(|e| err(&e))?);
        cache.insert(id.clone(), record(id));
    }
    let probe_ids: Vec<TenantId> = (0..PROBE)
        .map(|i| TenantId::new(&format!("probe-{i}")))
        .collect::<Result<_, _>>()
        .map_err(|e| err(&e))?;
    let r0 = rss_kib();
    for id in &probe_ids {
        gates.push(
            scheduler
                .tenant(id, &quotas)
                .map_err(|e| err(&e))?
                .message_admission(),
        );
    }
    let r1 = rss_kib();
    for id in &probe_ids {
        keys.push(master.key_set(id, [1], 1).map_err(|e| err(&e))?);
    }
    let r2 = rss_kib();
    for id in &probe_ids {
        cache.insert(id.clone(), record(id));
    }
    let r3 = rss_kib();
    let per = |a: u64, b: u64| (b.saturating_sub(a) as f64 * 1024.0) / PROBE as f64;
    // The cache's entries live inline in its pre-reserved table (at most 8/7 of a
    // slot per entry at hashbrown's load factor), so RSS growth shows only their
    // heap parts: add the inline size.
    let entry = std::mem::size_of::<(TenantId, agentbus_control::registry::TenantRecord)>() as f64
        * 8.0
        / 7.0;
    let registry_bytes = per(r2, r3) + entry;
    let gates = &gates[..n];
    // Warm every gate once (first use leases the batch).
    for g in gates {
        if let Admit::Wait(f) = g.admit_message(128) {
            f.await.map_err(|r| BenchError(r.to_string()))?;
        }
    }
    let one = gates[n / 2].clone();
    let checks = a.checks.max(1);
    let t = Instant::now();
    for _ in 0..checks {
        match one.admit_message(std::hint::black_box(128)) {
            Admit::Now => {}
            _ => return Err(BenchError("admission left the synchronous path".into())),
        }
    }
    let one_ns = t.elapsed().as_nanos() as f64 / checks as f64;
    let t = Instant::now();
    for i in 0..checks {
        match gates[(i as usize) % n].admit_message(std::hint::black_box(128)) {
            Admit::Now => {}
            _ => return Err(BenchError("admission left the synchronous path".into())),
        }
    }
    let rr_ns = t.elapsed().as_nanos() as f64 / checks as f64;
    std::hint::black_box((&cache, &keys));
    Ok(serde_json::json!({
        "one_tenant_ns": one_ns,
        "round_robin_ns": rr_ns,
        "bytes_per_tenant": per(r0, r2) + registry_bytes,
        "scheduler_bytes": per(r0, r1),
        "keys_bytes": per(r1, r2),
        "registry_bytes": registry_bytes,
        "peak_rss_kib": peak_rss_kib(),
    }))
}

/// Publish acks in flight at once, for both modes (the perf baseline's window).
const JS_WINDOW: usize = 1024;
/// Tasks worked at once, for both modes.
const JS_CONCURRENCY: usize = 64;
/// Tasks the dispatch worker pulls ahead of its 64 handlers: 512 in hand at
/// most, against the raw consumer's up to 4,096 unacked (its max_ack_pending).
/// Measured on one node: prefetch 64 gave 23k tasks/s, 192 gave 29k, 448
/// 31-34k and 960 no more; deeper pulls also cost the server less per task.
const JS_PREFETCH: usize = 448;

/// Publishes `count` messages into a work-queue stream with up to [`JS_WINDOW`]
/// acks in flight, then consumes and acks them all; reports both phases.
/// Sealed mode does the same through `Dispatcher::seal`/`send` (the stream acks
/// awaited in the same window) and a dispatch `Worker` (open and verify,
/// idempotency check in the done bucket batched across the tasks in hand,
/// handler, sealed outcome stored with one conditional write, ack).
async fn jetstream(a: JetstreamArgs) -> Result<serde_json::Value, BenchError> {
    use async_nats::jetstream::{self, consumer, stream};
    use futures::stream::FuturesUnordered;

    let payload = Bytes::from(vec![0x5au8; a.size]);
    let count = a.count;
    let publish_secs;
    let consume_secs;
    // This process's CPU while consuming (on 2 shared cores, what the client
    // burns the server cannot use), and for dispatch the server requests a
    // task costs beside its delivery, ack and outcome write.
    let consume_cpu_secs;
    let mut per_task = serde_json::Value::Null;
    if a.one_copy_per_id && matches!(a.mode, Mode::Raw) {
        return Err(BenchError(
            "--one-copy-per-id is for sealed mode (a dispatch stream setting)".into(),
        ));
    }
    match a.mode {
        Mode::Raw => {
            let client = raw_client(&a.url).await?;
            let js = jetstream::new(client);
            let name = format!("RAW_{}", a.run);
            let subject = format!("tenant.bench.raw{}.tasks", a.run);
            let stream = js
                .create_stream(stream::Config {
                    name: name.clone(),
                    subjects: vec![subject.clone()],
                    retention: stream::RetentionPolicy::WorkQueue,
                    storage: stream::StorageType::File,
                    num_replicas: a.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| fail("create stream")(e.to_string()))?;
            let t = Instant::now();
            let mut acks = FuturesUnordered::new();
            for i in 0..count {
                if acks.len() >= JS_WINDOW {
                    if let Some(r) = acks.next().await {
                        let r: Result<(), async_nats::jetstream::context::PublishError> = r;
                        r.map_err(|e| fail("ack")(e.to_string()))?;
                    }
                }
                let ack = js
                    .send_publish(
                        subject.clone(),
                        jetstream::message::PublishMessage::build()
                            .payload(payload.clone())
                            .message_id(format!("{}-{i}", a.run)),
                    )
                    .await
                    .map_err(|e| fail("publish")(e.to_string()))?;
                acks.push(async move { ack.await.map(|_| ()) });
            }
            while let Some(r) = acks.next().await {
                r.map_err(|e| fail("ack")(e.to_string()))?;
            }
            publish_secs = t.elapsed().as_secs_f64();
            let consumer = stream
                .create_consumer(consumer::pull::Config {
                    durable_name: Some("work".into()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    max_ack_pending: JS_WINDOW as i64 * 4,
                    ..Default::default()
                })
                .await
                .map_err(|e| fail("consumer")(e.to_string()))?;
            let outcomes = if a.record_outcomes {
                Some(
                    js.create_key_value(jetstream::kv::Config {
                        bucket: format!("RAWDONE_{}", a.run),
                        num_replicas: a.replicas,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| fail("outcome bucket")(e.to_string()))?,
                )
            } else {
                None
            };
            // Recording, as many tasks in hand as a dispatch worker holds
            // (its handlers and the tasks pulled ahead).
            let window = if outcomes.is_some() {
                JS_CONCURRENCY + JS_PREFETCH
            } else {
                JS_CONCURRENCY
            };
            let t = Instant::now();
            let cpu = crate::stats::cpu_secs();
            let mut messages = consumer
                .messages()
                .await
                .map_err(|e| fail("consume")(e.to_string()))?;
            let mut done = 0u64;
            let mut acking = FuturesUnordered::new();
            while done < count {
                let m = tokio::time::timeout(Duration::from_secs(30), messages.next())
                    .await
                    .map_err(|_| BenchError("raw consumer stalled".into()))?
                    .ok_or_else(|| BenchError("raw consumer ended".into()))?
                    .map_err(|e| fail("message")(e.to_string()))?;
                std::hint::black_box(&m.payload);
                // The same work per task as a dispatch handler here: none, then
                // (with --record-outcomes) a durable record, then ack.
                let record = outcomes.clone().map(|kv| {
                    let key = m.info().map(|i| i.stream_sequence).unwrap_or(done);
                    async move {
                        kv.create(key.to_string(), Bytes::from_static(b"done"))
                            .await
                            .map(|_| ())
                    }
                });
                acking.push(async move {
                    if let Some(record) = record {
                        record.await.map_err(|e| e.to_string())?;
                    }
                    m.ack().await.map_err(|e| e.to_string())
                });
                if acking.len() >= window {
                    if let Some(r) = acking.next().await {
                        r.map_err(fail("ack"))?;
                    }
                }
                done += 1;
            }
            while let Some(r) = acking.next().await {
                r.map_err(fail("ack"))?;
            }
            consume_secs = t.elapsed().as_secs_f64();
            consume_cpu_secs = crate::stats::cpu_secs() - cpu;
            let _ = js.delete_stream(&name).await;
            if outcomes.is_some() {
                let _ = js.delete_key_value(format!("RAWDONE_{}", a.run)).await;
            }
        }
        Mode::Sealed if a.record_outcomes => {
            return Err(BenchError(
                "--record-outcomes is for raw mode (dispatch always records)".into(),
            ))
        }
        Mode::Sealed => {
            use agent_runtime::dispatch::{DispatchOptions, Dispatcher, Task, WorkerOptions};
            // A tenant of its own per run: a tenant's task stream owns its subjects.
            let ns = sealed_options()?
                .connect(&tenant_bundle(
                    &a.url,
                    &format!("js-{}", a.run),
                    "dispatcher",
                )?)
                .await
                .map_err(|e| fail("connect")(e.to_string()))?;
            let dispatcher = Dispatcher::new(
                &ns,
                DispatchOptions::new()
                    .stream(&format!("TASKS_{}", a.run))
                    .done_bucket(&format!("DONE_{}", a.run))
                    .replicas(a.replicas)
                    .one_copy_per_id(a.one_copy_per_id),
            )
            .await
            .map_err(|e| fail("dispatcher")(e.to_string()))?;
            let t = Instant::now();
            let mut acks = FuturesUnordered::new();
            for _ in 0..count {
                if acks.len() >= JS_WINDOW {
                    if let Some(r) = acks.next().await {
                        let r: Result<(), agent_runtime::dispatch::DispatchError> = r;
                        r.map_err(|e| fail("submit")(e.to_string()))?;
                    }
                }
                let task = dispatcher
                    .seal("load", &payload)
                    .map_err(|e| fail("seal")(e.to_string()))?;
                // Sent now, ack awaited in the window: as the raw publisher does.
                let ack = dispatcher
                    .send(&task)
                    .await
                    .map_err(|e| fail("submit")(e.to_string()))?;
                acks.push(async move { ack.ack().await.map(|_| ()) });
            }
            while let Some(r) = acks.next().await {
                r.map_err(|e| fail("submit")(e.to_string()))?;
            }
            publish_secs = t.elapsed().as_secs_f64();
            drop(acks);
            let t = Instant::now();
            let cpu = crate::stats::cpu_secs();
            let worker = dispatcher
                .worker(
                    "load",
                    |task: Task| async move {
                        std::hint::black_box(&task.payload);
                        Ok::<Bytes, String>(Bytes::new())
                    },
                    // 64 handlers and up to `a.prefetch` tasks pulled ahead
                    // of them (see JS_PREFETCH).
                    WorkerOptions::new()
                        .concurrency(JS_CONCURRENCY)
                        .prefetch(a.prefetch),
                )
                .await
                .map_err(|e| fail("worker")(e.to_string()))?;
            let deadline = Instant::now() + Duration::from_secs(120);
            while worker.stats().completed() < count {
                if Instant::now() > deadline {
                    return Err(BenchError(format!(
                        "dispatch worker completed {} of {count} within 120 s",
                        worker.stats().completed()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            consume_secs = t.elapsed().as_secs_f64();
            consume_cpu_secs = crate::stats::cpu_secs() - cpu;
            let stats = worker.stats();
            let tasks = stats.completed().max(1) as f64;
            per_task = serde_json::json!({
                "pull_requests": stats.pull_requests() as f64 / tasks,
                "lookup_requests": stats.lookup_requests() as f64 / tasks,
            });
            worker.abort();
            let js = jetstream::new(ns.nats().clone());
            let _ = js.delete_stream(format!("TASKS_{}", a.run)).await;
            let _ = js.delete_key_value(format!("DONE_{}", a.run)).await;
        }
    }
    let n = count as f64;
    Ok(serde_json::json!({
        "publish_per_sec": n / publish_secs.max(1e-9),
        "consume_per_sec": n / consume_secs.max(1e-9),
        "end_to_end_per_sec": n / (publish_secs + consume_secs).max(1e-9),
        "consume_client_cpu_us_per_task": consume_cpu_secs * 1e6 / n.max(1.0),
        "consume_requests_per_task": per_task,
        "peak_rss_kib": peak_rss_kib(),
    }))
}
