//! The synchronous message-admission check with 10, 1,000 and 100,000 tenants.
//!
//! Two cases per size:
//! - `one_tenant`: the check on one tenant's `Arc<dyn Admission>` while N tenants
//!   exist (what a namespace does): must be flat in N.
//! - `round_robin`: the check cycling over every tenant's admission, so the state of
//!   each check is cold in cache at large N (the worst case of the same code);
//!   `round_robin_floor` is the same access pattern doing only a clock read and an
//!   atomic increment and decrement of each tenant's reference count: what any
//!   atomic, time-windowed per-tenant check pays when the tenant's state is cold
//!   (the clock read orders the pipeline, so the misses of consecutive checks do
//!   not overlap).
//!
//! Budgets are large and batches are 2^27 tokens, so all but one in a million
//! checks take the synchronous path; the rare refill (in-process ledger) is run to
//! completion and amortised into the figure. `per_tenant_memory` prints the resident memory growth per
//! idle tenant.

// Set-up failures abort the benchmark, as in tests.
#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use agent_runtime::scheduler::{Scheduler, SchedulerConfig, TenantScheduler};
use agent_runtime::tiers::{Quotas, Tier};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tenant_bus::admission::{Admission, Admit};
use tenant_bus::TenantId;

fn quotas() -> Quotas {
    let mut q = Quotas::for_tier(Tier::Enterprise);
    q.messages_per_window = u64::MAX / 4;
    q.bytes_per_window = u64::MAX / 4;
    q.window_ms = 3_600_000;
    q
}

fn config() -> SchedulerConfig {
    let mut c = SchedulerConfig::default().instances(1);
    // Large batches so the measurement never leases.
    c.message_batch.max_batch = 1 << 27;
    c.byte_batch.max_batch = 1 << 27;
    c
}

fn build(n: usize) -> (Scheduler, Vec<Arc<TenantScheduler>>) {
    let sched = Scheduler::local(config());
    let q = quotas();
    let tenants = (0..n)
        .map(|i| {
            let id = TenantId::new(&format!("t{i}")).expect("valid id");
            sched.tenant(&id, &q).expect("tenant")
        })
        .collect();
    (sched, tenants)
}

fn warm(rt: &tokio::runtime::Runtime, t: &TenantScheduler) {
    rt.block_on(async {
        t.admit(128).await.expect("admitted");
    });
}

/// One check; the rare refill (every 2^27 bytes = 1M messages of 128 B) is run to
/// completion, so its cost is amortised into the figure.
#[inline]
fn check(rt: &tokio::runtime::Runtime, adm: &dyn Admission) {
    match adm.admit_message(black_box(128)) {
        Admit::Now => {}
        Admit::Wait(f) => rt.block_on(f).expect("refilled"),
        Admit::Rejected(r) => panic!("rejected: {r}"),
    }
}

fn admission(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("admit_message");
    group.measurement_time(Duration::from_secs(3));
    for n in [10usize, 1_000, 100_000] {
        let (_sched, tenants) = build(n);
        for t in &tenants {
            warm(&rt, t);
        }
        let one: Arc<dyn Admission> = tenants[n / 2].message_admission();
        group.bench_with_input(BenchmarkId::new("one_tenant", n), &n, |b, _| {
            b.iter(|| check(&rt, one.as_ref()))
        });
        let all: Vec<Arc<dyn Admission>> = tenants.iter().map(|t| t.message_admission()).collect();
        // The floor of the round robin: the same access pattern, with one clock read
        // and one atomic read-modify-write pair on each tenant's gate allocation
        // (cloning and dropping the handle) instead of the check.
        let mut i = 0usize;
        group.bench_with_input(BenchmarkId::new("round_robin_floor", n), &n, |b, _| {
            b.iter(|| {
                black_box(std::time::SystemTime::now());
                i = (i + 7919) % all.len();
                drop(black_box(all[i].clone()))
            })
        });
        group.bench_with_input(BenchmarkId::new("round_robin", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 7919) % all.len();
                check(&rt, all[i].as_ref())
            })
        });
    }
    group.finish();
}

fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn per_tenant_memory(_c: &mut Criterion) {
    const N: usize = 100_000;
    let ids: Vec<TenantId> = (0..N)
        .map(|i| TenantId::new(&format!("m{i}")).expect("valid id"))
        .collect();
    let q = quotas();
    let before = rss_bytes();
    let sched = Scheduler::local(config());
    for id in &ids {
        black_box(sched.tenant(id, &q).expect("tenant"));
    }
    let after = rss_bytes();
    println!(
        "per_tenant_memory: inline sizes: TenantScheduler {} B, MessageGate {} B",
        std::mem::size_of::<TenantScheduler>(),
        std::mem::size_of::<agent_runtime::scheduler::MessageGate>()
    );
    if let (Some(b), Some(a)) = (before, after) {
        println!(
            "per_tenant_memory: {} bytes per idle tenant ({} tenants, resident growth)",
            a.saturating_sub(b) / N as u64,
            N
        );
    }
    black_box(&sched);
}

// Memory first, while the process heap is fresh.
criterion_group!(benches, per_tenant_memory, admission);
criterion_main!(benches);
