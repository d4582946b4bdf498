//! Identity against a real nats-server in operator mode: API keys through the
//! NATS auth callout the controller runs. A raw async-nats client with only the
//! URL and a key as its token is what the server (not the library) admits.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use agentbus_control::api::CreateApiKey;
use agentbus_control::identity::apikey;
use agentbus_control::tiers::Tier;
use futures::StreamExt as _;
use nats_harness::{eventually, platform, server_sync, Platform};

/// A raw client logging in with `token` only; `Err` is the connect error text.
async fn connect_with(url: &str, token: &str) -> Result<async_nats::Client, String> {
    let client = async_nats::ConnectOptions::with_token(token.to_string())
        .connection_timeout(Duration::from_secs(3))
        .max_reconnects(Some(0))
        .connect(url)
        .await
        .map_err(|e| e.to_string())?;
    client.flush().await.map_err(|e| e.to_string())?;
    Ok(client)
}

async fn key(p: &Platform, tenant: &str, req: CreateApiKey) -> (String, String) {
    let issued = p.cp.create_apikey(tenant, &req).await.unwrap();
    assert_eq!(issued.key.len(), apikey::KEY_LEN);
    assert_eq!(issued.record.id, issued.id);
    assert!(!serde_json::to_string(&issued.record)
        .unwrap()
        .contains(&issued.key));
    (issued.id, issued.key)
}

fn named(name: &str) -> CreateApiKey {
    CreateApiKey {
        name: name.to_string(),
        ..Default::default()
    }
}

