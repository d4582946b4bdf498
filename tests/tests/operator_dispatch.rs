//! Task dispatch in operator mode: every tenant in its own NATS account, agents
//! connected with the control plane's real per-agent credentials, so the agent
//! allow-list (`control::accounts`) is what the workers run under.
//!
//! - `two_tenants_dispatch_and_work_under_their_own_accounts`: tenants `a` and
//!   `b` each dispatch from one agent and work from another, on the default names
//!   (`TASKS`, `TASKS_DONE` in each account): a task that fails once and then
//!   succeeds, a task dead-lettered with its reason, a sealed task submitted twice
//!   that runs once, and a copy re-injected under another `Nats-Msg-Id` that the
//!   worker recognises from the done bucket and does not run again. No agent
//!   connection sees a single permission violation.
//! - `tenant_b_cannot_read_tenant_a_tasks_or_done_records`: a raw async-nats
//!   client holding tenant `b`'s credentials tries to reach `a`'s task stream,
//!   results and done records; every attempt is refused by the server and observed
//!   as a permission violation, nothing of `a` arrives, and `b`'s own `TASKS` /
//!   `TASKS_DONE` (same names, other account) hold none of `a`'s task ids.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_runtime::dispatch::{
    DispatchOptions, Dispatcher, Task, TaskOutcome, WorkerOptions, DEFAULT_DONE_BUCKET,
    DEFAULT_STREAM,
};
use agent_runtime::tiers::Tier;
use agentbus_control::AdminClient;
use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt as _;
use nats_harness::{eventually, platform, raw_options, Events};
use tenant_bus::{CredentialBundle, TenantNamespace};

const WAIT: Duration = Duration::from_secs(20);
const SEE: Duration = Duration::from_secs(2);

/// Fast retries for tests, default (per-account) names.
fn options() -> DispatchOptions {
    DispatchOptions::new()
        .max_deliveries(3)
        .backoff(vec![Duration::from_millis(100)])
        .ack_wait(Duration::from_secs(2))
        .result_poll(Duration::from_millis(200))
}

type Runs = Arc<Mutex<HashMap<String, u32>>>;

fn runs_of(runs: &Runs, payload: &str) -> u32 {
    runs.lock().unwrap().get(payload).copied().unwrap_or(0)
}

/// One tenant's dispatcher agent, worker agent and worker.
struct Tenant {
    id: String,
    dispatcher_ns: TenantNamespace,
    worker_ns: TenantNamespace,
    d: Dispatcher,
    worker: agent_runtime::dispatch::Worker,
    runs: Runs,
}

/// A tenant whose stream is created with `one_copy_per_id` when asked
/// (then tasks travel on `tasks.queue.<type>.<id>`, which the account's
/// allow-list must let the worker consume).
async fn tenant(cp: &AdminClient, id: &str, one_copy_per_id: bool) -> Tenant {
    cp.create_tenant(id, Tier::Free).await.unwrap();
    let planner = cp.issue_agent(id, "planner", "default").await.unwrap();
    let runner = cp.issue_agent(id, "runner", "default").await.unwrap();
    assert!(planner.creds.is_some() && runner.creds.is_some());
    let dispatcher_ns = TenantNamespace::connect(&planner).await.unwrap();
    let worker_ns = TenantNamespace::connect(&runner).await.unwrap();
    let d = Dispatcher::new(&dispatcher_ns, options().one_copy_per_id(one_copy_per_id))
        .await
        .unwrap();
    assert_eq!(d.stream_name(), DEFAULT_STREAM);
    assert_eq!(d.done_bucket(), DEFAULT_DONE_BUCKET);
    assert_eq!(d.one_copy_per_id(), one_copy_per_id);
    // The worker's dispatcher follows the stream it finds.
    let wd = Dispatcher::new(&worker_ns, options()).await.unwrap();
    assert_eq!(wd.one_copy_per_id(), one_copy_per_id);
    let runs: Runs = Arc::default();
    let (r, tag) = (runs.clone(), id.to_string());
    let worker = wd
        .worker(
            "resize",
            move |task: Task| {
                let (r, tag) = (r.clone(), tag.clone());
                async move {
                    let p = String::from_utf8_lossy(&task.payload).to_string();
                    *r.lock().unwrap().entry(p.clone()).or_default() += 1;
                    if p.starts_with("broken") {
                        return Err(format!("{p} cannot be resized"));
                    }
                    if p.starts_with("flaky") && task.delivery == 1 {
                        return Err("transient storage error".to_string());
                    }
                    Ok(Bytes::from(format!("{tag}:{p}")))
                }
            },
            WorkerOptions::new().concurrency(2),
        )
        .await
        .unwrap();
    Tenant {
        id: id.to_string(),
        dispatcher_ns,
        worker_ns,
        d,
        worker,
        runs,
    }
}

