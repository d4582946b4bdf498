//! Publish/subscribe, queue groups, request/reply, wildcard confinement, tenant
//! isolation and slow-consumer reporting of `TenantNamespace`, against real
//! nats-server processes.

mod bus_common;

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bus_common::*;
use futures::StreamExt as _;
use nats_harness::Server;
use tenant_bus::{
    BusEvent, DropReason, MasterSecret, NamespaceOptions, RequestErrorKind, TenantNamespace,
};

fn ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis()
}

#[tokio::test]
async fn publish_subscribe_round_trip_carries_every_field() {
    let server = Server::new();
    let master = MasterSecret::generate().unwrap();
    let receiver = connect(&server, &master, "acme", "receiver").await;
    let sender = connect(&server, &master, "acme", "sender").await;

    let mut sub = receiver.subscribe("orders.>").await.unwrap();
    echo_barrier(&receiver, &mut sub, "orders.probe").await;

    let before = SystemTime::now();
    let id = sender
        .publish("orders.created", b"{\"id\":42}")
        .await
        .unwrap();
    let after = SystemTime::now();

    let m = recv(&mut sub).await;
    assert_eq!(&m.payload[..], b"{\"id\":42}");
    assert_eq!(m.subject.as_str(), "orders.created");
    assert_eq!(m.tenant.as_str(), "acme");
    assert_eq!(m.sender.as_ref().map(|s| s.as_str()), Some("sender"));
    assert_eq!(m.msg_id, id);
    assert_eq!(m.msg_id.instance(), sender.sealer().instance());
    assert_eq!(m.key_version, 1);
    assert!(m.reply.is_none());
    let ts = ms(m.timestamp);
    assert!(
        ms(before) <= ts && ts <= ms(after),
        "timestamp {ts} outside [{}, {}]",
        ms(before),
        ms(after)
    );

    // A second message gets a new id from the same sender instance.
    let id2 = sender.publish("orders.created", b"second").await.unwrap();
    let m2 = recv(&mut sub).await;
    assert_eq!(m2.msg_id, id2);
    assert_ne!(id, id2);
    assert_eq!(id2.instance(), id.instance());
    assert_eq!(id2.sequence(), id.sequence() + 1);
    assert_eq!(&m2.payload[..], b"second");
    assert_silent(&mut sub).await;

    let snap = receiver.counters().snapshot();
    assert_eq!(snap.delivered, 3, "probe + 2 messages");
    assert_eq!(snap.dropped_total(), 0);
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Order {
    id: u64,
    item: String,
    tags: Vec<String>,
}

#[tokio::test]
async fn publish_json_and_json_round_trip() {
    let server = Server::new();
    let master = MasterSecret::generate().unwrap();
    let ns = connect(&server, &master, "acme", "planner").await;
    let mut sub = ns.subscribe("orders.*").await.unwrap();
    echo_barrier(&ns, &mut sub, "orders.probe").await;

    let order = Order {
        id: 7,
        item: "widget \u{1f680} \"quoted\"".into(),
        tags: vec!["a".into(), "b".into()],
    };
    let id = ns.publish_json("orders.created", &order).await.unwrap();
    let m = recv(&mut sub).await;
    assert_eq!(m.msg_id, id);
    assert_eq!(m.json::<Order>().unwrap(), order);
    // The payload is the JSON text.
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap()["id"],
        7
    );
    // Decoding into the wrong shape is an error, not a panic.
    assert!(m.json::<Vec<u8>>().is_err());
}

