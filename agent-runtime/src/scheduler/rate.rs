//! Cluster-wide rate windows: messages or bytes per window, leased in batches.
//!
//! The budget of tenant `t` for window `w` (`w = now_ms / window_ms`, wall-clock
//! aligned) lives in one counter of a [`TokenLedger`]: the JetStream key-value key
//! `<t>.msgs.<w>` or `<t>.bytes.<w>` ([`KvLedger`](super::KvLedger)), holding how
//! many tokens all instances together have leased. An instance leases a batch with
//! compare-and-set (never past the cap) and then admits locally from the batch with
//! one atomic word, so the hot path never talks to NATS.
//!
//! # The bound
//!
//! With `K` instances and batch size `B`:
//! - **never over**: the ledger hands out at most `cap` tokens per window in total,
//!   and a token is admitted at most once, in the window it was leased for; so the
//!   messages (bytes) admitted per window, summed over the cluster, never exceed the
//!   cap, whatever the interleaving or failures.
//! - **under by at most `K * B`**: refills of one instance are serialised, and an
//!   instance leases only when its batch cannot pay for the message at hand, so at
//!   the end of a window each instance holds at most one unspent batch: when demand
//!   exceeds the cap, at least `cap - K * B` messages are admitted. For bytes a
//!   batch is topped up to the message at hand, so the slack is `K * (B + M)`, `M`
//!   the largest message. A crashed instance loses the rest of its batch for that
//!   window only, and so does a refill whose caller gave up while the lease was in
//!   flight (leased, never deposited): both can only under-admit.
//!
//! `B` is `clamp(cap / (4 * K), 1, max_batch)` with `K` the expected number of
//! instances ([`BatchPolicy`]): at most a quarter of the cap is ever stranded, and a
//! window costs each instance about `cap / (B * K)` key-value round trips.
//!
//! Local state is one `AtomicU64`: the window index (low 32 bits), a valid bit, an
//! exhausted bit (the cluster budget of that window is spent: refuse at once, retry
//! at the window boundary, no key-value traffic) and the unspent tokens (30 bits).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tenant_bus::admission::{RejectReason, Rejection};
use tenant_bus::TenantId;

use super::error::SchedulerError;
use super::layer::{Check, Cost, Layer, RefillFuture};

/// The largest single charge a window accepts (512 MiB; NATS payloads are smaller).
pub const MAX_COST: u64 = (1 << 29) - 1;

/// The largest batch ever leased (keeps the local count inside 30 bits).
pub const MAX_BATCH: u64 = 1 << 28;

/// How long a caller is told to wait after the key-value store failed.
const STORE_RETRY: Duration = Duration::from_millis(250);

/// What a window counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Dimension {
    /// One token per message.
    Messages,
    /// One token per payload byte.
    Bytes,
}

impl Dimension {
    /// The tokens a message of `bytes` bytes costs.
    #[inline]
    pub fn cost(self, bytes: u64) -> u64 {
        match self {
            Dimension::Messages => 1,
            Dimension::Bytes => bytes,
        }
    }

    /// The rejection reason when the budget is spent.
    pub fn reason(self) -> RejectReason {
        match self {
            Dimension::Messages => RejectReason::MessageRate,
            Dimension::Bytes => RejectReason::ByteRate,
        }
    }

    /// The key token (`msgs`, `bytes`).
    pub fn token(self) -> &'static str {
        match self {
            Dimension::Messages => "msgs",
            Dimension::Bytes => "bytes",
        }
    }
}

/// How large a batch an instance leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Expected number of instances sharing a tenant (`K`); default 4.
    pub instances: u32,
    /// Largest batch; default 1,024 for messages, 4 MiB for bytes.
    pub max_batch: u64,
}

impl BatchPolicy {
    /// The default policy for a dimension.
    pub fn for_dimension(dimension: Dimension) -> Self {
        Self {
            instances: 4,
            max_batch: match dimension {
                Dimension::Messages => 1024,
                Dimension::Bytes => 4 << 20,
            },
        }
    }

