//! The control plane's typed error: [`ControlError`] with a [`ControlErrorKind`].

use tenant_bus::error::Error;

/// What went wrong in a control-plane operation.
///
/// Every kind except [`Io`](ControlErrorKind::Io) and
/// [`Push`](ControlErrorKind::Push) is raised before anything is written, so the
/// state directory is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ControlErrorKind {
    /// The state directory does not exist or was never initialised.
    NotInitialized,
    /// The state directory exists but is not a control-plane state directory, or a
    /// file in it is corrupt.
    InvalidState,
    /// A tenant id, agent id or agent type is not a valid slug.
    InvalidId,
    /// A server URL is not `nats://`, `tls://`, `ws://` or `wss://` (comma-separated).
    InvalidUrl,
    /// A replica count outside what JetStream accepts
    /// ([`tenant_bus::region::REPLICAS`], 1 to 5).
    InvalidReplicas,
    /// A tenant with this id already exists.
    DuplicateTenant,
    /// No tenant with this id exists.
    UnknownTenant,
    /// An active agent with this id already exists in the tenant.
    DuplicateAgent,
    /// No active agent with this id exists in the tenant.
    UnknownAgent,
    /// The tenant is suspended (no credentials are issued for it).
    TenantSuspended,
    /// The operation is not valid in the tenant's current state (for example
    /// suspending a suspended tenant).
    InvalidTransition,
    /// Reading or writing the state directory failed.
    Io,
    /// Key generation or signing failed.
    Crypto,
    /// A JWT or `.creds` text is malformed, has a bad signature or a wrong issuer.
    Jwt,
    /// Connecting to the server as the system user failed.
    Connect,
    /// Pushing a claim update to the server failed or was rejected.
    Push,
}

tenant_bus::kind_display!(ControlErrorKind {
    NotInitialized => "control-plane state directory is not initialised",
    InvalidState => "invalid control-plane state",
    InvalidId => "invalid id",
    InvalidUrl => "invalid server URL",
    InvalidReplicas => "invalid replica count",
    DuplicateTenant => "tenant already exists",
    UnknownTenant => "unknown tenant",
    DuplicateAgent => "agent already exists",
    UnknownAgent => "unknown agent",
    TenantSuspended => "tenant is suspended",
    InvalidTransition => "invalid state transition",
    Io => "control-plane state i/o failed",
    Crypto => "key or signature operation failed",
    Jwt => "invalid JWT",
    Connect => "cannot connect to the server as the system user",
    Push => "claim update push failed",
});

/// A control-plane error.
pub type ControlError = Error<ControlErrorKind>;

/// Shorthand for an [`Io`](ControlErrorKind::Io) error about `path`.
pub(crate) fn io_err(what: &str, path: &std::path::Path, e: std::io::Error) -> ControlError {
    Error::with_source(
        ControlErrorKind::Io,
        format!("{what} {}", path.display()),
        e,
    )
}
