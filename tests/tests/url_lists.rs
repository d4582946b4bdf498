//! Server URL lists (`nats://a:1,nats://b:2`) in credential bundles: the namespace
//! connects to a live entry when another entry is dead, and refuses an invalid list
//! with its own error.

use std::time::Duration;

use futures::StreamExt as _;
use nats_harness::Server;
use tenant_bus::{
    AgentId, ConnectErrorKind, CredentialBundle, MasterSecret, TenantId, TenantNamespace,
};

/// A 127.0.0.1 port with nothing listening (bound, then released).
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn bundle(url: String, agent: &str) -> CredentialBundle {
    let master = MasterSecret::generate().unwrap();
    let tenant = TenantId::new("acme").unwrap();
    CredentialBundle {
        url,
        tenant: tenant.clone(),
        agent: AgentId::new(agent).unwrap(),
        creds: None,
        keys: master.key_set(&tenant, [1], 1).unwrap(),
        placement: Default::default(),
    }
}

#[tokio::test]
async fn a_list_with_a_dead_first_entry_connects_to_the_live_one() {
    let server = Server::new();
    let list = format!("nats://127.0.0.1:{}, {}", dead_port(), server.url());
    // async-nats shuffles the list; a few connects cover both orders.
    for i in 0..4 {
        let b = bundle(list.clone(), &format!("a{i}"));
        let ns = tokio::time::timeout(Duration::from_secs(10), TenantNamespace::connect(&b))
            .await
            .expect("connect within 10 s")
            .unwrap_or_else(|e| panic!("connect with {list}: {e}"));
        // The connection really is to the live server: a sealed round trip.
        let mut sub = ns.subscribe("ping").await.unwrap();
        ns.flush().await.unwrap();
        ns.publish("ping", b"hi").await.unwrap();
        let msg = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("message within 5 s")
            .expect("subscription open");
        assert_eq!(&msg.payload[..], b"hi");
    }
}

#[tokio::test]
async fn an_invalid_list_is_its_own_error() {
    let server = Server::new();
    for url in [
        format!("{},nats://127.0.0.1:notaport", server.url()),
        format!("{},,{}", server.url(), server.url()),
        String::new(),
    ] {
        let err = TenantNamespace::connect(&bundle(url.clone(), "a"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ConnectErrorKind::InvalidUrl, "{url:?}: {err}");
    }
}