    /// The batch for a window cap: `clamp(cap / (4 * K), 1, max_batch)`.
    pub fn batch(&self, cap: u64) -> u64 {
        let k = u64::from(self.instances.max(1));
        let upper = self.max_batch.clamp(1, MAX_BATCH);
        (cap / (4 * k)).clamp(1, upper)
    }
}

/// One lease request to a [`TokenLedger`].
#[derive(Debug, Clone, Copy)]
pub struct LeaseRequest<'a> {
    /// The counter's scope: `<tenant>.<dimension>`.
    pub scope: &'a str,
    /// The window index (`now_ms / window_ms`).
    pub window: u64,
    /// Tokens wanted.
    pub want: u64,
    /// Fewest tokens worth taking: if fewer are left, take none.
    pub min: u64,
    /// The window's cluster-wide cap.
    pub cap: u64,
}

/// What a lease obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Tokens granted: 0, or between `min` and `want`.
    pub granted: u64,
    /// Tokens left in the window after this lease.
    pub left: u64,
}

/// What a ledger remembers between leases of one scope (the key-value revision),
/// so a lease by the only active instance is one round trip.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaseHint {
    /// The window of the last lease.
    pub window: u64,
    /// The counter value after it.
    pub leased: u64,
    /// The key-value revision after it (0: unknown).
    pub revision: u64,
}

/// A future returned by a ledger.
pub type LeaseFuture<'a> = Pin<Box<dyn Future<Output = Result<Lease, SchedulerError>> + Send + 'a>>;

/// Where window budgets are counted: cluster-wide in JetStream
/// ([`KvLedger`](super::KvLedger)) or in this process ([`MemoryLedger`]).
pub trait TokenLedger: Send + Sync + 'static {
    /// Atomically takes up to `want` tokens (at least `min`, or none) of the window
    /// without passing `cap`.
    fn lease<'a>(&'a self, request: LeaseRequest<'a>, hint: &'a mut LeaseHint) -> LeaseFuture<'a>;
}

/// A ledger in this process only (single-instance deployments and tests).
#[derive(Debug, Default)]
pub struct MemoryLedger {
    // scope -> (window, leased): only the newest window of a scope is kept.
    counters: std::sync::Mutex<std::collections::HashMap<String, (u64, u64)>>,
}

impl MemoryLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens leased so far in `window` of `scope`.
    pub fn leased(&self, scope: &str, window: u64) -> u64 {
        let map = self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match map.get(scope) {
            Some(&(w, n)) if w == window => n,
            _ => 0,
        }
    }

    fn lease_now(&self, r: LeaseRequest<'_>) -> Lease {
        let mut map = self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = map.entry(r.scope.to_owned()).or_insert((r.window, 0));
        if entry.0 < r.window {
            *entry = (r.window, 0);
        } else if entry.0 > r.window {
            // A late request for a window that is over.
            return Lease {
                granted: 0,
                left: 0,
            };
        }
        let left = r.cap.saturating_sub(entry.1);
        if left < r.min.max(1) {
            return Lease { granted: 0, left };
        }
        let granted = r.want.min(left);
        entry.1 += granted;
        Lease {
            granted,
            left: left - granted,
        }
    }
}

impl TokenLedger for MemoryLedger {
    fn lease<'a>(&'a self, request: LeaseRequest<'a>, _hint: &'a mut LeaseHint) -> LeaseFuture<'a> {
        let lease = self.lease_now(request);
        Box::pin(std::future::ready(Ok(lease)))
    }
}

const VALID: u64 = 1 << 31;
const EXHAUSTED: u64 = 1 << 30;
const REM_MASK: u64 = (1 << 30) - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Local {
    valid: bool,
    epoch: u32,
    exhausted: bool,
    remaining: u64,
}

impl Local {
    #[inline]
    fn unpack(s: u64) -> Self {
        Self {
            valid: s & VALID != 0,
            epoch: (s >> 32) as u32,
            exhausted: s & EXHAUSTED != 0,
            remaining: s & REM_MASK,
        }
    }

    #[inline]
    fn pack(self) -> u64 {
        (u64::from(self.epoch) << 32)
            | if self.valid { VALID } else { 0 }
            | if self.exhausted { EXHAUSTED } else { 0 }
            | self.remaining.min(REM_MASK)
    }

