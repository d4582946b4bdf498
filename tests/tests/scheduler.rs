//! The resource-pool scheduler against a real nats-server with JetStream.
//!
//! Every limit is checked the way the platforms this project replaces failed:
//! racing callers against a small cap (exactly N admitted, locally and
//! cluster-wide through the key-value store), FIFO order of queued callers, a
//! crashed agent's slot freed by its TTL, a message cap shared by three instances
//! on three connections, fairness under a flood, and the typed refusals.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_runtime::scheduler::{
    Clock, FairPool, FairQueueLimits, KvLedger, ManualClock, Overflow, RateBucket, Scheduler,
    SchedulerConfig, SchedulerErrorKind, SlotBucket, SlotStore, TenantScheduler, RATE_BUCKET,
};
use agent_runtime::tiers::{Quotas, Tier};
use async_nats::jetstream;
use nats_harness::Server;
use tenant_bus::admission::{Admission, Admit, RejectReason, Rejection};
use tenant_bus::{AgentId, TenantId};

fn tenant(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

fn agent(i: usize) -> AgentId {
    AgentId::new(&format!("agent-{i}")).unwrap()
}

fn slots(ttl: Duration) -> SlotBucket {
    SlotBucket {
        ttl,
        ..SlotBucket::default()
    }
}

async fn connect_scheduler(
    server: &Server,
    config: SchedulerConfig,
    slot_ttl: Duration,
) -> Scheduler {
    let js = jetstream::new(server.raw_client().await);
    Scheduler::connect(&js, config, &RateBucket::default(), &slots(slot_ttl))
        .await
        .unwrap()
}

/// Admits one message, waiting for leases as a namespace would.
async fn admit(adm: &dyn Admission, bytes: usize) -> Result<(), Rejection> {
    match adm.admit_message(bytes) {
        Admit::Now => Ok(()),
        Admit::Rejected(r) => Err(r),
        Admit::Wait(f) => f.await,
    }
}

fn reason(e: &agent_runtime::scheduler::SchedulerError) -> Option<RejectReason> {
    e.kind().reason()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_racing_task_acquisitions_admit_exactly_ten() {
    let sched = Scheduler::local(SchedulerConfig::default().task_overflow(Overflow::Reject));
    let mut q = Quotas::for_tier(Tier::Free);
    q.max_concurrent_tasks = 10;
    let t = sched.tenant(&tenant("acme"), &q).unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(1_000));
    let joins: Vec<_> = (0..1_000)
        .map(|_| {
            let (t, barrier) = (t.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                t.acquire_task().await
            })
        })
        .collect();
    let mut held = Vec::new();
    for j in joins {
        match j.await.unwrap() {
            Ok(p) => held.push(p),
            Err(e) => assert_eq!(reason(&e), Some(RejectReason::Concurrency)),
        }
    }
    assert_eq!(held.len(), 10);
    assert_eq!(t.tasks().available(), 0);
    drop(held);
    assert_eq!(t.tasks().available(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_racing_agent_slots_over_three_connections_admit_exactly_ten() {
    let server = Server::jetstream();
    let mut q = Quotas::for_tier(Tier::Pro);
    q.max_agents = 10;
    let id = tenant("acme");
    let mut tenants = Vec::new();
    for _ in 0..3 {
        let sched =
            connect_scheduler(&server, SchedulerConfig::default(), Duration::from_secs(30)).await;
        tenants.push((sched.tenant(&id, &q).unwrap(), sched));
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(1_000));
    let joins: Vec<_> = (0..1_000)
        .map(|i| {
            let t = tenants[i % 3].0.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                t.acquire_agent_slot(&agent(i)).await
            })
        })
        .collect();
    let mut held = Vec::new();
    for j in joins {
        match j.await.unwrap() {
            Ok(slot) => held.push(slot),
            Err(e) => assert_eq!(reason(&e), Some(RejectReason::Concurrency), "{e}"),
        }
    }
    assert_eq!(held.len(), 10, "exactly max_agents slots, cluster-wide");
    let here: u64 = tenants.iter().map(|(t, _)| t.agents_held_here()).sum();
    assert_eq!(here, 10);
    // The bucket agrees: ten live keys.
    let js = jetstream::new(server.raw_client().await);
    let store = SlotStore::open(&js, &slots(Duration::from_secs(30)))
        .await
        .unwrap();
    let view = store.tenant(id.clone(), 10);
    assert_eq!(view.held_cluster_wide().await.unwrap(), 10);
    for slot in held {
        slot.release().await.unwrap();
    }
    assert_eq!(view.held_cluster_wide().await.unwrap(), 0);
    // Freed slots are taken again.
    let again = tenants[0].0.acquire_agent_slot(&agent(0)).await.unwrap();
    again.release().await.unwrap();
}

/// One permit, 40 callers queued one after another, permits released while late
/// callers keep arriving: admission order equals enqueue order.
#[tokio::test]
async fn queued_task_callers_are_admitted_in_fifo_order() {
    let config = SchedulerConfig::default().task_overflow(Overflow::Queue {
        max_waiters: 100,
        timeout: Duration::from_secs(30),
    });
    let sched = Scheduler::local(config);
    let mut q = Quotas::for_tier(Tier::Free);
    q.max_concurrent_tasks = 1;
    let t = sched.tenant(&tenant("acme"), &q).unwrap();
    let holder = t.acquire_task().await.unwrap();
    let enqueued = Arc::new(Mutex::new(Vec::new()));
    let admitted = Arc::new(Mutex::new(Vec::new()));
    let spawn_caller = |i: usize| {
        let (t, admitted) = (t.clone(), admitted.clone());
        tokio::spawn(async move {
            let permit = t.acquire_task().await.unwrap();
            admitted.lock().unwrap().push(i);
            tokio::time::sleep(Duration::from_millis(1)).await;
            drop(permit);
        })
    };
    let mut joins = Vec::new();
    for i in 0..20 {
        joins.push(spawn_caller(i));
        while t.tasks().waiting() < i + 1 {
            tokio::task::yield_now().await;
        }
        enqueued.lock().unwrap().push(i);
    }
    // Release the permit and keep adding callers while the queue drains: each one
    // arrives just as a permit is handed on, and must still queue at the tail.
    drop(holder);
    for i in 20..40 {
        let before = t.tasks().waiting();
        joins.push(spawn_caller(i));
        while t.tasks().waiting() < before + 1 && admitted.lock().unwrap().len() < i {
            tokio::task::yield_now().await;
        }
        enqueued.lock().unwrap().push(i);
    }
    for j in joins {
        j.await.unwrap();
    }
    let admitted = admitted.lock().unwrap().clone();
    assert_eq!(admitted, *enqueued.lock().unwrap());
    assert_eq!(admitted, (0..40).collect::<Vec<_>>());
}

/// A slot whose holder crashed (no heartbeats, no release) frees itself after the
/// TTL; a live holder's heartbeats keep it past the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_agents_slot_is_freed_after_the_ttl() {
    let server = Server::jetstream();
    let ttl = Duration::from_secs(1);
    let url = server.url();
    let mut q = Quotas::for_tier(Tier::Free);
    q.max_agents = 1;
    let id = tenant("acme");

    // The crashing instance: its own runtime and connection, dropped after taking
    // the slot without releasing it.
    let crash_id = id.clone();
    let crash_q = q.clone();
    let crashed_at = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let at = rt.block_on(async {
            let client = async_nats::connect(&url).await.unwrap();
            let js = jetstream::new(client);
            let sched = Scheduler::connect(
                &js,
                SchedulerConfig::default(),
                &RateBucket::default(),
                &slots(ttl),
            )
            .await
            .unwrap();
            let t = sched.tenant(&crash_id, &crash_q).unwrap();
            let slot = t.acquire_agent_slot(&agent(0)).await.unwrap();
            std::mem::forget(slot);
            Instant::now()
        });
        rt.shutdown_background();
        at
    })
    .join()
    .unwrap();

    let sched = connect_scheduler(&server, SchedulerConfig::default(), ttl).await;
    let t = sched.tenant(&id, &q).unwrap();
    let e = t.acquire_agent_slot(&agent(1)).await.unwrap_err();
    assert_eq!(reason(&e), Some(RejectReason::Concurrency));
    let slot = nats_harness::eventually(Duration::from_secs(6), || {
        let t = t.clone();
        async move { t.acquire_agent_slot(&agent(1)).await.ok() }
    })
    .await
    .expect("the crashed agent's slot was never freed");
    let freed_after = crashed_at.elapsed();
    assert!(
        freed_after >= ttl / 2 && freed_after <= ttl + Duration::from_secs(4),
        "freed after {freed_after:?} (TTL {ttl:?})"
    );

    // A live holder keeps its slot for three TTLs.
    tokio::time::sleep(ttl * 3).await;
    assert!(!slot.is_lost());
    let e = t.acquire_agent_slot(&agent(2)).await.unwrap_err();
    assert_eq!(reason(&e), Some(RejectReason::Concurrency));
    slot.release().await.unwrap();
    t.acquire_agent_slot(&agent(2))
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
}