#[tokio::test]
async fn queue_group_spreads_work_without_duplicates() {
    const N: usize = 200;
    let server = Server::new();
    let master = MasterSecret::generate().unwrap();
    let w1 = connect(&server, &master, "acme", "worker-1").await;
    let w2 = connect(&server, &master, "acme", "worker-2").await;
    let producer = connect(&server, &master, "acme", "producer").await;

    let mut q1 = w1.queue_subscribe("jobs.*", "workers").await.unwrap();
    let mut q2 = w2.queue_subscribe("jobs.*", "workers").await.unwrap();
    request_barrier(&w1).await;
    request_barrier(&w2).await;

    for i in 0..N {
        producer.publish("jobs.run", i.to_string()).await.unwrap();
    }
    producer.flush().await.unwrap();

    let mut got1 = Vec::new();
    let mut got2 = Vec::new();
    let deadline = tokio::time::Instant::now() + ARRIVE;
    while got1.len() + got2.len() < N {
        tokio::select! {
            Some(m) = q1.next() => got1.push(m),
            Some(m) = q2.next() => got2.push(m),
            _ = tokio::time::sleep_until(deadline) => {
                panic!("only {} + {} of {N} delivered", got1.len(), got2.len())
            }
        }
    }
    assert_silent(&mut q1).await;
    assert_silent(&mut q2).await;

    assert!(!got1.is_empty(), "member 1 got nothing");
    assert!(!got2.is_empty(), "member 2 got nothing");
    assert_eq!(got1.len() + got2.len(), N);
    let mut indexes = HashSet::new();
    let mut ids = HashSet::new();
    for m in got1.iter().chain(&got2) {
        let i: usize = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
        assert!(indexes.insert(i), "payload {i} delivered twice");
        assert!(ids.insert(m.msg_id), "id {} delivered twice", m.msg_id);
        assert_eq!(m.subject.as_str(), "jobs.run");
    }
    assert_eq!(indexes, (0..N).collect::<HashSet<_>>());
}

#[tokio::test]
async fn request_reply_is_sealed_both_ways_and_uses_tenant_inboxes() {
    const REQUEST: &[u8] = b"top-secret-request-plaintext";
    const REPLY: &[u8] = b"top-secret-reply-plaintext";
    let server = Server::new();
    let master = MasterSecret::generate().unwrap();
    let mut spy = Spy::start(&server).await;
    let requester = connect(&server, &master, "acme", "requester").await;
    let responder = connect(&server, &master, "acme", "responder").await;

    let watcher = connect(&server, &master, "acme", "watcher").await;
    let mut watch_all = watcher.subscribe(">").await.unwrap();
    // `subscribe` returns once the server registered the subscription.
    let mut svc = responder.subscribe("svc.echo").await.unwrap();
    let serve = tokio::spawn(async move {
        let req = recv(&mut svc).await;
        responder.respond(&req, REPLY).await.unwrap();
        (req, responder)
    });

    spy.sync().await;
    let response = requester.request("svc.echo", REQUEST).await.unwrap();
    let (req, responder) = serve.await.unwrap();

    // The responder saw the request verified, with a reply inbox in the namespace.
    assert_eq!(&req.payload[..], REQUEST);
    assert_eq!(req.subject.as_str(), "svc.echo");
    assert_eq!(req.sender.as_ref().unwrap().as_str(), "requester");
    let reply_to = req.reply.clone().expect("a request carries a reply inbox");
    assert!(
        reply_to.as_str().starts_with("tenant.acme._INBOX."),
        "{reply_to:?}"
    );

    // The requester got the sealed response, verified, reported under the
    // request's subject.
    assert_eq!(&response.payload[..], REPLY);
    assert_eq!(response.subject.as_str(), "svc.echo");
    assert_eq!(response.tenant.as_str(), "acme");
    assert_eq!(response.sender.as_ref().unwrap().as_str(), "responder");
    assert!(response.reply.is_none());

    // On the wire: both bodies are sealed, the inbox is inside the namespace.
    let seen = spy.sync().await;
    let request_msg = seen
        .iter()
        .find(|m| m.subject.as_str() == "tenant.acme.svc.echo")
        .expect("spy saw the request");
    let reply_subject = request_msg.reply.as_ref().expect("request has a reply");
    assert!(
        reply_subject.starts_with("tenant.acme._INBOX."),
        "{reply_subject}"
    );
    assert_eq!(reply_subject.as_str(), reply_to.as_str());
    let reply_msg = seen
        .iter()
        .find(|m| m.subject.as_str() == reply_subject.as_str())
        .expect("spy saw the reply");
    for m in [request_msg, reply_msg] {
        assert!(!contains(&m.payload, REQUEST), "plaintext on {}", m.subject);
        assert!(!contains(&m.payload, REPLY), "plaintext on {}", m.subject);
        assert!(m.headers.is_none(), "no NATS headers on the hot path");
    }
    // Nothing was sent outside the tenant's namespace (barrier traffic included).
    for m in &seen {
        assert!(
            m.subject.starts_with("tenant.acme."),
            "traffic outside the namespace: {}",
            m.subject
        );
    }
    assert_eq!(requester.counters().snapshot().dropped_total(), 0);
    assert_eq!(responder.counters().snapshot().dropped_total(), 0);

    // A `>` subscriber of the same tenant sees the request (a tenant message like
    // any other) but not the traffic on reply inboxes, and counts no drops for it.
    let m = recv(&mut watch_all).await;
    assert_eq!(m.subject.as_str(), "svc.echo");
    assert_eq!(&m.payload[..], REQUEST);
    assert_silent(&mut watch_all).await;
    let snap = watcher.counters().snapshot();
    assert_eq!(snap.dropped_total(), 0, "{snap:?}");

    // request_json / respond_json work the same way.
    let mut svc = responder.subscribe("svc.add").await.unwrap();
    let serve = tokio::spawn(async move {
        let req = recv(&mut svc).await;
        let (a, b): (i64, i64) = req.json().unwrap();
        responder.respond_json(&req, &(a + b)).await.unwrap();
        // Dropping the last handle right after `respond` would close the
        // connection before async-nats wrote the response: keep it alive.
        responder
    });
    let sum: i64 = requester.request_json("svc.add", &(40, 2)).await.unwrap();
    assert_eq!(sum, 42);
    let _responder = serve.await.unwrap();
}

