//! Task dispatch for two tenants on a local JetStream nats-server: workers with a
//! concurrency cap, a task that fails once and succeeds on retry, a task that
//! keeps failing and is dead-lettered with its reason, and a duplicate submission
//! that runs once.
//!
//! Run: `cargo run -p agentbus-examples --example task_dispatch`
//! (needs nats-server: `scripts/install-nats-server.sh`, `NATS_SERVER_BIN` or PATH).

use std::time::Duration;

use agent_runtime::dispatch::{DispatchOptions, Dispatcher, Task, TaskOutcome, WorkerOptions};
use agent_runtime::registry::{Registry, RegistryWatcher, TenantGate, TenantSettings};
use agent_runtime::tiers::Tier;
use agentbus_control::local_server::{LocalServer, ServerOptions};
use bytes::Bytes;
use tenant_bus::{AgentId, CredentialBundle, MasterSecret, TenantId, TenantNamespace};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("task_dispatch: {e}");
        std::process::exit(1);
    }
}

async fn connect(
    url: &str,
    master: &MasterSecret,
    tenant: &TenantId,
    agent: &str,
) -> Result<TenantNamespace> {
    let bundle = CredentialBundle {
        url: url.to_string(),
        tenant: tenant.clone(),
        agent: AgentId::new(agent)?,
        creds: None,
        keys: master.key_set(tenant, [1], 1)?,
        placement: Default::default(),
    };
    Ok(TenantNamespace::connect(&bundle).await?)
}

fn show(tenant: &TenantId, what: &str, outcome: &TaskOutcome) {
    match outcome {
        TaskOutcome::Completed(out) => {
            println!(
                "  [{tenant}] {what}: completed -> {:?}",
                String::from_utf8_lossy(out)
            )
        }
        TaskOutcome::DeadLettered { reason, deliveries } => {
            println!("  [{tenant}] {what}: dead-lettered after {deliveries} deliveries: {reason}")
        }
    }
}

