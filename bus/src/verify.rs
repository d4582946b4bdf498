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
    /// Older than the replay window; or, from a sender the anti-replay state no
    /// longer tracks, stamped no later than the newest message of a sender it
    /// evicted (this happens only after the receiver's clock stepped back; see
    /// [`crate::replay`]).
    Stale,
    /// Further in the future than the clock-skew allowance.
    Future,
    /// A message id already delivered on this subscription, or accepted by the
    /// namespace before this subscription was made (see [`crate::replay`]), or
    /// more than 128 sequences behind its sender's newest.
    Replay,
    /// The anti-replay state (the subscription's, or the namespace's record) is
    /// at its sender cap.
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

/// The longest replay window [`Freshness::new`] accepts: 24 hours.
///
/// The anti-replay state remembers a sender for the window plus the skew after
/// its last message, so the window is how long a departed sender costs memory;
/// a day covers any bus message (queued tasks wait longer, and do not use this
/// window: see `agent-runtime`'s dispatch). The bound also keeps every sum of
/// timestamps and windows far from `u64` overflow.
pub const MAX_REPLAY_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// The largest clock-skew allowance [`Freshness::new`] accepts: 1 hour. A
/// larger allowance would accept messages stamped that far in the future, which
/// then stay fresh (replayable across a restart) that much longer.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(3600);

/// What is wrong with freshness settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FreshnessErrorKind {
    /// The replay window is zero or longer than [`MAX_REPLAY_WINDOW`].
    ReplayWindow,
    /// The clock skew is longer than [`MAX_CLOCK_SKEW`].
    ClockSkew,
}

crate::kind_display!(FreshnessErrorKind {
    ReplayWindow => "replay window out of range (1 ms to 24 h)",
    ClockSkew => "clock skew out of range (0 to 1 h)",
});

/// An error in freshness settings.
pub type FreshnessError = crate::error::Error<FreshnessErrorKind>;

/// Freshness settings of verification: how old (the replay window) and how far
/// in the future (the clock skew) a message's timestamp may be. Validated on
/// construction ([`Freshness::new`]); kept in whole milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// Messages older than this (ms) are stale. Default 5 minutes.
    window_ms: u64,
    /// Messages stamped further ahead than this (ms) are refused. Default 30 s.
    skew_ms: u64,
}

impl Default for Freshness {
    fn default() -> Self {
        Self {
            window_ms: 300_000,
            skew_ms: 30_000,
        }
    }
}

impl Freshness {
    /// Settings with `replay_window` (1 ms to [`MAX_REPLAY_WINDOW`]) and
    /// `clock_skew` (0 to [`MAX_CLOCK_SKEW`]), each truncated to whole
    /// milliseconds (the resolution of envelope timestamps).
    pub fn new(replay_window: Duration, clock_skew: Duration) -> Result<Self, FreshnessError> {
        if replay_window > MAX_REPLAY_WINDOW || replay_window.as_millis() == 0 {
            return Err(crate::error::Error::new(
                FreshnessErrorKind::ReplayWindow,
                format!("{replay_window:?}"),
            ));
        }
        if clock_skew > MAX_CLOCK_SKEW {
            return Err(crate::error::Error::new(
                FreshnessErrorKind::ClockSkew,
                format!("{clock_skew:?}"),
            ));
        }
        // Both are bounded above, so the conversions are exact.
        Ok(Self {
            window_ms: replay_window.as_millis() as u64,
            skew_ms: clock_skew.as_millis() as u64,
        })
    }

