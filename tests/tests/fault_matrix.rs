//! The task-dispatch fault matrix on three loopback nodes (issue 13, item 2).
//!
//! Each scenario runs a steady stream of tasks through the real runtime
//! (dispatcher, a worker with a JetStream scheduler holding cluster-wide task
//! slots) while one node is killed (SIGKILL, no graceful shutdown) for an
//! outage and then started again:
//!
//! | target | the node killed |
//! |---|---|
//! | `stream` | the leader of the `TASKS` stream |
//! | `done` | the leader of the done bucket (`KV_TASKS_DONE`) |
//! | `slots` | the leader of the task-slot bucket (the scheduler's leases) |
//! | `worker` | the node the worker's connection is on |
//! | `registry` | the leader of the tenant registry (`KV_agentbus-tenants`) |
//!
//! The runtime runs as an instance does: the tenant's record is in the
//! registry (created with the scenario's replicas), a [`RegistryWatcher`]
//! gates every dispatch and every task the worker runs ([`TenantGate`]), and a
//! [`RegistryFollower`] applies the record to the scheduler. In every
//! scenario a new runtime instance also starts while the node is down (opens
//! the registry, loads a watcher that sees the tenant active, connects a
//! scheduler, takes one of the tenant's agent slots, opens the tenant's task
//! stream and done bucket and starts a worker on the existing consumer): with
//! R3 it must succeed within [`NEW_INSTANCE_WITHIN`] of the kill; with R1 it
//! may fail, but only as unavailable, never as a refusal (before issue 13 it
//! failed as "quota exhausted"). In every scenario a change to the tenant's record written
//! after the restart must reach the running watcher within
//! [`CHANGE_SEEN_WITHIN`]: its watch outlived the node's loss.
//!
//! Every task's handler records that it ran. After the node is back, the run
//! waits until every task the stream acknowledged has a recorded outcome, and
//! counts: **lost** (acknowledged, never completed), **dead-lettered** (the
//! handler never fails, so any dead letter is an outage blamed on a task) and
//! **run twice** (a handler that ran more than once for one task id), plus
//! the longest pause between two acknowledged submissions (how long the
//! outage stopped new work) and how long after the restart the last
//! acknowledged task was done.
//!
//! Asserted: with R3, 0 lost, 0 dead-lettered, run twice at most the worker's
//! concurrency (only tasks in flight at the kill can run again: a handler that
//! ended just before its worker lost the node whose done record was not yet
//! durable). With R1, 0 lost and 0 dead-lettered once the node is back (the
//! tasks on the killed node wait for it: unavailability, not loss).
//!
//! `fault_matrix_short` (in `scripts/test` and CI) runs R3 against every target
//! and R1 against the stream leader, with 20 s outages. `fault_matrix_full`
//! (ignored by default; `scripts/fault-matrix`) runs every target with R1 and
//! R3 and outages of 20 s and 200 s, and prints the table.

// Test code: a failed set-up step should abort the test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_runtime::dispatch::{
    DispatchError, DispatchErrorKind, DispatchOptions, Dispatcher, Task, TaskOutcome, WorkerOptions,
};
use agent_runtime::registry::{
    Registry, RegistryError, RegistryErrorKind, RegistryOptions, RegistryWatcher, SettingsPatch,
    Status, TenantGate, TenantSettings, REGISTRY_BUCKET,
};
use agent_runtime::scheduler::{
    RegistryFollower, Scheduler, SchedulerConfig, SchedulerError, SchedulerErrorKind, SLOT_BUCKET,
};
use agent_runtime::tiers::Tier;
use async_nats::jetstream;
use bytes::Bytes;
use nats_harness::{cluster, ClusterOptions, LocalCluster};
use tenant_bus::{AgentId, CredentialBundle, MasterSecret, TenantId, TenantNamespace};

/// The worker's concurrency: the bound on tasks that can run twice.
const CONCURRENCY: usize = 8;
/// Tasks submitted per second while a scenario runs.
const RATE: u64 = 100;
/// How soon after a node's kill a new runtime instance must start, with R3
/// (leader elections took up to about 7 s in these runs).
const NEW_INSTANCE_WITHIN: Duration = Duration::from_secs(15);
/// How soon a change to the tenant's record must reach the running watcher.
const CHANGE_SEEN_WITHIN: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Stream,
    Done,
    Slots,
    Worker,
    Registry,
}

impl Target {
    const ALL: [Target; 5] = [
        Target::Stream,
        Target::Done,
        Target::Slots,
        Target::Worker,
        Target::Registry,
    ];

