//! [`NamespaceOptions`]: how a [`TenantNamespace`] connects
//! and verifies. A `Clone` builder; every default is documented on its setter.

use std::sync::Arc;
use std::time::Duration;

use crate::admission::Admission;
use crate::budget::{ByteBudget, DEFAULT_RECEIVE_BYTES};
use crate::bundle::CredentialBundle;
use crate::namespace::{ConnectError, TenantNamespace};
use crate::verify::{Freshness, FreshnessError};

/// Options of a namespace connection.
#[derive(Clone)]
pub struct NamespaceOptions {
    /// Kept as given and validated by [`Freshness::new`] on connect, so an
    /// out-of-range value is a typed error there rather than a panic or a
    /// silently truncated window.
    pub(crate) replay_window: Duration,
    pub(crate) clock_skew: Duration,
    pub(crate) subscription_capacity: usize,
    pub(crate) max_replay_senders: usize,
    pub(crate) max_pending_requests: usize,
    pub(crate) request_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) admission: Option<Arc<dyn Admission>>,
    pub(crate) receive_budget: Option<Arc<ByteBudget>>,
    pub(crate) receive_bytes: u64,
    pub(crate) auth_token: Option<String>,
}

impl std::fmt::Debug for NamespaceOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamespaceOptions")
            .field("replay_window", &self.replay_window)
            .field("clock_skew", &self.clock_skew)
            .field("subscription_capacity", &self.subscription_capacity)
            .field("max_replay_senders", &self.max_replay_senders)
            .field("max_pending_requests", &self.max_pending_requests)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("admission", &self.admission.is_some())
            .field("receive_budget", &self.receive_budget)
            .field("receive_bytes", &self.receive_bytes)
            .field("auth_token", &self.auth_token.is_some())
            .finish()
    }
}

impl Default for NamespaceOptions {
    fn default() -> Self {
        Self {
            replay_window: Freshness::default().replay_window(),
            clock_skew: Freshness::default().clock_skew(),
            subscription_capacity: 65_536,
            max_replay_senders: 100_000,
            max_pending_requests: 65_536,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            admission: None,
            receive_budget: None,
            receive_bytes: DEFAULT_RECEIVE_BYTES,
            auth_token: None,
        }
    }
}

impl NamespaceOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Messages older than this are dropped as stale. Default: 5 minutes. At
    /// least 1 ms and at most [`MAX_REPLAY_WINDOW`](crate::verify::MAX_REPLAY_WINDOW)
    /// (24 h), in whole milliseconds; outside that range connecting fails with
    /// [`ConnectErrorKind::InvalidOptions`](crate::ConnectErrorKind::InvalidOptions)
    /// (see [`freshness`](Self::freshness)).
    pub fn replay_window(mut self, window: Duration) -> Self {
        self.replay_window = window;
        self
    }

    /// Messages stamped further in the future than this are dropped. Default:
    /// 30 s. At most [`MAX_CLOCK_SKEW`](crate::verify::MAX_CLOCK_SKEW) (1 h);
    /// beyond it connecting fails with
    /// [`ConnectErrorKind::InvalidOptions`](crate::ConnectErrorKind::InvalidOptions).
    pub fn clock_skew(mut self, skew: Duration) -> Self {
        self.clock_skew = skew;
        self
    }

    /// The validated freshness settings, or why the replay window or clock
    /// skew is out of range (what connecting would fail with).
    pub fn freshness(&self) -> Result<Freshness, FreshnessError> {
        Freshness::new(self.replay_window, self.clock_skew)
    }

    /// Messages buffered per subscription before further ones are dropped and a
    /// slow consumer is reported (surfaced as
    /// [`BusEvent::SlowConsumer`](crate::BusEvent), counted in
    /// [`Counters::slow_consumer`](crate::verify::Counters::slow_consumer)).
    /// Default: 65,536. Both the subscription's queue of verified messages and
    /// async-nats' channel in front of it hold at most this many messages; the
    /// bytes the queue holds are bounded by the receive budget
    /// ([`receive_bytes`](Self::receive_bytes), [`receive_budget`](Self::receive_budget);
    /// see [`crate::subscription`] for the exact bound).
    pub fn subscription_capacity(mut self, capacity: usize) -> Self {
        self.subscription_capacity = capacity.max(1);
        self
    }

    /// The most sender instances the namespace's anti-replay record tracks, and
    /// each of its subscriptions' anti-replay state (about 64 bytes each, see
    /// [`crate::replay`]). Default: 100,000.
    pub fn max_replay_senders(mut self, max: usize) -> Self {
        self.max_replay_senders = max.max(1);
        self
    }

    /// The most requests in flight at once; one more fails at once with
    /// [`RequestErrorKind::TooManyPending`](crate::RequestErrorKind) instead of
    /// growing the reply table. Default: 65,536.
    pub fn max_pending_requests(mut self, max: usize) -> Self {
        self.max_pending_requests = max.max(1);
        self
    }

    /// How long `request` waits for a verified response. Default: 10 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long connecting may take. Default: 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The tenant's admission layer, consulted before every publish, request and
    /// response. Default: none (everything admitted).
    pub fn admission(mut self, admission: Arc<dyn Admission>) -> Self {
        self.admission = Some(admission);
        self
    }

    /// The limit of the namespace's own receive budget, shared by all its
    /// subscriptions, used when no budget is shared with it through
    /// [`receive_budget`](Self::receive_budget). A received message that does not
    /// fit is dropped on arrival (counted under
    /// [`DropReason::ReceiveBudget`](crate::DropReason::ReceiveBudget), reported
    /// as [`BusEvent::ReceiveBudgetExhausted`](crate::BusEvent)). It must be at
    /// least the largest message expected (the server's `max_payload` plus
    /// [`PER_MESSAGE_OVERHEAD`](crate::budget::PER_MESSAGE_OVERHEAD) and the
    /// subject): a message whose charge exceeds the limit never fits.
    /// Default: [`DEFAULT_RECEIVE_BYTES`] (64 MiB), a fresh budget per connect.
    pub fn receive_bytes(mut self, limit: u64) -> Self {
        self.receive_bytes = limit;
        self
    }

    /// A receive budget shared with other namespaces: every subscription of every
    /// namespace connected with a clone of it charges the same budget, so their
    /// queued messages together hold at most its limit. A runtime host shares
    /// one per tenant. Overrides [`receive_bytes`](Self::receive_bytes).
    /// Default: none (a budget of its own per namespace).
    pub fn receive_budget(mut self, budget: Arc<ByteBudget>) -> Self {
        self.receive_budget = Some(budget);
        self
    }

    /// The shared budget, or a fresh one of `receive_bytes`.
    pub(crate) fn resolve_receive_budget(&self) -> Arc<ByteBudget> {
        match &self.receive_budget {
            Some(b) => b.clone(),
            None => Arc::new(ByteBudget::new(self.receive_bytes)),
        }
    }

    /// A NATS token to log in with when the bundle carries no `.creds` (an
    /// API key: the server's auth callout decides who it is). Ignored when the
    /// bundle has credentials.
    pub fn auth_token(mut self, token: impl Into<String>) -> Self {
        self.auth_token = Some(token.into());
        self
    }

    /// Connects with these options.
    pub async fn connect(self, bundle: &CredentialBundle) -> Result<TenantNamespace, ConnectError> {
        TenantNamespace::connect_with(bundle, self).await
    }
}