    /// The replay window.
    pub fn replay_window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }

    /// The clock-skew allowance.
    pub fn clock_skew(&self) -> Duration {
        Duration::from_millis(self.skew_ms)
    }

    /// Checks `timestamp_ms` against `now_ms`.
    pub fn check(&self, timestamp_ms: u64, now_ms: u64) -> Result<(), DropReason> {
        if timestamp_ms.saturating_add(self.window_ms) < now_ms {
            return Err(DropReason::Stale);
        }
        if timestamp_ms > now_ms.saturating_add(self.skew_ms) {
            return Err(DropReason::Future);
        }
        Ok(())
    }

    /// How long the anti-replay state must remember a sender (window + skew),
    /// in ms; at most 25 hours.
    pub fn retain_ms(&self) -> u64 {
        self.window_ms + self.skew_ms
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
        // Drops are the rare path; the metrics facade is one atomic load
        // without a recorder.
        metrics::counter!("agentbus_bus_dropped_total", "reason" => reason.as_str()).increment(1);
    }
    pub(crate) fn count_delivered(&self) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_slow_consumer(&self) -> u64 {
        metrics::counter!("agentbus_bus_slow_consumer_total").increment(1);
        self.slow_consumer.fetch_add(1, Ordering::Relaxed) + 1
    }
    pub(crate) fn count_permission_violation(&self) {
        metrics::counter!("agentbus_bus_permission_violations_total").increment(1);
        self.permission_violation.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_server_error(&self) {
        self.server_error.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_admission_rejection(&self) {
        metrics::counter!("agentbus_bus_admission_rejections_total").increment(1);
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

    /// A fresh, standalone anti-replay state sized for these settings (one
    /// stream of messages; a namespace's subscriptions use
    /// [`shared_replay`](Self::shared_replay) instead).
    pub fn replay_guard(&self, max_senders: usize) -> crate::replay::ReplayGuard {
        crate::replay::ReplayGuard::new(self.replay_options(max_senders))
    }

    /// A replay record to share among several subscriptions of one namespace
    /// (see [`crate::replay::SharedReplay`]), sized for these settings.
    pub fn shared_replay(&self, max_senders: usize) -> std::sync::Arc<crate::replay::SharedReplay> {
        crate::replay::SharedReplay::new(self.replay_options(max_senders))
    }

    fn replay_options(&self, max_senders: usize) -> crate::replay::ReplayOptions {
        crate::replay::ReplayOptions {
            retain_ms: self.freshness.retain_ms(),
            max_senders,
        }
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
        guard.check(
            header.msg_id.instance(),
            header.msg_id.sequence(),
            header.timestamp_ms,
            now_ms,
        )?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn kind(r: Result<Freshness, FreshnessError>) -> FreshnessErrorKind {
        r.map(|_| ()).unwrap_err().kind()
    }

    /// `Duration::MAX` used to panic in `retain_ms` (Duration overflow) and a
    /// window of 2^64 ms and more was truncated by `as u64`: both are now refused
    /// on construction.
    #[test]
    fn freshness_refuses_windows_out_of_range() {
        let skew = Duration::from_secs(30);
        for window in [
            Duration::MAX,
            Duration::from_millis(u64::MAX),
            Duration::from_secs(u64::MAX / 999),
            MAX_REPLAY_WINDOW + Duration::from_millis(1),
            Duration::ZERO,
            Duration::from_micros(999),
        ] {
            assert_eq!(
                kind(Freshness::new(window, skew)),
                FreshnessErrorKind::ReplayWindow,
                "{window:?}"
            );
        }
        for skew in [Duration::MAX, MAX_CLOCK_SKEW + Duration::from_millis(1)] {
            assert_eq!(
                kind(Freshness::new(Duration::from_secs(1), skew)),
                FreshnessErrorKind::ClockSkew,
                "{skew:?}"
            );
        }
    }

    #[test]
    fn freshness_at_its_maximum_is_exact() {
        let f = Freshness::new(MAX_REPLAY_WINDOW, MAX_CLOCK_SKEW).unwrap();
        assert_eq!(f.retain_ms(), 25 * 3_600_000);
        assert_eq!(f.replay_window(), MAX_REPLAY_WINDOW);
        let now = 1_750_000_000_000;
        assert_eq!(f.check(now - 24 * 3_600_000, now), Ok(()));
        assert_eq!(
            f.check(now - 24 * 3_600_000 - 1, now),
            Err(DropReason::Stale)
        );
        assert_eq!(f.check(now + 3_600_000, now), Ok(()));
        assert_eq!(f.check(now + 3_600_001, now), Err(DropReason::Future));
        // Extreme timestamps saturate instead of wrapping.
        assert_eq!(f.check(u64::MAX, u64::MAX), Ok(()));
        assert_eq!(f.check(0, u64::MAX), Err(DropReason::Stale));
        assert_eq!(f.check(u64::MAX, 0), Err(DropReason::Future));
        assert_eq!(
            Freshness::default(),
            Freshness::new(Duration::from_secs(300), Duration::from_secs(30)).unwrap()
        );
    }
}
