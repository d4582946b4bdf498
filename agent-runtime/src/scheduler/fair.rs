//! Weighted fair queueing of tasks over a worker pool shared by tenants.
//!
//! [`FairQueue`] is start-time fair queueing (SFQ): each tenant has a bounded FIFO;
//! an item of cost `c` from a tenant of weight `w` gets the start tag
//! `S = max(V, F_prev)` and the finish tag `F = S + c / w`, where `V` (virtual
//! time) is the start tag of the item last dequeued and `F_prev` the finish tag of
//! the tenant's previous item. Dequeue takes the head with the smallest finish tag
//! (ties: arrival order), from a binary heap holding one entry per backlogged
//! tenant: O(log active tenants) per operation, whatever the number of tenants.
//!
//! A tenant offering ten times its share cannot starve the others: its tags run
//! ahead of `V`, so an item from a quiet tenant (start tag `V`) is served after at
//! most one item of each other backlogged tenant of weight at least its own. The
//! queue is bounded per tenant and in total; a push past either bound is refused
//! with [`RejectReason::QueueFull`] and the item handed back.
//!
//! [`FairPool`] wraps the queue for async workers (`pop().await`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tenant_bus::admission::RejectReason;
use tenant_bus::TenantId;
use tokio::sync::Notify;

use super::error::{rejected, SchedulerError};

/// Virtual time units per unit of cost at weight 1.
const SCALE: u64 = 1 << 16;

/// A push that was refused, with the item handed back.
#[derive(Debug)]
pub struct Refused<T> {
    /// The item that was not queued.
    pub item: T,
    /// Why ([`RejectReason::QueueFull`]).
    pub error: SchedulerError,
}

struct Flow<T> {
    items: VecDeque<(u64, u64, T)>, // (start, finish, item)
    last_finish: u64,
}

/// Bounds of a [`FairQueue`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FairQueueLimits {
    /// Most items queued per tenant.
    pub per_tenant: usize,
    /// Most items queued in total.
    pub total: usize,
}

impl Default for FairQueueLimits {
    fn default() -> Self {
        Self {
            per_tenant: 1_024,
            total: 65_536,
        }
    }
}

/// A weighted fair queue (see the module docs).
pub struct FairQueue<T> {
    flows: HashMap<TenantId, Flow<T>>,
    heap: BinaryHeap<Reverse<(u64, u64, TenantId)>>, // (head finish, head seq, tenant)
    vtime: u64,
    max_finish: u64,
    seq: u64,
    len: usize,
    limits: FairQueueLimits,
}

impl<T> FairQueue<T> {
    /// An empty queue with `limits`.
    pub fn new(limits: FairQueueLimits) -> Self {
        Self {
            flows: HashMap::new(),
            heap: BinaryHeap::new(),
            vtime: 0,
            max_finish: 0,
            seq: 0,
            len: 0,
            limits,
        }
    }

    /// Items queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Items queued for `tenant`.
    pub fn len_of(&self, tenant: &TenantId) -> usize {
        self.flows.get(tenant).map_or(0, |f| f.items.len())
    }

    /// Tenants with queued items.
    pub fn active_tenants(&self) -> usize {
        self.flows.len()
    }

    /// Queues `item` of `cost` (>= 1) for `tenant` of `weight` (>= 1).
    pub fn push(
        &mut self,
        tenant: &TenantId,
        weight: u64,
        cost: u64,
        item: T,
    ) -> Result<(), Refused<T>> {
        if self.len >= self.limits.total {
            let error = rejected(
                RejectReason::QueueFull,
                None,
                format!("{} tasks queued in total", self.limits.total),
            );
            return Err(Refused { item, error });
        }
        let per_tenant = self.limits.per_tenant;
        let vtime = self.vtime;
        let flow = self.flows.entry(tenant.clone()).or_insert_with(|| Flow {
            items: VecDeque::new(),
            last_finish: 0,
        });
        if flow.items.len() >= per_tenant {
            let error = rejected(
                RejectReason::QueueFull,
                None,
                format!("{per_tenant} tasks of tenant {tenant} queued"),
            );
            return Err(Refused { item, error });
        }
        let start = vtime.max(flow.last_finish);
        let step = cost.max(1).saturating_mul(SCALE) / weight.max(1);
        let finish = start.saturating_add(step.max(1));
        flow.last_finish = finish;
        let was_idle = flow.items.is_empty();
        flow.items.push_back((start, finish, item));
        self.seq += 1;
        self.len += 1;
        if was_idle {
            self.heap.push(Reverse((finish, self.seq, tenant.clone())));
        }
        Ok(())
    }

