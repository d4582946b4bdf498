//! Anti-replay state that does not grow with traffic.
//!
//! Every message id is `instance || sequence` (see [`crate::envelope`]): a sealer
//! numbers its messages 1, 2, 3, ... under a random 64-bit instance id. So, as
//! IPsec and DTLS do, a receiver keeps per sender instance only the highest
//! sequence seen and a 128-bit sliding bitmap of the sequences just below it. A
//! message is a replay if its bit is already set, or if it is more than
//! [`WINDOW_BITS`] behind the highest (too old to tell, so refused).
//!
//! # One record per namespace, one window per subscription
//!
//! NATS delivers one copy of a message to every subscription it matches, so two
//! subscriptions of one namespace (`orders.>` and `orders.created`) both receive
//! it, legitimately, once each. The same message a second time on one
//! subscription is a replay. So what is remembered is per (namespace,
//! subscription): each subscription's [`ReplayGuard`] has its own windows.
//!
//! Windows per subscription alone would let a captured message be replayed onto
//! a subscription made *after* the namespace accepted it (an agent that
//! re-subscribes, a handler loop restarted after a suspension): the new window
//! is empty. So a namespace also keeps one [`SharedReplay`] record, the union of
//! what all its subscriptions accepted, and a new subscription's guard starts as
//! a copy of that record, taken once the server confirmed the subscription. A
//! message the namespace accepted before then was published before the
//! subscription was live; NATS promises it to no new subscription, so the new
//! one refuses it as a replay. What the namespace accepts afterwards, each
//! subscription matching it delivers once.
//!
//! # Guarantee
//! - A message id is delivered at most once per subscription while its sender
//!   is tracked, whatever the order duplicates arrive in, as long as the
//!   original arrived no more than 128 sequences behind the sender's newest.
//! - A message id the namespace delivered before a subscription was made is
//!   never delivered on that subscription, with one residual gap: a message
//!   still queued in another subscription's pump (accepted there only after the
//!   new subscription was confirmed) can be replayed once onto the new one. The
//!   pumps drain as soon as they are scheduled, so the gap is the time a pump
//!   lags behind the socket.
//! - A sender whose newest accepted message is older than the replay window plus
//!   the clock-skew allowance is evicted: everything it sent is then stale, so
//!   the timestamp check (which runs first) refuses any replay of it. The newest
//!   timestamp of every evicted sender is kept as a *horizon*: a message of an
//!   untracked sender stamped at or before it is refused as stale, so a receiver
//!   clock that steps back cannot make an evicted sender's messages fresh again.
//!   With a clock that never steps back this refuses nothing the timestamp check
//!   would not.
//! - A sender first seen mid-stream is accepted from whatever sequence arrives.
//! - Nothing survives the process: a restarted receiver (a new namespace)
//!   accepts once, per subscription, any authentic message still inside the
//!   replay window (see `docs/bounds.md`).
//!
//! # Memory
//! One [`SenderWindow`] is 32 bytes (highest sequence, bitmap, newest
//! timestamp); with its 8-byte key and the hash table's control byte and load
//! factor, about 48 to 56 bytes per sender instance. State is bounded by the
//! number of *senders* seen in the last replay window, never by the number of
//! messages, and capped at [`ReplayOptions::max_senders`] in the namespace's
//! record and in each subscription's guard: at the cap, messages of a new sender
//! are refused ([`DropReason::ReplayStateFull`]) rather than evicting a live
//! sender, which would reopen a replay hole. A new subscription copies the
//! record (at most `max_senders` entries, once, under the record's lock).
//!
//! The record is one mutex per namespace, taken once per accepted message by
//! the subscription that accepted it; the check inside is a hash lookup and a
//! few shifts, so subscriptions contend only for that long. Responses to
//! requests do not go through it: each lands on its own one-use inbox, bound
//! into the seal, and the request muxer keeps its own guard.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::verify::DropReason;

