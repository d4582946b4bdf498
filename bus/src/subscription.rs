//! [`Subscription`]: a stream of verified [`TenantMessage`]s, bounded in messages
//! and in bytes.
//!
//! # Where received bytes accumulate, and the bound
//!
//! async-nats hands every message of a subscription to an mpsc channel of
//! [`subscription_capacity`](crate::NamespaceOptions::subscription_capacity)
//! messages. A consumer that does not poll would let that channel hold up to
//! `subscription_capacity × max_payload` bytes (65,536 × 1 MiB by default), per
//! subscription. So a subscription does not hand that channel to the
//! application: a *pump* task drains it as soon as the runtime schedules it, and
//! never waits for the application. For each message the pump
//!
//! 1. skips the library's own inbox traffic (see below);
//! 2. drops it if the subscription's queue already holds `subscription_capacity`
//!    messages (counted in [`Counters::slow_consumer`](crate::verify::Counters::slow_consumer),
//!    [`BusEvent::SlowConsumer`] once per episode);
//! 3. takes its [`charge`](crate::budget::charge) (wire body + subject + reply +
//!    [`PER_MESSAGE_OVERHEAD`](crate::budget::PER_MESSAGE_OVERHEAD)) from the
//!    receive [`ByteBudget`], or drops it unopened if that does not fit
//!    ([`DropReason::ReceiveBudget`],
//!    [`BusEvent::ReceiveBudgetExhausted`] once per episode, logged at `warn`
//!    for the first 10 drops and then every power of two);
//! 4. verifies it (a message failing verification gives its charge back at once)
//!    and queues the verified message, whose payload is a fresh allocation of
//!    the plaintext: the async-nats buffer it arrived in is released here;
//! 5. the charge is given back when the application takes the message, or when
//!    the subscription is dropped with it still queued.
//!
//! The bound per subscription is therefore: the queue holds at most
//! `subscription_capacity` messages and, together with every other subscription
//! sharing the budget, at most the budget's limit in charged bytes (a charge is
//! at least the bytes the queued message holds); async-nats' channel holds only
//! what the connection read since the pump last ran (on a fair runtime, one poll
//! of the connection task: at most 128 socket reads, tokio's cooperative budget,
//! of at most the 64 KiB read buffer or one message if larger: about 8 MiB), and
//! never more than `subscription_capacity` messages. A handler that blocks its
//! runtime thread (no `.await`) stops the pump as well, and async-nats' channel
//! then fills to its message capacity: do not block the runtime.
//!
//! Verification moves with the pump, off the application's poll: the consumer's
//! `poll_next` only takes the next verified message. The cost is one queue push
//! and pop and two atomic updates of the budget per message (see BENCHMARKS.md).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt as _};
use tokio::sync::{broadcast, mpsc};

use crate::budget::ByteBudget;
use crate::events::BusEvent;
use crate::message::TenantMessage;
use crate::replay::ReplayGuard;
use crate::verify::{should_log, DropReason, Verifier};

/// Ids of the library's subscription queues start here, above any async-nats
/// subscription id, so the two never meet in [`BusEvent::SlowConsumer`].
const FIRST_ID: u64 = 1 << 48;
static NEXT_ID: AtomicU64 = AtomicU64::new(FIRST_ID);

/// What the pump and the subscription share.
#[derive(Debug, Default)]
struct Shared {
    /// Messages in the queue.
    queued: AtomicUsize,
    /// Sender instances tracked by the pump's anti-replay state.
    senders: AtomicUsize,
}

/// A verified message and the bytes it holds against the budget.
type Queued = (TenantMessage, u64);

/// A subscription inside a tenant namespace. Yields only messages that passed
/// verification; the rest are counted and dropped. Bounded in messages and in
/// bytes (see the [module docs](self)). Unsubscribes on drop.
pub struct Subscription {
    id: u64,
    rx: mpsc::UnboundedReceiver<Queued>,
    budget: Arc<ByteBudget>,
    shared: Arc<Shared>,
    pump: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .field("queued", &self.queued())
            .field("senders_tracked", &self.replay_senders())
            .finish()
    }
}

/// Everything the pump task owns.
struct Pump {
    id: u64,
    verifier: Verifier,
    guard: ReplayGuard,
    /// `tenant.<id>._INBOX.`: reply inboxes (and `sync` probes) belong to the
    /// library's request muxers. A pattern cannot name them (`_INBOX` is reserved),
    /// but one with a leading wildcard (`>`, `*.*.*`) matches them; such traffic is
    /// skipped uncounted instead of being counted as a drop on every request.
    inbox: String,
    capacity: usize,
    budget: Arc<ByteBudget>,
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Queued>,
    events: broadcast::Sender<BusEvent>,
    /// Dropping since the last queued message (one event per episode).
    overflowing: bool,
}