    #[inline]
    fn is(&self, epoch: u32) -> bool {
        self.valid && self.epoch == epoch
    }
}

/// `a` is a later window than `b` (modulo 2^32).
fn is_newer(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// One tenant's budget of one [`Dimension`] per window, leased from a
/// [`TokenLedger`] (see the module docs for the bound).
///
/// The fields the hot path reads (16 bytes) are inline and first (`repr(C)`);
/// everything the refill needs is behind one box, so that a tenant's whole
/// message gate fits one cache line (see [`Gate`](super::Gate)).
#[repr(C)]
pub struct RateWindow {
    state: AtomicU64,
    window_ms: AtomicU32,
    dimension: Dimension,
    cold: Box<Cold>,
}

/// What only refills and quota changes touch.
struct Cold {
    cap: AtomicU64,
    policy: BatchPolicy,
    tenant: TenantId,
    ledger: Arc<dyn TokenLedger>,
    // Serialises this instance's refills (FIFO) and keeps the ledger's hint.
    refill: tokio::sync::Mutex<LeaseHint>,
}

impl RateWindow {
    /// A window of `cap` tokens every `window` for `tenant`, leased from `ledger`.
    pub fn new(
        tenant: TenantId,
        dimension: Dimension,
        cap: u64,
        window: Duration,
        policy: BatchPolicy,
        ledger: Arc<dyn TokenLedger>,
    ) -> Self {
        Self {
            state: AtomicU64::new(0),
            window_ms: AtomicU32::new(duration_ms(window)),
            dimension,
            cold: Box::new(Cold {
                cap: AtomicU64::new(cap),
                policy,
                tenant,
                ledger,
                refill: tokio::sync::Mutex::new(LeaseHint::default()),
            }),
        }
    }

    /// Changes the cap (takes effect at the next lease).
    pub fn set_cap(&self, cap: u64) {
        self.cold.cap.store(cap, Ordering::Relaxed);
    }

    /// Changes the window length.
    pub fn set_window(&self, window: Duration) {
        self.window_ms.store(duration_ms(window), Ordering::Relaxed);
    }

    /// The cap per window.
    pub fn cap(&self) -> u64 {
        self.cold.cap.load(Ordering::Relaxed)
    }

    /// The window length in milliseconds.
    pub fn window_ms(&self) -> u64 {
        u64::from(self.window_ms.load(Ordering::Relaxed))
    }

    /// What this window counts.
    pub fn dimension(&self) -> Dimension {
        self.dimension
    }

    /// The batch size leased at the current cap.
    pub fn batch(&self) -> u64 {
        self.cold.policy.batch(self.cap())
    }

    /// The window index at `now_ms`.
    pub fn window_index(&self, now_ms: u64) -> u64 {
        now_ms / self.window_ms()
    }

    /// Unspent leased tokens held locally for the window at `now_ms`.
    pub fn local_tokens(&self, now_ms: u64) -> u64 {
        let l = Local::unpack(self.state.load(Ordering::Acquire));
        if l.is(self.window_index(now_ms) as u32) {
            l.remaining
        } else {
            0
        }
    }

    fn until_boundary(&self, now_ms: u64) -> Duration {
        let w = self.window_ms();
        Duration::from_millis(w - now_ms % w)
    }

    fn scope(&self) -> String {
        format!("{}.{}", self.cold.tenant, self.dimension.token())
    }

    fn deposit(&self, epoch: u32, granted: u64, exhausted: bool) {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let l = Local::unpack(s);
            let next = if l.is(epoch) {
                Local {
                    exhausted: l.exhausted || exhausted,
                    remaining: l.remaining + granted,
                    ..l
                }
            } else if !l.valid || is_newer(epoch, l.epoch) {
                Local {
                    valid: true,
                    epoch,
                    exhausted,
                    remaining: granted,
                }
            } else {
                // A lease for a window that is already over here: its tokens expire.
                return;
            };
            match self.state.compare_exchange_weak(
                s,
                next.pack(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(actual) => s = actual,
            }
        }
    }

    async fn refill_for(&self, cost: Cost) -> Result<(), Rejection> {
        let reason = self.dimension.reason();
        let need = self.dimension.cost(cost.bytes);
        if need == 0 {
            return Ok(());
        }
        if need > MAX_COST {
            return Err(Rejection::new(reason, None));
        }
        let mut hint = self.cold.refill.lock().await;
        let window_ms = self.window_ms();
        let index = cost.now_ms / window_ms;
        let epoch = index as u32;
        let l = Local::unpack(self.state.load(Ordering::Acquire));
        let have = if l.is(epoch) { l.remaining } else { 0 };
        if have >= need {
            // An earlier refill in the queue already paid for this one.
            return Ok(());
        }
        if l.is(epoch) && l.exhausted {
            return Err(Rejection::new(
                reason,
                Some(self.until_boundary(cost.now_ms)),
            ));
        }
        let cap = self.cap();
        let min = need - have;
        let want = self.cold.policy.batch(cap).max(min);
        let scope = self.scope();
        let request = LeaseRequest {
            scope: &scope,
            window: index,
            want,
            min,
            cap,
        };
        let lease = match self.cold.ledger.lease(request, &mut hint).await {
            Ok(lease) => lease,
            Err(e) => {
                // Fail closed: an unreachable ledger must not lift the quota. But
                // say so: an outage is not the tenant being over its quota.
                tracing::warn!(tenant = %self.cold.tenant, scope, error = %e, "rate lease failed");
                return Err(Rejection::new(RejectReason::Unavailable, Some(STORE_RETRY)));
            }
        };
        self.deposit(epoch, lease.granted, lease.left == 0);
        if lease.granted == 0 {
            return Err(Rejection::new(
                reason,
                Some(self.until_boundary(cost.now_ms)),
            ));
        }
        Ok(())
    }
}

/// A window length in milliseconds: at least 1, at most `u32::MAX` (49 days).
fn duration_ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1)
}

