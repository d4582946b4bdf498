//! [`TenantNamespace`]: an agent's scoped, sealed connection to its tenant.
//!
//! Everything it sends is sealed under the tenant's current key and addressed to
//! `tenant.<id>.<relative>`; everything it delivers passed verification. Reply
//! inboxes live at `tenant.<id>._INBOX.<instance>.<n>`, inside the namespace, so
//! the tenant's server permissions cover them and no other tenant can read them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt as _;
use tokio::sync::{broadcast, oneshot, OnceCell};

use crate::admission::{Admit, Rejection};
use crate::budget::ByteBudget;
use crate::bundle::CredentialBundle;
use crate::envelope::{MessageId, Sealer};
use crate::error::Error;
use crate::events::{classify, BusEvent, EVENT_CHANNEL_CAPACITY};
use crate::ids::{AgentId, TenantId};
use crate::keys::TenantKeySet;
use crate::message::TenantMessage;
use crate::options::NamespaceOptions;
use crate::replay::SharedReplay;
use crate::subject::{inbox_prefix, scope, IntoPattern, IntoSubject, Subject, SubjectError};
use crate::subscription::{Subscription, SubscriptionConfig};
use crate::verify::{Counters, Verifier};

/// What went wrong connecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConnectErrorKind {
    /// The `creds` text of the bundle is not a valid NATS credentials file.
    Credentials,
    /// The key set does not belong to the bundle's tenant, or is unusable.
    Keys,
    /// The server could not be reached or refused the connection.
    Connection,
    /// The server refused the credentials (unknown, revoked or suspended).
    Authorization,
    /// The bundle's server URL (list) is not valid (see [`crate::connect::server_addrs`]).
    InvalidUrl,
    /// An option is out of its documented range (e.g. a replay window longer
    /// than [`MAX_REPLAY_WINDOW`](crate::verify::MAX_REPLAY_WINDOW)); nothing was
    /// connected.
    InvalidOptions,
}

crate::kind_display!(ConnectErrorKind {
    Credentials => "invalid NATS credentials",
    Keys => "unusable key set",
    Connection => "cannot connect to the NATS server",
    Authorization => "the server refused the credentials",
    InvalidUrl => "invalid NATS server URL",
    InvalidOptions => "invalid namespace options",
});

/// A connect error.
pub type ConnectError = Error<ConnectErrorKind>;

/// What went wrong publishing (also used by `respond`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublishErrorKind {
    /// The subject is not a valid relative subject.
    InvalidSubject,
    /// The admission layer refused the message (quota, suspension, size).
    Rejected(Rejection),
    /// Sealing failed.
    Seal,
    /// The value could not be serialized to JSON.
    Serialize,
    /// The message could not be handed to the connection.
    Send,
    /// `respond` was called for a message that carries no reply inbox.
    NoReply,
}

impl std::fmt::Display for PublishErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::InvalidSubject => f.write_str("invalid subject"),
            Self::Rejected(r) => write!(f, "not admitted: {r}"),
            Self::Seal => f.write_str("sealing failed"),
            Self::Serialize => f.write_str("JSON serialization failed"),
            Self::Send => f.write_str("publish failed"),
            Self::NoReply => f.write_str("the message has no reply inbox"),
        }
    }
}

/// A publish error.
pub type PublishError = Error<PublishErrorKind>;

/// What went wrong subscribing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SubscribeErrorKind {
    /// The pattern is not a valid relative pattern.
    InvalidSubject,
    /// The queue group name is not a valid token.
    InvalidQueue,
    /// The subscription could not be registered with the connection.
    Send,
}

crate::kind_display!(SubscribeErrorKind {
    InvalidSubject => "invalid subject pattern",
    InvalidQueue => "invalid queue group name",
    Send => "subscribe failed",
});

/// A subscribe error.
pub type SubscribeError = Error<SubscribeErrorKind>;

/// What went wrong with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestErrorKind {
    /// The subject is not a valid relative subject.
    InvalidSubject,
    /// The admission layer refused the request.
    Rejected(Rejection),
    /// No verified response arrived in time.
    TimedOut,
    /// Nobody subscribes to the subject.
    NoResponders,
    /// Sealing failed.
    Seal,
    /// The value could not be (de)serialized as JSON.
    Serialize,
    /// The request could not be sent, or the reply inbox not set up.
    Send,
    /// The namespace already has its maximum of requests in flight
    /// ([`NamespaceOptions::max_pending_requests`]).
    TooManyPending,
}