/// Hashes a sender instance id with one multiplication (Fibonacci hashing).
///
/// Instance ids are drawn at random by each sealer, and the table is consulted
/// only after a message authenticated under the tenant's key, so no outsider can
/// pick keys to collide: SipHash's flooding resistance buys nothing here and costs
/// more than the rest of the check.
#[derive(Default)]
pub struct InstanceHasher(u64);

impl Hasher for InstanceHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed; fold anything else in byte by byte.
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type SenderTable = HashMap<u64, SenderWindow, BuildHasherDefault<InstanceHasher>>;

/// Width of the sliding bitmap, in sequences.
pub const WINDOW_BITS: u64 = 128;

/// Limits of a [`ReplayGuard`] or [`SharedReplay`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayOptions {
    /// How long a sender is remembered after the timestamp of its newest
    /// message, in ms: the replay window plus the clock-skew allowance.
    pub retain_ms: u64,
    /// The most sender instances tracked at once.
    pub max_senders: usize,
}

/// Per sender instance: highest sequence, bitmap of the 128 below, newest
/// timestamp accepted.
#[derive(Debug, Clone, Copy)]
pub struct SenderWindow {
    top: u64,
    bitmap: u128,
    newest_ms: u64,
}

impl SenderWindow {
    fn new(sequence: u64, timestamp_ms: u64) -> Self {
        Self {
            top: sequence,
            bitmap: 1,
            newest_ms: timestamp_ms,
        }
    }

    /// Whether `sequence` may still be accepted (not seen, not too old).
    fn admits(&self, sequence: u64) -> bool {
        if sequence > self.top {
            return true;
        }
        let behind = self.top - sequence;
        behind < WINDOW_BITS && self.bitmap & (1u128 << behind) == 0
    }

    /// Records `sequence` as seen (a no-op if it is too old to record).
    fn mark(&mut self, sequence: u64, timestamp_ms: u64) {
        self.newest_ms = self.newest_ms.max(timestamp_ms);
        if sequence > self.top {
            let shift = sequence - self.top;
            self.bitmap = if shift >= WINDOW_BITS {
                0
            } else {
                self.bitmap << shift
            };
            self.bitmap |= 1;
            self.top = sequence;
            return;
        }
        let behind = self.top - sequence;
        if behind < WINDOW_BITS {
            self.bitmap |= 1u128 << behind;
        }
    }
}

/// Sender windows with eviction and the horizon of what was evicted.
#[derive(Debug, Clone, Default)]
struct Table {
    senders: SenderTable,
    last_sweep_ms: u64,
    /// The newest timestamp of any evicted sender, once one was evicted.
    horizon_ms: Option<u64>,
}

impl Table {
    /// Refused if `instance` is untracked and stamped at or before the horizon
    /// (see the module docs), or untracked and the table is full even after
    /// evicting expired senders.
    fn room_for(
        &mut self,
        options: &ReplayOptions,
        instance: u64,
        timestamp_ms: u64,
        now_ms: u64,
    ) -> Result<(), DropReason> {
        if self.senders.contains_key(&instance) {
            return Ok(());
        }
        if self.horizon_ms.is_some_and(|h| timestamp_ms <= h) {
            return Err(DropReason::Stale);
        }
        if self.senders.len() >= options.max_senders {
            // Evict what has expired before refusing a newcomer.
            self.sweep(options, now_ms);
            if self.senders.len() >= options.max_senders {
                return Err(DropReason::ReplayStateFull);
            }
        }
        Ok(())
    }

    /// Accepts and records `(instance, sequence)`, or says why it is refused.
    /// Nothing is recorded for a refused message.
    fn check(
        &mut self,
        options: &ReplayOptions,
        instance: u64,
        sequence: u64,
        timestamp_ms: u64,
        now_ms: u64,
    ) -> Result<(), DropReason> {
        self.maybe_sweep(options, now_ms);
        if let Some(w) = self.senders.get_mut(&instance) {
            if !w.admits(sequence) {
                return Err(DropReason::Replay);
            }
            w.mark(sequence, timestamp_ms);
            return Ok(());
        }
        self.room_for(options, instance, timestamp_ms, now_ms)?;
        self.senders
            .insert(instance, SenderWindow::new(sequence, timestamp_ms));
        Ok(())
    }

