//! The resource-pool scheduler wired into agents, namespaces, dispatch and the
//! registry, on a real JetStream nats-server.
//!
//! - `max_agents_holds_across_two_hosts_on_separate_connections`: two agent hosts
//!   (two instances: own connection, watcher and scheduler each) share a tenant's
//!   `max_agents = 3` through the slot bucket; a 4th agent is refused on either,
//!   and a shut-down agent's slot is free for the other instance at once.
//! - `agent_publishes_and_dispatches_share_the_tenants_message_window`: an agent
//!   connected by its host and a dispatcher spend one window of 10 messages; the
//!   next dispatch is refused with `Rejected(MessageRate)` and a retry-after to
//!   the window's end, nothing is stored, and the next window admits again.
//! - `task_cap_holds_across_two_workers_of_one_tenant`: two workers of 4 slots
//!   each, one tenant with `max_concurrent_tasks = 2`: never more than 2 tasks run.
//! - `registry_changes_reach_the_scheduler`: suspension, activation and a quota
//!   change in the registry reach the tenant's scheduler within 1 s.
//! - `noisy_tenant_is_held_to_its_window_while_quiet_tasks_complete`: a free-tier
//!   tenant offering 10x its `messages_per_window` (100 per 1 s window) through
//!   its namespace's admission gets at most 100 per window (counted by the client
//!   and in the ledger), every refusal carries a retry-after, and a quiet tenant
//!   sharing the same two workers through a `FairPool` completes every task within
//!   [`QUIET_BOUND`] of its publish.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent_runtime::agent::{AgentErrorKind, AgentHost};
use agent_runtime::dispatch::{
    DispatchErrorKind, DispatchOptions, Dispatcher, Task, WorkerOptions,
};
use agent_runtime::registry::{Registry, RegistryWatcher, SettingsPatch, TenantSettings};
use agent_runtime::scheduler::{
    Clock, FairPool, FairQueueLimits, KvLedger, ManualClock, RateBucket, Scheduler,
    SchedulerConfig, SchedulerError, SlotBucket,
};
use agent_runtime::tiers::Tier;
use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt as _;
use nats_harness::{eventually, Server};
use tenant_bus::admission::{Admit, RejectReason};
use tenant_bus::namespace::{PublishError, PublishErrorKind};
use tenant_bus::{AgentId, CredentialBundle, MasterSecret, NamespaceOptions, TenantId};

const WAIT: Duration = Duration::from_secs(20);

