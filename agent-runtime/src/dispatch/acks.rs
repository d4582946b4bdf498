//! JetStream publish acknowledgements on one inbox.
//!
//! async-nats' JetStream publish gives every message a fresh inbox name, a
//! request entry in the connection's mux, two timers (send and answer) and an
//! untagged-enum parse of the answer. A dispatcher publishes every task and a
//! worker writes every outcome this way, so here a publish is one message
//! with the reply subject `<inbox>.<n>` on one long-lived subscription, a
//! oneshot in a table, and a direct parse of the `PubAck`; one sweep a second
//! fails the publishes whose answer is overdue. The errors are async-nats'
//! own ([`PublishError`] with the same kinds and sources), so callers and
//! [`tenant_bus::settle`] read them as before. Measured in `agentbus bench`
//! (see BENCHMARKS.md).
//!
//! Unanswered publishes are bounded ([`MAX_PENDING`] by default): a publisher
//! that never awaits its acks waits for a free place instead of growing the
//! table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, ErrorCode};
use bytes::Bytes;
use futures::StreamExt as _;
use serde::Deserialize;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

/// Publishes awaiting their answer at most, per inbox, by default
/// ([`DispatchOptions::max_unanswered`](super::DispatchOptions::max_unanswered)).
pub(crate) const MAX_PENDING: usize = 8192;
/// How long a publish may wait for its answer (async-nats' JetStream default).
pub(crate) const ACK_TIMEOUT: Duration = Duration::from_secs(5);

type Answer = Result<PublishAck, PublishError>;

/// A publish waiting for its answer.
struct Pending {
    reply: oneshot::Sender<Answer>,
    sent: tokio::time::Instant,
}

type Table = Arc<Mutex<HashMap<u64, Pending>>>;

/// One acknowledgement inbox and the task reading it. Dropping it ends that
/// task; publishes still waiting then fail ([`PublishErrorKind::BrokenPipe`]).
pub(crate) struct AckInbox {
    nats: async_nats::Client,
    inbox: String,
    next: AtomicU64,
    pending: Table,
    places: Arc<Semaphore>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for AckInbox {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The answer to one publish, to await.
pub(crate) struct AckFuture {
    answer: oneshot::Receiver<Answer>,
    _place: OwnedSemaphorePermit,
}

impl AckFuture {
    /// The stream's `PubAck`, or the error async-nats would report.
    pub(crate) async fn wait(self) -> Answer {
        self.answer
            .await
            .unwrap_or_else(|_| Err(PublishError::new(PublishErrorKind::BrokenPipe)))
    }
}

impl AckInbox {
    /// Subscribes `<inbox>.*` on `nats` and starts its reader; at most
    /// `max_pending` publishes await their answer at once.
    pub(crate) async fn start(
        nats: async_nats::Client,
        max_pending: usize,
    ) -> Result<Self, async_nats::SubscribeError> {
        let inbox = nats.new_inbox();
        let sub = nats.subscribe(format!("{inbox}.*")).await?;
        let pending: Table = Arc::default();
        let reader = tokio::spawn(read_answers(sub, pending.clone()));
        Ok(Self {
            nats,
            inbox,
            next: AtomicU64::new(1),
            pending,
            places: Arc::new(Semaphore::new(max_pending.max(1))),
            reader,
        })
    }

    /// Publishes `payload` to `subject` with `headers`, answered on this
    /// inbox. Waits while the bound's worth of publishes are unanswered.
    pub(crate) async fn publish(
        &self,
        subject: String,
        headers: async_nats::HeaderMap,
        payload: Bytes,
    ) -> Result<AckFuture, PublishError> {
        let place = self
            .places
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| PublishError::with_source(PublishErrorKind::Other, e))?;
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| PublishError::new(PublishErrorKind::Other))?
            .insert(
                n,
                Pending {
                    reply,
                    sent: tokio::time::Instant::now(),
                },
            );
        // Handing the message to the connection waits while its command
        // queue is full (e.g. while disconnected): bounded like the answer,
        // as async-nats bounds it. (No timer is armed when it is ready.)
        let sent = tokio::time::timeout(
            ACK_TIMEOUT,
            self.nats.publish_with_reply_and_headers(
                subject,
                format!("{}.{n}", self.inbox),
                headers,
                payload,
            ),
        )
        .await;
        let failed = match sent {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(PublishError::with_source(PublishErrorKind::Other, e)),
            Err(_) => Some(PublishError::new(PublishErrorKind::TimedOut)),
        };
        if let Some(e) = failed {
            if let Ok(mut p) = self.pending.lock() {
                p.remove(&n);
            }
            return Err(e);
        }
        Ok(AckFuture {
            answer,
            _place: place,
        })
    }
}

