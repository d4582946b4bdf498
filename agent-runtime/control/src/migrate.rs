//! Copying a deployment's JetStream data from one server (or cluster) to
//! another: how a single server's data reaches a cluster.
//!
//! NATS cannot turn a single server's store into a cluster member's (it
//! deletes the streams it finds there without a cluster assignment as
//! orphans, nats-server issue 5467); its answer is a backup and a restore.
//! This module copies each stream of an account instead, through the
//! JetStream API of both sides: the stream's configuration (with the new
//! deployment's replicas), then every message in order with its subject,
//! headers and payload, each publish acknowledged by the target before the
//! copy counts it. The source is read with get-message requests to the
//! stream (read-only whatever its retention: a consumer on a work queue
//! would take the tasks): a stream whose live messages fill at least half of
//! its sequence range is read by sequence, 256 requests in flight (a deleted
//! sequence answers "no message" and is skipped); a sparser one (a bucket
//! whose keys were overwritten many times) with one "next message at or
//! after this sequence" request at a time, gaps skipped by the server.
//! Publishes are pipelined 256 deep. What the stream held when the copy of
//! it started is copied.
//!
//! What changes: stream sequences (and so KV revisions) are
//! renumbered from 1 (nothing the project stores refers to them: audit
//! entries carry their own index), and consumers are not copied (a worker
//! creates its durable consumer again; a task that was delivered but not
//! acked is delivered again, as after any restart).
//!
//! Headers the target would act on rather than store are dropped or
//! translated: `Nats-Expected-*` (conditions already met when the message
//! was first stored), `Nats-Batch-*` (an atomic batch is already committed)
//! and, in a counter stream (`allow_msg_counter`), each subject's total is
//! carried as one `Nats-Incr` of that total.
//!
//! The target must not hold a stream of the same name with messages: a copy
//! is never merged into data (a second run after a failed one refuses; the
//! operator removes the partial target first). The source is only read.

use std::time::Duration;

use async_nats::jetstream::{self, message::StreamMessage, stream};
use async_nats::HeaderMap;
use futures::{StreamExt as _, TryStreamExt as _};

use crate::api::{ApiError, ErrorCode};
use crate::store::unavailable;

/// Publishes (and reads of a dense stream) in flight at once while copying
/// a stream.
const WINDOW: usize = 256;
/// How long one message (read or acknowledged) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the target's JetStream may take to start serving.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One stream copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCopy {
    /// The stream's name.
    pub stream: String,
    /// Messages copied (for a counter stream: subjects).
    pub messages: u64,
}

/// Whether a header is the source's bookkeeping rather than the message's:
/// dropped from the copy.
fn dropped_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.starts_with("nats-expected") || n.starts_with("nats-batch") || n == "nats-incr"
}

/// The headers of a copied message: the source's, without its bookkeeping.
fn copied_headers(source: Option<&HeaderMap>) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, values) in source.into_iter().flat_map(|h| h.iter()) {
        if dropped_header(name.as_ref()) {
            continue;
        }
        for v in values {
            out.append(name.as_ref(), v.as_str());
        }
    }
    out
}

/// A counter message's total (`{"val":"N"}`).
fn counter_total(payload: &[u8]) -> Result<String, ApiError> {
    #[derive(serde::Deserialize)]
    struct Val {
        val: String,
    }
    let v: Val = serde_json::from_slice(payload).map_err(|e| {
        ApiError::new(
            ErrorCode::Internal,
            format!("a counter message is not a counter total: {e}"),
        )
    })?;
    v.val
        .parse::<i128>()
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("a counter total: {e}")))?;
    Ok(v.val)
}

/// Copies every stream of the source's account (but those named in `skip`)
/// to the target's account, the target's copies kept with at least
/// `replicas`; calls `progress` after each stream. Returns what it copied.
pub async fn copy_streams(
    from: &async_nats::Client,
    to: &async_nats::Client,
    replicas: usize,
    skip: &[&str],
    mut progress: impl FnMut(&StreamCopy),
) -> Result<Vec<StreamCopy>, ApiError> {
    let from_js = jetstream::new(from.clone());
    let to_js = jetstream::new(to.clone());
    let mut infos: Vec<stream::Info> =
        tenant_bus::settle::while_settling(|| from_js.streams().try_collect::<Vec<_>>())
            .await
            .map_err(|e| unavailable("listing the source's streams", e))?;
    infos.sort_by(|a, b| a.config.name.cmp(&b.config.name));
    let mut done = Vec::new();
    for info in infos {
        if skip.contains(&info.config.name.as_str()) {
            continue;
        }
        let copy = copy_stream(&from_js, &to_js, info, replicas).await?;
        progress(&copy);
        done.push(copy);
    }
    Ok(done)
}