impl Pump {
    /// Handles one message from async-nats; `false` once the subscription is gone.
    fn accept(&mut self, msg: async_nats::Message) -> bool {
        if msg.subject.starts_with(self.inbox.as_str()) {
            return true;
        }
        if self.shared.queued.load(Ordering::Acquire) >= self.capacity {
            let n = self.verifier.counters().count_slow_consumer();
            if should_log(n) {
                tracing::warn!(
                    tenant = %self.verifier.tenant(),
                    sid = self.id,
                    capacity = self.capacity,
                    count = n,
                    "subscription queue full (slow consumer): dropped a message"
                );
            }
            self.overflow(BusEvent::SlowConsumer { sid: self.id });
            return true;
        }
        let reply = msg.reply.as_ref().map(|r| r.as_str());
        let charge = crate::budget::charge(
            msg.payload.len(),
            msg.subject.len(),
            reply.map_or(0, str::len),
        );
        if !self.budget.try_take(charge) {
            let counters = self.verifier.counters();
            counters.count_drop(DropReason::ReceiveBudget);
            let n = counters.dropped(DropReason::ReceiveBudget);
            if should_log(n) {
                tracing::warn!(
                    tenant = %self.verifier.tenant(),
                    sid = self.id,
                    limit = self.budget.limit(),
                    held = self.budget.held(),
                    bytes = charge,
                    count = n,
                    "receive byte budget used up: dropped a message"
                );
            }
            self.overflow(BusEvent::ReceiveBudgetExhausted {
                sid: self.id,
                limit: self.budget.limit(),
            });
            return true;
        }
        let verified = self.verifier.verify_counted(
            &mut self.guard,
            msg.subject.as_str(),
            reply,
            &msg.payload,
            None,
        );
        // The async-nats buffer is released here; a verified message owns its
        // plaintext.
        drop(msg);
        self.shared
            .senders
            .store(self.guard.senders(), Ordering::Relaxed);
        let Some(m) = verified else {
            self.budget.release(charge);
            return true;
        };
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        if self.tx.send((m, charge)).is_err() {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            self.budget.release(charge);
            return false;
        }
        self.overflowing = false;
        true
    }

    /// Reports the first drop of an episode.
    fn overflow(&mut self, event: BusEvent) {
        if !self.overflowing {
            self.overflowing = true;
            tracing::warn!(?event, "dropping received messages at the bound");
            // No receiver is fine: the counters hold the count.
            let _ = self.events.send(event);
        }
    }

    async fn run(mut self, mut inner: async_nats::Subscriber) {
        while let Some(msg) = inner.next().await {
            if !self.accept(msg) {
                break;
            }
        }
        // Dropping `inner` unsubscribes at the server.
    }
}

/// How a namespace sets up a subscription.
pub(crate) struct SubscriptionConfig {
    pub(crate) verifier: Verifier,
    pub(crate) guard: ReplayGuard,
    pub(crate) capacity: usize,
    pub(crate) budget: Arc<ByteBudget>,
    pub(crate) events: broadcast::Sender<BusEvent>,
}

impl Subscription {
    /// Starts the pump (on the current tokio runtime) for `inner`.
    pub(crate) fn new(inner: async_nats::Subscriber, config: SubscriptionConfig) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let inbox = format!(
            "{}.",
            crate::subject::inbox_prefix(config.verifier.tenant())
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        let pump = Pump {
            id,
            verifier: config.verifier,
            guard: config.guard,
            inbox,
            capacity: config.capacity.max(1),
            budget: config.budget.clone(),
            shared: shared.clone(),
            tx,
            events: config.events,
            overflowing: false,
        };
        let pump = tokio::spawn(pump.run(inner));
        Self {
            id,
            rx,
            budget: config.budget,
            shared,
            pump,
        }
    }

    /// This subscription's id, as reported in [`BusEvent::SlowConsumer`] and
    /// [`BusEvent::ReceiveBudgetExhausted`] (unique in the process, at least 2^48).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Stops the subscription at the server.
    pub async fn unsubscribe(self) {
        // Dropping the pump's async-nats subscriber unsubscribes; `Drop` below
        // gives back what is still queued.
        self.pump.abort();
    }

    /// Sender instances tracked by this subscription's anti-replay state.
    pub fn replay_senders(&self) -> usize {
        self.shared.senders.load(Ordering::Relaxed)
    }

    /// Verified messages waiting in this subscription's queue.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }

    /// The receive budget this subscription charges.
    pub fn receive_budget(&self) -> &Arc<ByteBudget> {
        &self.budget
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.pump.abort();
        // After `close`, the pump's sends fail (and it gives their charge back);
        // what was queued before is given back here.
        self.rx.close();
        while let Ok((_, charge)) = self.rx.try_recv() {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            self.budget.release(charge);
        }
    }
}

impl Stream for Subscription {
    type Item = TenantMessage;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some((m, charge))) => {
                this.shared.queued.fetch_sub(1, Ordering::AcqRel);
                this.budget.release(charge);
                Poll::Ready(Some(m))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}
