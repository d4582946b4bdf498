//! Verification on receive, and the public drop counters.
//!
//! A received message is delivered only if it decodes, names this tenant, arrived
//! on a subject inside this tenant's namespace, is sealed with a key version the
//! key set still holds, authenticates, lies inside the replay window (not older
//! than the window, not further in the future than the clock-skew allowance) and
//! is not a replay. Otherwise it is dropped, counted under its [`DropReason`] and
//! logged at `warn`; never delivered, never a panic, whatever the bytes.
//!
//! Timestamp checks run after authentication, so an altered timestamp counts as
//! [`DropReason::Authentication`]; only authentic old or future messages count as
//! [`DropReason::Stale`] or [`DropReason::Future`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Why a received message was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DropReason {
    /// Not a well-formed envelope (truncated, random bytes, bad lengths or ids).
    Malformed,
    /// An envelope format version this build does not read.
    UnsupportedVersion,
    /// The envelope names another tenant.
    WrongTenant,
    /// The NATS subject or reply lies outside the tenant's namespace.
    OutsideNamespace,
    /// Sealed with a key version not in the key set (unknown or retired).
    UnknownKey,
    /// The tag did not verify: altered bytes, another subject, another key.
    Authentication,
    /// Older than the replay window.
    Stale,
    /// Further in the future than the clock-skew allowance.
    Future,
    /// A message id already delivered on this subscription.
    Replay,
    /// The anti-replay table is at its sender cap.
    ReplayStateFull,
    /// The receive byte budget (the namespace's, or the tenant's on a runtime
    /// host) was used up: the message was dropped on arrival, before being
    /// opened, rather than buffered (see [`crate::budget`]).
    ReceiveBudget,
}

impl DropReason {
    /// Every reason, in declaration order.
    pub const ALL: [DropReason; 11] = [
        DropReason::Malformed,
        DropReason::UnsupportedVersion,
        DropReason::WrongTenant,
        DropReason::OutsideNamespace,
        DropReason::UnknownKey,
        DropReason::Authentication,
        DropReason::Stale,
        DropReason::Future,
        DropReason::Replay,
        DropReason::ReplayStateFull,
        DropReason::ReceiveBudget,
    ];

    /// A short stable name (for metrics labels).
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnsupportedVersion => "unsupported_version",
            DropReason::WrongTenant => "wrong_tenant",
            DropReason::OutsideNamespace => "outside_namespace",
            DropReason::UnknownKey => "unknown_key",
            DropReason::Authentication => "authentication",
            DropReason::Stale => "stale",
            DropReason::Future => "future",
            DropReason::Replay => "replay",
            DropReason::ReplayStateFull => "replay_state_full",
            DropReason::ReceiveBudget => "receive_budget",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Freshness settings of verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// Messages older than this are stale. Default 5 minutes.
    pub replay_window: Duration,
    /// Messages stamped further ahead than this are refused. Default 30 s.
    pub clock_skew: Duration,
}

impl Default for Freshness {
    fn default() -> Self {
        Self {
            replay_window: Duration::from_secs(300),
            clock_skew: Duration::from_secs(30),
        }
    }
}

impl Freshness {
    /// Checks `timestamp_ms` against `now_ms`.
    pub fn check(&self, timestamp_ms: u64, now_ms: u64) -> Result<(), DropReason> {
        let window = self.replay_window.as_millis() as u64;
        let skew = self.clock_skew.as_millis() as u64;
        if timestamp_ms.saturating_add(window) < now_ms {
            return Err(DropReason::Stale);
        }
        if timestamp_ms > now_ms.saturating_add(skew) {
            return Err(DropReason::Future);
        }
        Ok(())
    }

    /// How long the anti-replay state must remember a sender (window + skew).
    pub fn retain_ms(&self) -> u64 {
        (self.replay_window + self.clock_skew).as_millis() as u64
    }
}

/// Counters of one namespace: messages delivered and dropped per reason, and the
/// asynchronous events async-nats reports. Lock-free; read at any time.
#[derive(Debug, Default)]
pub struct Counters {
    delivered: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
    slow_consumer: AtomicU64,
    permission_violation: AtomicU64,
    server_error: AtomicU64,
    rejected_by_admission: AtomicU64,
}

/// A point-in-time copy of [`Counters`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CountersSnapshot {
    /// Messages delivered to the application.
    pub delivered: u64,
    /// Messages dropped, per reason (every reason present, zeros included).
    pub dropped: Vec<(DropReason, u64)>,
    /// Slow-consumer drops: messages dropped because a subscription's queue was
    /// at its message capacity, plus async-nats' slow-consumer events.
    pub slow_consumer: u64,
    /// Permission violations reported by the server.
    pub permission_violation: u64,
    /// Other server errors.
    pub server_error: u64,
    /// Outgoing messages refused by the admission layer.
    pub rejected_by_admission: u64,
}

impl CountersSnapshot {
    /// Drops counted for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped
            .iter()
            .find(|(r, _)| *r == reason)
            .map(|(_, n)| *n)
            .unwrap_or(0)
    }

    /// All drops.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().map(|(_, n)| n).sum()
    }
}

