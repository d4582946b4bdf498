//! The resource-pool scheduler: per-tenant admission, enforced atomically and
//! cluster-wide, with no state outside NATS.
//!
//! The agent platforms this project replaces stored limits without enforcing them,
//! admitted 20 of 20 concurrent calls against a cap of 3 (check-then-act), and let
//! new callers overtake queued ones. NATS itself has no per-tenant message rate.
//! Here every limit is one small type, separately tested, composed per tenant:
//!
//! | limit | type | scope | state |
//! |---|---|---|---|
//! | suspension | [`Suspension`] | instance (set by the control plane) | one atomic |
//! | message size | [`SizeLimit`] | instance | one atomic |
//! | messages / bytes per window | [`RateWindow`] | cluster | KV counter per (tenant, window) + one atomic word |
//! | concurrent tasks | [`ConcurrencyLimit`] | instance | fair semaphore |
//! | concurrent agents | [`AgentSlots`] | cluster | KV leases with TTL |
//! | shared workers | [`FairQueue`] / [`FairPool`] | worker pool | per-tenant FIFO + heap |
//!
//! [`TenantScheduler`] combines them for one tenant, built from its
//! [`Quotas`](crate::tiers::Quotas); it implements
//! [`tenant_bus::admission::Admission`]. [`Scheduler`] creates tenant schedulers
//! lazily. Refusals are [`SchedulerError`]s whose kind carries a
//! [`Rejection`](tenant_bus::admission::Rejection): a reason and a retry-after.
//!
//! # Where it is fed
//!
//! - every publish, request and response of an agent's namespace: the namespace
//!   holds the tenant's message admission
//!   ([`TenantScheduler::namespace_options`], [`AgentHost::connect`](crate::agent::AgentHost::connect));
//! - every task dispatch (message admission) and every running task (a task
//!   permit per task, across the tenant's workers):
//!   [`DispatchOptions::scheduler`](crate::dispatch::DispatchOptions::scheduler);
//! - every agent start: a cluster-wide agent slot held while the agent is
//!   registered ([`AgentHost::with_scheduler`](crate::agent::AgentHost::with_scheduler));
//! - registry changes: suspension, activation and quota changes
//!   ([`RegistryFollower`], also run by an agent host with a scheduler).
//!
//! # Key-value buckets (JetStream, shared by every instance)
//!
//! - `agentbus_sched_rate` ([`RATE_BUCKET`]): keys `<tenant>.msgs.<window>` and
//!   `<tenant>.bytes.<window>`, value the tokens leased so far in that window
//!   (decimal); compare-and-set on the revision; history 1; `max_age` 10 min (must
//!   exceed the longest window); memory storage.
//! - `agentbus_agent_slots` ([`SLOT_BUCKET`]): keys `<tenant>.slot.<i>`,
//!   `i < max_agents`, value the holder agent id and a lease token; taken with
//!   `create`, refreshed
//!   every TTL/3 with `update(.., revision)`, released with a revision-checked
//!   delete; `max_age` = lease TTL (default 30 s), so a crashed agent's slot frees
//!   itself; file storage.
//!
//! Both are created with the `replicas` of [`RateBucket`] and [`SlotBucket`];
//! [`Scheduler::connect_for_deployment`] takes the deployment's count from the
//! registry. An existing bucket is looked up (asked again while its stream
//! elects a leader), raised when it has fewer replicas (the open waits until
//! the new peers are current) and never lowered.
//!
//! Tenant ids are validated slugs, so a tenant's keys cannot collide with or escape
//! into another tenant's.
//!
//! # Bounds
//!
//! - Tasks and agents: exactly N. A task permit is one compare-and-swap on a fair
//!   semaphore; an agent slot is a `create` of one of N keys, each of which the
//!   server gives to one writer. Queued callers are served strictly FIFO; a queue
//!   is bounded (`QueueFull`) and a wait times out (`WaitTimeout`).
//! - Rate windows, with `K` instances and batch `B = clamp(cap / (4K), 1, max)`:
//!   the messages (bytes) admitted in a window, summed over the cluster, never
//!   exceed the cap (leased tokens never exceed it); when demand exceeds the cap,
//!   at least `cap - K*B` are admitted (`cap - K*(B + max_message)` for bytes).
//!   Windows are wall-clock aligned; a store failure fails closed (refused, retry
//!   after 250 ms). See [`rate`] for the argument.
//! - Fair queueing: a tenant's item waits behind at most one item of each other
//!   backlogged tenant of weight at least its own, plus its own backlog; O(log
//!   active tenants) per push and pop.
//!
//! # Cost
//!
//! The message check ([`Admission::admit_message`](tenant_bus::admission::Admission))
//! is synchronous, lock-free and allocation-free on the hot path: one clock read
//! and one compare-and-swap per window on the tenant's own state; it does not look
//! at other tenants, so its cost does not depend on how many exist (measured by
//! `benches/admission.rs`: see the numbers below). Only when a local batch is empty
//! does it return [`Admit::Wait`](tenant_bus::admission::Admit) to lease more.
//!
//! Measured on the 2-vCPU development VM (release, criterion, `cargo bench -p
//! agent-runtime --bench admission`), per check:
//!
//! | tenants registered | one tenant (a namespace's steady state) | round robin over all tenants |
//! |---|---|---|
//! | 10 | 35 ns | 38-42 ns |
//! | 1,000 | 36-39 ns | 38-40 ns |
//! | 100,000 | 35-36 ns | 220-260 ns (floor: 250-270 ns) |
//!
//! The round robin at 100,000 tenants makes every check touch a tenant whose state
//! is not in cache (100 MB of tenant state); it costs what its floor costs (the same
//! access pattern doing only a clock read and one atomic on each tenant's line):
//! memory latency, not the check. The message gate is laid out so that this is one
//! cache line per tenant (see [`Gate`]).
//!
//! An idle tenant costs about 970 bytes (the `per_tenant_memory` bench case:
//! resident memory growth over 100,000 tenants of a local scheduler, map entry
//! included; its inline parts are a 128-byte cache-aligned gate and an 80-byte
//! tenant scheduler; with JetStream the agent-slot part is smaller), within
//! the 2 KiB target. Tenant state is created on first use only.

mod concurrency;
mod error;
mod fair;
mod follow;
mod kv;
mod layer;
pub mod rate;
mod slots;
mod tenant;

pub use concurrency::{ConcurrencyLimit, Overflow, Permit, TaskPermit};
pub use error::{SchedulerError, SchedulerErrorKind};
pub use fair::{FairPool, FairQueue, FairQueueLimits, Refused};
pub use follow::RegistryFollower;
pub use kv::{KvLedger, RateBucket, RATE_BUCKET};
pub use layer::{
    Chain, Check, Clock, Cost, Gate, Layer, ManualClock, RefillFuture, SizeLimit, Suspension,
    SystemClock, TimeSource,
};
pub use rate::{
    BatchPolicy, Dimension, Lease, LeaseFuture, LeaseHint, LeaseRequest, MemoryLedger, RateWindow,
    TokenLedger,
};
pub use slots::{AgentSlot, AgentSlots, SlotBucket, SlotStore, SLOT_BUCKET};
pub use tenant::{
    AgentLease, MessageGate, MessageLayers, Scheduler, SchedulerConfig, TaskGrant, TenantScheduler,
};
