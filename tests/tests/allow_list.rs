//! The agent allow-list (`control::accounts::agent_publish_allow`), attacked with
//! a raw async-nats client holding a real agent's credentials (operator mode,
//! the tenant's own account), next to the task dispatch and state store it must
//! keep working.
//!
//! - `refused_calls_are_refused_and_dispatch_and_state_keep_working`: an agent
//!   tries to update `TASKS` to `max_msgs=1`, purge, delete or message-delete
//!   it, update, purge or delete the buckets, delete or pause the worker's
//!   consumer, and create push consumers (legacy, unfiltered, across the task
//!   types, legacy durable, on the done records) delivering outside the tenant.
//!   Each is a permission violation the connection observes, with no answer. A
//!   push consumer under the worker's own name and filter passes the allow-list
//!   but the server refuses to turn a pull consumer into a push one. Afterwards
//!   the stream, its limits, the worker's consumer and a queued task are
//!   intact, and the same credentials dispatch, work, and get, put and watch
//!   `STATE` without a single violation.
//! - `push_consumers_that_pass_the_allow_list_reach_nothing_an_agent_cannot`:
//!   the residual risk, measured. A push consumer for a task type no worker has
//!   claimed passes the allow-list (the create subject does not carry the
//!   deliver subject). Delivering to another tenant's subject or to the
//!   JetStream API (`STREAM.DELETE.TASKS`), it delivers nothing and deletes
//!   nothing; to the account's imports (the key service, the server's
//!   account-scoped `$SYS` services) the message arrives as a request whose
//!   answer goes to the consumer's ack subject in the answering account, never
//!   back to the tenant; to a subject of its own tenant, it delivers what a
//!   worker could have pulled.
//! - `forged_done_records_do_not_stop_a_task`: agents may write `TASKS_DONE`
//!   (workers are agents); garbage, or another task's genuine record copied
//!   under a task's id, is ignored by the worker, which runs the task.
//! - `streams_created_to_lose_tasks_are_refused_by_the_dispatcher`: agents may
//!   create `TASKS` and `TASKS_DONE` but not change them; a task stream created
//!   with `max_msgs=1`, and a done bucket that forgets sooner than the task max
//!   age, are refused by the dispatcher instead of used.

use std::time::Duration;

use agent_runtime::dispatch::{
    DispatchErrorKind, DispatchOptions, Dispatcher, Task, TaskOutcome, WorkerOptions,
};
use agent_runtime::tiers::Tier;
use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use futures::StreamExt as _;
use nats_harness::{eventually, platform, raw_options, server_sync, Events};
use serde_json::json;
use tenant_bus::{CredentialBundle, TenantNamespace};

const WAIT: Duration = Duration::from_secs(20);
const SEE: Duration = Duration::from_secs(2);

fn options() -> DispatchOptions {
    DispatchOptions::new()
        .max_deliveries(3)
        .backoff(vec![Duration::from_millis(100)])
        .ack_wait(Duration::from_secs(2))
        .result_poll(Duration::from_millis(200))
}

async fn raw_connect(url: &str, bundle: &CredentialBundle) -> (async_nats::Client, Events) {
    let (options, events) = raw_options(bundle, SEE);
    (options.connect(url).await.unwrap(), events)
}

fn is_violation(e: &str) -> bool {
    e.to_lowercase().contains("permissions violation")
}

/// A publish permission violation naming exactly `subject`.
fn violation(subject: &str) -> impl Fn(&str) -> bool {
    let quoted = format!("\\\"{subject}\\\"");
    move |e: &str| is_violation(e) && e.to_lowercase().contains("publish") && e.contains(&quoted)
}

/// A worker that answers `done:<payload>`.
async fn start_worker(d: &Dispatcher, task_type: &str) -> agent_runtime::dispatch::Worker {
    d.worker(
        task_type,
        |task: Task| async move {
            Ok::<_, String>(Bytes::from(format!(
                "done:{}",
                String::from_utf8_lossy(&task.payload)
            )))
        },
        WorkerOptions::new()
            .concurrency(2)
            .fetch_expires(Duration::from_millis(500)),
    )
    .await
    .unwrap()
}

fn completed(payload: &str) -> TaskOutcome {
    TaskOutcome::Completed(Bytes::from(format!("done:{payload}")))
}

