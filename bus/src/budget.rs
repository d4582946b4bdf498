//! [`ByteBudget`]: a byte bound on received messages, shared by every subscription
//! (and every namespace) that holds a clone of its `Arc`.
//!
//! A subscription takes a message's charge ([`charge`]) from its budget before the
//! message enters its queue and gives it back when the application takes the
//! message (or the subscription is dropped with the message still queued). A
//! message whose charge does not fit is dropped, counted under
//! [`DropReason::ReceiveBudget`](crate::DropReason::ReceiveBudget). A runtime host
//! shares one budget across all namespaces of a tenant, so the bytes one tenant's
//! subscriptions hold on that host never exceed its limit, whatever it is sent.
//!
//! Lock-free: one compare-and-swap loop to take, one subtraction to give back.
//! The amount held never exceeds the limit and never goes below zero (a release
//! of more than is held clamps at zero).

use std::sync::atomic::{AtomicU64, Ordering};

/// Default limit of a namespace's own budget when none is shared with it
/// ([`NamespaceOptions::receive_bytes`](crate::NamespaceOptions::receive_bytes)):
/// 64 MiB.
pub const DEFAULT_RECEIVE_BYTES: u64 = 64 * 1024 * 1024;

/// Fixed bytes charged per queued message on top of its body, subject and reply
/// lengths: the [`TenantMessage`](crate::TenantMessage) itself, its queue slot,
/// and the sender, subject and reply allocations' headers (allocator rounding
/// included). Checked against `size_of` in the tests.
pub const PER_MESSAGE_OVERHEAD: u64 = 256;

/// What one received message is charged: the wire body (the ciphertext, at least
/// as long as the plaintext that is queued), the full subject and reply lengths,
/// and [`PER_MESSAGE_OVERHEAD`].
pub fn charge(body_len: usize, subject_len: usize, reply_len: usize) -> u64 {
    (body_len as u64)
        .saturating_add(subject_len as u64)
        .saturating_add(reply_len as u64)
        .saturating_add(PER_MESSAGE_OVERHEAD)
}

/// A byte limit and the bytes currently held against it.
#[derive(Debug)]
pub struct ByteBudget {
    limit: u64,
    held: AtomicU64,
}

impl ByteBudget {
    /// A budget of `limit` bytes, none held.
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            held: AtomicU64::new(0),
        }
    }

    /// The limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Bytes that may still be taken.
    pub fn available(&self) -> u64 {
        self.limit.saturating_sub(self.held())
    }

    /// Takes `bytes` if they fit under the limit; `false` (nothing taken) if not.
    pub fn try_take(&self, bytes: u64) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |held| {
                held.checked_add(bytes).filter(|n| *n <= self.limit)
            })
            .is_ok()
    }

    /// Gives back `bytes` taken before. Never goes below zero.
    pub fn release(&self, bytes: u64) {
        // fetch_update with a closure that always returns Some cannot fail.
        let _ = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |held| {
                Some(held.saturating_sub(bytes))
            });
    }
}

impl Default for ByteBudget {
    /// A budget of [`DEFAULT_RECEIVE_BYTES`].
    fn default() -> Self {
        Self::new(DEFAULT_RECEIVE_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn take_and_release() {
        let b = ByteBudget::new(100);
        assert!(b.try_take(60));
        assert!(!b.try_take(41), "over the limit");
        assert_eq!(b.held(), 60, "a refused take takes nothing");
        assert!(b.try_take(40));
        assert_eq!(b.available(), 0);
        assert!(!b.try_take(1));
        b.release(100);
        assert_eq!(b.held(), 0);
        assert!(b.try_take(100));
        assert!(!b.try_take(0) || b.held() == 100);
    }

    #[test]
    fn never_negative_and_no_overflow() {
        let b = ByteBudget::new(10);
        b.release(5);
        assert_eq!(b.held(), 0);
        assert!(b.try_take(7));
        b.release(1_000);
        assert_eq!(b.held(), 0);
        assert!(!b.try_take(u64::MAX));
        assert!(b.try_take(10));
        assert!(!b.try_take(u64::MAX), "held + MAX overflows: refused");
        assert_eq!(b.held(), 10);
        let big = ByteBudget::new(u64::MAX);
        assert!(big.try_take(u64::MAX));
        assert!(!big.try_take(1));
    }

    #[test]
    fn a_message_larger_than_the_limit_never_fits() {
        let b = ByteBudget::new(1024);
        assert!(!b.try_take(charge(1024, 0, 0)));
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn charge_covers_the_queued_message() {
        // The fixed overhead covers the message struct and its queue slot.
        let slot = std::mem::size_of::<(crate::TenantMessage, u64)>() as u64;
        assert!(slot + 64 <= PER_MESSAGE_OVERHEAD, "slot {slot} B");
        assert_eq!(charge(10, 20, 30), 60 + PER_MESSAGE_OVERHEAD);
        assert_eq!(charge(usize::MAX, usize::MAX, 0), u64::MAX);
    }

    #[test]
    fn concurrent_takes_never_exceed_the_limit_and_balance() {
        const THREADS: usize = 8;
        const ROUNDS: usize = 20_000;
        let b = Arc::new(ByteBudget::new(1_000));
        let max_seen = Arc::new(AtomicU64::new(0));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let b = b.clone();
                let max_seen = max_seen.clone();
                std::thread::spawn(move || {
                    let mut taken = 0u64;
                    for i in 0..ROUNDS {
                        let n = ((t * 31 + i * 7) % 150 + 1) as u64;
                        if b.try_take(n) {
                            max_seen.fetch_max(b.held(), Ordering::Relaxed);
                            b.release(n);
                            taken += 1;
                        }
                    }
                    taken
                })
            })
            .collect();
        let mut total = 0;
        for h in handles {
            total += h.join().unwrap_or(0);
        }
        assert!(total > 0);
        assert_eq!(b.held(), 0, "every take was given back");
        assert!(max_seen.load(Ordering::Relaxed) <= 1_000);
    }
}