impl Layer for RateWindow {
    #[inline]
    fn check(&self, cost: Cost) -> Check {
        let need = self.dimension.cost(cost.bytes);
        if need == 0 {
            return Check::Pass;
        }
        let window_ms = u64::from(self.window_ms.load(Ordering::Relaxed));
        let epoch = (cost.now_ms / window_ms) as u32;
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let l = Local::unpack(s);
            if !l.is(epoch) {
                return Check::Refill(self.dimension.reason());
            }
            if l.remaining < need {
                if l.exhausted || need > MAX_COST {
                    let retry = window_ms - cost.now_ms % window_ms;
                    return Check::Reject(Rejection::new(
                        self.dimension.reason(),
                        Some(Duration::from_millis(retry)),
                    ));
                }
                return Check::Refill(self.dimension.reason());
            }
            let next = Local {
                remaining: l.remaining - need,
                ..l
            };
            match self.state.compare_exchange_weak(
                s,
                next.pack(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Check::Pass,
                Err(actual) => s = actual,
            }
        }
    }

    fn refund(&self, cost: Cost) {
        let need = self.dimension.cost(cost.bytes);
        if need == 0 {
            return;
        }
        let epoch = (cost.now_ms / self.window_ms()) as u32;
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let l = Local::unpack(s);
            if !l.is(epoch) {
                return;
            }
            let next = Local {
                remaining: l.remaining + need,
                ..l
            };
            match self.state.compare_exchange_weak(
                s,
                next.pack(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(actual) => s = actual,
            }
        }
    }

    fn refill(&self, cost: Cost) -> RefillFuture<'_> {
        Box::pin(self.refill_for(cost))
    }
}