#[tokio::test]
async fn subscribe_is_live_for_other_connections_when_it_returns() {
    let server = Server::new();
    let master = MasterSecret::generate().unwrap();
    let a = connect(&server, &master, "acme", "subscriber").await;
    let b = connect(&server, &master, "acme", "publisher").await;
    for i in 0..20 {
        let subject = format!("live.{i}");
        let mut sub = if i % 2 == 0 {
            a.subscribe(subject.as_str()).await.unwrap()
        } else {
            a.queue_subscribe(subject.as_str(), "q").await.unwrap()
        };
        // Published at once from another connection: must not be lost.
        let id = b.publish(subject.as_str(), b"first").await.unwrap();
        let m = recv(&mut sub).await;
        assert_eq!(m.msg_id, id, "round {i}");
    }
    assert_eq!(a.counters().snapshot().dropped_total(), 0);
}

#[tokio::test]
async fn close_delivers_what_was_published_before_it() {
    let server = Server::new();
    let master = MasterSecret::generate().unwrap();
    let receiver = connect(&server, &master, "acme", "receiver").await;
    let mut sub = receiver.subscribe("last.words").await.unwrap();
    let sender = connect(&server, &master, "acme", "sender").await;
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(sender.publish("last.words", format!("{i}")).await.unwrap());
    }
    // Dropped right after `close`: nothing published before it may be lost.
    sender.close().await.unwrap();
    drop(sender);
    for (i, id) in ids.iter().enumerate() {
        let m = recv(&mut sub).await;
        assert_eq!((m.msg_id, &m.payload[..]), (*id, format!("{i}").as_bytes()));
    }
    assert_silent(&mut sub).await;
}

