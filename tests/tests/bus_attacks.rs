//! Attacks on a tenant's subscription, injected with a raw async-nats client: each
//! is refused (never delivered), counted under its own `DropReason`, and leaves the
//! subscription working. Also key rotation.

mod bus_common;

use std::collections::BTreeMap;
use std::sync::Arc;

use bus_common::*;
use bytes::Bytes;
use nats_harness::Server;
use tenant_bus::envelope::{decode_header, now_ms, Sealer, FIXED_HEADER_LEN};
use tenant_bus::{DropReason, MasterSecret, MessageId, Subscription, TenantNamespace};

const TENANT: &str = "alpha";
const SUBJECT: &str = "tenant.alpha.orders.created";

/// Tenant `alpha`'s victim subscription on `orders.>`, a raw client to inject with,
/// and the drop counts every attack so far should have produced.
struct Target {
    _server: Server,
    master: MasterSecret,
    ns: TenantNamespace,
    sub: Subscription,
    raw: async_nats::Client,
    expected: BTreeMap<DropReason, u64>,
    legit: u64,
}

impl Target {
    async fn new() -> Target {
        let server = Server::new();
        let master = MasterSecret::generate().unwrap();
        let ns = connect(&server, &master, TENANT, "victim").await;
        let mut sub = ns.subscribe("orders.>").await.unwrap();
        echo_barrier(&ns, &mut sub, "orders.probe").await;
        let raw = server.raw_client().await;
        Target {
            _server: server,
            master,
            ns,
            sub,
            raw,
            expected: BTreeMap::new(),
            legit: 0,
        }
    }

    /// A valid body for `SUBJECT`, sealed by the tenant's own sealer.
    fn valid(&self, payload: &[u8]) -> (MessageId, Bytes) {
        self.ns.sealer().seal(SUBJECT, None, payload).unwrap()
    }

    async fn inject(&self, subject: &str, body: Bytes) {
        self.raw.publish(subject.to_string(), body).await.unwrap();
    }

    /// Publishes a legitimate message on the same raw connection as the attacks and
    /// checks it is the next delivery: everything injected before it was processed
    /// and not delivered. Then checks the drop counters.
    async fn expect_only_legit_then(&mut self, drops: &[(DropReason, u64)], what: &str) {
        self.legit += 1;
        let payload = format!("legit-{}", self.legit);
        let (id, body) = self.valid(payload.as_bytes());
        self.inject(SUBJECT, body).await;
        self.raw.flush().await.unwrap();
        let m = recv(&mut self.sub).await;
        assert_eq!(
            (m.msg_id, &m.payload[..]),
            (id, payload.as_bytes()),
            "{what}: an injected message was delivered"
        );
        for (reason, n) in drops {
            *self.expected.entry(*reason).or_default() += n;
        }
        let snap = self.ns.counters().snapshot();
        for reason in DropReason::ALL {
            assert_eq!(
                snap.dropped(reason),
                self.expected.get(&reason).copied().unwrap_or(0),
                "{what}: count of {reason}; {snap:?}"
            );
        }
    }

    /// Injects each body on `SUBJECT`, then checks that `reason` counted each once.
    async fn attack(&mut self, bodies: Vec<Bytes>, reason: DropReason, what: &str) {
        let n = bodies.len() as u64;
        for body in bodies {
            self.inject(SUBJECT, body).await;
        }
        self.expect_only_legit_then(&[(reason, n)], what).await;
    }
}

fn mutate(body: &Bytes, f: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    let mut v = body.to_vec();
    f(&mut v);
    Bytes::from(v)
}

fn header_len(body: &[u8]) -> usize {
    decode_header(body).unwrap().header_len
}

/// A small deterministic generator for "random" bytes (reproducible failures).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[tokio::test]
async fn flipped_ciphertext_or_tag_bits_fail_authentication() {
    let mut t = Target::new().await;
    let (_, body) = t.valid(b"payload");
    let h = header_len(&body);
    let last = body.len() - 1;
    let bodies = vec![
        mutate(&body, |b| b[h] ^= 0x01),
        mutate(&body, |b| b[h + 3] ^= 0x80),
        mutate(&body, |b| b[last] ^= 0x01),
        mutate(&body, |b| b[last - 15] ^= 0x40),
    ];
    t.attack(bodies, DropReason::Authentication, "flipped bits")
        .await;
    // The untouched original still opens (it was never delivered before).
    t.inject(SUBJECT, body).await;
    let m = recv(&mut t.sub).await;
    assert_eq!(&m.payload[..], b"payload");
}

