//! Metering: what server-verified usage and policing cost, and how fast
//! policing cuts a raw flood, on an operator-mode deployment.
//!
//! - **Overhead on throughput.** Raw async-nats publish -> subscribe of 128 B
//!   messages by an issued agent (its `.creds`), in a worker process, with the
//!   controller serving and reading the servers' counters every second for
//!   both usage and policing ("on"), against the same with the controller
//!   stopped ("off": nothing polls). Runs alternate, the order swapping every
//!   repeat, so drift affects both; the overhead is the median over repeats of
//!   `1 - on / off` of each pair. The tenant's rate caps are raised far above
//!   the load, so policing looks at it every second but never cuts it.
//! - **Policing detection delay.** A raw client with an issued agent's
//!   `.creds` floods at [`FLOOD_FACTOR`] times its tenant's message cap; the
//!   time from its first publish until the server closes its connection (the
//!   client's first disconnect or server error event), after which the same
//!   credentials must be refused (the cut was policing's revocation, not
//!   something else). Each repeat uses a fresh tenant: a cut agent is revoked
//!   for its backoff and a third strike within 10 minutes would suspend the
//!   tenant.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;

use agentbus_control::tiers::{Quotas, Tier};
use agentbus_control::ControllerConfig;

use crate::platform::OperatorPlatform;
use crate::report::MeteringFigures;
use crate::stats::{cpu_secs, peak_rss_kib, Summary};
use crate::BenchError;

/// The controller's poll interval while "on", for usage and policing alike
/// (policing's default; usage's default is 10 s, polled every second here so
/// the cost measured is the most the controller does).
pub const POLL: Duration = Duration::from_secs(1);
/// The tenant of the throughput runs.
const METER: &str = "meter";
/// Its message cap per second: about a thousand times what one 2-core
/// machine pushes, so policing never cuts the benchmark (policing reads the
/// counters either way; only a cut would change the load).
const METER_MESSAGES_PER_WINDOW: u64 = 1_000_000_000;
/// Its byte cap per second (1 TiB; no upper bound in the field's validation).
const METER_BYTES_PER_WINDOW: u64 = 1 << 40;
/// Payload of the throughput runs.
const SIZE: usize = 128;
/// The flood's rate as a multiple of its tenant's message cap (free tier:
/// 1,000 per 1,000 ms).
pub const FLOOD_FACTOR: u64 = 20;
/// How long a flood may run uncut before the run fails.
const FLOOD_LIMIT: Duration = Duration::from_secs(10);
/// What the cut itself may add to two poll intervals before the bound counts
/// as missed: CONNZ, a KV write, an account claim signed and pushed, the
/// server closing the connection (docs/bounds.md: "milliseconds"), plus
/// scheduling on a loaded 2-core machine.
pub const CUT_ALLOWANCE: Duration = Duration::from_millis(500);

/// Counts of one metering section.
#[derive(Debug, Clone, Copy)]
pub struct MeteringPlan {
    /// Messages per throughput run.
    pub count: u64,
    /// Throughput runs per state (on, off), and floods.
    pub repeats: usize,
}

/// Arguments of the flood worker.
#[derive(Debug, Clone, Args)]
pub struct FloodArgs {
    /// Server URL (operator mode).
    #[arg(long)]
    pub url: String,
    /// The issued agent's `.creds` file (not an argument: argument lists are
    /// visible to every user of the machine).
    #[arg(long)]
    pub creds: std::path::PathBuf,
    /// The agent's tenant (publishes to `tenant.<tenant>.flood`).
    #[arg(long)]
    pub tenant: String,
    /// Messages per second to publish (in bursts every 10 ms).
    #[arg(long)]
    pub rate: u64,
    /// Fail if not cut within this many seconds.
    #[arg(long)]
    pub limit_secs: u64,
}

