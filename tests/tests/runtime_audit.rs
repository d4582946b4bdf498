//! The runtime's security decisions in the audit log, against a real
//! nats-server and controller: a tool call (tool and input hash) and a
//! permission denial each become one event in the tenant's log with the agent
//! as actor; at the queue's bound an audited tool call is refused and does not
//! run; a tenant's own credentials cannot append to any log.

// Test code: a failed set-up step should abort the test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_runtime::agent::{AgentErrorKind, AgentHost};
use agent_runtime::registry::{Registry, RegistryWatcher, SettingsPatch, ToolSettings};
use agentbus_control::audit::event::{AuditEvent, Outcome};
use agentbus_control::audit::sink::{AuditSink, AuditSinkOptions};
use agentbus_control::audit::{self, ListRequest};
use agentbus_control::tiers::Tier;
use bytes::Bytes;
use nats_harness::{eventually, platform, Platform};

/// A runtime instance's platform connection, registry and its watcher.
async fn runtime_client(p: &Platform) -> (async_nats::Client, Registry, Arc<RegistryWatcher>) {
    let client = p.platform_client("runtime").await;
    let registry = Registry::open(client.clone()).await.unwrap();
    let watcher = Arc::new(RegistryWatcher::start(&registry).await.unwrap());
    (client, registry, watcher)
}

/// A runtime instance's host, with an audit sink.
async fn runtime(p: &Platform, options: AuditSinkOptions) -> (AgentHost, Arc<AuditSink>, Registry) {
    let (client, registry, watcher) = runtime_client(p).await;
    let sink = Arc::new(AuditSink::new(client, options));
    let host = AgentHost::new(watcher).audit_sink(sink.clone());
    (host, sink, registry)
}

