//! [`NamespaceOptions`]: how a [`TenantNamespace`] connects
//! and verifies. A `Clone` builder; every default is documented on its setter.

use std::sync::Arc;
use std::time::Duration;

use crate::admission::Admission;
use crate::bundle::CredentialBundle;
use crate::namespace::{ConnectError, TenantNamespace};
use crate::verify::Freshness;

/// Options of a namespace connection.
#[derive(Clone)]
pub struct NamespaceOptions {
    pub(crate) freshness: Freshness,
    pub(crate) subscription_capacity: usize,
    pub(crate) max_replay_senders: usize,
    pub(crate) max_pending_requests: usize,
    pub(crate) request_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) admission: Option<Arc<dyn Admission>>,
}

impl std::fmt::Debug for NamespaceOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamespaceOptions")
            .field("freshness", &self.freshness)
            .field("subscription_capacity", &self.subscription_capacity)
            .field("max_replay_senders", &self.max_replay_senders)
            .field("max_pending_requests", &self.max_pending_requests)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("admission", &self.admission.is_some())
            .finish()
    }
}

impl Default for NamespaceOptions {
    fn default() -> Self {
        Self {
            freshness: Freshness::default(),
            subscription_capacity: 65_536,
            max_replay_senders: 100_000,
            max_pending_requests: 65_536,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            admission: None,
        }
    }
}

impl NamespaceOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Messages older than this are dropped as stale. Default: 5 minutes.
    pub fn replay_window(mut self, window: Duration) -> Self {
        self.freshness.replay_window = window;
        self
    }

    /// Messages stamped further in the future than this are dropped. Default: 30 s.
    pub fn clock_skew(mut self, skew: Duration) -> Self {
        self.freshness.clock_skew = skew;
        self
    }

    /// Messages buffered per subscription before async-nats drops them and reports
    /// a slow consumer (surfaced as [`BusEvent::SlowConsumer`](crate::BusEvent)).
    /// Default: 65,536. Memory held is at most this many messages per subscription.
    pub fn subscription_capacity(mut self, capacity: usize) -> Self {
        self.subscription_capacity = capacity.max(1);
        self
    }

    /// The most sender instances one subscription's anti-replay state tracks
    /// (about 56 bytes each). Default: 100,000.
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

    /// Connects with these options.
    pub async fn connect(self, bundle: &CredentialBundle) -> Result<TenantNamespace, ConnectError> {
        TenantNamespace::connect_with(bundle, self).await
    }
}