impl std::fmt::Debug for RateWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateWindow")
            .field("tenant", &self.cold.tenant)
            .field("dimension", &self.dimension)
            .field("cap", &self.cap())
            .field("window_ms", &self.window_ms())
            .field("local", &Local::unpack(self.state.load(Ordering::Relaxed)))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant() -> TenantId {
        TenantId::new("acme").unwrap()
    }

    fn window(ledger: &Arc<MemoryLedger>, dim: Dimension, cap: u64, k: u32) -> RateWindow {
        let policy = BatchPolicy {
            instances: k,
            ..BatchPolicy::for_dimension(dim)
        };
        RateWindow::new(
            tenant(),
            dim,
            cap,
            Duration::from_secs(1),
            policy,
            ledger.clone(),
        )
    }

    /// Admits one message, refilling as the gate would. Returns whether admitted.
    async fn admit(w: &RateWindow, cost: Cost) -> bool {
        for _ in 0..4 {
            match w.check(cost) {
                Check::Pass => return true,
                Check::Reject(_) => return false,
                Check::Refill(_) => {
                    if w.refill(cost).await.is_err() {
                        return false;
                    }
                }
            }
        }
        false
    }

    #[test]
    fn pack_round_trips() {
        let l = Local {
            valid: true,
            epoch: u32::MAX,
            exhausted: true,
            remaining: REM_MASK,
        };
        assert_eq!(Local::unpack(l.pack()), l);
        assert!(!Local::unpack(0).valid);
        assert!(is_newer(0, u32::MAX));
        assert!(!is_newer(5, 6));
    }

    #[test]
    fn batch_policy() {
        let p = BatchPolicy::for_dimension(Dimension::Messages);
        assert_eq!(p.batch(1_000), 62);
        assert_eq!(p.batch(1_000_000), 1024);
        assert_eq!(p.batch(3), 1);
    }

    #[tokio::test]
    async fn k_instances_never_exceed_the_cap_and_lose_at_most_k_batches() {
        for (cap, k) in [(1_000u64, 3u32), (100, 4), (7, 2), (50_000, 5)] {
            let ledger = Arc::new(MemoryLedger::new());
            let windows: Vec<_> = (0..k)
                .map(|_| window(&ledger, Dimension::Messages, cap, k))
                .collect();
            let batch = windows[0].batch();
            let now_ms = 10_000;
            let cost = Cost { bytes: 1, now_ms };
            // Round-robin demand of twice the cap.
            let mut admitted = 0u64;
            for i in 0..(2 * cap) {
                if admit(&windows[(i % u64::from(k)) as usize], cost).await {
                    admitted += 1;
                }
            }
            assert!(admitted <= cap, "cap {cap} k {k}: {admitted}");
            assert!(
                admitted + u64::from(k) * batch >= cap,
                "cap {cap} k {k}: {admitted}, batch {batch}"
            );
            assert!(ledger.leased("acme.msgs", 10) <= cap);
            // Refused with a retry-after to the window boundary (1 s windows).
            match windows[0].check(cost) {
                Check::Reject(r) => {
                    assert_eq!(r.reason, RejectReason::MessageRate);
                    assert_eq!(r.retry_after, Some(Duration::from_millis(1_000)));
                }
                Check::Refill(_) => {
                    let e = windows[0].refill(cost).await.unwrap_err();
                    assert_eq!(e.reason, RejectReason::MessageRate);
                }
                Check::Pass => panic!("admitted past the cap"),
            }
        }
    }

    #[tokio::test]
    async fn a_new_window_brings_a_new_budget() {
        let ledger = Arc::new(MemoryLedger::new());
        let w = window(&ledger, Dimension::Messages, 10, 1);
        let mut n = 0;
        for _ in 0..20 {
            if admit(
                &w,
                Cost {
                    bytes: 1,
                    now_ms: 1_500,
                },
            )
            .await
            {
                n += 1;
            }
        }
        assert_eq!(n, 10);
        assert!(
            matches!(w.check(Cost { bytes: 1, now_ms: 1_999 }), Check::Reject(r)
            if r.retry_after == Some(Duration::from_millis(1)))
        );
        assert!(
            admit(
                &w,
                Cost {
                    bytes: 1,
                    now_ms: 2_000
                }
            )
            .await
        );
    }

    #[tokio::test]
    async fn bytes_are_topped_up_to_the_message() {
        let ledger = Arc::new(MemoryLedger::new());
        // cap 1 MiB, batch = 1 MiB / 4 = 256 KiB: a 600 KiB message leases 600 KiB.
        let w = window(&ledger, Dimension::Bytes, 1 << 20, 1);
        let now_ms = 5_000;
        assert!(
            admit(
                &w,
                Cost {
                    bytes: 600 << 10,
                    now_ms
                }
            )
            .await
        );
        assert_eq!(ledger.leased("acme.bytes", 5), 600 << 10);
        // 424 KiB are left: a 500 KiB message does not fit, a 400 KiB one does.
        assert!(
            !admit(
                &w,
                Cost {
                    bytes: 500 << 10,
                    now_ms
                }
            )
            .await
        );
        assert!(
            admit(
                &w,
                Cost {
                    bytes: 400 << 10,
                    now_ms
                }
            )
            .await
        );
        assert!(ledger.leased("acme.bytes", 5) <= 1 << 20);
    }

    #[tokio::test]
    async fn refund_returns_tokens_of_the_same_window() {
        let ledger = Arc::new(MemoryLedger::new());
        let w = window(&ledger, Dimension::Messages, 100, 1);
        let cost = Cost {
            bytes: 1,
            now_ms: 0,
        };
        assert!(admit(&w, cost).await);
        let before = w.local_tokens(0);
        w.refund(cost);
        assert_eq!(w.local_tokens(0), before + 1);
        // A refund for another window is dropped.
        w.refund(Cost {
            bytes: 1,
            now_ms: 7_000,
        });
        assert_eq!(w.local_tokens(0), before + 1);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            /// Any interleaving of K instances, any sizes: bytes admitted per window
            /// never exceed the cap, every leased byte is admitted or held by an
            /// instance, instances hold at most K * (B + M) unspent, and demand
            /// that keeps coming spends the whole cap.
            #[test]
            fn byte_windows_hold_the_bound(
                cap in 1u64..200_000,
                k in 1u32..6,
                sizes in proptest::collection::vec((0usize..6, 1u64..20_000), 1..400),
            ) {
                let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
                rt.block_on(async {
                    let ledger = Arc::new(MemoryLedger::new());
                    let windows: Vec<_> = (0..k)
                        .map(|_| window(&ledger, Dimension::Bytes, cap, k))
                        .collect();
                    let batch = windows[0].batch();
                    let now_ms = 42_000;
                    let mut admitted = 0u64;
                    let mut largest = 0u64;
                    for &(who, bytes) in &sizes {
                        let w = &windows[who % k as usize];
                        largest = largest.max(bytes);
                        if admit(w, Cost { bytes, now_ms }).await {
                            admitted += bytes;
                        }
                    }
                    prop_assert!(admitted <= cap);
                    let leased = ledger.leased("acme.bytes", 42);
                    prop_assert!(leased <= cap);
                    // What instances hold unspent is at most K * (B + M).
                    let stranded: u64 = windows.iter().map(|w| w.local_tokens(now_ms)).sum();
                    prop_assert_eq!(admitted + stranded, leased);
                    prop_assert!(stranded <= u64::from(k) * (batch + largest));
                    // Drain: every instance sends 1-byte messages until refused.
                    for w in &windows {
                        while admit(w, Cost { bytes: 1, now_ms }).await {
                            admitted += 1;
                        }
                    }
                    prop_assert_eq!(ledger.leased("acme.bytes", 42), cap);
                    prop_assert_eq!(admitted, cap);
                    Ok(())
                })?;
            }
        }
    }

    struct Failing;
    impl TokenLedger for Failing {
        fn lease<'a>(&'a self, _r: LeaseRequest<'a>, _h: &'a mut LeaseHint) -> LeaseFuture<'a> {
            Box::pin(std::future::ready(Err(super::super::error::store_error(
                "test",
                std::io::Error::other("down"),
            ))))
        }
    }

    #[tokio::test]
    async fn a_failing_ledger_fails_closed() {
        let w = RateWindow::new(
            tenant(),
            Dimension::Messages,
            10,
            Duration::from_secs(1),
            BatchPolicy::for_dimension(Dimension::Messages),
            Arc::new(Failing),
        );
        let cost = Cost {
            bytes: 1,
            now_ms: 0,
        };
        assert!(matches!(
            w.check(cost),
            Check::Refill(RejectReason::MessageRate)
        ));
        let r = w.refill(cost).await.unwrap_err();
        assert_eq!(r.retry_after, Some(STORE_RETRY));
        // Refused, but as an outage, never as "quota exhausted".
        assert_eq!(r.reason, RejectReason::Unavailable);
    }
}
