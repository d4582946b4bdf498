//! Python interop demo: a Python agent (`clients/python/examples/agent.py`, on the
//! `tenantbus` package) and a Rust agent of the same tenant exchange sealed
//! messages and tasks on a local nats-server in operator mode.
//!
//! The control plane is set up as in `demo.rs`; the tenant `demo` gets two agents,
//! `rust-agent` (this process) and `py-agent` (the Python process, given its
//! bundle file). Both ways: a sealed publish, a sealed request/reply and a task
//! dispatched to the other side's worker.
//!
//! Run: `scripts/demo` (when Python and the package are available), or
//! `cargo run -p agentbus-examples --example python_demo -- PYTHON` with a Python
//! that can `import tenantbus`.

use std::process::Stdio;
use std::time::Duration;

use agent_runtime::dispatch::{DispatchOptions, Dispatcher, Task, TaskOutcome, WorkerOptions};
use agent_runtime::tiers::Tier;
use agentbus_control::api::CreateTenant;
use agentbus_control::local_server::{LocalServer, ServerOptions};
use agentbus_control::{AdminClient, Controller, ControllerConfig, Installation};
use futures::StreamExt as _;
use tenant_bus::TenantNamespace;
use tokio::io::AsyncBufReadExt as _;
use tokio::sync::mpsc;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const HELP: &str = "agentbus python demo: a Python agent and a Rust agent of one tenant.

Usage: python_demo [PYTHON]

PYTHON is an interpreter that can `import tenantbus` (default: $TENANTBUS_PYTHON,
then python3). Runs clients/python/examples/agent.py against a Rust agent on a
local nats-server in operator mode; prints each check and ends with PYTHON DEMO OK.";

/// How long each step may take.
const STEP: Duration = Duration::from_secs(20);

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") || args.len() > 1 {
        println!("{HELP}");
        return;
    }
    let python = args
        .first()
        .cloned()
        .or_else(|| std::env::var("TENANTBUS_PYTHON").ok())
        .unwrap_or_else(|| "python3".to_string());
    match run(&python).await {
        Ok(true) => println!("\nPYTHON DEMO OK: sealed messages and tasks both ways."),
        Ok(false) => {
            println!("\nPYTHON DEMO FAILED: a check did not hold (see above).");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("python demo: {e}");
            std::process::exit(1);
        }
    }
}

fn check(ok: bool, what: &str) -> bool {
    println!("  [{}] {what}", if ok { "ok" } else { "FAIL" });
    ok
}

/// What the Rust agent saw the Python agent do.
#[derive(Debug)]
enum Seen {
    Event(String, Option<String>),
    Request(String, Option<String>),
    Task(String, Option<String>),
}

/// The next line of the Python agent (echoed), or `None` at its end or timeout.
async fn next_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> Option<String> {
    match tokio::time::timeout(STEP, lines.next_line()).await {
        Ok(Ok(Some(line))) => {
            println!("   python| {line}");
            Some(line)
        }
        _ => None,
    }
}