impl Counters {
    /// Drops counted so far for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()].load(Ordering::Relaxed)
    }

    /// Messages delivered so far.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Slow-consumer drops so far (a subscription's queue at its message
    /// capacity, one per message; async-nats' own slow-consumer events).
    pub fn slow_consumer(&self) -> u64 {
        self.slow_consumer.load(Ordering::Relaxed)
    }

    /// Permission violations so far.
    pub fn permission_violation(&self) -> u64 {
        self.permission_violation.load(Ordering::Relaxed)
    }

    /// A copy of every counter.
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            delivered: self.delivered(),
            dropped: DropReason::ALL
                .iter()
                .map(|r| (*r, self.dropped(*r)))
                .collect(),
            slow_consumer: self.slow_consumer(),
            permission_violation: self.permission_violation(),
            server_error: self.server_error.load(Ordering::Relaxed),
            rejected_by_admission: self.rejected_by_admission.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn count_drop(&self, reason: DropReason) {
        self.dropped[reason.index()].fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_delivered(&self) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_slow_consumer(&self) -> u64 {
        self.slow_consumer.fetch_add(1, Ordering::Relaxed) + 1
    }
    pub(crate) fn count_permission_violation(&self) {
        self.permission_violation.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_server_error(&self) {
        self.server_error.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_admission_rejection(&self) {
        self.rejected_by_admission.fetch_add(1, Ordering::Relaxed);
    }
}

/// Whether the `n`th event of a kind is logged: the first 10, then every power of
/// two, so a flood cannot flood the log (the counters stay exact).
pub(crate) fn should_log(n: u64) -> bool {
    n <= 10 || n.is_power_of_two()
}

/// Verifies received bodies for one tenant and counts the outcome.
#[derive(Debug, Clone)]
pub struct Verifier {
    keys: crate::keys::KeyCell,
    tenant: crate::ids::TenantId,
    freshness: Freshness,
    counters: std::sync::Arc<Counters>,
}

impl Verifier {
    /// A verifier for the tenant of `keys`.
    pub fn new(
        keys: std::sync::Arc<crate::keys::TenantKeySet>,
        freshness: Freshness,
        counters: std::sync::Arc<Counters>,
    ) -> Self {
        Self::with_cell(crate::keys::key_cell(keys), freshness, counters)
    }

    /// A verifier on a shared, replaceable key set (see [`crate::keys::KeyCell`]).
    pub fn with_cell(
        keys: crate::keys::KeyCell,
        freshness: Freshness,
        counters: std::sync::Arc<Counters>,
    ) -> Self {
        Self {
            tenant: keys.load().tenant().clone(),
            keys,
            freshness,
            counters,
        }
    }

    /// The tenant whose messages this verifier accepts.
    pub(crate) fn tenant(&self) -> &crate::ids::TenantId {
        &self.tenant
    }

    /// The freshness settings.
    pub fn freshness(&self) -> Freshness {
        self.freshness
    }

    /// The counters this verifier updates.
    pub fn counters(&self) -> &std::sync::Arc<Counters> {
        &self.counters
    }

    /// A fresh anti-replay state sized for these settings.
    pub fn replay_guard(&self, max_senders: usize) -> crate::replay::ReplayGuard {
        crate::replay::ReplayGuard::new(crate::replay::ReplayOptions {
            retain_ms: self.freshness.retain_ms(),
            max_senders,
        })
    }

    /// Verifies one message received on the full `subject`, whose `reply` (if any)
    /// was bound into the seal, against the replay state `guard`.
    ///
    /// The outcome is not counted; see [`Verifier::verify_counted`].
    ///
    /// `response_to` is set for a response to a request: the subject must then be
    /// one of the tenant's reply inboxes, and the delivered message carries the
    /// request's relative subject.
    pub fn verify(
        &self,
        guard: &mut crate::replay::ReplayGuard,
        subject: &str,
        reply: Option<&str>,
        body: &[u8],
        now_ms: u64,
        response_to: Option<&crate::subject::Subject>,
    ) -> Result<crate::message::TenantMessage, DropReason> {
        let tenant = &self.tenant;
        let keys = self.keys.load();
        let (header, payload) = crate::envelope::open_parts(&keys, subject, reply, body)?;
        let relative = match response_to {
            Some(request) if crate::subject::is_tenant_inbox(tenant, subject) => request.clone(),
            Some(_) => return Err(DropReason::OutsideNamespace),
            None => guard.relative_subject(tenant, subject)?,
        };
        let reply = match reply {
            Some(r) if crate::subject::is_tenant_inbox(tenant, r) => {
                Some(crate::message::ReplyTo::new(r))
            }
            Some(_) => return Err(DropReason::OutsideNamespace),
            None => None,
        };
        self.freshness.check(header.timestamp_ms, now_ms)?;
        guard.check(header.msg_id.instance(), header.msg_id.sequence(), now_ms)?;
        let sender = match header.sender {
            Some(s) => Some(guard.sender(s)?),
            None => None,
        };
        Ok(crate::message::TenantMessage {
            subject: relative,
            tenant: tenant.clone(),
            msg_id: header.msg_id,
            timestamp: std::time::UNIX_EPOCH + Duration::from_millis(header.timestamp_ms),
            sender,
            key_version: header.key_version,
            payload,
            reply,
        })
    }

    /// [`Verifier::verify`], counting the outcome and logging drops at `warn`
    /// (the first 10 of each reason, then every power of two, so a flood of bad
    /// messages cannot flood the log).
    pub fn verify_counted(
        &self,
        guard: &mut crate::replay::ReplayGuard,
        subject: &str,
        reply: Option<&str>,
        body: &[u8],
        response_to: Option<&crate::subject::Subject>,
    ) -> Option<crate::message::TenantMessage> {
        match self.verify(
            guard,
            subject,
            reply,
            body,
            crate::envelope::now_ms(),
            response_to,
        ) {
            Ok(msg) => {
                self.counters.count_delivered();
                Some(msg)
            }
            Err(reason) => {
                self.counters.count_drop(reason);
                let n = self.counters.dropped(reason);
                if should_log(n) {
                    tracing::warn!(
                        tenant = %self.tenant,
                        subject = %subject.escape_debug(),
                        reason = reason.as_str(),
                        count = n,
                        "dropped a message that failed verification"
                    );
                }
                None
            }
        }
    }
}