async fn copy_stream(
    from_js: &jetstream::Context,
    to_js: &jetstream::Context,
    info: stream::Info,
    replicas: usize,
) -> Result<StreamCopy, ApiError> {
    let name = info.config.name.clone();
    let mut config = info.config.clone();
    config.num_replicas = config.num_replicas.max(replicas);
    let target = create_when_ready(to_js, &config).await?;
    if target.cached_info().state.messages > 0 {
        return Err(ApiError::new(
            ErrorCode::Refused,
            format!("stream {name} already holds messages on the target; a copy is never merged into data (remove the target's partial copy first)"),
        ));
    }
    let counter = config.allow_message_counter;
    let source = from_js
        .get_stream(&name)
        .await
        .map_err(|e| unavailable(&format!("reading stream {name}"), e))?;
    // Read with get-message requests to the stream itself: read-only
    // whatever the retention (a consumer on a work queue would take the
    // tasks). See the module docs for the dense and sparse reads.
    let mut out = Publisher {
        js: to_js,
        stream: &name,
        acks: std::collections::VecDeque::new(),
        copied: 0,
    };
    // A counter's messages carry running totals: only each subject's last
    // one is copied, as one increment, after the read.
    let mut totals: std::collections::BTreeMap<String, String> = Default::default();
    let state = &info.state;
    let span = state
        .last_sequence
        .saturating_sub(state.first_sequence)
        .saturating_add(1);
    if state.messages > 0 && span <= state.messages.saturating_mul(2) {
        // Dense: every sequence asked for, WINDOW at once, in order.
        let source = &source;
        let mut reads = futures::stream::iter(state.first_sequence..=state.last_sequence)
            .map(|seq| async move {
                tokio::time::timeout(
                    STEP_TIMEOUT,
                    source.raw_message_builder().sequence(seq).send(),
                )
                .await
            })
            .buffered(WINDOW);
        while let Some(read) = reads.next().await {
            let read =
                read.map_err(|_| unavailable(&format!("reading stream {name}"), "timed out"))?;
            match read {
                Ok(msg) => take(msg, counter, &mut totals, &mut out).await?,
                // Deleted (or removed since the copy began): nothing to copy.
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(unavailable(&format!("reading stream {name}"), e)),
            }
        }
    } else {
        // Sparse: "the next message at or after", one at a time, gaps
        // skipped by the server.
        let mut next_seq = state.first_sequence.max(1);
        for _ in 0..=state.messages {
            let read = tokio::time::timeout(
                STEP_TIMEOUT,
                source
                    .raw_message_builder()
                    .sequence(next_seq)
                    .next_by_subject(">")
                    .send(),
            )
            .await
            .map_err(|_| unavailable(&format!("reading stream {name}"), "timed out"))?;
            let msg = match read {
                Ok(msg) => msg,
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(unavailable(&format!("reading stream {name}"), e)),
            };
            next_seq = msg.sequence.saturating_add(1);
            take(msg, counter, &mut totals, &mut out).await?;
        }
    }
    for (subject, total) in totals {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Incr", total.as_str());
        out.send(subject, headers, bytes::Bytes::new()).await?;
    }
    let copied = out.finish().await?;
    Ok(StreamCopy {
        stream: name,
        messages: copied,
    })
}

/// One message read from the source: sent to the target, or for a counter
/// stream kept as its subject's latest total.
async fn take(
    msg: StreamMessage,
    counter: bool,
    totals: &mut std::collections::BTreeMap<String, String>,
    out: &mut Publisher<'_>,
) -> Result<(), ApiError> {
    if counter {
        totals.insert(msg.subject.to_string(), counter_total(&msg.payload)?);
        return Ok(());
    }
    out.send(
        msg.subject.to_string(),
        copied_headers(Some(&msg.headers)),
        msg.payload,
    )
    .await
}

