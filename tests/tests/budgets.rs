//! Budgets against a real nats-server: charges go through `report_usage` and
//! are enforced with JetStream counters, atomically across two controller
//! instances; each action does what it says; each threshold alerts once, sealed
//! on the tenant's own `events.budget`; a tenant's budget never touches another
//! tenant.

use std::time::Duration;

use agentbus_control::api::ErrorCode;
use agentbus_control::budget::{Action, BudgetAlert, BudgetSpec, Period, Threshold};
use agentbus_control::keys::{bundle_account, report_usage};
use agentbus_control::tiers::Tier;
use futures::StreamExt as _;
use nats_harness::{eventually, platform};
use tenant_bus::TenantNamespace;

const COST: &str = "llm.cost_usd_micros";

fn spec(name: &str, unit: &str, hard: u64, soft: Option<u64>, action: Action) -> BudgetSpec {
    BudgetSpec {
        name: name.into(),
        unit: unit.into(),
        period: Period::Day,
        hard,
        soft,
        action,
        throttle_interval_ms: 1_000,
    }
}

/// An agent of `tenant` connected through the library, and its account.
async fn agent(p: &nats_harness::Platform, tenant: &str, id: &str) -> (TenantNamespace, String) {
    let issued = p.cp.create_agent(tenant, id, "default").await.unwrap();
    let account = bundle_account(&issued.bundle).unwrap();
    let ns = TenantNamespace::connect(&issued.bundle).await.unwrap();
    (ns, account)
}

