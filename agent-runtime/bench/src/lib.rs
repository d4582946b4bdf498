//! `agentbus bench`: the namespaced, sealed bus against raw async-nats, measured
//! in the same run on the same local nats-server, with ratios.
//!
//! Each figure is the median of `--repeats` runs (default 5) with min and max;
//! raw and sealed runs alternate so drift affects both. Every measurement runs in a
//! fresh process (`agentbus bench-worker`, hidden) whose peak RSS is reported beside
//! it. Progress goes to stderr; the table to stdout and, with `--out`, to a
//! Markdown file with the machine it ran on.
//!
//! `--quick` is the smoke version CI runs (seconds, tiny counts): it checks that the
//! benchmark still runs, not the targets.
//!
//! The CLI only calls [`run`] and [`worker::run`]; this crate calls the runtime, the
//! control plane and the bus.
//!
//! # Layout
//! - [`worker`]: the measurements (throughput, latency, soak, tenants).
//! - [`platform`]: the operator-mode deployment (server + controller) that
//!   onboarding, audit and logins run against.
//! - [`logins`]: connect latency and rate, static `.creds` against API keys
//!   through the auth callout.
//! - [`audit`]: audit log appends and verification.
//! - [`metering`]: what usage polling and policing cost in throughput, and
//!   how fast policing cuts a raw flood.
//! - [`stats`]: medians, quantiles, RSS readings.
//! - [`report`]: the table and `BENCHMARKS.md`.

#![forbid(unsafe_code)]

pub mod audit;
pub mod logins;
pub mod metering;
pub mod platform;
pub mod report;
pub mod stats;
pub mod worker;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use clap::{Args, ValueEnum};

use agentbus_control::local_server::{LocalServer, ServerOptions};
use report::{Report, Row};
use stats::Summary;
use worker::Mode;

/// A benchmark's failure: one line for the user.
#[derive(Debug)]
pub struct BenchError(pub String);

impl std::fmt::Display for BenchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BenchError {}

impl From<agentbus_control::ControlError> for BenchError {
    fn from(e: agentbus_control::ControlError) -> Self {
        BenchError(one_line(&e.to_string()))
    }
}

/// Collapses a multi-line error into one line.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Arguments of `agentbus bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The smoke version: tiny counts, one repeat, short soak (for CI).
    #[arg(long)]
    pub quick: bool,
    /// Repeats per figure (the median is reported). Default 5 (1 with --quick).
    #[arg(long)]
    pub repeats: Option<usize>,
    /// Soak duration of the memory measurement, seconds. Default 60 (3 with --quick).
    #[arg(long)]
    pub soak_secs: Option<u64>,
    /// Do not pin the server and the latency workers to CPU 0 for the
    /// request/reply latency. Without this flag they are pinned with `taskset`
    /// (when it is available), because cross-CPU wake-ups dominate that figure.
    #[arg(long)]
    pub no_pin: bool,
    /// Write the Markdown report here (e.g. BENCHMARKS.md).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Run only these sections (comma-separated), e.g. `--only logins`.
    /// Default: all. Not with `--out`: a partial report would replace the
    /// other sections of the file.
    #[arg(long, value_enum, value_delimiter = ',', conflicts_with = "out")]
    pub only: Vec<Section>,
}

/// A part of the benchmark, for `--only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Section {
    /// Publish -> subscribe throughput per payload size.
    Throughput,
    /// Request/reply latency.
    Latency,
    /// JetStream publish, consume and task dispatch.
    Jetstream,
    /// The same on a three-node loopback cluster with R3 streams.
    JetstreamCluster,
    /// Receiver memory under sustained load.
    Soak,
    /// Admission cost and memory per tenant.
    Tenants,
    /// Tenant onboarding on an operator-mode server.
    Onboarding,
    /// Audit log appends and verification.
    Audit,
    /// Connect latency and rate: static `.creds` against API keys (auth callout).
    Logins,
    /// Metering overhead on throughput and the policing detection delay.
    Metering,
}

