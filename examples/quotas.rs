//! Quotas in action: a noisy tenant offering ten times its message quota, and a
//! quiet free-tier tenant sharing the same workers, on a local JetStream
//! nats-server.
//!
//! - Both tenants publish tasks through their own namespace, connected with their
//!   `TenantScheduler`'s message admission (the rate windows are leased from the
//!   scheduler's JetStream key-value ledger, as in a cluster).
//! - The noisy tenant (the free tier with `messages_per_window` overridden to
//!   100 per 1 s window, a tenth of the tier's 1,000, so the demo stays short)
//!   tries 1,000 messages a second; the admission holds it to 100 per window and
//!   refuses the rest with a retry-after (the time left in the window).
//! - The runtime side feeds every admitted task into one `FairPool`, served by
//!   two shared workers (8 ms per task). Each window's burst of 100 noisy tasks is
//!   400 ms of work; a quiet task arriving behind it is served after about one
//!   task, not after the burst.
//!
//! Prints one line per second (one rate window), then a summary line, `QUOTAS OK`
//! or `QUOTAS FAILED` (exit code 1).
//!
//! Run: `cargo run -p agentbus-examples --example quotas`
//! (needs nats-server: `scripts/install-nats-server.sh`, `NATS_SERVER_BIN` or PATH).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent_runtime::scheduler::{
    FairPool, FairQueueLimits, KvLedger, RateBucket, Scheduler, SchedulerConfig, SlotBucket,
    TenantScheduler,
};
use agent_runtime::tiers::{Quotas, Tier};
use agentbus_control::local_server::{LocalServer, ServerOptions};
use futures::StreamExt as _;
use tenant_bus::admission::RejectReason;
use tenant_bus::namespace::PublishErrorKind;
use tenant_bus::{AgentId, CredentialBundle, MasterSecret, NamespaceOptions, TenantNamespace};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The noisy tenant's messages per 1 s window: an override of the free tier's
/// 1,000, so the demo's bursts stay short.
const NOISY_CAP: u64 = 100;
/// Seconds of load.
const SECONDS: u64 = 5;
/// What one task costs a shared worker.
const TASK: Duration = Duration::from_millis(8);
/// Shared workers.
const WORKERS: usize = 2;
/// The quiet tenant publishes a task every this.
const QUIET_EVERY: Duration = Duration::from_millis(50);
/// The latency every quiet task must stay within for `QUOTAS OK`.
const QUIET_BOUND: Duration = Duration::from_millis(150);

