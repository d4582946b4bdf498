//! The done bucket from a worker's side: batched lookups and the conditional
//! record of an outcome.
//!
//! - **Lookups** ([`Lookups`]): every task a worker receives is looked up
//!   before it runs, but the lookups of all tasks waiting at that moment go to
//!   the server as *one* JetStream batched direct get (`$JS.API.DIRECT.GET.
//!   KV_<bucket>` with `multi_last`, nats-server 2.11+): one request whose
//!   answer is the last record of each key that has one, then an end-of-batch
//!   status. Two coalescing tasks share the queue of lookups: each takes
//!   whatever queued while the other's request was out, so under load a lookup
//!   costs the server a fraction of a request and at rest it is one request, as
//!   before. A
//!   bucket without direct gets (`allow_direct` off, as another client may
//!   create it) or a server older than 2.11 (which answers the batched form as
//!   a bad request) gets one get per key instead.
//! - **The record** ([`record`]): the sealed outcome is written with an
//!   expected last revision (`Nats-Expected-Last-Subject-Sequence`): 0 (the key
//!   must not exist: a create) when the lookup found nothing, or the revision of
//!   the record the worker saw and chose to replace (one that fails
//!   verification, or a delete marker). One conditional write instead of an
//!   unconditional put: if another copy of the task finished in between, the
//!   write is refused ([`Recorded::Conflict`]) and the worker keeps the stored
//!   outcome instead of overwriting it.
//! - **The writes** go through the dispatcher's acknowledgement inbox
//!   (`acks.rs`, shared with task publishes) instead of async-nats' KV
//!   client; a write without an answer in time is an outage (retried,
//!   expecting the same revision: if the first one landed, the retry finds it
//!   and keeps it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt as _;
use tokio::sync::{mpsc, oneshot, Mutex};

use super::acks::AckInbox;

/// Keys per batched lookup (the server answers at most 1024 results).
const MAX_BATCH: usize = 256;
/// Batched lookups out at once per worker.
const LOOKUPS_IN_FLIGHT: usize = 2;
/// How long one batched lookup may take before it counts as failed (the
/// workers waiting on it retry, holding their tasks).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// A record found in the done bucket.
#[derive(Debug, Clone)]
pub(crate) struct DoneRecord {
    /// The stored value (a sealed outcome, if genuine).
    pub(crate) value: Bytes,
    /// Its revision (the key's last stream sequence).
    pub(crate) revision: u64,
    /// `false` for a delete or purge marker (no outcome, but a revision).
    pub(crate) live: bool,
}

type Reply = oneshot::Sender<Result<Option<DoneRecord>, String>>;

/// Coalesced lookups of one worker. Dropping it ends the coalescing task.
pub(crate) struct Lookups {
    tx: mpsc::UnboundedSender<(String, Reply)>,
}

impl Lookups {
    /// Starts the coalescing tasks for `store` on `nats`; each request they
    /// send to the server is counted in `requests`.
    pub(crate) fn start(
        nats: async_nats::Client,
        store: kv::Store,
        requests: Arc<AtomicU64>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..LOOKUPS_IN_FLIGHT {
            tokio::spawn(coalesce(
                nats.clone(),
                store.clone(),
                rx.clone(),
                requests.clone(),
            ));
        }
        Self { tx }
    }

    /// The record under `key`, if any. `Err`: the bucket could not be read (an
    /// outage: retry).
    pub(crate) async fn get(&self, key: &str) -> Result<Option<DoneRecord>, String> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((key.to_string(), reply))
            .map_err(|_| "lookup task ended".to_string())?;
        answer.await.map_err(|_| "lookup task ended".to_string())?
    }
}

/// One coalescing task: takes every lookup queued (up to [`MAX_BATCH`]), asks
/// the server once, answers them, and again. [`LOOKUPS_IN_FLIGHT`] of them
/// share the queue, so one gathers while another waits for the server.
async fn coalesce(
    nats: async_nats::Client,
    store: kv::Store,
    rx: Arc<Mutex<mpsc::UnboundedReceiver<(String, Reply)>>>,
    requests: Arc<AtomicU64>,
) {
    let mut direct = store.stream.cached_info().config.allow_direct;
    let mut inbox: Option<(async_nats::Subscriber, String)> = None;
    let mut n: u64 = 0;
    loop {
        let batch = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            batch
        };
        let mut keys: Vec<&str> = batch.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        let found = if direct {
            n += 1;
            requests.fetch_add(1, Ordering::Relaxed);
            match multi_last(&nats, &store, &mut inbox, n, &keys).await {
                Ok(found) => Ok(found),
                Err(Fallback::Unsupported(why)) => {
                    tracing::info!(bucket = %store.name, %why, "batched direct gets refused; one get per key from now on");
                    direct = false;
                    one_by_one(&store, &keys, &requests).await
                }
                Err(Fallback::Failed(e)) => Err(e),
            }
        } else {
            one_by_one(&store, &keys, &requests).await
        };
        let prefix = store.prefix.as_str();
        for (key, reply) in batch {
            let answer = match &found {
                Ok(found) => Ok(found.get(&format!("{prefix}{key}")).cloned()),
                Err(e) => Err(e.clone()),
            };
            let _ = reply.send(answer);
        }
    }
}

enum Fallback {
    /// The server or the bucket cannot answer batched gets.
    Unsupported(String),
    /// This request failed (an outage, a timeout).
    Failed(String),
}