#[tokio::test]
async fn altered_tenant_field_is_wrong_tenant() {
    let mut t = Target::new().await;
    let (_, body) = t.valid(b"payload");
    let at = FIXED_HEADER_LEN;
    assert_eq!(&body[at..at + TENANT.len()], TENANT.as_bytes());
    let bodies = vec![
        // Another valid slug of the same length.
        mutate(&body, |b| b[at..at + 5].copy_from_slice(b"bravo")),
        mutate(&body, |b| b[at + 4] = b'b'),
        mutate(&body, |b| b[at..at + 5].copy_from_slice(b"alp-a")),
    ];
    t.attack(bodies, DropReason::WrongTenant, "altered tenant")
        .await;
    // A tenant field that is no slug at all is malformed.
    let bodies = vec![
        mutate(&body, |b| b[at] = b'A'),
        mutate(&body, |b| b[at + 4] = b'-'),
        mutate(&body, |b| b[at + 2] = b'.'),
        mutate(&body, |b| b[at + 1] = 0xd0),
    ];
    t.attack(bodies, DropReason::Malformed, "tenant not a slug")
        .await;
}

#[tokio::test]
async fn altered_header_fields_fail_authentication() {
    let mut t = Target::new().await;
    let (_, body) = t.valid(b"payload");
    let h = header_len(&body);
    let sender_at = FIXED_HEADER_LEN + TENANT.len() + 1;
    assert_eq!(&body[sender_at..h], b"victim");
    let bodies = vec![
        // Message id: instance and sequence.
        mutate(&body, |b| b[6] ^= 0x01),
        mutate(&body, |b| b[21] ^= 0x01),
        // Timestamp (a small change, still fresh if it were believed).
        mutate(&body, |b| b[29] ^= 0x01),
        mutate(&body, |b| b[27] ^= 0x01),
        // Nonce.
        mutate(&body, |b| b[30] ^= 0x01),
        // Sender: another valid agent id of the same length.
        mutate(&body, |b| b[sender_at..h].copy_from_slice(b"attack")),
    ];
    t.attack(bodies, DropReason::Authentication, "altered header")
        .await;
}

#[tokio::test]
async fn moved_or_re_addressed_messages_fail_authentication() {
    let mut t = Target::new().await;
    let (_, body) = t.valid(b"payload");
    // The same bytes on another subject of the same tenant.
    for s in [
        "tenant.alpha.orders.cancelled",
        "tenant.alpha.orders.created.x",
        "tenant.alpha.orders.x",
    ] {
        t.inject(s, body.clone()).await;
    }
    // With a reply inbox the sender never bound into the seal.
    t.raw
        .publish_with_reply(SUBJECT, "tenant.alpha._INBOX.evil.1", body.clone())
        .await
        .unwrap();
    t.expect_only_legit_then(&[(DropReason::Authentication, 4)], "moved")
        .await;

    // A sealed request whose reply inbox is swapped for another one.
    let (_, req) =
        t.ns.sealer()
            .seal(SUBJECT, Some("tenant.alpha._INBOX.abc.1"), b"request")
            .unwrap();
    t.raw
        .publish_with_reply(SUBJECT, "tenant.alpha._INBOX.abc.2", req.clone())
        .await
        .unwrap();
    // Or dropped altogether.
    t.inject(SUBJECT, req.clone()).await;
    t.expect_only_legit_then(&[(DropReason::Authentication, 2)], "re-addressed")
        .await;

    // A request sealed with a reply outside the namespace authenticates, but is
    // refused: responses must stay inside the tenant.
    let (_, out) =
        t.ns.sealer()
            .seal(SUBJECT, Some("_INBOX.elsewhere.1"), b"request")
            .unwrap();
    t.raw
        .publish_with_reply(SUBJECT, "_INBOX.elsewhere.1", out)
        .await
        .unwrap();
    t.expect_only_legit_then(&[(DropReason::OutsideNamespace, 1)], "outside reply")
        .await;

    // The original request with its own inbox is delivered, once.
    t.raw
        .publish_with_reply(SUBJECT, "tenant.alpha._INBOX.abc.1", req)
        .await
        .unwrap();
    let m = recv(&mut t.sub).await;
    assert_eq!(&m.payload[..], b"request");
    assert_eq!(
        m.reply.as_ref().map(|r| r.as_str()),
        Some("tenant.alpha._INBOX.abc.1")
    );
}

