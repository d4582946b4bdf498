//! Server-verified usage against a real nats-server: what a raw client of a
//! tenant publishes is what the controller meters, from the server's own
//! counters (not from anything the client reports), across a server restart.

use std::time::Duration;

use agentbus_control::tiers::Tier;
use agentbus_control::usage::{Granularity, UsageRequest, UsageRow};
use nats_harness::{eventually, platform};

async fn total(p: &nats_harness::Platform, tenant: &str) -> (u64, u64, Vec<UsageRow>) {
    let now = tenant_bus::envelope::now_ms();
    let rows =
        p.cp.usage(
            tenant,
            &UsageRequest {
                from_ms: now - 3_600_000 * 2,
                to_ms: now + 3_600_000,
                by: Granularity::Hour,
            },
        )
        .await
        .unwrap();
    let m = rows.iter().map(|r| r.msgs_in).sum();
    let b = rows.iter().map(|r| r.bytes_in).sum();
    (m, b, rows)
}

async fn raw(p: &nats_harness::Platform, tenant: &str, agent: &str) -> async_nats::Client {
    let issued = p.cp.create_agent(tenant, agent, "default").await.unwrap();
    async_nats::ConnectOptions::with_credentials(&issued.bundle.creds.unwrap())
        .unwrap()
        .connect(p.server.url())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_what_the_server_counted_across_a_restart() {
    let mut p = platform().await;
    // A controller that polls every 300 ms (the harness's polls every 10 s).
    p.shutdown.fire();
    let url = p.server.url();
    let controller = agentbus_control::Controller::connect(
        &p.install,
        agentbus_control::ControllerConfig::new(&url).usage_every(Duration::from_millis(300)),
    )
    .await
    .unwrap();
    let shutdown = agentbus_control::controller::shutdown::Shutdown::new();
    tokio::spawn(controller.clone().serve(shutdown.clone()));

    p.cp.create_tenant("acme", Tier::Free).await.unwrap();
    p.cp.create_tenant("globex", Tier::Free).await.unwrap();
    let acme = raw(&p, "acme", "a1").await;
    for _ in 0..100 {
        acme.publish("tenant.acme.x", vec![7u8; 100].into())
            .await
            .unwrap();
    }
    acme.flush().await.unwrap();
    let seen = eventually(Duration::from_secs(10), || async {
        let (m, b, _) = total(&p, "acme").await;
        (m >= 100).then_some((m, b))
    })
    .await
    .expect("usage reached the ledger");
    assert_eq!(seen.0, 100, "exactly what was published");
    assert!(seen.1 >= 100 * 100, "bytes: {}", seen.1);
    let (_, _, rows) = total(&p, "acme").await;
    assert_eq!(rows[0].tenant, "acme");
    assert!(
        rows[0].period_start.ends_with(":00:00Z"),
        "{}",
        rows[0].period_start
    );
    // The neighbour is charged nothing.
    assert_eq!(total(&p, "globex").await.0, 0);

    // The server restarts (its counters start over): nothing is counted twice,
    // and what comes after is counted.
    drop(acme);
    tokio::time::sleep(Duration::from_millis(800)).await;
    p.server.restart();
    let acme = eventually(Duration::from_secs(20), || async {
        let issued = p.cp.create_agent("acme", "a2", "default").await.ok()?;
        async_nats::ConnectOptions::with_credentials(&issued.bundle.creds?)
            .ok()?
            .connect(p.server.url())
            .await
            .ok()
    })
    .await
    .expect("reconnected after the restart");
    for _ in 0..50 {
        acme.publish("tenant.acme.y", vec![7u8; 100].into())
            .await
            .unwrap();
    }
    acme.flush().await.unwrap();
    let after = eventually(Duration::from_secs(15), || async {
        let (m, _, _) = total(&p, "acme").await;
        (m >= 150).then_some(m)
    })
    .await;
    assert_eq!(after, Some(150), "100 before and 50 after the restart");
    shutdown.fire();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_units_count_once_per_key_and_only_for_the_reporters_tenant() {
    let p = platform().await;
    p.cp.create_tenant("acme", Tier::Free).await.unwrap();
    p.cp.create_tenant("globex", Tier::Free).await.unwrap();
    let acme = p.cp.create_agent("acme", "llm", "default").await.unwrap();
    let globex = p.cp.create_agent("globex", "llm", "default").await.unwrap();
    let acme_account = agentbus_control::keys::bundle_account(&acme.bundle).unwrap();
    let globex_account = agentbus_control::keys::bundle_account(&globex.bundle).unwrap();
    let a = tenant_bus::TenantNamespace::connect(&acme.bundle)
        .await
        .unwrap();
    let g = tenant_bus::TenantNamespace::connect(&globex.bundle)
        .await
        .unwrap();
    use agentbus_control::keys::report_usage;

    assert!(
        report_usage(&a, &acme_account, "llm.tokens", 1234, "call-1")
            .await
            .unwrap()
    );
    // A retry of the same call is not counted again.
    assert!(
        !report_usage(&a, &acme_account, "llm.tokens", 1234, "call-1")
            .await
            .unwrap()
    );
    assert!(report_usage(&a, &acme_account, "llm.tokens", 10, "call-2")
        .await
        .unwrap());
    // Bad input changes nothing.
    let err = report_usage(&a, &acme_account, "LLM tokens", 1, "call-3")
        .await
        .unwrap_err();
    assert_eq!(err.code, agentbus_control::ErrorCode::InvalidInput);
    // globex cannot charge acme: not through acme's subject (the server
    // refuses the publish), nor by naming acme on its own.
    assert!(report_usage(&g, &acme_account, "llm.tokens", 999, "x")
        .await
        .is_err());
    let ga = tenant_bus::TenantNamespace::connect(&globex.bundle)
        .await
        .unwrap();
    let body = serde_json::json!({"tenant": "acme", "unit": "llm.tokens", "amount": 999, "idempotency_key": "y"});
    let reply = ga
        .nats()
        .request(
            agentbus_control::api::usage_report_subject(&globex_account),
            serde_json::to_vec(&body).unwrap().into(),
        )
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&reply.payload).contains("forbidden"),
        "{:?}",
        reply.payload
    );

    let (_, _, rows) = total(&p, "acme").await;
    let tokens: u64 = rows.iter().filter_map(|r| r.units.get("llm.tokens")).sum();
    assert_eq!(tokens, 1244);
    let (_, _, rows) = total(&p, "globex").await;
    assert!(rows.iter().all(|r| r.units.is_empty()), "{rows:?}");
}
