//! The two-tenant demo: agents of `acme` and `globex` exchange sealed messages on
//! one local nats-server in operator mode, using the same relative subjects, and
//! every cross-tenant attempt gets nothing.
//!
//! Run: `scripts/demo` (installs nats-server on first use). `--help` for options.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_runtime::tiers::Tier;
use agentbus_control::api::CreateTenant;
use agentbus_control::local_server::{LocalServer, ServerOptions};
use agentbus_control::{AdminClient, Controller, ControllerConfig, Installation};
use futures::StreamExt as _;
use tenant_bus::{CredentialBundle, DropReason, TenantNamespace};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const HELP: &str = "agentbus demo: two tenants on one NATS server, sealed and isolated.

Usage: scripts/demo [--keep]

Starts a local nats-server in operator mode (one NATS account per tenant), creates
tenants acme and globex, issues agent credentials, runs a request/reply and a
publish/subscribe exchange in each tenant on the same relative subjects, then makes
cross-tenant attempts (the library's namespace, a raw NATS client, a replayed and a
forged message) and reports that each got nothing.

Options:
  --keep    keep the state directory (printed) instead of removing it
  -h, --help  this text";

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{HELP}");
        return;
    }
    if let Some(bad) = args.iter().find(|a| *a != "--keep") {
        eprintln!("demo: unknown argument {bad:?} (see --help)");
        std::process::exit(2);
    }
    let keep = args.iter().any(|a| a == "--keep");
    match run(keep).await {
        Ok(true) => {
            println!("\nDEMO OK: both tenants served, every cross-tenant attempt got nothing.")
        }
        Ok(false) => {
            println!("\nDEMO FAILED: an isolation check did not hold (see above).");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("demo: {e}");
            std::process::exit(1);
        }
    }
}

fn check(ok: bool, what: &str) -> bool {
    println!("  [{}] {what}", if ok { "ok" } else { "FAIL" });
    ok
}

