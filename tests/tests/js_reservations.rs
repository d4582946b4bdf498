//! Honest JetStream reservations against a real nats-server with small
//! JetStream limits: tenants are created while their reservations fit; the
//! one past the limit is refused and does not exist (instead of existing
//! "successfully" while the server would refuse its JetStream when its first
//! agent connects); it can be created without JetStream, which says so; a tier
//! change that would not fit is refused; `status` shows reserved against
//! allowed; and the tenants that were admitted really have JetStream, all at
//! once.

// Test code: a failed set-up step should abort the test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use agentbus_control::api::{CreateTenant, ErrorCode, UpdateTenant};
use agentbus_control::tiers::Tier;
use nats_harness::platform_with;

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenant_past_the_servers_jetstream_limit_is_refused_not_half_created() {
    // Room for two free tenants' storage (64 MiB each), not three.
    let p = platform_with(|o| {
        o.max_memory_store = Some(40 * MIB);
        o.max_file_store = Some(150 * MIB);
    })
    .await;
    p.cp.create_tenant("a", Tier::Free).await.unwrap();
    p.cp.create_tenant("b", Tier::Free).await.unwrap();
    let refused = p.cp.create_tenant("c", Tier::Free).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::Refused, "{}", refused.message);
    assert!(refused.message.contains("JetStream"), "{}", refused.message);
    assert!(refused.message.contains("150.0 MiB"), "{}", refused.message);
    assert_eq!(
        p.cp.tenant("c").await.unwrap_err().code,
        ErrorCode::NotFound,
        "no tenant exists without its JetStream"
    );

    // Explicitly without JetStream: created, and it says so.
    let c =
        p.cp.create_tenant_with(
            "c",
            &CreateTenant {
                tier: Some("free".into()),
                no_jetstream: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(c.quotas.js_max_storage, 0);
    assert_eq!(c.quotas.js_max_memory, 0);

    // A tier change that would not fit is refused and changes nothing.
    let e =
        p.cp.update_tenant(
            "a",
            &UpdateTenant {
                set: vec![("tier".into(), "pro".into())],
                unset: vec![],
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Refused, "{}", e.message);
    assert_eq!(p.cp.tenant("a").await.unwrap().record.tier, Tier::Free);
    // Lowering is always allowed.
    p.cp.update_tenant(
        "a",
        &UpdateTenant {
            set: vec![("js_max_storage".into(), (32 * MIB).to_string())],
            unset: vec![],
        },
    )
    .await
    .unwrap();

    let status = p.cp.status().await.unwrap();
    assert_eq!(status.jetstream.tenants_storage, (32 + 64) * MIB);
    assert_eq!(status.jetstream.tenants_memory, 2 * 16 * MIB);
    assert_eq!(status.jetstream.servers.len(), 1);
    assert_eq!(status.jetstream.servers[0].max_storage, (150 * MIB) as i64);

    // The admitted tenants really have JetStream, both loaded at once.
    for t in ["a", "b"] {
        let issued = p.cp.create_agent(t, "x", "default").await.unwrap();
        let client =
            async_nats::ConnectOptions::with_credentials(issued.bundle.creds.as_deref().unwrap())
                .unwrap()
                .custom_inbox_prefix(format!("tenant.{t}._INBOX"))
                .connect(p.server.url())
                .await
                .unwrap();
        let info = async_nats::jetstream::new(client)
            .query_account()
            .await
            .unwrap_or_else(|e| panic!("{t} has no JetStream: {e}"));
        assert!(info.limits.max_storage.unwrap_or(0) > 0, "{t}: {info:?}");
    }
}
