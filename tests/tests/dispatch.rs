//! Task dispatch on a real JetStream nats-server: retries, dead letters, duplicate
//! dispatch, and tasks surviving a worker restart and a server restart.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_runtime::dispatch::{
    DispatchErrorKind, DispatchOptions, Dispatcher, Task, TaskOutcome, WorkerOptions,
};
use bytes::Bytes;
use nats_harness::{eventually, Server};
use tenant_bus::{AgentId, CredentialBundle, MasterSecret, TenantId, TenantNamespace};

const WAIT: Duration = Duration::from_secs(20);

async fn connect(
    server: &Server,
    master: &MasterSecret,
    tenant: &str,
    agent: &str,
) -> TenantNamespace {
    let t = TenantId::new(tenant).unwrap();
    let bundle = CredentialBundle {
        url: server.url(),
        tenant: t.clone(),
        agent: AgentId::new(agent).unwrap(),
        creds: None,
        keys: master.key_set(&t, [1], 1).unwrap(),
        placement: Default::default(),
    };
    TenantNamespace::connect(&bundle).await.unwrap()
}

/// Fast retries for tests; one account shared by tenants, so per-tenant names.
fn options() -> DispatchOptions {
    DispatchOptions::new()
        .per_tenant_names(true)
        .backoff(vec![Duration::from_millis(100)])
        .ack_wait(Duration::from_secs(2))
        .result_poll(Duration::from_millis(200))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_task_is_retried_then_succeeds() {
    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let ns = connect(&server, &master, "acme", "planner").await;
    let d = Dispatcher::new(&ns, options().max_deliveries(5))
        .await
        .unwrap();
    let attempts = Arc::new(AtomicU64::new(0));
    let a = attempts.clone();
    let worker = d
        .worker(
            "resize",
            move |task: Task| {
                let a = a.clone();
                async move {
                    let n = a.fetch_add(1, Ordering::SeqCst) + 1;
                    if task.delivery < 3 {
                        Err(format!("transient failure {n}"))
                    } else {
                        Ok(Bytes::from(format!(
                            "resized {}",
                            String::from_utf8_lossy(&task.payload)
                        )))
                    }
                }
            },
            WorkerOptions::new().concurrency(2),
        )
        .await
        .unwrap();
    let mut handle = d.dispatch("resize", b"img-1").await.unwrap();
    let outcome = handle.wait(WAIT).await.unwrap();
    assert_eq!(
        outcome,
        TaskOutcome::Completed(Bytes::from_static(b"resized img-1"))
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!(worker.stats().retried(), 2);
    // The outcome is published before the ack (and the counter) by design.
    let acked = eventually(WAIT, || async {
        (worker.stats().completed() == 1).then_some(())
    })
    .await;
    assert!(acked.is_some());
    assert_eq!(worker.stats().dead_lettered(), 0);
    // The outcome is also recorded durably under the task id.
    assert_eq!(d.outcome(&handle.id()).await.unwrap(), Some(outcome));
    worker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_is_dead_lettered_after_max_deliveries_with_the_reason() {
    dead_lettered_after_max_deliveries(false).await;
}

/// The same on a stream that admits one copy per id: the letter is on its
/// task's own subject (`tasks.dead.<type>.<id hex>`) and reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_copy_per_id_a_task_is_dead_lettered_on_its_own_subject() {
    dead_lettered_after_max_deliveries(true).await;
}

async fn dead_lettered_after_max_deliveries(one_copy_per_id: bool) {
    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let ns = connect(&server, &master, "acme", "planner").await;
    let d = Dispatcher::new(
        &ns,
        options().max_deliveries(3).one_copy_per_id(one_copy_per_id),
    )
    .await
    .unwrap();
    assert_eq!(d.one_copy_per_id(), one_copy_per_id);
    let runs = Arc::new(AtomicU64::new(0));
    let r = runs.clone();
    let worker = d
        .worker(
            "charge",
            move |task: Task| {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    Err::<Bytes, _>(format!("card declined (delivery {})", task.delivery))
                }
            },
            WorkerOptions::new(),
        )
        .await
        .unwrap();
    let mut handle = d.dispatch("charge", b"order-7").await.unwrap();
    let outcome = handle.wait(WAIT).await.unwrap();
    assert_eq!(
        outcome,
        TaskOutcome::DeadLettered {
            reason: "card declined (delivery 3)".into(),
            deliveries: 3
        }
    );
    assert_eq!(runs.load(Ordering::SeqCst), 3);

    let js = async_nats::jetstream::new(server.raw_client().await);
    let mut stream = js.get_stream(d.stream_name()).await.unwrap();
    let dead = format!("tenant.acme.tasks.dead.charge.{}", handle.id().to_hex());
    let on_own_subject = stream.info().await.unwrap().state.subjects_count == 1
        && js
            .get_stream(d.stream_name())
            .await
            .unwrap()
            .get_last_raw_message_by_subject(&dead)
            .await
            .is_ok();
    assert_eq!(on_own_subject, one_copy_per_id);
    let mut letters = d.dead_letters().await.unwrap();
    let letter = letters.next(WAIT).await.unwrap().expect("a dead letter");
    assert_eq!(letter.task_id, handle.id().to_hex());
    assert_eq!(letter.task_type, "charge");
    assert_eq!(letter.reason, "card declined (delivery 3)");
    assert_eq!(letter.deliveries, 3);
    assert_eq!(letter.sender.as_deref(), Some("planner"));
    assert_eq!(letter.payload(), Some(Bytes::from_static(b"order-7")));
    // Terminated: not delivered again, and the letter is read once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    assert_eq!(worker.stats().dead_lettered(), 1);
    assert!(letters
        .next(Duration::from_millis(300))
        .await
        .unwrap()
        .is_none());
    worker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_dispatch_runs_once() {
    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let ns = connect(&server, &master, "acme", "planner").await;
    let d = Dispatcher::new(&ns, options()).await.unwrap();
    let runs = Arc::new(AtomicU64::new(0));
    let r = runs.clone();
    let worker = d
        .worker(
            "email",
            move |_task: Task| {
                let r = r.clone();
                async move {
                    Ok::<_, String>(Bytes::from(format!(
                        "sent #{}",
                        r.fetch_add(1, Ordering::SeqCst) + 1
                    )))
                }
            },
            WorkerOptions::new(),
        )
        .await
        .unwrap();

    // A client retrying after a lost publish ack submits the same sealed task again:
    // JetStream's de-duplication (Nats-Msg-Id = message id) drops the copy.
    let task = d.seal("email", b"welcome").unwrap();
    let mut handle = d.handle(task.id()).await.unwrap();
    let first = d.submit(&task).await.unwrap();
    let second = d.submit(&task).await.unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(first.sequence, second.sequence);
    let outcome = handle.wait(WAIT).await.unwrap();
    assert_eq!(
        outcome,
        TaskOutcome::Completed(Bytes::from_static(b"sent #1"))
    );

    // A copy that gets past JetStream's window (here: another Nats-Msg-Id) is
    // recognised by its sealed message id in the done bucket and not run again.
    let js = async_nats::jetstream::new(server.raw_client().await);
    js.send_publish(
        task.subject().to_string(),
        async_nats::jetstream::message::PublishMessage::build()
            .payload(task.body().clone())
            .message_id("some-other-id"),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let skipped = eventually(WAIT, || async {
        (worker.stats().duplicates() == 1).then_some(())
    })
    .await;
    assert!(skipped.is_some(), "the copy was not recognised as done");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(worker.stats().completed(), 1);
    worker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_task_survives_a_worker_restart() {
    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let ns = connect(&server, &master, "acme", "planner").await;
    let d = Dispatcher::new(&ns, options()).await.unwrap();

    // Worker 1 takes the task and hangs; then it dies without acking.
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel::<u64>(4);
    let crashing = d
        .worker(
            "report",
            move |task: Task| {
                let tx = started_tx.clone();
                async move {
                    let _ = tx.send(task.delivery).await;
                    std::future::pending::<Result<Bytes, String>>().await
                }
            },
            WorkerOptions::new(),
        )
        .await
        .unwrap();
    let mut handle = d.dispatch("report", b"q3").await.unwrap();
    let delivery = tokio::time::timeout(WAIT, started_rx.recv()).await.unwrap();
    assert_eq!(delivery, Some(1));
    crashing.abort();

    // A new worker (another connection, as after a process restart) gets it.
    let ns2 = connect(&server, &master, "acme", "worker-2").await;
    let d2 = Dispatcher::new(&ns2, options()).await.unwrap();
    let deliveries = Arc::new(AtomicU64::new(0));
    let seen = deliveries.clone();
    let worker = d2
        .worker(
            "report",
            move |task: Task| {
                seen.store(task.delivery, Ordering::SeqCst);
                async move { Ok::<_, String>(Bytes::from_static(b"report ready")) }
            },
            WorkerOptions::new(),
        )
        .await
        .unwrap();
    let outcome = handle.wait(WAIT).await.unwrap();
    assert_eq!(
        outcome,
        TaskOutcome::Completed(Bytes::from_static(b"report ready"))
    );
    // Redelivered after ack_wait (a pull request the dead worker left open may
    // swallow one more delivery before it expires).
    assert!(deliveries.load(Ordering::SeqCst) >= 2);
    let acked = eventually(WAIT, || async {
        (worker.stats().completed() == 1).then_some(())
    })
    .await;
    assert!(acked.is_some());
    worker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_survive_a_nats_server_restart() {
    let mut server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let ns = connect(&server, &master, "acme", "planner").await;
    let d = Dispatcher::new(&ns, options()).await.unwrap();

    // 1. A queued task (no worker yet) is on disk when the server restarts.
    let mut queued = d.dispatch("index", b"queued").await.unwrap();
    server.restart();

    // 2. A task in flight when the server restarts: the handler finishes while
    // the server is down; recording the outcome waits for the reconnect.
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let runs = Arc::new(AtomicU64::new(0));
    let r = runs.clone();
    let worker = d
        .worker(
            "index",
            move |task: Task| {
                let tx = started_tx.clone();
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    let _ = tx.send(task.payload.clone()).await;
                    if task.payload.as_ref() == b"in-flight" {
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                    }
                    Ok::<_, String>(Bytes::from(format!(
                        "indexed {}",
                        String::from_utf8_lossy(&task.payload)
                    )))
                }
            },
            WorkerOptions::new(),
        )
        .await
        .unwrap();
    assert_eq!(
        queued.wait(WAIT).await.unwrap(),
        TaskOutcome::Completed(Bytes::from_static(b"indexed queued"))
    );
    assert_eq!(
        tokio::time::timeout(WAIT, started_rx.recv()).await.unwrap(),
        Some(Bytes::from_static(b"queued"))
    );

    let mut in_flight = d.dispatch("index", b"in-flight").await.unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, started_rx.recv()).await.unwrap(),
        Some(Bytes::from_static(b"in-flight"))
    );
    server.restart();
    assert_eq!(
        in_flight.wait(WAIT).await.unwrap(),
        TaskOutcome::Completed(Bytes::from_static(b"indexed in-flight"))
    );
    // Settled: nothing is delivered again, and each task ran once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    worker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_task_type_is_refused() {
    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let ns = connect(&server, &master, "acme", "planner").await;
    let d = Dispatcher::new(&ns, options()).await.unwrap();
    for bad in ["", "a.b", "*", ">", "Upper", "a b"] {
        assert_eq!(
            d.dispatch(bad, b"x").await.unwrap_err().kind(),
            DispatchErrorKind::InvalidTaskType,
            "{bad:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_outside_one_to_five_are_refused_and_nothing_is_created() {
    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let ns = connect(&server, &master, "acme", "planner").await;
    for bad in [0, 6, 100] {
        let e = Dispatcher::new(&ns, options().replicas(bad))
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(e.kind(), DispatchErrorKind::InvalidOptions, "{bad}: {e}");
        assert!(
            e.to_string()
                .contains(&format!("replicas {bad}: JetStream keeps 1 to 5 copies")),
            "{e}"
        );
    }
    let js = async_nats::jetstream::new(ns.nats().clone());
    let streams: Vec<String> = futures::StreamExt::collect::<Vec<_>>(js.stream_names())
        .await
        .into_iter()
        .map(|n| n.unwrap())
        .collect();
    assert!(
        streams.is_empty(),
        "created despite the refusal: {streams:?}"
    );
    // In range (this server is a single node: R1) still works.
    Dispatcher::new(&ns, options().replicas(1)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_queues_are_separate_and_a_shared_stream_name_is_refused() {
    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let a = connect(&server, &master, "tenant-a", "agent").await;
    let b = connect(&server, &master, "tenant-b", "agent").await;
    // On one shared account, the default (per-account) name collides: refused.
    let _da = Dispatcher::new(&a, DispatchOptions::new()).await.unwrap();
    assert_eq!(
        Dispatcher::new(&b, DispatchOptions::new())
            .await
            .unwrap_err()
            .kind(),
        DispatchErrorKind::StreamConflict
    );
    let js = async_nats::jetstream::new(server.raw_client().await);
    js.delete_stream("TASKS").await.unwrap();
    let da = Dispatcher::new(&a, options()).await.unwrap();
    let db = Dispatcher::new(&b, options()).await.unwrap();
    assert_ne!(da.stream_name(), db.stream_name());
    let wb = db
        .worker(
            "job",
            |_t: Task| async { Ok::<_, String>(Bytes::from_static(b"b did it")) },
            WorkerOptions::new(),
        )
        .await
        .unwrap();
    // A's task is not visible to B's worker: it stays queued.
    let mut ha = da.dispatch("job", b"a's").await.unwrap();
    assert_eq!(
        ha.wait(Duration::from_secs(1)).await.unwrap_err().kind(),
        DispatchErrorKind::TimedOut
    );
    assert_eq!(wb.stats().runs(), 0);
    let wa = da
        .worker(
            "job",
            |_t: Task| async { Ok::<_, String>(Bytes::from_static(b"a did it")) },
            WorkerOptions::new(),
        )
        .await
        .unwrap();
    assert_eq!(
        ha.wait(WAIT).await.unwrap(),
        TaskOutcome::Completed(Bytes::from_static(b"a did it"))
    );
    wa.shutdown(Duration::from_secs(5)).await;
    wb.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_tenants_workers_hold_its_tasks_until_activation() {
    use agent_runtime::registry::{Registry, RegistryWatcher, TenantGate, TenantSettings};
    use agent_runtime::tiers::Tier;
    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let registry = Registry::open(server.raw_client().await).await.unwrap();
    registry
        .create("acme", "Acme", Tier::Free, TenantSettings::new())
        .await
        .unwrap();
    let watcher = Arc::new(RegistryWatcher::start(&registry).await.unwrap());
    let acme = TenantId::new("acme").unwrap();
    let gate = TenantGate::new(watcher.clone(), acme.clone());
    let ns = connect(&server, &master, "acme", "planner").await;
    let d = Dispatcher::new(&ns, options().gate(gate)).await.unwrap();
    let mut queued = d.dispatch("job", b"queued").await.unwrap();

    registry.suspend(&acme).await.unwrap();
    let seen = eventually(Duration::from_secs(1), || async {
        (!TenantGate::new(watcher.clone(), acme.clone()).is_active()).then_some(())
    })
    .await;
    assert!(seen.is_some());
    assert_eq!(
        d.dispatch("job", b"refused").await.unwrap_err().kind(),
        DispatchErrorKind::Suspended
    );
    let worker = d
        .worker(
            "job",
            |_t: Task| async { Ok::<_, String>(Bytes::from_static(b"done")) },
            WorkerOptions::new(),
        )
        .await
        .unwrap();
    assert_eq!(
        queued
            .wait(Duration::from_millis(1500))
            .await
            .unwrap_err()
            .kind(),
        DispatchErrorKind::TimedOut
    );
    assert_eq!(worker.stats().runs(), 0, "nothing runs while suspended");

    registry.activate(&acme).await.unwrap();
    assert_eq!(
        queued.wait(WAIT).await.unwrap(),
        TaskOutcome::Completed(Bytes::from_static(b"done"))
    );
    assert_eq!(worker.stats().runs(), 1);
    worker.shutdown(Duration::from_secs(5)).await;
}

/// An outage of the done bucket is not the task's failure: with the bucket gone
/// for longer than the worker's whole delivery budget, the queued task is held
/// (progress acks), never dead-lettered unrun, and runs exactly once when the
/// bucket is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_done_bucket_outage_neither_counts_as_a_delivery_nor_dead_letters() {
    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let ns = connect(&server, &master, "acme", "planner").await;
    let d = Dispatcher::new(&ns, options().max_deliveries(2))
        .await
        .unwrap();
    let bucket = d.done_bucket().to_string();
    let js = async_nats::jetstream::new(server.raw_client().await);
    let config = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    // The outage: the done bucket's stream is gone.
    js.delete_stream(format!("KV_{bucket}")).await.unwrap();
    let runs = Arc::new(AtomicU64::new(0));
    let r = runs.clone();
    let worker = d
        .worker(
            "resize",
            move |_task: Task| {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    Ok(Bytes::from_static(b"done"))
                }
            },
            WorkerOptions::new(),
        )
        .await
        .unwrap();
    let mut handle = d.dispatch("resize", b"img").await.unwrap();
    // Longer than max_deliveries x ack_wait (2 x 2 s) and than any retry budget
    // inside one delivery (the worker used to give a lookup about 26 s).
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "ran without its done lookup"
    );
    assert_eq!(
        worker.stats().dead_lettered(),
        0,
        "dead-lettered by an outage"
    );
    assert!(worker.stats().outage_waits() > 0);
    // The bucket is back: the task runs once and completes.
    js.create_stream(config).await.unwrap();
    let outcome = handle.wait(WAIT).await.unwrap();
    assert_eq!(outcome, TaskOutcome::Completed(Bytes::from_static(b"done")));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(worker.stats().dead_lettered(), 0);
    worker.shutdown(Duration::from_secs(5)).await;
}

/// Runs tasks of `task_type` counting the runs; the output is `ran <payload>`.
async fn counting_worker(
    d: &Dispatcher,
    task_type: &str,
    runs: &Arc<AtomicU64>,
    concurrency: usize,
) -> agent_runtime::dispatch::Worker {
    let r = runs.clone();
    d.worker(
        task_type,
        move |task: Task| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>(Bytes::from(format!(
                    "ran {}",
                    String::from_utf8_lossy(&task.payload)
                )))
            }
        },
        WorkerOptions::new().concurrency(concurrency),
    )
    .await
    .unwrap()
}

/// Messages left in the dispatcher's stream.
async fn queued(server: &Server, d: &Dispatcher) -> u64 {
    let js = async_nats::jetstream::new(server.raw_client().await);
    let mut stream = js.get_stream(d.stream_name()).await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// A finished task submitted again with its own `Nats-Msg-Id` after the
/// stream's duplicate window (JetStream stores it a second time) is found in the
/// done bucket and not run again; the copy is acked and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_task_resubmitted_after_the_duplicate_window_runs_once() {
    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let ns = connect(&server, &master, "acme", "planner").await;
    let d = Dispatcher::new(&ns, options().duplicate_window(Duration::from_millis(300)))
        .await
        .unwrap();
    let runs = Arc::new(AtomicU64::new(0));
    let worker = counting_worker(&d, "email", &runs, 4).await;
    let task = d.seal("email", b"welcome").unwrap();
    let mut handle = d.handle(task.id()).await.unwrap();
    let first = d.submit(&task).await.unwrap();
    let outcome = handle.wait(WAIT).await.unwrap();
    assert_eq!(
        outcome,
        TaskOutcome::Completed(Bytes::from_static(b"ran welcome"))
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut again = d.handle(task.id()).await.unwrap();
    let second = d.submit(&task).await.unwrap();
    assert!(!second.duplicate, "the window is over: stored again");
    assert_ne!(first.sequence, second.sequence);
    let seen = eventually(WAIT, || async {
        (worker.stats().duplicates() == 1).then_some(())
    })
    .await;
    assert!(seen.is_some(), "{:?}", worker.stats());
    assert_eq!(
        again.wait(WAIT).await.unwrap(),
        outcome,
        "the first outcome"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(worker.stats().completed(), 1);
    let acked = eventually(WAIT, || async {
        (queued(&server, &d).await == 0).then_some(())
    })
    .await;
    assert!(acked.is_some(), "the copy was acked");
    worker.shutdown(Duration::from_secs(5)).await;
}

/// Many tasks at once (their lookups batched), then a copy of each under
/// another `Nats-Msg-Id`: every task runs once, every copy is recognised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_tasks_and_their_copies_each_run_once() {
    const N: usize = 200;
    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let ns = connect(&server, &master, "acme", "planner").await;
    let d = Dispatcher::new(&ns, options()).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..N {
        let task = d.seal("load", format!("t{i}").as_bytes()).unwrap();
        d.submit(&task).await.unwrap();
        tasks.push(task);
    }
    let runs = Arc::new(AtomicU64::new(0));
    let worker = counting_worker(&d, "load", &runs, 32).await;
    let all = eventually(WAIT, || async {
        (worker.stats().completed() == N as u64).then_some(())
    })
    .await;
    assert!(all.is_some(), "{:?}", worker.stats());
    // Counted: a batched get covers at least one task, so never more lookup
    // requests than tasks (how many fewer depends on timing); pulls at least
    // one, at most one per task plus the ones that expired empty (2 s each).
    let stats = worker.stats();
    assert!(
        (1..=N as u64).contains(&stats.lookup_requests()),
        "{stats:?}"
    );
    assert!(
        (1..=N as u64 + 15).contains(&stats.pull_requests()),
        "{stats:?}"
    );
    let js = async_nats::jetstream::new(server.raw_client().await);
    for task in &tasks {
        js.send_publish(
            task.subject().to_string(),
            async_nats::jetstream::message::PublishMessage::build()
                .payload(task.body().clone())
                .message_id(format!("copy-{}", task.id().to_hex())),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let copies = eventually(WAIT, || async {
        (worker.stats().duplicates() == N as u64).then_some(())
    })
    .await;
    assert!(copies.is_some(), "{:?}", worker.stats());
    assert_eq!(runs.load(Ordering::SeqCst), N as u64);
    assert_eq!(worker.stats().unverified_done(), 0);
    for (i, task) in tasks.iter().enumerate().step_by(37) {
        assert_eq!(
            d.outcome(&task.id()).await.unwrap(),
            Some(TaskOutcome::Completed(Bytes::from(format!("ran t{i}"))))
        );
    }
    worker.shutdown(Duration::from_secs(5)).await;
}

/// A record that is not the task's sealed outcome never makes it look done:
/// one there before the task arrives is ignored by the lookup, one written
/// while the task runs is found by the conditional write; both are replaced by
/// the real outcome and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_done_records_before_or_during_a_run_are_replaced() {
    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let ns = connect(&server, &master, "acme", "planner").await;
    let d = Dispatcher::new(&ns, options()).await.unwrap();
    let js = async_nats::jetstream::new(server.raw_client().await);
    let kv = js.get_key_value(d.done_bucket()).await.unwrap();
    let forger = kv.clone();
    let runs = Arc::new(AtomicU64::new(0));
    let r = runs.clone();
    let worker = d
        .worker(
            "resize",
            move |task: Task| {
                let r = r.clone();
                let forger = forger.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    if task.payload.as_ref() == b"during" {
                        forger
                            .put(task.id.to_hex(), Bytes::from_static(b"forged"))
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    Ok::<_, String>(Bytes::from(format!(
                        "ran {}",
                        String::from_utf8_lossy(&task.payload)
                    )))
                }
            },
            WorkerOptions::new(),
        )
        .await
        .unwrap();
    for payload in ["before", "during"] {
        let task = d.seal("resize", payload.as_bytes()).unwrap();
        if payload == "before" {
            kv.put(task.id().to_hex(), Bytes::from_static(b"forged"))
                .await
                .unwrap();
        }
        let mut handle = d.handle(task.id()).await.unwrap();
        d.submit(&task).await.unwrap();
        let want = TaskOutcome::Completed(Bytes::from(format!("ran {payload}")));
        assert_eq!(handle.wait(WAIT).await.unwrap(), want, "{payload}");
        assert_eq!(
            d.outcome(&task.id()).await.unwrap(),
            Some(want),
            "{payload}"
        );
    }
    let counted = eventually(WAIT, || async {
        (worker.stats().completed() == 2).then_some(())
    })
    .await;
    assert!(counted.is_some(), "{:?}", worker.stats());
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(worker.stats().unverified_done(), 2);
    assert_eq!(worker.stats().duplicates(), 0);
    worker.shutdown(Duration::from_secs(5)).await;
}

/// Two copies of one task id in two workers at the same time (both looked up
/// before either finished): both run, but only the first outcome is recorded;
/// the other copy is acked as a duplicate, and every requester sees the
/// recorded outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_with_copies_of_one_id_record_one_outcome() {
    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let ns = connect(&server, &master, "acme", "planner").await;
    let d = Dispatcher::new(&ns, options().ack_wait(Duration::from_secs(10)))
        .await
        .unwrap();
    let started = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for name in ["one", "two"] {
        let s = started.clone();
        workers.push(
            d.worker(
                "charge",
                move |_task: Task| {
                    let s = s.clone();
                    async move {
                        s.fetch_add(1, Ordering::SeqCst);
                        // Both copies in hand before either finishes.
                        eventually(Duration::from_secs(5), || async {
                            (s.load(Ordering::SeqCst) >= 2).then_some(())
                        })
                        .await;
                        Ok::<_, String>(Bytes::from(format!("charged by {name}")))
                    }
                },
                WorkerOptions::new().concurrency(1),
            )
            .await
            .unwrap(),
        );
    }
    let task = d.seal("charge", b"order-9").unwrap();
    let mut handle = d.handle(task.id()).await.unwrap();
    d.submit(&task).await.unwrap();
    let js = async_nats::jetstream::new(server.raw_client().await);
    js.send_publish(
        task.subject().to_string(),
        async_nats::jetstream::message::PublishMessage::build()
            .payload(task.body().clone())
            .message_id("the-copy"),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let outcome = handle.wait(WAIT).await.unwrap();
    let settled = eventually(WAIT, || async {
        let completed: u64 = workers.iter().map(|w| w.stats().completed()).sum();
        let duplicates: u64 = workers.iter().map(|w| w.stats().duplicates()).sum();
        (completed == 1 && duplicates == 1).then_some(())
    })
    .await;
    assert!(
        settled.is_some(),
        "{:?}",
        workers.iter().map(|w| w.stats()).collect::<Vec<_>>()
    );
    assert_eq!(started.load(Ordering::SeqCst), 2, "both copies ran");
    assert_eq!(d.outcome(&task.id()).await.unwrap(), Some(outcome.clone()));
    let mut late = d.handle(task.id()).await.unwrap();
    assert_eq!(late.wait(WAIT).await.unwrap(), outcome);
    assert_eq!(queued(&server, &d).await, 0, "both copies acked");
    for w in workers {
        w.shutdown(Duration::from_secs(5)).await;
    }
}

/// Waits until the workers' `count` of their stats adds up to `want`;
/// fails naming `what` and every worker's stats.
async fn wait_total(
    workers: &[agent_runtime::dispatch::Worker],
    what: &str,
    count: impl Fn(&agent_runtime::dispatch::WorkerStats) -> u64,
    want: u64,
) {
    let reached = eventually(WAIT, || async {
        let total: u64 = workers.iter().map(|w| count(w.stats())).sum();
        (total == want).then_some(())
    })
    .await;
    assert!(
        reached.is_some(),
        "{what} never reached {want}: {:?}",
        workers.iter().map(|w| w.stats()).collect::<Vec<_>>()
    );
}

/// On a stream that admits one copy per id, a copy of a task that is queued
/// or running is refused by the server: through the dispatcher (a
/// duplicate) and from a raw client, long after the duplicate window, so
/// with two workers the handler runs once. A copy moved to another id's
/// subject is refused by the worker. Once the outcome is recorded, a later
/// copy is stored, found done and not run. A dispatcher asking for the
/// default follows the stream it finds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_copy_per_id_refuses_copies_while_one_is_queued_or_running() {
    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let ns = connect(&server, &master, "acme", "planner").await;
    let d = Dispatcher::new(
        &ns,
        options()
            .one_copy_per_id(true)
            .duplicate_window(Duration::from_millis(200))
            .ack_wait(Duration::from_secs(10)),
    )
    .await
    .unwrap();
    assert!(d.one_copy_per_id());
    let follower = Dispatcher::new(&ns, options()).await.unwrap();
    assert!(follower.one_copy_per_id(), "the stream decides");
    let started = Arc::new(AtomicU64::new(0));
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let mut workers = Vec::new();
    for name in ["one", "two"] {
        let (s, r) = (started.clone(), release.clone());
        workers.push(
            d.worker(
                "charge",
                move |_task: Task| {
                    let (s, r) = (s.clone(), r.clone());
                    async move {
                        s.fetch_add(1, Ordering::SeqCst);
                        let _permit = r.acquire().await.map_err(|e| e.to_string())?;
                        Ok::<_, String>(Bytes::from(format!("charged by {name}")))
                    }
                },
                WorkerOptions::new().concurrency(1),
            )
            .await
            .unwrap(),
        );
    }
    let task = d.seal("charge", b"order-9").unwrap();
    assert!(task
        .subject()
        .ends_with(&format!(".charge.{}", task.id().to_hex())));
    let mut handle = d.handle(task.id()).await.unwrap();
    assert!(!d.submit(&task).await.unwrap().duplicate);
    let running = eventually(WAIT, || async {
        (started.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    assert!(running.is_some());
    tokio::time::sleep(Duration::from_millis(500)).await; // past the window
                                                          // Through the dispatcher: a duplicate, nothing stored.
    let again = follower.submit(&task).await.unwrap();
    assert!(again.duplicate && again.sequence == 0, "{again:?}");
    // From a raw client with a fresh message id: refused by the server.
    let js = async_nats::jetstream::new(server.raw_client().await);
    let raw = js
        .send_publish(
            task.subject().to_string(),
            async_nats::jetstream::message::PublishMessage::build()
                .payload(task.body().clone())
                .message_id("the-copy"),
        )
        .await
        .unwrap()
        .await;
    let refused = raw.expect_err("a second copy of a running task was stored");
    assert!(
        refused.to_string().contains("maximum messages per subject"),
        "{refused}"
    );
    // Moved to another id's subject: stored, but refused by the worker.
    let other = d.seal("charge", b"other").unwrap();
    js.send_publish(
        other.subject().to_string(),
        async_nats::jetstream::message::PublishMessage::build().payload(task.body().clone()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    wait_total(&workers, "rejected", |s| s.rejected(), 1).await;
    release.add_permits(16);
    let outcome = handle.wait(WAIT).await.unwrap();
    assert_eq!(started.load(Ordering::SeqCst), 1, "one copy ran");
    // Finished and acked: a later copy is stored, found done, not run.
    let acked = eventually(WAIT, || async {
        (queued(&server, &d).await == 0).then_some(())
    })
    .await;
    assert!(acked.is_some());
    assert!(!d.submit(&task).await.unwrap().duplicate);
    wait_total(&workers, "duplicates", |s| s.duplicates(), 1).await;
    assert_eq!(
        started.load(Ordering::SeqCst),
        1,
        "the finished task did not run again"
    );
    assert_eq!(d.outcome(&task.id()).await.unwrap(), Some(outcome));
    for w in workers {
        w.shutdown(Duration::from_secs(5)).await;
    }
}

/// A done bucket whose stream serves no direct gets (created by another client
/// that way): lookups fall back to one get per key and still find finished
/// tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_done_bucket_without_direct_gets_still_finds_finished_tasks() {
    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let ns = connect(&server, &master, "acme", "planner").await;
    let js = async_nats::jetstream::new(server.raw_client().await);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "KV_TASKS_DONE_acme".into(),
        subjects: vec!["$KV.TASKS_DONE_acme.>".into()],
        max_messages_per_subject: 1,
        max_age: Duration::from_secs(7 * 24 * 3600),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: false,
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    let d = Dispatcher::new(&ns, options()).await.unwrap();
    let runs = Arc::new(AtomicU64::new(0));
    let worker = counting_worker(&d, "email", &runs, 4).await;
    let task = d.seal("email", b"hello").unwrap();
    let mut handle = d.handle(task.id()).await.unwrap();
    d.submit(&task).await.unwrap();
    let outcome = handle.wait(WAIT).await.unwrap();
    js.send_publish(
        task.subject().to_string(),
        async_nats::jetstream::message::PublishMessage::build()
            .payload(task.body().clone())
            .message_id("the-copy"),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let seen = eventually(WAIT, || async {
        (worker.stats().duplicates() == 1).then_some(())
    })
    .await;
    assert!(seen.is_some(), "{:?}", worker.stats());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // Without direct gets, each delivery was one get of its own.
    assert_eq!(worker.stats().lookup_requests(), 2, "{:?}", worker.stats());
    assert_eq!(d.outcome(&task.id()).await.unwrap(), Some(outcome));
    worker.shutdown(Duration::from_secs(5)).await;
}

/// With prefetch, a worker holds more tasks than handlers: tasks pulled ahead
/// wait (ack timers kept alive with progress acks, here longer than ack_wait)
/// and never run more than `concurrency` at once; each runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetched_tasks_wait_for_a_handler_and_run_once() {
    const N: u64 = 12;
    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let ns = connect(&server, &master, "acme", "planner").await;
    let d = Dispatcher::new(&ns, options().ack_wait(Duration::from_secs(1)))
        .await
        .unwrap();
    let running = Arc::new(AtomicU64::new(0));
    let most = Arc::new(AtomicU64::new(0));
    let runs = Arc::new(AtomicU64::new(0));
    let (r, m, n) = (running.clone(), most.clone(), runs.clone());
    let worker = d
        .worker(
            "crunch",
            move |_task: Task| {
                let (r, m, n) = (r.clone(), m.clone(), n.clone());
                async move {
                    n.fetch_add(1, Ordering::SeqCst);
                    let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                    m.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(700)).await;
                    r.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, String>(Bytes::from_static(b"ok"))
                }
            },
            WorkerOptions::new().concurrency(2).prefetch(4),
        )
        .await
        .unwrap();
    for i in 0..N {
        d.submit(&d.seal("crunch", format!("job-{i}").as_bytes()).unwrap())
            .await
            .unwrap();
    }
    let all = eventually(Duration::from_secs(30), || async {
        (worker.stats().completed() == N).then_some(())
    })
    .await;
    assert!(all.is_some(), "{:?}", worker.stats());
    assert_eq!(most.load(Ordering::SeqCst), 2, "never more than 2 handlers");
    assert_eq!(runs.load(Ordering::SeqCst), N, "each ran once");
    assert_eq!(worker.stats().duplicates(), 0);
    worker.shutdown(Duration::from_secs(5)).await;
}

/// The done bucket republishes each recorded outcome to its result subject, so
/// the server hands it to the requester and the worker sends nothing more. A
/// bucket created before that (without the republish, and agents cannot change
/// it) still works: the worker publishes the outcome itself. Either way one
/// copy reaches the result subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_reaches_its_requester_once_from_the_bucket_or_from_the_worker() {
    use futures::StreamExt as _;

    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    // globex's bucket predates the republish: created as a plain bucket.
    let globex = connect(&server, &master, "globex", "planner").await;
    async_nats::jetstream::new(globex.nats().clone())
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: "TASKS_DONE_globex".into(),
            history: 1,
            max_age: Duration::from_secs(7 * 24 * 3600),
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
    let acme = connect(&server, &master, "acme", "planner").await;
    for (ns, by_bucket) in [(&acme, true), (&globex, false)] {
        let tenant = ns.tenant().to_string();
        let d = Dispatcher::new(ns, options()).await.unwrap();
        let info = async_nats::jetstream::new(ns.nats().clone())
            .get_stream(format!("KV_TASKS_DONE_{tenant}"))
            .await
            .unwrap()
            .cached_info()
            .config
            .clone();
        assert_eq!(info.republish.is_some(), by_bucket, "{tenant}: {info:?}");
        let raw = ns.nats().clone();
        let mut results = raw
            .subscribe(format!("tenant.{tenant}.tasks.results.>"))
            .await
            .unwrap();
        nats_harness::server_sync(&raw, &format!("tenant.{tenant}.sync")).await;
        let worker = d
            .worker(
                "resize",
                |task: Task| async move { Ok::<_, String>(task.payload) },
                WorkerOptions::new(),
            )
            .await
            .unwrap();
        let mut handle = d.dispatch("resize", b"img").await.unwrap();
        assert_eq!(
            handle.wait(WAIT).await.unwrap(),
            TaskOutcome::Completed(Bytes::from_static(b"img"))
        );
        let first = tokio::time::timeout(WAIT, results.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            first.subject.as_str(),
            format!("tenant.{tenant}.tasks.results.{}", handle.id().to_hex())
        );
        // Republished messages carry the stream's headers; the worker's do not.
        let stream = first
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Stream"))
            .map(|v| v.to_string());
        let expected = by_bucket.then(|| format!("KV_TASKS_DONE_{tenant}"));
        assert_eq!(stream, expected, "{tenant}: who published the outcome");
        // And only one copy.
        let second = tokio::time::timeout(Duration::from_millis(500), results.next()).await;
        assert!(second.is_err(), "{tenant}: a second copy: {second:?}");
        worker.shutdown(Duration::from_secs(5)).await;
    }
}

/// A handler longer than `ack_wait` is kept alive by progress acks (run once,
/// not redelivered meanwhile); one past `handler_timeout` fails its attempt
/// with the limit as the reason. With and without tasks pulled ahead, whose
/// wait for a handler also outlasts `ack_wait`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_handlers_outlive_ack_wait_and_the_time_limit_fails_the_attempt() {
    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let ns = connect(&server, &master, "acme", "planner").await;
    let d = Dispatcher::new(
        &ns,
        options()
            .ack_wait(Duration::from_secs(1))
            .handler_timeout(Duration::from_millis(3500))
            .max_deliveries(1),
    )
    .await
    .unwrap();
    for prefetch in [0, 2] {
        let kind = format!("slow{prefetch}");
        let runs = Arc::new(AtomicU64::new(0));
        let r = runs.clone();
        let worker = d
            .worker(
                kind.as_str(),
                move |task: Task| {
                    let r = r.clone();
                    async move {
                        r.fetch_add(1, Ordering::SeqCst);
                        // "2000": two ack waits; "forever": past the limit.
                        let ms = if &task.payload[..] == b"forever" {
                            60_000
                        } else {
                            2000
                        };
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        Ok::<_, String>(task.payload)
                    }
                },
                // One handler: with prefetch the second task waits 2 s for it.
                WorkerOptions::new().concurrency(1).prefetch(prefetch),
            )
            .await
            .unwrap();
        let mut first = d.dispatch(kind.as_str(), b"2000").await.unwrap();
        let mut second = d.dispatch(kind.as_str(), b"2000").await.unwrap();
        assert_eq!(
            first.wait(WAIT).await.unwrap(),
            TaskOutcome::Completed(Bytes::from_static(b"2000")),
            "prefetch {prefetch}"
        );
        assert_eq!(
            second.wait(WAIT).await.unwrap(),
            TaskOutcome::Completed(Bytes::from_static(b"2000")),
            "prefetch {prefetch}"
        );
        let mut stuck = d.dispatch(kind.as_str(), b"forever").await.unwrap();
        assert_eq!(
            stuck.wait(WAIT).await.unwrap(),
            TaskOutcome::DeadLettered {
                reason: "handler timed out after 3500 ms".into(),
                deliveries: 1
            },
            "prefetch {prefetch}"
        );
        // Each ran once: no redelivery while running or waiting for a handler.
        assert_eq!(runs.load(Ordering::SeqCst), 3, "prefetch {prefetch}");
        assert_eq!(worker.stats().duplicates(), 0, "prefetch {prefetch}");
        assert_eq!(worker.stats().running_copies(), 0, "prefetch {prefetch}");
        worker.shutdown(Duration::from_secs(5)).await;
    }
}

/// A worker whose credentials may not create its consumer fails at once with
/// `PermissionDenied` naming the subject (the server answers a denied
/// request with nothing, so without watching the connection's events this
/// was an outage after the request's timeout), and creates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_the_server_refuses_its_consumer_says_so_at_once() {
    let server = Server::with_options(
        nats_harness::ServerOptions::new().jetstream(true).config(
            r#"authorization {
  users = [
    { user: "agent", password: "pw",
      permissions: {
        publish: { allow: [">"], deny: ["$JS.API.CONSUMER.CREATE.>", "$JS.API.CONSUMER.DURABLE.CREATE.>"] }
        subscribe: { allow: [">"] } } }
  ]
}
"#,
        ),
    );
    let master = MasterSecret::generate().unwrap();
    let t = TenantId::new("acme").unwrap();
    let bundle = CredentialBundle {
        url: server.url().replacen("nats://", "nats://agent:pw@", 1),
        tenant: t.clone(),
        agent: AgentId::new("runner").unwrap(),
        creds: None,
        keys: master.key_set(&t, [1], 1).unwrap(),
        placement: Default::default(),
    };
    // A user and password in the URL (nats-server's config users).
    let ns = TenantNamespace::connect(&bundle).await.unwrap();
    let d = Dispatcher::new(&ns, options()).await.unwrap();
    let started = std::time::Instant::now();
    let err = d
        .worker(
            "resize",
            |_task: Task| async { Ok::<Bytes, String>(Bytes::new()) },
            WorkerOptions::new(),
        )
        .await
        .err()
        .unwrap_or_else(|| panic!("the worker started without its consumer"));
    assert_eq!(err.kind(), DispatchErrorKind::PermissionDenied, "{err}");
    let message = err.to_string();
    assert!(
        message.contains("$JS.API.CONSUMER.CREATE") && message.contains("work-resize"),
        "{message}"
    );
    // Before the JetStream request's own timeout (5 s).
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    // Nothing was created.
    let js = async_nats::jetstream::new(ns.nats().clone());
    let stream = js.get_stream(d.stream_name()).await.unwrap();
    assert!(stream.consumer_info("work-resize").await.is_err());
}

/// A stalled server (SIGSTOP): at most `max_unanswered` task publishes await
/// their answers; the next `send` waits for a place; an answer overdue 5 s
/// fails its publish as an outage (timed out), which frees its place; once
/// the server runs again, the publish that waited is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_publishes_are_bounded_and_time_out_on_a_stalled_server() {
    let mut server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let ns = connect(&server, &master, "acme", "planner").await;
    let d = Dispatcher::new(&ns, options().max_unanswered(4))
        .await
        .unwrap();
    let pid = server.process().pid().unwrap().to_string();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, pid.as_str()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig} {pid}");
    };
    signal("-STOP");
    let started = std::time::Instant::now();
    let mut unanswered = Vec::new();
    for i in 0..4 {
        let task = d.seal("resize", format!("t{i}").as_bytes()).unwrap();
        unanswered.push(d.send(&task).await.unwrap());
    }
    let fifth = d.seal("resize", b"t4").unwrap();
    let waiting = d.send(&fifth);
    tokio::pin!(waiting);
    let early = tokio::time::timeout(Duration::from_millis(500), &mut waiting).await;
    assert!(
        early.is_err(),
        "a fifth publish went out while four were unanswered"
    );
    // The four fail as overdue (5 s, swept once a second) ...
    for ack in unanswered {
        let err = ack.ack().await.unwrap_err();
        assert_eq!(err.kind(), DispatchErrorKind::Unavailable, "{err}");
        assert!(err.to_string().contains("timed out"), "{err}");
    }
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // ... which frees their places: the fifth goes out.
    let fifth_ack = tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .expect("a place was freed")
        .unwrap();
    signal("-CONT");
    let submitted = fifth_ack.ack().await.unwrap();
    assert_eq!(submitted.id, fifth.id());
    assert!(
        submitted.sequence > 0 && !submitted.duplicate,
        "{submitted:?}"
    );
}
