//! Logins: how long a raw async-nats client takes to connect (connect + one
//! flush round trip) with an issued agent's static `.creds` against an API key
//! through the controller's auth callout, and how many connects per second
//! each sustains, sequentially and with several connectors at once.
//!
//! The deployment (server, controller, tenant, agent, key) lives in the `bench`
//! process; the connecting clients run in a worker process per run
//! (`agentbus bench-worker logins`), so the controller's and the clients' CPU
//! are not one process's. Every connection is closed after its flush: a key
//! login holds one of the tenant's `max_agents` slots until the server reports
//! the disconnect, so the tenant is created with caps far above what a run
//! keeps open.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};

use crate::platform::OperatorPlatform;
use crate::stats::{peak_rss_kib, quantile};
use crate::BenchError;

/// The tenant the logins go to.
const TENANT: &str = "logins";
/// `max_agents` and `max_connections` of that tenant: far above the handful of
/// connections a run has open at once (slots free asynchronously, on the
/// server's disconnect events).
const CAP: &str = "10000";
/// How long one connect may take before the run fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How a login authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Auth {
    /// An issued agent's `.creds` (user JWT + nkey seed): the server checks the
    /// JWT's signature chain itself.
    Creds,
    /// An API key as the connect token: the server asks the auth callout.
    Key,
}

impl Auth {
    fn arg(self) -> &'static str {
        match self {
            Auth::Creds => "creds",
            Auth::Key => "key",
        }
    }
}

/// Arguments of the logins measurement.
#[derive(Debug, Clone, Args)]
pub struct LoginsArgs {
    /// Server URL (operator mode, auth callout configured).
    #[arg(long)]
    pub url: String,
    /// `.creds` or an API key.
    #[arg(long, value_enum)]
    pub auth: Auth,
    /// A file holding the `.creds` text or the key (not an argument: argument
    /// lists are visible to every user of the machine).
    #[arg(long)]
    pub secret_file: PathBuf,
    /// Sequential connects timed (after a warm-up of a tenth, at least 5).
    #[arg(long)]
    pub count: u64,
    /// Connects timed in the concurrent phase, over all connectors.
    #[arg(long)]
    pub concurrent_count: u64,
    /// Connectors at once in the concurrent phase.
    #[arg(long)]
    pub concurrency: usize,
}

/// Connector options for `auth` with `secret` (built per connect: a client
/// does this once per connection too).
fn options(auth: Auth, secret: &str) -> Result<async_nats::ConnectOptions, BenchError> {
    let opts = match auth {
        Auth::Creds => async_nats::ConnectOptions::with_credentials(secret)
            .map_err(|e| BenchError(format!("creds: {e}")))?,
        Auth::Key => async_nats::ConnectOptions::with_token(secret.to_string()),
    };
    // A refused login must end the run, not retry in the background.
    Ok(opts
        .connection_timeout(CONNECT_TIMEOUT)
        .max_reconnects(Some(0)))
}

/// One login: connect and one flush round trip (the server has accepted the
/// connection and answers it), timed; then the connection is closed.
async fn connect_once(url: &str, auth: Auth, secret: &str) -> Result<f64, BenchError> {
    let opts = options(auth, secret)?;
    let t = Instant::now();
    let client = opts
        .connect(url)
        .await
        .map_err(|e| BenchError(format!("{} login: {e}", auth.arg())))?;
    client
        .flush()
        .await
        .map_err(|e| BenchError(format!("{} login, flush: {e}", auth.arg())))?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    // The last handle: its connection task ends and the socket closes, which
    // the server reports as a disconnect (freeing a key login's slot).
    drop(client);
    Ok(ms)
}

/// The worker side: sequential connects, then `concurrency` connectors at once;
/// latency quantiles (ms) and connects per second (closing included) of each.
pub async fn measure(a: LoginsArgs) -> Result<serde_json::Value, BenchError> {
    let secret = std::fs::read_to_string(&a.secret_file)
        .map_err(|e| BenchError(format!("reading {}: {e}", a.secret_file.display())))?;
    let secret = secret.trim();
    let count = a.count.max(1);
    let warmup = (count / 10).max(5);
    for _ in 0..warmup {
        connect_once(&a.url, a.auth, secret).await?;
    }
    let mut seq = Vec::with_capacity(count as usize);
    let t = Instant::now();
    for _ in 0..count {
        seq.push(connect_once(&a.url, a.auth, secret).await?);
    }
    let seq_secs = t.elapsed().as_secs_f64().max(1e-9);

    let connectors = a.concurrency.max(1);
    let each = (a.concurrent_count / connectors as u64).max(1);
    let t = Instant::now();
    let per_connector = futures::future::try_join_all((0..connectors).map(|_| async {
        let mut v = Vec::with_capacity(each as usize);
        for _ in 0..each {
            v.push(connect_once(&a.url, a.auth, secret).await?);
        }
        Ok::<_, BenchError>(v)
    }))
    .await?;
    let conc_secs = t.elapsed().as_secs_f64().max(1e-9);
    let mut conc: Vec<f64> = per_connector.into_iter().flatten().collect();

    seq.sort_by(|a, b| a.total_cmp(b));
    conc.sort_by(|a, b| a.total_cmp(b));
    Ok(serde_json::json!({
        "seq_p50_ms": quantile(&seq, 0.5),
        "seq_p99_ms": quantile(&seq, 0.99),
        "seq_per_sec": seq.len() as f64 / seq_secs,
        "conc_p50_ms": quantile(&conc, 0.5),
        "conc_p99_ms": quantile(&conc, 0.99),
        "conc_per_sec": conc.len() as f64 / conc_secs,
        "logins": warmup + seq.len() as u64 + conc.len() as u64,
        "peak_rss_kib": peak_rss_kib(),
    }))
}

