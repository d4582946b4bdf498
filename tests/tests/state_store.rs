//! The tenant state store (`TenantNamespace::kv`, `tenant_bus::kv`) against real
//! nats-server processes.
//!
//! - `operator_mode_tenants_stay_apart`: two tenants in their own accounts, the
//!   same store and key; each agent creates its account's `STATE` bucket through
//!   the allow-list, reads its own value, lists and watches; a raw client of one
//!   tenant reaches only its own account's bucket, and the server refuses it the
//!   bucket's raw subjects for subscribing.
//! - `plain_server_sealing_keeps_tenants_apart`: one account, a bucket per
//!   tenant: a value of one tenant copied raw into the other's bucket, or read
//!   through the other's bucket, is refused as tampered.
//! - `separator_keys_cannot_collide`, `moved_values_are_tampered`,
//!   `create_update_delete`, `keys_and_watch_see_only_this_store`,
//!   `rotation_keeps_old_values_while_their_version_is_held`,
//!   `expired_values_are_gone_on_read`.

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt as _;
use nats_harness::{platform, raw_options, Server};
use tenant_bus::kv::{KvChange, KvErrorKind, KvOptions, TenantKv};
use tenant_bus::{AgentId, CredentialBundle, MasterSecret, TenantId, TenantNamespace};

const WAIT: Duration = Duration::from_secs(5);

fn bundle(
    server: &Server,
    master: &MasterSecret,
    tenant: &str,
    versions: &[u32],
) -> CredentialBundle {
    let t = TenantId::new(tenant).unwrap();
    let current = *versions.last().unwrap();
    CredentialBundle {
        url: server.url(),
        tenant: t.clone(),
        agent: AgentId::new("agent").unwrap(),
        creds: None,
        keys: master
            .key_set(&t, versions.iter().copied(), current)
            .unwrap(),
        placement: Default::default(),
    }
}

async fn connect(server: &Server, master: &MasterSecret, tenant: &str) -> TenantNamespace {
    TenantNamespace::connect(&bundle(server, master, tenant, &[1]))
        .await
        .unwrap()
}

/// A namespace of `tenant` on a plain JetStream server, its store `store` in
/// the bucket `STATE_<TENANT>` (tenants share the account here).
async fn store(server: &Server, master: &MasterSecret, tenant: &str, store: &str) -> TenantKv {
    let ns = connect(server, master, tenant).await;
    ns.kv_with(store, options(tenant)).await.unwrap()
}

fn options(tenant: &str) -> KvOptions {
    KvOptions::new().bucket(format!("STATE_{}", tenant.to_uppercase()))
}

async fn raw_kv(server: &Server, bucket: &str) -> jetstream::kv::Store {
    jetstream::new(server.raw_client().await)
        .get_key_value(bucket)
        .await
        .unwrap()
}

async fn raw_value(raw: &jetstream::kv::Store, key: &str) -> Bytes {
    raw.get(key).await.unwrap().unwrap()
}