/// Three instances on three connections share one tenant's message cap through
/// the rate bucket. The windows run on a shared manual clock so the whole run
/// falls in one window, then in the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_one_message_cap() {
    const CAP: u64 = 3_000;
    const K: u32 = 3;
    let server = Server::jetstream();
    let clock = ManualClock::new(1_700_000_000_000);
    let config = SchedulerConfig::default()
        .instances(K)
        .clock(Clock::Manual(clock.clone()));
    let mut q = Quotas::for_tier(Tier::Pro);
    q.messages_per_window = CAP;
    q.window_ms = 1_000;
    let id = tenant("acme");
    let mut instances: Vec<(Arc<TenantScheduler>, Scheduler)> = Vec::new();
    for _ in 0..K {
        let sched = connect_scheduler(&server, config.clone(), Duration::from_secs(30)).await;
        instances.push((sched.tenant(&id, &q).unwrap(), sched));
    }
    let batch = instances[0].0.message_window().batch();
    assert_eq!(batch, CAP / (4 * u64::from(K)));

    for round in 0..2u64 {
        // Four concurrent senders per instance, each sending until refused.
        let mut joins = Vec::new();
        for (i, (t, _)) in instances.iter().enumerate() {
            for _ in 0..4 {
                let adm = t.message_admission();
                joins.push(tokio::spawn(async move {
                    let mut n = 0u64;
                    loop {
                        match admit(adm.as_ref(), 64).await {
                            Ok(()) => n += 1,
                            Err(r) => {
                                assert_eq!(r.reason, RejectReason::MessageRate);
                                assert!(r.retry_after.is_some());
                                return (i, n);
                            }
                        }
                        assert!(n <= CAP, "runaway sender");
                    }
                }));
            }
        }
        let mut per_instance = [0u64; K as usize];
        for j in joins {
            let (i, n) = j.await.unwrap();
            per_instance[i] += n;
        }
        let total: u64 = per_instance.iter().sum();
        assert!(total <= CAP, "round {round}: admitted {total} > cap {CAP}");
        assert!(
            total + u64::from(K) * batch >= CAP,
            "round {round}: admitted {total}, bound cap - K*B = {}",
            CAP - u64::from(K) * batch
        );
        // The ledger never leased past the cap.
        let js = jetstream::new(server.raw_client().await);
        let ledger = KvLedger::open(&js, &RateBucket::default()).await.unwrap();
        let window = clock.now_ms() / 1_000;
        let leased = ledger.leased("acme.msgs", window).await.unwrap();
        assert!(leased <= CAP, "leased {leased}");
        assert_eq!(
            leased, CAP,
            "demand exceeded the cap, so all of it was leased"
        );
        eprintln!("round {round}: admitted {total} of {CAP}: {per_instance:?}");
        // The next window brings a fresh budget.
        clock.advance(Duration::from_millis(1_000));
    }
    assert_eq!(RATE_BUCKET, "agentbus_sched_rate");
}

