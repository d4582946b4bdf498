//! Composable message-admission layers and the [`Gate`] that runs them.
//!
//! Each limit is its own small type implementing [`Layer`]: a synchronous
//! [`check`](Layer::check) on the hot path, a [`refund`](Layer::refund) that undoes a
//! passed check when a later layer refuses, and an asynchronous
//! [`refill`](Layer::refill) for the cold path (leasing tokens from the key-value
//! store). [`Chain`] composes two layers; [`Gate`] turns a layer into a
//! [`tenant_bus::admission::Admission`], returning [`Admit::Wait`] only when a layer
//! asks for a refill.
//!
//! Static dispatch all the way down: a chain of layers compiles to straight-line
//! code over a few atomics, with one clock read per message.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tenant_bus::admission::{Admission, Admit, RejectReason, Rejection};

/// A boxed future borrowing its layer, used on the cold path only.
pub type RefillFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Rejection>> + Send + 'a>>;

/// What one message costs, and when it is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// Payload bytes.
    pub bytes: u64,
    /// Wall-clock time of the check, in milliseconds since the Unix epoch.
    pub now_ms: u64,
}

/// The outcome of a synchronous check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Admitted (and charged).
    Pass,
    /// Refused.
    Reject(Rejection),
    /// Nothing was charged; run [`Layer::refill`] and check again. The reason is the
    /// one to report if refilling never catches up.
    Refill(RejectReason),
}

/// One admission limit.
pub trait Layer: Send + Sync + 'static {
    /// Checks and, on [`Check::Pass`], charges one message. Synchronous, lock-free
    /// and allocation-free.
    fn check(&self, cost: Cost) -> Check;

    /// Undoes a [`Check::Pass`] of the same `cost` (a later layer refused).
    fn refund(&self, _cost: Cost) {}

    /// Makes the next [`check`](Layer::check) of `cost` likely to pass, or says why it
    /// cannot (for example, the cluster-wide budget of the window is spent).
    fn refill(&self, _cost: Cost) -> RefillFuture<'_> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Two layers in order: `first`, then `second`; `first` is refunded if `second`
/// does not pass.
#[derive(Debug, Default)]
#[repr(C)]
pub struct Chain<A, B>(pub A, pub B);

impl<A: Layer, B: Layer> Layer for Chain<A, B> {
    #[inline]
    fn check(&self, cost: Cost) -> Check {
        match self.0.check(cost) {
            Check::Pass => {}
            other => return other,
        }
        match self.1.check(cost) {
            Check::Pass => Check::Pass,
            other => {
                self.0.refund(cost);
                other
            }
        }
    }

    fn refund(&self, cost: Cost) {
        self.1.refund(cost);
        self.0.refund(cost);
    }

    fn refill(&self, cost: Cost) -> RefillFuture<'_> {
        Box::pin(async move {
            self.0.refill(cost).await?;
            self.1.refill(cost).await
        })
    }
}

/// The suspension switch: while set, every check is refused with
/// [`RejectReason::Suspended`].
#[derive(Debug, Default)]
#[repr(C)]
pub struct Suspension {
    suspended: AtomicBool,
}

impl Suspension {
    /// A switch in the given state.
    pub fn new(suspended: bool) -> Self {
        Self {
            suspended: AtomicBool::new(suspended),
        }
    }

    /// Suspends (`true`) or resumes (`false`).
    pub fn set(&self, suspended: bool) {
        self.suspended.store(suspended, Ordering::Release);
    }

    /// Whether suspended.
    #[inline]
    pub fn is_set(&self) -> bool {
        self.suspended.load(Ordering::Acquire)
    }

    /// The rejection every admission gets while suspended.
    pub fn rejection() -> Rejection {
        Rejection::new(RejectReason::Suspended, None)
    }
}

