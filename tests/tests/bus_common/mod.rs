//! Helpers shared by the `bus_*` integration tests (included with `mod bus_common;`).
//!
//! Barriers: `flush()` is not a server round
//! trip, so a subscription is known to be live only after something published
//! *after* it on the same connection came back (an echo of our own probe, or the
//! server's no-responders status for a request).

#![allow(dead_code)]

use std::time::Duration;

use futures::StreamExt as _;
use nats_harness::Server;
use tenant_bus::{
    AgentId, CredentialBundle, MasterSecret, NamespaceOptions, RequestErrorKind, Subscription,
    TenantId, TenantKeySet, TenantMessage, TenantNamespace,
};

/// How long a test waits for something that should arrive.
pub const ARRIVE: Duration = Duration::from_secs(5);
/// How long a test watches for something that must not arrive.
pub const QUIET: Duration = Duration::from_millis(300);

pub fn tenant(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

pub fn agent(s: &str) -> AgentId {
    AgentId::new(s).unwrap()
}

/// A key set of `tenant` holding version 1 only.
pub fn keys(master: &MasterSecret, t: &str) -> TenantKeySet {
    master.key_set(&tenant(t), [1], 1).unwrap()
}

pub fn bundle(server: &Server, keys: TenantKeySet, agent_id: &str) -> CredentialBundle {
    CredentialBundle {
        url: server.url(),
        tenant: keys.tenant().clone(),
        agent: agent(agent_id),
        creds: None,
        keys,
        placement: Default::default(),
    }
}

/// Connects agent `agent_id` of the key set's tenant with `options`.
pub async fn connect_keys(
    server: &Server,
    keys: TenantKeySet,
    agent_id: &str,
    options: NamespaceOptions,
) -> TenantNamespace {
    TenantNamespace::connect_with(&bundle(server, keys, agent_id), options)
        .await
        .unwrap()
}

/// Connects agent `agent_id` of tenant `t` (key version 1 of `master`).
pub async fn connect(
    server: &Server,
    master: &MasterSecret,
    t: &str,
    agent_id: &str,
) -> TenantNamespace {
    connect_keys(server, keys(master, t), agent_id, NamespaceOptions::new()).await
}

/// The next verified message, or `None` after `limit`.
pub async fn recv_within(sub: &mut Subscription, limit: Duration) -> Option<TenantMessage> {
    tokio::time::timeout(limit, sub.next()).await.ok().flatten()
}

/// The next verified message; panics if none arrives in [`ARRIVE`].
pub async fn recv(sub: &mut Subscription) -> TenantMessage {
    match recv_within(sub, ARRIVE).await {
        Some(m) => m,
        None => panic!("no message within {ARRIVE:?}"),
    }
}

/// Asserts that nothing is delivered on `sub` for [`QUIET`].
pub async fn assert_silent(sub: &mut Subscription) {
    if let Some(m) = recv_within(sub, QUIET).await {
        panic!("unexpected delivery: {m:?}");
    }
}

/// Makes `sub` (a subscription of `ns` whose pattern covers `relative`) provably live:
/// `ns` publishes a probe on its own connection, after the SUB, and waits for the
/// echo. Exactly one probe is sent, so nothing is left in flight afterwards.
pub async fn echo_barrier(ns: &TenantNamespace, sub: &mut Subscription, relative: &str) {
    let id = ns.publish(relative, b"probe").await.unwrap();
    let m = recv(sub).await;
    assert_eq!(
        m.msg_id, id,
        "the first delivery after subscribing is the probe"
    );
    assert_eq!(&m.payload[..], b"probe");
}

/// Proves that every subscription `ns` made before this call is live at the server:
/// a request to a subject nobody listens on is answered by the server's no-responders
/// status only after it processed everything `ns` sent before it.
pub async fn request_barrier(ns: &TenantNamespace) {
    let err = ns
        .request("zz-nobody-listens.barrier", b"barrier")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), RequestErrorKind::NoResponders, "{err}");
}

/// A raw async-nats subscriber on `>` that sees every message on the server.
pub struct Spy {
    pub client: async_nats::Client,
    pub sub: async_nats::Subscriber,
    probes: u64,
}

impl Spy {
    /// Subscribes to `>` and proves it live by receiving its own probe.
    pub async fn start(server: &Server) -> Spy {
        let client = server.raw_client().await;
        let sub = client.subscribe(">").await.unwrap();
        let mut spy = Spy {
            client,
            sub,
            probes: 0,
        };
        spy.sync().await;
        spy
    }

    /// Publishes a marker on the spy's own connection and skips everything up to it;
    /// returns what was seen before the marker.
    pub async fn sync(&mut self) -> Vec<async_nats::Message> {
        self.probes += 1;
        let marker = format!("zz-spy-marker.{}", self.probes);
        self.client
            .publish(marker.clone(), "marker".into())
            .await
            .unwrap();
        self.client.flush().await.unwrap();
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + ARRIVE;
        loop {
            let next = tokio::time::timeout_at(deadline, self.sub.next()).await;
            match next {
                Ok(Some(m)) if m.subject.as_str() == marker => return seen,
                Ok(Some(m)) => seen.push(m),
                _ => panic!("spy marker {marker} not seen within {ARRIVE:?}"),
            }
        }
    }

    /// The next message on the server whose subject is not a spy marker.
    pub async fn next(&mut self) -> async_nats::Message {
        let deadline = tokio::time::Instant::now() + ARRIVE;
        loop {
            match tokio::time::timeout_at(deadline, self.sub.next()).await {
                Ok(Some(m)) if m.subject.starts_with("zz-spy-marker.") => continue,
                Ok(Some(m)) => return m,
                _ => panic!("spy saw nothing within {ARRIVE:?}"),
            }
        }
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}