#[tokio::test]
async fn message_sealed_with_another_key_for_this_tenant_fails_authentication() {
    let mut t = Target::new().await;
    // Another master secret derives a different key for the same tenant name,
    // version 1: the header is perfectly plausible.
    let other_master = MasterSecret::generate().unwrap();
    let forged_keys = other_master.key_set(&tenant(TENANT), [1], 1).unwrap();
    let forger = Sealer::new(Arc::new(forged_keys), Some(agent("victim"))).unwrap();
    let mut bodies = Vec::new();
    for i in 0..3 {
        let (_, b) = forger
            .seal(SUBJECT, None, format!("forged {i}").as_bytes())
            .unwrap();
        assert_eq!(decode_header(&b).unwrap().tenant, TENANT);
        bodies.push(b);
    }
    // The key of another tenant (same master), relabelled as this tenant's: the
    // key set is bound to its tenant, so build the envelope for `beta` and patch
    // the tenant field, which then fails the tag.
    let beta_keys = t.master.key_set(&tenant("bravo"), [1], 1).unwrap();
    let beta = Sealer::new(Arc::new(beta_keys), Some(agent("victim"))).unwrap();
    let (_, b) = beta.seal(SUBJECT, None, b"relabelled").unwrap();
    bodies.push(mutate(&b, |v| {
        v[FIXED_HEADER_LEN..FIXED_HEADER_LEN + 5].copy_from_slice(TENANT.as_bytes())
    }));
    t.attack(bodies, DropReason::Authentication, "foreign key")
        .await;
}

#[tokio::test]
async fn replays_are_refused_whatever_the_order() {
    let mut t = Target::new().await;
    // A captured valid message, delivered once, then replayed.
    let (id, body) = t.valid(b"once");
    t.inject(SUBJECT, body.clone()).await;
    let m = recv(&mut t.sub).await;
    assert_eq!(m.msg_id, id);
    t.attack(
        vec![body.clone(), body.clone(), body],
        DropReason::Replay,
        "replay",
    )
    .await;

    // Duplicates delivered out of order: sequences 3, 1, 2, 1, 3.
    let sealer = Sealer::new(t.ns.keys().clone(), Some(agent("other"))).unwrap();
    let msgs: Vec<(MessageId, Bytes)> = (1..=3)
        .map(|i| {
            sealer
                .seal(SUBJECT, None, format!("seq {i}").as_bytes())
                .unwrap()
        })
        .collect();
    for (i, (id, _)) in msgs.iter().enumerate() {
        assert_eq!(id.sequence(), i as u64 + 1);
    }
    for seq in [3usize, 1, 2, 1, 3] {
        t.inject(SUBJECT, msgs[seq - 1].1.clone()).await;
    }
    for seq in [3u64, 1, 2] {
        let m = recv(&mut t.sub).await;
        assert_eq!(m.msg_id.sequence(), seq);
        assert_eq!(&m.payload[..], format!("seq {seq}").as_bytes());
    }
    t.expect_only_legit_then(&[(DropReason::Replay, 2)], "out-of-order duplicates")
        .await;
    // And again, later: still refused.
    for seq in [2usize, 3, 1] {
        t.inject(SUBJECT, msgs[seq - 1].1.clone()).await;
    }
    t.expect_only_legit_then(&[(DropReason::Replay, 3)], "late duplicates")
        .await;
}

