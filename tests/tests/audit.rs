//! The audit log against a real nats-server: each controller action is one event
//! with the right actor, log and outcome; refusals are recorded; tampering
//! through the raw JetStream API with the platform's credentials makes
//! verification fail and name the entry; an untouched log verifies; a forged
//! checkpoint is refused; proofs verify offline; a tenant-admin reads only its
//! own tenant's log (the server refuses the rest).

// Test code: a failed set-up step should abort the test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use agentbus_control::api::{self, ErrorCode, Role, UpdateTenant};
use agentbus_control::audit::event::{AuditEvent, Outcome, PLATFORM_LOG};
use agentbus_control::audit::verify::{self, VerifyFailure};
use agentbus_control::audit::{self, ListRequest, VerifyError};
use agentbus_control::tiers::Tier;
use nats_harness::{platform, Platform};

async fn events(p: &Platform, log: &str) -> Vec<AuditEvent> {
    audit::list(&p.cp, log, &ListRequest::default())
        .await
        .unwrap()
}

async fn verify_fails(p: &Platform, log: &str) -> VerifyFailure {
    match audit::verify_remote(&p.cp, log, None).await {
        Err(VerifyError::Bad(f)) => f,
        other => panic!("{log}: expected a verification failure, got {other:?}"),
    }
}

/// A raw JetStream context with the controller's credentials (the platform
/// account): what an insider with those credentials could do.
async fn raw_js(p: &Platform) -> async_nats::jetstream::Context {
    let creds = p.install.creds("controller.creds").unwrap();
    let client = async_nats::ConnectOptions::with_credentials(&creds)
        .unwrap()
        .connect(p.server.url())
        .await
        .unwrap();
    async_nats::jetstream::new(client)
}

fn set(k: &str, v: &str) -> UpdateTenant {
    UpdateTenant {
        set: vec![(k.to_string(), v.to_string())],
        unset: vec![],
    }
}

