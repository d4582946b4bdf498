//! A deployment that grows (issue 13, item 1): buckets and streams created
//! while the controllers kept one replica are raised to the deployment's new
//! count by the placement pass, data intact, and then survive a node's loss.
//!
//! Three loopback nodes in operator mode. A controller started with
//! `replicas 1` creates its buckets R1, and a tenant's agent creates its state
//! store and task streams R1 (its bundle says so). A controller started later
//! with `replicas 3` raises every one of them, the platform's and the
//! tenant's, to R3 (`replicas.raise` audit events); `agentbus status` shows
//! the deployment's count. Then the node that held the R1 copies is stopped:
//! the registry, the agent's state and its queued task are still there.

// Test code: a failed set-up step should abort the test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use agent_runtime::dispatch::{DispatchOptions, Dispatcher, Task, TaskOutcome, WorkerOptions};
use agentbus_control::audit::event::PLATFORM_LOG;
use agentbus_control::audit::{self};
use agentbus_control::controller::shutdown::Shutdown;
use agentbus_control::local_server::{ClusterOptions, LocalCluster};
use agentbus_control::server_config::{render_operator_snippet, render_resolver_block};
use agentbus_control::tiers::Tier;
use agentbus_control::{AdminClient, Controller, ControllerConfig, Installation};
use bytes::Bytes;
use tenant_bus::TenantNamespace;

/// Starts a controller on `install`'s cluster keeping `replicas`, with a
/// placement pass every `every`.
async fn controller(
    install: &mut Installation,
    urls: &str,
    replicas: usize,
    every: Duration,
) -> Shutdown {
    install
        .set_urls(urls.split(',').map(str::to_string).collect(), replicas)
        .unwrap();
    let controller = Controller::connect(
        install,
        ControllerConfig::new(urls)
            .replicas(replicas)
            .placement_every(every),
    )
    .await
    .unwrap();
    let shutdown = Shutdown::new();
    tokio::spawn(controller.serve(shutdown.clone()));
    shutdown
}

async fn operator_cluster(dir: &Path) -> (Installation, LocalCluster) {
    let install = Installation::init(dir.join("state")).unwrap();
    let cluster = LocalCluster::start(
        ClusterOptions::new()
            .nodes(3)
            .config(render_operator_snippet(&install.operator_facts()))
            .node_config(|_, dir| render_resolver_block(&dir.join("resolver")))
            .probe_creds(install.creds("sys.creds").unwrap())
            .dir(dir.join("cluster")),
    )
    .await
    .unwrap();
    (install, cluster)
}

#[tokio::test]
async fn a_deployment_that_grows_raises_every_stream_to_its_replicas() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut install, mut cluster) = operator_cluster(tmp.path()).await;
    let urls = cluster.urls();

    // One replica: everything the controller and the agent create is R1.
    let first = controller(&mut install, &urls, 1, Duration::from_secs(3600)).await;
    let cp = AdminClient::connect(&urls, &install.creds("admin.creds").unwrap())
        .await
        .unwrap();
    cp.create_tenant("acme", Tier::Free).await.unwrap();
    let bundle = cp.issue_agent("acme", "worker", "default").await.unwrap();
    assert_eq!(bundle.placement.replicas, Some(1));
    let ns = TenantNamespace::connect(&bundle).await.unwrap();
    let store = ns.kv("sessions").await.unwrap();
    store.put("s1", b"kept").await.unwrap();
    let dispatcher = Dispatcher::new(&ns, DispatchOptions::new()).await.unwrap();
    // A task waits in TASKS: no worker runs yet.
    let mut task = dispatcher.dispatch("resize", b"img-1").await.unwrap();
    let status = cp.status().await.unwrap();
    assert_eq!(status.replicas, 1);
    assert!(
        status.buckets.iter().all(|b| b.replicas == 1),
        "{:?}",
        status.buckets
    );
    let stats = cp.tenant_stats("acme").await.unwrap();
    assert_eq!(stats.replicas, 1);
    let r1: Vec<_> = stats.streams.iter().filter(|s| s.replicas == 1).collect();
    assert_eq!(
        r1.len(),
        3,
        "KV_STATE, TASKS, KV_TASKS_DONE: {:?}",
        stats.streams
    );
    first.fire();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The deployment now keeps three: the next controller raises them all.
    let second = controller(&mut install, &urls, 3, Duration::from_millis(500)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = cp.status().await;
        let stats = cp.tenant_stats("acme").await;
        if let (Ok(status), Ok(stats)) = (&status, &stats) {
            let platform_done = status.buckets.iter().all(|b| b.replicas == 3);
            let tenant_done = stats.streams.len() == 3
                && stats
                    .streams
                    .iter()
                    .all(|s| s.replicas == 3 && s.nodes.len() == 3);
            if platform_done && tenant_done {
                assert_eq!(status.replicas, 3);
                assert_eq!(stats.replicas, 3);
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "not raised within 60 s: {status:?} {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Each raise is in the audit log: the tenant's three in its own, the
    // platform's buckets in the platform log.
    let (events, _) = audit::fetch_events(&cp, "acme").await.unwrap();
    let raised: Vec<_> = events
        .iter()
        .filter(|e| e.action == "replicas.raise")
        .map(|e| e.reason.clone())
        .collect();
    assert_eq!(raised.len(), 3, "{raised:?}");
    assert!(
        raised.iter().all(|r| r.contains("raised to 3")),
        "{raised:?}"
    );
    let (events, _) = audit::fetch_events(&cp, PLATFORM_LOG).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.action == "replicas.raise" && e.resource == "stream/KV_agentbus-tenants"),
        "the registry's raise is in the platform log"
    );
    // A stream is never lowered: a controller keeping one replica leaves
    // them at three.
    second.fire();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let third = controller(&mut install, &urls, 1, Duration::from_millis(500)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = cp.status().await.unwrap();
    assert!(
        status.buckets.iter().all(|b| b.replicas == 3),
        "{:?}",
        status.buckets
    );

    // Now a node's loss loses nothing: stop the node the agent's R1 state
    // store was created on (its leader then, a follower or leader now).
    let holder = stats_node(&cp).await;
    let victim = (0..cluster.len())
        .find(|&i| cluster.node_name(i) == holder)
        .unwrap();
    cluster.stop_node(victim).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let value = store.get("s1").await;
        let listed = cp.tenants().await;
        if let (Ok(v), Ok(tenants)) = (&value, &listed) {
            assert_eq!(v.value.as_ref(), b"kept");
            assert_eq!(tenants.len(), 1);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "with {holder} down: state {value:?}, registry {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The task queued on the R1 stream runs now, from the surviving copies.
    let worker = dispatcher
        .worker(
            "resize",
            |task: Task| async move {
                Ok::<_, String>(Bytes::from(format!(
                    "resized {}",
                    String::from_utf8_lossy(&task.payload)
                )))
            },
            WorkerOptions::new(),
        )
        .await
        .unwrap();
    assert_eq!(
        task.wait(Duration::from_secs(30)).await.unwrap(),
        TaskOutcome::Completed(Bytes::from_static(b"resized img-1"))
    );
    worker.shutdown(Duration::from_secs(5)).await;
    third.fire();
}

/// The node holding the leader of the tenant's state store.
async fn stats_node(cp: &AdminClient) -> String {
    let stats = cp.tenant_stats("acme").await.unwrap();
    stats
        .streams
        .iter()
        .find(|s| s.name == "KV_STATE")
        .map(|s| s.nodes[0].clone())
        .unwrap()
}
