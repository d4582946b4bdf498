//! [`Subscription`]: a stream of verified [`TenantMessage`]s.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt as _};

use crate::message::TenantMessage;
use crate::replay::ReplayGuard;
use crate::verify::Verifier;

/// After this many dropped messages in one poll, yield to the executor so a flood of
/// bad messages cannot starve other tasks.
const MAX_DROPS_PER_POLL: usize = 64;

/// A subscription inside a tenant namespace. Yields only messages that passed
/// verification; the rest are counted and dropped. Unsubscribes on drop.
pub struct Subscription {
    inner: async_nats::Subscriber,
    verifier: Verifier,
    guard: ReplayGuard,
    /// `tenant.<id>._INBOX.`: reply inboxes (and `sync` probes) belong to the
    /// library's request muxers. A pattern cannot name them (`_INBOX` is reserved),
    /// but one with a leading wildcard (`>`, `*.*.*`) matches them; such traffic is
    /// skipped uncounted instead of being counted as a drop on every request.
    inbox: String,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("senders_tracked", &self.guard.senders())
            .finish()
    }
}

impl Subscription {
    pub(crate) fn new(
        inner: async_nats::Subscriber,
        verifier: Verifier,
        guard: ReplayGuard,
    ) -> Self {
        let inbox = format!("{}.", crate::subject::inbox_prefix(verifier.tenant()));
        Self {
            inner,
            verifier,
            guard,
            inbox,
        }
    }

    /// Stops the subscription at the server.
    pub async fn unsubscribe(mut self) {
        // An error means the connection is already gone, which also ends it.
        let _ = self.inner.unsubscribe().await;
    }

    /// Sender instances tracked by this subscription's anti-replay state.
    pub fn replay_senders(&self) -> usize {
        self.guard.senders()
    }
}

impl Stream for Subscription {
    type Item = TenantMessage;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        for _ in 0..MAX_DROPS_PER_POLL {
            match this.inner.poll_next_unpin(cx) {
                Poll::Ready(Some(msg)) => {
                    if msg.subject.starts_with(this.inbox.as_str()) {
                        continue;
                    }
                    let reply = msg.reply.as_ref().map(|r| r.as_str());
                    if let Some(m) = this.verifier.verify_counted(
                        &mut this.guard,
                        msg.subject.as_str(),
                        reply,
                        &msg.payload,
                        None,
                    ) {
                        return Poll::Ready(Some(m));
                    }
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