    /// Records `(instance, sequence)` as accepted somewhere (the union of
    /// several guards): never refuses; `room_for` was asked first.
    fn record(
        &mut self,
        options: &ReplayOptions,
        instance: u64,
        sequence: u64,
        timestamp_ms: u64,
        now_ms: u64,
    ) {
        self.maybe_sweep(options, now_ms);
        self.senders
            .entry(instance)
            .and_modify(|w| w.mark(sequence, timestamp_ms))
            .or_insert_with(|| SenderWindow::new(sequence, timestamp_ms));
    }

    fn maybe_sweep(&mut self, options: &ReplayOptions, now_ms: u64) {
        // Sweeping at a quarter of the retention keeps the amortised cost O(1) per
        // message while bounding how long an idle sender outlives its retention.
        if now_ms.saturating_sub(self.last_sweep_ms) >= (options.retain_ms / 4).max(1) {
            self.sweep(options, now_ms);
        }
    }

    fn sweep(&mut self, options: &ReplayOptions, now_ms: u64) {
        let retain = options.retain_ms;
        let mut horizon = self.horizon_ms;
        self.senders.retain(|_, w| {
            let keep = w.newest_ms.saturating_add(retain) >= now_ms;
            if !keep {
                horizon = Some(horizon.map_or(w.newest_ms, |h| h.max(w.newest_ms)));
            }
            keep
        });
        self.horizon_ms = horizon;
        self.last_sweep_ms = now_ms;
    }
}

/// The anti-replay state of one subscription (or any one stream of messages).
///
/// Made standalone with [`ReplayGuard::new`], or from a namespace's
/// [`SharedReplay`] with [`SharedReplay::guard`]: it then starts from what the
/// namespace accepted so far and adds what it accepts to the record.
///
/// It also remembers the last subject and sender it saw, so a stream of messages
/// on one subject from one agent allocates neither per message (two small
/// fields, not part of the replay state).
#[derive(Debug)]
pub struct ReplayGuard {
    options: ReplayOptions,
    table: Table,
    shared: Option<Arc<SharedReplay>>,
    last_subject: Option<(String, crate::subject::Subject)>,
    last_sender: Option<crate::ids::AgentId>,
}

impl ReplayGuard {
    /// An empty, standalone guard.
    pub fn new(options: ReplayOptions) -> Self {
        Self {
            options,
            table: Table::default(),
            shared: None,
            last_subject: None,
            last_sender: None,
        }
    }

    /// The relative subject of `full` in `tenant`'s namespace, reusing the last one
    /// when `full` repeats.
    pub(crate) fn relative_subject(
        &mut self,
        tenant: &crate::ids::TenantId,
        full: &str,
    ) -> Result<crate::subject::Subject, DropReason> {
        if let Some((last, subject)) = &self.last_subject {
            if last == full {
                return Ok(subject.clone());
            }
        }
        let subject =
            crate::subject::unscope(tenant, full).map_err(|_| DropReason::OutsideNamespace)?;
        self.last_subject = Some((full.to_string(), subject.clone()));
        Ok(subject)
    }

    /// The sender id `s` (validated), reusing the last one when it repeats.
    pub(crate) fn sender(&mut self, s: &str) -> Result<crate::ids::AgentId, DropReason> {
        if let Some(last) = &self.last_sender {
            if last.as_str() == s {
                return Ok(last.clone());
            }
        }
        let id = crate::ids::AgentId::new(s).map_err(|_| DropReason::Malformed)?;
        self.last_sender = Some(id.clone());
        Ok(id)
    }

    /// How many sender instances are tracked.
    pub fn senders(&self) -> usize {
        self.table.senders.len()
    }