#[tokio::test]
async fn operator_mode_tenants_stay_apart() {
    assert_eq!(
        tenant_bus::kv::STATE_BUCKET,
        agentbus_control::accounts::STATE_BUCKET,
        "the library's bucket is the one the allow-list names"
    );
    let p = platform().await;
    let url = p.server.url();
    p.cp.create_tenant("acme", agent_runtime::tiers::Tier::Free)
        .await
        .unwrap();
    p.cp.create_tenant("globex", agent_runtime::tiers::Tier::Free)
        .await
        .unwrap();
    let acme_bundle =
        p.cp.issue_agent("acme", "planner", "default")
            .await
            .unwrap();
    let globex_bundle =
        p.cp.issue_agent("globex", "planner", "default")
            .await
            .unwrap();
    let acme_ns = TenantNamespace::connect(&acme_bundle).await.unwrap();
    let globex_ns = TenantNamespace::connect(&globex_bundle).await.unwrap();

    // Each agent creates its own account's STATE bucket (the allow-list permits it).
    let acme = acme_ns.kv("sessions").await.unwrap();
    let globex = globex_ns.kv("sessions").await.unwrap();
    assert_eq!(acme.bucket(), "STATE");
    let mut acme_watch = acme.watch().await.unwrap();
    acme.put("user.1", "acme-session").await.unwrap();
    globex.put("user.1", "globex-session").await.unwrap();
    assert_eq!(
        &acme.get("user.1").await.unwrap().value[..],
        b"acme-session"
    );
    assert_eq!(
        &globex.get("user.1").await.unwrap().value[..],
        b"globex-session"
    );
    assert_eq!(acme.keys().await.unwrap(), vec!["user.1".to_string()]);
    match tokio::time::timeout(WAIT, acme_watch.next()).await {
        Ok(Some(Ok(KvChange::Put(e)))) => {
            assert_eq!(
                (e.key.as_str(), &e.value[..]),
                ("user.1", &b"acme-session"[..])
            )
        }
        other => panic!("acme's watch: {other:?}"),
    }

    // A raw client of acme: `STATE` is its own account's bucket, with only acme's
    // entry; what it writes there never reaches globex.
    let (raw_opts, mut events) = raw_options(&acme_bundle, WAIT);
    let raw = raw_opts.connect(url.as_str()).await.unwrap();
    let raw_js = jetstream::new(raw.clone());
    let raw_state = raw_js.get_key_value("STATE").await.unwrap();
    let mut stream = raw_js.get_stream("KV_STATE").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
    raw_state
        .put("sessions.user.1", "forged".into())
        .await
        .unwrap();
    assert_eq!(
        acme.get("user.1").await.unwrap_err().kind(),
        KvErrorKind::Tampered
    );
    assert_eq!(
        &globex.get("user.1").await.unwrap().value[..],
        b"globex-session"
    );
    // Subscribing to the bucket's raw subjects is refused by the server.
    let _sub = raw.subscribe("$KV.STATE.>").await.unwrap();
    raw.flush().await.unwrap();
    let seen = events
        .wait_for(WAIT, |e| e.to_lowercase().contains("permissions violation"))
        .await;
    assert!(seen.is_some(), "no violation; events {:?}", events.seen());
}

#[tokio::test]
async fn plain_server_sealing_keeps_tenants_apart() {
    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let acme = store(&server, &master, "acme", "sessions").await;
    let globex = store(&server, &master, "globex", "sessions").await;
    acme.put("user.1", "acme-session").await.unwrap();
    globex.put("user.1", "globex-session").await.unwrap();
    assert_eq!(
        &acme.get("user.1").await.unwrap().value[..],
        b"acme-session"
    );
    assert_eq!(
        &globex.get("user.1").await.unwrap().value[..],
        b"globex-session"
    );

    // Acme reading globex's bucket: the values are not acme's.
    let acme_ns = connect(&server, &master, "acme").await;
    let acme_in_globex = acme_ns
        .kv_with("sessions", options("globex"))
        .await
        .unwrap();
    assert_eq!(
        acme_in_globex.get("user.1").await.unwrap_err().kind(),
        KvErrorKind::Tampered
    );

    // Globex's sealed value copied raw over acme's.
    let globex_raw = raw_kv(&server, "STATE_GLOBEX").await;
    let acme_raw = raw_kv(&server, "STATE_ACME").await;
    let theirs = raw_value(&globex_raw, "sessions.user.1").await;
    acme_raw.put("sessions.user.1", theirs).await.unwrap();
    assert_eq!(
        acme.get("user.1").await.unwrap_err().kind(),
        KvErrorKind::Tampered
    );
    // Sealed by the same master secret, but not for acme: no plaintext leaks.
    assert!(!raw_value(&globex_raw, "sessions.user.1")
        .await
        .windows(14)
        .any(|w| w == b"globex-session"));
}

#[tokio::test]
async fn separator_keys_cannot_collide() {
    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let ns = connect(&server, &master, "acme").await;
    // A store name with the separator cannot be named: store "a" key "b.c" is
    // the bucket key `a.b.c`, and no other store can reach it.
    assert_eq!(
        ns.kv_with("a.b", options("acme")).await.unwrap_err().kind(),
        KvErrorKind::InvalidStore
    );
    let a = ns.kv_with("a", options("acme")).await.unwrap();
    let b = ns.kv_with("b", options("acme")).await.unwrap();
    let ab = ns.kv_with("a-b", options("acme")).await.unwrap();
    a.put("b.c", "a/b.c").await.unwrap();
    b.put("c", "b/c").await.unwrap();
    ab.put("c", "a-b/c").await.unwrap();
    assert_eq!(&a.get("b.c").await.unwrap().value[..], b"a/b.c");
    assert_eq!(&b.get("c").await.unwrap().value[..], b"b/c");
    assert_eq!(&ab.get("c").await.unwrap().value[..], b"a-b/c");
    assert_eq!(a.get("c").await.unwrap_err().kind(), KvErrorKind::NotFound);
    assert_eq!(a.bucket_key("b.c").unwrap(), "a.b.c");
    // Keys are validated tokens.
    for bad in ["", "b..c", ".c", "c.", "*", "b.>", "$x", "a b", "a:b"] {
        assert_eq!(
            a.put(bad, "x").await.unwrap_err().kind(),
            KvErrorKind::InvalidKey,
            "{bad:?}"
        );
    }
}