#[tokio::test]
async fn each_action_is_one_event_with_its_actor_log_and_outcome() {
    let p = platform().await;
    p.cp.create_tenant("acme", Tier::Pro).await.unwrap();
    p.cp.update_tenant("acme", &set("name", "Acme Corp"))
        .await
        .unwrap();
    p.cp.suspend_tenant("acme").await.unwrap();
    p.cp.activate_tenant("acme").await.unwrap();
    p.cp.rotate_key("acme", None).await.unwrap();
    p.cp.create_agent("acme", "planner", "default")
        .await
        .unwrap();
    p.cp.revoke_agent("acme", "planner").await.unwrap();
    let ta =
        p.cp.create_admin("acme-ops", Role::TenantAdmin, Some("acme"))
            .await
            .unwrap();
    // Reads are not recorded.
    p.cp.tenant("acme").await.unwrap();
    p.cp.agents("acme").await.unwrap();

    // The tenant-admin: allowed within its role, refused (by the controller)
    // beyond its tier, and refused by the server for another tenant (that never
    // reaches the controller, so it is not the controller's to record).
    let ta_client = p
        .admin_client(&ta.creds)
        .await
        .with_timeout(Duration::from_secs(3));
    ta_client
        .create_agent("acme", "worker", "default")
        .await
        .unwrap();
    let refused = ta_client
        .update_tenant("acme", &set("tier", "enterprise"))
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::Refused);
    p.cp.revoke_admin("acme-ops").await.unwrap();
    // A failure: an agent of a tenant that does not exist (recorded in the
    // platform log: an unknown id gets no log of its own, which could fix
    // the home of a tenant created later under that id).
    let missing = p.cp.create_agent("nope", "x", "default").await.unwrap_err();
    assert_eq!(missing.code, ErrorCode::NotFound);
    // A refused create: the tenant never exists, so the platform log too.
    let refused_create =
        p.cp.create_tenant_with(
            "ghost",
            &api::CreateTenant {
                tier: Some("no-such-tier".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(refused_create.code, ErrorCode::InvalidInput);
    // A tenant created and deleted: its log outlives it.
    p.cp.create_tenant("tmp", Tier::Free).await.unwrap();
    p.cp.delete_tenant("tmp").await.unwrap();

    let acme = events(&p, "acme").await;
    let got: Vec<(String, String, String, Outcome)> = acme
        .iter()
        .map(|e| {
            (
                e.action.clone(),
                e.actor.id.clone(),
                e.resource.clone(),
                e.outcome,
            )
        })
        .collect();
    let want = [
        ("tenant.create", "admin", "tenant/acme", Outcome::Allowed),
        ("tenant.update", "admin", "tenant/acme", Outcome::Allowed),
        ("tenant.suspend", "admin", "tenant/acme", Outcome::Allowed),
        ("tenant.activate", "admin", "tenant/acme", Outcome::Allowed),
        (
            "tenant.rotate-key",
            "admin",
            "tenant/acme",
            Outcome::Allowed,
        ),
        (
            "agent.create",
            "admin",
            "agent/acme/planner",
            Outcome::Allowed,
        ),
        (
            "agent.revoke",
            "admin",
            "agent/acme/planner",
            Outcome::Allowed,
        ),
        ("admin.create", "admin", "admin/acme-ops", Outcome::Allowed),
        (
            "agent.create",
            "acme-ops",
            "agent/acme/worker",
            Outcome::Allowed,
        ),
        ("tenant.update", "acme-ops", "tenant/acme", Outcome::Denied),
        ("admin.revoke", "admin", "admin/acme-ops", Outcome::Allowed),
    ];
    let want: Vec<(String, String, String, Outcome)> = want
        .iter()
        .map(|(a, b, c, d)| (a.to_string(), b.to_string(), c.to_string(), *d))
        .collect();
    assert_eq!(got, want);
    for (i, e) in acme.iter().enumerate() {
        assert_eq!(e.index, i as u64);
        assert_eq!(e.tenant, "acme");
        assert_eq!(e.actor.kind, "admin");
        assert!(!e.request_id.is_empty());
        assert_eq!(e.id.len(), 32);
    }
    assert_eq!(acme[0].actor.role, "platform-admin");
    assert_eq!(acme[8].actor.role, "tenant-admin");
    assert!(acme[9].reason.contains("platform-admin"), "{:?}", acme[9]);
    // Distinct request ids: one event per request.
    let ids: std::collections::BTreeSet<&str> =
        acme.iter().map(|e| e.request_id.as_str()).collect();
    assert_eq!(ids.len(), acme.len());

    assert!(events(&p, "nope").await.is_empty());
    assert!(events(&p, "ghost").await.is_empty());
    let platform_log = events(&p, PLATFORM_LOG).await;
    let about = |resource: &str| {
        platform_log
            .iter()
            .filter(|e| e.resource == resource)
            .map(|e| (e.action.as_str(), e.outcome))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        about("agent/nope/x"),
        [("agent.create", Outcome::Failed)],
        "{platform_log:?}"
    );
    assert_eq!(
        about("tenant/ghost"),
        [("tenant.create", Outcome::Failed)],
        "{platform_log:?}"
    );
    let tmp = events(&p, "tmp").await;
    assert_eq!(
        tmp.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        ["tenant.create", "tenant.delete"]
    );

    // An unauthenticated request (a bad signature) is one denied event in the
    // platform log, with the claimed name and no key.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(api::HDR_ADMIN, "admin");
    headers.insert(api::HDR_REQUEST_ID, "forged-1");
    headers.insert(
        api::HDR_TIME,
        tenant_bus::envelope::now_ms().to_string().as_str(),
    );
    headers.insert(api::HDR_SIG, "AAAA");
    let reply =
        p.cp.nats()
            .request_with_headers(api::tenant_subject("acme", "delete"), headers, "".into())
            .await
            .unwrap();
    assert!(String::from_utf8_lossy(&reply.payload).contains("forbidden"));
    let acme = events(&p, "acme").await;
    let forged = acme.last().unwrap();
    assert_eq!(
        (
            forged.action.as_str(),
            forged.outcome,
            forged.request_id.as_str()
        ),
        ("tenant.delete", Outcome::Denied, "forged-1")
    );
    assert!(forged.actor.key.is_empty());
    assert!(forged.reason.contains("signature"), "{}", forged.reason);

    // Filters.
    let only = audit::list(
        &p.cp,
        "acme",
        &ListRequest {
            action: Some("agent.".into()),
            actor: Some("admin".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(only.len(), 2);

    // Everything verifies, before and after checkpoints.
    for log in ["acme", PLATFORM_LOG, "tmp"] {
        let (r, _) = audit::verify_remote(&p.cp, log, None).await.unwrap();
        assert_eq!(r.signed_size, 0);
        p.controller.audit().checkpoint(log).await.unwrap().unwrap();
        let (r, _) = audit::verify_remote(&p.cp, log, None).await.unwrap();
        assert_eq!((r.signed_size, r.unsigned_tail), (r.entries, 0));
    }
    assert_eq!(p.controller.audit().counters().snapshot().append_failed, 0);
}

/// Six events in `log`, then a checkpoint.
async fn seeded(p: &Platform, log: &str) {
    p.cp.create_tenant(log, Tier::Free).await.unwrap();
    for i in 0..4 {
        p.cp.update_tenant(log, &set("name", &format!("n{i}")))
            .await
            .unwrap();
    }
    p.cp.create_agent(log, "a", "default").await.unwrap();
    p.controller.audit().checkpoint(log).await.unwrap().unwrap();
    let (r, _) = audit::verify_remote(&p.cp, log, None).await.unwrap();
    assert_eq!((r.entries, r.signed_size, r.checkpoints), (6, 6, 1));
}

async fn seqs(js: &async_nats::jetstream::Context, log: &str) -> Vec<(u64, Vec<u8>)> {
    let stream = js.get_stream(audit::STREAM).await.unwrap();
    let mut out = Vec::new();
    // The log's entries, read one by one (a short log: bounded).
    let last = stream
        .get_last_raw_message_by_subject(&audit::log_subject(log))
        .await
        .unwrap()
        .sequence;
    for seq in 1..=last {
        if let Ok(m) = stream.get_raw_message(seq).await {
            if m.subject.as_str() == audit::log_subject(log) {
                out.push((seq, m.payload.to_vec()));
            }
        }
    }
    out
}

#[tokio::test]
async fn tampering_through_the_raw_jetstream_api_is_named_and_an_untouched_log_verifies() {
    let p = platform().await;
    for log in ["del", "rew", "cut", "cut2", "fake", "calm"] {
        seeded(&p, log).await;
    }
    let js = raw_js(&p).await;
    let stream = js.get_stream(audit::STREAM).await.unwrap();

    // Delete entry 2.
    let del = seqs(&js, "del").await;
    assert!(stream.delete_message(del[2].0).await.unwrap());
    let f = verify_fails(&p, "del").await;
    assert_eq!(f.index, Some(2), "{f}");
    assert!(f.message.contains("entry 2 is missing"), "{f}");

    // Rewrite entry 3: delete it and publish a different event in its place
    // (with its index and chain, as a forger would).
    let rew = seqs(&js, "rew").await;
    let mut forged = AuditEvent::decode(&rew[3].1).unwrap();
    forged.actor.id = "nobody".into();
    assert!(stream.delete_message(rew[3].0).await.unwrap());
    js.publish(audit::log_subject("rew"), forged.canonical().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let f = verify_fails(&p, "rew").await;
    assert_eq!(f.index, Some(3), "{f}");

    // Purge a suffix: entries 4 and 5 deleted.
    let cut = seqs(&js, "cut").await;
    for (seq, _) in &cut[4..] {
        assert!(stream.delete_message(*seq).await.unwrap());
    }
    let f = verify_fails(&p, "cut").await;
    assert_eq!(f.index, Some(4), "{f}");
    assert!(f.message.contains("truncated"), "{f}");

    // Purge the whole log subject and re-publish only its first three entries.
    let cut2 = seqs(&js, "cut2").await;
    stream
        .purge()
        .filter(audit::log_subject("cut2"))
        .await
        .unwrap();
    for (_, data) in &cut2[..3] {
        js.publish(audit::log_subject("cut2"), data.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let f = verify_fails(&p, "cut2").await;
    assert_eq!(f.index, Some(3), "{f}");

    // A forged checkpoint: a valid note signed by another key.
    let other = agentbus_control::audit::note::Signer::from_seed(
        &format!("agentbus/{}/audit", p.install.facts().platform_account),
        &[7u8; 32],
    )
    .unwrap();
    let fake_root = {
        let mut t = agentbus_control::audit::merkle::Tree::new();
        for (_, d) in seqs(&js, "fake").await {
            t.push(d);
        }
        t.root()
    };
    let note = other.sign(&agentbus_control::audit::note::Checkpoint {
        origin: p.controller.audit().origin("fake"),
        size: 6,
        root: fake_root,
        time_ms: 1,
    });
    js.publish(audit::checkpoint_subject("fake"), note.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let f = verify_fails(&p, "fake").await;
    assert!(f.message.contains("no signature by key"), "{f}");

    // A controller that reads the altered log afresh refuses to sign it.
    p.cp.update_tenant("del", &set("name", "after"))
        .await
        .unwrap();
    let (second, stop) = p.another_controller().await;
    let refused = second.audit().checkpoint("del").await.unwrap_err();
    assert!(refused.message.contains("entry 2"), "{refused}");
    assert_eq!(second.audit().counters().snapshot().tamper_detected, 1);
    stop.fire();

    // The untouched log still verifies, after more events and a second
    // checkpoint (a consistency proof between the two).
    p.cp.update_tenant("calm", &set("name", "later"))
        .await
        .unwrap();
    p.controller
        .audit()
        .checkpoint("calm")
        .await
        .unwrap()
        .unwrap();
    let (r, key) = audit::verify_remote(&p.cp, "calm", None).await.unwrap();
    assert_eq!((r.entries, r.checkpoints, r.consistency_proofs), (7, 2, 1));
    assert_eq!(key, p.controller.audit().verifier_key());
    // Pinned to another key: refused.
    match audit::verify_remote(&p.cp, "calm", Some(&other.verifier_key())).await {
        Err(VerifyError::Bad(f)) => assert!(f.message.contains("no signature"), "{f}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn proofs_verify_offline_and_a_tenant_admin_reads_only_its_own_log() {
    let p = platform().await;
    p.cp.create_tenant("acme", Tier::Free).await.unwrap();
    p.cp.create_tenant("globex", Tier::Free).await.unwrap();
    let ta =
        p.cp.create_admin("acme-ops", Role::TenantAdmin, Some("acme"))
            .await
            .unwrap();
    let ta_client = p
        .admin_client(&ta.creds)
        .await
        .with_timeout(Duration::from_secs(3));

    // A proof of an event not yet checkpointed: the controller signs one first.
    let acme = audit::list(&ta_client, "acme", &ListRequest::default())
        .await
        .unwrap();
    let target = &acme[0];
    let bundle = audit::proof(&ta_client, "acme", &target.id).await.unwrap();
    let text = serde_json::to_string_pretty(&bundle).unwrap();
    let back: verify::InclusionBundle = serde_json::from_str(&text).unwrap();
    let pinned: agentbus_control::audit::note::Verifier =
        p.controller.audit().verifier_key().parse().unwrap();
    let cp = verify::verify_bundle(&back, Some(&pinned)).unwrap();
    assert_eq!(cp.size, bundle.tree_size);
    assert_eq!(back.index, target.index);

    // globex and the platform log: the server refuses the tenant-admin's publish.
    for log in ["globex", PLATFORM_LOG] {
        let err = audit::list(&ta_client, log, &ListRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::Forbidden, "{log}: {err}");
        let err = audit::verify_remote(&ta_client, log, None)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, VerifyError::Api(e) if e.code == ErrorCode::Forbidden),
            "{err:?}"
        );
    }
    // The platform-admin reads both.
    assert!(!events(&p, "globex").await.is_empty());

    // Export: the tenant-admin exports its own log (every format), never
    // globex's (server refusal); JSON lines and CSV parse back to the events.
    use agentbus_control::audit::export::{self, Format};
    let (own, skipped) = audit::fetch_events(&ta_client, "acme").await.unwrap();
    assert_eq!(skipped, 0);
    assert_eq!(own, events(&p, "acme").await);
    let back = export::parse_jsonl(&export::export(&own, Format::Jsonl)).unwrap();
    assert_eq!(back, own);
    assert_eq!(
        export::parse_csv(&export::export(&own, Format::Csv)).unwrap(),
        own
    );
    for line in export::export(&own, Format::Ocsf).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["metadata"]["tenant_uid"], "acme");
    }
    assert_eq!(export::export(&own, Format::Cef).lines().count(), own.len());
    let err = audit::fetch_events(&ta_client, "globex").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Forbidden, "{err}");
}

#[tokio::test]
async fn retention_prunes_and_the_retained_range_still_verifies() {
    let p = platform().await;
    let audit_log = p.controller.audit();
    p.cp.create_tenant("keep", Tier::Free).await.unwrap();
    for i in 0..4 {
        p.cp.update_tenant("keep", &set("name", &format!("a{i}")))
            .await
            .unwrap();
    }
    audit_log.checkpoint("keep").await.unwrap().unwrap(); // size 5
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cutoff = tenant_bus::envelope::now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    for i in 0..3 {
        p.cp.update_tenant("keep", &set("name", &format!("b{i}")))
            .await
            .unwrap();
    }
    audit_log.checkpoint("keep").await.unwrap().unwrap(); // size 8
    p.cp.update_tenant("keep", &set("name", "tail"))
        .await
        .unwrap(); // entry 8, unsigned

    // Entries 0..5 are older than the cutoff and covered by the checkpoint of
    // size 5: they go; the rest stays.
    let report = audit_log.prune("keep", cutoff).await.unwrap().unwrap();
    assert_eq!((report.pruned_before, report.removed), (5, 5));
    assert_eq!(audit_log.counters().snapshot().pruned, 5);
    let left = events(&p, "keep").await;
    assert_eq!(left.first().map(|e| e.index), Some(5));
    let (r, _) = audit::verify_remote(&p.cp, "keep", None).await.unwrap();
    assert_eq!((r.first_index, r.entries, r.signed_size), (5, 4, 8));
    assert_eq!(r.unsigned_tail, 1);
    assert!(r.pruned_at_ms.is_some() && r.anchor_time_ms.is_some());
    assert_eq!(r.consistency_proofs, 1, "anchor -> checkpoint of size 8");
    // Nothing more is old enough: a second pass prunes nothing.
    assert!(audit_log.prune("keep", cutoff).await.unwrap().is_none());

    // Appends, checkpoints and proofs go on from the anchor, also on a fresh
    // controller (which starts from the anchor, not from entry 0).
    p.cp.update_tenant("keep", &set("name", "more"))
        .await
        .unwrap();
    let (second, stop) = p.another_controller().await;
    let cp = second.audit().checkpoint("keep").await.unwrap().unwrap();
    assert_eq!(cp.size, 10);
    let last = events(&p, "keep").await.pop().unwrap();
    let bundle = audit::proof(&p.cp, "keep", &last.id).await.unwrap();
    verify::verify_bundle(&bundle, None).unwrap();
    stop.fire();
    let (r, _) = audit::verify_remote(&p.cp, "keep", None).await.unwrap();
    assert_eq!((r.first_index, r.entries, r.signed_size), (5, 5, 10));

    // The tenant setting: 1 day, applied a little over a day later, prunes up
    // to the newest checkpoint short of the head.
    p.cp.update_tenant("keep", &set("audit_retention_days", "1"))
        .await
        .unwrap(); // entry 10
    p.controller.audit().checkpoint("keep").await.unwrap(); // size 11
    p.cp.update_tenant("keep", &set("name", "head"))
        .await
        .unwrap(); // entry 11, the head
    let later = tenant_bus::envelope::now_ms() + audit::DAY_MS + 60_000;
    assert!(p.controller.apply_audit_retention(later).await >= 1);
    let (r, _) = audit::verify_remote(&p.cp, "keep", None).await.unwrap();
    assert_eq!((r.first_index, r.entries), (11, 1), "{r:?}");

    // Tampering in the retained range still fails, naming the entry.
    p.cp.create_tenant("tamp", Tier::Free).await.unwrap();
    for i in 0..5 {
        p.cp.update_tenant("tamp", &set("name", &format!("t{i}")))
            .await
            .unwrap();
    }
    audit_log.checkpoint("tamp").await.unwrap().unwrap(); // size 6
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cutoff = tenant_bus::envelope::now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    for i in 0..4 {
        p.cp.update_tenant("tamp", &set("name", &format!("u{i}")))
            .await
            .unwrap();
    }
    audit_log.checkpoint("tamp").await.unwrap().unwrap(); // size 10
    let report = audit_log.prune("tamp", cutoff).await.unwrap().unwrap();
    assert_eq!(report.pruned_before, 6);
    let js = raw_js(&p).await;
    let stream = js.get_stream(audit::STREAM).await.unwrap();
    let kept = seqs(&js, "tamp").await;
    assert_eq!(kept.len(), 4);
    // Rewrite entry 7: delete it and publish another in its place.
    let mut forged = AuditEvent::decode(&kept[1].1).unwrap();
    assert_eq!(forged.index, 7);
    forged.actor.id = "nobody".into();
    assert!(stream.delete_message(kept[1].0).await.unwrap());
    js.publish(audit::log_subject("tamp"), forged.canonical().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let f = verify_fails(&p, "tamp").await;
    assert_eq!(f.index, Some(7), "{f}");
    // A pruned log whose anchor is removed: its missing prefix is named.
    p.cp.create_tenant("noanchor", Tier::Free).await.unwrap();
    p.cp.update_tenant("noanchor", &set("name", "x"))
        .await
        .unwrap();
    audit_log.checkpoint("noanchor").await.unwrap().unwrap();
    p.cp.update_tenant("noanchor", &set("name", "y"))
        .await
        .unwrap();
    let far = tenant_bus::envelope::now_ms() + 1;
    assert!(audit_log.prune("noanchor", far).await.unwrap().is_some());
    stream
        .purge()
        .filter(audit::anchor_subject("noanchor"))
        .await
        .unwrap();
    let f = verify_fails(&p, "noanchor").await;
    assert_eq!(f.index, Some(0), "{f}");
}

/// Every file under `dir` whose path has `streams/AUDIT/msgs/` and ends in `.blk`.
fn audit_blocks(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in rd.flatten() {
        let path = entry.path();
        if path.is_dir() {
            audit_blocks(&path, out);
        } else if path.extension().is_some_and(|e| e == "blk")
            && path.to_string_lossy().contains("streams/AUDIT/msgs/")
        {
            out.push(path);
        }
    }
}

#[tokio::test]
async fn a_byte_flipped_in_the_store_files_while_the_server_is_stopped_is_named() {
    let mut p = platform().await;
    // "calm" first: the server drops a corrupt record and the rest of its
    // block, so only a log stored before the flip stays whole.
    seeded(&p, "calm").await;
    seeded(&p, "flip").await;
    let target = events(&p, "flip").await[3].clone();
    assert_eq!(target.index, 3);

    p.server.process().stop();
    let mut blocks = Vec::new();
    audit_blocks(p.server.process().dir(), &mut blocks);
    audit_blocks(p.install.root(), &mut blocks);
    blocks.sort();
    blocks.dedup();
    assert!(!blocks.is_empty(), "no AUDIT block files found");
    // Flip one hex digit of entry 3's id where it is stored: the JSON stays
    // canonical, only the hashes can tell.
    let mut flipped = 0;
    for path in &blocks {
        let mut bytes = std::fs::read(path).unwrap();
        let needle = target.id.as_bytes();
        if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
            let b = &mut bytes[at + 10];
            *b = if *b == b'0' { b'1' } else { b'0' };
            std::fs::write(path, &bytes).unwrap();
            flipped += 1;
        }
    }
    assert_eq!(flipped, 1, "entry 3 should be stored once in {blocks:?}");
    p.server.restart();

    // The server may serve the altered bytes, or notice its own checksum and
    // drop the record (and what follows): either way verify names entry 3.
    let mut last = None;
    for _ in 0..40 {
        match audit::verify_remote(&p.cp, "flip", None).await {
            Err(VerifyError::Bad(f)) => {
                last = Some(f);
                break;
            }
            other => {
                last = None;
                let _ = other;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    let f = last.expect("verify never failed after the byte flip");
    assert_eq!(f.index, Some(3), "{f}");
    eprintln!("after the byte flip: {f}");
    // The log stored before the flip is untouched and verifies.
    let (r, _) = audit::verify_remote(&p.cp, "calm", None).await.unwrap();
    assert_eq!(r.entries, 6);
}

/// Group commit: many callers of two controller instances append to five
/// logs at once; every event lands exactly once, indices are contiguous per
/// log, and every log verifies (the instances' batches raced and retried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_from_two_instances_batch_and_verify() {
    let p = platform().await;
    let (second, stop) = p.another_controller().await;
    let logs: Vec<String> = (0..5).map(|i| format!("gc{i}")).collect();
    // Logs of ids that are not tenants: their homes fixed first (else their
    // events would go to the platform log).
    for log in &logs {
        let id = tenant_bus::TenantId::new(log).unwrap();
        p.controller.audit().claim_home(&id, None).await.unwrap();
    }
    let mut tasks = Vec::new();
    for (n, audit) in [p.controller.audit().clone(), second.audit().clone()]
        .into_iter()
        .enumerate()
    {
        for i in 0..200u64 {
            let audit = audit.clone();
            let log = logs[(i % 5) as usize].clone();
            tasks.push(tokio::spawn(async move {
                let e = AuditEvent {
                    action: "tenant.update".into(),
                    actor: agentbus_control::audit::event::Actor {
                        id: format!("c{n}"),
                        key: String::new(),
                        kind: "admin".into(),
                        role: String::new(),
                    },
                    controller: String::new(),
                    id: agentbus_control::audit::event::new_event_id(),
                    index: 0,
                    outcome: Outcome::Allowed,
                    prev: String::new(),
                    reason: String::new(),
                    request_id: format!("r{n}-{i}"),
                    resource: format!("tenant/{log}"),
                    tenant: log,
                    time_ms: tenant_bus::envelope::now_ms(),
                    version: agentbus_control::audit::event::SCHEMA_VERSION,
                };
                audit.record(e).await
            }));
        }
    }
    let mut appended = 0;
    for t in tasks {
        if t.await.unwrap().is_some() {
            appended += 1;
        }
    }
    assert_eq!(appended, 400);
    for log in &logs {
        let list = events(&p, log).await;
        assert_eq!(list.len(), 80, "{log}");
        let mut indices: Vec<u64> = list.iter().map(|e| e.index).collect();
        indices.sort_unstable();
        assert_eq!(
            indices,
            (0..80).collect::<Vec<_>>(),
            "{log}: contiguous, no repeats"
        );
        let report = audit::verify_remote(&p.cp, log, None).await.unwrap();
        assert_eq!(report.0.entries, 80, "{log}");
    }
    stop.fire();
}