/// Sends `body` to `subject` with a reply inbox and expects the server to
/// refuse it: a publish violation naming the subject, and no answer.
async fn expect_refused(
    raw: &async_nats::Client,
    events: &mut Events,
    n: usize,
    subject: &str,
    body: Vec<u8>,
) -> Result<String, String> {
    let inbox = format!("tenant.acme._INBOX.attempt{n}");
    let mut replies = raw
        .subscribe(inbox.clone())
        .await
        .map_err(|e| e.to_string())?;
    raw.publish_with_reply(subject.to_string(), inbox, body.into())
        .await
        .map_err(|e| e.to_string())?;
    raw.flush().await.map_err(|e| e.to_string())?;
    let seen = events
        .wait_for(SEE, violation(subject))
        .await
        .ok_or(format!(
            "{subject}: no publish violation; events {:?}",
            events.seen()
        ))?;
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), replies.next()).await {
        return Err(format!(
            "{subject}: answered {:?}",
            String::from_utf8_lossy(&m.payload)
        ));
    }
    Ok(seen)
}

/// A consumer create request body.
fn consumer_request(stream: &str, config: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&json!({ "stream_name": stream, "config": config })).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_calls_are_refused_and_dispatch_and_state_keep_working() {
    let p = platform().await;
    let url = p.server.url();
    p.cp.create_tenant("acme", Tier::Pro).await.unwrap();
    let planner =
        p.cp.issue_agent("acme", "planner", "default")
            .await
            .unwrap();
    let runner = p.cp.issue_agent("acme", "runner", "default").await.unwrap();
    let mallory =
        p.cp.issue_agent("acme", "mallory", "default")
            .await
            .unwrap();
    let account = p.cp.tenant("acme").await.unwrap().record.account;

    // Task dispatch as agents run it: a dispatcher, a worker, a finished task and
    // one left queued (no worker for its type).
    let planner_ns = TenantNamespace::connect(&planner).await.unwrap();
    let runner_ns = TenantNamespace::connect(&runner).await.unwrap();
    let d = Dispatcher::new(&planner_ns, options()).await.unwrap();
    let wd = Dispatcher::new(&runner_ns, options()).await.unwrap();
    let worker = start_worker(&wd, "resize").await;
    let mut first = d.dispatch("resize", "first").await.unwrap();
    assert_eq!(first.wait(WAIT).await.unwrap(), completed("first"));
    let queued = d.dispatch("archive", "keep-me").await.unwrap();

    // Mallory: a raw client with a real agent's credentials.
    let (raw, mut events) = raw_connect(&url, &mallory).await;
    let js = jetstream::new(raw.clone());
    let mut tasks = js.get_stream("TASKS").await.unwrap();
    let tasks_config = tasks.info().await.unwrap().config.clone();
    let mut shrunk = tasks_config.clone();
    shrunk.max_messages = 1;
    let mut done_config = js
        .get_stream("KV_TASKS_DONE")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    done_config.max_age = Duration::from_secs(1);
    let to_vec = |c: &stream::Config| serde_json::to_vec(c).unwrap();
    js.create_key_value(kv::Config {
        bucket: "STATE".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut state_config = js
        .get_stream("KV_STATE")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    state_config.max_messages = 1;
    // Delivery subjects outside the tenant's subjects: another tenant's subject
    // name, the default inbox space, the imported key service.
    let keys = format!("agentbus.keys.v1.{account}");
    let push = |deliver: &str, filter: &str, name: Option<&str>, durable: Option<&str>| {
        let mut config = json!({
            "deliver_subject": deliver,
            "ack_policy": "explicit",
        });
        if !filter.is_empty() {
            config["filter_subject"] = json!(filter);
        }
        if let Some(n) = name {
            config["name"] = json!(n);
        }
        if let Some(n) = durable {
            config["durable_name"] = json!(n);
        }
        consumer_request("TASKS", config)
    };
    let attempts: Vec<(&str, String, Vec<u8>)> = vec![
        (
            "shrink TASKS to max_msgs=1",
            "$JS.API.STREAM.UPDATE.TASKS".into(),
            to_vec(&shrunk),
        ),
        (
            "purge TASKS",
            "$JS.API.STREAM.PURGE.TASKS".into(),
            b"{}".to_vec(),
        ),
        ("delete TASKS", "$JS.API.STREAM.DELETE.TASKS".into(), vec![]),
        (
            "delete a queued task",
            "$JS.API.STREAM.MSG.DELETE.TASKS".into(),
            br#"{"seq":1}"#.to_vec(),
        ),
        (
            "delete the worker's consumer",
            "$JS.API.CONSUMER.DELETE.TASKS.work-resize".into(),
            vec![],
        ),
        (
            "pause the worker's consumer",
            "$JS.API.CONSUMER.PAUSE.TASKS.work-resize".into(),
            br#"{"pause_until":"2100-01-01T00:00:00Z"}"#.to_vec(),
        ),
        (
            "shorten TASKS_DONE to 1 s",
            "$JS.API.STREAM.UPDATE.KV_TASKS_DONE".into(),
            to_vec(&done_config),
        ),
        (
            "purge TASKS_DONE",
            "$JS.API.STREAM.PURGE.KV_TASKS_DONE".into(),
            b"{}".to_vec(),
        ),
        (
            "delete TASKS_DONE",
            "$JS.API.STREAM.DELETE.KV_TASKS_DONE".into(),
            vec![],
        ),
        (
            "shrink STATE",
            "$JS.API.STREAM.UPDATE.KV_STATE".into(),
            to_vec(&state_config),
        ),
        (
            "purge STATE",
            "$JS.API.STREAM.PURGE.KV_STATE".into(),
            b"{}".to_vec(),
        ),
        (
            "delete STATE",
            "$JS.API.STREAM.DELETE.KV_STATE".into(),
            vec![],
        ),
        (
            "push consumer, legacy create, delivering to another tenant's subject",
            "$JS.API.CONSUMER.CREATE.TASKS".into(),
            push(
                "tenant.globex.loot",
                "tenant.acme.tasks.queue.archive",
                None,
                None,
            ),
        ),
        (
            "push consumer, named, unfiltered, delivering to _INBOX",
            "$JS.API.CONSUMER.CREATE.TASKS.loot".into(),
            push("_INBOX.loot", "", Some("loot"), None),
        ),
        (
            "push consumer across every task type, delivering to the key service",
            "$JS.API.CONSUMER.CREATE.TASKS.loot.tenant.acme.tasks.>".into(),
            push(&keys, "tenant.acme.tasks.>", Some("loot"), None),
        ),
        (
            "push consumer over the dead letters under another name",
            "$JS.API.CONSUMER.CREATE.TASKS.loot.tenant.acme.tasks.dead.>".into(),
            push(
                "_INBOX.loot",
                "tenant.acme.tasks.dead.>",
                Some("loot"),
                None,
            ),
        ),
        (
            "push consumer, legacy durable create",
            "$JS.API.CONSUMER.DURABLE.CREATE.TASKS.loot".into(),
            push(
                "_INBOX.loot",
                "tenant.acme.tasks.queue.archive",
                None,
                Some("loot"),
            ),
        ),
        (
            "push consumer on the done records",
            "$JS.API.CONSUMER.CREATE.KV_TASKS_DONE".into(),
            consumer_request(
                "KV_TASKS_DONE",
                json!({"deliver_subject": "_INBOX.loot", "ack_policy": "none"}),
            ),
        ),
        (
            "raw read of a queued task",
            "$JS.API.DIRECT.GET.TASKS".into(),
            br#"{"seq":1}"#.to_vec(),
        ),
    ];
    let mut failures = Vec::new();
    for (n, (name, subject, body)) in attempts.iter().enumerate() {
        match expect_refused(&raw, &mut events, n, subject, body.clone()).await {
            Ok(v) => eprintln!("refused: {name}: {v}"),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} not refused:\n{}",
        failures.len(),
        attempts.len(),
        failures.join("\n")
    );

    // The worker's own name and filter pass the allow-list, but the server does
    // not turn its pull consumer into a push consumer.
    events.drain();
    let hijack = raw
        .request(
            "$JS.API.CONSUMER.CREATE.TASKS.work-resize.tenant.acme.tasks.queue.resize",
            push(
                &keys,
                "tenant.acme.tasks.queue.resize",
                Some("work-resize"),
                Some("work-resize"),
            )
            .into(),
        )
        .await
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&hijack.payload).unwrap();
    assert!(
        answer.get("error").is_some(),
        "the server turned the worker's consumer into a push consumer: {answer}"
    );
    eprintln!("refused by JetStream: hijack the worker's consumer: {answer}");

    // Everything is intact.
    let planner_js = jetstream::new(planner_ns.nats().clone());
    let mut tasks = planner_js.get_stream("TASKS").await.unwrap();
    let info = tasks.info().await.unwrap().clone();
    assert_eq!(info.config, tasks_config, "TASKS unchanged");
    assert_eq!(info.config.max_messages, -1);
    assert_eq!(info.state.messages, 1, "the queued task is still queued");
    let work = tasks.consumer_info("work-resize").await.unwrap();
    assert!(
        work.config.deliver_subject.is_none(),
        "still a pull consumer"
    );
    assert!(work.config.pause_until.is_none(), "not paused");
    for name in ["loot"] {
        assert!(
            tasks.consumer_info(name).await.is_err(),
            "consumer {name} exists"
        );
    }
    let mut done = planner_js.get_stream("KV_TASKS_DONE").await.unwrap();
    let done_info = done.info().await.unwrap();
    assert_eq!(done_info.config.max_age, Duration::from_secs(7 * 24 * 3600));
    assert_eq!(done_info.state.messages, 1, "the first task's record");
    assert!(d.outcome(&queued.id()).await.unwrap().is_none());

    // The same credentials still do everything dispatch and the state store need.
    events.drain();
    let state = js.get_key_value("STATE").await.unwrap();
    let mut watch = state.watch("cursor").await.unwrap();
    state.put("cursor", "7".into()).await.unwrap();
    assert_eq!(
        state.get("cursor").await.unwrap().as_deref(),
        Some(&b"7"[..])
    );
    let entry = tokio::time::timeout(WAIT, watch.next())
        .await
        .expect("a watch update")
        .unwrap()
        .unwrap();
    assert_eq!(
        (entry.key.as_str(), &entry.value[..]),
        ("cursor", &b"7"[..])
    );
    let mut all = state.watch_all().await.unwrap();
    state.put("other", "x".into()).await.unwrap();
    let entry = tokio::time::timeout(WAIT, all.next())
        .await
        .expect("a watch-all update")
        .unwrap()
        .unwrap();
    assert!(entry.key == "cursor" || entry.key == "other");
    state.delete("other").await.unwrap();
    let mallory_ns = TenantNamespace::connect(&mallory).await.unwrap();
    let md = Dispatcher::new(&mallory_ns, options()).await.unwrap();
    let mallory_worker = start_worker(&md, "archive").await;
    let mut own = md.dispatch("resize", "from-mallory").await.unwrap();
    assert_eq!(own.wait(WAIT).await.unwrap(), completed("from-mallory"));
    let mut queued = queued;
    assert_eq!(queued.wait(WAIT).await.unwrap(), completed("keep-me"));
    let mut letters = md.dead_letters().await.unwrap();
    assert!(letters
        .next(Duration::from_millis(500))
        .await
        .unwrap()
        .is_none());
    let mut second = d.dispatch("resize", "second").await.unwrap();
    assert_eq!(second.wait(WAIT).await.unwrap(), completed("second"));
    let after: Vec<String> = events
        .drain()
        .into_iter()
        .filter(|e| is_violation(e))
        .collect();
    assert!(after.is_empty(), "mallory's own work hit {after:?}");
    for ns in [&planner_ns, &runner_ns, &mallory_ns] {
        assert_eq!(
            ns.counters().permission_violation(),
            0,
            "{}: permission violations",
            ns.agent()
        );
    }
    worker.shutdown(Duration::from_secs(5)).await;
    mallory_worker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_consumers_that_pass_the_allow_list_reach_nothing_an_agent_cannot() {
    let p = platform().await;
    let url = p.server.url();
    p.cp.create_tenant("acme", Tier::Pro).await.unwrap();
    p.cp.create_tenant("globex", Tier::Pro).await.unwrap();
    let planner =
        p.cp.issue_agent("acme", "planner", "default")
            .await
            .unwrap();
    let mallory =
        p.cp.issue_agent("acme", "mallory", "default")
            .await
            .unwrap();
    let victim =
        p.cp.issue_agent("globex", "victim", "default")
            .await
            .unwrap();
    let account = p.cp.tenant("acme").await.unwrap().record.account;
    let planner_ns = TenantNamespace::connect(&planner).await.unwrap();
    let _d = Dispatcher::new(&planner_ns, options()).await.unwrap();

    // globex listens on the subject mallory aims at (in globex's own account).
    let (globex, _globex_events) = raw_connect(&url, &victim).await;
    let mut globex_loot = globex.subscribe("tenant.globex.loot").await.unwrap();
    // Live before mallory aims at it, or "nothing arrived" would prove nothing.
    server_sync(&globex, "tenant.globex.sync").await;

    let (raw, mut events) = raw_connect(&url, &mallory).await;
    let js = jetstream::new(raw.clone());
    let mut acme_loot = raw.subscribe("tenant.acme.loot").await.unwrap();
    raw.flush().await.unwrap();
    let keys = format!("agentbus.keys.v1.{account}");
    // One unclaimed task type per deliver subject (a work queue allows one
    // consumer per filter). The payload `{}` would be a valid API request.
    let targets = [
        ("to-globex", "tenant.globex.loot".to_string()),
        ("to-api", "$JS.API.STREAM.DELETE.TASKS".to_string()),
        ("to-keys", keys),
        ("to-sys", "$SYS.REQ.ACCOUNT.PING.CONNZ".to_string()),
        ("to-acme", "tenant.acme.loot".to_string()),
    ];
    for (task_type, deliver) in &targets {
        let filter = format!("tenant.acme.tasks.queue.{task_type}");
        let created = raw
            .request(
                format!("$JS.API.CONSUMER.CREATE.TASKS.{task_type}.{filter}"),
                consumer_request(
                    "TASKS",
                    json!({
                        "name": task_type,
                        "durable_name": task_type,
                        "deliver_subject": deliver,
                        "filter_subject": filter,
                        "ack_policy": "explicit",
                    }),
                )
                .into(),
            )
            .await
            .unwrap();
        let answer: serde_json::Value = serde_json::from_slice(&created.payload).unwrap();
        // The residual risk: the create subject names the filter, not the
        // deliver subject, so the allow-list lets this through.
        assert!(
            answer.get("error").is_none(),
            "{task_type}: expected the create to pass: {answer}"
        );
        js.publish(filter, "{}".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // Inside the tenant it delivers (what a worker of that type could pull).
    let m = tokio::time::timeout(WAIT, acme_loot.next())
        .await
        .expect("delivery inside the tenant")
        .unwrap();
    assert_eq!(m.subject.as_str(), "tenant.acme.tasks.queue.to-acme");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut tasks = js.get_stream("TASKS").await.unwrap();
    for (task_type, deliver) in &targets {
        let info = tasks.consumer_info(*task_type).await.unwrap();
        eprintln!(
            "{task_type} -> {deliver}: delivered {}, pending {}, awaiting ack {}",
            info.delivered.consumer_sequence, info.num_pending, info.num_ack_pending
        );
        let delivered = info.delivered.consumer_sequence;
        match *task_type {
            // No subscription in the account matches: nothing is delivered (the
            // JetStream API is not reachable this way; globex is another account).
            "to-globex" | "to-api" => assert_eq!(
                (delivered, info.num_pending),
                (0, 1),
                "{task_type}: delivered to {deliver}"
            ),
            // The account's imports (the key service, the server's
            // account-scoped $SYS services) receive it as a request. Its reply
            // subject is the consumer's ack subject, answered in the exporting
            // account, so the answer never comes back: the delivery still waits
            // for its ack. The agent may call the key service itself anyway.
            "to-keys" | "to-sys" => assert_eq!(
                (delivered, info.num_ack_pending),
                (1, 1),
                "{task_type}: {deliver}"
            ),
            // Inside the tenant: what a worker of that type could pull.
            _ => assert_eq!(delivered, 1, "{task_type}"),
        }
    }
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), globex_loot.next()).await
    {
        panic!("globex received {} from acme", m.subject);
    }
    let info = tasks.info().await.unwrap();
    assert_eq!(info.state.messages, 5, "TASKS not deleted, tasks kept");
    let violations: Vec<String> = events
        .drain()
        .into_iter()
        .filter(|e| is_violation(e))
        .collect();
    assert!(violations.is_empty(), "{violations:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_done_records_do_not_stop_a_task() {
    let p = platform().await;
    let url = p.server.url();
    p.cp.create_tenant("acme", Tier::Pro).await.unwrap();
    let planner =
        p.cp.issue_agent("acme", "planner", "default")
            .await
            .unwrap();
    let runner = p.cp.issue_agent("acme", "runner", "default").await.unwrap();
    let mallory =
        p.cp.issue_agent("acme", "mallory", "default")
            .await
            .unwrap();
    let planner_ns = TenantNamespace::connect(&planner).await.unwrap();
    let runner_ns = TenantNamespace::connect(&runner).await.unwrap();
    let d = Dispatcher::new(&planner_ns, options()).await.unwrap();
    let wd = Dispatcher::new(&runner_ns, options()).await.unwrap();
    let worker = start_worker(&wd, "resize").await;
    let mut first = d.dispatch("resize", "first").await.unwrap();
    assert_eq!(first.wait(WAIT).await.unwrap(), completed("first"));

    // Writing done records is allowed (workers are agents)...
    let (raw, mut events) = raw_connect(&url, &mallory).await;
    let done = jetstream::new(raw.clone())
        .get_key_value("TASKS_DONE")
        .await
        .unwrap();
    let genuine = done.get(first.id().to_hex()).await.unwrap().unwrap();
    // ...but neither garbage nor the first task's genuine record copied under
    // another id makes a task look finished.
    for (n, forged) in [Bytes::from_static(b"forged"), genuine]
        .into_iter()
        .enumerate()
    {
        let payload = format!("next-{n}");
        let task = d.seal("resize", payload.as_bytes()).unwrap();
        done.put(task.id().to_hex(), forged).await.unwrap();
        let mut handle = d.handle(task.id()).await.unwrap();
        d.submit(&task).await.unwrap();
        assert_eq!(handle.wait(WAIT).await.unwrap(), completed(&payload));
        // The worker's record replaced the forged one.
        assert_eq!(
            d.outcome(&task.id()).await.unwrap(),
            Some(completed(&payload))
        );
    }
    let counted = eventually(WAIT, || async {
        (worker.stats().completed() == 3).then_some(())
    })
    .await;
    assert!(counted.is_some(), "{:?}", worker.stats());
    assert_eq!(worker.stats().unverified_done(), 2);
    assert_eq!(worker.stats().duplicates(), 0);
    assert!(!events.drain().iter().any(|e| is_violation(e)));
    worker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_created_to_lose_tasks_are_refused_by_the_dispatcher() {
    let p = platform().await;
    let url = p.server.url();
    for (tenant, crippled) in [("first", "stream"), ("second", "bucket")] {
        p.cp.create_tenant(tenant, Tier::Pro).await.unwrap();
        let mallory =
            p.cp.issue_agent(tenant, "mallory", "default")
                .await
                .unwrap();
        let planner =
            p.cp.issue_agent(tenant, "planner", "default")
                .await
                .unwrap();
        let (raw, mut events) = raw_connect(&url, &mallory).await;
        let js = jetstream::new(raw.clone());
        // Creating is allowed; the first creator fixes the configuration.
        if crippled == "stream" {
            js.create_stream(stream::Config {
                name: "TASKS".into(),
                subjects: vec![
                    format!("tenant.{tenant}.tasks.queue.>"),
                    format!("tenant.{tenant}.tasks.dead.>"),
                ],
                retention: stream::RetentionPolicy::WorkQueue,
                max_messages: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        } else {
            js.create_key_value(kv::Config {
                bucket: "TASKS_DONE".into(),
                max_age: Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        assert!(!events.drain().iter().any(|e| is_violation(e)));
        let ns = TenantNamespace::connect(&planner).await.unwrap();
        let err = Dispatcher::new(&ns, options()).await.unwrap_err();
        assert_eq!(err.kind(), DispatchErrorKind::StreamConflict, "{err}");
        eprintln!("{tenant}: refused: {err}");
    }
}
