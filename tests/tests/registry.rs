//! The tenant registry on a real JetStream nats-server: create, duplicate and
//! invalid ids, merged settings under concurrency, list, and changes reaching a
//! second instance's watcher within one second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_runtime::registry::{
    Registry, RegistryErrorKind, RegistryEvent, RegistryWatcher, SettingsPatch, Status,
    TenantSettings, ToolSettings, WatcherOptions,
};
use agent_runtime::tiers::{Quotas, Tier};
use nats_harness::{eventually, Server};
use tenant_bus::TenantId;

fn id(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

async fn registry(server: &Server) -> Registry {
    Registry::open(server.raw_client().await).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_get_and_list() {
    let server = Server::jetstream();
    let reg = registry(&server).await;
    let settings = TenantSettings::new()
        .quota("max_agents", "20")
        .allow_agent_type("planner")
        .tool("search", ToolSettings::enabled());
    let created = reg
        .create("acme", "Acme Corp", Tier::Pro, settings.clone())
        .await
        .unwrap();
    assert_eq!(created.status, Status::Active);
    assert!(created.created_at > 0 && created.created_at == created.updated_at);
    reg.create("globex", "Globex", Tier::Free, TenantSettings::new())
        .await
        .unwrap();

    let got = reg.get(&id("acme")).await.unwrap();
    assert_eq!(got.name, "Acme Corp");
    assert_eq!(got.tier, Tier::Pro);
    assert_eq!(got.settings, settings);
    let mut expected = Quotas::for_tier(Tier::Pro);
    expected.max_agents = 20;
    assert_eq!(
        got.quotas(),
        expected,
        "tier defaults with the override applied"
    );

    let all = reg.list().await.unwrap();
    let ids: Vec<&str> = all.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["acme", "globex"]);
    assert_eq!(
        reg.get(&id("nobody")).await.unwrap_err().kind(),
        RegistryErrorKind::NotFound
    );

    // No key material is stored: the raw value holds only the record's fields,
    // whose keys are public (account and signing key, never a seed).
    let js = async_nats::jetstream::new(server.raw_client().await);
    let kv = js.get_key_value("agentbus-tenants").await.unwrap();
    let raw: serde_json::Value =
        serde_json::from_slice(&kv.get("acme").await.unwrap().unwrap()).unwrap();
    let mut fields: Vec<&str> = raw
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "account",
            "account_iat",
            "created_at",
            "current_key",
            "id",
            "key_promote_at_ms",
            "key_versions",
            "name",
            "revocations",
            "settings",
            "signing_key",
            "status",
            "tier",
            "updated_at"
        ]
    );
    let text = raw.to_string();
    assert!(
        !text.contains("\"SA") && !text.contains("\"SO") && !text.contains("\"SU"),
        "a seed in {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_id_is_refused_atomically() {
    let server = Server::jetstream();
    let reg = registry(&server).await;
    reg.create("acme", "Acme", Tier::Free, TenantSettings::new())
        .await
        .unwrap();
    let again = reg
        .create("acme", "Other", Tier::Pro, TenantSettings::new())
        .await;
    assert_eq!(again.unwrap_err().kind(), RegistryErrorKind::Duplicate);
    assert_eq!(
        reg.get(&id("acme")).await.unwrap().name,
        "Acme",
        "unchanged"
    );

    // Racing creations of one id: exactly one wins.
    let racers: Vec<_> = (0..10)
        .map(|i| {
            let reg = reg.clone();
            tokio::spawn(async move {
                reg.create(
                    "race",
                    &format!("racer {i}"),
                    Tier::Free,
                    TenantSettings::new(),
                )
                .await
            })
        })
        .collect();
    let mut ok = 0;
    for r in racers {
        match r.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.kind(), RegistryErrorKind::Duplicate),
        }
    }
    assert_eq!(ok, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_ids_and_settings_are_refused() {
    let server = Server::jetstream();
    let reg = registry(&server).await;
    for bad in [
        "",
        "Acme",
        "a.b",
        "a:b",
        "a*",
        ">",
        "-a",
        "a--b",
        "a b",
        "é",
        &"x".repeat(64),
    ] {
        let e = reg
            .create(bad, "x", Tier::Free, TenantSettings::new())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), RegistryErrorKind::InvalidId, "{bad:?}");
        assert_eq!(
            reg.get_str(bad).await.unwrap_err().kind(),
            RegistryErrorKind::InvalidId
        );
    }
    let bad_settings = [
        TenantSettings::new().quota("no_such_quota", "1"),
        TenantSettings::new().quota("max_agents", "-1"),
        TenantSettings::new().allow_agent_type("a.b"),
        TenantSettings::new().tool("a:b", ToolSettings::enabled()),
    ];
    for s in bad_settings {
        let e = reg.create("acme", "Acme", Tier::Free, s).await.unwrap_err();
        assert_eq!(e.kind(), RegistryErrorKind::InvalidRecord);
    }
    assert_eq!(
        reg.create("acme", "", Tier::Free, TenantSettings::new())
            .await
            .unwrap_err()
            .kind(),
        RegistryErrorKind::InvalidRecord
    );
    assert!(reg.list().await.unwrap().is_empty(), "nothing was written");

    reg.create("acme", "Acme", Tier::Free, TenantSettings::new())
        .await
        .unwrap();
    let e = reg
        .update(
            &id("acme"),
            &SettingsPatch::new().set_quota("max_agents", "lots"),
        )
        .await;
    assert_eq!(e.unwrap_err().kind(), RegistryErrorKind::InvalidRecord);
    let e = reg.update(&id("ghost"), &SettingsPatch::new()).await;
    assert_eq!(e.unwrap_err().kind(), RegistryErrorKind::NotFound);
    assert_eq!(
        reg.suspend(&id("ghost")).await.unwrap_err().kind(),
        RegistryErrorKind::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_are_merged_not_replaced_even_under_concurrent_updates() {
    let server = Server::jetstream();
    let reg = registry(&server).await;
    let acme = id("acme");
    reg.create(
        "acme",
        "Acme",
        Tier::Free,
        TenantSettings::new()
            .quota("max_agents", "20")
            .allow_agent_type("planner")
            .tool("search", ToolSettings::enabled()),
    )
    .await
    .unwrap();
    let r = reg
        .update(
            &acme,
            &SettingsPatch::new()
                .set_quota("max_concurrent_tasks", "9")
                .allow_agent_type("writer")
                .tool(
                    "fetch",
                    ToolSettings::enabled().rate_limited(5, Duration::from_secs(1)),
                ),
        )
        .await
        .unwrap();
    assert_eq!(
        r.settings
            .quota_overrides
            .get("max_agents")
            .map(String::as_str),
        Some("20")
    );
    assert_eq!(r.quotas().max_agents, 20);
    assert_eq!(r.quotas().max_concurrent_tasks, 9);
    assert!(r.allows_agent_type("planner") && r.allows_agent_type("writer"));
    assert_eq!(r.settings.tools.len(), 2);
    assert!(r.updated_at >= r.created_at);

    // Concurrent writers (two connections): compare-and-set loses no update.
    let reg2 = registry(&server).await;
    let writers: Vec<_> = (0..8)
        .map(|i| {
            let reg = if i % 2 == 0 {
                reg.clone()
            } else {
                reg2.clone()
            };
            let acme = acme.clone();
            tokio::spawn(async move {
                reg.update(
                    &acme,
                    &SettingsPatch::new().allow_agent_type(&format!("type-{i}")),
                )
                .await
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap().unwrap();
    }
    let r = reg.get(&acme).await.unwrap();
    for i in 0..8 {
        assert!(r.allows_agent_type(&format!("type-{i}")), "type-{i} lost");
    }
    assert!(r.allows_agent_type("planner") && r.allows_agent_type("writer"));

    // Removing is explicit, and only touches what it names.
    let r = reg
        .update(
            &acme,
            &SettingsPatch::new()
                .clear_quota("max_agents")
                .disallow_agent_type("writer"),
        )
        .await
        .unwrap();
    assert_eq!(
        r.quotas().max_agents,
        Quotas::for_tier(Tier::Free).max_agents
    );
    assert_eq!(r.quotas().max_concurrent_tasks, 9);
    assert!(!r.allows_agent_type("writer") && r.allows_agent_type("planner"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_reaches_a_second_instance_within_one_second() {
    let server = Server::jetstream();
    // Two runtime instances: separate connections, separate registries.
    let writer = registry(&server).await;
    writer
        .create("existing", "Existing", Tier::Free, TenantSettings::new())
        .await
        .unwrap();
    let reader = registry(&server).await;
    let watcher = RegistryWatcher::start(&reader).await.unwrap();
    assert_eq!(watcher.len(), 1, "the initial load sees what exists");
    let mut events = watcher.subscribe();
    let acme = id("acme");

    let t0 = Instant::now();
    writer
        .create("acme", "Acme", Tier::Pro, TenantSettings::new())
        .await
        .unwrap();
    let seen = eventually(Duration::from_secs(1), || async { watcher.get(&acme) }).await;
    assert!(seen.is_some(), "creation not seen within 1 s");
    let created_in = t0.elapsed();

    let t1 = Instant::now();
    writer.suspend(&acme).await.unwrap();
    let seen = eventually(Duration::from_secs(1), || async {
        (watcher.status(&acme) == Some(Status::Suspended)).then_some(())
    })
    .await;
    assert!(seen.is_some(), "suspension not seen within 1 s");
    let suspended_in = t1.elapsed();

    writer
        .update(&acme, &SettingsPatch::new().allow_agent_type("planner"))
        .await
        .unwrap();
    let seen = eventually(Duration::from_secs(1), || async {
        watcher
            .get(&acme)
            .filter(|r| r.allows_agent_type("planner"))
    })
    .await;
    assert!(seen.is_some(), "update not seen within 1 s");
    println!("created seen in {created_in:?}, suspension seen in {suspended_in:?}");

    // The same changes came through the event channel, in order.
    let mut statuses = Vec::new();
    while let Ok(Ok(RegistryEvent::Changed(r))) =
        tokio::time::timeout(Duration::from_millis(200), events.recv()).await
    {
        statuses.push(r.status);
    }
    assert_eq!(
        statuses,
        [Status::Active, Status::Suspended, Status::Suspended]
    );

    writer.delete(&acme).await.unwrap();
    let gone = eventually(Duration::from_secs(1), || async {
        watcher.get(&acme).is_none().then_some(())
    })
    .await;
    assert!(gone.is_some(), "deletion not seen within 1 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_cache_is_bounded_and_falls_back_to_the_bucket() {
    let server = Server::jetstream();
    let reg = registry(&server).await;
    let watcher = Arc::new(
        RegistryWatcher::start_with(&reg, WatcherOptions::new().max_entries(2))
            .await
            .unwrap(),
    );
    for t in ["t1", "t2", "t3"] {
        reg.create(t, t, Tier::Free, TenantSettings::new())
            .await
            .unwrap();
    }
    let full = eventually(Duration::from_secs(2), || async {
        (watcher.overflowed() == 1).then_some(())
    })
    .await;
    assert!(full.is_some());
    assert_eq!(watcher.len(), 2);
    assert!(watcher.get(&id("t3")).is_none());
    assert_eq!(watcher.lookup(&id("t3")).await.unwrap().name, "t3");
}
