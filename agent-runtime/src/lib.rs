//! The agent runtime and control plane of agentbus.
//!
//! # Layout
//! - [`local_server`]: find and run a local `nats-server` (CLI, examples, tests).
//! - [`tiers`]: service tiers and the one table of per-tenant quotas.
//! - [`control`]: the control plane: operator-mode NATS accounts per tenant, agent
//!   credentials, suspension and revocation pushed live to the server.
//! - [`scheduler`]: the resource-pool scheduler: per-tenant admission layers (rate
//!   windows leased from JetStream KV, exactly-N tasks and agent slots, fair queueing).
#![forbid(unsafe_code)]

pub mod control;
pub mod local_server;
pub mod scheduler;
pub mod tiers;