impl std::fmt::Display for RequestErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::InvalidSubject => f.write_str("invalid subject"),
            Self::Rejected(r) => write!(f, "not admitted: {r}"),
            Self::TimedOut => f.write_str("request timed out"),
            Self::NoResponders => f.write_str("no responders"),
            Self::Seal => f.write_str("sealing failed"),
            Self::Serialize => f.write_str("JSON (de)serialization failed"),
            Self::Send => f.write_str("request failed"),
            Self::TooManyPending => f.write_str("too many requests in flight"),
        }
    }
}

/// A request error.
pub type RequestError = Error<RequestErrorKind>;

/// An agent's connection to its tenant's namespace. Cheap to clone.
#[derive(Clone)]
pub struct TenantNamespace {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    tenant: TenantId,
    agent: AgentId,
    sealer: Sealer,
    verifier: Verifier,
    /// What every subscription of this namespace accepted (see `crate::replay`).
    replay: Arc<SharedReplay>,
    options: NamespaceOptions,
    receive_budget: Arc<ByteBudget>,
    events: broadcast::Sender<BusEvent>,
    muxer: OnceCell<Arc<Muxer>>,
    probes: AtomicU64,
    /// The bundle's placement (replicas and region of what the agent creates).
    placement: crate::region::StorePlacement,
}

impl std::fmt::Debug for TenantNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantNamespace")
            .field("tenant", &self.inner.tenant)
            .field("agent", &self.inner.agent)
            .finish()
    }
}

impl TenantNamespace {
    /// Connects with default options.
    pub async fn connect(bundle: &CredentialBundle) -> Result<Self, ConnectError> {
        Self::connect_with(bundle, NamespaceOptions::new()).await
    }