/// Every alert that arrives within `quiet` of the last one.
async fn alerts(sub: &mut tenant_bus::Subscription, quiet: Duration) -> Vec<BudgetAlert> {
    let mut out = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout(quiet, sub.next()).await {
        assert_eq!(
            msg.sender.as_ref().map(|s| s.as_str()),
            Some("agentbus-controller")
        );
        out.push(msg.json::<BudgetAlert>().unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_half_dollar_charges_against_a_dollar_admit_exactly_two() {
    let p = platform().await;
    // Two controller instances serve the charges (one queue group).
    let (_second, second_shutdown) = p.another_controller().await;
    p.cp.create_tenant("acme", Tier::Free).await.unwrap();
    p.cp.create_tenant("globex", Tier::Free).await.unwrap();
    p.cp.set_budget(
        "acme",
        &spec("llm-cost", COST, 1_000_000, Some(600_000), Action::Block),
    )
    .await
    .unwrap();
    let (a, acme_account) = agent(&p, "acme", "llm").await;
    let (g, globex_account) = agent(&p, "globex", "llm").await;
    let mut acme_events = a.subscribe("events.budget").await.unwrap();
    let mut globex_events = g.subscribe("events.budget").await.unwrap();

    let mut calls = Vec::new();
    for i in 0..20 {
        let a = a.clone();
        let account = acme_account.clone();
        calls.push(tokio::spawn(async move {
            report_usage(&a, &account, COST, 500_000, &format!("call-{i}")).await
        }));
    }
    let mut admitted = 0;
    let mut refused = 0;
    for c in calls {
        match c.await.unwrap() {
            Ok(true) => admitted += 1,
            Err(e) if e.code == ErrorCode::BudgetExceeded => {
                assert!(e.message.contains("llm-cost"), "{}", e.message);
                assert!(e.message.contains("retry after"), "{}", e.message);
                refused += 1
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!((admitted, refused), (2, 18), "exactly $1.00 of $0.50 calls");
    let budgets = p.cp.budgets("acme").await.unwrap();
    assert_eq!(budgets.len(), 1);
    assert_eq!(
        budgets[0].spent, 1_000_000,
        "refused charges were taken back"
    );
    assert_eq!(budgets[0].remaining, 0);
    // A refused idempotency key was not used up: the same call after a raise
    // counts.
    p.cp.set_budget(
        "acme",
        &spec("llm-cost", COST, 1_500_000, Some(600_000), Action::Block),
    )
    .await
    .unwrap();
    let retried = (0..20).map(|i| format!("call-{i}")).collect::<Vec<_>>();
    let mut counted = 0;
    for key in &retried {
        if let Ok(true) = report_usage(&a, &acme_account, COST, 500_000, key).await {
            counted += 1;
        }
    }
    assert_eq!(
        counted, 1,
        "one more $0.50 under $1.50; the admitted keys stay counted once"
    );

    // One alert per threshold (soft at $0.60, hard at $1.00), however many
    // charges crossed or were refused.
    let got = alerts(&mut acme_events, Duration::from_secs(2)).await;
    let mut thresholds: Vec<Threshold> = got.iter().map(|a| a.threshold).collect();
    thresholds.sort_by_key(|t| *t == Threshold::Hard);
    assert_eq!(
        thresholds,
        vec![Threshold::Soft, Threshold::Hard],
        "{got:?}"
    );
    assert!(got
        .iter()
        .all(|a| a.tenant == "acme" && a.budget == "llm-cost"));

    // Tenant B: no budget, no refusal, no alert.
    for i in 0..5 {
        assert!(
            report_usage(&g, &globex_account, COST, 500_000, &format!("g-{i}"))
                .await
                .unwrap()
        );
    }
    assert!(p.cp.budgets("globex").await.unwrap().is_empty());
    assert!(alerts(&mut globex_events, Duration::from_millis(500))
        .await
        .is_empty());
    // Nor can acme's client read globex's budget or alerts: its subscription
    // to globex's events subject is refused by the server (a raw subscribe
    // outside its tenant), and the admin API asks roles.
    second_shutdown.fire();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warn_admits_throttle_trickles_and_revoke_suspends() {
    let p = platform().await;
    p.cp.create_tenant("acme", Tier::Free).await.unwrap();
    p.cp.create_tenant("initech", Tier::Free).await.unwrap();
    let (a, account) = agent(&p, "acme", "llm").await;
    let mut events = a.subscribe("events.budget").await.unwrap();

    // warn: everything is admitted, the hard threshold alerts once.
    p.cp.set_budget("acme", &spec("calls", "tool.calls", 3, None, Action::Warn))
        .await
        .unwrap();
    for i in 0..5 {
        assert!(
            report_usage(&a, &account, "tool.calls", 1, &format!("w-{i}"))
                .await
                .unwrap()
        );
    }
    let b = p.cp.budgets("acme").await.unwrap();
    assert_eq!(b[0].spent, 5, "warn never refuses");
    let got = alerts(&mut events, Duration::from_secs(1)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].threshold, Threshold::Hard);
    assert_eq!(got[0].action, Action::Warn);

    // throttle: over the cap, one charge per interval (1 s) gets through.
    p.cp.set_budget(
        "acme",
        &spec("tokens", "llm.tokens", 10, None, Action::Throttle),
    )
    .await
    .unwrap();
    assert!(report_usage(&a, &account, "llm.tokens", 10, "t-0")
        .await
        .unwrap());
    let mut burst = Vec::new();
    for i in 0..5 {
        let a = a.clone();
        let account = account.clone();
        burst.push(tokio::spawn(async move {
            report_usage(&a, &account, "llm.tokens", 1, &format!("t-burst-{i}")).await
        }));
    }
    let mut through = 0;
    for c in burst {
        match c.await.unwrap() {
            Ok(true) => through += 1,
            Err(e) => assert_eq!(e.code, ErrorCode::BudgetExceeded, "{}", e.message),
            Ok(false) => panic!("fresh keys are counted"),
        }
    }
    assert_eq!(through, 1, "one charge per interval over the cap");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert!(
        report_usage(&a, &account, "llm.tokens", 1, "t-later")
            .await
            .unwrap(),
        "the next interval admits one more"
    );
    let err = report_usage(&a, &account, "llm.tokens", 1, "t-later-2")
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::BudgetExceeded);

    // revoke: the charge is refused and the tenant suspended: its agent's
    // connection is closed and its credentials refused.
    let issued =
        p.cp.create_agent("initech", "llm", "default")
            .await
            .unwrap();
    let initech_account = bundle_account(&issued.bundle).unwrap();
    let i = TenantNamespace::connect(&issued.bundle).await.unwrap();
    p.cp.set_budget("initech", &spec("cost", COST, 100, None, Action::Revoke))
        .await
        .unwrap();
    assert!(report_usage(&i, &initech_account, COST, 100, "r-0")
        .await
        .unwrap());
    let err = report_usage(&i, &initech_account, COST, 1, "r-1")
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::BudgetExceeded);
    let view = p.cp.tenant("initech").await.unwrap();
    assert_eq!(
        view.record.status,
        agentbus_control::registry::Status::Suspended
    );
    let refused = eventually(Duration::from_secs(5), || async {
        async_nats::ConnectOptions::with_credentials(issued.bundle.creds.as_deref()?)
            .ok()?
            .connect(p.server.url())
            .await
            .err()
    })
    .await;
    assert!(
        refused.is_some(),
        "a suspended tenant's credentials are refused"
    );
    // acme is not suspended by initech's budget.
    assert_eq!(
        p.cp.tenant("acme").await.unwrap().record.status,
        agentbus_control::registry::Status::Active
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_budgets_are_refused_and_change_nothing() {
    let p = platform().await;
    p.cp.create_tenant("acme", Tier::Free).await.unwrap();
    for bad in [
        spec("Bad Name", COST, 10, None, Action::Block),
        spec("ok", "NOT A UNIT", 10, None, Action::Block),
        spec("ok", COST, 0, None, Action::Block),
        spec("ok", COST, 10, Some(10), Action::Block),
    ] {
        let e = p.cp.set_budget("acme", &bad).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidInput, "{bad:?}: {}", e.message);
    }
    assert!(p.cp.budgets("acme").await.unwrap().is_empty());
    let e =
        p.cp.set_budget("nobody", &spec("ok", COST, 10, None, Action::Block))
            .await
            .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    let e = p.cp.delete_budget("acme", "missing").await.unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    p.cp.set_budget("acme", &spec("ok", COST, 10, None, Action::Block))
        .await
        .unwrap();
    p.cp.delete_budget("acme", "ok").await.unwrap();
    assert!(p.cp.budgets("acme").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_stats_show_live_connections_metered_units_and_budgets() {
    let p = platform().await;
    p.cp.create_tenant("acme", Tier::Free).await.unwrap();
    p.cp.create_tenant("globex", Tier::Free).await.unwrap();
    p.cp.set_budget("acme", &spec("cost", COST, 1_000_000, None, Action::Block))
        .await
        .unwrap();
    let (a, account) = agent(&p, "acme", "llm").await;
    let _g = agent(&p, "globex", "llm").await;
    for i in 0..10 {
        a.publish("jobs.x", format!("{i}")).await.unwrap();
    }
    assert!(report_usage(&a, &account, COST, 250_000, "s-1")
        .await
        .unwrap());
    let stats = eventually(Duration::from_secs(5), || async {
        let s = p.cp.tenant_stats("acme").await.ok()?;
        (s.live.since_server_start.msgs_in >= 10).then_some(s)
    })
    .await
    .expect("the server's counters");
    assert_eq!(stats.tenant, "acme");
    assert_eq!(stats.status, "active");
    assert!(stats.live.connections >= 1, "{stats:?}");
    assert!(stats.live.servers >= 1);
    assert_eq!(stats.usage_today.units.get(COST), Some(&250_000));
    assert_eq!(stats.usage_this_hour.units.get(COST), Some(&250_000));
    assert_eq!(stats.budgets.len(), 1);
    assert_eq!(stats.budgets[0].spent, 250_000);
    assert_eq!(stats.agents_issued, 1);
    assert_eq!(stats.agents_revoked, 0);
    assert_eq!(stats.audit_log, "AUDIT", "no region: the shared stream");
    // Another tenant's figures are its own.
    let g = p.cp.tenant_stats("globex").await.unwrap();
    assert!(g.budgets.is_empty());
    assert!(g.usage_today.units.is_empty());
    assert_eq!(
        p.cp.tenant_stats("nobody").await.unwrap_err().code,
        ErrorCode::NotFound
    );
}

/// Runtime-metered units (`tasks.run`, tool calls: reported by a runtime
/// host after the work was done) count against the budgets on their unit:
/// never refused, alerting at the soft and hard thresholds, and a `revoke`
/// budget suspends the tenant once over its cap (policed with the meter's
/// flush interval as the delay). A batch sent again is not counted twice;
/// another tenant's budget on the same unit is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_metered_units_count_against_budgets_after_the_fact() {
    use agentbus_control::meter::{RuntimeUsage, RuntimeUsageAnswer};
    let p = platform().await;
    p.cp.create_tenant("acme", Tier::Free).await.unwrap();
    p.cp.create_tenant("initech", Tier::Free).await.unwrap();
    let (a, _) = agent(&p, "acme", "watcher").await;
    let mut events = a.subscribe("events.budget").await.unwrap();
    for tenant in ["acme", "initech"] {
        p.cp.set_budget(
            tenant,
            &spec("runs", "tasks.run", 5, Some(3), Action::Revoke),
        )
        .await
        .unwrap();
    }
    let runtime = p.platform_client("runtime").await;
    let send = |seq: u64, runs: u64| {
        let runtime = runtime.clone();
        async move {
            let batch = RuntimeUsage {
                host: "budget-host".into(),
                seq,
                tenants: [("acme".to_string(), [("tasks.run".to_string(), runs)].into())].into(),
            };
            let reply = runtime
                .request(
                    agentbus_control::api::RUNTIME_USAGE_SUBJECT,
                    serde_json::to_vec(&batch).unwrap().into(),
                )
                .await
                .unwrap();
            match serde_json::from_slice(&reply.payload).unwrap() {
                agentbus_control::api::Response::<RuntimeUsageAnswer>::Ok(a) => a.added,
                agentbus_control::api::Response::Error(e) => panic!("{e:?}"),
            }
        }
    };
    let spent = |tenant: &'static str| {
        let cp = p.cp.clone();
        async move { cp.budgets(tenant).await.unwrap()[0].spent }
    };
    let status = |tenant: &'static str| {
        let cp = p.cp.clone();
        async move { cp.tenant(tenant).await.unwrap().record.status }
    };

    // 4 runs: over the soft threshold (3), under the cap (5).
    assert_eq!(send(1, 4).await, 1);
    assert_eq!(spent("acme").await, 4);
    let got = alerts(&mut events, Duration::from_secs(1)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].threshold, Threshold::Soft);
    // The same batch again (a lost answer): not counted twice.
    assert_eq!(send(1, 4).await, 0);
    assert_eq!(spent("acme").await, 4);
    assert_eq!(
        status("acme").await,
        agentbus_control::registry::Status::Active
    );

    // 3 more: 7 of 5. Already run, so counted, not refused; the hard
    // threshold alerts and `revoke` suspends the tenant.
    assert_eq!(send(2, 3).await, 1);
    assert_eq!(spent("acme").await, 7);
    let got = alerts(&mut events, Duration::from_secs(1)).await;
    assert!(
        got.iter()
            .any(|g| g.threshold == Threshold::Hard && g.action == Action::Revoke),
        "{got:?}"
    );
    assert_eq!(
        status("acme").await,
        agentbus_control::registry::Status::Suspended
    );
    // initech's budget on the same unit saw nothing.
    assert_eq!(spent("initech").await, 0);
    assert_eq!(
        status("initech").await,
        agentbus_control::registry::Status::Active
    );
}