#[tokio::test]
async fn concurrent_requests_get_their_own_responses() {
    const N: usize = 40;
    let server = Server::new();
    let master = MasterSecret::generate().unwrap();
    let requester = connect(&server, &master, "acme", "requester").await;
    let responder = connect(&server, &master, "acme", "responder").await;
    let mut svc = responder.subscribe("svc.*").await.unwrap();
    let serve = tokio::spawn({
        let responder = responder.clone();
        async move {
            // Answer in reverse order of arrival, so responses cross each other.
            let mut reqs = Vec::new();
            for _ in 0..N {
                reqs.push(recv(&mut svc).await);
            }
            for req in reqs.iter().rev() {
                let mut answer = b"re:".to_vec();
                answer.extend_from_slice(&req.payload);
                responder.respond(req, answer).await.unwrap();
            }
        }
    });
    let calls = (0..N).map(|i| {
        let requester = requester.clone();
        async move {
            let subject = format!("svc.{}", i % 3);
            let m = requester
                .request(subject.as_str(), format!("q{i}"))
                .await
                .unwrap();
            assert_eq!(&m.payload[..], format!("re:q{i}").as_bytes());
            assert_eq!(m.subject.as_str(), subject);
        }
    });
    futures::future::join_all(calls).await;
    serve.await.unwrap();
    let snap = requester.counters().snapshot();
    assert_eq!(snap.delivered, N as u64);
    assert_eq!(snap.dropped_total(), 0);
}

#[tokio::test]
async fn oversized_payload_is_a_typed_error_and_the_connection_survives() {
    let server = Server::new();
    let master = MasterSecret::generate().unwrap();
    let ns = connect(&server, &master, "acme", "agent").await;
    let mut sub = ns.subscribe("big").await.unwrap();
    // The server's max_payload is 1 MiB by default; the envelope adds its header.
    let err = ns.publish("big", vec![0u8; 2 << 20]).await.unwrap_err();
    assert_eq!(err.kind(), tenant_bus::PublishErrorKind::Send, "{err}");
    let err = ns.request("big", vec![0u8; 2 << 20]).await.unwrap_err();
    assert_eq!(err.kind(), RequestErrorKind::Send, "{err}");
    // Just under the limit goes through, sealed.
    let payload = vec![5u8; (1 << 20) - 256];
    let id = ns.publish("big", &payload).await.unwrap();
    let m = recv(&mut sub).await;
    assert_eq!(m.msg_id, id);
    assert_eq!(m.payload.len(), payload.len());
    assert_silent(&mut sub).await;
}