async fn run(keep: bool) -> Result<bool> {
    let state = tempfile::Builder::new()
        .prefix("agentbus-demo-")
        .tempdir()?;
    let state_dir = state.path().join("state");
    println!(
        "== control plane: operator, accounts, KEK (state in {})",
        state_dir.display()
    );
    let mut install = Installation::init(&state_dir)?;
    let config = install.server_config(&install.default_server_options());
    let server = LocalServer::start(ServerOptions::new().config(config))?;
    println!(
        "   nats-server (operator mode, JetStream) at {}",
        server.url()
    );
    install.set_urls(vec![server.url()], 1)?;
    let controller = Controller::connect(&install, ControllerConfig::new(server.url())).await?;
    let shutdown = agentbus_control::controller::shutdown::Shutdown::new();
    tokio::spawn(controller.serve(shutdown.clone()));
    let cp = AdminClient::connect(&server.url(), &install.creds("admin.creds")?).await?;
    println!("   controller serving (state in NATS KV); admin client connected");

    let mut bundles = Vec::new();
    for tenant in ["acme", "globex"] {
        let req = CreateTenant {
            tier: Some(Tier::Pro.to_string()),
            agent_types: vec!["planner".into(), "worker".into()],
            ..Default::default()
        };
        cp.create_tenant_with(tenant, &req).await?;
        let planner = cp.issue_agent(tenant, "planner", "planner").await?;
        let worker = cp.issue_agent(tenant, "worker", "worker").await?;
        println!("   tenant {tenant}: own NATS account, agents planner + worker issued");
        bundles.push((planner, worker));
    }

    let mut all_ok = true;
    println!("\n== each tenant: request/reply and pub/sub on the same relative subjects");
    let mut namespaces = Vec::new();
    for (planner_bundle, worker_bundle) in &bundles {
        let planner = TenantNamespace::connect(planner_bundle).await?;
        let worker = TenantNamespace::connect(worker_bundle).await?;
        let tenant = planner.tenant().to_string();

        // The worker answers "jobs.summarize" requests.
        let mut requests = worker.subscribe("jobs.summarize").await?;
        let responder = worker.clone();
        tokio::spawn(async move {
            while let Some(req) = requests.next().await {
                let text = String::from_utf8_lossy(&req.payload).to_string();
                let answer = format!("summary of '{text}' by {}", responder.agent());
                let _ = responder.respond(&req, answer).await;
            }
        });
        let reply = planner
            .request("jobs.summarize", format!("{tenant} quarterly report"))
            .await?;
        let text = String::from_utf8_lossy(&reply.payload).to_string();
        println!(
            "   {tenant}: planner asked, got sealed reply: \"{text}\" (from {:?})",
            reply.sender.as_ref().map(|s| s.as_str())
        );
        all_ok &= check(
            text.contains(&tenant),
            &format!("{tenant} reply came from its own worker"),
        );
        namespaces.push((planner, worker));
    }

    println!("\n== cross-tenant attempts (globex against acme)");
    let (acme_planner, acme_worker) = &namespaces[0];
    let (globex_planner, _) = &namespaces[1];

    // 1. globex's namespace subscribes to everything it can name: only its own.
    let seen_by_globex = Arc::new(Mutex::new(Vec::new()));
    let mut everything = globex_planner.subscribe(">").await?;
    let sink = seen_by_globex.clone();
    tokio::spawn(async move {
        while let Some(m) = everything.next().await {
            if let Ok(mut v) = sink.lock() {
                v.push(m.tenant.to_string());
            }
        }
    });
    let mut acme_events = acme_worker.subscribe("events.>").await?;
    for i in 0..5 {
        acme_planner
            .publish(format!("events.order-{i}").as_str(), b"secret acme order")
            .await?;
    }
    let mut acme_got = 0;
    while acme_got < 5 {
        match tokio::time::timeout(Duration::from_secs(2), acme_events.next()).await {
            Ok(Some(_)) => acme_got += 1,
            _ => break,
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let leaked = seen_by_globex
        .lock()
        .map(|v| v.iter().filter(|t| *t == "acme").count())
        .unwrap_or(usize::MAX);
    all_ok &= check(acme_got == 5, "acme's own subscriber received its 5 events");
    all_ok &= check(
        leaked == 0,
        "globex subscribed to '>' in its namespace: received 0 acme messages",
    );

    // 2. A raw NATS client with globex's credentials, bypassing the library.
    let globex_creds = bundles[1].0.creds.clone().unwrap_or_default();
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = violations.clone();
    let raw = async_nats::ConnectOptions::with_credentials(&globex_creds)?
        .custom_inbox_prefix("tenant.globex._INBOX")
        .event_callback(move |event| {
            let sink = sink.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    if let Ok(mut v) = sink.lock() {
                        v.push(e.to_string());
                    }
                }
            }
        })
        .connect(server.url())
        .await?;
    let mut raw_sub = raw.subscribe("tenant.acme.>").await?;
    raw.publish("tenant.acme.jobs.summarize", "forged job".into())
        .await?;
    raw.flush().await?;
    for i in 0..3 {
        acme_planner
            .publish(format!("events.late-{i}").as_str(), b"more acme data")
            .await?;
    }
    let raw_got = tokio::time::timeout(Duration::from_millis(500), raw_sub.next()).await;
    let refused = violations
        .lock()
        .map(|v| {
            v.iter()
                .filter(|e| e.to_lowercase().contains("permissions violation"))
                .count()
        })
        .unwrap_or(0);
    all_ok &= check(
        !matches!(raw_got, Ok(Some(_))),
        "raw client with globex creds subscribed to 'tenant.acme.>': received nothing",
    );
    all_ok &= check(
        refused >= 2,
        &format!(
            "the NATS server refused its subscribe and publish ({refused} permission violations)"
        ),
    );

    // 3. A captured acme message replayed, and a message forged with another key.
    let capture = acme_planner.nats().subscribe("tenant.acme.audit").await?;
    let mut capture = capture;
    let mut audit = acme_worker.subscribe("audit").await?;
    acme_planner.publish("audit", b"original").await?;
    let original = tokio::time::timeout(Duration::from_secs(2), capture.next())
        .await?
        .ok_or("no capture")?;
    let first = tokio::time::timeout(Duration::from_secs(2), audit.next()).await?;
    acme_planner
        .nats()
        .publish("tenant.acme.audit", original.payload.clone())
        .await?;
    let forged_keys =
        tenant_bus::MasterSecret::generate()?.key_set(acme_planner.tenant(), [1], 1)?;
    let forger = tenant_bus::envelope::Sealer::new(Arc::new(forged_keys), None)?;
    let (_, forged) = forger.seal("tenant.acme.audit", None, b"forged")?;
    acme_planner
        .nats()
        .publish("tenant.acme.audit", forged)
        .await?;
    let second = tokio::time::timeout(Duration::from_millis(500), audit.next()).await;
    let drops = acme_worker.counters().snapshot();
    all_ok &= check(
        first.is_some(),
        "acme worker received the original audit message",
    );
    all_ok &= check(
        !matches!(second, Ok(Some(_))),
        "a replay of it and a message forged with another key were not delivered",
    );
    all_ok &= check(
        drops.dropped(DropReason::Replay) == 1 && drops.dropped(DropReason::Authentication) == 1,
        &format!(
            "acme worker counted them: replay={}, authentication={}",
            drops.dropped(DropReason::Replay),
            drops.dropped(DropReason::Authentication)
        ),
    );

    // 4. Suspension: the server closes globex's connections.
    cp.suspend_tenant("globex").await?;
    let refused_after = TenantNamespace::connect(&bundles[1].1).await.is_err();
    all_ok &= check(
        refused_after,
        "after `suspend globex`, globex cannot connect",
    );
    cp.activate_tenant("globex").await?;
    let back = reconnect(&bundles[1].1).await;
    all_ok &= check(back, "after `activate globex`, globex connects again");

    if keep {
        let kept = state.keep();
        println!("\nstate kept in {}", kept.display());
    }
    shutdown.fire();
    Ok(all_ok)
}

async fn reconnect(bundle: &CredentialBundle) -> bool {
    for _ in 0..20 {
        if TenantNamespace::connect(bundle).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
