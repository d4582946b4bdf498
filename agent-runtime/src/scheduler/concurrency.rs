//! Exactly-N concurrency per tenant (concurrent tasks), with RAII permits.
//!
//! Built on `tokio::sync::Semaphore`, which is fair: released permits are handed to
//! queued waiters in the order they queued, before anyone else can take them, so a
//! caller arriving just as a permit is released queues behind the existing waiters
//! instead of overtaking them (the bug of the queued limiter this project replaces).
//! Admission is one atomic compare-and-swap on the semaphore: 1,000 racing callers
//! against a limit of 10 get exactly 10 permits.
//!
//! The overflow policy decides what a caller finds when all permits are held:
//! [`Overflow::Reject`] refuses at once with [`RejectReason::Concurrency`] and a
//! retry-after (the mean hold time divided by the limit, once permits have been
//! released); [`Overflow::Queue`] waits in a bounded FIFO: past `max_waiters`
//! callers are refused with [`RejectReason::QueueFull`], and a caller waiting longer
//! than `timeout` gets [`RejectReason::WaitTimeout`].

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tenant_bus::admission::RejectReason;
use tokio::sync::{Semaphore, TryAcquireError};
use tokio::time::Instant;

use super::error::{rejected, SchedulerError};

/// What a caller finds when every permit is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Refuse at once.
    Reject,
    /// Wait in a bounded FIFO queue.
    Queue {
        /// Most callers waiting at once; more are refused with `QueueFull`.
        max_waiters: usize,
        /// Longest wait; then `WaitTimeout`.
        timeout: Duration,
    },
}

struct Inner {
    semaphore: Semaphore,
    limit: AtomicUsize,
    // Permits to swallow on release after the limit was lowered below the holders.
    debt: AtomicUsize,
    waiting: AtomicUsize,
    // Mean hold time in microseconds (exponentially weighted, 1/8); 0: no sample.
    mean_hold_us: AtomicU64,
    overflow: Overflow,
    what: &'static str,
}

/// A concurrency limit (cheap to clone: clones share the permits).
#[derive(Clone)]
pub struct ConcurrencyLimit {
    inner: Arc<Inner>,
}

impl ConcurrencyLimit {
    /// A limit of `limit` concurrent holders of `what` (`"tasks"`, `"agents"`).
    pub fn new(limit: usize, overflow: Overflow, what: &'static str) -> Self {
        let limit = limit.min(Semaphore::MAX_PERMITS);
        Self {
            inner: Arc::new(Inner {
                semaphore: Semaphore::new(limit),
                limit: AtomicUsize::new(limit),
                debt: AtomicUsize::new(0),
                waiting: AtomicUsize::new(0),
                mean_hold_us: AtomicU64::new(0),
                overflow,
                what,
            }),
        }
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.inner.limit.load(Ordering::Acquire)
    }

    /// Permits free right now.
    pub fn available(&self) -> usize {
        self.inner.semaphore.available_permits()
    }

    /// Callers queued right now.
    pub fn waiting(&self) -> usize {
        self.inner.waiting.load(Ordering::Acquire)
    }

    /// The overflow policy.
    pub fn overflow(&self) -> Overflow {
        self.inner.overflow
    }

