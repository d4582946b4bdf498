//! Anti-replay state that does not grow with traffic.
//!
//! Every message id is `instance || sequence` (see [`crate::envelope`]): a sealer
//! numbers its messages 1, 2, 3, ... under a random 64-bit instance id. So, as
//! IPsec and DTLS do, a receiver keeps per sender instance only the highest
//! sequence seen and a 128-bit sliding bitmap of the sequences just below it. A
//! message is a replay if its bit is already set, or if it is more than
//! [`WINDOW_BITS`] behind the highest (too old to tell, so refused).
//!
//! # Memory
//! One [`SenderWindow`] is 32 bytes (highest sequence, bitmap, last-seen time);
//! with its 8-byte key and the hash table's control byte and load factor, about 48
//! to 56 bytes per sender instance. State is bounded by the number of *senders*
//! seen in the last replay window, never by the number of messages, and capped at
//! [`ReplayOptions::max_senders`]: at the cap, messages of a new sender are refused
//! ([`DropReason::ReplayStateFull`]) rather than evicting a live sender, which
//! would reopen a replay hole.
//!
//! # Guarantee
//! - Inside one subscription, a message id is delivered at most once while its
//!   sender is tracked, whatever the order duplicates arrive in, as long as the
//!   original arrived no more than 128 sequences behind the sender's newest.
//! - A sender idle for longer than the replay window plus the clock-skew allowance
//!   is evicted. Every message it sent before carries a timestamp older than the
//!   replay window by then, so the timestamp check (which runs before this one)
//!   rejects any replay of it as stale: eviction never admits a replay.
//! - A sender first seen mid-stream is accepted from whatever sequence arrives.
//!
//! State is per subscription: one message delivered to two overlapping
//! subscriptions of the same namespace is not a replay.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

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

use crate::verify::DropReason;

/// Width of the sliding bitmap, in sequences.
pub const WINDOW_BITS: u64 = 128;

/// Limits of a [`ReplayGuard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayOptions {
    /// How long a sender is remembered after its last message, in ms: the replay
    /// window plus the clock-skew allowance.
    pub retain_ms: u64,
    /// The most sender instances tracked at once.
    pub max_senders: usize,
}

/// Per sender instance: highest sequence, bitmap of the 128 below, last seen.
#[derive(Debug, Clone, Copy)]
pub struct SenderWindow {
    top: u64,
    bitmap: u128,
    last_seen_ms: u64,
}

/// The anti-replay state of one subscription.
///
/// It also remembers the last subject and sender it saw, so a stream of messages
/// on one subject from one agent allocates neither per message (two small
/// fields, not part of the replay state).
#[derive(Debug)]
pub struct ReplayGuard {
    options: ReplayOptions,
    senders: SenderTable,
    last_sweep_ms: u64,
    last_subject: Option<(String, crate::subject::Subject)>,
    last_sender: Option<crate::ids::AgentId>,
}

impl ReplayGuard {
    /// An empty guard.
    pub fn new(options: ReplayOptions) -> Self {
        Self {
            options,
            senders: SenderTable::default(),
            last_sweep_ms: 0,
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
        self.senders.len()
    }

    /// Records `(instance, sequence)` seen at `now_ms`, or says why it is refused.
    /// Nothing is recorded for a refused message.
    pub fn check(&mut self, instance: u64, sequence: u64, now_ms: u64) -> Result<(), DropReason> {
        self.maybe_sweep(now_ms);
        if let Some(w) = self.senders.get_mut(&instance) {
            w.last_seen_ms = w.last_seen_ms.max(now_ms);
            if sequence > w.top {
                let shift = sequence - w.top;
                w.bitmap = if shift >= WINDOW_BITS {
                    0
                } else {
                    w.bitmap << shift
                };
                w.bitmap |= 1;
                w.top = sequence;
                return Ok(());
            }
            let behind = w.top - sequence;
            if behind >= WINDOW_BITS {
                return Err(DropReason::Replay);
            }
            let bit = 1u128 << behind;
            if w.bitmap & bit != 0 {
                return Err(DropReason::Replay);
            }
            w.bitmap |= bit;
            return Ok(());
        }
        if self.senders.len() >= self.options.max_senders {
            // Evict what has expired before refusing a newcomer.
            self.sweep(now_ms);
            if self.senders.len() >= self.options.max_senders {
                return Err(DropReason::ReplayStateFull);
            }
        }
        self.senders.insert(
            instance,
            SenderWindow {
                top: sequence,
                bitmap: 1,
                last_seen_ms: now_ms,
            },
        );
        Ok(())
    }

    fn maybe_sweep(&mut self, now_ms: u64) {
        // Sweeping at a quarter of the retention keeps the amortised cost O(1) per
        // message while bounding how long an idle sender outlives its retention.
        if now_ms.saturating_sub(self.last_sweep_ms) >= (self.options.retain_ms / 4).max(1) {
            self.sweep(now_ms);
        }
    }

    fn sweep(&mut self, now_ms: u64) {
        let retain = self.options.retain_ms;
        self.senders
            .retain(|_, w| w.last_seen_ms.saturating_add(retain) >= now_ms);
        self.last_sweep_ms = now_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(max: usize) -> ReplayGuard {
        ReplayGuard::new(ReplayOptions {
            retain_ms: 1_000,
            max_senders: max,
        })
    }

    #[test]
    fn duplicates_rejected_in_any_order() {
        let mut g = guard(10);
        let order = [5u64, 1, 3, 2, 4, 9, 7, 8, 6, 130];
        for s in order {
            assert_eq!(g.check(1, s, 0), Ok(()), "first {s}");
        }
        for s in order {
            assert_eq!(g.check(1, s, 0), Err(DropReason::Replay), "dup {s}");
        }
        // 1 is now more than 128 behind 130: refused as too old.
        assert_eq!(g.check(1, 1, 0), Err(DropReason::Replay));
        assert_eq!(g.check(1, 131, 0), Ok(()));
    }

    #[test]
    fn senders_are_independent_and_bounded() {
        let mut g = guard(2);
        assert_eq!(g.check(1, 1, 0), Ok(()));
        assert_eq!(g.check(2, 1, 0), Ok(()));
        assert_eq!(g.check(3, 1, 0), Err(DropReason::ReplayStateFull));
        assert_eq!(g.senders(), 2);
        // After the retention, idle senders are evicted and a newcomer fits.
        assert_eq!(g.check(3, 1, 2_000), Ok(()));
        assert_eq!(g.senders(), 1);
    }

    #[test]
    fn large_jump_clears_window() {
        let mut g = guard(1);
        assert_eq!(g.check(7, 1, 0), Ok(()));
        assert_eq!(g.check(7, 1_000_000, 0), Ok(()));
        assert_eq!(g.check(7, 999_999, 0), Ok(()));
        assert_eq!(g.check(7, 999_999, 0), Err(DropReason::Replay));
    }
}