    fn name(self) -> &'static str {
        match self {
            Target::Stream => "stream",
            Target::Done => "done",
            Target::Slots => "slots",
            Target::Worker => "worker",
            Target::Registry => "registry",
        }
    }
}

#[derive(Debug)]
struct Outcome {
    target: Target,
    replicas: usize,
    outage: Duration,
    killed: String,
    acked: usize,
    lost: usize,
    dead: u64,
    twice: usize,
    outage_waits: u64,
    recovery: Duration,
    /// The longest time between two acknowledged submissions: how long the
    /// outage stopped new work from being accepted.
    pause: Duration,
    /// When a new runtime instance started after the kill, or its last
    /// failure ("unavailable: ..." or "refused: ...").
    new_instance: Result<Duration, String>,
    /// How long a change to the tenant's record written after the restart
    /// took to reach the running watcher; `None`: not within
    /// [`CHANGE_SEEN_WITHIN`].
    change_seen: Option<Duration>,
}

impl Outcome {
    fn row(&self) -> String {
        format!(
            "| {} | R{} | {} s | {} | {} | {} | {} | {} | {} | {:.1} s | {:.1} s | {} | {} |",
            self.target.name(),
            self.replicas,
            self.outage.as_secs(),
            self.killed,
            self.acked,
            self.lost,
            self.dead,
            self.twice,
            self.outage_waits,
            self.pause.as_secs_f64(),
            self.recovery.as_secs_f64(),
            match &self.new_instance {
                Ok(d) => format!("{:.1} s", d.as_secs_f64()),
                Err(e) => format!("no ({e})"),
            },
            match self.change_seen {
                Some(d) => format!("{:.2} s", d.as_secs_f64()),
                None => "no".to_string(),
            }
        )
    }

    /// What the issue requires of this scenario; `Err` names what failed.
    fn check(&self) -> Result<(), String> {
        let mut bad = Vec::new();
        if self.acked == 0 {
            bad.push("no task was acknowledged at all".to_string());
        }
        if self.lost > 0 {
            bad.push(format!("{} acknowledged tasks lost", self.lost));
        }
        if self.dead > 0 {
            bad.push(format!("{} tasks dead-lettered by an outage", self.dead));
        }
        if self.replicas >= 3 && self.twice > CONCURRENCY {
            bad.push(format!(
                "{} tasks ran twice (bound: the worker's concurrency, {CONCURRENCY})",
                self.twice
            ));
        }
        match &self.new_instance {
            Err(e) if self.replicas >= 3 => bad.push(format!(
                "a new runtime instance did not start within {NEW_INSTANCE_WITHIN:?} of the kill: {e}"
            )),
            Err(e) if !e.starts_with("unavailable") => bad.push(format!(
                "a new runtime instance was refused instead of told the cluster is unavailable: {e}"
            )),
            _ => {}
        }
        if self.change_seen.is_none() {
            bad.push(format!(
                "a change to the tenant's record after the restart did not reach the running watcher within {CHANGE_SEEN_WITHIN:?}"
            ));
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(format!("{}: {}", self.row(), bad.join("; ")))
        }
    }
}

/// The index of the node named `name` (`n1`, `n2`, ...).
fn node_index(c: &LocalCluster, name: &str) -> usize {
    (0..c.len())
        .find(|&i| c.node_name(i) == name)
        .unwrap_or_else(|| panic!("no node named {name}"))
}