    /// Changes the limit. Raising it wakes waiters at once; lowering it takes free
    /// permits away and swallows releases until the holders fit.
    pub fn set_limit(&self, limit: usize) {
        let limit = limit.min(Semaphore::MAX_PERMITS);
        let old = self.inner.limit.swap(limit, Ordering::AcqRel);
        if limit > old {
            let mut more = limit - old;
            // Cancel debt first.
            let _ = self
                .inner
                .debt
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                    let cancel = d.min(more);
                    Some(d - cancel)
                })
                .map(|d| more -= d.min(more));
            self.inner.semaphore.add_permits(more);
        } else if limit < old {
            let less = old - limit;
            let taken = self.inner.semaphore.forget_permits(less);
            self.inner.debt.fetch_add(less - taken, Ordering::AcqRel);
        }
    }

    fn retry_hint(&self) -> Option<Duration> {
        let mean = self.inner.mean_hold_us.load(Ordering::Relaxed);
        if mean == 0 {
            return None;
        }
        let limit = u64::try_from(self.limit().max(1)).unwrap_or(u64::MAX);
        Some(Duration::from_micros((mean / limit).max(1_000)))
    }

    fn permit(&self) -> Permit {
        Permit {
            inner: self.inner.clone(),
            since: Instant::now(),
        }
    }

    /// Takes a permit if one is free, whatever the overflow policy.
    pub fn try_acquire(&self) -> Result<Permit, SchedulerError> {
        match self.inner.semaphore.try_acquire() {
            Ok(p) => {
                p.forget();
                Ok(self.permit())
            }
            Err(TryAcquireError::NoPermits) => Err(rejected(
                RejectReason::Concurrency,
                self.retry_hint(),
                format!(
                    "{} of {} {} running",
                    self.limit(),
                    self.limit(),
                    self.inner.what
                ),
            )),
            Err(TryAcquireError::Closed) => {
                Err(rejected(RejectReason::Concurrency, None, "limit closed"))
            }
        }
    }

    /// Takes a permit, applying the overflow policy when none is free.
    pub async fn acquire(&self) -> Result<Permit, SchedulerError> {
        let (max_waiters, timeout) = match self.inner.overflow {
            Overflow::Reject => return self.try_acquire(),
            Overflow::Queue {
                max_waiters,
                timeout,
            } => (max_waiters, timeout),
        };
        // Fast path. Fairness holds: while anyone is queued, released permits go
        // to the queue, so no permit is free for this caller to take.
        if let Ok(p) = self.inner.semaphore.try_acquire() {
            p.forget();
            return Ok(self.permit());
        }
        let queued = self
            .inner
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w < max_waiters).then_some(w + 1)
            });
        if queued.is_err() {
            return Err(rejected(
                RejectReason::QueueFull,
                self.retry_hint(),
                format!(
                    "{max_waiters} callers already waiting for {}",
                    self.inner.what
                ),
            ));
        }
        let _queued = Waiting(&self.inner.waiting);
        match tokio::time::timeout(timeout, self.inner.semaphore.acquire()).await {
            Ok(Ok(p)) => {
                p.forget();
                Ok(self.permit())
            }
            Ok(Err(_closed)) => Err(rejected(RejectReason::Concurrency, None, "limit closed")),
            Err(_elapsed) => Err(rejected(
                RejectReason::WaitTimeout,
                self.retry_hint(),
                format!("waited {} ms for {}", timeout.as_millis(), self.inner.what),
            )),
        }
    }
}

impl std::fmt::Debug for ConcurrencyLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConcurrencyLimit")
            .field("what", &self.inner.what)
            .field("limit", &self.limit())
            .field("available", &self.available())
            .field("waiting", &self.waiting())
            .field("overflow", &self.inner.overflow)
            .finish()
    }
}

struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One held slot of a [`ConcurrencyLimit`]; released on drop.
#[must_use = "the permit is released when dropped"]
pub struct Permit {
    inner: Arc<Inner>,
    since: Instant,
}

/// A permit to run one task.
pub type TaskPermit = Permit;