/// Two workers with 5 ms tasks; a pro tenant (weight 4) floods ten times what the
/// pool can run, a free tenant (weight 1) sends a task every 25 ms (below its
/// 1/5 share). Every quiet task completes, each within 100 ms of submission
/// (SFQ's bound is about two task times, 10 ms; the rest is slack for a loaded
/// 2-core machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_tenant_does_not_starve_a_quiet_one() {
    const TASK: Duration = Duration::from_millis(5);
    const BOUND: Duration = Duration::from_millis(100);
    let sched = Scheduler::local(SchedulerConfig::default());
    let noisy = sched
        .tenant(&tenant("noisy"), &Quotas::for_tier(Tier::Pro))
        .unwrap();
    let quiet = sched
        .tenant(&tenant("quiet"), &Quotas::for_tier(Tier::Free))
        .unwrap();
    let pool = Arc::new(FairPool::new(FairQueueLimits {
        per_tenant: 10_000,
        total: 20_000,
    }));
    let done = Arc::new(Mutex::new(Vec::<(TenantId, Duration)>::new()));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (pool, done) = (pool.clone(), done.clone());
            tokio::spawn(async move {
                while let Some((who, submitted)) = pool.pop().await {
                    let submitted: Instant = submitted;
                    tokio::time::sleep(TASK).await;
                    done.lock().unwrap().push((who, submitted.elapsed()));
                }
            })
        })
        .collect();
    // 1 s of the pool runs ~400 tasks; the noisy tenant offers 10x that.
    for _ in 0..4_000 {
        pool.push(noisy.id(), noisy.weight(), Instant::now())
            .unwrap();
    }
    for _ in 0..40 {
        pool.push(quiet.id(), quiet.weight(), Instant::now())
            .unwrap();
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let quiet_done = nats_harness::eventually(Duration::from_secs(5), || {
        let done = done.clone();
        let quiet = quiet.id().clone();
        async move {
            let lat: Vec<Duration> = done
                .lock()
                .unwrap()
                .iter()
                .filter(|(w, _)| *w == quiet)
                .map(|(_, d)| *d)
                .collect();
            (lat.len() == 40).then_some(lat)
        }
    })
    .await
    .expect("all of the quiet tenant's tasks complete");
    let worst = quiet_done.iter().max().unwrap();
    let noisy_served = done.lock().unwrap().len() - 40;
    eprintln!("quiet worst latency {worst:?}; noisy tasks served meanwhile: {noisy_served}");
    assert!(*worst <= BOUND, "worst quiet latency {worst:?} > {BOUND:?}");
    assert!(noisy_served > 100, "the noisy tenant still uses the pool");
    assert!(!pool.is_empty(), "the flood is still queued");
    pool.close();
    for w in workers {
        w.abort();
    }
}

