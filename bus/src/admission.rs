//! The admission hook: how a resource-pool scheduler (in `agent-runtime`) is fed by
//! every publish, request and reply of a namespace.
//!
//! A [`TenantNamespace`](crate::TenantNamespace) is bound to one tenant, so it holds
//! that tenant's admission layer directly: no lookup by tenant per message, and the
//! cost of a check does not depend on how many tenants exist. The common path is
//! synchronous ([`Admit::Now`] / [`Admit::Rejected`]); a layer that must wait (a
//! queue, a token lease from the key-value store) returns [`Admit::Wait`].

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// Why a message was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectReason {
    /// The tenant's message budget for the window is spent.
    MessageRate,
    /// The tenant's byte budget for the window is spent.
    ByteRate,
    /// The message is larger than the tenant's maximum.
    TooLarge,
    /// The tenant is suspended.
    Suspended,
    /// A bounded wait queue is full.
    QueueFull,
    /// A queued caller waited longer than its timeout.
    WaitTimeout,
    /// Too many concurrent holders (agents, tasks).
    Concurrency,
    /// The shared admission state (the rate ledger in JetStream KV) could not be
    /// reached: an outage, not the tenant's quota. Retry after the hint.
    Unavailable,
}

crate::kind_display!(RejectReason {
    MessageRate => "message rate quota exhausted",
    ByteRate => "byte rate quota exhausted",
    TooLarge => "message larger than the tenant's maximum",
    Suspended => "tenant is suspended",
    QueueFull => "admission queue is full",
    WaitTimeout => "timed out waiting for admission",
    Unavailable => "admission state unavailable (an outage, not the tenant's quota)",
    Concurrency => "concurrency limit reached",
});

/// A refusal, with when a retry may succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// Why.
    pub reason: RejectReason,
    /// When a retry may succeed, if known.
    pub retry_after: Option<Duration>,
}

impl Rejection {
    /// A rejection for `reason`, with an optional retry hint.
    pub fn new(reason: RejectReason, retry_after: Option<Duration>) -> Self {
        Self {
            reason,
            retry_after,
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.retry_after {
            Some(d) => write!(f, "{} (retry after {} ms)", self.reason, d.as_millis()),
            None => write!(f, "{}", self.reason),
        }
    }
}

/// The outcome of an admission check.
pub enum Admit {
    /// Admitted.
    Now,
    /// Refused.
    Rejected(Rejection),
    /// Resolve this future to learn the outcome (queued or leasing).
    Wait(Pin<Box<dyn Future<Output = Result<(), Rejection>> + Send>>),
}

/// A per-tenant admission layer consulted before each outgoing message.
pub trait Admission: Send + Sync + 'static {
    /// Checks one outgoing message of `bytes` payload bytes.
    fn admit_message(&self, bytes: usize) -> Admit;
}
