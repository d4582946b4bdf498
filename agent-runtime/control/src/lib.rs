//! The agentbus control plane.
//!
//! # Layout
//! - [`tiers`]: service tiers and the one table of per-tenant quotas.
//! - [`registry`]: the tenant registry (JetStream KV in the platform account) and the
//!   watcher that keeps every runtime instance's bounded copy of it current.
//! - [`plane`]: operator-mode NATS accounts per tenant, agent credentials,
//!   suspension and revocation pushed live to the server.
//! - [`accounts`], [`jwt`]: account and user claims, signed with nkeys.
//! - [`server_config`]: the nats-server configuration the operator implies.
//! - [`local_server`]: find, run and supervise a local `nats-server`.
//! - [`state`], [`error`]: the state directory and the control plane's errors.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod error;
pub mod jwt;
pub mod local_server;
pub mod plane;
pub mod registry;
pub mod server_config;
pub mod state;
pub mod tiers;

pub use plane::*;