#[tokio::test]
async fn stale_and_future_messages_are_refused() {
    let mut t = Target::new().await;
    let now = now_ms();
    let ns = t.ns.clone();
    let sealer = ns.sealer();
    let at = |ts: u64| sealer.seal_at(SUBJECT, None, b"timed", ts).unwrap().1;
    let stale = vec![at(now - 10 * 60_000), at(now - 301_000), at(0)];
    let future = vec![at(now + 10 * 60_000), at(now + 31_000), at(u64::MAX)];
    t.attack(stale, DropReason::Stale, "stale").await;
    t.attack(future, DropReason::Future, "future").await;
    // Inside the window and the skew allowance: delivered.
    for ts in [now - 60_000, now + 5_000] {
        t.inject(SUBJECT, at(ts)).await;
        let m = recv(&mut t.sub).await;
        assert_eq!(&m.payload[..], b"timed");
    }
    t.expect_only_legit_then(&[], "fresh enough").await;
}

#[tokio::test]
async fn unknown_key_versions_are_refused() {
    let mut t = Target::new().await;
    let tenant_id = tenant(TENANT);
    let mut bodies = Vec::new();
    for v in [2u32, 7, u32::MAX, 0] {
        let keys = t.master.key_set(&tenant_id, [v], v).unwrap();
        let s = Sealer::new(Arc::new(keys), Some(agent("newer"))).unwrap();
        bodies.push(s.seal(SUBJECT, None, b"other version").unwrap().1);
    }
    // The key version field of a valid message altered.
    let (_, body) = t.valid(b"payload");
    bodies.push(mutate(&body, |b| b[5] = 9));
    t.attack(bodies, DropReason::UnknownKey, "unknown key")
        .await;
}

#[tokio::test]
async fn truncated_random_and_malformed_bytes_are_refused() {
    let mut t = Target::new().await;
    let (_, body) = t.valid(b"some payload");
    let h = header_len(&body);
    let mut bodies = vec![
        Bytes::new(),
        body.slice(..1),
        body.slice(..10),
        body.slice(..FIXED_HEADER_LEN),
        body.slice(..h),
        body.slice(..h + 15),
        // Flags must be zero.
        mutate(&body, |b| b[1] = 1),
        // Tenant length out of range.
        mutate(&body, |b| b[42] = 0),
        mutate(&body, |b| b[42] = 64),
        mutate(&body, |b| b[42] = 255),
        // Sender length out of range or past the end.
        mutate(&body, |b| b[FIXED_HEADER_LEN + 5] = 64),
        mutate(&body, |b| b[FIXED_HEADER_LEN + 5] = 63),
    ];
    // Random bytes: short ones (any first byte), and longer ones made to look like
    // this format version so the decoder's later checks are what refuse them.
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for n in [5usize, 20, 43, 59] {
        bodies.push(Bytes::from(rng.bytes(n)));
    }
    for n in [60usize, 100, 300, 2000] {
        let mut v = rng.bytes(n);
        v[0] = 1;
        v[1] |= 1; // nonzero flags
        bodies.push(Bytes::from(v));
    }
    for n in [64usize, 200] {
        let mut v = rng.bytes(n);
        v[0] = 1;
        v[1] = 0;
        v[42] = 64 + (v[42] % 192); // tenant length out of range
        bodies.push(Bytes::from(v));
    }
    for b in &bodies {
        assert_eq!(decode_header(b).err(), Some(DropReason::Malformed), "{b:?}");
    }
    t.attack(bodies, DropReason::Malformed, "malformed").await;

    // The same truncations on a message with a reply go the same way.
    let (_, req) =
        t.ns.sealer()
            .seal(SUBJECT, Some("tenant.alpha._INBOX.x.1"), b"r")
            .unwrap();
    t.raw
        .publish_with_reply(SUBJECT, "tenant.alpha._INBOX.x.1", req.slice(..30))
        .await
        .unwrap();
    t.expect_only_legit_then(&[(DropReason::Malformed, 1)], "truncated request")
        .await;
}

#[tokio::test]
async fn unsupported_version_byte_is_refused() {
    let mut t = Target::new().await;
    let (_, body) = t.valid(b"payload");
    let mut bodies: Vec<Bytes> = [0u8, 2, 0x7f, 0xff]
        .iter()
        .map(|v| mutate(&body, |b| b[0] = *v))
        .collect();
    // Long enough random garbage whose first byte is not 0x01 reads as another
    // format version (docs/wire-format.md: any other value is unsupported_version).
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    for n in [64usize, 500] {
        let mut v = rng.bytes(n);
        v[0] = 0x7b; // '{': a JSON body, for instance
        bodies.push(Bytes::from(v));
    }
    bodies.push(Bytes::from_static(
        b"{\"tenant\":\"alpha\",\"payload\":\"plain JSON pretending to be a message\"}",
    ));
    t.attack(bodies, DropReason::UnsupportedVersion, "version")
        .await;
}