/// One batched direct get of the last record of each key: records by subject.
async fn multi_last(
    nats: &async_nats::Client,
    store: &kv::Store,
    inbox: &mut Option<(async_nats::Subscriber, String)>,
    n: u64,
    keys: &[&str],
) -> Result<HashMap<String, DoneRecord>, Fallback> {
    if inbox.is_none() {
        let prefix = nats.new_inbox();
        let sub = nats
            .subscribe(format!("{prefix}.*"))
            .await
            .map_err(|e| Fallback::Failed(format!("lookup inbox: {e}")))?;
        *inbox = Some((sub, prefix));
    }
    let Some((sub, prefix)) = inbox.as_mut() else {
        return Err(Fallback::Failed("no lookup inbox".into()));
    };
    let reply = format!("{prefix}.{n}");
    let subjects: Vec<String> = keys
        .iter()
        .map(|k| format!("{}{k}", store.prefix))
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({
        "multi_last": subjects,
        "batch": subjects.len(),
    }))
    .map_err(|e| Fallback::Failed(e.to_string()))?;
    nats.publish_with_reply(
        format!("$JS.API.DIRECT.GET.{}", store.stream_name),
        reply.clone(),
        body.into(),
    )
    .await
    .map_err(|e| Fallback::Failed(format!("lookup request: {e}")))?;
    let deadline = tokio::time::Instant::now() + LOOKUP_TIMEOUT;
    let mut found = HashMap::with_capacity(keys.len());
    loop {
        let msg = match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                *inbox = None;
                return Err(Fallback::Failed("lookup inbox closed".into()));
            }
            Err(_) => return Err(Fallback::Failed("batched lookup timed out".into())),
        };
        if msg.subject.as_str() != reply {
            continue; // the answer to an earlier request that timed out
        }
        match msg.status.map(|s| s.as_u16()) {
            None | Some(200) => {
                let header = |name: &str| {
                    msg.headers
                        .as_ref()
                        .and_then(|h| h.get(name))
                        .map(|v| v.as_str().to_string())
                };
                let (Some(subject), Some(revision)) = (
                    header("Nats-Subject"),
                    header("Nats-Sequence").and_then(|s| s.parse::<u64>().ok()),
                ) else {
                    return Err(Fallback::Failed(
                        "batched lookup answer without subject or sequence".into(),
                    ));
                };
                let live = !matches!(
                    header("KV-Operation").as_deref(),
                    Some("DEL") | Some("PURGE")
                );
                found.insert(
                    subject,
                    DoneRecord {
                        value: msg.payload,
                        revision,
                        live,
                    },
                );
            }
            // 204: end of the batch; 404: none of the keys has a record.
            Some(204) | Some(404) => return Ok(found),
            // A server before 2.11 does not know `multi_last`: it answers as
            // to an empty or malformed request.
            Some(400) | Some(408) => {
                return Err(Fallback::Unsupported(msg.description.unwrap_or_default()))
            }
            // Anything else, including 503 (no responders: the bucket's stream
            // is gone or has no leader), is an outage: the lookups are retried.
            Some(code) => {
                return Err(Fallback::Failed(format!(
                    "batched lookup: {code} {}",
                    msg.description.unwrap_or_default()
                )))
            }
        }
    }
}

/// One get per key (a bucket without direct gets); each counted in `requests`.
async fn one_by_one(
    store: &kv::Store,
    keys: &[&str],
    requests: &AtomicU64,
) -> Result<HashMap<String, DoneRecord>, String> {
    requests.fetch_add(keys.len() as u64, Ordering::Relaxed);
    let entries = futures::future::join_all(keys.iter().map(|k| store.entry(k.to_string()))).await;
    let mut found = HashMap::with_capacity(keys.len());
    for (key, entry) in keys.iter().zip(entries) {
        if let Some(e) = entry.map_err(|e| e.to_string())? {
            found.insert(format!("{}{key}", store.prefix), record_of(e));
        }
    }
    Ok(found)
}

fn record_of(e: kv::Entry) -> DoneRecord {
    DoneRecord {
        live: e.operation == kv::Operation::Put,
        value: e.value,
        revision: e.revision,
    }
}

/// What a conditional write of an outcome found.
#[derive(Debug)]
pub(crate) enum Recorded {
    /// Written.
    Written,
    /// The key's revision was not the expected one: here is the record now
    /// stored (`None`: there is none any more, e.g. it expired).
    Conflict(Option<DoneRecord>),
}

/// Writes `value` under `key` if the key's last revision is `expect` (0: the
/// key has no record), through `acks` (else async-nats' KV client, which knows
/// JetStream domains and API prefixes). `Err`: the
/// bucket could not be written or read (an outage: retry).
pub(crate) async fn record(
    store: &kv::Store,
    acks: Option<&AckInbox>,
    key: &str,
    value: Bytes,
    expect: u64,
) -> Result<Recorded, String> {
    let written = match acks {
        Some(a) => {
            let prefix = store.put_prefix.as_ref().unwrap_or(&store.prefix);
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                async_nats::HeaderValue::from(expect),
            );
            let sent = a.publish(format!("{prefix}{key}"), headers, value).await;
            match sent.map_err(|e| e.to_string())?.wait().await {
                Ok(_) => true,
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => false,
                Err(e) => return Err(format!("done record: {e}")),
            }
        }
        None => match store.update(key, value, expect).await {
            Ok(_) => true,
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => false,
            Err(e) => return Err(e.to_string()),
        },
    };
    if written {
        return Ok(Recorded::Written);
    }
    let now = store.entry(key).await.map_err(|e| e.to_string())?;
    Ok(Recorded::Conflict(now.map(record_of)))
}
