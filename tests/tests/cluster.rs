//! Local clusters with authenticated routes (`agentbus_control::local_server::LocalCluster`):
//! the nodes route to each other, a rogue server that does not hold the route
//! credentials cannot join (it neither sees nor injects traffic), URL lists
//! connect past a dead entry, and a node can be stopped and started again while a
//! replicated JetStream stream keeps its data.

use std::time::Duration;

use futures::StreamExt as _;
use nats_harness::{cluster, eventually, ClusterOptions, LocalCluster, Server};
use tenant_bus::{AgentId, CredentialBundle, MasterSecret, TenantId, TenantNamespace};

/// How long a test watches for traffic that must not arrive.
const QUIET: Duration = Duration::from_secs(2);

async fn raw(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .ignore_discovered_servers()
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("raw connect to {url}: {e}"))
}

/// Publishes `payload` on `subject` from `publisher` until `sub` receives it
/// (interest crosses routes asynchronously), for at most 10 s.
async fn delivered(
    publisher: &async_nats::Client,
    sub: &mut async_nats::Subscriber,
    subject: &str,
    payload: &'static [u8],
) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        if publisher
            .publish(subject.to_string(), payload.into())
            .await
            .is_err()
        {
            return false;
        }
        let _ = publisher.flush().await;
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(100), sub.next()).await {
            if &m.payload[..] == payload {
                return true;
            }
        }
    }
    false
}

#[tokio::test]
async fn three_nodes_route_to_each_other() {
    let c = cluster(ClusterOptions::new().jetstream(false)).await;
    assert_eq!(c.len(), 3);
    assert_eq!(c.url_list().len(), 3);
    assert_eq!(c.urls().split(',').count(), 3);
    assert!(c.pids().iter().all(Option::is_some));
    // Nothing but the client and route listeners: no monitoring.
    assert!((0..3).all(|i| c.monitoring_port(i).is_none()));
    let n1 = raw(&c.node_url(0)).await;
    let n3 = raw(&c.node_url(2)).await;
    let mut sub = n3.subscribe("tenant.acme.>").await.unwrap();
    n3.flush().await.unwrap();
    assert!(delivered(&n1, &mut sub, "tenant.acme.orders", b"from n1").await);
    // Every node's config carries the route credentials; none has `http`.
    for i in 0..3 {
        let conf = std::fs::read_to_string(c.node_dir(i).join("server.conf")).unwrap();
        assert!(conf.contains(c.route_credentials().password()));
        assert!(!conf.contains("http:"), "{conf}");
    }
}

/// A rogue nats-server with a route to node 1, configured by `cluster_block`.
/// Checks both directions: the rogue's `>` subscriber sees none of the cluster's
/// traffic, and the cluster's subscriber sees none of the rogue's.
async fn rogue_is_isolated(c: &LocalCluster, cluster_block: String) -> Server {
    let rogue = Server::with_config(&cluster_block);
    let rogue_client = rogue.raw_client().await;
    let mut rogue_sub = rogue_client.subscribe(">").await.unwrap();
    rogue_client.flush().await.unwrap();

    let n1 = raw(&c.node_url(0)).await;
    let n3 = raw(&c.node_url(2)).await;
    let mut cluster_sub = n3.subscribe("tenant.acme.>").await.unwrap();
    n3.flush().await.unwrap();
    // The cluster itself works meanwhile (a control for the quiet checks below).
    assert!(delivered(&n1, &mut cluster_sub, "tenant.acme.secret", b"cluster").await);

    let deadline = tokio::time::Instant::now() + QUIET;
    let mut seen_by_rogue = Vec::new();
    let mut seen_by_cluster = Vec::new();
    while tokio::time::Instant::now() < deadline {
        n1.publish("tenant.acme.secret", "cluster".into())
            .await
            .unwrap();
        rogue_client
            .publish("tenant.acme.x", "rogue".into())
            .await
            .unwrap();
        n1.flush().await.unwrap();
        rogue_client.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        while let Ok(Some(m)) =
            tokio::time::timeout(Duration::from_millis(1), rogue_sub.next()).await
        {
            // The rogue's own publishes come back to its own `>`.
            if m.subject.as_str() != "tenant.acme.x" {
                seen_by_rogue.push(m.subject.to_string());
            }
        }
        while let Ok(Some(m)) =
            tokio::time::timeout(Duration::from_millis(1), cluster_sub.next()).await
        {
            if m.subject.as_str() != "tenant.acme.secret" {
                seen_by_cluster.push(m.subject.to_string());
            }
        }
    }
    assert!(
        seen_by_rogue.is_empty(),
        "the rogue saw the cluster's traffic: {seen_by_rogue:?}"
    );
    assert!(
        seen_by_cluster.is_empty(),
        "the rogue injected into the cluster: {seen_by_cluster:?}"
    );
    rogue
}

/// Waits (at most 5 s) for node 1's log or the rogue's to show the refused route.
async fn route_refusal_logged(c: &LocalCluster, rogue: &mut Server) -> String {
    eventually(Duration::from_secs(5), || {
        let text = format!("{}\n{}", c.log(0), rogue.process().log_tail(200));
        async move {
            text.lines()
                .find(|l| {
                    l.contains("Authentication Failure")
                        || l.contains("authentication error")
                        || l.contains("Authorization Violation")
                })
                .map(str::to_string)
        }
    })
    .await
    .unwrap_or_default()
}