#[tokio::test]
async fn every_attack_in_one_subscription_counts_each_reason_exactly() {
    let mut t = Target::new().await;
    let (_, body) = t.valid(b"payload");
    let h = header_len(&body);
    let other = MasterSecret::generate().unwrap();
    let forger = Sealer::new(
        Arc::new(other.key_set(&tenant(TENANT), [1], 1).unwrap()),
        None,
    )
    .unwrap();
    let v2 = Sealer::new(
        Arc::new(t.master.key_set(&tenant(TENANT), [2], 2).unwrap()),
        None,
    )
    .unwrap();
    let sealer = t.ns.sealer();
    let (_, delivered) = sealer.seal(SUBJECT, None, b"first").unwrap();
    let injected: Vec<(Bytes, Option<DropReason>)> = vec![
        (delivered.clone(), None),
        (
            mutate(&body, |b| b[h] ^= 1),
            Some(DropReason::Authentication),
        ),
        (
            mutate(&body, |b| b[FIXED_HEADER_LEN] = b'z'),
            Some(DropReason::WrongTenant),
        ),
        (
            mutate(&body, |b| b[10] ^= 1),
            Some(DropReason::Authentication),
        ),
        (
            mutate(&body, |b| b[25] ^= 1),
            Some(DropReason::Authentication),
        ),
        (
            forger.seal(SUBJECT, None, b"forged").unwrap().1,
            Some(DropReason::Authentication),
        ),
        (delivered, Some(DropReason::Replay)),
        (
            sealer
                .seal_at(SUBJECT, None, b"old", now_ms() - 3_600_000)
                .unwrap()
                .1,
            Some(DropReason::Stale),
        ),
        (
            sealer
                .seal_at(SUBJECT, None, b"new", now_ms() + 3_600_000)
                .unwrap()
                .1,
            Some(DropReason::Future),
        ),
        (
            v2.seal(SUBJECT, None, b"v2").unwrap().1,
            Some(DropReason::UnknownKey),
        ),
        (body.slice(..20), Some(DropReason::Malformed)),
        (
            mutate(&body, |b| b[0] = 9),
            Some(DropReason::UnsupportedVersion),
        ),
    ];
    for (b, _) in &injected {
        t.inject(SUBJECT, b.clone()).await;
    }
    let m = recv(&mut t.sub).await;
    assert_eq!(&m.payload[..], b"first");
    let mut drops: BTreeMap<DropReason, u64> = BTreeMap::new();
    for r in injected.iter().filter_map(|(_, r)| *r) {
        *drops.entry(r).or_default() += 1;
    }
    let drops: Vec<(DropReason, u64)> = drops.into_iter().collect();
    t.expect_only_legit_then(&drops, "all attacks").await;
    let snap = t.ns.counters().snapshot();
    assert_eq!(snap.dropped_total(), injected.len() as u64 - 1);
    assert_eq!(snap.delivered, 1 + 1 + 1, "probe, first, legit");
}

