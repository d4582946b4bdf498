//! Data residency on three loopback nodes in two regions (issue 13, item 6):
//! `n1` and `n2` carry `server_tags: ["region:eu"]`, `n3` carries
//! `["region:us"]`.
//!
//! - The controller takes a tenant's `region` only when enough of that
//!   region's JetStream servers answer (the deployment's replica count), and
//!   never lets it change.
//! - A tenant's state store created for a region lives only on that region's
//!   nodes (stream info says where); with the region down it gets a clear
//!   error and nothing is placed elsewhere; a bucket found without the
//!   region's placement is refused. Task dispatch (stream and done bucket)
//!   takes the same placement from the agent's bundle.
//! - A stream an agent's raw client creates on another region's servers is
//!   moved into the tenant's region by the controller's residency policing,
//!   its messages intact, with a `residency.move` audit event.

// Test code: a failed set-up step should abort the test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_runtime::dispatch::{DispatchErrorKind, DispatchOptions, Dispatcher};
use agentbus_control::api::{CreateTenant, ErrorCode, UpdateTenant};
use agentbus_control::audit::event::{Outcome, PLATFORM_LOG};
use agentbus_control::audit::{self, AuditLog};
use agentbus_control::budget::{Action, BudgetSpec, Period};
use agentbus_control::controller::shutdown::Shutdown;
use agentbus_control::keys::{bundle_account, report_usage};
use agentbus_control::local_server::{ClusterOptions, LocalCluster};
use agentbus_control::server_config::{render_operator_snippet, render_resolver_block};
use agentbus_control::tiers::Tier;
use agentbus_control::{AdminClient, Controller, ControllerConfig, Installation};
use async_nats::jetstream;
use tenant_bus::kv::{KvErrorKind, KvOptions};
use tenant_bus::region::{Region, StorePlacement};
use tenant_bus::settle::{while_settling, while_unrouted};
use tenant_bus::{AgentId, CredentialBundle, MasterSecret, TenantId, TenantNamespace};

/// `server_tags` of node `i`: two nodes in `eu`, one in `us`.
fn tags(i: usize) -> String {
    let region = if i < 2 { "eu" } else { "us" };
    format!("server_tags: [\"region:{region}\"]\n")
}