    /// Records `(instance, sequence)`, stamped `timestamp_ms`, seen at `now_ms`,
    /// or says why it is refused: [`DropReason::Replay`] (seen, or too far
    /// behind), [`DropReason::ReplayStateFull`] (a new sender at the cap, here
    /// or in the namespace's record), [`DropReason::Stale`] (a new sender stamped
    /// at or before the horizon of evicted senders). Nothing is recorded for a
    /// refused message.
    pub fn check(
        &mut self,
        instance: u64,
        sequence: u64,
        timestamp_ms: u64,
        now_ms: u64,
    ) -> Result<(), DropReason> {
        let Some(shared) = &self.shared else {
            return self
                .table
                .check(&self.options, instance, sequence, timestamp_ms, now_ms);
        };
        // The record's lock is held across the whole check, so the guard and the
        // record agree: the record has room before this guard commits, and what
        // this guard accepts is in the record before another subscription is
        // made from it.
        let mut record = shared.lock();
        record.room_for(&shared.options, instance, timestamp_ms, now_ms)?;
        self.table
            .check(&self.options, instance, sequence, timestamp_ms, now_ms)?;
        record.record(&shared.options, instance, sequence, timestamp_ms, now_ms);
        Ok(())
    }
}

/// What all subscriptions of one namespace accepted: the union of their
/// windows, bounded like one guard (see the [module docs](self)).
#[derive(Debug)]
pub struct SharedReplay {
    options: ReplayOptions,
    table: Mutex<Table>,
}