#[tokio::main]
async fn main() {
    match run().await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("quotas: {e}");
            std::process::exit(1);
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One window's noisy counts.
#[derive(Debug, Default, Clone)]
struct NoisyWindow {
    offered: u64,
    admitted: u64,
    refused: u64,
    without_hint: u64,
    retry_min: Option<Duration>,
    retry_max: Option<Duration>,
}

/// One window's quiet latencies, and noisy tasks run.
#[derive(Debug, Default, Clone)]
struct Served {
    quiet: Vec<Duration>,
    noisy: u64,
}

async fn connect(
    tenant: &TenantScheduler,
    url: &str,
    master: &MasterSecret,
    agent: &str,
) -> Result<TenantNamespace> {
    let bundle = CredentialBundle {
        url: url.to_string(),
        tenant: tenant.id().clone(),
        agent: AgentId::new(agent)?,
        creds: None,
        keys: master.key_set(tenant.id(), [1], 1)?,
        placement: Default::default(),
    };
    // Every publish of this namespace passes the tenant's admission.
    Ok(tenant.connect(&bundle, NamespaceOptions::new()).await?)
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[(sorted.len() - 1) * p / 100]
}

async fn run() -> Result<bool> {
    let server = LocalServer::start(ServerOptions::new().jetstream(true))?;
    let url = server.url();
    let client = async_nats::connect(url.as_str()).await?;
    let js = async_nats::jetstream::new(client);
    let scheduler = Scheduler::connect(
        &js,
        SchedulerConfig::default(),
        &RateBucket::default(),
        &SlotBucket::default(),
    )
    .await?;
    let mut noisy_quotas = Quotas::for_tier(Tier::Free);
    noisy_quotas.messages_per_window = NOISY_CAP;
    noisy_quotas.window_ms = 1_000;
    let noisy = scheduler.tenant(&"noisy".parse_tenant()?, &noisy_quotas)?;
    let quiet = scheduler.tenant(&"quiet".parse_tenant()?, &Quotas::for_tier(Tier::Free))?;
    println!("nats-server with JetStream at {url}");
    println!(
        "noisy: free tier with messages_per_window overridden to {NOISY_CAP} per 1 s window, offering {} a second (10x)",
        NOISY_CAP * 10
    );
    println!(
        "quiet: free tier, one task every {} ms; {WORKERS} shared workers, {} ms per task, fair queueing",
        ms(QUIET_EVERY),
        ms(TASK)
    );

    let master = MasterSecret::generate()?;
    let epoch = Instant::now();

    // Runtime side: admitted tasks of both tenants go into one fair pool.
    let pool = Arc::new(FairPool::<u64>::new(FairQueueLimits {
        per_tenant: 10_000,
        total: 20_000,
    }));
    let mut feeders = Vec::new();
    for t in [&noisy, &quiet] {
        let ns = connect(t, &url, &master, "runtime").await?;
        let mut sub = ns.subscribe("tasks.work").await?;
        ns.sync().await?;
        let (pool, t) = (pool.clone(), t.clone());
        feeders.push(tokio::spawn(async move {
            let _ns = ns;
            while let Some(m) = sub.next().await {
                let Some(sent) = m.payload.get(..8).and_then(|b| b.try_into().ok()) else {
                    continue;
                };
                let _ = pool.push(t.id(), t.weight(), u64::from_be_bytes(sent));
            }
        }));
    }
    let served: Arc<Mutex<BTreeMap<u64, Served>>> = Arc::default();
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (pool, served, quiet_id) = (pool.clone(), served.clone(), quiet.id().clone());
        workers.push(tokio::spawn(async move {
            while let Some((who, sent_us)) = pool.pop().await {
                tokio::time::sleep(TASK).await;
                let done = Instant::now();
                let window = now_ms() / 1_000;
                let mut s = served.lock().unwrap_or_else(|e| e.into_inner());
                let w = s.entry(window).or_default();
                if who == quiet_id {
                    let sent = epoch + Duration::from_micros(sent_us);
                    w.quiet.push(done.duration_since(sent));
                } else {
                    w.noisy += 1;
                }
            }
        }));
    }

    // The noisy tenant: one attempt per millisecond.
    let noisy_ns = connect(&noisy, &url, &master, "flood").await?;
    let windows: Arc<Mutex<BTreeMap<u64, NoisyWindow>>> = Arc::default();
    let noisy_windows = windows.clone();
    let noisy_run = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        let until = Instant::now() + Duration::from_secs(SECONDS);
        while Instant::now() < until {
            tick.tick().await;
            let window = now_ms() / 1_000;
            let sent = (epoch.elapsed().as_micros() as u64).to_be_bytes();
            let result = noisy_ns.publish("tasks.work", sent).await;
            let mut windows = noisy_windows.lock().unwrap_or_else(|e| e.into_inner());
            let w = windows.entry(window).or_default();
            w.offered += 1;
            match result {
                Ok(_) => w.admitted += 1,
                Err(e) => match e.kind() {
                    PublishErrorKind::Rejected(r) if r.reason == RejectReason::MessageRate => {
                        w.refused += 1;
                        match r.retry_after {
                            Some(d) => {
                                w.retry_min = Some(w.retry_min.map_or(d, |m| m.min(d)));
                                w.retry_max = Some(w.retry_max.map_or(d, |m| m.max(d)));
                            }
                            None => w.without_hint += 1,
                        }
                    }
                    _ => return Err(format!("noisy publish failed: {e}")),
                },
            }
        }
        // Hand the last messages to the server before the connection goes.
        noisy_ns.flush().await.map_err(|e| e.to_string())?;
        Ok(())
    });

    // The quiet tenant.
    let quiet_ns = connect(&quiet, &url, &master, "steady").await?;
    let quiet_run = tokio::spawn(async move {
        let mut sent = 0u64;
        let mut refused = 0u64;
        let mut tick = tokio::time::interval(QUIET_EVERY);
        let until = Instant::now() + Duration::from_secs(SECONDS);
        while Instant::now() < until {
            tick.tick().await;
            let at = (epoch.elapsed().as_micros() as u64).to_be_bytes();
            match quiet_ns.publish("tasks.work", at).await {
                Ok(_) => sent += 1,
                Err(_) => refused += 1,
            }
        }
        // Hand the last task to the server before the connection goes.
        if let Err(e) = quiet_ns.flush().await {
            eprintln!("quiet flush: {e}");
        }
        (sent, refused)
    });

    // One line per second while it runs.
    println!();
    println!(
        "{:>6} | {:>29} | {:>13} | {:>24}",
        "window", "noisy admitted / offered", "noisy retry", "quiet done, p50 / max"
    );
    let first = now_ms() / 1_000;
    let print_window = |w: u64, noisy: &NoisyWindow, s: &Served| {
        let mut lat = s.quiet.clone();
        lat.sort();
        let retry = match (noisy.retry_min, noisy.retry_max) {
            (Some(a), Some(b)) => format!("{}..{} ms", ms(a), ms(b)),
            _ => "-".to_string(),
        };
        println!(
            "{:>6} | {:>5} / {:>5} (refused {:>5}) | {:>13} | {:>3} tasks, {:>3} / {:>3} ms",
            format!("+{}s", w - first),
            noisy.admitted,
            noisy.offered,
            noisy.refused,
            retry,
            lat.len(),
            ms(percentile(&lat, 50)),
            ms(lat.last().copied().unwrap_or_default()),
        );
    };
    let snapshot = |w: u64| {
        let noisy_w = windows
            .lock()
            .map(|m| m.get(&w).cloned().unwrap_or_default())
            .unwrap_or_default();
        let served_w = served
            .lock()
            .map(|m| m.get(&w).cloned().unwrap_or_default())
            .unwrap_or_default();
        (noisy_w, served_w)
    };
    // Each window is printed 300 ms after it ends (its last quiet tasks done).
    let mut next = first;
    while !(noisy_run.is_finished() && quiet_run.is_finished()) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        while now_ms() >= (next + 1) * 1_000 + 300 {
            let (n, s) = snapshot(next);
            if n.offered > 0 {
                print_window(next, &n, &s);
            }
            next += 1;
        }
    }
    noisy_run.await??;
    let (quiet_sent, quiet_refused) = quiet_run.await?;
    // Let the pool drain: the quiet tenant's last tasks and the noisy backlog.
    let drain_until = Instant::now() + Duration::from_secs(3);
    loop {
        let quiet_done: usize = served
            .lock()
            .map(|s| s.values().map(|w| w.quiet.len()).sum())
            .unwrap_or(0);
        if (quiet_done as u64 >= quiet_sent && pool.is_empty()) || Instant::now() > drain_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let last = windows
        .lock()
        .map(|m| m.keys().next_back().copied().unwrap_or(next))
        .unwrap_or(next);
    while next <= last {
        let (n, s) = snapshot(next);
        if n.offered > 0 {
            print_window(next, &n, &s);
        }
        next += 1;
    }
    let windows = windows.lock().map(|m| m.clone()).unwrap_or_default();
    let served = served.lock().map(|s| s.clone()).unwrap_or_default();
    let printed = windows.len();

    // The bound, checked twice: the client's count per window, and the ledger.
    let ledger = KvLedger::open(&js, &RateBucket::default()).await?;
    let mut worst_window = 0u64;
    let mut worst_leased = 0u64;
    for w in windows.keys() {
        worst_window = worst_window.max(windows[w].admitted);
        worst_leased = worst_leased.max(ledger.leased("noisy.msgs", *w).await?);
    }
    let offered: u64 = windows.values().map(|w| w.offered).sum();
    let admitted: u64 = windows.values().map(|w| w.admitted).sum();
    let refused: u64 = windows.values().map(|w| w.refused).sum();
    let without_hint: u64 = windows.values().map(|w| w.without_hint).sum();
    let mut quiet_lat: Vec<Duration> = served.values().flat_map(|w| w.quiet.clone()).collect();
    quiet_lat.sort();
    let quiet_worst = quiet_lat.last().copied().unwrap_or_default();
    let noisy_run_tasks: u64 = served.values().map(|w| w.noisy).sum();

    println!();
    println!(
        "noisy: {admitted} admitted of {offered} offered in {printed} windows; most in one window: \
         {worst_window} by the client, {worst_leased} leased in the ledger (cap {NOISY_CAP}); \
         {refused} refused, {} with a retry-after; {noisy_run_tasks} of its tasks run",
        refused - without_hint
    );
    println!(
        "quiet: {} of {quiet_sent} tasks completed ({quiet_refused} refused), latency p50 {} ms, \
         p99 {} ms, max {} ms",
        quiet_lat.len(),
        ms(percentile(&quiet_lat, 50)),
        ms(percentile(&quiet_lat, 99)),
        ms(quiet_worst)
    );
    let ok = worst_window <= NOISY_CAP
        && worst_leased <= NOISY_CAP
        && without_hint == 0
        && refused > 0
        && quiet_refused == 0
        && quiet_lat.len() as u64 == quiet_sent
        && quiet_worst <= QUIET_BOUND;
    println!();
    if ok {
        println!(
            "QUOTAS OK: noisy held to {worst_window}/{NOISY_CAP} per window ({admitted} of {offered} \
             admitted, every refusal with a retry-after); quiet {}/{quiet_sent} tasks completed, \
             worst latency {} ms (bound {} ms)",
            quiet_lat.len(),
            ms(quiet_worst),
            ms(QUIET_BOUND)
        );
    } else {
        println!(
            "QUOTAS FAILED: noisy max {worst_window} per window (ledger {worst_leased}, cap \
             {NOISY_CAP}), {without_hint} refusals without retry-after; quiet {}/{quiet_sent} \
             completed, {quiet_refused} refused, worst {} ms (bound {} ms)",
            quiet_lat.len(),
            ms(quiet_worst),
            ms(QUIET_BOUND)
        );
    }
    pool.close();
    for w in workers {
        w.abort();
    }
    for f in feeders {
        f.abort();
    }
    Ok(ok)
}

/// `str::parse` for tenant ids with the example's error type.
trait ParseTenant {
    fn parse_tenant(&self) -> Result<tenant_bus::TenantId>;
}

impl ParseTenant for str {
    fn parse_tenant(&self) -> Result<tenant_bus::TenantId> {
        Ok(tenant_bus::TenantId::new(self)?)
    }
}
