//! `max_concurrent_tasks` holds per tenant across runtime instances: three
//! schedulers on their own connections (three instances) share the tenant's
//! cluster-wide task slots, at the scheduler level and through three task
//! workers, against a real nats-server with JetStream.

// Test code: a failed set-up step should abort the test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_runtime::dispatch::{DispatchOptions, Dispatcher, Task, TaskOutcome, WorkerOptions};
use agent_runtime::scheduler::{
    RateBucket, Scheduler, SchedulerConfig, SchedulerErrorKind, SlotBucket, TenantScheduler,
};
use agent_runtime::tiers::{Quotas, Tier};
use async_nats::jetstream;
use bytes::Bytes;
use nats_harness::Server;
use tenant_bus::admission::RejectReason;
use tenant_bus::{AgentId, CredentialBundle, MasterSecret, TenantId, TenantNamespace};

const CAP: u64 = 2;

/// Three instances' views of tenant `acme` (cap 2 running tasks).
async fn instances(server: &Server) -> Vec<Arc<TenantScheduler>> {
    let mut q = Quotas::for_tier(Tier::Free);
    q.max_concurrent_tasks = CAP;
    let mut out = Vec::new();
    for _ in 0..3 {
        let js = jetstream::new(server.raw_client().await);
        let sched = Scheduler::connect(
            &js,
            SchedulerConfig::default(),
            &RateBucket::default(),
            &SlotBucket::default(),
        )
        .await
        .unwrap();
        // The scheduler must outlive its tenant's use: leak it for the test.
        let sched: &'static Scheduler = Box::leak(Box::new(sched));
        out.push(sched.tenant(&TenantId::new("acme").unwrap(), &q).unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_hold_at_most_the_cap_together() {
    let server = Server::jetstream();
    let tenants = instances(&server).await;
    // Every instance tries three at once: 9 callers, a cap of 2.
    let mut calls = Vec::new();
    for t in &tenants {
        for _ in 0..3 {
            let t = t.clone();
            calls.push(tokio::spawn(async move { t.acquire_task().await }));
        }
    }
    let mut held = Vec::new();
    for c in calls {
        match c.await.unwrap() {
            Ok(g) => {
                assert!(g.is_cluster_wide());
                held.push(g)
            }
            // Refused by the cluster-wide slots (Concurrency), or, on a busy
            // machine, by the instance's own queue while its two local permit
            // holders were still asking the server (WaitTimeout): both are
            // the cap holding.
            Err(e) => match e.kind() {
                SchedulerErrorKind::Rejected(r) => assert!(
                    matches!(
                        r.reason,
                        RejectReason::Concurrency | RejectReason::WaitTimeout
                    ),
                    "{r:?}"
                ),
                other => panic!("unexpected {other:?}"),
            },
        }
    }
    assert_eq!(
        held.len() as u64,
        CAP,
        "exactly the cap across three instances"
    );
    // A release on one instance lets another take it.
    held.pop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = None;
    for t in &tenants {
        if let Ok(g) = t.acquire_task().await {
            again = Some(g);
            break;
        }
    }
    assert!(again.is_some(), "the released slot is free cluster-wide");
    for t in &tenants {
        assert!(t.try_acquire_task().await.is_err(), "full again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_on_three_instances_never_run_more_than_the_cap() {
    let server = Server::jetstream();
    let tenants = instances(&server).await;
    let master = MasterSecret::generate().unwrap();
    let t = TenantId::new("acme").unwrap();
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    let mut dispatchers = Vec::new();
    for (i, sched) in tenants.iter().enumerate() {
        let bundle = CredentialBundle {
            url: server.url(),
            tenant: t.clone(),
            agent: AgentId::new(&format!("w{i}")).unwrap(),
            creds: None,
            keys: master.key_set(&t, [1], 1).unwrap(),
            placement: Default::default(),
        };
        let ns = TenantNamespace::connect(&bundle).await.unwrap();
        let options = DispatchOptions::new()
            .ack_wait(Duration::from_secs(5))
            .result_poll(Duration::from_millis(100))
            .scheduler(sched.clone());
        let d = Dispatcher::new(&ns, options).await.unwrap();
        let (running, peak) = (running.clone(), peak.clone());
        workers.push(
            d.worker(
                "slow",
                move |task: Task| {
                    let (running, peak) = (running.clone(), peak.clone());
                    async move {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(150)).await;
                        running.fetch_sub(1, Ordering::SeqCst);
                        Ok::<Bytes, String>(task.payload)
                    }
                },
                WorkerOptions::new().concurrency(4),
            )
            .await
            .unwrap(),
        );
        dispatchers.push((d, ns));
    }
    let (d, _) = &dispatchers[0];
    let mut handles = Vec::new();
    for i in 0..12 {
        handles.push(d.dispatch("slow", format!("t{i}")).await.unwrap());
    }
    for mut h in handles {
        let outcome = h.wait(Duration::from_secs(30)).await.unwrap();
        assert!(matches!(outcome, TaskOutcome::Completed(_)), "{outcome:?}");
    }
    let peak = peak.load(Ordering::SeqCst);
    assert!(
        peak <= CAP as usize,
        "{peak} tasks ran at once against a cap of {CAP}"
    );
    assert!(peak >= 1);
}
