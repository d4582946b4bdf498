//! The agent runtime of agentbus. It uses the control plane only through its client
//! API (the `agentbus-control` crate); the CLI and the benchmark are separate crates.
//!
//! # Layout
//! - [`scheduler`]: the resource-pool scheduler: per-tenant admission layers (rate
//!   windows leased from JetStream KV, exactly-N tasks and agent slots, fair queueing).
//! - [`registry`], [`tiers`]: re-exported from the control plane's client API
//!   (`agentbus-control`): tenant records, the watcher and quotas.
//! - [`agent`]: agents (registration, handlers, suspension, drain), `resource:action`
//!   permissions evaluated inside the tenant, tools and per-task tool budgets.
//! - [`dispatch`]: task dispatch on a per-tenant JetStream work queue: sealed tasks,
//!   capped workers, retries with backoff, dead letters, results, idempotent by id.
#![forbid(unsafe_code)]

pub mod agent;
pub mod dispatch;
pub mod scheduler;

pub use agentbus_control::{registry, tiers};