#[tokio::test]
async fn moved_values_are_tampered() {
    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let sessions = store(&server, &master, "acme", "sessions").await;
    let ns = connect(&server, &master, "acme").await;
    let other = ns.kv_with("other", options("acme")).await.unwrap();
    sessions.put("k1", "secret").await.unwrap();
    let raw = raw_kv(&server, "STATE_ACME").await;
    let sealed = raw_value(&raw, "sessions.k1").await;

    // Another key of the store, and the same key of another store.
    raw.put("sessions.k2", sealed.clone()).await.unwrap();
    raw.put("other.k1", sealed.clone()).await.unwrap();
    assert_eq!(
        sessions.get("k2").await.unwrap_err().kind(),
        KvErrorKind::Tampered
    );
    assert_eq!(
        other.get("k1").await.unwrap_err().kind(),
        KvErrorKind::Tampered
    );
    // The expiry changed, a bit flipped, truncations, garbage.
    let mut longer = sealed.to_vec();
    longer[8] = 1;
    let mut flipped = sealed.to_vec();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    for (i, body) in [
        longer,
        flipped,
        sealed[..5].to_vec(),
        sealed[..40].to_vec(),
        Vec::new(),
        b"plain text".to_vec(),
        vec![1u8; 200],
    ]
    .into_iter()
    .enumerate()
    {
        let key = format!("bad{i}");
        raw.put(format!("sessions.{key}"), body.into())
            .await
            .unwrap();
        assert_eq!(
            sessions.get(&key).await.unwrap_err().kind(),
            KvErrorKind::Tampered,
            "{key}"
        );
    }
    // The original is intact.
    let e = sessions.get("k1").await.unwrap();
    assert_eq!(&e.value[..], b"secret");
    assert_eq!(e.writer.as_ref().map(|w| w.as_str()), Some("agent"));
}

#[tokio::test]
async fn create_update_delete() {
    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let s = store(&server, &master, "acme", "sessions").await;
    let r1 = s.create("k", "one").await.unwrap();
    assert_eq!(
        s.create("k", "again").await.unwrap_err().kind(),
        KvErrorKind::Exists
    );
    let r2 = s.update("k", "two", r1).await.unwrap();
    assert_eq!(
        s.update("k", "stale", r1).await.unwrap_err().kind(),
        KvErrorKind::WrongRevision
    );
    let e = s.get("k").await.unwrap();
    assert_eq!((&e.value[..], e.revision), (&b"two"[..], r2));
    assert_eq!(
        s.delete_if("k", r1).await.unwrap_err().kind(),
        KvErrorKind::WrongRevision
    );
    s.delete("k").await.unwrap();
    assert_eq!(s.get("k").await.unwrap_err().kind(), KvErrorKind::NotFound);
    assert_eq!(
        s.get("never").await.unwrap_err().kind(),
        KvErrorKind::NotFound
    );
    // Deleted counts as absent for create.
    s.create("k", "three").await.unwrap();
    assert_eq!(&s.get("k").await.unwrap().value[..], b"three");
    // Bounded values.
    let small = connect(&server, &master, "acme")
        .await
        .kv_with("small", options("acme").max_value_len(4))
        .await
        .unwrap();
    assert_eq!(
        small.put("k", "12345").await.unwrap_err().kind(),
        KvErrorKind::TooLarge
    );
    small.put("k", "1234").await.unwrap();
}

