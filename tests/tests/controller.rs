//! The controller as a service, against real nats-server processes: concurrent
//! callers, two instances, roles enforced by the server and the controller, tenant
//! delete, live key rotation, and the crash between a KV write and a claim push.

// Test code: a failed set-up step should abort the test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use agentbus_control::api::{ErrorCode, Role};
use agentbus_control::keys::{bundle_account, KeyRefresher};
use agentbus_control::tiers::Tier;
use futures::StreamExt as _;
use nats_harness::{eventually, platform, raw_options};
use tenant_bus::{CredentialBundle, TenantNamespace};

const WAIT: Duration = Duration::from_secs(5);

async fn raw_connect(
    url: &str,
    b: &CredentialBundle,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    raw_options(b, WAIT).0.connect(url).await
}

#[tokio::test]
async fn twenty_concurrent_agent_creates_through_the_api_are_all_kept_and_revocable() {
    let p = platform().await;
    let url = p.server.url();
    p.cp.create_tenant("acme", Tier::Pro).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let cp = p.cp.clone();
        tasks.push(tokio::spawn(async move {
            cp.issue_agent("acme", &format!("a{i}"), "default").await
        }));
    }
    let mut bundles = Vec::new();
    for t in tasks {
        bundles.push(t.await.unwrap().unwrap());
    }
    let listed = p.cp.agents("acme").await.unwrap();
    let ids: BTreeSet<String> = listed.iter().map(|a| a.agent.to_string()).collect();
    assert_eq!(ids.len(), 20, "{ids:?}");
    assert_eq!(listed.len(), 20, "no duplicates");
    // Every credential connects, then every revoke (concurrent too) refuses it.
    for b in &bundles {
        raw_connect(&url, b).await.unwrap();
    }
    let mut tasks = Vec::new();
    for i in 0..20 {
        let cp = p.cp.clone();
        tasks.push(tokio::spawn(async move {
            cp.revoke_agent("acme", &format!("a{i}")).await
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap().unwrap().revoked_at.is_some());
    }
    for b in &bundles {
        assert!(
            raw_connect(&url, b).await.is_err(),
            "{} still connects",
            b.agent
        );
    }
    let listed = p.cp.agents("acme").await.unwrap();
    assert!(listed.iter().all(|a| a.revoked_at.is_some()));
}

#[tokio::test]
async fn two_controllers_serve_concurrent_mutations_without_loss_or_duplicates() {
    let p = platform().await;
    let (_second, second_stop) = p.another_controller().await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let cp = p.cp.clone();
        tasks.push(tokio::spawn(async move {
            let t = format!("t{}", i % 3);
            let _ = cp.create_tenant(&t, Tier::Free).await;
            cp.issue_agent(&t, &format!("agent-{i}"), "default")
                .await
                .map(|_| ())
        }));
    }
    // Both create the same tenant at once: exactly one wins.
    let (a, b) = tokio::join!(
        p.cp.create_tenant("dup", Tier::Free),
        p.cp.create_tenant("dup", Tier::Free)
    );
    assert_eq!([a.is_ok(), b.is_ok()].iter().filter(|x| **x).count(), 1);
    let loser = a.err().or(b.err()).unwrap();
    assert_eq!(loser.code, ErrorCode::AlreadyExists, "{loser}");
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let mut total = 0;
    for t in ["t0", "t1", "t2"] {
        total += p.cp.agents(t).await.unwrap().len();
    }
    assert_eq!(total, 10);
    let status = p.cp.status().await.unwrap();
    assert_eq!(status.controllers, 2, "{status:?}");
    second_stop.fire();
}