    /// Connects with `options`.
    pub async fn connect_with(
        bundle: &CredentialBundle,
        options: NamespaceOptions,
    ) -> Result<Self, ConnectError> {
        let tenant = bundle.tenant.clone();
        let freshness = options
            .freshness()
            .map_err(|e| Error::with_source(ConnectErrorKind::InvalidOptions, "freshness", e))?;
        bundle
            .keys
            .ensure_tenant(&tenant)
            .map_err(|e| Error::with_source(ConnectErrorKind::Keys, "bundle", e))?;
        let keys = Arc::new(bundle.keys.clone());
        let counters = Arc::new(Counters::default());
        let (events, _) = broadcast::channel(EVENT_CHANNEL_CAPACITY);

        let addrs = crate::connect::server_addrs(&bundle.url)
            .map_err(|e| Error::with_source(ConnectErrorKind::InvalidUrl, "bundle url", e))?;
        let mut nats = match &bundle.creds {
            Some(creds) => async_nats::ConnectOptions::with_credentials(creds).map_err(|e| {
                Error::with_source(ConnectErrorKind::Credentials, "bundle creds", e)
            })?,
            None => match &options.auth_token {
                Some(token) => async_nats::ConnectOptions::with_token(token.clone()),
                // `nats://user:password@host`: async-nats parses the user and
                // password of a URL but does not log in with them.
                None => match addrs.iter().find_map(|a| a.username().zip(a.password())) {
                    Some((user, password)) => async_nats::ConnectOptions::with_user_and_password(
                        user.to_string(),
                        password.to_string(),
                    ),
                    None => async_nats::ConnectOptions::new(),
                },
            },
        };
        let cb_counters = counters.clone();
        let cb_events = events.clone();
        nats = nats
            .name(format!("agentbus/{}/{}", tenant, bundle.agent))
            .custom_inbox_prefix(inbox_prefix(&tenant))
            .subscription_capacity(options.subscription_capacity)
            .connection_timeout(options.connect_timeout)
            .event_callback(move |event| {
                let counters = cb_counters.clone();
                let events = cb_events.clone();
                async move {
                    let event = classify(event, &counters);
                    match &event {
                        BusEvent::SlowConsumer { .. }
                        | BusEvent::PermissionViolation { .. }
                        | BusEvent::AuthorizationViolation
                        | BusEvent::Error { .. } => {
                            tracing::warn!(?event, "nats connection event")
                        }
                        _ => tracing::debug!(?event, "nats connection event"),
                    }
                    // No receiver is fine: the counters still hold the count.
                    let _ = events.send(event);
                }
            });
        let client = nats.connect(addrs).await.map_err(|e| {
            let kind = match e.kind() {
                async_nats::ConnectErrorKind::AuthorizationViolation
                | async_nats::ConnectErrorKind::Authentication => ConnectErrorKind::Authorization,
                _ => ConnectErrorKind::Connection,
            };
            Error::with_source(kind, bundle.url.clone(), e)
        })?;
        let cell = crate::keys::key_cell(keys);
        let sealer = Sealer::with_cell(cell.clone(), Some(bundle.agent.clone()))
            .map_err(|e| Error::with_source(ConnectErrorKind::Keys, "sealer", e))?;
        let verifier = Verifier::with_cell(cell, freshness, counters);
        // One replay record for every subscription of this namespace (see
        // `crate::replay`: a new subscription starts from what the namespace
        // already accepted).
        let replay = verifier.shared_replay(options.max_replay_senders);
        let receive_budget = options.resolve_receive_budget();
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                tenant,
                agent: bundle.agent.clone(),
                sealer,
                verifier,
                replay,
                options,
                receive_budget,
                events,
                muxer: OnceCell::new(),
                probes: AtomicU64::new(0),
                placement: bundle.placement.clone(),
            }),
        })
    }

    /// The namespace's tenant.
    pub fn tenant(&self) -> &TenantId {
        &self.inner.tenant
    }

    /// This agent's id.
    pub fn agent(&self) -> &AgentId {
        &self.inner.agent
    }

    /// Replicas and region for the streams and buckets this agent creates,
    /// from its bundle ([`crate::region::StorePlacement`]): the state store
    /// and task dispatch use them unless their options say otherwise.
    pub fn placement(&self) -> &crate::region::StorePlacement {
        &self.inner.placement
    }

    /// The tenant's key set.
    pub fn keys(&self) -> Arc<TenantKeySet> {
        self.inner.sealer.keys()
    }

    /// Replaces the key set in use (a rotation reaching a running agent): sealing
    /// uses its current version and receiving accepts exactly its versions from
    /// the next message on, without reconnecting. A set of another tenant is
    /// refused.
    pub fn set_keys(&self, keys: TenantKeySet) -> Result<(), crate::keys::KeyError> {
        keys.ensure_tenant(&self.inner.tenant)?;
        self.inner.sealer.key_cell().store(Arc::new(keys));
        Ok(())
    }

    /// Delivery and drop counters, and connection-event counts.
    pub fn counters(&self) -> &Arc<Counters> {
        self.inner.verifier.counters()
    }

    /// The byte budget every subscription of this namespace charges for the
    /// messages it holds (shared with other namespaces if the options said so,
    /// see [`NamespaceOptions::receive_budget`]). Responses to requests are not
    /// queued: the request muxer verifies each on arrival and hands it to its
    /// waiter (at most `max_pending_requests`), or ignores it unopened.
    pub fn receive_budget(&self) -> &Arc<ByteBudget> {
        &self.inner.receive_budget
    }

    /// A receiver of connection events (slow consumer, permission violation, ...).
    pub fn events(&self) -> broadcast::Receiver<BusEvent> {
        self.inner.events.subscribe()
    }

    /// The sealer (for layers built on the namespace, such as task dispatch).
    pub fn sealer(&self) -> &Sealer {
        &self.inner.sealer
    }

    /// The verifier (for layers built on the namespace, such as task dispatch).
    pub fn verifier(&self) -> &Verifier {
        &self.inner.verifier
    }

    /// The underlying NATS client, for layers (JetStream task dispatch) that build
    /// on the same connection. The server's account permissions still confine it.
    pub fn nats(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// The full subject of a relative one: `tenant.<id>.<relative>`.
    pub fn full_subject(&self, relative: impl IntoSubject) -> Result<String, SubjectError> {
        Ok(scope(&self.inner.tenant, relative.into_subject()?.as_str()))
    }

    async fn admit(&self, len: usize) -> Result<(), Rejection> {
        let Some(admission) = &self.inner.options.admission else {
            return Ok(());
        };
        let outcome = match admission.admit_message(len) {
            Admit::Now => Ok(()),
            Admit::Rejected(r) => Err(r),
            Admit::Wait(fut) => fut.await,
        };
        if outcome.is_err() {
            self.counters().count_admission_rejection();
        }
        outcome
    }

    /// Seals and publishes `payload` to the relative `subject`.
    pub async fn publish(
        &self,
        subject: impl IntoSubject,
        payload: impl AsRef<[u8]>,
    ) -> Result<MessageId, PublishError> {
        let subject = subject
            .into_subject()
            .map_err(|e| Error::with_source(PublishErrorKind::InvalidSubject, "", e))?;
        let payload = payload.as_ref();
        self.admit(payload.len())
            .await
            .map_err(|r| Error::new(PublishErrorKind::Rejected(r), subject.to_string()))?;
        let full = scope(&self.inner.tenant, subject.as_str());
        let (id, body) = self
            .inner
            .sealer
            .seal(&full, None, payload)
            .map_err(|e| Error::with_source(PublishErrorKind::Seal, "", e))?;
        self.inner
            .client
            .publish(full, body)
            .await
            .map_err(|e| Error::with_source(PublishErrorKind::Send, "", e))?;
        Ok(id)
    }

    /// Serializes `value` as JSON, then [`publish`](Self::publish)es it.
    pub async fn publish_json<T: serde::Serialize + ?Sized>(
        &self,
        subject: impl IntoSubject,
        value: &T,
    ) -> Result<MessageId, PublishError> {
        let bytes = serde_json::to_vec(value)
            .map_err(|e| Error::with_source(PublishErrorKind::Serialize, "", e))?;
        self.publish(subject, bytes).await
    }

    /// Subscribes to a relative subject or pattern.
    pub async fn subscribe(
        &self,
        pattern: impl IntoPattern,
    ) -> Result<Subscription, SubscribeError> {
        let pattern = pattern
            .into_pattern()
            .map_err(|e| Error::with_source(SubscribeErrorKind::InvalidSubject, "", e))?;
        let full = scope(&self.inner.tenant, pattern.as_str());
        let inner = self
            .inner
            .client
            .subscribe(full)
            .await
            .map_err(|e| Error::with_source(SubscribeErrorKind::Send, "", e))?;
        self.sync().await?;
        Ok(self.wrap(inner))
    }

    /// Subscribes as a member of queue group `queue`: each message goes to one
    /// member. `queue` must be a single token (printable ASCII, no dots or
    /// wildcards, at most 64 bytes).
    pub async fn queue_subscribe(
        &self,
        pattern: impl IntoPattern,
        queue: &str,
    ) -> Result<Subscription, SubscribeError> {
        let pattern = pattern
            .into_pattern()
            .map_err(|e| Error::with_source(SubscribeErrorKind::InvalidSubject, "", e))?;
        let queue_ok = !queue.is_empty()
            && queue.len() <= 64
            && queue
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && !matches!(b, b'.' | b'*' | b'>'));
        if !queue_ok {
            return Err(Error::new(
                SubscribeErrorKind::InvalidQueue,
                format!("{:?}", queue.chars().take(80).collect::<String>()),
            ));
        }
        let full = scope(&self.inner.tenant, pattern.as_str());
        let inner = self
            .inner
            .client
            .queue_subscribe(full, queue.to_string())
            .await
            .map_err(|e| Error::with_source(SubscribeErrorKind::Send, "", e))?;
        self.sync().await?;
        Ok(self.wrap(inner))
    }

    /// Waits until the server has processed everything this connection sent so
    /// far (a probe message to a private inbox, echoed back by the server).
    ///
    /// `flush` only writes to the socket; this is a real round trip, so after it a
    /// subscription made on this connection is live for every other connection.
    /// `subscribe` and `queue_subscribe` call it before returning.
    pub async fn sync(&self) -> Result<(), SubscribeError> {
        let n = self.inner.probes.fetch_add(1, Ordering::Relaxed);
        let inbox = format!(
            "{}.{:016x}.sync{n}",
            inbox_prefix(&self.inner.tenant),
            self.inner.sealer.instance()
        );
        let mut probe = self
            .inner
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| Error::with_source(SubscribeErrorKind::Send, "sync", e))?;
        self.inner
            .client
            .publish(inbox, Bytes::new())
            .await
            .map_err(|e| Error::with_source(SubscribeErrorKind::Send, "sync", e))?;
        let timeout = self.inner.options.request_timeout;
        match tokio::time::timeout(timeout, probe.next()).await {
            Ok(Some(_)) => Ok(()),
            _ => Err(Error::new(
                SubscribeErrorKind::Send,
                "the server did not echo the sync probe",
            )),
        }
    }

    /// Wraps a subscription that is live at the server (`sync` returned).
    fn wrap(&self, inner: async_nats::Subscriber) -> Subscription {
        // Taken only now, after the server confirmed the subscription: every
        // message the namespace accepted before this point was published before
        // the subscription was live (NATS promises such a message to no new
        // subscription), so the new subscription may refuse it as a replay;
        // what the namespace accepts from now on, it may deliver once.
        let guard = self.inner.replay.guard();
        Subscription::new(
            inner,
            SubscriptionConfig {
                verifier: self.inner.verifier.clone(),
                guard,
                capacity: self.inner.options.subscription_capacity,
                budget: self.inner.receive_budget.clone(),
                events: self.inner.events.clone(),
            },
        )
    }

    /// Sends a sealed request to the relative `subject` and waits for a verified,
    /// sealed response (at most the configured request timeout).
    pub async fn request(
        &self,
        subject: impl IntoSubject,
        payload: impl AsRef<[u8]>,
    ) -> Result<TenantMessage, RequestError> {
        let subject = subject
            .into_subject()
            .map_err(|e| Error::with_source(RequestErrorKind::InvalidSubject, "", e))?;
        let payload = payload.as_ref();
        self.admit(payload.len())
            .await
            .map_err(|r| Error::new(RequestErrorKind::Rejected(r), subject.to_string()))?;
        let muxer = self
            .inner
            .muxer
            .get_or_try_init(|| Muxer::start(self.clone()))
            .await?;
        let pending = muxer.register(subject.clone(), self.inner.options.max_pending_requests)?;
        let full = scope(&self.inner.tenant, subject.as_str());
        let (_, body) = self
            .inner
            .sealer
            .seal(&full, Some(&pending.reply), payload)
            .map_err(|e| Error::with_source(RequestErrorKind::Seal, "", e))?;
        self.inner
            .client
            .publish_with_reply(full, pending.reply.clone(), body)
            .await
            .map_err(|e| Error::with_source(RequestErrorKind::Send, "", e))?;
        let timeout = self.inner.options.request_timeout;
        match tokio::time::timeout(timeout, pending.wait()).await {
            Ok(result) => result,
            Err(_) => Err(Error::new(
                RequestErrorKind::TimedOut,
                format!("{subject} after {} ms", timeout.as_millis()),
            )),
        }
    }

    /// A JSON request: serializes `value`, decodes the response as JSON.
    pub async fn request_json<Req, Resp>(
        &self,
        subject: impl IntoSubject,
        value: &Req,
    ) -> Result<Resp, RequestError>
    where
        Req: serde::Serialize + ?Sized,
        Resp: serde::de::DeserializeOwned,
    {
        let bytes = serde_json::to_vec(value)
            .map_err(|e| Error::with_source(RequestErrorKind::Serialize, "request", e))?;
        let response = self.request(subject, bytes).await?;
        response
            .json()
            .map_err(|e| Error::with_source(RequestErrorKind::Serialize, "response", e))
    }

    /// Seals `payload` and sends it to the reply inbox of the verified request `to`.
    pub async fn respond(
        &self,
        to: &TenantMessage,
        payload: impl AsRef<[u8]>,
    ) -> Result<MessageId, PublishError> {
        let reply = to
            .reply
            .as_ref()
            .ok_or_else(|| Error::new(PublishErrorKind::NoReply, to.subject.to_string()))?;
        let payload = payload.as_ref();
        self.admit(payload.len())
            .await
            .map_err(|r| Error::new(PublishErrorKind::Rejected(r), "respond"))?;
        let (id, body) = self
            .inner
            .sealer
            .seal(reply.as_str(), None, payload)
            .map_err(|e| Error::with_source(PublishErrorKind::Seal, "", e))?;
        self.inner
            .client
            .publish(reply.as_str().to_string(), body)
            .await
            .map_err(|e| Error::with_source(PublishErrorKind::Send, "", e))?;
        Ok(id)
    }

    /// [`respond`](Self::respond) with a JSON body.
    pub async fn respond_json<T: serde::Serialize + ?Sized>(
        &self,
        to: &TenantMessage,
        value: &T,
    ) -> Result<MessageId, PublishError> {
        let bytes = serde_json::to_vec(value)
            .map_err(|e| Error::with_source(PublishErrorKind::Serialize, "", e))?;
        self.respond(to, bytes).await
    }

    /// Flushes buffered messages to the socket (not a server round trip).
    pub async fn flush(&self) -> Result<(), PublishError> {
        self.inner
            .client
            .flush()
            .await
            .map_err(|e| Error::with_source(PublishErrorKind::Send, "flush", e))
    }

    /// Drains subscriptions and closes the connection. Everything published before
    /// `close` has been written to the server when it returns, so the namespace may
    /// be dropped right after. (async-nats's `drain` only queues the drain: dropping
    /// the last handle before the connection wrote its buffer loses those messages.)
    pub async fn close(&self) -> Result<(), PublishError> {
        self.flush().await?;
        self.inner
            .client
            .drain()
            .await
            .map_err(|e| Error::with_source(PublishErrorKind::Send, "drain", e))
    }
}