/// Whether `client` may publish on `subject` (a permission violation comes back
/// as an error on flush or closes nothing; a round trip through a subscription
/// of the same client tells).
async fn can_publish(client: &async_nats::Client, subject: &str) -> bool {
    let mut probe = match client.subscribe(subject.to_string()).await {
        Ok(s) => s,
        Err(_) => return false,
    };
    if client.flush().await.is_err() {
        return false;
    }
    let _ = client.publish(subject.to_string(), "x".into()).await;
    let _ = client.flush().await;
    matches!(
        tokio::time::timeout(Duration::from_millis(700), probe.next()).await,
        Ok(Some(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_logs_in_to_its_own_tenant_only() {
    let p = platform().await;
    p.cp.create_tenant("acme", Tier::Free).await.unwrap();
    p.cp.create_tenant("globex", Tier::Free).await.unwrap();
    let (_, k) = key(&p, "acme", named("svc")).await;

    let client = match connect_with(&p.server.url(), &k).await {
        Ok(c) => c,
        Err(e) => {
            let mut server = p.server;
            panic!("{e}: {}", server.process().log_tail(30));
        }
    };
    // Inside its tenant: works.
    assert!(can_publish(&client, "tenant.acme.jobs.x").await);
    // Another tenant's subjects: the user JWT does not allow them (and the
    // account would not see them anyway).
    assert!(!can_publish(&client, "tenant.globex.jobs.x").await);
    // The server placed it in acme's account: an agent of acme with issued
    // credentials (a user of acme's account) receives what the key publishes.
    let issued =
        p.cp.create_agent("acme", "listener", "default")
            .await
            .unwrap();
    let creds = issued.bundle.creds.clone().unwrap();
    let listener = async_nats::ConnectOptions::with_credentials(&creds)
        .unwrap()
        .connect(p.server.url())
        .await
        .unwrap();
    let mut sub = listener.subscribe("tenant.acme.probe").await.unwrap();
    // Live at the server before the key publishes (flush is not a barrier).
    server_sync(&listener, "tenant.acme.sync").await;
    client
        .publish("tenant.acme.probe", "hi".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(3), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got.payload[..], b"hi");
    let counters = p.controller.callout_counters().unwrap();
    assert!(counters.allowed.load(Ordering::Relaxed) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_unknown_revoked_and_expired_keys_are_refused() {
    let p = platform().await;
    p.cp.create_tenant("acme", Tier::Free).await.unwrap();
    let url = p.server.url();
    let counters = p.controller.callout_counters().unwrap();
    let (id, k) = key(&p, "acme", named("svc")).await;

    // A one-character change: refused offline, without a lookup.
    let lookups = counters.key_lookups.load(Ordering::Relaxed);
    let mut typo = k.clone().into_bytes();
    typo[10] = if typo[10] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).unwrap();
    assert!(connect_with(&url, &typo).await.is_err());
    assert!(connect_with(&url, "hunter2").await.is_err());
    assert!(connect_with(&url, "").await.is_err());
    assert_eq!(counters.key_lookups.load(Ordering::Relaxed), lookups);
    assert!(counters.refused_offline.load(Ordering::Relaxed) >= 2);

    // Well-formed but unknown: refused after a lookup.
    let unknown = apikey::generate().unwrap().key;
    assert!(connect_with(&url, &unknown).await.is_err());
    assert_eq!(counters.key_lookups.load(Ordering::Relaxed), lookups + 1);

    // The real key works; revoked, it no longer does.
    let live = connect_with(&url, &k).await.unwrap();
    drop(live);
    p.cp.revoke_apikey("acme", &id).await.unwrap();
    assert!(connect_with(&url, &k).await.is_err());
    let listed = p.cp.apikeys("acme").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].revoked_at.is_some());

    // Expired: a 1 s key refused after 2 s.
    let (_, short) = key(
        &p,
        "acme",
        CreateApiKey {
            name: "short".into(),
            expires_in_secs: Some(1),
            ..Default::default()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(connect_with(&url, &short).await.is_err());

    // A suspended tenant's keys are refused.
    let (_, k2) = key(&p, "acme", named("other")).await;
    connect_with(&url, &k2).await.unwrap();
    p.cp.suspend_tenant("acme").await.unwrap();
    assert!(connect_with(&url, &k2).await.is_err());

    // Every denial is in the audit log with its reason.
    let (events, _) = agentbus_control::audit::fetch_events(&p.cp, "acme")
        .await
        .unwrap();
    let reasons: Vec<String> = events
        .iter()
        .filter(|e| e.action == "login" && e.outcome.to_string() == "denied")
        .map(|e| e.reason.clone())
        .collect();
    for want in ["revoked", "expired", "tenant_suspended"] {
        assert!(
            reasons.iter().any(|r| r == want),
            "{want} not in {reasons:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_works_until_its_grace_ends() {
    let p = platform().await;
    p.cp.create_tenant("acme", Tier::Free).await.unwrap();
    let url = p.server.url();
    let (id, old) = key(&p, "acme", named("svc")).await;
    let rotated =
        p.cp.rotate_apikey("acme", &id, Duration::from_secs(2))
            .await
            .unwrap();
    assert_ne!(rotated.key, old);
    // Within the grace both work.
    connect_with(&url, &old).await.unwrap();
    connect_with(&url, &rotated.key).await.unwrap();
    // After it only the new one.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert!(connect_with(&url, &old).await.is_err());
    connect_with(&url, &rotated.key).await.unwrap();
    // A rotated key does not rotate again.
    assert!(p
        .cp
        .rotate_apikey("acme", &id, Duration::from_secs(2))
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_key_gets_only_its_scopes() {
    let p = platform().await;
    p.cp.create_tenant("acme", Tier::Free).await.unwrap();
    let (_, k) = key(
        &p,
        "acme",
        CreateApiKey {
            name: "narrow".into(),
            scopes: vec!["pub:jobs.>".into(), "sub:jobs.>".into()],
            ..Default::default()
        },
    )
    .await;
    let client = connect_with(&p.server.url(), &k).await.unwrap();
    assert!(can_publish(&client, "tenant.acme.jobs.a").await);
    assert!(!can_publish(&client, "tenant.acme.billing.a").await);
    // No JetStream without the `js` scope.
    let js = async_nats::jetstream::new(client.clone());
    assert!(js.get_stream("TASKS").await.is_err());
    // A bad scope is refused at create and changes nothing.
    let err =
        p.cp.create_apikey(
            "acme",
            &CreateApiKey {
                name: "bad".into(),
                scopes: vec!["pub:a..b".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, agentbus_control::ErrorCode::InvalidInput);
    assert_eq!(p.cp.apikeys("acme").await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_agents_holds_for_concurrent_logins() {
    let p = platform().await;
    let mut req = agentbus_control::api::CreateTenant {
        tier: Some("free".into()),
        ..Default::default()
    };
    req.quotas.insert("max_agents".into(), "10".into());
    req.quotas.insert("max_connections".into(), "100".into());
    p.cp.create_tenant_with("acme", &req).await.unwrap();
    let (_, k) = key(&p, "acme", named("fleet")).await;
    let url = p.server.url();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (url, k) = (url.clone(), k.clone());
            tokio::spawn(async move { connect_with(&url, &k).await })
        })
        .collect();
    let mut admitted = Vec::new();
    for t in tasks {
        if let Ok(c) = t.await.unwrap() {
            admitted.push(c);
        }
    }
    assert_eq!(admitted.len(), 10, "exactly max_agents connect");
    // One leaves; one more gets in (its slot is freed on the disconnect event).
    let one = admitted.pop().unwrap();
    drop(one);
    let again = eventually(Duration::from_secs(10), || {
        let (url, k) = (url.clone(), k.clone());
        async move { connect_with(&url, &k).await.ok() }
    })
    .await;
    assert!(again.is_some(), "a freed slot admits one more");
    assert!(connect_with(&url, &k).await.is_err(), "and no more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_key_closes_its_connections_within_2s() {
    let p = platform().await;
    p.cp.create_tenant("acme", Tier::Free).await.unwrap();
    let (id, k) = key(&p, "acme", named("svc")).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_token(k.clone())
        .event_callback(move |e| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(e.to_string());
            }
        })
        .connect(p.server.url())
        .await
        .unwrap();
    client.flush().await.unwrap();
    // Let the slot index see the connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    p.cp.revoke_apikey("acme", &id).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(e) = rx.recv().await {
            if e.contains("disconnected") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(closed, Ok(true), "no disconnect within 2 s");
    assert!(started.elapsed() < Duration::from_secs(2));
    // Its reconnects are refused: it stays disconnected, and a new login with
    // the key fails.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_ne!(
        client.connection_state(),
        async_nats::connection::State::Connected
    );
    assert!(connect_with(&p.server.url(), &k).await.is_err());
    let kicked = p
        .controller
        .callout_counters()
        .unwrap()
        .kicked
        .load(Ordering::Relaxed);
    assert_eq!(kicked, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_create_refuses_past_max_agents_issued() {
    let p = platform().await;
    let mut req = agentbus_control::api::CreateTenant {
        tier: Some("free".into()),
        ..Default::default()
    };
    req.quotas.insert("max_agents".into(), "2".into());
    p.cp.create_tenant_with("acme", &req).await.unwrap();
    p.cp.create_agent("acme", "a1", "default").await.unwrap();
    p.cp.create_agent("acme", "a2", "default").await.unwrap();
    let err =
        p.cp.create_agent("acme", "a3", "default")
            .await
            .unwrap_err();
    assert_eq!(err.code, agentbus_control::ErrorCode::Refused, "{err:?}");
    assert_eq!(
        p.cp.agents("acme").await.unwrap().len(),
        2,
        "nothing changed"
    );
    p.cp.revoke_agent("acme", "a1").await.unwrap();
    p.cp.create_agent("acme", "a3", "default").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_with_key_exchanges_sealed_messages_with_a_bundle_agent() {
    let p = platform().await;
    p.cp.create_tenant("acme", Tier::Free).await.unwrap();
    p.cp.create_tenant("globex", Tier::Free).await.unwrap();
    let (id, k) = key(&p, "acme", named("py")).await;
    let url = p.server.url();

    let (ns, _refresher) =
        agentbus_control::keys::connect_with_key(&url, &k, tenant_bus::NamespaceOptions::new())
            .await
            .unwrap();
    // The tenant came from the server.
    assert_eq!(ns.tenant().as_str(), "acme");
    assert_eq!(
        ns.agent().as_str(),
        format!("key-{}", id.to_ascii_lowercase())
    );

    let issued =
        p.cp.create_agent("acme", "planner", "default")
            .await
            .unwrap();
    let agent = tenant_bus::TenantNamespace::connect(&issued.bundle)
        .await
        .unwrap();
    let mut from_key = agent.subscribe("jobs.>").await.unwrap();
    let mut from_agent = ns.subscribe("results.>").await.unwrap();
    agent.sync().await.unwrap();
    ns.sync().await.unwrap();
    let sent = ns.publish("jobs.created", b"from the key").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(3), from_key.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.msg_id, sent);
    assert_eq!(&got.payload[..], b"from the key");
    agent
        .publish("results.done", b"from the agent")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(3), from_agent.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got.payload[..], b"from the agent");

    // A malformed key fails offline; a revoked one is refused by the server.
    let err = agentbus_control::keys::connect_with_key(&url, "abk_nope", Default::default())
        .await
        .err()
        .unwrap();
    assert_eq!(err.code, agentbus_control::ErrorCode::InvalidInput);
    p.cp.revoke_apikey("acme", &id).await.unwrap();
    let err = agentbus_control::keys::connect_with_key(&url, &k, Default::default())
        .await
        .err()
        .unwrap();
    assert_eq!(err.code, agentbus_control::ErrorCode::Forbidden, "{err:?}");
}

mod platform_jwts {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine as _;
    use ring::signature::{Ed25519KeyPair, KeyPair as _};

    fn b64json(v: &serde_json::Value) -> String {
        B64.encode(serde_json::to_vec(v).unwrap())
    }

    fn token(key: &Ed25519KeyPair, header: serde_json::Value, claims: serde_json::Value) -> String {
        let input = format!("{}.{}", b64json(&header), b64json(&claims));
        let sig = key.sign(input.as_bytes());
        format!("{input}.{}", B64.encode(sig.as_ref()))
    }

    fn claims(tenant: &str, aud: &str, exp: i64) -> serde_json::Value {
        let now = agentbus_control::install::now_unix();
        serde_json::json!({
            "iss": "https://id.example",
            "aud": aud,
            "sub": "user-42",
            "exp": exp,
            "iat": now,
            "org_id": tenant,
            "tenant": "globex",
            "roles": ["agent"],
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn platform_jwts_log_in_to_the_verified_tenant_only() {
        let p = platform().await;
        p.cp.create_tenant("acme", Tier::Free).await.unwrap();
        p.cp.create_tenant("globex", Tier::Free).await.unwrap();
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let other =
            Ed25519KeyPair::from_pkcs8(Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref())
                .unwrap();
        let jwks = serde_json::json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "kid": "k1", "alg": "EdDSA", "use": "sig",
            "x": B64.encode(key.public_key().as_ref()),
        }]})
        .to_string();
        let config = agentbus_control::identity::platform_jwt::PlatformJwtConfig::from_json(
            &serde_json::json!({
                "issuer": "https://id.example",
                "audience": "agentbus",
                "tenant_claim": "org_id",
                "roles_claim": "roles",
                "role_map": [{"role": "agent", "agent_type": "default"}],
            })
            .to_string(),
        )
        .unwrap();
        let verifier =
            agentbus_control::identity::platform_jwt::JwksVerifier::from_jwks_json(&jwks, config)
                .unwrap();
        // This deployment's controller accepts platform JWTs: replace the
        // harness's (one callout answerer, so no request lands on the old one).
        p.shutdown.fire();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let url = p.server.url();
        let controller = agentbus_control::Controller::connect(
            &p.install,
            agentbus_control::ControllerConfig::new(&url).platform_jwt(verifier),
        )
        .await
        .unwrap();
        let shutdown = agentbus_control::controller::shutdown::Shutdown::new();
        tokio::spawn(controller.clone().serve(shutdown.clone()));
        tokio::time::sleep(Duration::from_millis(500)).await;

        let now = agentbus_control::install::now_unix();
        let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": "k1"});
        // Valid: in acme (the verified claim), although `tenant` says globex.
        let good = token(&key, header.clone(), claims("acme", "agentbus", now + 600));
        let client = eventually(Duration::from_secs(5), || {
            let (url, good) = (url.clone(), good.clone());
            async move { connect_with(&url, &good).await.ok() }
        })
        .await
        .expect("a valid platform JWT logs in");
        assert!(can_publish(&client, "tenant.acme.jobs.x").await);
        assert!(!can_publish(&client, "tenant.globex.jobs.x").await);

        // Refused: wrong audience, expired, another key's signature, alg none,
        // and a token whose claims were edited after signing.
        let refused = [
            token(&key, header.clone(), claims("acme", "other", now + 600)),
            token(&key, header.clone(), claims("acme", "agentbus", now - 600)),
            token(
                &other,
                header.clone(),
                claims("acme", "agentbus", now + 600),
            ),
            format!(
                "{}.{}.",
                b64json(&serde_json::json!({"alg": "none", "typ": "JWT", "kid": "k1"})),
                b64json(&claims("acme", "agentbus", now + 600))
            ),
            {
                let parts: Vec<&str> = good.split('.').collect();
                format!(
                    "{}.{}.{}",
                    parts[0],
                    b64json(&claims("globex", "agentbus", now + 600)),
                    parts[2]
                )
            },
        ];
        for t in &refused {
            assert!(connect_with(&url, t).await.is_err());
        }
        let counters = controller.callout_counters().unwrap();
        assert!(counters.refused_offline.load(Ordering::Relaxed) >= refused.len() as u64);
        shutdown.fire();
    }
}
