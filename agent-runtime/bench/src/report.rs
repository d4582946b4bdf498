//! The benchmark table and `BENCHMARKS.md`.

use std::fmt::Write as _;

use super::stats::Summary;

/// The heading of the hand-written part of `BENCHMARKS.md`, kept when it is
/// regenerated.
pub const ANALYSIS_HEADING: &str = "## Analysis";

/// Whether more is better (throughput) or less (latency, memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// Throughput: the target is a minimum ratio sealed/raw.
    Higher,
    /// Latency: the target is a maximum ratio sealed/raw.
    Lower,
    /// Memory: reported, the target is checked separately.
    Memory,
}

/// One line of the raw-vs-sealed table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured.
    pub name: String,
    /// Raw async-nats, then agentbus.
    pub values: [Summary; 2],
    /// Direction.
    pub better: Better,
    /// The ratio target, if any.
    pub target: Option<f64>,
}

impl Row {
    /// A throughput row.
    pub fn higher(name: String, values: [Summary; 2], target: Option<f64>) -> Self {
        Self {
            name,
            values,
            better: Better::Higher,
            target,
        }
    }
    /// A latency row.
    pub fn lower(name: String, values: [Summary; 2], target: Option<f64>) -> Self {
        Self {
            name,
            values,
            better: Better::Lower,
            target,
        }
    }
    /// A memory row.
    pub fn memory(name: String, values: [Summary; 2]) -> Self {
        Self {
            name,
            values,
            better: Better::Memory,
            target: None,
        }
    }

    /// agentbus median over raw median.
    pub fn ratio(&self) -> f64 {
        if self.values[0].median == 0.0 {
            return 0.0;
        }
        self.values[1].median / self.values[0].median
    }

    /// `Some(shortfall)` when a target is missed: how far the ratio is from it.
    pub fn miss(&self) -> Option<f64> {
        match (self.better, self.target) {
            (Better::Higher, Some(t)) if self.ratio() < t => Some(t - self.ratio()),
            (Better::Lower, Some(t)) if self.ratio() > t => Some(self.ratio() - t),
            _ => None,
        }
    }

    fn verdict(&self) -> String {
        match (self.better, self.target) {
            (Better::Higher, Some(t)) => format!(
                ">= {t:.2}x {}",
                if self.ratio() >= t { "met" } else { "MISSED" }
            ),
            (Better::Lower, Some(t)) => format!(
                "<= {t:.2}x {}",
                if self.ratio() <= t { "met" } else { "MISSED" }
            ),
            _ => String::new(),
        }
    }
}

/// Soak results: RSS early and at the end, raw against sealed.
#[derive(Debug, Clone)]
pub struct Soak {
    secs: u64,
    early_secs: f64,
    early_mib: [f64; 2],
    end_mib: [f64; 2],
    peak_mib: [f64; 2],
    rate: [f64; 2],
}

impl Soak {
    /// From one raw and one sealed soak run.
    pub fn from_runs(runs: &[Vec<serde_json::Value>; 2], secs: u64) -> Self {
        let f = |i: usize, k: &str| {
            runs[i]
                .first()
                .and_then(|v| v.get(k))
                .and_then(|x| x.as_f64())
                .unwrap_or(0.0)
        };
        Self {
            secs,
            early_secs: f(0, "early_secs"),
            early_mib: [
                f(0, "rss_early_kib") / 1024.0,
                f(1, "rss_early_kib") / 1024.0,
            ],
            end_mib: [f(0, "rss_end_kib") / 1024.0, f(1, "rss_end_kib") / 1024.0],
            peak_mib: [f(0, "peak_rss_kib") / 1024.0, f(1, "peak_rss_kib") / 1024.0],
            rate: [f(0, "msgs_per_sec"), f(1, "msgs_per_sec")],
        }
    }

    /// The issue-6 target: sealed peak <= 1.2 x raw peak + 16 MB.
    pub fn target_met(&self) -> bool {
        self.peak_mib[1] <= 1.2 * self.peak_mib[0] + 16.0
    }
}

/// Admission and memory with N tenants.
#[derive(Debug, Clone)]
pub struct TenantRow {
    tenants: usize,
    one_ns: f64,
    rr_ns: f64,
    bytes_per_tenant: f64,
    parts: [f64; 3],
}