impl Layer for Suspension {
    #[inline]
    fn check(&self, _cost: Cost) -> Check {
        if self.is_set() {
            Check::Reject(Self::rejection())
        } else {
            Check::Pass
        }
    }
}

/// The largest message a tenant may send, in bytes.
#[derive(Debug)]
#[repr(C)]
pub struct SizeLimit {
    max: AtomicU64,
}

impl SizeLimit {
    /// A limit of `max` bytes.
    pub fn new(max: u64) -> Self {
        Self {
            max: AtomicU64::new(max),
        }
    }

    /// Changes the limit.
    pub fn set(&self, max: u64) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// The limit.
    pub fn get(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }
}

impl Layer for SizeLimit {
    #[inline]
    fn check(&self, cost: Cost) -> Check {
        if cost.bytes > self.max.load(Ordering::Relaxed) {
            Check::Reject(Rejection::new(RejectReason::TooLarge, None))
        } else {
            Check::Pass
        }
    }
}

/// A source of wall-clock time in milliseconds since the Unix epoch.
///
/// Rate windows are aligned on wall-clock time (`now_ms / window_ms`), so that every
/// instance of the cluster agrees on the window index without talking to the others;
/// the per-window bound holds per instance clock (skew shifts window edges, it does
/// not add tokens).
pub trait TimeSource: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system clock (`SystemTime::now()`, a vDSO call). Zero-sized, so a gate
/// using it keeps no clock state to read from memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SystemClock;

impl TimeSource for SystemClock {
    #[inline]
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// Which clock a scheduler's gates read: the system clock, or a manual clock for
/// tests.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// [`SystemClock`].
    #[default]
    System,
    /// A clock moved by hand.
    Manual(ManualClock),
}

impl TimeSource for Clock {
    #[inline]
    fn now_ms(&self) -> u64 {
        match self {
            Clock::System => SystemClock.now_ms(),
            Clock::Manual(m) => m.now_ms(),
        }
    }
}

impl Clock {
    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        TimeSource::now_ms(self)
    }
}

/// A shared clock that only moves when told to.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    ms: Arc<AtomicU64>,
}

impl TimeSource for ManualClock {
    fn now_ms(&self) -> u64 {
        self.ms.load(Ordering::Acquire)
    }
}

impl ManualClock {
    /// A clock at `ms` milliseconds since the epoch.
    pub fn new(ms: u64) -> Self {
        Self {
            ms: Arc::new(AtomicU64::new(ms)),
        }
    }

    /// The current time.
    pub fn now_ms(&self) -> u64 {
        self.ms.load(Ordering::Acquire)
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.ms.fetch_add(by, Ordering::AcqRel);
    }

    /// Sets the clock.
    pub fn set(&self, ms: u64) {
        self.ms.store(ms, Ordering::Release);
    }
}

/// How many refill-and-check rounds a waiting message gets before it is refused.
const REFILL_ROUNDS: usize = 4;

/// A layer as an [`Admission`]: the synchronous check, and on a refill request an
/// [`Admit::Wait`] future that refills and checks again.
///
/// Always behind an `Arc` (it keeps a weak reference to itself so the wait future
/// can own it).
///
/// Laid out for the cold-cache case (a check on one of 100,000 tenants whose state
/// is not in cache): the layers come first, the gate is cache-line aligned and the
/// system clock is zero-sized, so the tenant's message layers (suspension, size,
/// two windows: 64 bytes) are one cache line and a check pays one memory miss. (The
/// clock read orders the pipeline and each compare-and-swap is a barrier, so
/// misses on further lines would be paid one after the other.)
#[repr(C, align(64))]
pub struct Gate<L, C = SystemClock> {
    layers: L,
    clock: C,
    me: Weak<Gate<L, C>>,
}