#[tokio::test]
async fn request_without_responders_fails_fast_with_no_responders() {
    let server = Server::new();
    let master = MasterSecret::generate().unwrap();
    let ns = connect(&server, &master, "acme", "requester").await;
    for _ in 0..3 {
        let start = std::time::Instant::now();
        let err = ns.request("nobody.here", b"x").await.unwrap_err();
        assert_eq!(err.kind(), RequestErrorKind::NoResponders, "{err}");
        // Well before the 10 s request timeout.
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}

#[tokio::test]
async fn request_with_a_silent_responder_times_out() {
    let server = Server::new();
    let master = MasterSecret::generate().unwrap();
    let timeout = Duration::from_millis(400);
    let requester = connect_keys(
        &server,
        keys(&master, "acme"),
        "requester",
        NamespaceOptions::new().request_timeout(timeout),
    )
    .await;
    let silent = connect(&server, &master, "acme", "silent").await;
    let mut svc = silent.subscribe("svc.slow").await.unwrap();
    request_barrier(&silent).await;

    let start = std::time::Instant::now();
    let err = requester.request("svc.slow", b"hello").await.unwrap_err();
    let took = start.elapsed();
    assert_eq!(err.kind(), RequestErrorKind::TimedOut, "{err}");
    assert!(took >= timeout, "timed out after {took:?}");
    assert!(took < Duration::from_secs(5), "timed out after {took:?}");
    // The request did reach the responder, which never answered.
    let req = recv(&mut svc).await;
    assert_eq!(&req.payload[..], b"hello");
    // A late answer is dropped quietly: the requester is not confused by it.
    silent.respond(&req, b"too late").await.unwrap();
    let err = requester.request("nobody.else", b"x").await.unwrap_err();
    assert_eq!(err.kind(), RequestErrorKind::NoResponders);
}

#[tokio::test]
async fn wildcard_subscriptions_never_deliver_from_outside_the_namespace() {
    let server = Server::new();
    let master = MasterSecret::generate().unwrap();
    let ns = connect(&server, &master, "acme", "watcher").await;
    let beta = connect(&server, &master, "beta", "other").await;
    let raw = server.raw_client().await;

    let mut all = ns.subscribe(">").await.unwrap();
    let mut star = ns.subscribe("*.x").await.unwrap();
    let probe = ns.publish("probe.x", b"probe").await.unwrap();
    assert_eq!(recv(&mut all).await.msg_id, probe);
    assert_eq!(recv(&mut star).await.msg_id, probe);

    // Another tenant uses the same relative subjects.
    for s in ["x", "probe.x", "a.x", "end.x", "tenant.acme.x"] {
        beta.publish(s, b"beta").await.unwrap();
    }
    request_barrier(&beta).await;

    // A raw client publishes everywhere around the namespace.
    let acme_sealed = ns
        .sealer()
        .seal("tenant.acme.probe.x", None, b"copied")
        .unwrap()
        .1;
    let outside = [
        "tenant.beta.x",
        "tenant.beta.probe.x",
        "x",
        "a.x",
        "probe.x",
        "tenant",
        "tenant.acme",
        "tenant.acme-2.x",
        "tenant.acmex.x",
        "tenant.acm.x",
        "tenant.ACME.x",
        "TENANT.acme.x",
        "acme.x",
        "tenant.beta.tenant.acme.x",
        "_INBOX.x",
        "$SYS.x",
        "tenantacme.x",
        "xtenant.acme.x",
    ];
    for s in outside {
        raw.publish(s, "raw garbage".into()).await.unwrap();
        raw.publish(s, acme_sealed.clone()).await.unwrap();
    }
    // Then a legitimate message on the same raw connection: it arrives after all of
    // the above would have.
    let (end_id, end) = ns.sealer().seal("tenant.acme.end.x", None, b"end").unwrap();
    raw.publish("tenant.acme.end.x", end).await.unwrap();
    raw.flush().await.unwrap();

    let m = recv(&mut all).await;
    assert_eq!((m.msg_id, m.subject.as_str()), (end_id, "end.x"));
    let m = recv(&mut star).await;
    assert_eq!((m.msg_id, m.subject.as_str()), (end_id, "end.x"));
    assert_silent(&mut all).await;
    assert_silent(&mut star).await;

    // Nothing from outside even reached verification.
    let snap = ns.counters().snapshot();
    assert_eq!(snap.dropped_total(), 0, "{snap:?}");
    assert_eq!(
        snap.delivered, 4,
        "probe and end marker, on two subscriptions"
    );
}

#[tokio::test]
async fn two_tenants_on_one_server_are_isolated() {
    let server = Server::new();
    let master = MasterSecret::generate().unwrap();
    let mut spy = Spy::start(&server).await;
    let a = connect(&server, &master, "acme", "agent").await;
    let b = connect(&server, &master, "acme-2", "agent").await;

    let mut sa = a.subscribe("orders.>").await.unwrap();
    let mut sb = b.subscribe("orders.>").await.unwrap();
    let mut sa_all = a.subscribe(">").await.unwrap();
    let probe_a = a.publish("orders.probe", b"probe").await.unwrap();
    let probe_b = b.publish("orders.probe", b"probe").await.unwrap();
    assert_eq!(recv(&mut sa).await.msg_id, probe_a);
    assert_eq!(recv(&mut sa_all).await.msg_id, probe_a);
    assert_eq!(recv(&mut sb).await.msg_id, probe_b);

    let id_a = a.publish("orders.created", b"from-acme").await.unwrap();
    let id_b = b.publish("orders.created", b"from-acme-2").await.unwrap();

    let m = recv(&mut sa).await;
    assert_eq!((m.msg_id, &m.payload[..]), (id_a, &b"from-acme"[..]));
    assert_eq!(m.tenant.as_str(), "acme");
    assert_eq!(recv(&mut sa_all).await.msg_id, id_a);
    let m = recv(&mut sb).await;
    assert_eq!((m.msg_id, &m.payload[..]), (id_b, &b"from-acme-2"[..]));
    assert_eq!(m.tenant.as_str(), "acme-2");
    assert_silent(&mut sa).await;
    assert_silent(&mut sa_all).await;
    assert_silent(&mut sb).await;
    // Neither namespace even received the other's traffic.
    for ns in [&a, &b] {
        let snap = ns.counters().snapshot();
        assert_eq!(snap.dropped_total(), 0, "{}: {snap:?}", ns.tenant());
    }

    // Copying B's sealed message into A's namespace: refused as another tenant's.
    let seen = spy.sync().await;
    let b_msg = seen
        .iter()
        .find(|m| m.subject.as_str() == "tenant.acme-2.orders.created")
        .expect("spy saw tenant acme-2's message");
    let raw = server.raw_client().await;
    raw.publish("tenant.acme.orders.created", b_msg.payload.clone())
        .await
        .unwrap();
    let (legit, body) = a
        .sealer()
        .seal("tenant.acme.orders.created", None, b"legit")
        .unwrap();
    raw.publish("tenant.acme.orders.created", body)
        .await
        .unwrap();
    raw.flush().await.unwrap();
    assert_eq!(recv(&mut sa).await.msg_id, legit);
    assert_eq!(recv(&mut sa_all).await.msg_id, legit);
    let snap = a.counters().snapshot();
    assert_eq!(
        snap.dropped(DropReason::WrongTenant),
        2,
        "two subscriptions"
    );
    assert_eq!(snap.dropped_total(), 2, "{snap:?}");
    assert_eq!(b.counters().snapshot().dropped_total(), 0);
}

#[tokio::test]
async fn slow_consumer_is_counted_and_reported() {
    const FLOOD: usize = 5_000;
    let server = Server::new();
    let master = MasterSecret::generate().unwrap();
    let slow: TenantNamespace = connect_keys(
        &server,
        keys(&master, "acme"),
        "slow",
        NamespaceOptions::new().subscription_capacity(8),
    )
    .await;
    let fast = connect(&server, &master, "acme", "fast").await;
    let mut events = slow.events();
    let mut sub = slow.subscribe("flood").await.unwrap();
    echo_barrier(&slow, &mut sub, "flood").await;
    assert_eq!(slow.counters().slow_consumer(), 0);

    // Nobody polls `sub` while the flood arrives.
    let payload = vec![7u8; 128];
    for _ in 0..FLOOD {
        fast.publish("flood", &payload).await.unwrap();
    }
    fast.flush().await.unwrap();

    let counted = nats_harness::eventually(ARRIVE, || async {
        let n = slow.counters().slow_consumer();
        (n > 0).then_some(n)
    })
    .await;
    assert!(counted.is_some(), "no slow consumer counted");
    assert_eq!(
        slow.counters().snapshot().slow_consumer,
        slow.counters().slow_consumer()
    );

    let deadline = tokio::time::Instant::now() + ARRIVE;
    let mut saw_event = false;
    while !saw_event {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(BusEvent::SlowConsumer { .. })) => saw_event = true,
            Ok(Ok(_)) => {}
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => panic!("event channel: {e}"),
            Err(_) => panic!("no SlowConsumer event within {ARRIVE:?}"),
        }
    }

    // Messages were lost client-side, and the subscription still works.
    let mut received = 0usize;
    while recv_within(&mut sub, Duration::from_millis(200))
        .await
        .is_some()
    {
        received += 1;
        assert!(received <= FLOOD);
    }
    assert!(received < FLOOD, "nothing was lost: {received}");
    let id = fast.publish("flood", b"after").await.unwrap();
    let m = recv(&mut sub).await;
    assert_eq!(m.msg_id, id);
}