impl TenantRow {
    /// From a worker's JSON.
    pub fn from_value(tenants: usize, v: &serde_json::Value) -> Self {
        let f = |k: &str| v.get(k).and_then(|x| x.as_f64()).unwrap_or(0.0);
        Self {
            tenants,
            one_ns: f("one_tenant_ns"),
            rr_ns: f("round_robin_ns"),
            bytes_per_tenant: f("bytes_per_tenant"),
            parts: [f("scheduler_bytes"), f("keys_bytes"), f("registry_bytes")],
        }
    }
}

/// Everything one run measured.
#[derive(Debug)]
pub struct Report {
    quick: bool,
    repeats: usize,
    server_version: String,
    /// The raw-vs-sealed rows.
    pub rows: Vec<Row>,
    /// Whether latency ran pinned to one CPU.
    pub latency_pinned: bool,
    /// Memory under sustained load.
    pub soak: Option<Soak>,
    /// Admission and memory per tenant count.
    pub tenants: Vec<TenantRow>,
    /// Tenant onboarding, ms.
    pub onboarding_ms: Option<Summary>,
    /// Audit log figures.
    pub audit: Option<AuditFigures>,
    /// Login figures.
    pub logins: Option<LoginFigures>,
    /// Metering overhead and policing detection delay.
    pub metering: Option<MeteringFigures>,
}

/// The target for metering's cost: throughput with the controller
/// polling usage and policing at most this much below throughput without it.
pub const METERING_OVERHEAD_TARGET: f64 = 0.02;

/// Metering figures (see `crate::metering`).
#[derive(Debug, Clone)]
pub struct MeteringFigures {
    /// Messages per throughput run.
    pub count: u64,
    /// 128 B pub->sub msgs/s with the controller polling.
    pub on_msgs_per_sec: Summary,
    /// The same with the controller stopped.
    pub off_msgs_per_sec: Summary,
    /// `1 - on / off` per pair of runs.
    pub overhead: Summary,
    /// The bench process's CPU (the controller's, while on) as a share of one
    /// core during the runs: on, then off.
    pub controller_cpu: [Summary; 2],
    /// Messages the throughput runs published.
    pub published: u64,
    /// Messages the controller metered for the tenant (`msgs_in`).
    pub metered: u64,
    /// The flooding tenant's message cap per second.
    pub cap_per_sec: u64,
    /// The floods' achieved rate, msgs/s.
    pub flood_per_sec: Summary,
    /// From a flood's first publish until the server closed its connection, ms.
    pub cut_after_ms: Summary,
    /// The controller's poll interval, ms.
    pub poll_ms: u64,
}

impl MeteringFigures {
    /// Whether the median overhead is within the target.
    pub fn overhead_met(&self) -> bool {
        self.overhead.median <= METERING_OVERHEAD_TARGET
    }

    /// The detection bound of docs/bounds.md, ms: two poll intervals plus the
    /// cut ([`crate::metering::CUT_ALLOWANCE`]).
    pub fn bound_ms(&self) -> f64 {
        2.0 * self.poll_ms as f64 + crate::metering::CUT_ALLOWANCE.as_secs_f64() * 1e3
    }

    /// Whether every flood was cut within the bound (the worst case, not the
    /// median: the bound is a promise per flood).
    pub fn bound_met(&self) -> bool {
        self.cut_after_ms.max <= self.bound_ms()
    }
}

/// The login targets, for API keys through the auth callout: connect
/// p50 at most this many ms ...
pub const LOGIN_P50_TARGET_MS: f64 = 5.0;
/// ... and at least this many connects per second (checked on the concurrent
/// phase: a sequential rate is only the inverse of the latency).
pub const LOGIN_RATE_TARGET: f64 = 300.0;

/// Login figures (see `crate::logins`): static `.creds`, then API keys.
#[derive(Debug, Clone)]
pub struct LoginFigures {
    /// Connectors at once in the concurrent phase.
    pub concurrency: usize,
    /// Sequential connect p50, ms.
    pub seq_p50_ms: [Summary; 2],
    /// Sequential connect p99, ms.
    pub seq_p99_ms: [Summary; 2],
    /// Sequential connects per second.
    pub seq_per_sec: [Summary; 2],
    /// Concurrent connect p50, ms.
    pub conc_p50_ms: [Summary; 2],
    /// Concurrent connect p99, ms.
    pub conc_p99_ms: [Summary; 2],
    /// Concurrent connects per second.
    pub conc_per_sec: [Summary; 2],
}

