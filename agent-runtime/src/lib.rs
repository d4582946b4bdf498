//! The agent runtime and control plane of agentbus.
//!
//! # Layout
//! - [`local_server`]: find and run a local `nats-server` (CLI, examples, tests).
//! - [`tiers`]: service tiers and the one table of per-tenant quotas.
#![forbid(unsafe_code)]

pub mod local_server;
pub mod tiers;