/// Whether a stream create failed only because JetStream is not serving
/// yet (a new cluster electing its meta leader or meeting its peers, a new
/// account settling).
fn not_ready(e: &jetstream::context::CreateStreamError) -> bool {
    use jetstream::context::CreateStreamErrorKind as K;
    if matches!(e.kind(), K::TimedOut) || tenant_bus::settle::is_settling(e) {
        return true;
    }
    let text = e.to_string().to_ascii_lowercase();
    // A cluster just started may not know all its peers yet; a target that
    // really cannot place the stream still fails, after READY_TIMEOUT.
    text.contains("temporarily unavailable")
        || text.contains("no responders")
        || text.contains("no suitable peers")
}

/// Gets or creates `config`'s stream on the target, waiting up to
/// [`READY_TIMEOUT`] for a JetStream that is still starting.
async fn create_when_ready(
    to_js: &jetstream::Context,
    config: &stream::Config,
) -> Result<stream::Stream, ApiError> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        match to_js.get_or_create_stream(config.clone()).await {
            Ok(s) => return Ok(s),
            Err(e) if not_ready(&e) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                return Err(unavailable(
                    &format!("creating stream {} on the target", config.name),
                    e,
                ))
            }
        }
    }
}

/// Publishes to the target with at most [`WINDOW`] acknowledgements
/// outstanding, counting the acknowledged ones.
struct Publisher<'a> {
    js: &'a jetstream::Context,
    stream: &'a str,
    acks: std::collections::VecDeque<jetstream::context::PublishAckFuture>,
    copied: u64,
}

impl Publisher<'_> {
    async fn send(
        &mut self,
        subject: String,
        headers: HeaderMap,
        payload: bytes::Bytes,
    ) -> Result<(), ApiError> {
        let ack = self
            .js
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(|e| unavailable(&format!("copying stream {}", self.stream), e))?;
        self.acks.push_back(ack);
        if self.acks.len() >= WINDOW {
            self.await_one().await?;
        }
        Ok(())
    }

    async fn await_one(&mut self) -> Result<(), ApiError> {
        let Some(ack) = self.acks.pop_front() else {
            return Ok(());
        };
        let what = format!("copying stream {}", self.stream);
        match tokio::time::timeout(STEP_TIMEOUT, std::future::IntoFuture::into_future(ack)).await {
            Ok(Ok(_)) => {
                self.copied += 1;
                Ok(())
            }
            Ok(Err(e)) => Err(unavailable(&what, e)),
            Err(_) => Err(unavailable(&what, "the target did not acknowledge")),
        }
    }

    /// Waits for every outstanding acknowledgement; the messages copied.
    async fn finish(mut self) -> Result<u64, ApiError> {
        while !self.acks.is_empty() {
            self.await_one().await?;
        }
        Ok(self.copied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sources_bookkeeping_headers_are_dropped_the_rest_kept() {
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", "abc");
        h.insert("KV-Operation", "DEL");
        h.insert("Nats-Expected-Last-Subject-Sequence", "0");
        h.insert("Nats-Batch-Id", "b1");
        h.insert("Nats-Batch-Commit", "1");
        h.insert("Nats-Incr", "+5");
        let out = copied_headers(Some(&h));
        assert_eq!(out.get("Nats-Msg-Id").map(|v| v.as_str()), Some("abc"));
        assert_eq!(out.get("KV-Operation").map(|v| v.as_str()), Some("DEL"));
        for gone in [
            "Nats-Expected-Last-Subject-Sequence",
            "Nats-Batch-Id",
            "Nats-Batch-Commit",
            "Nats-Incr",
        ] {
            assert!(out.get(gone).is_none(), "{gone} kept");
        }
        assert_eq!(copied_headers(None).iter().count(), 0);
    }

    #[test]
    fn a_counter_total_is_read_or_refused() {
        assert_eq!(
            counter_total(br#"{"val":"1500"}"#).ok(),
            Some("1500".into())
        );
        assert_eq!(counter_total(br#"{"val":"-3"}"#).ok(), Some("-3".into()));
        assert!(counter_total(br#"{"val":"x"}"#).is_err());
        assert!(counter_total(b"junk").is_err());
    }
}
