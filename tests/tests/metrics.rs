//! Prometheus metrics of the controller, from a real login through the auth
//! callout: the recorder sees allowed and denied logins with the reason's code
//! as a bounded label, and per-tenant usage from the servers' counters.

use std::time::Duration;

use agentbus_control::api::CreateApiKey;
use agentbus_control::tiers::Tier;
use nats_harness::{eventually, platform};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_and_usage_reach_the_prometheus_recorder() {
    // This test binary's only recorder (one per process).
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    let p = platform().await;
    p.shutdown.fire();
    let url = p.server.url();
    let controller = agentbus_control::Controller::connect(
        &p.install,
        agentbus_control::ControllerConfig::new(&url).usage_every(Duration::from_millis(200)),
    )
    .await
    .unwrap();
    let shutdown = agentbus_control::controller::shutdown::Shutdown::new();
    tokio::spawn(controller.clone().serve(shutdown.clone()));
    p.cp.create_tenant("acme", Tier::Free).await.unwrap();
    let issued =
        p.cp.create_apikey(
            "acme",
            &CreateApiKey {
                name: "m".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let client = eventually(Duration::from_secs(5), || {
        let (url, key) = (url.clone(), issued.key.clone());
        async move {
            async_nats::ConnectOptions::with_token(key)
                .connect(url)
                .await
                .ok()
        }
    })
    .await
    .unwrap();
    for _ in 0..10 {
        client.publish("tenant.acme.m", "x".into()).await.unwrap();
    }
    client.flush().await.unwrap();
    let _ = async_nats::ConnectOptions::with_token("abk_typo".to_string())
        .max_reconnects(Some(0))
        .connect(&url)
        .await;
    let text = eventually(Duration::from_secs(10), || {
        let text = handle.render();
        async move {
            (text.contains("agentbus_usage_msgs_in_total{tenant=\"acme\"}")
                && text.contains("reason=\"key_length\""))
            .then_some(text)
        }
    })
    .await
    .unwrap_or_else(|| handle.render());
    assert!(
        text.contains("agentbus_logins_total{outcome=\"allowed\",reason=\"\"}"),
        "{text}"
    );
    assert!(
        text.contains("outcome=\"denied\",reason=\"key_length\""),
        "{text}"
    );
    let line = text
        .lines()
        .find(|l| l.starts_with("agentbus_usage_msgs_in_total{tenant=\"acme\"}"))
        .unwrap_or_else(|| panic!("{text}"));
    let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 10.0, "{line}");
    shutdown.fire();
}
