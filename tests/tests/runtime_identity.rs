//! The runtime takes a connection's tenant from the server, not from the bundle
//! (operator mode: one NATS account per tenant). A real bundle of tenant `acme`
//! relabelled as `globex` (the bundle's and its key set's tenant fields edited,
//! as anyone holding the JSON file can) is refused by the agent host through
//! every entry point, before it takes a slot of globex; the genuine globex
//! bundle is accepted. Without the check the host gave the relabelled bundle
//! globex's agent slots and message windows.

use std::sync::Arc;
use std::time::Duration;

use agent_runtime::agent::identity::{server_identity, verify_account, IDENTITY_TIMEOUT};
use agent_runtime::agent::{AgentErrorKind, AgentHost};
use agent_runtime::registry::{Registry, RegistryWatcher};
use agent_runtime::scheduler::{Scheduler, SchedulerConfig};
use agent_runtime::tiers::Tier;
use nats_harness::platform;
use tenant_bus::{CredentialBundle, NamespaceOptions, TenantId, TenantNamespace};

fn id(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

/// `bundle` with its tenant label (and its key set's) changed to `tenant`: what
/// editing the JSON file gives. The creds and the key bytes stay `bundle`'s.
fn relabel(bundle: &CredentialBundle, tenant: &str) -> CredentialBundle {
    let mut json: serde_json::Value = serde_json::from_str(&bundle.to_json().unwrap()).unwrap();
    json["tenant"] = tenant.into();
    json["keys"]["tenant"] = tenant.into();
    let forged = CredentialBundle::from_json(&json.to_string()).unwrap();
    assert_eq!(forged.tenant, id(tenant));
    assert_eq!(forged.keys.tenant(), &id(tenant));
    forged
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_relabelled_as_another_tenant_is_refused_and_the_genuine_one_accepted() {
    let p = platform().await;
    for t in ["acme", "globex"] {
        p.cp.create_tenant(t, Tier::Free).await.unwrap();
    }
    let acme =
        p.cp.issue_agent("acme", "planner", "default")
            .await
            .unwrap();
    let globex =
        p.cp.issue_agent("globex", "planner", "default")
            .await
            .unwrap();
    let forged = relabel(&acme, "globex");

    // A runtime instance: the platform account's registry, watched, and a
    // scheduler, so agent slots are taken per tenant.
    let client = p.platform_client("runtime").await;
    let registry = Registry::open(client).await.unwrap();
    let watcher = Arc::new(RegistryWatcher::start(&registry).await.unwrap());
    let records = (
        watcher.lookup(&id("acme")).await.unwrap(),
        watcher.lookup(&id("globex")).await.unwrap(),
    );
    assert!(records.0.account.starts_with('A') && records.1.account.starts_with('A'));
    assert_ne!(records.0.account, records.1.account);
    let host = AgentHost::with_scheduler(
        watcher.clone(),
        Arc::new(Scheduler::local(SchedulerConfig::default())),
    );

    // The server says who a genuine connection is: its tenant's account.
    let genuine = TenantNamespace::connect(&acme).await.unwrap();
    let who = server_identity(&genuine, IDENTITY_TIMEOUT).await.unwrap();
    assert_eq!(who.account, records.0.account);
    assert_eq!(who.account_name, "tenant-acme");
    assert_eq!(who.user_name, "planner");
    // Checked against another tenant's record, the server's account differs.
    let e = verify_account(&genuine, &records.1).await.unwrap_err();
    assert_eq!(e.kind(), AgentErrorKind::WrongAccount, "{e}");
    assert!(e.to_string().contains(&records.0.account), "{e}");
    verify_account(&genuine, &records.0).await.unwrap();

    // The relabelled bundle, through each entry point of the host.
    let started = std::time::Instant::now();
    let e = host
        .start(
            &forged,
            NamespaceOptions::new(),
            "default",
            ["reports:read"],
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), AgentErrorKind::WrongAccount, "{e}");
    assert!(
        e.to_string().contains("tenant globex") && e.to_string().contains("another tenant"),
        "{e}"
    );
    // Told by the server's refusal at once, not after a timeout.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let e = host
        .connect(&forged, NamespaceOptions::new())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), AgentErrorKind::WrongAccount, "{e}");
    // A namespace the relabelled bundle connected by itself, handed to the host.
    let own = TenantNamespace::connect(&forged).await.unwrap();
    assert_eq!(own.tenant(), &id("globex"));
    let e = host
        .register(own, "default", Vec::<&str>::new())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), AgentErrorKind::WrongAccount, "{e}");
    // Nothing of globex was given to it.
    assert_eq!(host.agents_of(&id("globex")), 0);
    let globex_sched = host.tenant_scheduler(&id("globex")).await.unwrap().unwrap();
    assert_eq!(globex_sched.agents_held_here(), 0);

    // The genuine globex bundle, and acme's own, are accepted.
    let g = host
        .start(
            &globex,
            NamespaceOptions::new(),
            "default",
            ["reports:read"],
        )
        .await
        .unwrap();
    assert_eq!(g.tenant(), &id("globex"));
    assert_eq!(host.agents_of(&id("globex")), 1);
    assert_eq!(globex_sched.agents_held_here(), 1);
    let a = host
        .register(genuine, "default", Vec::<&str>::new())
        .await
        .unwrap();
    assert_eq!(a.tenant(), &id("acme"));
    assert_eq!(host.agents_of(&id("acme")), 1);
}