/// Hands each answer to its publisher; once a second fails the publishes
/// unanswered for [`ACK_TIMEOUT`].
async fn read_answers(mut sub: async_nats::Subscriber, pending: Table) {
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = sub.next() => {
                let Some(msg) = msg else {
                    // The subscription ended (the client closed): fail what waits.
                    if let Ok(mut p) = pending.lock() {
                        for (_, w) in p.drain() {
                            let _ = w.reply.send(Err(PublishError::new(PublishErrorKind::BrokenPipe)));
                        }
                    }
                    return;
                };
                let Some(n) = msg
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                else {
                    continue;
                };
                let waiting = pending.lock().ok().and_then(|mut p| p.remove(&n));
                // None: answered after its timeout; the caller already gave up.
                if let Some(w) = waiting {
                    let _ = w.reply.send(answer(&msg));
                }
            }
            _ = sweep.tick() => {
                let Ok(mut p) = pending.lock() else { return };
                let overdue: Vec<u64> = p
                    .iter()
                    .filter(|(_, w)| w.sent.elapsed() >= ACK_TIMEOUT)
                    .map(|(n, _)| *n)
                    .collect();
                for n in overdue {
                    if let Some(w) = p.remove(&n) {
                        let _ = w.reply.send(Err(PublishError::new(PublishErrorKind::TimedOut)));
                    }
                }
            }
        }
    }
}

/// A `PubAck` or an API error, without async-nats' untagged-enum parse.
#[derive(Deserialize)]
struct Reply {
    #[serde(default)]
    error: Option<jetstream::Error>,
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    domain: Option<String>,
}

/// Reads one answer exactly as async-nats' publish future does: "no
/// responders" is [`PublishErrorKind::StreamNotFound`], the two conditional
/// failures have their kinds, any other API error is `Other` with the
/// [`jetstream::Error`] as its source.
fn answer(msg: &async_nats::Message) -> Answer {
    if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
        return Err(PublishError::new(PublishErrorKind::StreamNotFound));
    }
    let r: Reply = serde_json::from_slice(&msg.payload)
        .map_err(|e| PublishError::with_source(PublishErrorKind::Other, e))?;
    match (r.error, r.stream, r.seq) {
        (Some(error), _, _) => Err(match error.error_code() {
            ErrorCode::STREAM_WRONG_LAST_MESSAGE_ID => {
                PublishError::with_source(PublishErrorKind::WrongLastMessageId, error)
            }
            ErrorCode::STREAM_WRONG_LAST_SEQUENCE => {
                PublishError::with_source(PublishErrorKind::WrongLastSequence, error)
            }
            _ => PublishError::with_source(PublishErrorKind::Other, error),
        }),
        (None, Some(stream), Some(sequence)) => Ok(PublishAck {
            stream,
            sequence,
            domain: r.domain.unwrap_or_default(),
            duplicate: r.duplicate,
            ..Default::default()
        }),
        _ => Err(PublishError::new(PublishErrorKind::Other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(payload: &str, status: Option<async_nats::StatusCode>) -> async_nats::Message {
        async_nats::Message {
            subject: "_INBOX.x.1".into(),
            reply: None,
            payload: Bytes::from(payload.to_string()),
            headers: None,
            status,
            description: None,
            length: payload.len(),
        }
    }

    #[test]
    fn a_pub_ack_is_read_with_its_sequence_and_duplicate_flag() {
        let ack = answer(&msg(r#"{"stream":"T","seq":7}"#, None));
        assert!(matches!(
            ack,
            Ok(PublishAck {
                sequence: 7,
                duplicate: false,
                ..
            })
        ));
        let dup = answer(&msg(r#"{"stream":"T","seq":7,"duplicate":true}"#, None));
        assert!(matches!(
            dup,
            Ok(PublishAck {
                sequence: 7,
                duplicate: true,
                ..
            })
        ));
    }

    #[test]
    fn errors_have_the_kinds_async_nats_gives_them() {
        let wrong =
            r#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 3"}}"#;
        let e = answer(&msg(wrong, None)).err();
        assert_eq!(
            e.map(|e| e.kind()),
            Some(PublishErrorKind::WrongLastSequence)
        );
        let other = r#"{"error":{"code":503,"err_code":10077,"description":"maximum messages per subject exceeded"}}"#;
        let e = answer(&msg(other, None)).err();
        assert_eq!(e.as_ref().map(|e| e.kind()), Some(PublishErrorKind::Other));
        let source = e
            .as_ref()
            .and_then(|e| std::error::Error::source(e))
            .and_then(|s| s.downcast_ref::<jetstream::Error>())
            .map(|s| s.error_code());
        assert_eq!(source, Some(ErrorCode::STREAM_STORE_FAILED));
        let none = answer(&msg("", Some(async_nats::StatusCode::NO_RESPONDERS))).err();
        assert_eq!(
            none.map(|e| e.kind()),
            Some(PublishErrorKind::StreamNotFound)
        );
        for bad in ["not json", "{}", r#"{"stream":"T"}"#] {
            assert!(answer(&msg(bad, None)).is_err(), "{bad}");
        }
    }
}
