//! tenant-bus: tenant-scoped, sealed messaging on NATS.
//!
//! # Layout
//! - [`error`]: the generic typed error, `Error<Kind>`.
//! - [`ids`]: validated [`TenantId`] and [`AgentId`].
//! - [`keys`]: the platform master secret, per-tenant key derivation, key sets.
//! - [`bundle`]: the per-agent credential bundle.

pub mod bundle;
pub mod error;
pub mod ids;
pub mod keys;

pub use bundle::CredentialBundle;
pub use error::Error;
pub use ids::{AgentId, TenantId};
pub use keys::{MasterSecret, TenantKeySet};