/// Counts of one logins run.
#[derive(Debug, Clone, Copy)]
pub struct LoginPlan {
    /// Sequential connects timed per run.
    pub count: u64,
    /// Concurrent connects timed per run.
    pub concurrent_count: u64,
    /// Connectors at once.
    pub concurrency: usize,
    /// Runs per kind of login.
    pub repeats: usize,
}

/// The parent side: starts an operator-mode deployment, creates the tenant
/// (`max_agents` and `max_connections` 10,000), an agent and an API key,
/// waits until both log in, then runs a worker per run, alternating which kind
/// goes first so drift affects both. Returns the `.creds` runs, then the key runs.
pub async fn run(
    exe: &Path,
    plan: LoginPlan,
    progress: impl Fn(&str),
) -> Result<[Vec<serde_json::Value>; 2], BenchError> {
    let api = |e: agentbus_control::ApiError| BenchError(e.to_string());
    let p = OperatorPlatform::start().await?;
    let mut req = agentbus_control::api::CreateTenant {
        tier: Some("free".into()),
        ..Default::default()
    };
    req.quotas.insert("max_agents".into(), CAP.into());
    req.quotas.insert("max_connections".into(), CAP.into());
    p.cp.create_tenant_with(TENANT, &req).await.map_err(api)?;
    let agent =
        p.cp.create_agent(TENANT, "static", "default")
            .await
            .map_err(api)?;
    let creds = agent
        .bundle
        .creds
        .ok_or_else(|| BenchError("the issued agent has no .creds".into()))?;
    let key =
        p.cp.create_apikey(
            TENANT,
            &agentbus_control::api::CreateApiKey {
                name: "bench".into(),
                ..Default::default()
            },
        )
        .await
        .map_err(api)?
        .key;
    // In the platform's private temporary directory (0700), removed with it.
    let files = [
        (Auth::Creds, p.scratch().join("static.creds"), creds),
        (Auth::Key, p.scratch().join("bench.key"), key),
    ];
    let url = p.url();
    for (auth, path, secret) in &files {
        std::fs::write(path, secret)
            .map_err(|e| BenchError(format!("writing {}: {e}", path.display())))?;
        // The callout subscription and the tenant's account claims reach the
        // server asynchronously after start-up and creation: wait for a first
        // login of each kind instead of timing that.
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = connect_once(&url, *auth, secret.trim()).await {
            if Instant::now() > deadline {
                return Err(BenchError(format!(
                    "no {} login within 10 s: {e}",
                    auth.arg()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let (count, concurrent, concurrency) = (
        plan.count.to_string(),
        plan.concurrent_count.to_string(),
        plan.concurrency.to_string(),
    );
    let counters = p
        .controller
        .callout_counters()
        .ok_or_else(|| BenchError("the controller runs no auth callout".into()))?;
    let allowed_before = counters.allowed.load(Ordering::Relaxed);
    let mut runs: [Vec<serde_json::Value>; 2] = [Vec::new(), Vec::new()];
    let repeats = plan.repeats.max(1);
    for r in 0..repeats {
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (auth, path, _) = &files[i];
            progress(&format!(
                "logins by {}, repeat {}/{repeats}",
                auth.arg(),
                r + 1
            ));
            let args: Vec<String> = [
                "logins",
                "--url",
                &url,
                "--auth",
                auth.arg(),
                "--secret-file",
                &path.to_string_lossy(),
                "--count",
                &count,
                "--concurrent-count",
                &concurrent,
                "--concurrency",
                &concurrency,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let exe = exe.to_path_buf();
            // Off the runtime: waiting for the worker blocks a thread, and the
            // controller answering its logins runs on this runtime.
            let value = tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                crate::worker(&exe, None, &args)
            })
            .await
            .map_err(|e| BenchError(format!("logins worker: {e}")))??;
            runs[i].push(value);
        }
    }
    // Every timed key login went through the callout (not, say, a cached
    // session): the callout allowed exactly as many as the workers made.
    let allowed = counters.allowed.load(Ordering::Relaxed) - allowed_before;
    let made: u64 = runs[1]
        .iter()
        .filter_map(|v| v.get("logins").and_then(|x| x.as_u64()))
        .sum();
    if allowed != made {
        return Err(BenchError(format!(
            "the auth callout allowed {allowed} logins, the workers made {made}"
        )));
    }
    Ok(runs)
}