impl<L: Layer, C: TimeSource> Gate<L, C> {
    /// A gate over `layers`, reading `clock`.
    pub fn new(layers: L, clock: C) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            layers,
            clock,
            me: me.clone(),
        })
    }

    /// The layers.
    pub fn layers(&self) -> &L {
        &self.layers
    }

    /// The synchronous check of one message of `bytes` bytes.
    #[inline]
    pub fn check(&self, bytes: u64) -> Check {
        self.layers.check(Cost {
            bytes,
            now_ms: self.clock.now_ms(),
        })
    }

    /// The full admission, waiting for refills if needed.
    pub async fn admit(&self, bytes: u64) -> Result<(), Rejection> {
        let mut reason = match self.check(bytes) {
            Check::Pass => return Ok(()),
            Check::Reject(r) => return Err(r),
            Check::Refill(reason) => reason,
        };
        for _ in 0..REFILL_ROUNDS {
            let cost = Cost {
                bytes,
                now_ms: self.clock.now_ms(),
            };
            self.layers.refill(cost).await?;
            match self.check(bytes) {
                Check::Pass => return Ok(()),
                Check::Reject(r) => return Err(r),
                Check::Refill(r) => reason = r,
            }
        }
        // Other callers kept taking the refilled tokens first: the budget is nearly
        // spent; a short back-off is the honest hint.
        Err(Rejection::new(reason, Some(Duration::from_millis(1))))
    }
}

impl<L: Layer, C: TimeSource> Admission for Gate<L, C> {
    #[inline]
    fn admit_message(&self, bytes: usize) -> Admit {
        let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
        match self.check(bytes) {
            Check::Pass => Admit::Now,
            Check::Reject(r) => Admit::Rejected(r),
            Check::Refill(reason) => match self.me.upgrade() {
                Some(me) => Admit::Wait(Box::pin(async move { me.admit(bytes).await })),
                // Only reachable while the gate is being dropped.
                None => Admit::Rejected(Rejection::new(reason, None)),
            },
        }
    }
}

impl<L, C> std::fmt::Debug for Gate<L, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer passing `n` times, counting refunds.
    struct Budget {
        left: AtomicU64,
        refunds: AtomicU64,
    }

    impl Layer for Budget {
        fn check(&self, _cost: Cost) -> Check {
            match self
                .left
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            {
                Ok(_) => Check::Pass,
                Err(_) => Check::Reject(Rejection::new(RejectReason::MessageRate, None)),
            }
        }
        fn refund(&self, _cost: Cost) {
            self.refunds.fetch_add(1, Ordering::AcqRel);
            self.left.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn budget(n: u64) -> Budget {
        Budget {
            left: AtomicU64::new(n),
            refunds: AtomicU64::new(0),
        }
    }

    const C: Cost = Cost {
        bytes: 10,
        now_ms: 0,
    };

    #[test]
    fn chain_refunds_the_first_when_the_second_refuses() {
        let chain = Chain(budget(5), budget(1));
        assert_eq!(chain.check(C), Check::Pass);
        assert!(matches!(chain.check(C), Check::Reject(_)));
        assert_eq!(chain.0.refunds.load(Ordering::Acquire), 1);
        assert_eq!(chain.0.left.load(Ordering::Acquire), 4);
    }

    #[test]
    fn suspension_and_size() {
        let chain = Chain(Suspension::new(false), SizeLimit::new(100));
        assert_eq!(chain.check(C), Check::Pass);
        let big = Cost { bytes: 101, ..C };
        assert!(matches!(chain.check(big), Check::Reject(r) if r.reason == RejectReason::TooLarge));
        chain.0.set(true);
        assert!(matches!(chain.check(C), Check::Reject(r) if r.reason == RejectReason::Suspended));
    }

    #[test]
    fn gate_is_an_admission() {
        let gate = Gate::new(budget(1), SystemClock);
        let adm: Arc<dyn Admission> = gate;
        assert!(matches!(adm.admit_message(1), Admit::Now));
        assert!(matches!(adm.admit_message(1), Admit::Rejected(_)));
    }
}