async fn scenarios(t: &Tenant) {
    let id = &t.id;
    // Retry, then success.
    let mut flaky = t.d.dispatch("resize", "flaky-1").await.unwrap();
    assert_eq!(
        flaky.wait(WAIT).await.unwrap(),
        TaskOutcome::Completed(Bytes::from(format!("{id}:flaky-1")))
    );
    assert_eq!(
        runs_of(&t.runs, "flaky-1"),
        2,
        "{id}: failed once, then ran"
    );
    // The outcome is recorded in the tenant's own TASKS_DONE.
    assert!(matches!(
        t.d.outcome(&flaky.id()).await.unwrap(),
        Some(TaskOutcome::Completed(_))
    ));

    // Dead letter with the reason.
    let mut broken = t.d.dispatch("resize", "broken-1").await.unwrap();
    assert_eq!(
        broken.wait(WAIT).await.unwrap(),
        TaskOutcome::DeadLettered {
            reason: "broken-1 cannot be resized".into(),
            deliveries: 3
        }
    );
    assert_eq!(runs_of(&t.runs, "broken-1"), 3);
    let mut letters = t.d.dead_letters().await.unwrap();
    let letter = letters.next(WAIT).await.unwrap().expect("a dead letter");
    assert_eq!(letter.task_id, broken.id().to_hex());
    assert_eq!(letter.reason, "broken-1 cannot be resized");
    assert_eq!(letter.sender.as_deref(), Some("planner"));

    // A sealed task submitted twice runs once.
    let task = t.d.seal("resize", b"twice-1").unwrap();
    let mut handle = t.d.handle(task.id()).await.unwrap();
    let first = t.d.submit(&task).await.unwrap();
    let second = t.d.submit(&task).await.unwrap();
    assert!(
        !first.duplicate && second.duplicate,
        "{id}: {first:?} {second:?}"
    );
    assert_eq!(first.sequence, second.sequence);
    assert_eq!(
        handle.wait(WAIT).await.unwrap(),
        TaskOutcome::Completed(Bytes::from(format!("{id}:twice-1")))
    );
    // The same sealed bytes again under another Nats-Msg-Id (outside JetStream's
    // de-duplication): the worker finds the id in TASKS_DONE and does not run it.
    let js = jetstream::new(t.dispatcher_ns.nats().clone());
    let before = t.worker.stats().duplicates();
    let publish = || async {
        js.send_publish(
            task.subject().to_string(),
            jetstream::message::PublishMessage::build()
                .payload(task.body().clone())
                .message_id(format!("again-{}", task.id().to_hex())),
        )
        .await?
        .await
    };
    // With one copy per id the server refuses the copy until the first one
    // is acked (a moment after its outcome is recorded).
    let stored = eventually(WAIT, || async { publish().await.ok() }).await;
    assert!(stored.is_some(), "{id}: the copy was never stored");
    let seen = eventually(WAIT, || async {
        (t.worker.stats().duplicates() > before).then_some(())
    })
    .await;
    assert!(seen.is_some(), "{id}: the re-injected copy was recognised");
    assert_eq!(runs_of(&t.runs, "twice-1"), 1, "{id}: ran once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_dispatch_and_work_under_their_own_accounts() {
    let p = platform().await;
    let a = tenant(&p.cp, "a", false).await;
    // b's stream admits one copy per id: its workers consume
    // `tasks.queue.resize.*` under the same allow-list.
    let b = tenant(&p.cp, "b", true).await;

    // Both tenants at once, on the same stream and bucket names.
    tokio::join!(scenarios(&a), scenarios(&b));

    for t in [&a, &b] {
        let done = eventually(WAIT, || async {
            (t.worker.stats().completed() == 2 && t.worker.stats().dead_lettered() == 1)
                .then_some(())
        })
        .await;
        assert!(done.is_some(), "{}: {:?}", t.id, t.worker.stats());
        let s = t.worker.stats();
        assert_eq!(s.runs(), 2 + 3 + 1, "{}: {s:?}", t.id);
        assert_eq!(s.retried(), 1 + 2, "{}: {s:?}", t.id);
        assert_eq!(s.rejected(), 0);
        // Each tenant's worker ran only its own tenant's payloads.
        let mut seen: Vec<String> = t.runs.lock().unwrap().keys().cloned().collect();
        seen.sort();
        assert_eq!(seen, ["broken-1", "flaky-1", "twice-1"]);
        // The allow-list covers everything dispatch and the workers do.
        for ns in [&t.dispatcher_ns, &t.worker_ns] {
            assert_eq!(
                ns.counters().permission_violation(),
                0,
                "{}/{}: permission violations",
                t.id,
                ns.agent()
            );
        }
    }
    let (a_worker, b_worker) = (a.worker, b.worker);
    a_worker.shutdown(Duration::from_secs(5)).await;
    b_worker.shutdown(Duration::from_secs(5)).await;
}

// ----- a raw client of b against a's tasks ------------------------------------------

async fn raw_connect(url: &str, bundle: &CredentialBundle) -> (async_nats::Client, Events) {
    let (options, events) = raw_options(bundle, SEE);
    (options.connect(url).await.unwrap(), events)
}

/// A permission violation naming `subject` for `kind` ("publish"/"subscription").
fn violation(kind: &'static str, subject: &str) -> impl Fn(&str) -> bool {
    let quoted = format!("\\\"{subject}\\\"");
    move |e: &str| {
        let l = e.to_lowercase();
        l.contains("permissions violation") && l.contains(kind) && e.contains(&quoted)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_b_cannot_read_tenant_a_tasks_or_done_records() {
    let p = platform().await;
    let url = p.server.url();
    let a = tenant(&p.cp, "a", false).await;
    let b = tenant(&p.cp, "b", false).await;
    let spy = p.cp.issue_agent("b", "spy", "default").await.unwrap();
    let (raw, mut events) = raw_connect(&url, &spy).await;

    // Subscriptions to a's task, result and done-record subjects: refused.
    let mut held = Vec::new();
    for pattern in [
        "tenant.a.tasks.>",
        "tenant.a.tasks.results.>",
        "$KV.TASKS_DONE.>",
        "$JS.ACK.TASKS.>",
    ] {
        held.push((pattern, raw.subscribe(pattern.to_string()).await.unwrap()));
        raw.flush().await.unwrap();
        let seen = events
            .wait_for(SEE, violation("subscription", pattern))
            .await;
        assert!(
            seen.is_some(),
            "no subscription violation for {pattern}: {:?}",
            events.seen()
        );
    }

    // a works while b's spy listens: a completed task and one left queued.
    let mut done = a.d.dispatch("resize", "a-secret-image").await.unwrap();
    assert_eq!(
        done.wait(WAIT).await.unwrap(),
        TaskOutcome::Completed(Bytes::from_static(b"a:a-secret-image"))
    );
    let queued = a.d.dispatch("archive", "a-queued-job").await.unwrap();

    // Reads of JetStream data outside the allow-list: refused at publish.
    let a_done_key = done.id().to_hex();
    for (i, subject) in [
        "$JS.API.STREAM.MSG.GET.TASKS".to_string(),
        "$JS.API.DIRECT.GET.TASKS".to_string(),
        "$JS.API.STREAM.NAMES".to_string(),
        "$JS.API.STREAM.LIST".to_string(),
        "$JS.a.API.STREAM.INFO.TASKS".to_string(),
        "$JS.a.API.DIRECT.GET.KV_TASKS_DONE".to_string(),
        "$JS.API.STREAM.PURGE.KV_TASKS_DONE".to_string(),
        "$JS.API.STREAM.SNAPSHOT.KV_TASKS_DONE".to_string(),
    ]
    .iter()
    .enumerate()
    {
        raw.publish_with_reply(
            subject.clone(),
            format!("tenant.b._INBOX.spy{i}"),
            Bytes::new(),
        )
        .await
        .unwrap();
        raw.flush().await.unwrap();
        let seen = events.wait_for(SEE, violation("publish", subject)).await;
        assert!(
            seen.is_some(),
            "no publish violation for {subject}: {:?}",
            events.seen()
        );
    }

    // Nothing of a's reached the spy's subscriptions (they were never registered).
    for (pattern, sub) in &mut held {
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
            panic!("{pattern}: b received {} of a", m.subject);
        }
    }

    // Within its allow-list, b's names are b's own: same stream and bucket names,
    // another account. a's task ids are not in them.
    let js = jetstream::new(raw.clone());
    let b_done = js.get_key_value("TASKS_DONE").await.unwrap();
    assert_eq!(b_done.get(&a_done_key).await.unwrap(), None);
    assert_eq!(b_done.get(queued.id().to_hex()).await.unwrap(), None);
    let mut b_tasks = js.get_stream("TASKS").await.unwrap();
    let info = b_tasks.info().await.unwrap();
    assert_eq!(
        info.config.subjects,
        ["tenant.b.tasks.queue.>", "tenant.b.tasks.dead.>"]
    );
    assert_eq!(
        info.state.messages, 0,
        "a's queued task is not in b's stream"
    );
    // Positive control: b's own done records are readable by b's agents.
    let mut own = b.d.dispatch("resize", "b-image").await.unwrap();
    own.wait(WAIT).await.unwrap();
    assert!(b_done.get(own.id().to_hex()).await.unwrap().is_some());
    // a's records are intact, and a's queued task still waits in a's stream.
    assert!(matches!(
        a.d.outcome(&done.id()).await.unwrap(),
        Some(TaskOutcome::Completed(_))
    ));
    let a_js = jetstream::new(a.dispatcher_ns.nats().clone());
    let mut a_tasks = a_js.get_stream("TASKS").await.unwrap();
    assert_eq!(a_tasks.info().await.unwrap().state.messages, 1);
    eprintln!(
        "b's spy: {} violations observed",
        events
            .seen()
            .iter()
            .filter(|e| e.to_lowercase().contains("permissions violation"))
            .count()
    );
    let (a_worker, b_worker) = (a.worker, b.worker);
    a_worker.shutdown(Duration::from_secs(5)).await;
    b_worker.shutdown(Duration::from_secs(5)).await;
}