struct Plan {
    repeats: usize,
    sizes: Vec<(usize, u64)>,
    latency_count: u64,
    js_count: u64,
    soak_secs: u64,
    tenant_counts: Vec<usize>,
    checks: u64,
    onboard: usize,
    audit_appends: u64,
    audit_verify: u64,
    logins: logins::LoginPlan,
    metering: metering::MeteringPlan,
}

impl Plan {
    fn new(args: &BenchArgs) -> Self {
        if args.quick {
            Plan {
                repeats: args.repeats.unwrap_or(1).max(1),
                sizes: vec![(128, 5_000), (1024, 5_000), (16 * 1024, 1_000)],
                latency_count: 500,
                js_count: 2_000,
                soak_secs: args.soak_secs.unwrap_or(3),
                tenant_counts: vec![10, 1_000],
                checks: 100_000,
                onboard: 1,
                audit_appends: 640,
                audit_verify: 2_000,
                logins: logins::LoginPlan {
                    count: 100,
                    concurrent_count: 200,
                    concurrency: LOGIN_CONCURRENCY,
                    repeats: args.repeats.unwrap_or(1).max(1),
                },
                metering: metering::MeteringPlan {
                    count: 20_000,
                    repeats: args.repeats.unwrap_or(1).max(1),
                },
            }
        } else {
            Plan {
                repeats: args.repeats.unwrap_or(5).max(1),
                sizes: vec![(128, 400_000), (1024, 200_000), (16 * 1024, 40_000)],
                latency_count: 20_000,
                js_count: 50_000,
                soak_secs: args.soak_secs.unwrap_or(60),
                tenant_counts: vec![10, 1_000, 100_000],
                checks: 1_000_000,
                onboard: 5,
                audit_appends: 64_000,
                audit_verify: 100_000,
                logins: logins::LoginPlan {
                    count: 1_000,
                    concurrent_count: 2_000,
                    concurrency: LOGIN_CONCURRENCY,
                    repeats: args.repeats.unwrap_or(5).max(1),
                },
                metering: metering::MeteringPlan {
                    // About 3 s per run at this machine's raw rate: each run
                    // spans several of the controller's 1 s polls.
                    count: METERING_COUNT,
                    repeats: args.repeats.unwrap_or(5).max(1),
                },
            }
        }
    }
}

/// Connectors at once in the concurrent logins phase: a handful of agents
/// starting together, as after a deploy.
const LOGIN_CONCURRENCY: usize = 8;

/// Messages per metering throughput run (full mode).
const METERING_COUNT: u64 = 3_000_000;