impl LoginFigures {
    /// From the workers' JSON: the `.creds` runs, then the key runs.
    pub fn from_runs(runs: &[Vec<serde_json::Value>; 2], concurrency: usize) -> Self {
        let pick = |field: &str| -> [Summary; 2] {
            let get = |vs: &Vec<serde_json::Value>| -> Vec<f64> {
                vs.iter()
                    .filter_map(|v| v.get(field).and_then(|x| x.as_f64()))
                    .collect()
            };
            [Summary::of(&get(&runs[0])), Summary::of(&get(&runs[1]))]
        };
        Self {
            concurrency,
            seq_p50_ms: pick("seq_p50_ms"),
            seq_p99_ms: pick("seq_p99_ms"),
            seq_per_sec: pick("seq_per_sec"),
            conc_p50_ms: pick("conc_p50_ms"),
            conc_p99_ms: pick("conc_p99_ms"),
            conc_per_sec: pick("conc_per_sec"),
        }
    }

    /// Whether the API key logins meet the p50 target.
    pub fn p50_met(&self) -> bool {
        self.seq_p50_ms[1].median <= LOGIN_P50_TARGET_MS
    }

    /// Whether the API key logins meet the rate target.
    pub fn rate_met(&self) -> bool {
        self.conc_per_sec[1].median >= LOGIN_RATE_TARGET
    }
}

/// Audit log figures (see `crate::audit`).
#[derive(Debug, Clone)]
pub struct AuditFigures {
    /// Events appended per run.
    pub appended: u64,
    /// Events appended per second, checkpoints included: [`crate::audit::LOGS`]
    /// callers each waiting for its event before the next (admin requests).
    pub appends_per_sec: Summary,
    /// The same with each caller handing over [`crate::audit::RUNTIME_BATCH`]
    /// events at once (a runtime host's batch).
    pub batched_per_sec: Summary,
    /// Events in the verified log.
    pub verified: u64,
    /// Seconds to verify it.
    pub verify_secs: Summary,
}