/// The request's relative subject and where its response goes.
type Waiter = (
    Subject,
    oneshot::Sender<Result<TenantMessage, RequestError>>,
);

/// Routes responses arriving on one wildcard inbox subscription to their waiters.
struct Muxer {
    prefix: String,
    next: AtomicU64,
    waiters: Arc<Mutex<HashMap<u64, Waiter>>>,
}

struct Pending {
    token: u64,
    reply: String,
    rx: Option<oneshot::Receiver<Result<TenantMessage, RequestError>>>,
    waiters: Arc<Mutex<HashMap<u64, Waiter>>>,
}

impl Pending {
    async fn wait(mut self) -> Result<TenantMessage, RequestError> {
        match self.rx.take() {
            Some(rx) => rx
                .await
                .unwrap_or_else(|_| Err(Error::new(RequestErrorKind::Send, "connection closed"))),
            None => Err(Error::new(RequestErrorKind::Send, "already awaited")),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // Timed out or cancelled: forget the waiter so the map stays bounded by the
        // requests in flight.
        if let Ok(mut map) = self.waiters.lock() {
            map.remove(&self.token);
        }
    }
}

impl Muxer {
    async fn start(ns: TenantNamespace) -> Result<Arc<Muxer>, RequestError> {
        let prefix = format!(
            "{}.{:016x}",
            inbox_prefix(&ns.inner.tenant),
            ns.inner.sealer.instance()
        );
        let subscriber = ns
            .inner
            .client
            .subscribe(format!("{prefix}.*"))
            .await
            .map_err(|e| Error::with_source(RequestErrorKind::Send, "inbox subscribe", e))?;
        let muxer = Arc::new(Muxer {
            prefix: prefix.clone(),
            next: AtomicU64::new(0),
            waiters: Arc::new(Mutex::new(HashMap::new())),
        });
        let waiters = muxer.waiters.clone();
        let verifier = ns.inner.verifier.clone();
        let mut guard = verifier.replay_guard(ns.inner.options.max_replay_senders);
        // The task holds no TenantNamespace, so dropping the last namespace handle
        // closes the client, ends the subscription and with it this task.
        drop(ns);
        tokio::spawn(async move {
            let mut subscriber = subscriber;
            while let Some(msg) = subscriber.next().await {
                let Some(token) = msg
                    .subject
                    .as_str()
                    .strip_prefix(prefix.as_str())
                    .and_then(|r| r.strip_prefix('.'))
                    .and_then(|t| t.parse::<u64>().ok())
                else {
                    continue;
                };
                // A response nobody waits for (late, or for a token never issued)
                // is ignored without being opened.
                let Some(request) = waiters
                    .lock()
                    .ok()
                    .and_then(|m| m.get(&token).map(|(s, _)| s.clone()))
                else {
                    continue;
                };
                let outcome = if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                    Err(Error::new(
                        RequestErrorKind::NoResponders,
                        request.to_string(),
                    ))
                } else {
                    let reply = msg.reply.as_ref().map(|r| r.as_str());
                    match verifier.verify_counted(
                        &mut guard,
                        msg.subject.as_str(),
                        reply,
                        &msg.payload,
                        Some(&request),
                    ) {
                        Some(m) => Ok(m),
                        // A forged or replayed response satisfies nobody; the real one
                        // may still come before the timeout.
                        None => continue,
                    }
                };
                let waiter = waiters.lock().ok().and_then(|mut m| m.remove(&token));
                if let Some((_, w)) = waiter {
                    let _ = w.send(outcome);
                }
            }
        });
        Ok(muxer)
    }

    /// Registers a waiter, or refuses when `max` requests are already in flight.
    fn register(&self, subject: Subject, max: usize) -> Result<Pending, RequestError> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self.waiters.lock() {
            Ok(mut map) if map.len() < max => {
                map.insert(token, (subject, tx));
            }
            Ok(_) => {
                return Err(Error::new(
                    RequestErrorKind::TooManyPending,
                    format!("{max} requests already in flight"),
                ))
            }
            Err(_) => return Err(Error::new(RequestErrorKind::Send, "request table poisoned")),
        }
        Ok(Pending {
            token,
            reply: format!("{}.{}", self.prefix, token),
            rx: Some(rx),
            waiters: self.waiters.clone(),
        })
    }
}