/// The nodes holding `stream` (its leader and replicas).
async fn holders(js: &jetstream::Context, stream: &str) -> BTreeSet<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = js
            .get_stream(stream)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .clone();
        if let Some(c) = info.cluster {
            if let Some(leader) = c.leader {
                let mut nodes: BTreeSet<String> = c.replicas.into_iter().map(|p| p.name).collect();
                nodes.insert(leader);
                return nodes;
            }
        }
        assert!(Instant::now() < deadline, "{stream} has no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// An operator-mode deployment on the two-region cluster: the cluster, its
/// URLs, an admin client, the shutdown of a controller serving it with
/// `replicas` and `config`'s other settings, and that controller's audit log.
async fn operator_deployment(
    dir: &Path,
    replicas: usize,
    config: impl FnOnce(ControllerConfig) -> ControllerConfig,
) -> (LocalCluster, String, AdminClient, Shutdown, Arc<AuditLog>) {
    let mut install = Installation::init(dir.join("state")).unwrap();
    let cluster = LocalCluster::start(
        ClusterOptions::new()
            .nodes(3)
            .config(render_operator_snippet(&install.operator_facts()))
            .node_config(|i, dir| {
                format!(
                    "{}{}",
                    render_resolver_block(&dir.join("resolver")),
                    tags(i)
                )
            })
            .probe_creds(install.creds("sys.creds").unwrap())
            .dir(dir.join("cluster")),
    )
    .await
    .unwrap();
    let urls = cluster.urls();
    install
        .set_urls(urls.split(',').map(str::to_string).collect(), replicas)
        .unwrap();
    let controller = Controller::connect(
        &install,
        config(ControllerConfig::new(&urls).replicas(replicas)),
    )
    .await
    .unwrap();
    let audit = controller.audit().clone();
    let shutdown = Shutdown::new();
    tokio::spawn(controller.serve(shutdown.clone()));
    let cp = AdminClient::connect(&urls, &install.creds("admin.creds").unwrap())
        .await
        .unwrap();
    (cluster, urls, cp, shutdown, audit)
}

#[tokio::test]
async fn the_controller_takes_a_region_only_where_servers_can_hold_it() {
    let tmp = tempfile::tempdir().unwrap();
    // Replicas 2: `eu` (two servers) can hold the tenant's streams, `us`
    // (one server) cannot.
    // No residency pass while this test looks at the misplaced stream (the
    // first pass runs at start, before there is any).
    let (_cluster, urls, cp, shutdown, audit) = operator_deployment(tmp.path(), 2, |c| {
        c.placement_every(Duration::from_secs(3600))
    })
    .await;
    let create = |id: &'static str, region: &'static str| {
        let cp = cp.clone();
        async move {
            cp.create_tenant_with(
                id,
                &CreateTenant {
                    region: Some(region.to_string()),
                    ..Default::default()
                },
            )
            .await
        }
    };

    let eu = create("acme", "eu").await.unwrap();
    assert_eq!(eu.record.settings.region.as_deref(), Some("eu"));
    assert_eq!(
        cp.tenant("acme")
            .await
            .unwrap()
            .record
            .settings
            .region
            .as_deref(),
        Some("eu"),
        "the region is in the stored record"
    );

    // Its agents' bundles carry the placement: the deployment's replicas and
    // the tenant's region (what their state stores and task streams use).
    let bundle = cp.issue_agent("acme", "worker", "default").await.unwrap();
    assert_eq!(bundle.placement.replicas, Some(2));
    assert_eq!(bundle.placement.region, Some(Region::new("eu").unwrap()));
    let back = CredentialBundle::from_json(&bundle.to_json().unwrap()).unwrap();
    assert_eq!(back.placement, bundle.placement);

    // The agent's default state store lands in eu with the deployment's two
    // replicas; a raw client with the same creds creates TASKS in us (the
    // library would refuse, NATS cannot): `tenant stats` shows where each
    // stream lives, from the servers, and flags the one outside the region.
    let ns = TenantNamespace::connect(&bundle).await.unwrap();
    ns.kv("sessions")
        .await
        .unwrap()
        .put("k", b"v")
        .await
        .unwrap();
    let (opts, _events) = nats_harness::raw_options(&bundle, Duration::from_secs(5));
    let raw = opts
        .connect(urls.split(',').collect::<Vec<_>>())
        .await
        .unwrap();
    let raw_js = jetstream::new(raw);
    let config = jetstream::stream::Config {
        name: "TASKS".into(),
        subjects: vec!["tenant.acme.tasks.queue.>".into()],
        retention: jetstream::stream::RetentionPolicy::WorkQueue,
        placement: Some(Region::new("us").unwrap().placement()),
        ..Default::default()
    };
    while_settling(|| raw_js.create_stream(config.clone()))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let streams = loop {
        let stats = cp.tenant_stats("acme").await.unwrap();
        if stats.streams.len() >= 2 {
            break stats.streams;
        }
        assert!(Instant::now() < deadline, "streams: {:?}", stats.streams);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let state = streams.iter().find(|s| s.name == "KV_STATE").unwrap();
    assert_eq!(state.replicas, 2, "{state:?}");
    assert_eq!(
        state.nodes.iter().cloned().collect::<BTreeSet<_>>(),
        set(&["n1", "n2"]),
        "{state:?}"
    );
    assert_eq!(state.in_region, Some(true), "{state:?}");
    let tasks = streams.iter().find(|s| s.name == "TASKS").unwrap();
    assert_eq!(tasks.nodes, vec!["n3".to_string()], "{tasks:?}");
    assert_eq!(tasks.in_region, Some(false), "{tasks:?}");

    // A region no server carries: bad input, naming the regions that exist.
    let err = create("nowhere", "ap").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidInput, "{err}");
    assert!(err.message.contains("regions answering: eu, us"), "{err}");
    // A region with fewer servers than the deployment's replicas.
    let err = create("small", "us").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidInput, "{err}");
    assert!(err.message.contains("1 JetStream server(s)"), "{err}");
    // Not a region name at all.
    let err = create("badname", "EU west").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidInput, "{err}");
    // None of the refused tenants exists.
    for id in ["nowhere", "small", "badname"] {
        let err = cp.tenant(id).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::NotFound, "{id}: {err}");
    }
    // The region never changes.
    let err = cp
        .update_tenant(
            "acme",
            &UpdateTenant {
                set: vec![("region".into(), "us".into())],
                unset: vec![],
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Refused, "{err}");
    assert_eq!(
        cp.tenant("acme")
            .await
            .unwrap()
            .record
            .settings
            .region
            .as_deref(),
        Some("eu")
    );

    // The tenant's audit log lives in eu too: in AUDIT_eu, placed on n1
    // and n2 with the deployment's replicas, and nothing of it in the
    // shared AUDIT stream.
    assert_eq!(cp.tenant_stats("acme").await.unwrap().audit_log, "AUDIT_eu");
    let home = audit.home("acme").await.unwrap();
    assert_eq!(home.region, Some(Region::new("eu").unwrap()));
    assert_eq!(home.stream_name(), "AUDIT_eu");
    let info = home.stream().info().await.unwrap().clone();
    assert_eq!(
        info.config.placement,
        Some(Region::new("eu").unwrap().placement())
    );
    assert_eq!(info.config.num_replicas, 2);
    let cluster = info.cluster.unwrap();
    let mut audit_nodes: BTreeSet<String> = cluster.replicas.into_iter().map(|r| r.name).collect();
    audit_nodes.extend(cluster.leader);
    assert_eq!(audit_nodes, set(&["n1", "n2"]));
    let central = audit.home(PLATFORM_LOG).await.unwrap();
    assert_eq!(central.stream_name(), audit::STREAM);
    let stray = central
        .stream()
        .get_last_raw_message_by_subject(&audit::log_subject("acme"))
        .await;
    assert!(stray.is_err(), "acme's events in the shared stream");
    let events = audit::fetch_events(&cp, "acme").await.unwrap().0;
    let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions[..2],
        ["tenant.create", "agent.create"],
        "{actions:?}"
    );
    assert!(
        actions.contains(&"tenant.update"),
        "the refused region change: {actions:?}"
    );
    audit.checkpoint("acme").await.unwrap();
    let (report, _) = audit::verify_remote(&cp, "acme", None).await.unwrap();
    assert_eq!(
        (report.entries, report.signed_size),
        (events.len() as u64, events.len() as u64)
    );
    // Its books live in eu as well: a budget and a charged usage report
    // land in the region's buckets and counter stream (on n1 and n2 only),
    // nothing of them in the shared ones, and the figures read back.
    let spec = BudgetSpec {
        name: "llm".into(),
        unit: "llm.tokens".into(),
        period: Period::Day,
        hard: 1_000,
        soft: None,
        action: Action::Block,
        throttle_interval_ms: 1_000,
    };
    cp.set_budget("acme", &spec).await.unwrap();
    let account = bundle_account(&bundle).unwrap();
    assert!(report_usage(&ns, &account, "llm.tokens", 300, "r-1")
        .await
        .unwrap());
    let budgets = cp.budgets("acme").await.unwrap();
    assert_eq!((budgets.len(), budgets[0].spent), (1, 300), "{budgets:?}");
    let creds = Installation::open(tmp.path().join("state"))
        .unwrap()
        .creds("controller.creds")
        .unwrap();
    let platform = async_nats::ConnectOptions::with_credentials(&creds)
        .unwrap()
        .connect(urls.split(',').collect::<Vec<_>>())
        .await
        .unwrap();
    let pjs = jetstream::new(platform);
    for stream in [
        "KV_agentbus-usage-eu",
        "KV_agentbus-budgets-eu",
        "KV_agentbus-budget-marks-eu",
        "agentbus-budget-counters-eu",
    ] {
        assert_eq!(holders(&pjs, stream).await, set(&["n1", "n2"]), "{stream}");
    }
    let regional = pjs.get_key_value("agentbus-usage-eu").await.unwrap();
    let ledger = regional
        .get("acme")
        .await
        .unwrap()
        .expect("acme's ledger in eu");
    assert!(String::from_utf8_lossy(&ledger).contains("llm.tokens"));
    let shared = pjs.get_key_value("agentbus-usage").await.unwrap();
    assert!(
        shared.get("acme").await.unwrap().is_none(),
        "acme's ledger in the shared bucket"
    );
    assert!(shared.get("acme.police").await.unwrap().is_none());
    let shared_budgets = pjs.get_key_value("agentbus-budgets").await.unwrap();
    assert!(shared_budgets.get("spec.acme.llm").await.unwrap().is_none());
    let regional_budgets = pjs.get_key_value("agentbus-budgets-eu").await.unwrap();
    assert!(regional_budgets
        .get("spec.acme.llm")
        .await
        .unwrap()
        .is_some());
    let counters = pjs.get_stream("agentbus-budget-counters-eu").await.unwrap();
    let period = &budgets[0].period_id;
    counters
        .direct_get_last_for_subject(format!("agentbus.budget-region.eu.acme.llm.{period}"))
        .await
        .expect("acme's counter in eu");
    let shared_counters = pjs.get_stream("agentbus-budget-counters").await.unwrap();
    assert!(shared_counters
        .direct_get_last_for_subject(format!("agentbus.budget.acme.llm.{period}"))
        .await
        .is_err());
    // The cap holds there as anywhere: 800 more do not fit.
    let err = report_usage(&ns, &account, "llm.tokens", 800, "r-2")
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::BudgetExceeded, "{err}");

    // The refused creates named tenants that never existed: their events
    // are in the platform log, and no log of theirs has a home.
    for id in ["nowhere", "small"] {
        assert!(audit.home(id).await.unwrap().region.is_none());
        assert!(audit::fetch_events(&cp, id).await.unwrap().0.is_empty());
    }
    // An id keeps its log's region: deleted and created again elsewhere
    // (here: without a region) is refused, naming where the log lives.
    create("temp", "eu").await.unwrap();
    cp.delete_tenant("temp").await.unwrap();
    let err = cp.create_tenant("temp", Tier::Free).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidInput, "{err}");
    assert!(err.message.contains("region eu"), "{err}");
    create("temp", "eu").await.unwrap();
    let temp = audit::fetch_events(&cp, "temp").await.unwrap().0;
    // The refusal is in the id's log (it has a home), then the new create.
    assert_eq!(
        temp.iter()
            .map(|e| (e.action.as_str(), e.outcome))
            .collect::<Vec<_>>(),
        [
            ("tenant.create", Outcome::Allowed),
            ("tenant.delete", Outcome::Allowed),
            ("tenant.create", Outcome::Failed),
            ("tenant.create", Outcome::Allowed),
        ]
    );
    shutdown.fire();
}