async fn run(python: &str) -> Result<bool> {
    let agent_py = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../clients/python/examples/agent.py");
    let state = tempfile::Builder::new()
        .prefix("agentbus-pydemo-")
        .tempdir()?;
    let state_dir = state.path().join("state");
    println!("== python interop: one tenant, a Rust agent and a Python agent");
    let mut install = Installation::init(&state_dir)?;
    let config = install.server_config(&install.default_server_options());
    let server = LocalServer::start(ServerOptions::new().config(config))?;
    install.set_urls(vec![server.url()], 1)?;
    let controller = Controller::connect(&install, ControllerConfig::new(server.url())).await?;
    let shutdown = agentbus_control::controller::shutdown::Shutdown::new();
    tokio::spawn(controller.serve(shutdown.clone()));
    let cp = AdminClient::connect(&server.url(), &install.creds("admin.creds")?).await?;
    let req = CreateTenant {
        tier: Some(Tier::Pro.to_string()),
        agent_types: vec!["planner".into(), "worker".into()],
        ..Default::default()
    };
    cp.create_tenant_with("demo", &req).await?;
    let rust_bundle = cp.issue_agent("demo", "rust-agent", "planner").await?;
    let py_bundle = cp.issue_agent("demo", "py-agent", "worker").await?;
    let py_bundle_path = state.path().join("py-agent.json");
    py_bundle.write_to_file(&py_bundle_path)?;
    println!(
        "   nats-server at {}; tenant demo: agents rust-agent (Rust) and py-agent (Python, bundle {})",
        server.url(),
        py_bundle_path.display()
    );

    // The Rust agent: a service, an event subscriber and a task worker.
    let ns = TenantNamespace::connect(&rust_bundle).await?;
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Seen>();
    let mut echo = ns.subscribe("rust.echo").await?;
    let responder = ns.clone();
    let tx = seen_tx.clone();
    tokio::spawn(async move {
        while let Some(req) = echo.next().await {
            let text = String::from_utf8_lossy(&req.payload).to_string();
            let sender = req.sender.as_ref().map(|s| s.to_string());
            let _ = responder
                .respond(&req, format!("rust echo: {text}").into_bytes())
                .await;
            let _ = tx.send(Seen::Request(text, sender));
        }
    });
    let mut events = ns.subscribe("events.>").await?;
    let tx = seen_tx.clone();
    tokio::spawn(async move {
        while let Some(m) = events.next().await {
            let text = String::from_utf8_lossy(&m.payload).to_string();
            let _ = tx.send(Seen::Event(text, m.sender.as_ref().map(|s| s.to_string())));
        }
    });
    let dispatcher = Dispatcher::new(&ns, DispatchOptions::new()).await?;
    let tx = seen_tx.clone();
    let worker = dispatcher
        .worker(
            "translate",
            move |task: Task| {
                let tx = tx.clone();
                async move {
                    let text = String::from_utf8_lossy(&task.payload).to_string();
                    let out = format!("translated: {text}").into_bytes();
                    let _ = tx.send(Seen::Task(
                        text,
                        task.sender.as_ref().map(|s| s.to_string()),
                    ));
                    Ok::<_, String>(out)
                }
            },
            WorkerOptions::new().concurrency(2),
        )
        .await?;
    drop(seen_tx);

    // The Python agent.
    let mut child = tokio::process::Command::new(python)
        .arg(&agent_py)
        .arg(&py_bundle_path)
        .args(["--peer", "rust-agent"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting {python} {}: {e}", agent_py.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut ready = false;
    while let Some(line) = next_line(&mut lines).await {
        if line == "READY" {
            ready = true;
            break;
        }
    }
    let mut all_ok = check(ready, "the Python agent joined the tenant and serves");
    // Keep echoing its output while this side works.
    let echoing = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Some(line) = next_line(&mut lines).await {
            all.push(line);
        }
        all
    });

    if ready {
        // Rust -> Python: a sealed request and a task.
        let reply = ns
            .request("py.summarize", b"quarterly report".to_vec())
            .await;
        let (text, sender) = match &reply {
            Ok(r) => (
                String::from_utf8_lossy(&r.payload).to_string(),
                r.sender.as_ref().map(|s| s.to_string()),
            ),
            Err(e) => (format!("error: {e}"), None),
        };
        all_ok &= check(
            text == "summary by python of 'quarterly report'"
                && sender.as_deref() == Some("py-agent"),
            &format!("Rust asked py.summarize, sealed reply from {sender:?}: {text:?}"),
        );
        let mut handle = dispatcher.dispatch("summarize", b"long text").await?;
        let outcome = handle.wait(STEP).await;
        all_ok &= check(
            matches!(&outcome, Ok(TaskOutcome::Completed(out)) if out.as_ref() == b"python summarized: long text"),
            &format!("Rust dispatched a summarize task, the Python worker ran it: {outcome:?}"),
        );

        // Python -> Rust: what the Rust agent saw.
        let mut event = None;
        let mut request = None;
        let mut task = None;
        let deadline = tokio::time::Instant::now() + STEP;
        while event.is_none() || request.is_none() || task.is_none() {
            match tokio::time::timeout_at(deadline, seen_rx.recv()).await {
                Ok(Some(Seen::Event(t, s))) => event = Some((t, s)),
                Ok(Some(Seen::Request(t, s))) => request = Some((t, s)),
                Ok(Some(Seen::Task(t, s))) => task = Some((t, s)),
                _ => break,
            }
        }
        let from_py = |x: &Option<(String, Option<String>)>, want: &str| matches!(x, Some((t, Some(s))) if t == want && s == "py-agent");
        all_ok &= check(
            from_py(&event, "hello from python"),
            &format!("Rust received the Python agent's sealed event: {event:?}"),
        );
        all_ok &= check(
            from_py(&request, "ping from python"),
            &format!("Rust answered the Python agent's sealed request: {request:?}"),
        );
        all_ok &= check(
            from_py(&task, "bonjour"),
            &format!("the Rust worker ran the Python agent's translate task: {task:?}"),
        );
        ns.publish("demo.stop", b"done".to_vec()).await?;
        ns.flush().await?;
    }

    let status = match tokio::time::timeout(STEP, child.wait()).await {
        Ok(s) => s.ok(),
        Err(_) => {
            let _ = child.kill().await;
            None
        }
    };
    let python_lines = echoing.await.unwrap_or_default();
    all_ok &= check(
        status.map(|s| s.success()).unwrap_or(false)
            && python_lines.iter().any(|l| l == "PYTHON AGENT DONE"),
        "the Python agent's own checks held and it exited 0",
    );
    let drops = ns.counters().snapshot();
    all_ok &= check(
        drops.dropped_total() == 0,
        &format!(
            "the Rust agent dropped nothing ({} delivered)",
            drops.delivered
        ),
    );
    worker.shutdown(Duration::from_secs(5)).await;
    shutdown.fire();
    Ok(all_ok)
}