#[tokio::test]
async fn key_rotation_accepts_the_previous_version_until_it_is_removed() {
    let server = Server::new();
    let master = MasterSecret::generate().unwrap();
    let t = tenant(TENANT);
    let v1 = master.key_set(&t, [1], 1).unwrap();
    let v12 = master.key_set(&t, [1, 2], 2).unwrap();
    let v2_only = v12.without(1).unwrap();
    assert_eq!(v2_only.versions().collect::<Vec<_>>(), vec![2]);

    let opts = tenant_bus::NamespaceOptions::new;
    // Senders on the old and the new key; receivers before, during, after rotation.
    let old_sender = connect_keys(&server, v1.clone(), "old-sender", opts()).await;
    let new_sender = connect_keys(&server, v12.clone(), "new-sender", opts()).await;
    let not_rotated = connect_keys(&server, v1, "not-rotated", opts()).await;
    let rotating = connect_keys(&server, v12, "rotating", opts()).await;
    let rotated = connect_keys(&server, v2_only, "rotated", opts()).await;
    let mut subs = Vec::new();
    for ns in [&not_rotated, &rotating, &rotated] {
        subs.push(ns.subscribe("orders.>").await.unwrap());
    }
    let raw = server.raw_client().await;

    // Sealed by each sender, delivered in a known order through one raw connection.
    let (old_id, old_body) = old_sender.sealer().seal(SUBJECT, None, b"v1").unwrap();
    let (new_id, new_body) = new_sender.sealer().seal(SUBJECT, None, b"v2").unwrap();
    assert_eq!(decode_header(&old_body).unwrap().key_version, 1);
    assert_eq!(decode_header(&new_body).unwrap().key_version, 2);
    raw.publish(SUBJECT, old_body).await.unwrap();
    raw.publish(SUBJECT, new_body).await.unwrap();
    raw.flush().await.unwrap();

    // During the rotation both versions open.
    let m = recv(&mut subs[1]).await;
    assert_eq!((m.msg_id, m.key_version), (old_id, 1));
    let m = recv(&mut subs[1]).await;
    assert_eq!((m.msg_id, m.key_version), (new_id, 2));
    // Once version 1 is removed, its messages are refused as an unknown key.
    let m = recv(&mut subs[2]).await;
    assert_eq!((m.msg_id, m.key_version), (new_id, 2));
    // A receiver that has not rotated yet cannot open version 2.
    let m = recv(&mut subs[0]).await;
    assert_eq!((m.msg_id, m.key_version), (old_id, 1));
    for sub in &mut subs {
        assert_silent(sub).await;
    }
    let count = |ns: &TenantNamespace| {
        let s = ns.counters().snapshot();
        (s.dropped(DropReason::UnknownKey), s.dropped_total())
    };
    assert_eq!(count(&rotating), (0, 0));
    assert_eq!(count(&rotated), (1, 1));
    assert_eq!(count(&not_rotated), (1, 1));

    // The same through the namespace API: both senders keep publishing.
    let id1 = old_sender
        .publish("orders.created", b"still v1")
        .await
        .unwrap();
    let id2 = new_sender
        .publish("orders.created", b"v2 again")
        .await
        .unwrap();
    // (From two connections: the two may arrive in either order.)
    let mut got: Vec<_> = Vec::new();
    for _ in 0..2 {
        let m = recv(&mut subs[1]).await;
        got.push((m.msg_id, m.key_version));
    }
    got.sort();
    let mut want = vec![(id1, 1), (id2, 2)];
    want.sort();
    assert_eq!(got, want);
    let m = recv(&mut subs[2]).await;
    assert_eq!((m.msg_id, m.key_version), (id2, 2));
    let m = recv(&mut subs[0]).await;
    assert_eq!((m.msg_id, m.key_version), (id1, 1));
    // Polling is what verifies (and counts): let each subscription see the rest.
    for sub in &mut subs {
        assert_silent(sub).await;
    }
    assert_eq!(count(&rotating), (0, 0));
    assert_eq!(count(&rotated), (2, 2));
    assert_eq!(count(&not_rotated), (2, 2));
}

