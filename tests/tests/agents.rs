//! Agents on a real JetStream nats-server: registration checks, permissions that
//! never cross tenants, tools (permission, enablement, budget, rate), suspension
//! stopping everything and activation restoring it, drain on shutdown.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_runtime::agent::permissions::Resource;
use agent_runtime::agent::{Agent, AgentErrorKind, AgentHost, AgentState};
use agent_runtime::dispatch::{DispatchErrorKind, DispatchOptions, Dispatcher};
use agent_runtime::registry::{
    Registry, RegistryWatcher, SettingsPatch, TenantGate, TenantSettings, ToolSettings,
};
use agent_runtime::tiers::Tier;
use bytes::Bytes;
use nats_harness::{eventually, Server};
use tenant_bus::{AgentId, CredentialBundle, MasterSecret, TenantId, TenantNamespace};

const SEE: Duration = Duration::from_secs(1);

fn id(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

struct Fixture {
    server: Server,
    master: MasterSecret,
    registry: Registry,
    watcher: Arc<RegistryWatcher>,
    host: AgentHost,
}

impl Fixture {
    async fn new() -> Self {
        let server = Server::jetstream();
        let registry = Registry::open(server.raw_client().await).await.unwrap();
        for t in ["tenant-a", "tenant-b"] {
            registry
                .create(
                    t,
                    t,
                    Tier::Free,
                    TenantSettings::new()
                        .allow_agent_type("planner")
                        .tool("search", ToolSettings::enabled())
                        .tool("fetch", ToolSettings::disabled())
                        .tool("translate", ToolSettings::enabled()),
                )
                .await
                .unwrap();
        }
        let watcher = Arc::new(RegistryWatcher::start(&registry).await.unwrap());
        let host = AgentHost::new(watcher.clone());
        for t in ["tenant-a", "tenant-b"] {
            let tools = host.tools(&id(t));
            tools
                .register("search", |input: Bytes| async move {
                    Ok(Bytes::from(format!(
                        "results for {}",
                        String::from_utf8_lossy(&input)
                    )))
                })
                .unwrap();
            tools
                .register("fetch", |_: Bytes| async {
                    Ok(Bytes::from_static(b"page"))
                })
                .unwrap();
        }
        Self {
            server,
            master: MasterSecret::generate().unwrap(),
            registry,
            watcher,
            host,
        }
    }

    async fn ns(&self, tenant: &str, agent: &str) -> TenantNamespace {
        let t = id(tenant);
        let bundle = CredentialBundle {
            url: self.server.url(),
            tenant: t.clone(),
            agent: AgentId::new(agent).unwrap(),
            creds: None,
            keys: self.master.key_set(&t, [1], 1).unwrap(),
            placement: Default::default(),
        };
        TenantNamespace::connect(&bundle).await.unwrap()
    }

    async fn agent(&self, tenant: &str, agent: &str, grants: &[&str]) -> Agent {
        let ns = self.ns(tenant, agent).await;
        self.host
            .register(ns, "planner", grants.iter().copied())
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reports_grant_never_matches_another_tenants_reports() {
    let f = Fixture::new().await;
    let a = f
        .agent("tenant-a", "analyst", &["reports:*", "*:read"])
        .await;
    let mine = Resource::new(&id("tenant-a"), "reports").named("q3");
    let theirs = Resource::new(&id("tenant-b"), "reports").named("q3");
    a.authorize(&mine, "read").unwrap();
    a.authorize(&mine, "delete").unwrap();
    a.authorize(&a.resource("invoices"), "read").unwrap();
    assert_eq!(
        a.authorize(&a.resource("invoices"), "write")
            .unwrap_err()
            .kind(),
        AgentErrorKind::Denied
    );
    for action in ["read", "write", "delete"] {
        assert_eq!(
            a.authorize(&theirs, action).unwrap_err().kind(),
            AgentErrorKind::CrossTenant,
            "{action}"
        );
    }
    // Not even a full wildcard crosses over.
    let root = f.agent("tenant-a", "root", &["*:*"]).await;
    assert_eq!(
        root.authorize(&theirs, "read").unwrap_err().kind(),
        AgentErrorKind::CrossTenant
    );
    root.authorize(&mine, "read").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_checks_agent_type_tenant_and_limits() {
    let f = Fixture::new().await;
    let ns = f.ns("tenant-a", "intruder").await;
    let e = f
        .host
        .register(ns.clone(), "crawler", ["*:*"])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), AgentErrorKind::AgentTypeNotAllowed);
    assert_eq!(
        f.host
            .register(ns.clone(), "Bad.Type", ["*:*"])
            .await
            .unwrap_err()
            .kind(),
        AgentErrorKind::Invalid
    );
    assert_eq!(
        f.host
            .register(ns, "planner", ["no-colon"])
            .await
            .unwrap_err()
            .kind(),
        AgentErrorKind::Invalid
    );
    let ghost = f.ns("ghost", "agent").await;
    assert_eq!(
        f.host
            .register(ghost, "planner", ["*:*"])
            .await
            .unwrap_err()
            .kind(),
        AgentErrorKind::UnknownTenant
    );

    // Allowing the type (a merged settings update) is seen at once.
    f.registry
        .update(
            &id("tenant-a"),
            &SettingsPatch::new().allow_agent_type("crawler"),
        )
        .await
        .unwrap();
    let ok = eventually(SEE, || async {
        f.watcher
            .get(&id("tenant-a"))
            .filter(|r| r.allows_agent_type("crawler"))
    })
    .await;
    assert!(ok.is_some());
    let crawler = f
        .host
        .register(f.ns("tenant-a", "crawler-1").await, "crawler", ["web:read"])
        .await
        .unwrap();
    assert_eq!(crawler.agent_type(), "crawler");
    let dup = f
        .host
        .register(f.ns("tenant-a", "crawler-1").await, "crawler", ["web:read"])
        .await;
    assert_eq!(dup.unwrap_err().kind(), AgentErrorKind::AlreadyRegistered);

    // max_agents is enforced, per tenant.
    f.registry
        .update(
            &id("tenant-a"),
            &SettingsPatch::new().set_quota("max_agents", "2"),
        )
        .await
        .unwrap();
    let ok = eventually(SEE, || async {
        f.watcher
            .get(&id("tenant-a"))
            .filter(|r| r.quotas().max_agents == 2)
    })
    .await;
    assert!(ok.is_some());
    f.agent("tenant-a", "second", &[]).await;
    let third = f
        .host
        .register(f.ns("tenant-a", "third").await, "planner", ["*:*"])
        .await;
    assert_eq!(third.unwrap_err().kind(), AgentErrorKind::TooManyAgents);
    f.agent("tenant-b", "unaffected", &[]).await;
    assert_eq!(f.host.agents_of(&id("tenant-a")), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_need_the_permission_the_setting_and_a_budget() {
    let f = Fixture::new().await;
    let a = f
        .agent("tenant-a", "researcher", &["tool:search", "tool:fetch"])
        .await;
    let budget = a.task_budget().await.unwrap();
    assert_eq!(
        a.call_tool(&budget, "search", "rust").await.unwrap(),
        Bytes::from_static(b"results for rust")
    );
    // No `tool:translate` grant: denied before anything runs.
    assert_eq!(
        a.call_tool(&budget, "translate", "x")
            .await
            .unwrap_err()
            .kind(),
        AgentErrorKind::Denied
    );
    // Granted but disabled for the tenant.
    assert_eq!(
        a.call_tool(&budget, "fetch", "x").await.unwrap_err().kind(),
        AgentErrorKind::ToolDisabled
    );
    let all = f.agent("tenant-a", "all-tools", &["tool:*"]).await;
    // Enabled but not implemented for the tenant.
    assert_eq!(
        all.call_tool(&budget, "translate", "x")
            .await
            .unwrap_err()
            .kind(),
        AgentErrorKind::UnknownTool
    );
    assert_eq!(budget.used(), 1, "refused calls do not use the budget");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_tool_calls_in_one_task_are_refused_exactly() {
    let f = Fixture::new().await;
    f.registry
        .update(
            &id("tenant-a"),
            &SettingsPatch::new()
                .set_quota("max_tool_calls_per_task", "3")
                .tool(
                    "fetch",
                    ToolSettings::enabled().rate_limited(2, Duration::from_secs(3600)),
                ),
        )
        .await
        .unwrap();
    let seen = eventually(SEE, || async {
        f.watcher
            .get(&id("tenant-a"))
            .filter(|r| r.quotas().max_tool_calls_per_task == 3)
    })
    .await;
    assert!(seen.is_some());
    let a = f.agent("tenant-a", "researcher", &["tool:*"]).await;

    // 10 concurrent calls against a budget of 3: exactly 3 run.
    let budget = Arc::new(a.task_budget().await.unwrap());
    assert_eq!(budget.max(), 3);
    let calls: Vec<_> = (0..10)
        .map(|i| {
            let (a, budget) = (a.clone(), budget.clone());
            tokio::spawn(async move { a.call_tool(&budget, "search", format!("q{i}")).await })
        })
        .collect();
    let mut ok = 0;
    for c in calls {
        match c.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.kind(), AgentErrorKind::TooManyToolCalls),
        }
    }
    assert_eq!(ok, 3);
    // A new task gets a new budget; the per-tool rate limit still applies.
    let next = a.task_budget().await.unwrap();
    a.call_tool(&next, "fetch", "1").await.unwrap();
    a.call_tool(&next, "fetch", "2").await.unwrap();
    assert_eq!(
        a.call_tool(&next, "fetch", "3").await.unwrap_err().kind(),
        AgentErrorKind::ToolRateLimited
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspension_refuses_every_operation_and_stops_agents_until_activation() {
    let f = Fixture::new().await;
    let a = f.agent("tenant-a", "worker", &["*:*"]).await;
    let other = f.agent("tenant-b", "bystander", &["*:*"]).await;
    let received = Arc::new(AtomicU64::new(0));
    let r = received.clone();
    a.handle("jobs.>", move |_agent, _msg| {
        let r = r.clone();
        async move {
            r.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await
    .unwrap();
    // A sender in the same tenant, not managed by the host (as another process).
    let sender = f.ns("tenant-a", "sender").await;
    sender.publish("jobs.1", b"x").await.unwrap();
    let got = eventually(SEE, || async {
        (received.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    assert!(got.is_some());
    let gate = TenantGate::new(f.watcher.clone(), id("tenant-a"));
    let d = Dispatcher::new(
        &sender,
        DispatchOptions::new()
            .per_tenant_names(true)
            .gate(gate.clone()),
    )
    .await
    .unwrap();
    d.dispatch("job", b"before").await.unwrap();

    f.registry.suspend(&id("tenant-a")).await.unwrap();
    let stopped = eventually(SEE, || async {
        (a.state() == AgentState::Suspended).then_some(())
    })
    .await;
    assert!(
        stopped.is_some(),
        "the running agent was not stopped within 1 s"
    );

    let budget = agent_runtime::agent::tools::ToolBudget::new(10);
    let suspended = AgentErrorKind::Suspended;
    assert_eq!(a.ensure_active().unwrap_err().kind(), suspended);
    assert_eq!(
        a.publish("jobs.2", b"x").await.unwrap_err().kind(),
        suspended
    );
    assert_eq!(
        a.request("jobs.3", b"x").await.unwrap_err().kind(),
        suspended
    );
    assert_eq!(
        a.authorize(&a.resource("reports"), "read")
            .unwrap_err()
            .kind(),
        suspended
    );
    assert_eq!(
        a.call_tool(&budget, "search", "x")
            .await
            .unwrap_err()
            .kind(),
        suspended
    );
    assert_eq!(a.task_budget().await.unwrap_err().kind(), suspended);
    let handler = a.handle("more.>", |_a, _m| async {}).await;
    assert_eq!(handler.unwrap_err().kind(), suspended);
    let newcomer = f
        .host
        .register(f.ns("tenant-a", "newcomer").await, "planner", ["*:*"])
        .await;
    assert_eq!(newcomer.unwrap_err().kind(), suspended);
    assert_eq!(
        d.dispatch("job", b"during").await.unwrap_err().kind(),
        DispatchErrorKind::Suspended
    );
    assert!(budget.used() == 0);

    // Its handler no longer receives anything (it dropped its subscription).
    for i in 0..5 {
        sender.publish(format!("jobs.s{i}"), b"x").await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(received.load(Ordering::SeqCst), 1);
    // Another tenant is unaffected.
    other.publish("jobs.1", b"x").await.unwrap();
    other.authorize(&other.resource("reports"), "read").unwrap();

    f.registry.activate(&id("tenant-a")).await.unwrap();
    let back = eventually(SEE, || async {
        (a.state() == AgentState::Running).then_some(())
    })
    .await;
    assert!(back.is_some(), "activation not applied within 1 s");
    a.publish("jobs.2", b"x").await.unwrap();
    a.authorize(&a.resource("reports"), "read").unwrap();
    a.call_tool(&budget, "search", "x").await.unwrap();
    d.dispatch("job", b"after").await.unwrap();
    // The handler subscribes again.
    let before = received.load(Ordering::SeqCst);
    let resumed = eventually(Duration::from_secs(3), || async {
        let _ = sender.publish("jobs.again", b"x").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        (received.load(Ordering::SeqCst) > before).then_some(())
    })
    .await;
    assert!(resumed.is_some(), "the handler did not resume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_the_handler_and_deregisters() {
    let f = Fixture::new().await;
    let a = f.agent("tenant-a", "drainer", &["*:*"]).await;
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel::<()>(1);
    let finished = Arc::new(AtomicU64::new(0));
    let done = finished.clone();
    a.handle("slow", move |_a, _m| {
        let (tx, done) = (started_tx.clone(), done.clone());
        async move {
            let _ = tx.send(()).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            done.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await
    .unwrap();
    let sender = f.ns("tenant-a", "sender").await;
    sender.publish("slow", b"x").await.unwrap();
    sender.flush().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), started_rx.recv())
        .await
        .unwrap();
    assert_eq!(f.host.agents_of(&id("tenant-a")), 1);
    a.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        finished.load(Ordering::SeqCst),
        1,
        "the message in hand was finished"
    );
    assert_eq!(a.state(), AgentState::Stopped);
    assert_eq!(
        a.publish("x", b"x").await.unwrap_err().kind(),
        AgentErrorKind::Stopped
    );
    assert_eq!(f.host.agents_of(&id("tenant-a")), 0);
    // Stopped is final: an activation event does not revive it.
    f.registry.activate(&id("tenant-a")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(a.state(), AgentState::Stopped);
}