#[tokio::test]
async fn keys_and_watch_see_only_this_store() {
    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let ns = connect(&server, &master, "acme").await;
    let s = ns.kv_with("sessions", options("acme")).await.unwrap();
    let other = ns.kv_with("other", options("acme")).await.unwrap();
    let prefixed = ns.kv_with("sessions2", options("acme")).await.unwrap();
    assert!(s.keys().await.unwrap().is_empty());
    let mut watch = s.watch().await.unwrap();
    other.put("x", "1").await.unwrap();
    prefixed.put("y", "1").await.unwrap();
    s.put("a", "1").await.unwrap();
    s.put("b.c", "2").await.unwrap();
    s.put("gone", "3").await.unwrap();
    s.delete("gone").await.unwrap();
    let mut keys = s.keys().await.unwrap();
    keys.sort();
    assert_eq!(keys, vec!["a".to_string(), "b.c".to_string()]);
    assert_eq!(other.keys().await.unwrap(), vec!["x".to_string()]);

    let mut seen = Vec::new();
    while seen.len() < 4 {
        match tokio::time::timeout(WAIT, watch.next()).await {
            Ok(Some(Ok(KvChange::Put(e)))) => seen.push(format!(
                "put {}={}",
                e.key,
                String::from_utf8_lossy(&e.value)
            )),
            Ok(Some(Ok(KvChange::Delete { key, .. }))) => seen.push(format!("delete {key}")),
            other => panic!("watch: {other:?} after {seen:?}"),
        }
    }
    assert_eq!(seen, ["put a=1", "put b.c=2", "put gone=3", "delete gone"]);

    // A value that does not open is a typed error in the watch, which goes on.
    let raw = raw_kv(&server, "STATE_ACME").await;
    raw.put("sessions.evil", "garbage".into()).await.unwrap();
    s.put("after", "4").await.unwrap();
    match tokio::time::timeout(WAIT, watch.next()).await {
        Ok(Some(Err(e))) => assert_eq!(e.kind(), KvErrorKind::Tampered),
        other => panic!("expected a tampered error, got {other:?}"),
    }
    match tokio::time::timeout(WAIT, watch.next()).await {
        Ok(Some(Ok(KvChange::Put(e)))) => assert_eq!(e.key, "after"),
        other => panic!("watch after the error: {other:?}"),
    }
    // Bounded listing.
    let capped = ns
        .kv_with("sessions", options("acme").max_keys(2))
        .await
        .unwrap();
    assert_eq!(
        capped.keys().await.unwrap_err().kind(),
        KvErrorKind::TooLarge
    );
}

#[tokio::test]
async fn rotation_keeps_old_values_while_their_version_is_held() {
    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let acme = TenantId::new("acme").unwrap();
    let ns = connect(&server, &master, "acme").await;
    let s = ns.kv_with("sessions", options("acme")).await.unwrap();
    s.put("old", "sealed-v1").await.unwrap();
    assert_eq!(s.get("old").await.unwrap().key_version, 1);

    // Rotation: version 2 seals, version 1 is still held.
    ns.set_keys(master.key_set(&acme, [1, 2], 2).unwrap())
        .unwrap();
    s.put("new", "sealed-v2").await.unwrap();
    let old = s.get("old").await.unwrap();
    assert_eq!((&old.value[..], old.key_version), (&b"sealed-v1"[..], 1));
    assert_eq!(s.get("new").await.unwrap().key_version, 2);
    // Another agent that already holds only the new set reads the new value.
    let fresh = TenantNamespace::connect(&bundle(&server, &master, "acme", &[2]))
        .await
        .unwrap()
        .kv_with("sessions", options("acme"))
        .await
        .unwrap();
    assert_eq!(&fresh.get("new").await.unwrap().value[..], b"sealed-v2");

    // Version 1 dropped: its values no longer open, and say why.
    ns.set_keys(master.key_set(&acme, [2], 2).unwrap()).unwrap();
    assert_eq!(
        s.get("old").await.unwrap_err().kind(),
        KvErrorKind::KeyVersion
    );
    assert_eq!(&s.get("new").await.unwrap().value[..], b"sealed-v2");
}

#[tokio::test]
async fn expired_values_are_gone_on_read() {
    let server = Server::jetstream();
    let master = MasterSecret::generate().unwrap();
    let ns = connect(&server, &master, "acme").await;
    let s = ns
        .kv_with("short", options("acme").ttl(Duration::from_millis(300)))
        .await
        .unwrap();
    s.put("k", "v").await.unwrap();
    let e = s.get("k").await.unwrap();
    assert!(e.expires_at_ms.is_some());
    assert_eq!(s.keys().await.unwrap(), vec!["k".to_string()]);
    assert_eq!(
        s.create("k", "again").await.unwrap_err().kind(),
        KvErrorKind::Exists
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.get("k").await.unwrap_err().kind(), KvErrorKind::NotFound);
    assert!(s.keys().await.unwrap().is_empty());
    // Expired counts as absent for create.
    s.create("k", "again").await.unwrap();
    assert_eq!(&s.get("k").await.unwrap().value[..], b"again");
}
