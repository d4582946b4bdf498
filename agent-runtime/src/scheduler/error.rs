//! The scheduler's typed error: `Error<SchedulerErrorKind>`.
//!
//! A refusal by a limit carries the bus's [`Rejection`] (reason and retry-after) in
//! its kind, so callers branch on `err.kind().reason()` and back off for
//! `err.kind().retry_after()`; failures of the key-value store are a separate kind.

use std::fmt;
use std::time::Duration;

use tenant_bus::admission::{RejectReason, Rejection};
use tenant_bus::error::Error;

/// What went wrong in an admission or acquisition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SchedulerErrorKind {
    /// A limit refused: why, and when a retry may succeed.
    Rejected(Rejection),
    /// The JetStream key-value store failed (unreachable, timed out, corrupt value,
    /// or too much contention on one key).
    Store,
    /// A configuration value is unusable (bucket name, TTL, window length).
    InvalidConfig,
}

impl SchedulerErrorKind {
    /// The rejection reason, if a limit refused.
    pub fn reason(&self) -> Option<RejectReason> {
        match self {
            Self::Rejected(r) => Some(r.reason),
            _ => None,
        }
    }

    /// When a retry may succeed, if a limit refused and the limit knows.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Rejected(r) => r.retry_after,
            _ => None,
        }
    }
}

impl fmt::Display for SchedulerErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rejected(r) => write!(f, "rejected: {r}"),
            Self::Store => f.write_str("scheduler key-value store failed"),
            Self::InvalidConfig => f.write_str("invalid scheduler configuration"),
        }
    }
}

/// A scheduler error.
pub type SchedulerError = Error<SchedulerErrorKind>;

/// A rejection error with a detail message.
pub(crate) fn rejected(
    reason: RejectReason,
    retry_after: Option<Duration>,
    detail: impl Into<std::borrow::Cow<'static, str>>,
) -> SchedulerError {
    Error::new(
        SchedulerErrorKind::Rejected(Rejection::new(reason, retry_after)),
        detail,
    )
}

/// The rejection error of a [`Rejection`].
pub(crate) fn from_rejection(r: Rejection) -> SchedulerError {
    Error::new(SchedulerErrorKind::Rejected(r), "")
}

/// A store error wrapping its cause.
pub(crate) fn store_error(
    detail: impl Into<std::borrow::Cow<'static, str>>,
    source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
) -> SchedulerError {
    Error::with_source(SchedulerErrorKind::Store, detail, source)
}