fn id(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

fn bundle(server: &Server, master: &MasterSecret, tenant: &str, agent: &str) -> CredentialBundle {
    let t = id(tenant);
    CredentialBundle {
        url: server.url(),
        tenant: t.clone(),
        agent: AgentId::new(agent).unwrap(),
        creds: None,
        keys: master.key_set(&t, [1], 1).unwrap(),
        placement: Default::default(),
    }
}

/// One runtime instance: its own connection, registry watcher and scheduler.
async fn instance(server: &Server, config: SchedulerConfig) -> AgentHost {
    let client = server.raw_client().await;
    let registry = Registry::open(client.clone()).await.unwrap();
    let watcher = Arc::new(RegistryWatcher::start(&registry).await.unwrap());
    let scheduler = Scheduler::connect(
        &jetstream::new(client),
        config,
        &RateBucket::default(),
        &SlotBucket::default(),
    )
    .await
    .unwrap();
    AgentHost::with_scheduler(watcher, Arc::new(scheduler))
}

/// Admits one message as a namespace would (waiting for a lease if needed).
async fn admit(adm: &dyn tenant_bus::admission::Admission) -> Result<(), RejectReason> {
    match adm.admit_message(10) {
        Admit::Now => Ok(()),
        Admit::Rejected(r) => Err(r.reason),
        Admit::Wait(f) => f.await.map_err(|r| r.reason),
    }
}

fn source_of<'a, E: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(x) = c.downcast_ref::<E>() {
            return Some(x);
        }
        cur = c.source();
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_agents_holds_across_two_hosts_on_separate_connections() {
    let server = Server::jetstream();
    let registry = Registry::open(server.raw_client().await).await.unwrap();
    registry
        .create(
            "acme",
            "Acme",
            Tier::Free,
            TenantSettings::new()
                .allow_agent_type("planner")
                .quota("max_agents", "3"),
        )
        .await
        .unwrap();
    let master = MasterSecret::generate().unwrap();
    let hosts = [
        instance(&server, SchedulerConfig::default()).await,
        instance(&server, SchedulerConfig::default()).await,
    ];
    let start = |h: usize, agent: &str| {
        let b = bundle(&server, &master, "acme", agent);
        let host = &hosts[h];
        async move {
            host.start(&b, NamespaceOptions::new(), "planner", ["jobs:*"])
                .await
        }
    };
    let a0 = start(0, "agent-0").await.unwrap();
    let _a1 = start(0, "agent-1").await.unwrap();
    let _a2 = start(1, "agent-2").await.unwrap();
    assert!(a0.holds_slot());
    // Each host alone is below 3; together they are at 3.
    for (h, agent) in [(1, "agent-3"), (0, "agent-4")] {
        let e = start(h, agent).await.unwrap_err();
        assert_eq!(e.kind(), AgentErrorKind::TooManyAgents, "{e}");
        let cause = source_of::<SchedulerError>(&e).expect("the scheduler's refusal");
        assert_eq!(cause.kind().reason(), Some(RejectReason::Concurrency));
    }
    assert_eq!(hosts[0].agents_of(&id("acme")), 2);
    assert_eq!(hosts[1].agents_of(&id("acme")), 1);
    // A shut-down agent's slot is released (not left to its TTL).
    a0.shutdown(Duration::from_secs(1)).await;
    assert!(!a0.holds_slot());
    let a3 = start(1, "agent-3").await.unwrap();
    assert_eq!(hosts[1].agents_of(&id("acme")), 2);
    assert_eq!(
        start(0, "agent-5").await.unwrap_err().kind(),
        AgentErrorKind::TooManyAgents
    );
    a3.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_publishes_and_dispatches_share_the_tenants_message_window() {
    const CAP: u64 = 10;
    let server = Server::jetstream();
    let registry = Registry::open(server.raw_client().await).await.unwrap();
    registry
        .create(
            "acme",
            "Acme",
            Tier::Free,
            TenantSettings::new()
                .allow_agent_type("planner")
                .quota("messages_per_window", &CAP.to_string())
                .quota("window_ms", "1000"),
        )
        .await
        .unwrap();
    // A manual clock: the whole test sits at the start of one window, then the next.
    let clock = ManualClock::new(1_700_000_000_000);
    let host = instance(
        &server,
        SchedulerConfig::default().clock(Clock::Manual(clock.clone())),
    )
    .await;
    let master = MasterSecret::generate().unwrap();
    let planner = bundle(&server, &master, "acme", "planner");
    let agent = host
        .start(&planner, NamespaceOptions::new(), "planner", ["jobs:*"])
        .await
        .unwrap();
    let tenant = host.tenant_scheduler(&id("acme")).await.unwrap().unwrap();
    let ns = host
        .connect(&planner, NamespaceOptions::new())
        .await
        .unwrap();
    let d = Dispatcher::new(
        &ns,
        DispatchOptions::new()
            .per_tenant_names(true)
            .scheduler(tenant.clone()),
    )
    .await
    .unwrap();

    for i in 0..6 {
        agent
            .publish("jobs.created", format!("job-{i}"))
            .await
            .unwrap();
    }
    for i in 0..4 {
        d.dispatch("resize", format!("img-{i}")).await.unwrap();
    }
    // The window's 10 messages are spent: the dispatch is refused, typed.
    let e = d.dispatch("resize", "img-late").await.unwrap_err();
    assert_eq!(e.kind().reason(), Some(RejectReason::MessageRate), "{e}");
    assert!(matches!(e.kind(), DispatchErrorKind::Rejected(_)));
    assert_eq!(e.kind().retry_after(), Some(Duration::from_millis(1_000)));
    let task = d.seal("resize", b"img-resubmitted").unwrap();
    assert_eq!(
        d.submit(&task).await.unwrap_err().kind().reason(),
        Some(RejectReason::MessageRate)
    );
    // So is the agent's publish, through its namespace's admission.
    let e = agent.publish("jobs.created", "job-late").await.unwrap_err();
    let cause = source_of::<PublishError>(&e).expect("the bus's refusal");
    match cause.kind() {
        PublishErrorKind::Rejected(r) => {
            assert_eq!(r.reason, RejectReason::MessageRate);
            assert_eq!(r.retry_after, Some(Duration::from_millis(1_000)));
        }
        other => panic!("{other}"),
    }
    // Nothing refused was stored.
    let js = jetstream::new(server.raw_client().await);
    let mut stream = js.get_stream(d.stream_name()).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 4);
    // The ledger leased exactly the cap for the window.
    let ledger = KvLedger::open(&js, &RateBucket::default()).await.unwrap();
    assert_eq!(
        ledger
            .leased("acme.msgs", clock.now_ms() / 1_000)
            .await
            .unwrap(),
        CAP
    );
    // The next window admits again.
    clock.advance(Duration::from_millis(1_000));
    d.dispatch("resize", "img-next-window").await.unwrap();
    agent
        .publish("jobs.created", "job-next-window")
        .await
        .unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 5);
    agent.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_cap_holds_across_two_workers_of_one_tenant() {
    const TASKS: usize = 12;
    const RUN: Duration = Duration::from_millis(150);
    let server = Server::jetstream();
    let scheduler = Scheduler::local(SchedulerConfig::default());
    let mut quotas = agent_runtime::tiers::Quotas::for_tier(Tier::Pro);
    quotas.max_concurrent_tasks = 2;
    let tenant = scheduler.tenant(&id("acme"), &quotas).unwrap();
    let master = MasterSecret::generate().unwrap();
    let options = DispatchOptions::new()
        .per_tenant_names(true)
        .scheduler(tenant.clone());

    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..2 {
        let ns = tenant
            .connect(
                &bundle(&server, &master, "acme", &format!("worker-{w}")),
                NamespaceOptions::new(),
            )
            .await
            .unwrap();
        let d = Dispatcher::new(&ns, options.clone()).await.unwrap();
        let (running, peak) = (running.clone(), peak.clone());
        let worker = d
            .worker(
                "crunch",
                move |_task: Task| {
                    let (running, peak) = (running.clone(), peak.clone());
                    async move {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(RUN).await;
                        running.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, String>(Bytes::from_static(b"done"))
                    }
                },
                WorkerOptions::new()
                    .concurrency(4)
                    .fetch_expires(Duration::from_millis(250)),
            )
            .await
            .unwrap();
        workers.push(worker);
    }
    let ns = tenant
        .connect(
            &bundle(&server, &master, "acme", "planner"),
            NamespaceOptions::new(),
        )
        .await
        .unwrap();
    let d = Dispatcher::new(&ns, options).await.unwrap();
    let started = Instant::now();
    let mut handles = Vec::new();
    for i in 0..TASKS {
        handles.push(d.dispatch("crunch", format!("job-{i}")).await.unwrap());
    }
    for h in &mut handles {
        h.wait(WAIT).await.unwrap();
    }
    let took = started.elapsed();
    let per_worker: Vec<u64> = workers.iter().map(|w| w.stats().runs()).collect();
    eprintln!(
        "{TASKS} tasks of {RUN:?}: peak {} running, {took:?}, runs per worker {per_worker:?}",
        peak.load(Ordering::SeqCst)
    );
    assert_eq!(
        peak.load(Ordering::SeqCst),
        2,
        "max_concurrent_tasks across workers"
    );
    assert_eq!(per_worker.iter().sum::<u64>(), TASKS as u64);
    // 12 tasks, 2 at a time, 150 ms each: at least 6 rounds.
    assert!(took >= RUN * (TASKS as u32 / 2), "{took:?}");
    for w in workers {
        w.shutdown(Duration::from_secs(5)).await;
    }
    assert_eq!(tenant.tasks().available(), 2, "every permit returned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_changes_reach_the_scheduler() {
    let server = Server::jetstream();
    let registry = Registry::open(server.raw_client().await).await.unwrap();
    for t in ["acme", "globex"] {
        registry
            .create(t, t, Tier::Free, TenantSettings::new())
            .await
            .unwrap();
    }
    let watcher = RegistryWatcher::start(&registry).await.unwrap();
    let scheduler = Arc::new(Scheduler::local(SchedulerConfig::default()));
    let _follower = scheduler.follow_registry(&watcher);
    let acme = scheduler
        .tenant(
            &id("acme"),
            &registry.get(&id("acme")).await.unwrap().quotas(),
        )
        .unwrap();
    let admission = acme.message_admission();
    assert_eq!(admit(admission.as_ref()).await, Ok(()));

    registry.suspend(&id("acme")).await.unwrap();
    let seen = eventually(Duration::from_secs(1), || async {
        acme.is_suspended().then_some(())
    })
    .await;
    assert!(
        seen.is_some(),
        "suspension reached the scheduler within 1 s"
    );
    assert_eq!(
        admit(admission.as_ref()).await,
        Err(RejectReason::Suspended)
    );
    assert_eq!(
        acme.acquire_task().await.unwrap_err().kind().reason(),
        Some(RejectReason::Suspended)
    );

    registry.activate(&id("acme")).await.unwrap();
    let seen = eventually(Duration::from_secs(1), || async {
        (!acme.is_suspended()).then_some(())
    })
    .await;
    assert!(
        seen.is_some(),
        "activation reached the scheduler within 1 s"
    );
    assert!(matches!(admission.admit_message(10), Admit::Now));

    registry
        .update(
            &id("acme"),
            &SettingsPatch::new().set_quota("max_concurrent_tasks", "2"),
        )
        .await
        .unwrap();
    let seen = eventually(Duration::from_secs(1), || async {
        (acme.tasks().limit() == 2).then_some(())
    })
    .await;
    assert!(seen.is_some(), "the quota change reached the scheduler");

    // A tenant suspended before its scheduler exists starts suspended.
    registry.suspend(&id("globex")).await.unwrap();
    let seen = eventually(Duration::from_secs(1), || async {
        scheduler.is_suspended(&id("globex")).then_some(())
    })
    .await;
    assert!(seen.is_some());
    let globex = scheduler
        .tenant(
            &id("globex"),
            &agent_runtime::tiers::Quotas::for_tier(Tier::Free),
        )
        .unwrap();
    assert!(globex.is_suspended());
}

// ----- a noisy tenant and a quiet one ----------------------------------------------

/// The noisy tenant's cap per 1 s window.
const NOISY_CAP: u64 = 100;
/// How long each tenant offers load.
const RUN: Duration = Duration::from_secs(3);
/// What one task costs a shared worker.
const TASK: Duration = Duration::from_millis(8);
/// The quiet tenant sends one task every this.
const QUIET_EVERY: Duration = Duration::from_millis(50);
/// Every quiet task completes within this of its publish (a FIFO pool would
/// make it wait behind each window's burst of up to 100 noisy tasks: 400 ms).
const QUIET_BOUND: Duration = Duration::from_millis(150);
/// No noisy attempt within this of a window boundary, so every admission is
/// attributed to one window by the client's own clock.
const GUARD_MS: u64 = 10;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noisy_tenant_is_held_to_its_window_while_quiet_tasks_complete() {
    let server = Server::jetstream();
    let js = jetstream::new(server.raw_client().await);
    let scheduler = Scheduler::connect(
        &js,
        SchedulerConfig::default(),
        &RateBucket::default(),
        &SlotBucket::default(),
    )
    .await
    .unwrap();
    let mut noisy_q = agent_runtime::tiers::Quotas::for_tier(Tier::Free);
    noisy_q.messages_per_window = NOISY_CAP;
    noisy_q.window_ms = 1_000;
    let noisy = scheduler.tenant(&id("noisy"), &noisy_q).unwrap();
    let quiet = scheduler
        .tenant(
            &id("quiet"),
            &agent_runtime::tiers::Quotas::for_tier(Tier::Free),
        )
        .unwrap();
    let master = MasterSecret::generate().unwrap();
    let epoch = Instant::now();

    // The runtime side: one subscriber per tenant feeds a fair pool; two workers.
    let pool = Arc::new(FairPool::<u64>::new(FairQueueLimits {
        per_tenant: 10_000,
        total: 20_000,
    }));
    let mut feeders = Vec::new();
    for t in [&noisy, &quiet] {
        let ns = t
            .connect(
                &bundle(&server, &master, t.id().as_str(), "runtime"),
                NamespaceOptions::new(),
            )
            .await
            .unwrap();
        let mut sub = ns.subscribe("tasks.work").await.unwrap();
        ns.sync().await.unwrap();
        let (pool, t) = (pool.clone(), t.clone());
        feeders.push(tokio::spawn(async move {
            let _ns = ns;
            while let Some(m) = sub.next().await {
                let sent_us = u64::from_be_bytes(m.payload[..8].try_into().unwrap());
                let _ = pool.push(t.id(), t.weight(), sent_us);
            }
        }));
    }
    let quiet_lat = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let noisy_done = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (pool, quiet_lat, noisy_done) =
                (pool.clone(), quiet_lat.clone(), noisy_done.clone());
            let quiet_id = quiet.id().clone();
            tokio::spawn(async move {
                while let Some((who, sent_us)) = pool.pop().await {
                    tokio::time::sleep(TASK).await;
                    if who == quiet_id {
                        let lat = epoch.elapsed() - Duration::from_micros(sent_us);
                        quiet_lat.lock().unwrap().push(lat);
                    } else {
                        noisy_done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();

    // The noisy tenant: 10x its cap, one attempt per ms.
    let noisy_ns = noisy
        .connect(
            &bundle(&server, &master, "noisy", "flood"),
            NamespaceOptions::new(),
        )
        .await
        .unwrap();
    let noisy_run = tokio::spawn(async move {
        let mut per_window: BTreeMap<u64, u64> = BTreeMap::new();
        let (mut offered, mut refused, mut ambiguous, mut no_hint) = (0u64, 0u64, 0u64, 0u64);
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        let until = Instant::now() + RUN;
        while Instant::now() < until {
            tick.tick().await;
            let before = now_ms();
            let in_window = before % 1_000;
            if !(GUARD_MS..1_000 - GUARD_MS).contains(&in_window) {
                continue;
            }
            offered += 1;
            let sent = (epoch.elapsed().as_micros() as u64).to_be_bytes();
            match noisy_ns.publish("tasks.work", sent).await {
                Ok(_) => {
                    let after = now_ms();
                    if before / 1_000 == after / 1_000 {
                        *per_window.entry(before / 1_000).or_default() += 1;
                    } else {
                        ambiguous += 1;
                    }
                }
                Err(e) => match e.kind() {
                    PublishErrorKind::Rejected(r) => {
                        assert_eq!(r.reason, RejectReason::MessageRate);
                        refused += 1;
                        if r.retry_after.is_none() {
                            no_hint += 1;
                        }
                    }
                    other => panic!("noisy publish failed: {other}"),
                },
            }
        }
        // Hand the last messages to the server before the connection goes.
        noisy_ns.flush().await.unwrap();
        (per_window, offered, refused, ambiguous, no_hint)
    });

    // The quiet tenant: one task every 50 ms, all admitted.
    let quiet_ns = quiet
        .connect(
            &bundle(&server, &master, "quiet", "steady"),
            NamespaceOptions::new(),
        )
        .await
        .unwrap();
    let mut quiet_sent = 0usize;
    let mut tick = tokio::time::interval(QUIET_EVERY);
    let until = Instant::now() + RUN;
    while Instant::now() < until {
        tick.tick().await;
        let sent = (epoch.elapsed().as_micros() as u64).to_be_bytes();
        quiet_ns.publish("tasks.work", sent).await.unwrap();
        quiet_sent += 1;
    }
    let (per_window, offered, refused, ambiguous, no_hint) = noisy_run.await.unwrap();

    let all_quiet = eventually(Duration::from_secs(5), || {
        let quiet_lat = quiet_lat.clone();
        async move { (quiet_lat.lock().unwrap().len() == quiet_sent).then_some(()) }
    })
    .await;
    let lat = quiet_lat.lock().unwrap().clone();
    let worst = lat.iter().max().copied().unwrap_or_default();
    let admitted: u64 = per_window.values().sum::<u64>() + ambiguous;
    eprintln!(
        "noisy: offered {offered}, admitted {admitted} ({per_window:?}, ambiguous {ambiguous}), \
         refused {refused}; noisy tasks run {}; quiet: {} of {quiet_sent} completed, worst {worst:?}",
        noisy_done.load(Ordering::Relaxed),
        lat.len()
    );

    // The noisy tenant: never more than its cap in a window, by the client's count
    // and by the ledger, which never leases past the cap.
    assert!(
        offered >= 10 * NOISY_CAP * 2,
        "offered {offered}: 10x the cap"
    );
    for (w, n) in &per_window {
        assert!(*n <= NOISY_CAP, "window {w}: {n} admitted > {NOISY_CAP}");
    }
    let ledger = KvLedger::open(&js, &RateBucket::default()).await.unwrap();
    for w in per_window.keys() {
        let leased = ledger.leased("noisy.msgs", *w).await.unwrap();
        assert!(leased <= NOISY_CAP, "window {w}: leased {leased}");
    }
    assert!(admitted <= NOISY_CAP * per_window.len() as u64 + ambiguous);
    assert_eq!(admitted + refused, offered);
    assert_eq!(no_hint, 0, "every refusal carries a retry-after");
    // Windows wholly inside the run got close to the cap (cap - K*B = 100 - 4*6).
    let full: Vec<u64> = per_window
        .values()
        .copied()
        .skip(1)
        .take(per_window.len().saturating_sub(2))
        .collect();
    assert!(full.iter().all(|n| *n >= NOISY_CAP - 24), "{full:?}");

    // The quiet tenant: every task completed, each within the bound.
    assert!(
        all_quiet.is_some(),
        "{} of {quiet_sent} quiet tasks completed",
        lat.len()
    );
    assert!(
        worst <= QUIET_BOUND,
        "worst quiet latency {worst:?} > {QUIET_BOUND:?}"
    );
    assert_eq!(quiet_ns.counters().snapshot().rejected_by_admission, 0);

    pool.close();
    for w in workers {
        w.abort();
    }
    for f in feeders {
        f.abort();
    }
}