/// The worker side of the detection delay: connects with the `.creds`,
/// publishes 64 B messages at `rate` until the server closes the connection
/// (or `limit_secs` pass: an error), then checks that the same credentials
/// are refused.
pub async fn flood(a: FloodArgs) -> Result<serde_json::Value, BenchError> {
    let creds = std::fs::read_to_string(&a.creds)
        .map_err(|e| BenchError(format!("reading {}: {e}", a.creds.display())))?;
    let creds = creds.trim().to_string();
    let options = |creds: &str| {
        async_nats::ConnectOptions::with_credentials(creds)
            .map_err(|e| BenchError(format!("creds: {e}")))
            .map(|o| o.connection_timeout(Duration::from_secs(5)))
    };
    // The first event that says the server let go of the connection, and when
    // the client saw it (events reach the callback on the client's own task,
    // microseconds after the socket closes).
    let cut: Arc<OnceLock<(Instant, String)>> = Arc::new(OnceLock::new());
    let woken = Arc::new(tokio::sync::Notify::new());
    let client = {
        let (cut, woken) = (cut.clone(), woken.clone());
        options(&creds)?
            .event_callback(move |event| {
                let (cut, woken) = (cut.clone(), woken.clone());
                async move {
                    let what = match event {
                        async_nats::Event::Disconnected => "disconnected".to_string(),
                        async_nats::Event::Closed => "closed".to_string(),
                        async_nats::Event::ServerError(e) => format!("server error: {e}"),
                        _ => return,
                    };
                    if cut.set((Instant::now(), what)).is_ok() {
                        // notify_one keeps a permit: no lost wake-up if the
                        // waiter is not waiting yet.
                        woken.notify_one();
                    }
                }
            })
            .connect(&a.url)
            .await
            .map_err(|e| BenchError(format!("flood connect: {e}")))?
    };
    client
        .flush()
        .await
        .map_err(|e| BenchError(format!("flood flush: {e}")))?;

    let subject = format!("tenant.{}.flood", a.tenant);
    let payload = Bytes::from_static(&[0u8; 64]);
    // Bursts every 10 ms, as a client pacing itself would; the interval's
    // first tick is immediate, so the first publish follows `started` at once.
    let burst = (a.rate / 100).max(1);
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let flooder = tokio::spawn({
        let (client, sent) = (client.clone(), sent.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            loop {
                tick.tick().await;
                for _ in 0..burst {
                    if client
                        .publish(subject.clone(), payload.clone())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    let limit = Duration::from_secs(a.limit_secs.max(1));
    let waited = tokio::time::timeout(limit, woken.notified()).await;
    // A disconnected client buffers and reconnects in the background: stop
    // publishing and let it go before checking the credentials.
    flooder.abort();
    drop(client);
    let sent = sent.load(Ordering::Relaxed);
    let Some((at, how)) = cut.get().cloned().filter(|_| waited.is_ok()) else {
        return Err(BenchError(format!(
            "the flood was not cut within {limit:?} ({sent} messages sent at {} msgs/s)",
            a.rate
        )));
    };
    let cut_after = at.saturating_duration_since(started);
    // Policing revokes the user, so the server refuses its credentials until
    // the backoff ends; a connection closed for any other reason would let it
    // back in, and the delay would not be policing's.
    let again = options(&creds)?
        .max_reconnects(Some(0))
        .connect(&a.url)
        .await;
    if again.is_ok() {
        return Err(BenchError(format!(
            "the flood's connection ended ({how}) after {cut_after:?}, but its credentials were not refused: not a policing cut"
        )));
    }
    Ok(serde_json::json!({
        "cut_after_ms": cut_after.as_secs_f64() * 1e3,
        "sent": sent,
        "sent_per_sec": sent as f64 / cut_after.as_secs_f64().max(1e-9),
        "how": how,
        "peak_rss_kib": peak_rss_kib(),
    }))
}

/// The controller configuration while "on".
fn polling(c: ControllerConfig) -> ControllerConfig {
    c.usage_every(POLL).police_every(POLL)
}

/// Issues agent `agent` of `tenant`, writes its `.creds` to a 0600 file in the
/// platform's scratch directory, and waits (at most 10 s) until the server
/// accepts them (the tenant's account claims reach it asynchronously).
async fn issue_creds(
    p: &OperatorPlatform,
    tenant: &str,
    agent: &str,
) -> Result<std::path::PathBuf, BenchError> {
    let api = |e: agentbus_control::ApiError| BenchError(e.to_string());
    let issued =
        p.cp.create_agent(tenant, agent, "default")
            .await
            .map_err(api)?;
    let creds = issued
        .bundle
        .creds
        .ok_or_else(|| BenchError("the issued agent has no .creds".into()))?;
    let path = p.scratch().join(format!("{tenant}-{agent}.creds"));
    write_private(&path, &creds)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = async_nats::ConnectOptions::with_credentials(&creds)
            .map_err(|e| BenchError(format!("creds: {e}")))?
            .max_reconnects(Some(0))
            .connection_timeout(Duration::from_secs(5))
            .connect(p.url())
            .await;
        match attempt {
            Ok(client) => {
                drop(client);
                return Ok(path);
            }
            Err(e) if Instant::now() > deadline => {
                return Err(BenchError(format!(
                    "{tenant}/{agent}: no login within 10 s: {e}"
                )))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Writes `text` to a new file readable by this user only.
fn write_private(path: &Path, text: &str) -> Result<(), BenchError> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| BenchError(format!("writing {}: {e}", path.display())))
}

/// Runs a worker off the runtime: waiting for it blocks a thread, and the
/// controller it is measured against runs on this runtime.
async fn worker_off_runtime(
    exe: &Path,
    args: Vec<String>,
) -> Result<serde_json::Value, BenchError> {
    let exe = exe.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::worker(&exe, None, &args)
    })
    .await
    .map_err(|e| BenchError(format!("metering worker: {e}")))?
}

/// The parent side: both measurements on one deployment (see the module docs).
pub async fn run(
    exe: &Path,
    plan: MeteringPlan,
    progress: impl Fn(&str),
) -> Result<MeteringFigures, BenchError> {
    let api = |e: agentbus_control::ApiError| BenchError(e.to_string());
    let mut p = OperatorPlatform::start_with(polling).await?;
    let url = p.url();
    let mut quotas = Quotas::for_tier(Tier::Enterprise);
    quotas.messages_per_window = METER_MESSAGES_PER_WINDOW;
    quotas.bytes_per_window = METER_BYTES_PER_WINDOW;
    p.cp.create_tenant_with_quotas(METER, Tier::Enterprise, quotas)
        .await
        .map_err(api)?;
    let creds = issue_creds(&p, METER, "load").await?;
    let since_ms = tenant_bus::envelope::now_ms();
    // As after every start below: the first "on" run starts in the steady
    // state, not during the controller's first poll and reconcile.
    tokio::time::sleep(POLL).await;

    let repeats = plan.repeats.max(1);
    let count = plan.count.max(1);
    let args: Vec<String> = [
        "throughput",
        "--url",
        &url,
        "--mode",
        "raw",
        "--size",
        &SIZE.to_string(),
        "--count",
        &count.to_string(),
        "--creds",
        &creds.to_string_lossy(),
        "--tenant",
        METER,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // [on, off] msgs/s, pairs in run order.
    let mut runs: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    // This process's CPU share (of one core) during each run: the controller
    // polling while on, next to nothing while off (the admin client idles and
    // the worker is waited for on a blocked thread). A figure the other load
    // on the machine hardly moves, unlike the throughput pairs.
    let mut cpu: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut received = 0u64;
    let mut serving = true;
    for r in 0..repeats {
        // Swapping the order every repeat also halves the controller
        // restarts: on, off | off, on | on, off ...
        let order = if r % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for on in order {
            if on != serving {
                if on {
                    p.start_controller(polling(p.controller_config())).await?;
                    // Steady state: the first poll (which also loads every
                    // tenant's record) is over before the run starts.
                    tokio::time::sleep(POLL).await;
                } else {
                    p.stop_controller().await?;
                }
                serving = on;
            }
            progress(&format!(
                "metering: 128 B throughput, controller {}, repeat {}/{repeats}",
                if on { "polling every 1 s" } else { "stopped" },
                r + 1
            ));
            let (cpu0, t0) = (cpu_secs(), Instant::now());
            let v = worker_off_runtime(exe, args.clone()).await?;
            cpu[usize::from(!on)].push((cpu_secs() - cpu0) / t0.elapsed().as_secs_f64().max(1e-9));
            let rate = v
                .get("msgs_per_sec")
                .and_then(|x| x.as_f64())
                .ok_or_else(|| BenchError(format!("throughput worker output {v}")))?;
            received += v.get("received").and_then(|x| x.as_u64()).unwrap_or(0);
            runs[usize::from(!on)].push(rate);
        }
    }
    if !serving {
        p.start_controller(polling(p.controller_config())).await?;
    }
    let overheads: Vec<f64> = runs[0]
        .iter()
        .zip(&runs[1])
        .map(|(on, off)| if *off > 0.0 { 1.0 - on / off } else { 0.0 })
        .collect();

    // What the servers counted for the tenant and the controller recorded:
    // every published message, including those of the "off" runs (the next
    // poll adds the servers' counters since the previous one). Waits at most
    // 5 s for the last poll to land.
    let published = received;
    let mut metered = 0u64;
    let deadline = Instant::now() + Duration::from_secs(5);
    while metered < published && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let req = agentbus_control::usage::UsageRequest {
            from_ms: since_ms.saturating_sub(3_600_000),
            to_ms: tenant_bus::envelope::now_ms() + 3_600_000,
            by: Default::default(),
        };
        metered =
            p.cp.usage(METER, &req)
                .await
                .map_err(api)?
                .iter()
                .map(|row| row.msgs_in)
                .sum();
    }

    // Detection delay: a fresh free-tier tenant (1,000 messages per 1,000 ms)
    // and agent per flood.
    let cap = Quotas::for_tier(Tier::Free);
    let cap_per_sec = cap.messages_per_window * 1000 / cap.window_ms.max(1);
    let rate = (cap_per_sec * FLOOD_FACTOR).to_string();
    let mut cuts = Vec::new();
    let mut flood_rates = Vec::new();
    for r in 0..repeats {
        // Each flood starts at another point of the poll interval (its r-th
        // fraction): otherwise the repeats, equally long, lock to the poll's
        // phase and measure one point of the 1..2 interval range.
        tokio::time::sleep(POLL.mul_f64(r as f64 / repeats as f64)).await;
        let tenant = format!("police-{r}");
        p.cp.create_tenant(&tenant, Tier::Free).await.map_err(api)?;
        let creds = issue_creds(&p, &tenant, "raw").await?;
        progress(&format!(
            "metering: flood at {FLOOD_FACTOR}x the cap until cut, repeat {}/{repeats}",
            r + 1
        ));
        let args: Vec<String> = [
            "flood",
            "--url",
            &url,
            "--creds",
            &creds.to_string_lossy(),
            "--tenant",
            &tenant,
            "--rate",
            &rate,
            "--limit-secs",
            &FLOOD_LIMIT.as_secs().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let v = worker_off_runtime(exe, args).await?;
        let ms = v
            .get("cut_after_ms")
            .and_then(|x| x.as_f64())
            .ok_or_else(|| BenchError(format!("flood worker output {v}")))?;
        cuts.push(ms);
        if let Some(x) = v.get("sent_per_sec").and_then(|x| x.as_f64()) {
            flood_rates.push(x);
        }
    }
    p.stop_controller().await?;
    Ok(MeteringFigures {
        count,
        on_msgs_per_sec: Summary::of(&runs[0]),
        off_msgs_per_sec: Summary::of(&runs[1]),
        overhead: Summary::of(&overheads),
        controller_cpu: [Summary::of(&cpu[0]), Summary::of(&cpu[1])],
        published,
        metered,
        cap_per_sec,
        flood_per_sec: Summary::of(&flood_rates),
        cut_after_ms: Summary::of(&cuts),
        poll_ms: POLL.as_millis() as u64,
    })
}