/// The typed refusals of the façade: queue bound, wait timeout, suspension (for
/// messages, tasks and agent slots), message size; with retry-after where known.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_typed() {
    let server = Server::jetstream();
    let config = SchedulerConfig::default().task_overflow(Overflow::Queue {
        max_waiters: 2,
        timeout: Duration::from_millis(200),
    });
    let sched = connect_scheduler(&server, config, Duration::from_secs(30)).await;
    let mut q = Quotas::for_tier(Tier::Free);
    q.max_concurrent_tasks = 1;
    q.max_message_bytes = 1_000;
    let id = tenant("acme");
    let t = sched.tenant(&id, &q).unwrap();

    // Queue bound and wait timeout.
    let held = t.acquire_task().await.unwrap();
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let t = t.clone();
            tokio::spawn(async move { t.acquire_task().await })
        })
        .collect();
    while t.tasks().waiting() < 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let e = t.acquire_task().await.unwrap_err();
    assert_eq!(reason(&e), Some(RejectReason::QueueFull));
    assert!(matches!(e.kind(), SchedulerErrorKind::Rejected(_)));
    for w in waiters {
        let e = w.await.unwrap().unwrap_err();
        assert_eq!(reason(&e), Some(RejectReason::WaitTimeout));
    }
    drop(held);

    // Message size, then a message admitted through the rate bucket.
    let adm = t.message_admission();
    let r = admit(adm.as_ref(), 1_001).await.unwrap_err();
    assert_eq!(r.reason, RejectReason::TooLarge);
    admit(adm.as_ref(), 1_000).await.unwrap();

    // Suspension: every admission, on every path.
    sched.suspend(&id);
    match adm.admit_message(10) {
        Admit::Rejected(r) => assert_eq!(r.reason, RejectReason::Suspended),
        _ => panic!("a suspended tenant's message was not refused at once"),
    }
    assert_eq!(
        reason(&t.acquire_task().await.unwrap_err()),
        Some(RejectReason::Suspended)
    );
    assert_eq!(
        reason(&t.acquire_agent_slot(&agent(0)).await.unwrap_err()),
        Some(RejectReason::Suspended)
    );
    // A tenant created while suspended starts suspended.
    let other = tenant("acme-two");
    sched.suspend(&other);
    let t2 = sched.tenant(&other, &q).unwrap();
    assert!(t2.is_suspended());
    sched.resume(&id);
    admit(adm.as_ref(), 10).await.unwrap();
    let _task = t.acquire_task().await.unwrap();

    // A window longer than the rate bucket's max_age is refused up front.
    let mut long = q.clone();
    long.window_ms = 3_600_000;
    let e = sched.tenant(&tenant("slow"), &long).unwrap_err();
    assert_eq!(e.kind(), SchedulerErrorKind::InvalidConfig);
}

