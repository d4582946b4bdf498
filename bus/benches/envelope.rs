//! Micro-benchmarks of the envelope and key paths: sealing, opening, full
//! verification (what a subscription does per message), header decoding, and key
//! derivation and first use.

// Set-up failures abort the benchmark, as in tests.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tenant_bus::envelope::{decode_header, now_ms, open, Sealer};
use tenant_bus::replay::{ReplayGuard, ReplayOptions};
use tenant_bus::verify::{Counters, Freshness, Verifier};
use tenant_bus::{AgentId, MasterSecret, TenantId};

const SUBJECT: &str = "tenant.acme.orders.created";
const SIZES: [usize; 3] = [128, 1024, 16 * 1024];

fn sealer() -> Sealer {
    let tenant = TenantId::new("acme").unwrap();
    let keys = MasterSecret::from_bytes(&[7u8; 32])
        .unwrap()
        .key_set(&tenant, [1], 1)
        .unwrap();
    Sealer::new(Arc::new(keys), Some(AgentId::new("planner").unwrap())).unwrap()
}

fn envelope(c: &mut Criterion) {
    let s = sealer();
    let mut group = c.benchmark_group("envelope");
    for size in SIZES {
        let payload = vec![0x5au8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("seal", size), &payload, |b, p| {
            b.iter(|| s.seal(black_box(SUBJECT), None, black_box(p)).unwrap())
        });
        let (_, body) = s.seal(SUBJECT, None, &payload).unwrap();
        group.bench_with_input(BenchmarkId::new("open", size), &body, |b, body| {
            b.iter(|| open(&s.keys(), black_box(SUBJECT), None, black_box(body)).unwrap())
        });
        // Full verification as a subscription runs it: a fresh message id each
        // time (pre-sealed), so the anti-replay check takes its normal path.
        let verifier = Verifier::new(
            s.keys().clone(),
            Freshness::default(),
            Arc::new(Counters::default()),
        );
        let bodies: Vec<_> = (0..4096)
            .map(|_| s.seal(SUBJECT, None, &payload).unwrap().1)
            .collect();
        group.bench_with_input(BenchmarkId::new("verify", size), &bodies, |b, bodies| {
            let mut guard = ReplayGuard::new(ReplayOptions {
                retain_ms: 330_000,
                max_senders: 16,
            });
            let mut i = 0usize;
            b.iter(|| {
                i += 1;
                if i.is_multiple_of(bodies.len()) {
                    // Every message id was seen: start a fresh window.
                    guard = ReplayGuard::new(ReplayOptions {
                        retain_ms: 330_000,
                        max_senders: 16,
                    });
                }
                let body = &bodies[i % bodies.len()];
                verifier
                    .verify(&mut guard, SUBJECT, None, body, now_ms(), None)
                    .unwrap()
            })
        });
    }
    let (_, body) = s.seal(SUBJECT, None, &[0u8; 128]).unwrap();
    group.bench_function("decode_header", |b| {
        b.iter(|| decode_header(black_box(&body)).unwrap())
    });
    group.finish();
}

fn keys(c: &mut Criterion) {
    let master = MasterSecret::from_bytes(&[7u8; 32]).unwrap();
    let tenant = TenantId::new("acme").unwrap();
    let mut group = c.benchmark_group("keys");
    group.bench_function("derive_key_set", |b| {
        b.iter(|| master.key_set(black_box(&tenant), [1], 1).unwrap())
    });
    // First use builds the AES key schedule: the cost an idle tenant defers.
    group.bench_function("derive_and_first_seal", |b| {
        b.iter(|| {
            let keys = master.key_set(&tenant, [1], 1).unwrap();
            Sealer::new(Arc::new(keys), None)
                .unwrap()
                .seal(SUBJECT, None, b"x")
                .unwrap()
        })
    });
    group.bench_function("sealer_new", |b| {
        let keys = Arc::new(master.key_set(&tenant, [1], 1).unwrap());
        b.iter(|| Sealer::new(keys.clone(), None).unwrap())
    });
    group.finish();
}

criterion_group!(benches, envelope, keys);
criterion_main!(benches);
