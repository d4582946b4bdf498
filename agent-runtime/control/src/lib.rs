//! The agentbus control plane: a service whose state lives in NATS.
//!
//! Tenants, issued agents, admin identities and sealed secrets are records in
//! JetStream KV buckets of the platform account ([`store`]); the controller
//! ([`controller`]) is a stateless NATS service that owns every change to them and
//! pushes the tenants' accounts to the servers; [`client::AdminClient`] is how the
//! CLI, tests and remote admins call it; [`keys`] is how running agents learn a
//! rotated key set. The local state directory ([`install`]) holds only what cannot
//! live in NATS: the KEK, the credentials that reach NATS, and the server config.
//!
//! # Layout
//! - [`api`]: the wire API: subjects, roles, requests, responses, error codes.
//! - [`audit`]: the tamper-evident audit log (RFC 6962, signed checkpoints).
//! - [`client`]: the typed admin client.
//! - [`controller`]: the service, its operations, authentication and reconcile.
//! - [`store`]: the KV buckets and their records.
//! - [`kek`]: the key-encryption key and sealed secrets.
//! - [`identity`]: API keys, platform JWTs and the NATS auth callout.
//! - [`install`]: the state directory of an installation.
//! - [`keys`]: key-set refresh for running agents (the key service client).
//! - [`registry`]: tenant records and the watcher every runtime instance keeps.
//! - [`tiers`]: service tiers and the one table of per-tenant quotas.
//! - [`usage`]: server-verified usage per tenant per hour.
//! - [`budget`]: budgets on reported units, enforced with JetStream counters.
//! - [`books`]: where a tenant's ledger, policing state and budgets live (shared, or its region);
//!   `region_records`: the create-only records of where a log or books live.
//! - [`migrate`]: copying an account's streams to another server or cluster.
//! - [`meter`]: the runtime's usage meter (tasks, tool calls) into the ledgers.
//! - [`accounts`], [`jwt`]: account and user claims, signed with nkeys.
//! - [`server_config`], [`local_server`]: nats-server configs and local processes.
//! - [`error`]: the control plane's local errors.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod api;
pub mod audit;
pub mod books;
pub mod budget;
pub mod client;
pub mod controller;
pub mod error;
pub mod identity;
pub mod install;
pub mod jwt;
pub mod kek;
pub mod keys;
pub mod local_server;
pub mod meter;
pub mod migrate;
mod region_records;
pub mod registry;
pub mod server_config;
pub mod store;
pub mod tiers;
pub mod usage;

pub use accounts::{JetStreamScope, STATE_BUCKET, TASKS_DONE_BUCKET, TASKS_STREAM};
pub use api::{ApiError, ErrorCode, Role};
pub use client::AdminClient;
pub use controller::{Controller, ControllerConfig};
pub use error::{ControlError, ControlErrorKind};
pub use install::Installation;

/// The system account's name.
pub const SYSTEM_ACCOUNT: &str = "SYS";
/// The platform account's name.
pub const PLATFORM_ACCOUNT: &str = "PLATFORM";
/// The auth account's name (clients logging in by key or token pass through it).
pub const AUTH_ACCOUNT: &str = "AUTH";

/// Parses a comma-separated server URL list.
pub fn parse_urls(urls: &str) -> Result<Vec<async_nats::ServerAddr>, ControlError> {
    tenant_bus::connect::server_addrs(urls).map_err(|e| {
        tenant_bus::error::Error::with_source(ControlErrorKind::InvalidUrl, urls.to_string(), e)
    })
}

/// Collapses a multi-line message into one line.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