#[tokio::test]
async fn forged_responses_do_not_satisfy_a_request() {
    let server = Server::new();
    let master = MasterSecret::generate().unwrap();
    let requester = connect(&server, &master, TENANT, "requester").await;
    let responder = connect(&server, &master, TENANT, "responder").await;
    let raw = server.raw_client().await;
    let mut svc = responder.subscribe("svc.slow").await.unwrap();

    let (inbox_tx, inbox_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let serve = tokio::spawn(async move {
        let req = recv(&mut svc).await;
        let inbox = req.reply.clone().unwrap().as_str().to_string();
        inbox_tx.send(inbox).unwrap();
        go_rx.await.unwrap();
        responder.respond(&req, b"the real answer").await.unwrap();
        responder
    });
    let call = tokio::spawn({
        let requester = requester.clone();
        async move { requester.request("svc.slow", b"question").await }
    });

    let inbox: String = inbox_rx.await.unwrap();
    assert!(inbox.starts_with("tenant.alpha._INBOX."), "{inbox}");
    // What an attacker with access to the subject might send to the inbox.
    let other = MasterSecret::generate().unwrap();
    let forger = Sealer::new(
        Arc::new(other.key_set(&tenant(TENANT), [1], 1).unwrap()),
        Some(agent("responder")),
    )
    .unwrap();
    let legit_keys = Sealer::new(requester.keys().clone(), Some(agent("responder"))).unwrap();
    let (_, elsewhere) = legit_keys
        .seal(&format!("{inbox}0"), None, b"for another inbox")
        .unwrap();
    let (_, stale) = legit_keys
        .seal_at(&inbox, None, b"old", now_ms() - 3_600_000)
        .unwrap();
    let (_, forged) = forger.seal(&inbox, None, b"forged answer").unwrap();
    for body in [Bytes::from_static(b"garbage"), forged, elsewhere, stale] {
        raw.publish(inbox.clone(), body).await.unwrap();
    }
    // A raw round trip: the server processed all of the above before answering.
    let err = raw.request("zz-nobody", "".into()).await.unwrap_err();
    assert_eq!(err.kind(), async_nats::RequestErrorKind::NoResponders);

    go_tx.send(()).unwrap();
    let response = call.await.unwrap().unwrap();
    assert_eq!(&response.payload[..], b"the real answer");
    assert_eq!(response.sender.as_ref().unwrap().as_str(), "responder");
    let snap = requester.counters().snapshot();
    assert_eq!(snap.dropped(DropReason::Malformed), 1, "{snap:?}");
    assert_eq!(snap.dropped(DropReason::Authentication), 2, "{snap:?}");
    assert_eq!(snap.dropped(DropReason::Stale), 1, "{snap:?}");
    assert_eq!(snap.dropped_total(), 4, "{snap:?}");
    assert_eq!(snap.delivered, 1);
    let _responder = serve.await.unwrap();
}

#[tokio::test]
async fn replay_state_at_its_cap_refuses_new_senders_but_keeps_known_ones() {
    let server = Server::new();
    let master = MasterSecret::generate().unwrap();
    let ns = connect_keys(
        &server,
        keys(&master, TENANT),
        "victim",
        tenant_bus::NamespaceOptions::new().max_replay_senders(2),
    )
    .await;
    let mut sub = ns.subscribe("orders.>").await.unwrap();
    let raw = server.raw_client().await;
    let sealers: Vec<Sealer> = (0..4)
        .map(|_| Sealer::new(ns.keys().clone(), Some(agent("sender"))).unwrap())
        .collect();
    let send = |i: usize| sealers[i].seal(SUBJECT, None, format!("from {i}").as_bytes());
    // Two senders fill the table.
    for i in [0, 1] {
        let (id, body) = send(i).unwrap();
        raw.publish(SUBJECT, body).await.unwrap();
        assert_eq!(recv(&mut sub).await.msg_id, id);
    }
    // Newcomers are refused while both are remembered (no eviction of live ones).
    for i in [2, 3, 2] {
        raw.publish(SUBJECT, send(i).unwrap().1).await.unwrap();
    }
    // Known senders still get through.
    let (id, body) = send(1).unwrap();
    raw.publish(SUBJECT, body).await.unwrap();
    assert_eq!(recv(&mut sub).await.msg_id, id);
    let snap = ns.counters().snapshot();
    assert_eq!(snap.dropped(DropReason::ReplayStateFull), 3, "{snap:?}");
    assert_eq!(snap.dropped_total(), 3, "{snap:?}");
    assert_eq!(sub.replay_senders(), 2);
}

#[tokio::test]
async fn a_flood_of_bad_messages_neither_starves_the_runtime_nor_hides_good_ones() {
    const BAD: u64 = 5_000;
    let mut t = Target::new().await;
    let (_, body) = t.valid(b"payload");
    let h = header_len(&body);
    // Another task on this (single-threaded) runtime must keep running while the
    // subscription's pump works through the flood (it verifies and drops messages
    // as they arrive, polled or not): it yields at least every 128 messages
    // (tokio's cooperative budget), so the ticker runs dozens of times while the
    // 5,000 bad messages are processed.
    let ticks = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let ticker = tokio::spawn({
        let ticks = ticks.clone();
        async move {
            loop {
                ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        }
    });
    for i in 0..BAD {
        let b = mutate(&body, |b| b[h + (i as usize % 7)] ^= 1 + (i % 255) as u8);
        t.inject(SUBJECT, b).await;
    }
    let (id, legit) = t.valid(b"after the flood");
    t.inject(SUBJECT, legit).await;
    let m = recv(&mut t.sub).await;
    let seen = ticks.load(std::sync::atomic::Ordering::Relaxed);
    ticker.abort();
    assert_eq!(m.msg_id, id);
    assert!(seen >= 20, "the runtime ran other tasks only {seen} times");
    let snap = t.ns.counters().snapshot();
    assert_eq!(snap.dropped(DropReason::Authentication), BAD, "{snap:?}");
    assert_eq!(snap.dropped_total(), BAD, "{snap:?}");
}

#[tokio::test]
async fn a_shorter_replay_window_makes_older_messages_stale() {
    let server = Server::new();
    let master = MasterSecret::generate().unwrap();
    let ns = connect_keys(
        &server,
        keys(&master, TENANT),
        "victim",
        tenant_bus::NamespaceOptions::new()
            .replay_window(std::time::Duration::from_secs(2))
            .clock_skew(std::time::Duration::from_millis(500)),
    )
    .await;
    let mut sub = ns.subscribe("orders.>").await.unwrap();
    let raw = server.raw_client().await;
    let now = now_ms();
    let at = |ts: u64| ns.sealer().seal_at(SUBJECT, None, b"t", ts).unwrap();
    for ts in [now - 5_000, now + 3_000] {
        raw.publish(SUBJECT, at(ts).1).await.unwrap();
    }
    let (id, body) = at(now - 1_000);
    raw.publish(SUBJECT, body).await.unwrap();
    assert_eq!(recv(&mut sub).await.msg_id, id);
    let snap = ns.counters().snapshot();
    assert_eq!(snap.dropped(DropReason::Stale), 1, "{snap:?}");
    assert_eq!(snap.dropped(DropReason::Future), 1, "{snap:?}");
}

/// Replay state is shared per namespace: a captured message replayed onto a
/// subscription made after the namespace delivered it (an agent re-subscribing)
/// is refused, while one message matching two live subscriptions (`orders.>` and
/// `orders.created`) is delivered once on each, and its replay on neither.
/// With guards per subscription alone, the re-made subscription's window was
/// empty and the replay was delivered.
#[tokio::test]
async fn a_replay_onto_a_later_subscription_of_the_namespace_is_refused() {
    let mut t = Target::new().await;
    let (id, captured) = t.valid(b"delivered once");
    t.inject(SUBJECT, captured.clone()).await;
    assert_eq!(recv(&mut t.sub).await.msg_id, id);

    // The agent subscribes again (the first subscription dropped, as a handler
    // loop does after a suspension), and a narrower one beside it.
    let again = t.ns.subscribe("orders.>").await.unwrap();
    drop(std::mem::replace(&mut t.sub, again));
    let mut narrow = t.ns.subscribe("orders.created").await.unwrap();
    t.inject(SUBJECT, captured.clone()).await;
    // Two subscriptions match: the replay is refused on each.
    let (id2, fresh) = t.valid(b"to both");
    t.inject(SUBJECT, fresh.clone()).await;
    t.raw.flush().await.unwrap();
    for (name, s) in [("wide", &mut t.sub), ("narrow", &mut narrow)] {
        let m = recv(s).await;
        assert_eq!(
            (m.msg_id, &m.payload[..]),
            (id2, &b"to both"[..]),
            "{name}: the replayed message was delivered"
        );
    }
    // The fresh message, replayed, is refused on both as well.
    t.inject(SUBJECT, fresh).await;
    let (id3, last) = t.valid(b"after");
    t.inject(SUBJECT, last).await;
    t.raw.flush().await.unwrap();
    for s in [&mut t.sub, &mut narrow] {
        assert_eq!(recv(s).await.msg_id, id3);
    }
    let snap = t.ns.counters().snapshot();
    assert_eq!(snap.dropped(DropReason::Replay), 4, "{snap:?}");
    assert_eq!(snap.dropped_total(), 4, "{snap:?}");
}
