//! The agent runtime and control plane of agentbus.
//!
//! # Layout
//! - [`bench`](mod@bench): `agentbus bench`, the sealed bus against raw async-nats.
//! - [`cli`]: the `agentbus` command line (the binary is a thin wrapper).
//! - [`local_server`]: find and run a local `nats-server` (CLI, examples, tests).
//! - [`tiers`]: service tiers and the one table of per-tenant quotas.
//! - [`control`]: the control plane: operator-mode NATS accounts per tenant, agent
//!   credentials, suspension and revocation pushed live to the server.
//! - [`scheduler`]: the resource-pool scheduler: per-tenant admission layers (rate
//!   windows leased from JetStream KV, exactly-N tasks and agent slots, fair queueing).
//! - [`registry`]: the tenant registry (JetStream KV in the platform account) and the
//!   watcher that keeps every instance's bounded copy of it current.
//! - [`agent`]: agents (registration, handlers, suspension, drain), `resource:action`
//!   permissions evaluated inside the tenant, tools and per-task tool budgets.
//! - [`dispatch`]: task dispatch on a per-tenant JetStream work queue: sealed tasks,
//!   capped workers, retries with backoff, dead letters, results, idempotent by id.
#![forbid(unsafe_code)]

pub mod agent;
pub mod bench;
pub mod cli;
pub mod control;
pub mod dispatch;
pub mod local_server;
pub mod registry;
pub mod scheduler;
pub mod tiers;
