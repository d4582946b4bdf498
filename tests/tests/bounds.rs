//! Bounded queues of the bus at their bound (the rest of the inventory in
//! `docs/bounds.md` is tested next to its code: replay table in bus_attacks,
//! subscription buffer in bus_pubsub, scheduler queues in scheduler, registry cache
//! in registry).

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use nats_harness::Server;
use tenant_bus::events::EVENT_CHANNEL_CAPACITY;
use tenant_bus::{
    AgentId, BusEvent, CredentialBundle, MasterSecret, NamespaceOptions, RequestErrorKind, TenantId,
};
use tokio::sync::broadcast::error::TryRecvError;

fn bundle(url: &str, agent: &str) -> CredentialBundle {
    let tenant = TenantId::new("acme").unwrap();
    CredentialBundle {
        url: url.to_string(),
        tenant: tenant.clone(),
        agent: AgentId::new(agent).unwrap(),
        creds: None,
        keys: MasterSecret::from_bytes(&[9u8; 32])
            .unwrap()
            .key_set(&tenant, [1], 1)
            .unwrap(),
        placement: Default::default(),
    }
}

/// At `max_pending_requests`, one more request fails at once with
/// `TooManyPending`; the table frees its entries when requests end, so later
/// requests are admitted again.
#[tokio::test]
async fn pending_requests_are_capped_and_freed() {
    let server = Server::new();
    let responder = NamespaceOptions::new()
        .connect(&bundle(&server.url(), "silent"))
        .await
        .unwrap();
    // Subscribed but never answering: requests stay pending until they time out.
    let _silent = responder.subscribe("svc.slow").await.unwrap();
    let ns = NamespaceOptions::new()
        .max_pending_requests(2)
        .request_timeout(Duration::from_millis(800))
        .connect(&bundle(&server.url(), "caller"))
        .await
        .unwrap();

    let a = tokio::spawn({
        let ns = ns.clone();
        async move { ns.request("svc.slow", b"1").await }
    });
    let b = tokio::spawn({
        let ns = ns.clone();
        async move { ns.request("svc.slow", b"2").await }
    });
    // Let both register.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let third = ns.request("svc.slow", b"3").await.unwrap_err();
    assert_eq!(third.kind(), RequestErrorKind::TooManyPending);
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "refused at once, not after a timeout"
    );
    assert_eq!(
        a.await.unwrap().unwrap_err().kind(),
        RequestErrorKind::TimedOut
    );
    assert_eq!(
        b.await.unwrap().unwrap_err().kind(),
        RequestErrorKind::TimedOut
    );

    // Entries were freed: a request is admitted again (and answered).
    let mut svc = responder.subscribe("svc.fast").await.unwrap();
    let answering = responder.clone();
    tokio::spawn(async move {
        while let Some(m) = svc.next().await {
            let _ = answering.respond(&m, b"ok").await;
        }
    });
    let reply = ns.request("svc.fast", b"4").await.unwrap();
    assert_eq!(&reply.payload[..], b"ok");
}

/// The event channel holds `EVENT_CHANNEL_CAPACITY` events: a receiver that does
/// not keep up is told how many it lost (`Lagged`) and then sees the newest ones,
/// while the counters count every event.
#[tokio::test]
async fn event_channel_sheds_oldest_but_counters_count_all() {
    // An agent of tenant acme under operator mode: the server refuses its
    // publishes outside tenant.acme.>, each reported asynchronously.
    let p = nats_harness::platform().await;
    p.cp.create_tenant("acme", agent_runtime::tiers::Tier::Pro)
        .await
        .unwrap();
    let agent = p.cp.issue_agent("acme", "noisy", "default").await.unwrap();
    let ns = NamespaceOptions::new().connect(&agent).await.unwrap();
    let mut events = ns.events();
    let total = EVENT_CHANNEL_CAPACITY as u64 + 100;
    // async-nats itself buffers only 128 events and drops the rest of a burst
    // (`try_send` into a channel of 128, before our callback runs; see
    // docs/bounds.md), so violations are provoked in bursts of 32 with a server
    // round trip between: every one then reaches the namespace's callback.
    let mut sent = 0;
    while sent < total {
        for _ in 0..32.min(total - sent) {
            // Through the namespace's own connection (whose events it reports), to
            // a subject the server denies this tenant.
            ns.nats()
                .publish("tenant.globex.orders", "x".into())
                .await
                .unwrap();
            sent += 1;
        }
        ns.sync().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while ns.counters().permission_violation() < sent && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    // Every violation is counted, none is lost.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ns.counters().permission_violation() < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ns.counters().permission_violation(), total);

    // The receiver lagged: it is told how many were shed, then reads the rest.
    let mut lagged = 0;
    let mut seen = 0;
    loop {
        match events.try_recv() {
            Ok(BusEvent::PermissionViolation { .. }) => seen += 1,
            Ok(_) => {}
            Err(TryRecvError::Lagged(n)) => lagged += n,
            Err(TryRecvError::Empty) | Err(TryRecvError::Closed) => break,
        }
    }
    assert!(lagged > 0, "a slow receiver must be told it lagged");
    assert!(
        seen <= EVENT_CHANNEL_CAPACITY,
        "at most the capacity is held"
    );
    assert!(seen > 0);
}