async fn runtime_events(p: &Platform, tenant: &str) -> Vec<AuditEvent> {
    audit::list(
        &p.cp,
        tenant,
        &ListRequest {
            action: Some("runtime.".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

fn sha256_hex(b: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

async fn enable_search(registry: &Registry, host: &AgentHost, runs: Arc<AtomicU64>) {
    let rt = tenant_bus::TenantId::new("rt").unwrap();
    registry
        .update(
            &rt,
            &SettingsPatch::new().tool("search", ToolSettings::enabled()),
        )
        .await
        .unwrap();
    host.tools(&rt)
        .register("search", move |input: Bytes| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(input)
            }
        })
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_and_denials_are_one_event_each_with_the_agent_as_actor() {
    let p = platform().await;
    p.cp.create_tenant("rt", Tier::Free).await.unwrap();
    p.cp.create_tenant("other", Tier::Free).await.unwrap();
    let bundle = p.cp.issue_agent("rt", "worker", "default").await.unwrap();
    let (host, sink, registry) = runtime(&p, AuditSinkOptions::new()).await;
    let runs = Arc::new(AtomicU64::new(0));
    enable_search(&registry, &host, runs.clone()).await;
    let agent = host
        .start(
            &bundle,
            tenant_bus::NamespaceOptions::new(),
            "default",
            ["tool:search", "reports:read"],
        )
        .await
        .unwrap();
    // The tool setting reaches the watcher.
    let budget = agent.task_budget().await.unwrap();
    let out = eventually(Duration::from_secs(3), || async {
        agent.call_tool(&budget, "search", "who is acme").await.ok()
    })
    .await
    .expect("the tool ran");
    assert_eq!(out.as_ref(), b"who is acme");
    let denied = agent
        .authorize(&agent.resource("reports").named("q3"), "delete")
        .unwrap_err();
    assert_eq!(denied.kind(), AgentErrorKind::Denied);
    assert!(
        sink.flush(Duration::from_secs(5)).await,
        "appended: queued {} appended {} rejected {} failures {}",
        sink.counters().queued(),
        sink.counters().appended(),
        sink.counters().rejected(),
        sink.counters().send_failures()
    );

    let events = runtime_events(&p, "rt").await;
    let calls: Vec<_> = events
        .iter()
        .filter(|e| e.action == "runtime.tool_call")
        .collect();
    assert_eq!(calls.len(), 1, "{events:?}");
    assert_eq!(calls[0].actor.kind, "agent");
    assert_eq!(calls[0].actor.id, "worker");
    assert_eq!(calls[0].resource, "tool/search");
    assert_eq!(calls[0].outcome, Outcome::Allowed);
    assert_eq!(
        calls[0].reason,
        format!("input sha256={}", sha256_hex(b"who is acme")),
        "the hash, never the input"
    );
    let denials: Vec<_> = events
        .iter()
        .filter(|e| e.action == "runtime.permission_denied")
        .collect();
    assert_eq!(denials.len(), 1, "{events:?}");
    assert_eq!(denials[0].outcome, Outcome::Denied);
    assert!(
        denials[0].reason.starts_with("delete"),
        "{}",
        denials[0].reason
    );
    // Nothing in the other tenant's log; the tenant's log still verifies.
    assert!(runtime_events(&p, "other").await.is_empty());
    audit::verify_remote(&p.cp, "rt", None).await.unwrap();
    agent.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_bound_an_audited_tool_call_is_refused_and_does_not_run() {
    let p = platform().await;
    p.cp.create_tenant("rt", Tier::Free).await.unwrap();
    let bundle = p.cp.issue_agent("rt", "worker", "default").await.unwrap();
    // Room for one queued event (each costs its text plus 128 bytes).
    let (host, sink, registry) = runtime(&p, AuditSinkOptions::new().max_bytes(300)).await;
    let runs = Arc::new(AtomicU64::new(0));
    enable_search(&registry, &host, runs.clone()).await;
    let agent = host
        .start(
            &bundle,
            tenant_bus::NamespaceOptions::new(),
            "default",
            ["tool:search"],
        )
        .await
        .unwrap();
    let budget = agent.task_budget().await.unwrap();
    eventually(Duration::from_secs(3), || async {
        agent.call_tool(&budget, "search", "warm").await.ok()
    })
    .await
    .expect("the tool ran");
    assert!(sink.flush(Duration::from_secs(5)).await);

    // The controller stops: the next event waits in the queue, the one after
    // does not fit, and its tool call is refused without running.
    p.shutdown.fire();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = runs.load(Ordering::SeqCst);
    agent.call_tool(&budget, "search", "one").await.unwrap();
    let refused = agent.call_tool(&budget, "search", "two").await.unwrap_err();
    assert_eq!(refused.kind(), AgentErrorKind::AuditUnavailable);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        before + 1,
        "the refused call did not run"
    );
    assert_eq!(sink.counters().refused_full(), 1);

    // The controller is back: the queued event is appended, calls run again.
    let (_c, _stop) = p.another_controller().await;
    assert!(
        sink.flush(Duration::from_secs(10)).await,
        "the queue drained"
    );
    agent.call_tool(&budget, "search", "three").await.unwrap();
    assert!(sink.flush(Duration::from_secs(5)).await);
    let reasons: Vec<String> = runtime_events(&p, "rt")
        .await
        .into_iter()
        .map(|e| e.reason)
        .collect();
    for (input, present) in [
        ("warm", true),
        ("one", true),
        ("two", false),
        ("three", true),
    ] {
        let expected = format!("input sha256={}", sha256_hex(input.as_bytes()));
        assert_eq!(reasons.contains(&expected), present, "{input}: {reasons:?}");
    }
    agent.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_credentials_cannot_append_to_any_log() {
    let p = platform().await;
    p.cp.create_tenant("rt", Tier::Free).await.unwrap();
    let issued = p.cp.create_agent("rt", "mallory", "default").await.unwrap();
    let raw = async_nats::ConnectOptions::with_credentials(issued.bundle.creds.as_deref().unwrap())
        .unwrap()
        .connect(p.server.url())
        .await
        .unwrap();
    let forged = serde_json::json!({"events": [{
        "tenant": "rt", "agent": "admin", "action": "runtime.tool_call",
        "resource": "tool/x", "outcome": "allowed", "reason": "forged", "request_id": ""
    }]});
    let answer = tokio::time::timeout(
        Duration::from_secs(3),
        raw.request(
            agentbus_control::api::AUDIT_APPEND_SUBJECT,
            serde_json::to_vec(&forged).unwrap().into(),
        ),
    )
    .await;
    assert!(
        !matches!(answer, Ok(Ok(_))),
        "the server must not route a tenant's append"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(runtime_events(&p, "rt").await.is_empty());
}

/// What only the runtime sees is metered into the tenant's usage: tool calls
/// per tool and tasks run, completed and failed; a batch sent twice counts
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_and_tasks_are_metered_into_usage_exactly_once() {
    use agent_runtime::dispatch::{DispatchOptions, Dispatcher, Task, WorkerOptions};
    use agentbus_control::meter::{RuntimeUsage, RuntimeUsageAnswer, UsageMeter};
    use agentbus_control::usage::{Granularity, UsageRequest};

    let p = platform().await;
    p.cp.create_tenant("rt", Tier::Free).await.unwrap();
    let bundle = p.cp.issue_agent("rt", "worker", "default").await.unwrap();
    let (client, registry, watcher) = runtime_client(&p).await;
    // Flushed by hand below (the interval is long).
    let meter = UsageMeter::new(client.clone(), Duration::from_secs(3600));
    let host = AgentHost::new(watcher).usage_meter(meter.clone());
    let runs = Arc::new(AtomicU64::new(0));
    enable_search(&registry, &host, runs.clone()).await;
    let agent = host
        .start(
            &bundle,
            tenant_bus::NamespaceOptions::new(),
            "default",
            ["tool:search"],
        )
        .await
        .unwrap();
    let budget = agent.task_budget().await.unwrap();
    eventually(Duration::from_secs(3), || async {
        agent.call_tool(&budget, "search", "a").await.ok()
    })
    .await
    .expect("the tool ran");
    agent.call_tool(&budget, "search", "b").await.unwrap();
    agent.call_tool(&budget, "search", "c").await.unwrap();

    // Tasks: one completes, one fails until it is dead-lettered (2 attempts).
    let ns = agent.namespace().clone();
    let options = DispatchOptions::new()
        .max_deliveries(2)
        .backoff(vec![Duration::from_millis(100)])
        .ack_wait(Duration::from_secs(2))
        .result_poll(Duration::from_millis(200));
    let d = Dispatcher::new(&ns, options).await.unwrap();
    let _worker = d
        .worker(
            "job",
            |task: Task| async move {
                if task.payload.as_ref() == b"bad" {
                    Err("no".to_string())
                } else {
                    Ok(task.payload)
                }
            },
            WorkerOptions::new().usage_meter(meter.clone()),
        )
        .await
        .unwrap();
    d.dispatch("job", "good")
        .await
        .unwrap()
        .wait(Duration::from_secs(20))
        .await
        .unwrap();
    d.dispatch("job", "bad")
        .await
        .unwrap()
        .wait(Duration::from_secs(20))
        .await
        .unwrap();
    meter.flush().await.unwrap();

    let units = || async {
        let now = tenant_bus::envelope::now_ms();
        let rows =
            p.cp.usage(
                "rt",
                &UsageRequest {
                    from_ms: now - 3_600_000,
                    to_ms: now + 3_600_000,
                    by: Granularity::Day,
                },
            )
            .await
            .unwrap();
        let mut all = std::collections::BTreeMap::new();
        for r in rows {
            for (k, v) in r.units {
                *all.entry(k).or_insert(0u64) += v;
            }
        }
        all
    };
    let got = units().await;
    assert_eq!(got.get("tools.calls"), Some(&3), "{got:?}");
    assert_eq!(got.get("tool.search"), Some(&3), "{got:?}");
    assert_eq!(got.get("tasks.run"), Some(&3), "{got:?}");
    assert_eq!(got.get("tasks.completed"), Some(&1), "{got:?}");
    assert_eq!(got.get("tasks.failed"), Some(&2), "{got:?}");

    // The same batch sent again (a lost answer) is not counted again.
    let batch = RuntimeUsage {
        host: "rt-test-host".into(),
        seq: 1,
        tenants: [(
            "rt".to_string(),
            [("tools.calls".to_string(), 10u64)].into(),
        )]
        .into(),
    };
    for expected_added in [1, 0] {
        let reply = client
            .request(
                agentbus_control::api::RUNTIME_USAGE_SUBJECT,
                serde_json::to_vec(&batch).unwrap().into(),
            )
            .await
            .unwrap();
        let answer: agentbus_control::api::Response<RuntimeUsageAnswer> =
            serde_json::from_slice(&reply.payload).unwrap();
        match answer {
            agentbus_control::api::Response::Ok(a) => assert_eq!(a.added, expected_added),
            agentbus_control::api::Response::Error(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(units().await.get("tools.calls"), Some(&13));
    assert_eq!(meter.dropped(), 0);
    agent.shutdown(Duration::from_secs(1)).await;
}