impl SharedReplay {
    /// An empty record.
    pub fn new(options: ReplayOptions) -> Arc<Self> {
        Arc::new(Self {
            options,
            table: Mutex::new(Table::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // Nothing panics while holding the lock; if something ever did, the
        // table is still a valid (if incomplete) record, better than none.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A guard for a new subscription: a copy of the record at this moment
    /// (expired senders left out), feeding the record from now on. Make it once
    /// the server confirmed the subscription (see the module docs).
    pub fn guard(self: &Arc<Self>) -> ReplayGuard {
        let table = {
            let mut record = self.lock();
            record.sweep(&self.options, crate::envelope::now_ms());
            record.clone()
        };
        ReplayGuard {
            options: self.options,
            table,
            shared: Some(self.clone()),
            last_subject: None,
            last_sender: None,
        }
    }

    /// How many sender instances the record tracks.
    pub fn senders(&self) -> usize {
        self.lock().senders.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPTIONS: ReplayOptions = ReplayOptions {
        retain_ms: 1_000,
        max_senders: 10,
    };

    fn guard(max: usize) -> ReplayGuard {
        ReplayGuard::new(ReplayOptions {
            max_senders: max,
            ..OPTIONS
        })
    }

    #[test]
    fn duplicates_rejected_in_any_order() {
        let mut g = guard(10);
        let order = [5u64, 1, 3, 2, 4, 9, 7, 8, 6, 130];
        for s in order {
            assert_eq!(g.check(1, s, 0, 0), Ok(()), "first {s}");
        }
        for s in order {
            assert_eq!(g.check(1, s, 0, 0), Err(DropReason::Replay), "dup {s}");
        }
        // 1 is now more than 128 behind 130: refused as too old.
        assert_eq!(g.check(1, 1, 0, 0), Err(DropReason::Replay));
        assert_eq!(g.check(1, 131, 0, 0), Ok(()));
    }

    #[test]
    fn senders_are_independent_and_bounded() {
        let mut g = guard(2);
        assert_eq!(g.check(1, 1, 0, 0), Ok(()));
        assert_eq!(g.check(2, 1, 0, 0), Ok(()));
        assert_eq!(g.check(3, 1, 0, 0), Err(DropReason::ReplayStateFull));
        assert_eq!(g.senders(), 2);
        // After the retention, idle senders are evicted and a newcomer fits.
        assert_eq!(g.check(3, 1, 2_000, 2_000), Ok(()));
        assert_eq!(g.senders(), 1);
    }

    #[test]
    fn large_jump_clears_window() {
        let mut g = guard(1);
        assert_eq!(g.check(7, 1, 0, 0), Ok(()));
        assert_eq!(g.check(7, 1_000_000, 0, 0), Ok(()));
        assert_eq!(g.check(7, 999_999, 0, 0), Ok(()));
        assert_eq!(g.check(7, 999_999, 0, 0), Err(DropReason::Replay));
    }

    /// The receiver's clock steps back after a sender was evicted: without the
    /// horizon, the evicted sender's message would be new to the table and
    /// inside the (now earlier) freshness window, so it would be accepted again.
    #[test]
    fn a_clock_stepping_back_does_not_reopen_evicted_senders() {
        let mut g = guard(10);
        let t = 1_000_000;
        assert_eq!(g.check(1, 1, t, t), Ok(()));
        // Much later another sender's message sweeps sender 1 out.
        assert_eq!(g.check(2, 1, t + 5_000, t + 5_000), Ok(()));
        assert_eq!(g.senders(), 1);
        // The clock goes back to t + 100: the replay of (1, 1) would pass the
        // freshness check again, but it is at or before the horizon.
        assert_eq!(g.check(1, 1, t, t + 100), Err(DropReason::Stale));
        // A sender stamped after the horizon is new and accepted.
        assert_eq!(g.check(3, 1, t + 1, t + 100), Ok(()));
    }

    #[test]
    fn overlapping_subscriptions_each_deliver_once() {
        let record = SharedReplay::new(OPTIONS);
        let mut a = record.guard();
        let mut b = record.guard();
        for seq in [1u64, 3, 2] {
            assert_eq!(a.check(9, seq, 0, 0), Ok(()), "a {seq}");
            assert_eq!(b.check(9, seq, 0, 0), Ok(()), "b {seq}");
            assert_eq!(a.check(9, seq, 0, 0), Err(DropReason::Replay));
            assert_eq!(b.check(9, seq, 0, 0), Err(DropReason::Replay));
        }
        assert_eq!(record.senders(), 1);
    }

    /// Fails with guards per subscription alone: the later subscription's
    /// window would be empty.
    #[test]
    fn a_later_subscription_refuses_what_the_namespace_accepted_before_it() {
        let record = SharedReplay::new(ReplayOptions {
            // Long enough that the real clock used by `guard()` sweeps nothing.
            retain_ms: u64::MAX / 2,
            ..OPTIONS
        });
        let mut first = record.guard();
        assert_eq!(first.check(5, 1, 10, 10), Ok(()));
        assert_eq!(first.check(5, 2, 10, 10), Ok(()));
        drop(first);
        let mut later = record.guard();
        assert_eq!(later.check(5, 1, 10, 11), Err(DropReason::Replay));
        assert_eq!(later.check(5, 2, 10, 11), Err(DropReason::Replay));
        // What the namespace accepts after the subscription was made, it may
        // deliver once, also when another subscription accepted it first.
        let mut other = record.guard();
        assert_eq!(other.check(5, 3, 10, 12), Ok(()));
        assert_eq!(later.check(5, 3, 10, 12), Ok(()));
        assert_eq!(later.check(5, 3, 10, 12), Err(DropReason::Replay));
    }

    #[test]
    fn the_record_caps_new_senders_for_every_subscription() {
        let record = SharedReplay::new(ReplayOptions {
            retain_ms: u64::MAX / 2,
            max_senders: 2,
        });
        let mut a = record.guard();
        let mut b = record.guard();
        assert_eq!(a.check(1, 1, 0, 0), Ok(()));
        assert_eq!(b.check(2, 1, 0, 0), Ok(()));
        // Each guard holds one sender, but the namespace already tracks two.
        assert_eq!(a.check(3, 1, 0, 0), Err(DropReason::ReplayStateFull));
        assert_eq!(b.check(3, 1, 0, 0), Err(DropReason::ReplayStateFull));
        // Known senders still pass, on either subscription.
        assert_eq!(a.check(2, 1, 0, 0), Ok(()));
        assert_eq!(b.check(1, 2, 0, 0), Ok(()));
        assert_eq!((a.senders(), b.senders(), record.senders()), (2, 2, 2));
    }
}