impl Permit {
    /// How long this permit has been held.
    pub fn held_for(&self) -> Duration {
        self.since.elapsed()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let held = u64::try_from(self.since.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let _ = self
            .inner
            .mean_hold_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                Some(if m == 0 { held } else { m - m / 8 + held / 8 })
            });
        let swallowed = self
            .inner
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1))
            .is_ok();
        if !swallowed {
            self.inner.semaphore.add_permits(1);
        }
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("what", &self.inner.what)
            .field("held_for", &self.held_for())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(max_waiters: usize, timeout_ms: u64) -> Overflow {
        Overflow::Queue {
            max_waiters,
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_callers_get_exactly_the_limit() {
        let limit = ConcurrencyLimit::new(10, Overflow::Reject, "tasks");
        let barrier = Arc::new(tokio::sync::Barrier::new(1_000));
        let mut joins = Vec::new();
        for _ in 0..1_000 {
            let limit = limit.clone();
            let barrier = barrier.clone();
            joins.push(tokio::spawn(async move {
                barrier.wait().await;
                limit.acquire().await
            }));
        }
        let mut held = Vec::new();
        let mut refused = 0;
        for j in joins {
            match j.await.unwrap() {
                Ok(p) => held.push(p),
                Err(e) => {
                    assert_eq!(e.kind().reason(), Some(RejectReason::Concurrency));
                    refused += 1;
                }
            }
        }
        assert_eq!(held.len(), 10);
        assert_eq!(refused, 990);
        drop(held);
        assert_eq!(limit.available(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_is_fifo_even_against_a_caller_arriving_at_release() {
        let limit = ConcurrencyLimit::new(1, queue(100, 60_000), "tasks");
        let first = limit.acquire().await.unwrap();
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut joins = Vec::new();
        for i in 0..20usize {
            let (l, o) = (limit.clone(), order.clone());
            joins.push(tokio::spawn(async move {
                let p = l.acquire().await.unwrap();
                o.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(1)).await;
                drop(p);
            }));
            // Enqueue strictly one after the other.
            while limit.waiting() < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        // Release and race a newcomer in the same instant.
        drop(first);
        let newcomer = {
            let (limit, order) = (limit.clone(), order.clone());
            tokio::spawn(async move {
                let _p = limit.acquire().await.unwrap();
                order.lock().unwrap().push(999);
            })
        };
        for j in joins {
            j.await.unwrap();
        }
        newcomer.await.unwrap();
        let order = order.lock().unwrap().clone();
        let mut expected: Vec<usize> = (0..20).collect();
        expected.push(999);
        assert_eq!(order, expected);
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_queue_and_timeout_are_typed() {
        let limit = ConcurrencyLimit::new(1, queue(2, 50), "tasks");
        let held = limit.acquire().await.unwrap();
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let limit = limit.clone();
                tokio::spawn(async move { limit.acquire().await })
            })
            .collect();
        while limit.waiting() < 2 {
            tokio::task::yield_now().await;
        }
        let full = limit.acquire().await.unwrap_err();
        assert_eq!(full.kind().reason(), Some(RejectReason::QueueFull));
        for w in waiters {
            let e = w.await.unwrap().unwrap_err();
            assert_eq!(e.kind().reason(), Some(RejectReason::WaitTimeout));
        }
        assert_eq!(limit.waiting(), 0);
        drop(held);
        assert!(limit.try_acquire().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn reject_carries_a_retry_after_once_holds_were_seen() {
        let limit = ConcurrencyLimit::new(2, Overflow::Reject, "tasks");
        let a = limit.acquire().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(a);
        let _a = limit.acquire().await.unwrap();
        let _b = limit.acquire().await.unwrap();
        let e = limit.acquire().await.unwrap_err();
        assert_eq!(e.kind().reason(), Some(RejectReason::Concurrency));
        assert_eq!(e.kind().retry_after(), Some(Duration::from_millis(50)));
    }

    #[tokio::test]
    async fn limit_changes_apply() {
        let limit = ConcurrencyLimit::new(2, Overflow::Reject, "tasks");
        let a = limit.try_acquire().unwrap();
        let b = limit.try_acquire().unwrap();
        limit.set_limit(1);
        drop(a);
        assert!(limit.try_acquire().is_err(), "one holder left, limit 1");
        drop(b);
        let c = limit.try_acquire().unwrap();
        assert!(limit.try_acquire().is_err());
        limit.set_limit(3);
        let _d = limit.try_acquire().unwrap();
        let _e = limit.try_acquire().unwrap();
        assert!(limit.try_acquire().is_err());
        drop(c);
    }
}