#[tokio::test]
async fn roles_are_enforced_by_the_server_and_by_the_controller() {
    let p = platform().await;
    p.cp.create_tenant("acme", Tier::Free).await.unwrap();
    p.cp.create_tenant("globex", Tier::Free).await.unwrap();
    let ta =
        p.cp.create_admin("acme-ops", Role::TenantAdmin, Some("acme"))
            .await
            .unwrap();
    let viewer =
        p.cp.create_admin("auditor", Role::Viewer, None)
            .await
            .unwrap();
    let ta_client = p
        .admin_client(&ta.creds)
        .await
        .with_timeout(Duration::from_secs(2));
    let viewer_client = p
        .admin_client(&viewer.creds)
        .await
        .with_timeout(Duration::from_secs(2));

    // The tenant-admin manages its own tenant's agents.
    ta_client
        .issue_agent("acme", "bot", "default")
        .await
        .unwrap();
    // Addressing globex: the server refuses the publish (a permission violation).
    let (opts, mut events) = {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let opts = async_nats::ConnectOptions::with_credentials(&ta.creds)
            .unwrap()
            .custom_inbox_prefix(agentbus_control::api::admin_inbox("acme-ops"))
            .event_callback(move |e| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(format!("{e:?}"));
                }
            });
        (opts, rx)
    };
    let raw = opts.connect(p.server.url()).await.unwrap();
    raw.publish(
        agentbus_control::api::agent_subject("globex", "create"),
        "{}".into(),
    )
    .await
    .unwrap();
    raw.flush().await.unwrap();
    let violation = tokio::time::timeout(WAIT, async {
        while let Some(e) = events.recv().await {
            if e.to_lowercase().contains("permissions violation") {
                return e;
            }
        }
        String::new()
    })
    .await
    .unwrap();
    assert!(violation.contains("globex"), "{violation}");
    let err = ta_client
        .issue_agent("globex", "spy", "default")
        .await
        .unwrap_err();
    // The client sees the server's refusal at once, as its own error.
    assert_eq!(err.code, ErrorCode::Forbidden, "{err}");
    assert!(err.message.contains("globex"), "{err}");
    assert!(p.cp.agents("globex").await.unwrap().is_empty());
    // The tenant-admin stays within its tier and cannot suspend or delete.
    let mut up = agentbus_control::api::UpdateTenant::default();
    up.set.push(("max_agents".into(), "1000".into()));
    let err = ta_client.update_tenant("acme", &up).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Refused, "{err}");
    assert!(ta_client.suspend_tenant("acme").await.is_err());

    // The viewer reads everything and changes nothing.
    assert_eq!(viewer_client.tenants().await.unwrap().len(), 2);
    assert!(viewer_client.create_tenant("x", Tier::Free).await.is_err());
    assert!(viewer_client
        .issue_agent("acme", "v", "default")
        .await
        .is_err());
    assert!(p.cp.tenant("x").await.is_err());

    // A forged request (right subject, someone else's name, wrong key): the
    // controller refuses it. The platform-admin's own client sends it.
    let forged =
        p.cp.nats()
            .request(
                agentbus_control::api::tenant_subject("acme", "suspend"),
                "{}".into(),
            )
            .await
            .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&forged.payload).unwrap();
    assert_eq!(v["error"]["code"], "forbidden", "{v}");
    // A revoked admin is refused by the controller, and by the server: its
    // connection is closed and its credentials no longer connect.
    p.cp.revoke_admin("acme-ops").await.unwrap();
    let err = ta_client.agents("acme").await.unwrap_err();
    assert!(
        matches!(err.code, ErrorCode::Forbidden | ErrorCode::Unavailable),
        "{err}"
    );
    let refused = eventually(WAIT, || async {
        agentbus_control::AdminClient::connect(&p.server.url(), &ta.creds)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    assert!(
        refused.is_some(),
        "a revoked admin's credentials still connect"
    );
    // The platform-admin can.
    p.cp.suspend_tenant("globex").await.unwrap();
}

#[tokio::test]
async fn tenant_delete_leaves_nothing_and_the_id_can_be_created_again() {
    let p = platform().await;
    let url = p.server.url();
    p.cp.create_tenant("gone", Tier::Free).await.unwrap();
    let bundle = p.cp.issue_agent("gone", "a", "default").await.unwrap();
    let client = raw_connect(&url, &bundle).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "TASKS".into(),
        subjects: vec!["tenant.gone.tasks.>".into()],
        max_bytes: 1 << 20,
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish("tenant.gone.tasks.x", "data".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let account = p.cp.tenant("gone").await.unwrap().record.account;

    p.cp.delete_tenant("gone").await.unwrap();
    assert_eq!(
        p.cp.tenant("gone").await.unwrap_err().code,
        ErrorCode::NotFound
    );
    assert!(
        raw_connect(&url, &bundle).await.is_err(),
        "old credentials still connect"
    );
    // The secrets of the account are destroyed.
    let kek = p.install.kek().unwrap();
    for name in [
        agentbus_control::store::secret_name::tenant_signing(&account),
        agentbus_control::store::secret_name::tenant_key_root(&account),
    ] {
        assert!(
            p.controller
                .store()
                .secret(&kek, &name)
                .await
                .unwrap()
                .is_none(),
            "{name}"
        );
    }
    // Re-created: a new account, no old data, the old bundle still refused.
    let again = p.cp.create_tenant("gone", Tier::Free).await.unwrap();
    assert_ne!(again.record.account, account);
    let fresh = p.cp.issue_agent("gone", "a", "default").await.unwrap();
    let c = raw_connect(&url, &fresh).await.unwrap();
    let js = async_nats::jetstream::new(c);
    assert!(js.get_stream("TASKS").await.is_err(), "old stream survived");
    assert!(raw_connect(&url, &bundle).await.is_err());
    assert!(p.cp.agents("gone").await.unwrap().len() == 1);
}

#[tokio::test]
async fn rotate_key_reaches_running_agents_and_the_removed_version_is_rejected() {
    let p = platform().await;
    p.cp.create_tenant("rot", Tier::Free).await.unwrap();
    let a = p.cp.issue_agent("rot", "a", "default").await.unwrap();
    let b = p.cp.issue_agent("rot", "b", "default").await.unwrap();
    let na = TenantNamespace::connect(&a).await.unwrap();
    let nb = TenantNamespace::connect(&b).await.unwrap();
    let every = Duration::from_millis(100);
    let _ra = KeyRefresher::spawn(na.clone(), bundle_account(&a).unwrap(), every);
    let _rb = KeyRefresher::spawn(nb.clone(), bundle_account(&b).unwrap(), every);
    let mut sub = nb.subscribe("chat").await.unwrap();
    let old_sealer = na.keys();
    // Two rotations (grace 500 ms in the harness): 1 -> 2 -> 3, keeping the flow.
    for round in 0..2u32 {
        p.cp.rotate_key("rot", None).await.unwrap();
        let target = round + 2;
        let mut seen_target = false;
        for i in 0..40 {
            na.publish("chat", format!("{round}-{i}").as_bytes())
                .await
                .unwrap();
            let m = tokio::time::timeout(WAIT, sub.next())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(m.payload.as_ref(), format!("{round}-{i}").as_bytes());
            if na.keys().current_version() == target {
                seen_target = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(seen_target, "agent a never sealed with version {target}");
    }
    let versions: Vec<u32> = nb.keys().versions().collect();
    assert!(
        !versions.contains(&1),
        "version 1 still accepted: {versions:?}"
    );
    // A message sealed with the removed version 1 is dropped as an unknown key.
    use tenant_bus::DropReason;
    let before = nb.counters().dropped(DropReason::UnknownKey);
    let sealer =
        tenant_bus::envelope::Sealer::new(old_sealer, Some(tenant_bus::AgentId::new("a").unwrap()))
            .unwrap();
    let (_, body) = sealer.seal("tenant.rot.chat", None, b"stale key").unwrap();
    na.nats().publish("tenant.rot.chat", body).await.unwrap();
    na.nats().flush().await.unwrap();
    // Verification runs as the subscription is read: nothing is delivered.
    assert!(tokio::time::timeout(Duration::from_millis(500), sub.next())
        .await
        .is_err());
    assert!(
        nb.counters().dropped(DropReason::UnknownKey) > before,
        "the stale-key message was not dropped as an unknown key: {:?}",
        nb.counters().snapshot()
    );
}

#[tokio::test]
async fn a_crash_between_the_kv_write_and_the_claim_push_is_repaired_on_start() {
    let p = platform().await;
    let url = p.server.url();
    // Only the faulty controller serves: it exits after the record is written.
    p.shutdown.fire();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The fault exits the process, so run it in a child process: the agentbus
    // binary's `controller` command.
    let exe = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/agentbus");
    let mut child = std::process::Command::new(&exe)
        .args([
            "controller",
            "--state",
            p.install.root().to_str().unwrap(),
            "--url",
            &url,
        ])
        .env("AGENTBUS_FAULT", "exit-after-kv-write")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn agentbus controller (build it with `cargo build -p agentbus-cli`)");
    let cp = p.cp.clone().with_timeout(Duration::from_secs(3));
    let err = cp.create_tenant("half", Tier::Free).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Unavailable, "{err}");
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(86),
        "the controller did not stop at the fault"
    );
    // The record is there; the server never got the account.
    let record = p
        .controller
        .store()
        .registry
        .get(&tenant_bus::TenantId::new("half").unwrap())
        .await
        .unwrap();
    let sys = async_nats::ConnectOptions::with_credentials(&p.install.creds("sys.creds").unwrap())
        .unwrap()
        .connect(&url)
        .await
        .unwrap();
    let listed = agentbus_control::controller::claims::list(&sys)
        .await
        .unwrap();
    assert!(
        !listed.contains(&record.account),
        "the push happened before the crash"
    );
    // The next start reconciles: the account is pushed and agents connect.
    let (_c, stop) = p.another_controller().await;
    let listed = eventually(WAIT, || {
        let sys = sys.clone();
        let account = record.account.clone();
        async move {
            let l = agentbus_control::controller::claims::list(&sys)
                .await
                .ok()?;
            l.contains(&account).then_some(l)
        }
    })
    .await;
    assert!(listed.is_some(), "reconcile did not push the account");
    let bundle = p.cp.issue_agent("half", "a", "default").await.unwrap();
    raw_connect(&url, &bundle).await.unwrap();
    stop.fire();
}

#[tokio::test]
async fn agents_started_by_the_runtime_follow_a_key_rotation() {
    use agent_runtime::agent::AgentHost;
    use agentbus_control::registry::{Registry, RegistryWatcher};
    let p = platform().await;
    p.cp.create_tenant("rt", Tier::Free).await.unwrap();
    let a = p.cp.issue_agent("rt", "a", "default").await.unwrap();
    let b = p.cp.issue_agent("rt", "b", "default").await.unwrap();
    // A runtime instance: the platform account's registry, watched.
    let client = p.platform_client("runtime").await;
    let registry = Registry::open(client).await.unwrap();
    let watcher = std::sync::Arc::new(RegistryWatcher::start(&registry).await.unwrap());
    let host = AgentHost::new(watcher);
    let agent = host
        .start(
            &a,
            tenant_bus::NamespaceOptions::new(),
            "default",
            Vec::<&str>::new(),
        )
        .await
        .unwrap();
    let nb = TenantNamespace::connect(&b).await.unwrap();
    let _rb = KeyRefresher::spawn(
        nb.clone(),
        bundle_account(&b).unwrap(),
        Duration::from_millis(100),
    );
    let mut sub = nb.subscribe("news").await.unwrap();
    // A short grace: the runtime's agent learns the new version at its
    // promotion time (the key service says when), not only every 10 s.
    p.cp.rotate_key("rt", Some(Duration::from_millis(1500)))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    let mut moved = false;
    while tokio::time::Instant::now() < deadline {
        agent.publish("news", b"tick").await.unwrap();
        let m = tokio::time::timeout(WAIT, sub.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.payload.as_ref(), b"tick");
        if agent.namespace().keys().current_version() == 2 {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(moved, "the runtime's agent never sealed with version 2");
    agent.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn reconcile_never_deletes_the_account_of_a_record_it_cannot_read() {
    let p = platform().await;
    let url = p.server.url();
    p.cp.create_tenant("fragile", Tier::Free).await.unwrap();
    let bundle = p.cp.issue_agent("fragile", "a", "default").await.unwrap();
    let account = p.cp.tenant("fragile").await.unwrap().record.account;
    // Corrupt the tenant's record through the raw KV API (platform credentials).
    let raw = p.platform_client("raw").await;
    let kv = async_nats::jetstream::new(raw)
        .get_key_value("agentbus-tenants")
        .await
        .unwrap();
    kv.put("fragile", "not json".into()).await.unwrap();
    // A controller starting now reconciles: the unreadable record's account stays.
    let (c, stop) = p.another_controller().await;
    c.reconcile().await.unwrap();
    let sys = async_nats::ConnectOptions::with_credentials(&p.install.creds("sys.creds").unwrap())
        .unwrap()
        .connect(&url)
        .await
        .unwrap();
    let listed = agentbus_control::controller::claims::list(&sys)
        .await
        .unwrap();
    assert!(listed.contains(&account), "the account was deleted");
    raw_connect(&url, &bundle).await.unwrap();
    stop.fire();
}