    /// Takes the item with the smallest finish tag.
    pub fn pop(&mut self) -> Option<(TenantId, T)> {
        let Reverse((_, _, tenant)) = self.heap.pop()?;
        let flow = self.flows.get_mut(&tenant)?;
        let (start, finish, item) = flow.items.pop_front()?;
        self.vtime = self.vtime.max(start);
        self.max_finish = self.max_finish.max(finish);
        self.len -= 1;
        if let Some(&(_, next_finish, _)) = flow.items.front() {
            self.seq += 1;
            self.heap
                .push(Reverse((next_finish, self.seq, tenant.clone())));
        }
        if self.len == 0 {
            // End of a busy period: SFQ sets V to the largest finish tag served, so
            // every tenant's next start tag is V and the per-tenant state can go.
            self.vtime = self.max_finish;
            self.flows.clear();
        }
        Some((tenant, item))
    }

    /// Drops idle tenants whose last finish tag virtual time has passed (their next
    /// start tag would be V anyway), keeping memory proportional to active tenants.
    fn sweep_if_large(&mut self) {
        if self.flows.len() > 2 * self.heap.len() + 64 {
            let v = self.vtime;
            self.flows
                .retain(|_, f| !f.items.is_empty() || f.last_finish > v);
        }
    }
}

impl<T> std::fmt::Debug for FairQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FairQueue")
            .field("len", &self.len)
            .field("active_tenants", &self.heap.len())
            .field("vtime", &self.vtime)
            .field("limits", &self.limits)
            .finish()
    }
}

/// A [`FairQueue`] shared by async producers and a pool of workers.
pub struct FairPool<T> {
    queue: Mutex<FairQueue<T>>,
    ready: Notify,
    closed: AtomicBool,
}

impl<T> FairPool<T> {
    /// An empty pool queue with `limits`.
    pub fn new(limits: FairQueueLimits) -> Self {
        Self {
            queue: Mutex::new(FairQueue::new(limits)),
            ready: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FairQueue<T>> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a task of cost 1 (see [`FairQueue::push`]).
    pub fn push(&self, tenant: &TenantId, weight: u64, item: T) -> Result<(), Refused<T>> {
        self.push_cost(tenant, weight, 1, item)
    }

    /// Queues a task of `cost`.
    pub fn push_cost(
        &self,
        tenant: &TenantId,
        weight: u64,
        cost: u64,
        item: T,
    ) -> Result<(), Refused<T>> {
        {
            let mut q = self.lock();
            q.push(tenant, weight, cost, item)?;
            q.sweep_if_large();
        }
        self.ready.notify_one();
        Ok(())
    }

    /// The next task for a worker; `None` once closed and drained.
    pub async fn pop(&self) -> Option<(TenantId, T)> {
        loop {
            let ready = self.ready.notified();
            let (next, more) = {
                let mut q = self.lock();
                let next = q.pop();
                (next, !q.is_empty())
            };
            if let Some(next) = next {
                if more {
                    // Pass the baton: more work for another worker.
                    self.ready.notify_one();
                }
                return Some(next);
            }
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            ready.await;
        }
    }

    /// Takes the next task without waiting.
    pub fn try_pop(&self) -> Option<(TenantId, T)> {
        self.lock().pop()
    }

    /// Items queued.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Stops the workers once the queue is drained.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_waiters();
    }
}

impl<T> std::fmt::Debug for FairPool<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FairPool")
            .field("queue", &*self.lock())
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn t(s: &str) -> TenantId {
        TenantId::new(s).unwrap()
    }