/// Three region-bound tenants, each with a stream its agent's raw client put
/// in the wrong region: one pass reads where every account's streams live
/// (JSZ pages that skip each server's first account, which is then asked
/// for on its own: with three tenants and the platform account both paths
/// run) and moves all three.
#[tokio::test]
async fn a_stream_a_raw_client_creates_outside_the_region_is_moved_into_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (_cluster, urls, cp, shutdown, _audit) = operator_deployment(tmp.path(), 1, |c| {
        c.placement_every(Duration::from_millis(500))
    })
    .await;
    let tenants = ["acme", "globex", "initech"];
    let mut raw_js = Vec::new();
    for tenant in tenants {
        cp.create_tenant_with(
            tenant,
            &CreateTenant {
                region: Some("eu".to_string()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let bundle = cp.issue_agent(tenant, "worker", "default").await.unwrap();
        // The agent's raw client puts TASKS on n3 (us) and three tasks in it.
        let (opts, _events) = nats_harness::raw_options(&bundle, Duration::from_secs(5));
        let raw = opts
            .connect(urls.split(',').collect::<Vec<_>>())
            .await
            .unwrap();
        let js = jetstream::new(raw);
        let config = jetstream::stream::Config {
            name: "TASKS".into(),
            subjects: vec![format!("tenant.{tenant}.tasks.queue.>")],
            retention: jetstream::stream::RetentionPolicy::WorkQueue,
            placement: Some(Region::new("us").unwrap().placement()),
            ..Default::default()
        };
        // A new account's JetStream reaches every node of the cluster shortly
        // after its JWT (seen in CI: 503 "JetStream not enabled for account",
        // and 500 "error creating store for stream" from n3 before it made
        // the account's directory, right after the tenant was created); only
        // that is retried.
        while_settling(|| js.create_stream(config.clone()))
            .await
            .unwrap_or_else(|e| panic!("creating TASKS of {tenant} on the us node: {e}"));
        for i in 0..3 {
            // The stream's subjects reach the client's server over the routes
            // a moment after its creation ("no responders" until then).
            while_unrouted(|| async {
                js.publish(
                    format!("tenant.{tenant}.tasks.queue.resize"),
                    format!("task {i}").into(),
                )
                .await?
                .await
            })
            .await
            .unwrap_or_else(|e| panic!("queueing task {i} of {tenant}: {e}"));
        }
        raw_js.push(js);
    }

    for (tenant, js) in tenants.into_iter().zip(raw_js) {
        // Within a few passes the servers report it on an eu node.
        let deadline = Instant::now() + Duration::from_secs(45);
        let tasks = loop {
            let stats = cp.tenant_stats(tenant).await.unwrap();
            if let Some(t) = stats.streams.iter().find(|s| s.name == "TASKS") {
                if t.in_region == Some(true) {
                    break t.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "TASKS of {tenant} not moved into eu: {:?}",
                stats.streams
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        assert_eq!(tasks.nodes.len(), 1, "{tasks:?}");
        assert!(set(&["n1", "n2"]).contains(&tasks.nodes[0]), "{tasks:?}");
        // The stream says the same, with the region's placement and its tasks.
        let info = js.get_stream("TASKS").await.unwrap().cached_info().clone();
        assert_eq!(
            info.config.placement,
            Some(Region::new("eu").unwrap().placement())
        );
        assert_eq!(info.state.messages, 3, "{tenant}: {info:?}");
        assert!(set(&["n1", "n2"]).contains(&info.cluster.unwrap().leader.unwrap()));
        // The move is in the tenant's audit log, saying from where.
        let (events, _) = audit::fetch_events(&cp, tenant).await.unwrap();
        let moved: Vec<_> = events
            .iter()
            .filter(|e| e.action == "residency.move")
            .collect();
        assert_eq!(moved.len(), 1, "{tenant}: {moved:?}");
        assert!(
            moved[0].reason.contains("stream TASKS") && moved[0].reason.contains("region:us"),
            "{}",
            moved[0].reason
        );
    }
    shutdown.fire();
}

#[tokio::test]
async fn a_regions_state_store_lives_only_on_its_nodes_and_never_moves() {
    let mut c = LocalCluster::start(ClusterOptions::new().nodes(3).node_config(|i, _| tags(i)))
        .await
        .unwrap();
    let urls = c.urls();
    let observer = async_nats::ConnectOptions::new()
        .connect(urls.split(',').collect::<Vec<_>>())
        .await
        .unwrap();
    let js = jetstream::new(observer);
    nats_harness::jetstream_ready(&js, Duration::from_secs(20)).await;
    let master = MasterSecret::generate().unwrap();
    let tenant = TenantId::new("acme").unwrap();
    let ns = TenantNamespace::connect(&CredentialBundle {
        url: urls.clone(),
        tenant: tenant.clone(),
        agent: AgentId::new("agent").unwrap(),
        creds: None,
        keys: master.key_set(&tenant, [1], 1).unwrap(),
        placement: Default::default(),
    })
    .await
    .unwrap();
    let eu = Region::new("eu").unwrap();
    let us = Region::new("us").unwrap();

    // eu, two replicas: on n1 and n2, never n3.
    let store = ns
        .kv_with(
            "sessions",
            KvOptions::new()
                .bucket("STATE_eu")
                .replicas(2)
                .region(eu.clone()),
        )
        .await
        .unwrap();
    store.put("s1", b"hello").await.unwrap();
    assert_eq!(holders(&js, "KV_STATE_eu").await, set(&["n1", "n2"]));
    // us, one replica: on n3.
    ns.kv_with(
        "sessions",
        KvOptions::new().bucket("STATE_us").region(us.clone()),
    )
    .await
    .unwrap();
    assert_eq!(holders(&js, "KV_STATE_us").await, set(&["n3"]));
    // eu with three replicas cannot be placed: refused, not spread to us.
    let err = ns
        .kv_with(
            "sessions",
            KvOptions::new()
                .bucket("STATE_eu3")
                .replicas(3)
                .region(eu.clone()),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), KvErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("region eu"), "{err}");
    assert!(
        js.get_stream("KV_STATE_eu3").await.is_err(),
        "a stream was created anyway"
    );

    // A bundle's placement is the default: an agent of a us tenant opens the
    // default STATE bucket in us without saying so.
    let us_agent = TenantNamespace::connect(&CredentialBundle {
        url: urls.clone(),
        tenant: tenant.clone(),
        agent: AgentId::new("us-agent").unwrap(),
        creds: None,
        keys: master.key_set(&tenant, [1], 1).unwrap(),
        placement: StorePlacement {
            replicas: Some(1),
            region: Some(us.clone()),
        },
    })
    .await
    .unwrap();
    us_agent.kv("sessions").await.unwrap();
    assert_eq!(holders(&js, "KV_STATE").await, set(&["n3"]));

    // Task dispatch takes the same placement from the bundle: a us tenant's
    // stream and done bucket on n3, an eu tenant's (two replicas) on n1 and n2.
    let agent_of = |t: &str, placement: StorePlacement| {
        let t = TenantId::new(t).unwrap();
        CredentialBundle {
            url: urls.clone(),
            tenant: t.clone(),
            agent: AgentId::new("worker").unwrap(),
            creds: None,
            keys: master.key_set(&t, [1], 1).unwrap(),
            placement,
        }
    };
    let placed = |replicas, region: &Region| StorePlacement {
        replicas: Some(replicas),
        region: Some(region.clone()),
    };
    let us_ns = TenantNamespace::connect(&agent_of("usco", placed(1, &us)))
        .await
        .unwrap();
    Dispatcher::new(&us_ns, DispatchOptions::new().per_tenant_names(true))
        .await
        .unwrap();
    assert_eq!(holders(&js, "TASKS_usco").await, set(&["n3"]));
    assert_eq!(holders(&js, "KV_TASKS_DONE_usco").await, set(&["n3"]));
    let eu_ns = TenantNamespace::connect(&agent_of("euco", placed(2, &eu)))
        .await
        .unwrap();
    Dispatcher::new(&eu_ns, DispatchOptions::new().per_tenant_names(true))
        .await
        .unwrap();
    assert_eq!(holders(&js, "TASKS_euco").await, set(&["n1", "n2"]));
    assert_eq!(holders(&js, "KV_TASKS_DONE_euco").await, set(&["n1", "n2"]));
    // A task stream someone made without the placement is refused.
    let plain_ns = TenantNamespace::connect(&agent_of("plainco", StorePlacement::default()))
        .await
        .unwrap();
    Dispatcher::new(&plain_ns, DispatchOptions::new().per_tenant_names(true))
        .await
        .unwrap();
    let err = Dispatcher::new(
        &plain_ns,
        DispatchOptions::new()
            .per_tenant_names(true)
            .region(eu.clone()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), DispatchErrorKind::StreamConflict, "{err}");
    assert!(err.to_string().contains("region eu"), "{err}");

    // A bucket made by someone else without the placement is not used.
    ns.kv_with("sessions", KvOptions::new().bucket("STATE_plain"))
        .await
        .unwrap();
    let err = ns
        .kv_with(
            "sessions",
            KvOptions::new().bucket("STATE_plain").region(eu.clone()),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), KvErrorKind::OutsideRegion, "{err}");

    // The us region goes down: a new us store is refused with a clear error
    // and nothing is placed on the eu nodes; eu keeps working.
    c.kill_node(2).unwrap();
    let err = ns
        .kv_with(
            "sessions",
            KvOptions::new().bucket("STATE_us2").region(us.clone()),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), KvErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("region us"), "{err}");
    assert!(
        js.get_stream("KV_STATE_us2").await.is_err(),
        "placed outside its region"
    );
    let late_ns = TenantNamespace::connect(&agent_of("lateco", placed(1, &us)))
        .await
        .unwrap();
    let err = Dispatcher::new(&late_ns, DispatchOptions::new().per_tenant_names(true))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), DispatchErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("region us"), "{err}");
    assert!(
        js.get_stream("TASKS_lateco").await.is_err(),
        "placed outside its region"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store.get("s1").await {
            Ok(v) => {
                assert_eq!(&v.value[..], b"hello");
                break;
            }
            other => {
                assert!(Instant::now() < deadline, "eu store unreadable: {other:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Books without a home record (a tenant from before books had homes) stay
/// where their ledger already is, in the shared buckets, and get a record
/// saying so; a region-bound tenant without a record and without books
/// there gets its region. A fresh controller instance decides, so nothing
/// cached from the creates answers for it.
#[tokio::test]
async fn books_without_a_home_record_stay_where_their_ledger_is() {
    let tmp = tempfile::tempdir().unwrap();
    let (_cluster, urls, cp, first, _audit) = operator_deployment(tmp.path(), 2, |c| {
        c.placement_every(Duration::from_secs(3600))
    })
    .await;
    for id in ["legacy", "fresh"] {
        cp.create_tenant_with(
            id,
            &CreateTenant {
                region: Some("eu".to_string()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    // As before homes existed: no records, and legacy's ledger is shared.
    let install = Installation::open(tmp.path().join("state")).unwrap();
    let platform =
        async_nats::ConnectOptions::with_credentials(&install.creds("controller.creds").unwrap())
            .unwrap()
            .connect(urls.split(',').collect::<Vec<_>>())
            .await
            .unwrap();
    let pjs = jetstream::new(platform);
    let homes = pjs.get_key_value("agentbus-audit-homes").await.unwrap();
    for id in ["legacy", "fresh"] {
        homes.purge(format!("books.{id}")).await.unwrap();
    }
    let shared = pjs.get_key_value("agentbus-usage").await.unwrap();
    let ledger = serde_json::to_vec(&agentbus_control::usage::Ledger::default()).unwrap();
    shared.put("legacy", ledger.into()).await.unwrap();
    first.fire();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = Controller::connect(
        &install,
        ControllerConfig::new(&urls)
            .replicas(2)
            .placement_every(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    let shutdown = Shutdown::new();
    tokio::spawn(second.serve(shutdown.clone()));

    let spec = BudgetSpec {
        name: "llm".into(),
        unit: "llm.tokens".into(),
        period: Period::Day,
        hard: 1_000,
        soft: None,
        action: Action::Block,
        throttle_interval_ms: 1_000,
    };
    for id in ["legacy", "fresh"] {
        cp.set_budget(id, &spec).await.unwrap();
    }
    let home = |id: &'static str| {
        let homes = homes.clone();
        async move {
            let e = homes.get(format!("books.{id}")).await.unwrap();
            String::from_utf8(e.expect("a books home record").to_vec()).unwrap()
        }
    };
    assert_eq!(home("legacy").await, "", "legacy stays shared");
    assert_eq!(home("fresh").await, "eu");
    let shared_budgets = pjs.get_key_value("agentbus-budgets").await.unwrap();
    let eu_budgets = pjs.get_key_value("agentbus-budgets-eu").await.unwrap();
    assert!(shared_budgets
        .get("spec.legacy.llm")
        .await
        .unwrap()
        .is_some());
    assert!(eu_budgets.get("spec.legacy.llm").await.unwrap().is_none());
    assert!(eu_budgets.get("spec.fresh.llm").await.unwrap().is_some());
    assert!(shared_budgets
        .get("spec.fresh.llm")
        .await
        .unwrap()
        .is_none());
    shutdown.fire();
}