async fn run() -> Result<()> {
    let server = LocalServer::start(ServerOptions::new().jetstream(true))?;
    let url = server.url();
    println!("nats-server with JetStream at {url}");

    // The registry (platform side): two tenants.
    let registry = Registry::open(async_nats::connect(url.as_str()).await?).await?;
    let acme = TenantId::new("acme")?;
    let globex = TenantId::new("globex")?;
    registry
        .create(
            "acme",
            "Acme Corp",
            Tier::Pro,
            TenantSettings::new().allow_agent_type("worker"),
        )
        .await?;
    registry
        .create(
            "globex",
            "Globex",
            Tier::Free,
            TenantSettings::new().allow_agent_type("worker"),
        )
        .await?;
    let watcher = std::sync::Arc::new(RegistryWatcher::start(&registry).await?);
    println!(
        "registry: {} tenants ({})",
        watcher.len(),
        registry
            .list()
            .await?
            .iter()
            .map(|r| r.id.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let master = MasterSecret::generate()?;
    // This server has no accounts, so both tenants share one: name the streams
    // per tenant. (In operator mode each tenant's stream is `TASKS` in its own account.)
    let options = |tenant: &TenantId| {
        DispatchOptions::new()
            .per_tenant_names(true)
            .max_deliveries(3)
            .backoff(vec![Duration::from_millis(200), Duration::from_millis(400)])
            .gate(TenantGate::new(watcher.clone(), tenant.clone()))
    };

    // --- acme: thumbnails; "flaky.png" fails on its first delivery.
    let acme_ns = connect(&url, &master, &acme, "uploader").await?;
    let acme_tasks = Dispatcher::new(&acme_ns, options(&acme)).await?;
    let acme_worker_ns = connect(&url, &master, &acme, "thumbnailer").await?;
    let acme_workers = Dispatcher::new(&acme_worker_ns, options(&acme)).await?;
    let thumbs = acme_workers
        .worker(
            "thumbnail",
            |task: Task| async move {
                let name = String::from_utf8_lossy(&task.payload).to_string();
                println!(
                    "    acme worker: {name} (delivery {}/{})",
                    task.delivery, task.max_deliveries
                );
                if name == "flaky.png" && task.delivery == 1 {
                    return Err("storage timeout".to_string());
                }
                Ok(Bytes::from(format!("thumb-{name}")))
            },
            WorkerOptions::new().concurrency(2),
        )
        .await?;

    // --- globex: invoices; "broken-invoice" always fails.
    let globex_ns = connect(&url, &master, &globex, "billing").await?;
    let globex_tasks = Dispatcher::new(&globex_ns, options(&globex)).await?;
    let invoices = globex_tasks
        .worker(
            "invoice",
            |task: Task| async move {
                let name = String::from_utf8_lossy(&task.payload).to_string();
                println!(
                    "    globex worker: {name} (delivery {}/{})",
                    task.delivery, task.max_deliveries
                );
                if name == "broken-invoice" {
                    return Err("customer has no billing address".to_string());
                }
                Ok(Bytes::from(format!("{name} sent")))
            },
            WorkerOptions::new(),
        )
        .await?;

    println!("\n1. a task that succeeds at once, and one that is retried");
    let mut ok = acme_tasks.dispatch("thumbnail", "ok.png").await?;
    let mut flaky = acme_tasks.dispatch("thumbnail", "flaky.png").await?;
    show(&acme, "ok.png", &ok.wait(WAIT).await?);
    show(&acme, "flaky.png", &flaky.wait(WAIT).await?);

    println!("\n2. a task that keeps failing is dead-lettered");
    let mut good = globex_tasks.dispatch("invoice", "invoice-17").await?;
    let mut broken = globex_tasks.dispatch("invoice", "broken-invoice").await?;
    show(&globex, "invoice-17", &good.wait(WAIT).await?);
    show(&globex, "broken-invoice", &broken.wait(WAIT).await?);
    let mut letters = globex_tasks.dead_letters().await?;
    if let Some(letter) = letters.next(WAIT).await? {
        println!(
            "  [globex] dead letter on tasks.dead.{}: task {} reason {:?}, payload {:?}",
            letter.task_type,
            &letter.task_id[..12],
            letter.reason,
            letter
                .payload()
                .map(|p| String::from_utf8_lossy(&p).to_string())
                .unwrap_or_default()
        );
    }

    println!("\n3. the same sealed task submitted twice runs once");
    let task = acme_tasks.seal("thumbnail", b"twice.png")?;
    let mut handle = acme_tasks.handle(task.id()).await?;
    let first = acme_tasks.submit(&task).await?;
    let second = acme_tasks.submit(&task).await?;
    println!(
        "  [acme] submit #1: stream seq {} duplicate={}; submit #2: stream seq {} duplicate={}",
        first.sequence, first.duplicate, second.sequence, second.duplicate
    );
    show(&acme, "twice.png", &handle.wait(WAIT).await?);

    println!("\n4. suspension: a suspended tenant dispatches nothing");
    registry.suspend(&globex).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    match globex_tasks.dispatch("invoice", "while-suspended").await {
        Err(e) => println!("  [globex] dispatch refused: {e} (kind {:?})", e.kind()),
        Ok(_) => println!("  [globex] UNEXPECTED: dispatch accepted while suspended"),
    }
    registry.activate(&globex).await?;

    println!("\nworkers:");
    for (name, w) in [("acme/thumbnail", &thumbs), ("globex/invoice", &invoices)] {
        let s = w.stats();
        println!(
            "  {name}: runs {}, completed {}, retried {}, dead-lettered {}, duplicates skipped {}",
            s.runs(),
            s.completed(),
            s.retried(),
            s.dead_lettered(),
            s.duplicates()
        );
    }
    thumbs.shutdown(Duration::from_secs(5)).await;
    invoices.shutdown(Duration::from_secs(5)).await;
    println!(
        "\ndone: each tenant's tasks ran only in its own queue ({} and {}).",
        acme_tasks.stream_name(),
        globex_tasks.stream_name()
    );
    Ok(())
}