/// `128 B`, `1 KiB`, `16 KiB`.
pub fn size_label(size: usize) -> String {
    if size >= 1024 && size.is_multiple_of(1024) {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

fn fmt_num(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.0}k", x / 1e3)
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

fn fmt_summary(s: &Summary) -> String {
    format!(
        "{} ({}..{})",
        fmt_num(s.median),
        fmt_num(s.min),
        fmt_num(s.max)
    )
}

impl Report {
    /// An empty report for this run.
    pub fn new(quick: bool, repeats: usize) -> Self {
        let server_version = agentbus_control::local_server::locate_nats_server()
            .ok()
            .and_then(|bin| {
                std::process::Command::new(bin)
                    .arg("--version")
                    .output()
                    .ok()
            })
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        Self {
            quick,
            repeats,
            server_version,
            rows: Vec::new(),
            latency_pinned: false,
            soak: None,
            tenants: Vec::new(),
            onboarding_ms: None,
            audit: None,
            logins: None,
            metering: None,
        }
    }

    /// The results as a Markdown table (also printed to the terminal).
    pub fn render(&self) -> String {
        let mut s = String::new();
        // Empty when `--only` left out every raw-vs-sealed section.
        if !self.rows.is_empty() {
            let _ = writeln!(s, "| measurement | raw async-nats: median (min..max) | agentbus: median (min..max) | ratio | target |");
            let _ = writeln!(s, "|---|---|---|---|---|");
        }
        for r in &self.rows {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.2}x | {} |",
                r.name,
                fmt_summary(&r.values[0]),
                fmt_summary(&r.values[1]),
                r.ratio(),
                r.verdict()
            );
        }
        if let Some(soak) = &self.soak {
            let _ = writeln!(
                s,
                "\n| receiver, 1 KiB at full speed for {} s | raw async-nats | agentbus | target |",
                soak.secs
            );
            let _ = writeln!(s, "|---|---|---|---|");
            let _ = writeln!(
                s,
                "| RSS after {:.0} s (MiB) | {:.1} | {:.1} | flat |",
                soak.early_secs, soak.early_mib[0], soak.early_mib[1]
            );
            let _ = writeln!(
                s,
                "| RSS at {} s (MiB) | {:.1} | {:.1} | flat |",
                soak.secs, soak.end_mib[0], soak.end_mib[1]
            );
            let _ = writeln!(
                s,
                "| peak RSS (MiB) | {:.1} | {:.1} | <= 1.2x raw + 16 MB: {} |",
                soak.peak_mib[0],
                soak.peak_mib[1],
                if soak.target_met() { "met" } else { "MISSED" }
            );
            let _ = writeln!(
                s,
                "| received msgs/s | {} | {} | |",
                fmt_num(soak.rate[0]),
                fmt_num(soak.rate[1])
            );
        }
        if !self.tenants.is_empty() {
            let _ = writeln!(s, "\n| tenants registered | admission, one tenant (ns/check) | admission, round-robin over all (ns/check) | runtime memory per idle tenant (scheduler + keys + registry entry) | target |");
            let _ = writeln!(s, "|---|---|---|---|---|");
            for t in &self.tenants {
                let met = t.one_ns <= 200.0 && t.bytes_per_tenant <= 2048.0;
                let _ = writeln!(
                    s,
                    "| {} | {:.1} | {:.1} | {:.0} B ({:.0} + {:.0} + {:.0}) | <= 200 ns, <= 2 KiB: {} |",
                    t.tenants,
                    t.one_ns,
                    t.rr_ns,
                    t.bytes_per_tenant,
                    t.parts[0],
                    t.parts[1],
                    t.parts[2],
                    if met { "met" } else { "MISSED" }
                );
            }
        }
        if let Some(a) = &self.audit {
            let _ = writeln!(s, "\n| audit log | median (min..max) | target |");
            let _ = writeln!(s, "|---|---|---|");
            let _ = writeln!(
                s,
                "| events appended/s ({} events over {} logs, each caller awaiting its event, checkpoint every 100) | {} | >= 20,000/s: {} |",
                a.appended,
                crate::audit::LOGS,
                fmt_summary(&a.appends_per_sec),
                if a.appends_per_sec.median >= 20_000.0 { "met" } else { "MISSED" }
            );
            let _ = writeln!(
                s,
                "| the same, each caller handing over {} events at once (runtime batches) | {} | |",
                crate::audit::RUNTIME_BATCH,
                fmt_summary(&a.batched_per_sec),
            );
            let scaled = a.verify_secs.median * 100_000.0 / a.verified.max(1) as f64;
            let _ = writeln!(
                s,
                "| verify {} events offline (s) | {:.3} ({:.3}..{:.3}) | 100,000 in <= 2 s: {} |",
                a.verified,
                a.verify_secs.median,
                a.verify_secs.min,
                a.verify_secs.max,
                if scaled <= 2.0 { "met" } else { "MISSED" }
            );
        }
        if let Some(l) = &self.logins {
            let verdict = |met: bool| if met { "met" } else { "MISSED" };
            let _ = writeln!(
                s,
                "\n| logins: raw async-nats client, connect + flush, then close | static .creds: median (min..max) | API key via auth callout: median (min..max) | target (API key) |"
            );
            let _ = writeln!(s, "|---|---|---|---|");
            let c = l.concurrency;
            let lines: [(String, &[Summary; 2], String); 6] = [
                (
                    "connect p50, sequential (ms)".into(),
                    &l.seq_p50_ms,
                    format!("<= {LOGIN_P50_TARGET_MS} ms: {}", verdict(l.p50_met())),
                ),
                (
                    "connect p99, sequential (ms)".into(),
                    &l.seq_p99_ms,
                    String::new(),
                ),
                (
                    "connects/s, sequential".into(),
                    &l.seq_per_sec,
                    String::new(),
                ),
                (
                    format!("connect p50, {c} at once (ms)"),
                    &l.conc_p50_ms,
                    String::new(),
                ),
                (
                    format!("connect p99, {c} at once (ms)"),
                    &l.conc_p99_ms,
                    String::new(),
                ),
                (
                    format!("connects/s, {c} at once"),
                    &l.conc_per_sec,
                    format!(">= {LOGIN_RATE_TARGET}/s: {}", verdict(l.rate_met())),
                ),
            ];
            for (name, v, target) in lines {
                let _ = writeln!(
                    s,
                    "| {name} | {} | {} | {target} |",
                    fmt_summary(&v[0]),
                    fmt_summary(&v[1])
                );
            }
        }
        if let Some(m) = &self.metering {
            let verdict = |met: bool| if met { "met" } else { "MISSED" };
            let _ = writeln!(
                s,
                "\n| metering and policing (operator mode, controller polling every {} ms) | median (min..max) | target |",
                m.poll_ms
            );
            let _ = writeln!(s, "|---|---|---|");
            let _ = writeln!(
                s,
                "| pub->sub 128 B msgs/s, raw client with .creds, controller polling usage + policing ({} msgs per run) | {} | |",
                m.count,
                fmt_summary(&m.on_msgs_per_sec)
            );
            let _ = writeln!(
                s,
                "| the same, controller stopped | {} | |",
                fmt_summary(&m.off_msgs_per_sec)
            );
            let _ = writeln!(
                s,
                "| metering overhead on throughput (1 - on/off, per pair) | {:.1} % ({:.1} %..{:.1} %) | <= {:.0} %: {} |",
                m.overhead.median * 100.0,
                m.overhead.min * 100.0,
                m.overhead.max * 100.0,
                METERING_OVERHEAD_TARGET * 100.0,
                verdict(m.overhead_met())
            );
            let _ = writeln!(
                s,
                "| controller CPU during the runs, % of one core: polling / stopped | {:.1} % ({:.1}..{:.1}) / {:.1} % ({:.1}..{:.1}) | |",
                m.controller_cpu[0].median * 100.0,
                m.controller_cpu[0].min * 100.0,
                m.controller_cpu[0].max * 100.0,
                m.controller_cpu[1].median * 100.0,
                m.controller_cpu[1].min * 100.0,
                m.controller_cpu[1].max * 100.0,
            );
            let _ = writeln!(
                s,
                "| messages metered (server counters) / published | {} / {} | all: {} |",
                m.metered,
                m.published,
                verdict(m.metered >= m.published)
            );
            let _ = writeln!(
                s,
                "| policing: flood at {} msgs/s against a cap of {}/s, first publish -> connection closed (ms) | {:.0} ({:.0}..{:.0}) | <= 2 polls + {} ms = {:.0} ms (docs/bounds.md), every flood: {} |",
                fmt_num(m.flood_per_sec.median),
                m.cap_per_sec,
                m.cut_after_ms.median,
                m.cut_after_ms.min,
                m.cut_after_ms.max,
                crate::metering::CUT_ALLOWANCE.as_millis(),
                m.bound_ms(),
                verdict(m.bound_met())
            );
        }
        if let Some(o) = &self.onboarding_ms {
            let _ = writeln!(
                s,
                "\nTenant onboarding (create tenant + account, issue agent credential, connect, first publish accepted): {:.1} ms median ({:.1}..{:.1}); target <= 250 ms: {}",
                o.median,
                o.min,
                o.max,
                if o.median <= 250.0 { "met" } else { "MISSED" }
            );
        }
        s
    }

    /// The full `BENCHMARKS.md` text around `table`.
    pub fn markdown(&self, table: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# Benchmarks\n");
        let _ = writeln!(
            s,
            "Generated by `{}` on {}. Raw async-nats and agentbus measured in the same run against the same local nats-server; each figure is the median of {} repeat(s) with min..max; every measurement ran in a fresh process (peak RSS is that process's).\n",
            if self.quick { "agentbus bench --quick" } else { "agentbus bench --out BENCHMARKS.md" },
            machine(),
            self.repeats
        );
        let _ = writeln!(
            s,
            "Server: {}. Request/reply latency {}.\n",
            self.server_version,
            if self.latency_pinned {
                "with server and client pinned to CPU 0 (taskset)"
            } else {
                "unpinned"
            }
        );
        s.push_str(table);
        let misses: Vec<String> = self
            .rows
            .iter()
            .filter_map(|r| {
                r.miss().map(|m| {
                    format!(
                        "- {}: {:.2}x against a target of {:.2}x (short by {:.2})",
                        r.name,
                        r.ratio(),
                        r.target.unwrap_or(0.0),
                        m
                    )
                })
            })
            .collect();
        if !misses.is_empty() {
            let _ = writeln!(s, "\nTargets missed in this run:\n");
            for m in misses {
                let _ = writeln!(s, "{m}");
            }
        }
        s
    }
}

/// A one-line description of this machine.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    format!(
        "{cpus} vCPU ({model}), {mem_gib:.0} GiB RAM, {} {}",
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}