    #[test]
    fn shares_follow_weights() {
        let mut q = FairQueue::new(FairQueueLimits::default());
        let (a, b) = (t("a"), t("b"));
        for i in 0..400 {
            q.push(&a, 1, 1, i).unwrap();
            q.push(&b, 3, 1, i).unwrap();
        }
        let mut served_a = 0;
        for _ in 0..400 {
            if q.pop().unwrap().0 == a {
                served_a += 1;
            }
        }
        assert_eq!(served_a, 100, "weight 1 against weight 3 gets a quarter");
    }

    #[test]
    fn a_flood_does_not_starve_a_newcomer() {
        let mut q = FairQueue::new(FairQueueLimits::default());
        let (noisy, quiet) = (t("noisy"), t("quiet"));
        for i in 0..1_000 {
            q.push(&noisy, 1, 1, i).unwrap();
        }
        for _ in 0..500 {
            q.pop().unwrap();
        }
        q.push(&quiet, 1, 1, 0).unwrap();
        // At most one more noisy item first.
        let next: Vec<_> = (0..2).map(|_| q.pop().unwrap().0).collect();
        assert!(next.contains(&quiet), "{next:?}");
    }

    #[test]
    fn within_a_tenant_fifo_and_bounds() {
        let mut q = FairQueue::new(FairQueueLimits {
            per_tenant: 3,
            total: 4,
        });
        let (a, b) = (t("a"), t("b"));
        for i in 0..3 {
            q.push(&a, 1, 1, i).unwrap();
        }
        let e = q.push(&a, 1, 1, 3).unwrap_err();
        assert_eq!(e.item, 3);
        assert_eq!(e.error.kind().reason(), Some(RejectReason::QueueFull));
        q.push(&b, 1, 1, 10).unwrap();
        let e = q.push(&b, 1, 1, 11).unwrap_err();
        assert_eq!(e.error.kind().reason(), Some(RejectReason::QueueFull));
        let mut of_a = Vec::new();
        while let Some((who, i)) = q.pop() {
            if who == a {
                of_a.push(i);
            }
        }
        assert_eq!(of_a, vec![0, 1, 2]);
        assert_eq!(q.active_tenants(), 0, "idle tenants are forgotten");
    }

    /// Two workers, 10 ms tasks; a weight-4 tenant floods 10x its share, a weight-1
    /// tenant sends one task every 40 ms. Each quiet task finishes within 3 task
    /// times (30 ms) of its submission.
    #[tokio::test(start_paused = true)]
    async fn quiet_latency_is_bounded_under_a_flood() {
        let pool = Arc::new(FairPool::new(FairQueueLimits::default()));
        let (noisy, quiet) = (t("noisy"), t("quiet"));
        let done = Arc::new(Mutex::new(Vec::new()));
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let (pool, done) = (pool.clone(), done.clone());
                tokio::spawn(async move {
                    while let Some((who, submitted)) = pool.pop().await {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        let submitted: tokio::time::Instant = submitted;
                        done.lock().unwrap().push((who, submitted.elapsed()));
                    }
                })
            })
            .collect();
        let now = tokio::time::Instant::now;
        // 1 s of work at 2 workers is 200 tasks; the noisy tenant offers 10x its
        // 4/5 share of it over the test's 1 s.
        for _ in 0..1_000 {
            pool.push(&noisy, 4, now()).unwrap();
        }
        for _ in 0..25 {
            pool.push(&quiet, 1, now()).unwrap();
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        pool.close();
        let quiet_lat: Vec<Duration> = done
            .lock()
            .unwrap()
            .iter()
            .filter(|(w, _)| *w == quiet)
            .map(|(_, d)| *d)
            .collect();
        assert_eq!(quiet_lat.len(), 25);
        let worst = quiet_lat.iter().max().unwrap();
        assert!(*worst <= Duration::from_millis(30), "worst {worst:?}");
        drop(workers);
    }
}