#[tokio::test]
async fn a_rogue_route_without_credentials_is_refused_and_sees_nothing() {
    let c = cluster(ClusterOptions::new().jetstream(false)).await;
    let block = format!(
        "cluster {{\n  host: 127.0.0.1\n  port: -1\n  routes: [ nats-route://127.0.0.1:{} ]\n}}\n",
        c.cluster_port(0)
    );
    let mut rogue = rogue_is_isolated(&c, block).await;
    let line = route_refusal_logged(&c, &mut rogue).await;
    assert!(!line.is_empty(), "no route refusal in the logs");
}

#[tokio::test]
async fn a_rogue_route_with_the_cluster_name_and_a_wrong_password_is_refused() {
    let c = cluster(ClusterOptions::new().jetstream(false)).await;
    let user = c.route_credentials().user().to_string();
    let block = format!(
        "cluster {{\n  name: agentbus\n  host: 127.0.0.1\n  port: -1\n  \
         authorization {{ user: {user}, password: \"wrong-password\" }}\n  \
         routes: [ \"nats-route://{user}:wrong-password@127.0.0.1:{}\" ]\n}}\n",
        c.cluster_port(0)
    );
    let mut rogue = rogue_is_isolated(&c, block).await;
    let line = route_refusal_logged(&c, &mut rogue).await;
    assert!(!line.is_empty(), "no route refusal in the logs");
}

#[tokio::test]
async fn a_server_holding_the_route_credentials_does_join() {
    // The control for the two rogue tests: the same set-up with the right
    // password joins, so the quiet checks above would have seen a leak.
    let c = cluster(ClusterOptions::new().jetstream(false)).await;
    let route = c.route_credentials().clone();
    let block = format!(
        "cluster {{\n  name: agentbus\n  host: 127.0.0.1\n  port: -1\n  \
         authorization {{ user: {}, password: \"{}\" }}\n  routes: [ \"{}\" ]\n}}\n",
        route.user(),
        route.password(),
        route.route_url("127.0.0.1", c.cluster_port(0)),
    );
    let member = Server::with_config(&block);
    let member_client = member.raw_client().await;
    let mut sub = member_client.subscribe("tenant.acme.>").await.unwrap();
    member_client.flush().await.unwrap();
    let n1 = raw(&c.node_url(0)).await;
    assert!(delivered(&n1, &mut sub, "tenant.acme.secret", b"cluster").await);
}

#[tokio::test]
async fn a_url_list_with_a_dead_first_entry_connects() {
    let c = cluster(ClusterOptions::new().jetstream(false)).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let list = format!("nats://127.0.0.1:{dead},{}", c.urls());
    // A raw client through the shared parser.
    let addrs = tenant_bus::connect::server_addrs(&list).unwrap();
    assert_eq!(addrs.len(), 4);
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(addrs)
        .await
        .unwrap();
    client.flush().await.unwrap();
    // A namespace from a bundle carrying the list.
    let master = MasterSecret::generate().unwrap();
    let tenant = TenantId::new("acme").unwrap();
    let bundle = |agent: &str| CredentialBundle {
        url: list.clone(),
        tenant: tenant.clone(),
        agent: AgentId::new(agent).unwrap(),
        creds: None,
        keys: master.key_set(&tenant, [1], 1).unwrap(),
        placement: Default::default(),
    };
    let a = TenantNamespace::connect(&bundle("a")).await.unwrap();
    let b = TenantNamespace::connect(&bundle("b")).await.unwrap();
    let mut sub = b.subscribe("jobs.>").await.unwrap();
    b.flush().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let got = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no sealed message across the cluster in 10 s"
        );
        a.publish("jobs.one", b"job").await.unwrap();
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(100), sub.next()).await {
            break m;
        }
    };
    assert_eq!(&got.payload[..], b"job");
}

#[tokio::test]
async fn a_node_stops_and_starts_and_an_r3_stream_keeps_its_data() {
    let mut c = cluster(ClusterOptions::new()).await;
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(5)))
        .connect(tenant_bus::connect::server_addrs(&c.urls()).unwrap())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    // The JetStream meta leader is elected after the routes form: retry.
    let config = async_nats::jetstream::stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.>".into()],
        num_replicas: 3,
        ..Default::default()
    };
    let created = eventually(Duration::from_secs(20), || {
        let (js, config) = (&js, config.clone());
        async move { js.create_stream(config).await.ok() }
    })
    .await;
    assert!(created.is_some(), "R3 stream not created");
    // The stream's subjects reach every node's interest graph shortly after
    // creation; an early publish may find no responder: retry, bounded.
    for i in 0..3 {
        let acked = eventually(Duration::from_secs(10), || {
            let js = &js;
            async move {
                js.publish("orders.new", format!("{i}").into())
                    .await
                    .ok()?
                    .await
                    .ok()
            }
        })
        .await;
        assert!(acked.is_some(), "message {i} not acknowledged");
    }

    let pid = c.pids()[2];
    c.stop_node(2).unwrap();
    assert!(!c.is_running(2));
    assert_eq!(c.pids()[2], None);
    assert!(pid.is_some());
    // Two of three replicas: still a quorum (after a leader election if needed).
    let acked = eventually(Duration::from_secs(15), || {
        let js = &js;
        async move { js.publish("orders.new", "3".into()).await.ok()?.await.ok() }
    })
    .await;
    assert!(acked.is_some(), "no ack with one node down");

    c.start_node(2).await.unwrap();
    assert!(c.is_running(2));
    // The restarted node serves the stream with all four messages.
    let n3 = async_nats::jetstream::new(raw(&c.node_url(2)).await);
    let count = eventually(Duration::from_secs(15), || {
        let n3 = &n3;
        async move {
            let mut s = n3.get_stream("ORDERS").await.ok()?;
            let info = s.info().await.ok()?;
            (info.state.messages == 4).then_some(info.state.messages)
        }
    })
    .await;
    assert_eq!(count, Some(4));
}