/// Runs the benchmark.
pub async fn run(args: BenchArgs) -> Result<(), BenchError> {
    let plan = Plan::new(&args);
    let on = |s: Section| args.only.is_empty() || args.only.contains(&s);
    let exe = std::env::current_exe().map_err(|e| BenchError(format!("current exe: {e}")))?;
    let started = Instant::now();
    let server = LocalServer::start(ServerOptions::new().jetstream(true))
        .map_err(|e| BenchError(crate::one_line(&e.to_string())))?;
    let url = server.url();
    let mut report = Report::new(args.quick, plan.repeats);
    progress(
        &started,
        &format!("nats-server at {url}; {} repeats per figure", plan.repeats),
    );

    // Publish -> subscribe throughput.
    if on(Section::Throughput) {
        for &(size, count) in &plan.sizes {
            let (size_s, count_s) = (size.to_string(), count.to_string());
            let runs = paired(
                &started,
                plan.repeats,
                &format!("throughput {}", report::size_label(size)),
                |mode, _| {
                    worker(
                        &exe,
                        None,
                        &[
                            "throughput",
                            "--url",
                            &url,
                            "--mode",
                            mode_arg(mode),
                            "--size",
                            &size_s,
                            "--count",
                            &count_s,
                        ],
                    )
                },
            )?;
            let label = report::size_label(size);
            report.rows.push(Row::higher(
                format!("pub->sub {label} msgs/s"),
                pick(&runs, "msgs_per_sec"),
                target_for(size),
            ));
            report.rows.push(Row::higher(
                format!("pub->sub {label} MB/s"),
                pick(&runs, "mb_per_sec"),
                None,
            ));
            report.rows.push(Row::memory(
                format!("pub->sub {label} peak RSS (MiB)"),
                pick_mib(&runs, "peak_rss_kib"),
            ));
        }
    }

    // Request/reply latency, pinned to one CPU when possible.
    if on(Section::Latency) {
        let pin = !args.no_pin && which("taskset");
        let latency_server = LocalServer::start(ServerOptions::new())
            .map_err(|e| BenchError(crate::one_line(&e.to_string())))?;
        if pin {
            if let Some(pid) = latency_server.pid() {
                let _ = Command::new("taskset")
                    .args(["-a", "-p", "-c", "0", &pid.to_string()])
                    .stdout(Stdio::null())
                    .status();
            }
        }
        report.latency_pinned = pin;
        let lat_url = latency_server.url();
        let latency_count = plan.latency_count.to_string();
        let runs = paired(&started, plan.repeats, "request/reply", |mode, _| {
            worker(
                &exe,
                pin.then_some("0"),
                &[
                    "latency",
                    "--url",
                    &lat_url,
                    "--mode",
                    mode_arg(mode),
                    "--count",
                    &latency_count,
                ],
            )
        })?;
        drop(latency_server);
        report.rows.push(Row::lower(
            "request/reply p50 (us)".into(),
            pick(&runs, "p50_us"),
            Some(1.10),
        ));
        report.rows.push(Row::lower(
            "request/reply p99 (us)".into(),
            pick(&runs, "p99_us"),
            None,
        ));
        report.rows.push(Row::lower(
            "request/reply p99.9 (us)".into(),
            pick(&runs, "p999_us"),
            None,
        ));
    }

    // JetStream: raw publish + consume against sealed task dispatch.
    if on(Section::Jetstream) {
        jetstream_rows(
            &mut report,
            &started,
            &plan,
            &exe,
            &url,
            1,
            "JetStream 1 KiB",
        )?;
    }

    // The same on three nodes, every stream R3 (issue 13: the targets hold
    // on a cluster too).
    if on(Section::JetstreamCluster) {
        progress(&started, "starting a three-node cluster for JetStream R3");
        let cluster = agentbus_control::local_server::LocalCluster::start(
            agentbus_control::local_server::ClusterOptions::new().nodes(3),
        )
        .await
        .map_err(|e| BenchError(crate::one_line(&e.to_string())))?;
        // Streams can be created once the cluster has a JetStream meta leader.
        let probe = async_nats::connect(cluster.url_list())
            .await
            .map_err(|e| BenchError(format!("connect to the cluster: {e}")))?;
        let js = async_nats::jetstream::new(probe);
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while js.query_account().await.is_err() {
            if Instant::now() > deadline {
                return Err(BenchError(
                    "the cluster's JetStream never became ready".into(),
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        jetstream_rows(
            &mut report,
            &started,
            &plan,
            &exe,
            &cluster.urls(),
            3,
            "JetStream R3 (3 nodes) 1 KiB",
        )?;
    }

    // Memory under sustained load.
    if on(Section::Soak) {
        let mut soak: [Vec<serde_json::Value>; 2] = [Vec::new(), Vec::new()];
        for mode in [Mode::Raw, Mode::Sealed] {
            progress(
                &started,
                &format!("soak 1 KiB {mode:?} for {} s", plan.soak_secs),
            );
            let v = worker(
                &exe,
                None,
                &[
                    "soak",
                    "--url",
                    &url,
                    "--mode",
                    mode_arg(mode),
                    "--secs",
                    &plan.soak_secs.to_string(),
                ],
            )?;
            soak[mode as usize].push(v);
        }
        report.soak = Some(report::Soak::from_runs(&soak, plan.soak_secs));
    }

    // Admission cost and per-tenant memory.
    if on(Section::Tenants) {
        for &n in &plan.tenant_counts {
            progress(&started, &format!("admission and memory with {n} tenants"));
            let v = worker(
                &exe,
                None,
                &[
                    "tenants",
                    "--tenants",
                    &n.to_string(),
                    "--checks",
                    &plan.checks.to_string(),
                ],
            )?;
            report.tenants.push(report::TenantRow::from_value(n, &v));
        }
    }

    // Onboarding on an operator-mode server.
    if on(Section::Onboarding) {
        progress(&started, "tenant onboarding (operator mode)");
        report.onboarding_ms = Some(Summary::of(&onboarding(plan.onboard).await?));
    }

    // The audit log: appends with checkpoints, and verification.
    if on(Section::Audit) {
        progress(
            &started,
            &format!(
                "audit: {} appends over {} logs",
                plan.audit_appends,
                audit::LOGS
            ),
        );
        let appends = audit::appends(plan.audit_appends, plan.repeats, 1).await?;
        for (i, run) in appends.iter().enumerate() {
            progress(
                &started,
                &format!(
                    "audit: run {}: {:.0} appends/s, {:.1} events per batch, {} checkpoints",
                    i + 1,
                    run.per_sec,
                    run.per_batch,
                    run.checkpoints
                ),
            );
        }
        progress(
            &started,
            &format!(
                "audit: {} appends over {} logs, runtime batches of {}",
                plan.audit_appends,
                audit::LOGS,
                audit::RUNTIME_BATCH
            ),
        );
        let batched =
            audit::appends(plan.audit_appends, plan.repeats, audit::RUNTIME_BATCH).await?;
        for (i, run) in batched.iter().enumerate() {
            progress(
                &started,
                &format!(
                    "audit: batched run {}: {:.0} appends/s, {:.1} events per batch, {} checkpoints",
                    i + 1,
                    run.per_sec,
                    run.per_batch,
                    run.checkpoints
                ),
            );
        }
        progress(
            &started,
            &format!("audit: verify {} events", plan.audit_verify),
        );
        let verify = audit::verify_secs(plan.audit_verify, plan.repeats)?;
        report.audit = Some(report::AuditFigures {
            appended: plan.audit_appends,
            appends_per_sec: Summary::of(&appends.iter().map(|r| r.per_sec).collect::<Vec<_>>()),
            batched_per_sec: Summary::of(&batched.iter().map(|r| r.per_sec).collect::<Vec<_>>()),
            verified: plan.audit_verify,
            verify_secs: Summary::of(&verify),
        });
    }

    // Logins: static .creds against API keys through the auth callout.
    if on(Section::Logins) {
        let runs = logins::run(&exe, plan.logins, |what| progress(&started, what)).await?;
        report.logins = Some(report::LoginFigures::from_runs(
            &runs,
            plan.logins.concurrency,
        ));
    }

    // Metering: throughput with and without the controller polling, and the
    // policing detection delay.
    if on(Section::Metering) {
        report.metering =
            Some(metering::run(&exe, plan.metering, |what| progress(&started, what)).await?);
    }

    drop(server);
    progress(&started, "done");
    let table = report.render();
    println!("{table}");
    if let Some(path) = &args.out {
        // Keep the hand-written analysis (from its heading on) across regenerations.
        let analysis = std::fs::read_to_string(path).ok().and_then(|old| {
            old.find(report::ANALYSIS_HEADING)
                .map(|i| old[i..].to_string())
        });
        let mut text = report.markdown(&table);
        if let Some(a) = analysis {
            text.push('\n');
            text.push_str(&a);
        }
        std::fs::write(path, text)
            .map_err(|e| BenchError(format!("writing {}: {e}", path.display())))?;
        eprintln!("agentbus bench: wrote {}", path.display());
    }
    Ok(())
}

/// Runs `measure` for raw and sealed, `repeats` times each, alternating which goes
/// first so drift affects both; returns the raw runs, then the sealed ones.
/// Raw JetStream publish and consume against sealed task dispatch, `replicas`
/// replicas, against the server(s) at `url`; four rows labelled `label`.
fn jetstream_rows(
    report: &mut Report,
    started: &Instant,
    plan: &Plan,
    exe: &std::path::Path,
    url: &str,
    replicas: usize,
    label: &str,
) -> Result<(), BenchError> {
    let js_count = plan.js_count.to_string();
    let replicas_s = replicas.to_string();
    let cluster = if replicas > 1 { "c" } else { "" };
    // One bench-worker run; `run` names its own stream and tenant, so runs
    // share no state.
    let measure = |mode: &str, extra: Option<&str>, run: &str| {
        let mut args = vec!["jetstream", "--url", url, "--mode", mode];
        args.extend(extra);
        args.extend([
            "--size",
            "1024",
            "--count",
            &js_count,
            "--run",
            run,
            "--replicas",
            &replicas_s,
        ]);
        worker(exe, None, &args)
    };
    let runs = paired(started, plan.repeats, label, |mode, r| {
        measure(
            mode_arg(mode),
            None,
            &format!("r{r}{}{cluster}", mode_arg(mode)),
        )
    })?;
    report.rows.push(Row::higher(
        format!("{label} publish msgs/s"),
        pick(&runs, "publish_per_sec"),
        Some(0.90),
    ));
    report.rows.push(Row::higher(
        format!("{label} consume msgs/s"),
        pick(&runs, "consume_per_sec"),
        // Issue 13 item 3: a dispatch worker also looks each task up and
        // records its sealed outcome durably, which a raw consumer does not.
        Some(0.60),
    ));
    report.rows.push(Row::higher(
        format!("{label} end-to-end msgs/s"),
        pick(&runs, "end_to_end_per_sec"),
        Some(0.70),
    ));
    // The floor of any consumer that records its outcomes durably: raw
    // async-nats with one conditional KV create per message before its ack
    // (no sealing, no lookup), against the same dispatch runs.
    let mut floor = Vec::with_capacity(plan.repeats);
    for r in 0..plan.repeats {
        progress(
            started,
            &format!(
                "{label} raw recording outcomes, repeat {}/{}",
                r + 1,
                plan.repeats
            ),
        );
        floor.push(measure(
            "raw",
            Some("--record-outcomes"),
            &format!("r{r}floor{cluster}"),
        )?);
    }
    report.rows.push(Row::higher(
        format!("{label} consume msgs/s, raw also recording each outcome"),
        pick(&[floor, runs[1].clone()], "consume_per_sec"),
        None,
    ));
    // What the server-enforced one-copy-per-id stream costs dispatch (a
    // subject per task, one message per subject), against the same raw runs.
    let mut per_id = Vec::with_capacity(plan.repeats);
    for r in 0..plan.repeats {
        progress(
            started,
            &format!(
                "{label} dispatch with one copy per id, repeat {}/{}",
                r + 1,
                plan.repeats
            ),
        );
        per_id.push(measure(
            "sealed",
            Some("--one-copy-per-id"),
            &format!("r{r}perid{cluster}"),
        )?);
    }
    let per_id = [runs[0].clone(), per_id];
    report.rows.push(Row::higher(
        format!("{label} publish msgs/s, one copy per id"),
        pick(&per_id, "publish_per_sec"),
        None,
    ));
    report.rows.push(Row::higher(
        format!("{label} consume msgs/s, one copy per id"),
        pick(&per_id, "consume_per_sec"),
        None,
    ));
    // Where the consume gap goes: the client's CPU per task (on this
    // machine the server shares the same two cores).
    report.rows.push(Row::lower(
        format!("{label} consume client CPU (us/task)"),
        pick(&runs, "consume_client_cpu_us_per_task"),
        None,
    ));
    report.rows.push(Row::memory(
        format!("{label} peak RSS (MiB)"),
        pick_mib(&runs, "peak_rss_kib"),
    ));
    Ok(())
}

fn paired(
    started: &Instant,
    repeats: usize,
    label: &str,
    mut measure: impl FnMut(Mode, usize) -> Result<serde_json::Value, BenchError>,
) -> Result<[Vec<serde_json::Value>; 2], BenchError> {
    let mut runs: [Vec<serde_json::Value>; 2] = [Vec::new(), Vec::new()];
    for r in 0..repeats {
        let order = if r % 2 == 0 {
            [Mode::Raw, Mode::Sealed]
        } else {
            [Mode::Sealed, Mode::Raw]
        };
        for mode in order {
            progress(
                started,
                &format!("{label} {mode:?}, repeat {}/{repeats}", r + 1),
            );
            runs[mode as usize].push(measure(mode, r)?);
        }
    }
    Ok(runs)
}

fn progress(started: &Instant, what: &str) {
    eprintln!("[{:>6.1} s] {what}", started.elapsed().as_secs_f64());
}

fn mode_arg(mode: Mode) -> &'static str {
    match mode {
        Mode::Raw => "raw",
        Mode::Sealed => "sealed",
    }
}

/// The throughput ratio target of a payload size (issue targets).
fn target_for(size: usize) -> Option<f64> {
    match size {
        s if s <= 1024 => Some(0.80),
        _ => Some(0.75),
    }
}

fn which(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Raw and sealed summaries of one field.
fn pick(runs: &[Vec<serde_json::Value>; 2], field: &str) -> [Summary; 2] {
    let get = |vs: &Vec<serde_json::Value>| -> Vec<f64> {
        vs.iter()
            .filter_map(|v| v.get(field).and_then(|x| x.as_f64()))
            .collect()
    };
    [Summary::of(&get(&runs[0])), Summary::of(&get(&runs[1]))]
}

fn pick_mib(runs: &[Vec<serde_json::Value>; 2], field: &str) -> [Summary; 2] {
    let [a, b] = pick(runs, field);
    let mib = |s: Summary| Summary {
        median: s.median / 1024.0,
        min: s.min / 1024.0,
        max: s.max / 1024.0,
    };
    [mib(a), mib(b)]
}

/// Runs one worker process and parses its JSON line.
pub(crate) fn worker(
    exe: &std::path::Path,
    pin_cpu: Option<&str>,
    args: &[&str],
) -> Result<serde_json::Value, BenchError> {
    let mut cmd = match pin_cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpu).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    cmd.arg("bench-worker").args(args).stdin(Stdio::null());
    let out = cmd
        .output()
        .map_err(|e| BenchError(format!("running a bench worker: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(BenchError(format!(
            "bench worker {args:?} failed: {}",
            crate::one_line(&err)
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).map_err(|e| BenchError(format!("bench worker output {line:?}: {e}")))
}

/// Times: create a tenant, issue an agent credential, connect, and have a first
/// publish accepted (received back through the server), on a fresh operator-mode
/// server with its controller serving (the time includes the controller's KV
/// writes and claim push).
async fn onboarding(repeats: usize) -> Result<Vec<f64>, BenchError> {
    use futures::StreamExt as _;
    let platform = platform::OperatorPlatform::start().await?;
    let api = |e: agentbus_control::ApiError| BenchError(e.to_string());
    let cp = &platform.cp;
    let mut times = Vec::new();
    for i in 0..repeats.max(1) {
        let id = format!("onboard-{i}");
        let t = Instant::now();
        cp.create_tenant(&id, agentbus_control::tiers::Tier::Free)
            .await
            .map_err(api)?;
        let bundle = cp.issue_agent(&id, "first", "default").await.map_err(api)?;
        let ns = tenant_bus::TenantNamespace::connect(&bundle)
            .await
            .map_err(|e| BenchError(e.to_string()))?;
        let mut sub = ns
            .subscribe("hello")
            .await
            .map_err(|e| BenchError(e.to_string()))?;
        ns.publish("hello", b"first")
            .await
            .map_err(|e| BenchError(e.to_string()))?;
        match tokio::time::timeout(std::time::Duration::from_secs(5), sub.next()).await {
            Ok(Some(_)) => times.push(t.elapsed().as_secs_f64() * 1e3),
            _ => {
                return Err(BenchError(format!(
                    "onboarding {id}: first publish not accepted"
                )))
            }
        }
    }
    Ok(times)
}