/// A live `window_ms` update gets the same check against the rate ledger's key
/// expiry as a new tenant: a window that would outlive its counters is refused
/// (the old window stays), a shorter one applies.
#[tokio::test]
async fn a_live_window_update_is_checked_against_the_ledger_expiry() {
    let server = Server::jetstream();
    let js = jetstream::new(server.raw_client().await);
    let rate = RateBucket {
        max_age: Duration::from_secs(2),
        ..RateBucket::default()
    };
    let sched = Scheduler::connect(
        &js,
        SchedulerConfig::default(),
        &rate,
        &slots(Duration::from_secs(5)),
    )
    .await
    .unwrap();
    let mut q = Quotas::for_tier(Tier::Free);
    let t = sched.tenant(&TenantId::new("w").unwrap(), &q).unwrap();
    assert_eq!(t.window_ms(), 1_000);
    q.window_ms = 5_000; // longer than the 2 s expiry
    t.set_quotas(&q);
    assert_eq!(
        t.window_ms(),
        1_000,
        "a window past the ledger expiry was applied"
    );
    q.window_ms = 1_500;
    t.set_quotas(&q);
    assert_eq!(t.window_ms(), 1_500);
}

/// The replicas of bucket `bucket`'s stream.
async fn bucket_replicas(js: &jetstream::Context, bucket: &str) -> usize {
    let mut stream = js.get_stream(format!("KV_{bucket}")).await.unwrap();
    stream.info().await.unwrap().config.num_replicas
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_for_the_deployment_takes_the_registrys_replicas_and_never_lowers_them() {
    use agent_runtime::registry::{Registry, RegistryOptions};
    use agent_runtime::scheduler::SLOT_BUCKET;
    let c = nats_harness::cluster(nats_harness::ClusterOptions::new().nodes(3)).await;
    let client = async_nats::ConnectOptions::new()
        .connect(c.urls().split(',').collect::<Vec<_>>())
        .await
        .unwrap();
    let js = jetstream::new(client.clone());
    nats_harness::jetstream_ready(&js, Duration::from_secs(20)).await;
    // An instance that started before the deployment grew: R1 buckets.
    Scheduler::connect(
        &js,
        SchedulerConfig::default(),
        &RateBucket::default(),
        &SlotBucket::default(),
    )
    .await
    .unwrap();
    assert_eq!(bucket_replicas(&js, RATE_BUCKET).await, 1);
    // The registry the controller keeps with the deployment's count.
    let registry = Registry::open_with(client, RegistryOptions::new().replicas(3))
        .await
        .unwrap();
    assert_eq!(registry.replicas().await.unwrap(), 3);
    let sched = Scheduler::connect_for_deployment(&js, SchedulerConfig::default(), &registry)
        .await
        .unwrap();
    for bucket in [RATE_BUCKET, SLOT_BUCKET] {
        assert_eq!(bucket_replicas(&js, bucket).await, 3, "{bucket}");
    }
    // It works at once: an agent slot is taken and given back. (Before the
    // raise waited for the new peers, the first write got no answer and
    // waited out the 5 s publish timeout.)
    let quotas = Quotas::for_tier(Tier::Free);
    let t = sched.tenant(&tenant("acme"), &quotas).unwrap();
    let lease = tokio::time::timeout(Duration::from_secs(3), t.acquire_agent_slot(&agent(1)))
        .await
        .expect("the first agent slot after the raise took 3 s")
        .unwrap();
    lease.release().await.unwrap();
    // An instance asking for fewer replicas uses the buckets as they are.
    Scheduler::connect(
        &js,
        SchedulerConfig::default(),
        &RateBucket::default(),
        &SlotBucket::default(),
    )
    .await
    .unwrap();
    for bucket in [RATE_BUCKET, SLOT_BUCKET] {
        assert_eq!(bucket_replicas(&js, bucket).await, 3, "{bucket} lowered");
    }
}
