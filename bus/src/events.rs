//! Connection events, surfaced instead of lost.
//!
//! async-nats reports slow consumers (messages it dropped client-side because a
//! subscription's buffer was full) and permission violations (the server refused a
//! publish or subscribe) only through its asynchronous event callback: `publish`
//! and `subscribe` still return `Ok`. A namespace turns each into a [`BusEvent`] on
//! a bounded broadcast channel ([`TenantNamespace::events`](crate::TenantNamespace::events))
//! and into a counter ([`Counters`]), so neither goes
//! unnoticed. A receiver that lags behind the channel's capacity loses the oldest
//! events (and is told how many by `RecvError::Lagged`); the counters count every
//! event the callback receives.
//!
//! Upstream bound: async-nats itself queues at most 128 events between its
//! connection task and the callback and drops the rest of a larger burst
//! (`try_send`), so a burst of more than 128 violations within one read can be
//! under-counted. The server still refuses every one of them.

use std::sync::Arc;

use crate::verify::Counters;

/// Capacity of the event channel.
pub const EVENT_CHANNEL_CAPACITY: usize = 256;

/// Something the connection reported.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BusEvent {
    /// (Re)connected to a server.
    Connected,
    /// Lost the connection (async-nats reconnects by itself).
    Disconnected,
    /// The server is entering lame-duck mode (shutting down).
    LameDuck,
    /// The connection is closed for good.
    Closed,
    /// A subscription's buffer overflowed and messages for it were dropped:
    /// either async-nats' channel in front of the subscription's pump (`sid` is
    /// async-nats' subscription id), or the subscription's own queue at
    /// [`NamespaceOptions::subscription_capacity`](crate::NamespaceOptions::subscription_capacity)
    /// messages (`sid` is [`Subscription::id`](crate::Subscription::id), always
    /// at least 2^48). Sent once per episode: again only after the queue took a
    /// message; every dropped message is counted in
    /// [`Counters::slow_consumer`](crate::verify::Counters::slow_consumer).
    SlowConsumer {
        /// The subscription id.
        sid: u64,
    },
    /// A subscription dropped messages on arrival because its receive byte
    /// budget was used up (see [`crate::budget`]). Sent once per episode: again
    /// only after the subscription's queue took a message; every dropped message
    /// is counted under [`DropReason::ReceiveBudget`](crate::DropReason::ReceiveBudget).
    ReceiveBudgetExhausted {
        /// The subscription id ([`Subscription::id`](crate::Subscription::id)).
        sid: u64,
        /// The budget's limit in bytes.
        limit: u64,
    },
    /// The server refused a publish or subscribe.
    PermissionViolation {
        /// The server's text, e.g. `Permissions Violation for Publish to "x"`.
        detail: String,
    },
    /// The server refused the credentials (bad, revoked or suspended).
    AuthorizationViolation,
    /// Another error reported by the server or the client.
    Error {
        /// The error text.
        detail: String,
    },
}

/// Maps an async-nats event to a [`BusEvent`], counting it.
pub(crate) fn classify(event: async_nats::Event, counters: &Arc<Counters>) -> BusEvent {
    use async_nats::{Event, ServerError};
    match event {
        Event::Connected => BusEvent::Connected,
        Event::Disconnected => BusEvent::Disconnected,
        Event::LameDuckMode => BusEvent::LameDuck,
        Event::Closed | Event::Draining => BusEvent::Closed,
        Event::SlowConsumer(sid) | Event::ServerError(ServerError::SlowConsumer(sid)) => {
            counters.count_slow_consumer();
            BusEvent::SlowConsumer { sid }
        }
        Event::ServerError(ServerError::AuthorizationViolation) => {
            counters.count_server_error();
            BusEvent::AuthorizationViolation
        }
        Event::ServerError(ServerError::Other(text)) => {
            if text.to_ascii_lowercase().contains("permissions violation") {
                counters.count_permission_violation();
                BusEvent::PermissionViolation { detail: text }
            } else {
                counters.count_server_error();
                BusEvent::Error { detail: text }
            }
        }
        Event::ClientError(e) => BusEvent::Error {
            detail: e.to_string(),
        },
    }
}