/// The leader of `stream`, asked until the cluster has one (up to 10 s).
async fn leader(js: &jetstream::Context, stream: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut s) = js.get_stream(stream).await {
            if let Ok(info) = s.info().await {
                if let Some(l) = info.cluster.as_ref().and_then(|c| c.leader.clone()) {
                    return l;
                }
            }
        }
        assert!(Instant::now() < deadline, "{stream} has no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts what a new runtime instance needs, again and again until it works
/// or [`NEW_INSTANCE_WITHIN`] after `killed_at`: `Ok` is when it worked,
/// counted from the kill; `Err` the last failure.
async fn new_instance(probe: Probe, killed_at: Instant) -> Result<Duration, String> {
    let deadline = killed_at + NEW_INSTANCE_WITHIN;
    let mut last = "unavailable: not tried".to_string();
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, start_instance(&probe)).await {
            Ok(Ok(())) => return Ok(killed_at.elapsed()),
            Ok(Err(e)) => {
                eprintln!(
                    "new instance, {:.1} s after the kill: {e}",
                    killed_at.elapsed().as_secs_f64()
                );
                last = e
            }
            Err(_) => {
                last = format!("unavailable: still starting {NEW_INSTANCE_WITHIN:?} after the kill")
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(last)
}

/// What a new runtime instance of the scenario needs.
#[derive(Clone)]
struct Probe {
    urls: String,
    replicas: usize,
    tenant: TenantId,
    /// The credentials of the instance's agent.
    bundle: CredentialBundle,
    /// The handler's record of runs, shared with the scenario's worker.
    runs: Runs,
}

type Runs = Arc<Mutex<HashMap<String, u32>>>;

/// The scenario's handler: records the run, answers with the payload.
async fn job(runs: Runs, task: Task) -> Result<Bytes, String> {
    tokio::time::sleep(Duration::from_millis(20)).await;
    let id = String::from_utf8_lossy(&task.payload).to_string();
    *runs.lock().unwrap().entry(id).or_default() += 1;
    Ok(task.payload)
}

/// One start of a runtime instance: the registry bucket, a watcher that knows
/// the tenant is active, a scheduler on the rate and slot buckets, one of the
/// tenant's agent slots (given back), a dispatcher on the tenant's task
/// stream and done bucket, a worker on the existing consumer (stopped again).
/// A failure is "unavailable: ..." when the cluster could not answer,
/// "refused: ..." when something said no.
async fn start_instance(probe: &Probe) -> Result<(), String> {
    let Probe {
        urls,
        replicas,
        tenant,
        ..
    } = probe;
    let replicas = *replicas;
    let registry_err = |e: RegistryError| match e.kind() {
        RegistryErrorKind::Unavailable => format!("unavailable: {e}"),
        _ => format!("refused: {e}"),
    };
    let scheduler_err = |e: SchedulerError| match e.kind() {
        SchedulerErrorKind::Store => format!("unavailable: {e}"),
        _ => format!("refused: {e}"),
    };
    let client = async_nats::ConnectOptions::new()
        .connect(urls.split(',').collect::<Vec<_>>())
        .await
        .map_err(|e| format!("unavailable: connect: {e}"))?;
    let registry = Registry::open_with(client.clone(), RegistryOptions::new().replicas(replicas))
        .await
        .map_err(registry_err)?;
    let watcher = RegistryWatcher::start(&registry)
        .await
        .map_err(registry_err)?;
    let record = watcher
        .get(tenant)
        .ok_or_else(|| format!("refused: the registry does not know {tenant}"))?;
    if record.status != Status::Active {
        return Err(format!("refused: {tenant} is {:?}", record.status));
    }
    // As an instance does: the scheduler's buckets with the registry's replicas.
    let sched = Scheduler::connect_for_deployment(
        &jetstream::new(client),
        SchedulerConfig::default(),
        &registry,
    )
    .await
    .map_err(scheduler_err)?;
    let lease = sched
        .tenant(tenant, &record.quotas())
        .map_err(scheduler_err)?
        .acquire_agent_slot(&AgentId::new("probe").unwrap())
        .await
        .map_err(scheduler_err)?;
    lease.release().await.map_err(scheduler_err)?;
    let dispatch_err = |e: DispatchError| match e.kind() {
        DispatchErrorKind::Unavailable => format!("unavailable: {e}"),
        _ => format!("refused: {e}"),
    };
    let ns = TenantNamespace::connect(&probe.bundle)
        .await
        .map_err(|e| format!("unavailable: connect: {e}"))?;
    // The scenario's options: the consumer's ack wait is 3 s.
    let options = DispatchOptions::new()
        .replicas(replicas)
        .ack_wait(Duration::from_secs(3))
        .gate(TenantGate::new(Arc::new(watcher), tenant.clone()));
    let d = Dispatcher::new(&ns, options).await.map_err(dispatch_err)?;
    let runs = probe.runs.clone();
    let worker = d
        .worker(
            "job",
            move |task: Task| job(runs.clone(), task),
            WorkerOptions::new().concurrency(1).prefetch(1),
        )
        .await
        .map_err(dispatch_err)?;
    worker.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

/// Renames the tenant (retrying the write for up to 10 s while the cluster
/// settles) and returns how long the running watcher took to see it, if it
/// did within [`CHANGE_SEEN_WITHIN`].
async fn change_reaches(
    registry: &Registry,
    watcher: &RegistryWatcher,
    tenant: &TenantId,
) -> Option<Duration> {
    let name = "Acme after the outage";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match registry
            .update(tenant, &SettingsPatch::new().name(name))
            .await
        {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("registry write after the restart: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("the registry took no write 10 s after the restart: {e}"),
        }
    }
    let written = Instant::now();
    while written.elapsed() < CHANGE_SEEN_WITHIN {
        if watcher.get(tenant).is_some_and(|r| r.name == name) {
            return Some(written.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

async fn scenario(target: Target, replicas: usize, outage: Duration) -> Outcome {
    let mut c = cluster(ClusterOptions::new().nodes(3)).await;
    let urls = c.urls();
    let master = MasterSecret::generate().unwrap();
    let tenant = TenantId::new("acme").unwrap();
    let bundle = |agent: &str| CredentialBundle {
        url: urls.clone(),
        tenant: tenant.clone(),
        agent: AgentId::new(agent).unwrap(),
        creds: None,
        keys: master.key_set(&tenant, [1], 1).unwrap(),
        placement: Default::default(),
    };
    let observer = async_nats::ConnectOptions::new()
        .connect(urls.split(',').collect::<Vec<_>>())
        .await
        .unwrap();
    let js = jetstream::new(observer.clone());
    nats_harness::jetstream_ready(&js, Duration::from_secs(20)).await;

    // The tenant's record, in a registry with the scenario's replicas; a
    // watcher follows it for the runtime, as on every instance.
    let registry = Registry::open_with(observer.clone(), RegistryOptions::new().replicas(replicas))
        .await
        .unwrap();
    // A generous task cap, so the cluster-wide slots are exercised but never
    // the limit.
    let record = registry
        .create(
            tenant.as_str(),
            "Acme",
            Tier::Enterprise,
            TenantSettings::new().quota("max_concurrent_tasks", "64"),
        )
        .await
        .unwrap();
    let watcher = Arc::new(RegistryWatcher::start(&registry).await.unwrap());
    let gate = TenantGate::new(watcher.clone(), tenant.clone());

    // The runtime: a scheduler with cluster-wide task slots following the
    // registry, a worker and a dispatcher both gated by it.
    let worker_ns = TenantNamespace::connect(&bundle("worker")).await.unwrap();
    let sched =
        nats_harness::replicated_scheduler(&jetstream::new(worker_ns.nats().clone()), replicas)
            .await
            .unwrap();
    let sched = Arc::new(sched);
    let tenant_sched = sched.tenant(&tenant, &record.quotas()).unwrap();
    let _follower = RegistryFollower::start(&sched, &watcher);
    let options = || {
        DispatchOptions::new()
            .replicas(replicas)
            .ack_wait(Duration::from_secs(3))
            .result_poll(Duration::from_millis(200))
            .gate(gate.clone())
    };
    let worker_d = Dispatcher::new(&worker_ns, options().scheduler(tenant_sched))
        .await
        .unwrap();
    let runs: Runs = Arc::default();
    let worker = {
        let runs = runs.clone();
        worker_d
            .worker(
                "job",
                move |task: Task| job(runs.clone(), task),
                WorkerOptions::new().concurrency(CONCURRENCY),
            )
            .await
            .unwrap()
    };
    let producer_ns = TenantNamespace::connect(&bundle("producer")).await.unwrap();
    let producer = Dispatcher::new(&producer_ns, options()).await.unwrap();

    // Producing: RATE tasks a second until told to stop; every acknowledged
    // submission is remembered by its id.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<(String, tenant_bus::MessageId)>>> = Arc::default();
    let pause = Arc::new(Mutex::new(Duration::ZERO));
    let submitted = Arc::new(AtomicU64::new(0));
    let producing = {
        let (stop, acked, submitted, producer, pause) = (
            stop.clone(),
            acked.clone(),
            submitted.clone(),
            producer.clone(),
            pause.clone(),
        );
        tokio::spawn(async move {
            let mut last_ack = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let name = format!("t{i}");
                i += 1;
                let Ok(task) = producer.seal("job", name.as_bytes()) else {
                    continue;
                };
                submitted.fetch_add(1, Ordering::Relaxed);
                // A bounded wait: during an outage a publish may hang until
                // the stream has a leader again; that task is then not acked.
                let sent = tokio::time::timeout(Duration::from_secs(5), producer.submit(&task));
                if let Ok(Ok(_)) = sent.await {
                    acked.lock().unwrap().push((name, task.id()));
                    let mut p = pause.lock().unwrap();
                    *p = (*p).max(last_ack.elapsed());
                    last_ack = Instant::now();
                }
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed = match target {
        Target::Stream => leader(&js, producer.stream_name()).await,
        Target::Done => leader(&js, &format!("KV_{}", producer.done_bucket())).await,
        Target::Slots => leader(&js, &format!("KV_{SLOT_BUCKET}")).await,
        Target::Worker => worker_ns.nats().server_info().server_name.clone(),
        Target::Registry => leader(&js, &format!("KV_{REGISTRY_BUCKET}")).await,
    };
    let index = node_index(&c, &killed);
    c.kill_node(index).unwrap();
    let killed_at = Instant::now();
    // A runtime instance starting while the node is gone. It gives up
    // NEW_INSTANCE_WITHIN after the kill, before the node is back (outages
    // are at least 20 s), so it cannot succeed through the restart.
    let probe = tokio::spawn(new_instance(
        Probe {
            urls: urls.clone(),
            replicas,
            tenant: tenant.clone(),
            bundle: bundle("probe"),
            runs: runs.clone(),
        },
        killed_at,
    ));
    tokio::time::sleep(outage).await;
    let new_instance = probe.await.unwrap();
    c.start_node(index).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    producing.await.unwrap();
    let change_seen = change_reaches(&registry, &watcher, &tenant).await;

    // Every acknowledged task must complete; wait for the stragglers the
    // outage held back.
    let acked = acked.lock().unwrap().clone();
    let back = Instant::now();
    let deadline = back + Duration::from_secs(60) + outage / 2;
    let mut pending: Vec<(String, tenant_bus::MessageId)> = acked.clone();
    while !pending.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for (name, id) in pending {
            match producer.outcome(&id).await {
                Ok(Some(TaskOutcome::Completed(_))) => {}
                _ => still.push((name, id)),
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let recovery = back.elapsed();
    let runs = runs.lock().unwrap().clone();
    let twice = runs.values().filter(|&&n| n >= 2).count();
    let stats = worker.stats().clone();
    let outcome = Outcome {
        target,
        replicas,
        outage,
        killed,
        acked: acked.len(),
        lost: pending.len(),
        dead: stats.dead_lettered(),
        twice,
        outage_waits: stats.outage_waits(),
        recovery,
        pause: *pause.lock().unwrap(),
        new_instance,
        change_seen,
    };
    eprintln!("{}", outcome.row());
    if outcome.lost > 0 {
        eprintln!(
            "lost (first 10): {:?}; submitted {}",
            pending.iter().take(10).map(|p| &p.0).collect::<Vec<_>>(),
            submitted.load(Ordering::Relaxed)
        );
    }
    worker.shutdown(Duration::from_secs(5)).await;
    outcome
}

const HEADER: &str = "| target | replicas | outage | node killed | acked | lost | dead-lettered | run twice | outage waits | longest submit pause | last done after restart | new instance started after | registry change seen after |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|";

async fn matrix(cases: &[(Target, usize, Duration)]) {
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for &(target, replicas, outage) in cases {
        let outcome = scenario(target, replicas, outage).await;
        rows.push(outcome.row());
        if let Err(e) = outcome.check() {
            failures.push(e);
        }
    }
    eprintln!("{HEADER}\n{}", rows.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_short() {
    let outage = Duration::from_secs(20);
    let mut cases: Vec<(Target, usize, Duration)> =
        Target::ALL.iter().map(|&t| (t, 3, outage)).collect();
    cases.push((Target::Stream, 1, outage));
    matrix(&cases).await;
}

/// The targets named in `FAULT_MATRIX_TARGETS` (comma-separated, e.g.
/// `registry,stream`), or all of them.
fn selected_targets() -> Vec<Target> {
    let Ok(list) = std::env::var("FAULT_MATRIX_TARGETS") else {
        return Target::ALL.to_vec();
    };
    let names: Vec<&str> = list.split(',').map(str::trim).collect();
    for n in &names {
        assert!(
            Target::ALL.iter().any(|t| t.name() == *n),
            "FAULT_MATRIX_TARGETS: unknown target {n:?} (known: stream, done, slots, worker, registry)"
        );
    }
    Target::ALL
        .into_iter()
        .filter(|t| names.contains(&t.name()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "about 50 minutes: run by scripts/fault-matrix"]
async fn fault_matrix_full() {
    let mut cases = Vec::new();
    for outage in [Duration::from_secs(20), Duration::from_secs(200)] {
        for replicas in [3, 1] {
            for target in selected_targets() {
                cases.push((target, replicas, outage));
            }
        }
    }
    matrix(&cases).await;
}
