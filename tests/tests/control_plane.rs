//! The control plane's state directory, typed errors and JWTs, checked offline, and
//! the generated server configs checked by a real nats-server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_runtime::tiers::{Quotas, Tier};
use agentbus_control::jwt::{self, AccountNats, OperatorNats, UserNats};
use agentbus_control::{ControlErrorKind, ControlPlane, TenantStatus, SYSTEM_ACCOUNT};
use nats_harness::{Server, ServerOptions};

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Every file under `root` (relative path -> content, mode).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (Vec<u8>, u32)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if path.is_dir() {
                out.insert(rel, (Vec::new(), mode(&path)));
                stack.push(path);
            } else {
                out.insert(rel, (std::fs::read(&path).unwrap(), mode(&path)));
            }
        }
    }
    out
}

#[tokio::test]
async fn state_dir_is_private_and_reopens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let mut cp = ControlPlane::init(&dir).unwrap();
    cp.create_tenant("acme", Tier::Free).await.unwrap();
    cp.issue_agent("acme", "planner", "planner").unwrap();
    let st = cp.state_dir().clone();

    assert_eq!(mode(&dir), 0o700, "state dir");
    for secret in [
        st.master(),
        st.operator_seed(),
        st.account_dir(SYSTEM_ACCOUNT).join("account.nk"),
        st.account_dir("PLATFORM").join("account.nk"),
        st.sys_creds(),
        dir.join("tenants/acme/account.nk"),
    ] {
        assert_eq!(mode(&secret), 0o600, "{}", secret.display());
    }
    // Every file holding a seed is 0600; the config holds none.
    let is_seed = |l: &str| {
        let l = l.trim();
        l.len() == 58 && ["SO", "SA", "SU"].iter().any(|p| l.starts_with(p))
    };
    let config = cp.server_config(&cp.default_server_options()).unwrap();
    assert!(!config.split(['"', ' ', '\n']).any(is_seed));
    let mut seeds = 0;
    for (path, (bytes, m)) in snapshot(&dir) {
        if String::from_utf8_lossy(&bytes).lines().any(is_seed) {
            seeds += 1;
            assert_eq!(m, 0o600, "{} holds a seed", path.display());
        }
    }
    assert_eq!(seeds, 5, "operator, SYS, sys user, PLATFORM, acme");

    // Reopening (and init on an existing state) keeps the same identities.
    let op = cp.operator_public_key().to_string();
    let again = ControlPlane::open(&dir).unwrap();
    assert_eq!(again.operator_public_key(), op);
    let init_again = ControlPlane::init(&dir).unwrap();
    assert_eq!(init_again.operator_public_key(), op);
    assert_eq!(again.tenant("acme").unwrap().key_versions, vec![1]);
}

#[tokio::test]
async fn jwts_decode_and_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::init(tmp.path().join("s")).unwrap();
    let mut quotas = Quotas::for_tier(Tier::Pro);
    quotas.max_connections = 7;
    cp.create_tenant_with_quotas("acme", Tier::Pro, quotas.clone())
        .await
        .unwrap();
    let bundle = cp.issue_agent("acme", "worker-1", "worker").unwrap();
    let op_key = cp.operator_public_key().to_string();

    let op: jwt::OperatorClaims =
        jwt::decode_issued_by(&cp.operator_jwt().unwrap(), &op_key).unwrap();
    assert_eq!(op.sub, op_key, "self-signed");
    assert_eq!(op.nats.kind, "operator");
    assert_eq!(op.nats.version, 2);
    assert_eq!(op.nats.system_account, cp.system_account());
    let _: jwt::Claims<OperatorNats> = op;

    for (jwt_text, key) in [
        (
            cp.system_account_jwt().unwrap(),
            cp.system_account().to_string(),
        ),
        (
            cp.platform_account_jwt().unwrap(),
            cp.platform_account().to_string(),
        ),
    ] {
        let c: jwt::AccountClaims = jwt::decode_issued_by(&jwt_text, &op_key).unwrap();
        assert_eq!(c.sub, key);
        assert_eq!(c.nats.kind, "account");
    }
    let platform: jwt::AccountClaims = jwt::decode(&cp.platform_account_jwt().unwrap()).unwrap();
    assert_eq!(
        platform.nats.limits.disk_storage, -1,
        "platform has JetStream"
    );

    let record = cp.tenant("acme").unwrap();
    let acct: jwt::Claims<AccountNats> =
        jwt::decode_issued_by(&cp.account_jwt("acme").unwrap(), &op_key).unwrap();
    assert_eq!(acct.sub, record.account);
    let l = &acct.nats.limits;
    assert_eq!(l.conn, 7);
    assert_eq!(l.subs, quotas.max_subscriptions as i64);
    assert_eq!(l.payload, quotas.max_payload as i64);
    assert_eq!(l.mem_storage, quotas.js_max_memory as i64);
    assert_eq!(l.disk_storage, quotas.js_max_storage as i64);
    assert_eq!(l.streams, quotas.js_max_streams as i64);
    assert_eq!(l.consumer, quotas.js_max_consumers as i64);
    assert_eq!((l.imports, l.exports, l.leaf), (0, 0, 0));
    assert!(l.disallow_bearer);

    let (user_jwt, seed) = jwt::parse_creds(bundle.creds.as_deref().unwrap()).unwrap();
    let user: jwt::Claims<UserNats> = jwt::decode_issued_by(&user_jwt, &record.account).unwrap();
    let agents = cp.agents("acme").unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!(user.sub, agents[0].user);
    assert_eq!(agents[0].agent_type, "worker");
    assert_eq!(
        nkeys::KeyPair::from_seed(&seed).unwrap().public_key(),
        user.sub
    );
    assert_eq!(user.nats.subscribe.allow, vec!["tenant.acme.>".to_string()]);
    assert!(user
        .nats
        .publish
        .allow
        .contains(&"tenant.acme.>".to_string()));
    assert!(!user
        .nats
        .publish
        .allow
        .iter()
        .any(|s| s == ">" || s == "$JS.API.>"));
    assert_eq!(bundle.keys.current_version(), 1);
    assert_eq!(bundle.url, cp.server_url());

    // Tampering with any part breaks verification.
    let mut parts: Vec<&str> = user_jwt.split('.').collect();
    let forged_sig = parts[2].chars().rev().collect::<String>();
    parts[2] = &forged_sig;
    assert_eq!(
        jwt::decode::<UserNats>(&parts.join("."))
            .unwrap_err()
            .kind(),
        ControlErrorKind::Jwt
    );

    // Suspension is in the account JWT: conn 0 and a `*` revocation; a re-signed
    // account always has a strictly newer iat.
    cp.suspend_tenant("acme").await.unwrap();
    let s: jwt::AccountClaims = jwt::decode(&cp.account_jwt("acme").unwrap()).unwrap();
    assert_eq!(s.nats.limits.conn, 0);
    assert!(s.nats.revocations.contains_key("*"));
    assert!(s.iat > acct.iat);
    assert_ne!(s.jti, acct.jti);
    cp.activate_tenant("acme").await.unwrap();
    let a: jwt::AccountClaims = jwt::decode(&cp.account_jwt("acme").unwrap()).unwrap();
    assert_eq!(a.nats.limits.conn, 7);
    assert!(!a.nats.revocations.contains_key("*"));
    assert!(a.iat > s.iat);
}

#[tokio::test]
async fn bad_input_is_typed_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");

    // Missing / foreign state dirs.
    assert_eq!(
        ControlPlane::open(&dir).unwrap_err().kind(),
        ControlErrorKind::NotInitialized
    );
    assert!(!dir.exists(), "open creates nothing");
    let foreign = tmp.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("x"), "y").unwrap();
    assert_eq!(
        ControlPlane::init(&foreign).unwrap_err().kind(),
        ControlErrorKind::InvalidState
    );
    assert_eq!(std::fs::read_dir(&foreign).unwrap().count(), 1);

    let mut cp = ControlPlane::init(&dir).unwrap();
    cp.create_tenant("acme", Tier::Free).await.unwrap();
    cp.issue_agent("acme", "planner", "planner").unwrap();
    cp.create_tenant("idle", Tier::Free).await.unwrap();
    cp.suspend_tenant("idle").await.unwrap();
    let before = snapshot(&dir);

    use ControlErrorKind as K;
    let cases: Vec<(&str, K, agentbus_control::ControlError)> = vec![
        (
            "bad tenant id",
            K::InvalidId,
            cp.create_tenant("Acme", Tier::Free).await.unwrap_err(),
        ),
        (
            "dotted id",
            K::InvalidId,
            cp.create_tenant("a.b", Tier::Free).await.unwrap_err(),
        ),
        (
            "wildcard id",
            K::InvalidId,
            cp.create_tenant("*", Tier::Free).await.unwrap_err(),
        ),
        (
            "empty id",
            K::InvalidId,
            cp.create_tenant("", Tier::Free).await.unwrap_err(),
        ),
        (
            "duplicate",
            K::DuplicateTenant,
            cp.create_tenant("acme", Tier::Pro).await.unwrap_err(),
        ),
        (
            "unknown tenant",
            K::UnknownTenant,
            cp.tenant("nope").unwrap_err(),
        ),
        (
            "unknown jwt",
            K::UnknownTenant,
            cp.account_jwt("nope").unwrap_err(),
        ),
        (
            "issue unknown",
            K::UnknownTenant,
            cp.issue_agent("nope", "a", "t").unwrap_err(),
        ),
        (
            "issue bad agent",
            K::InvalidId,
            cp.issue_agent("acme", "Bad", "t").unwrap_err(),
        ),
        (
            "issue bad type",
            K::InvalidId,
            cp.issue_agent("acme", "a", "x.y").unwrap_err(),
        ),
        (
            "issue dup",
            K::DuplicateAgent,
            cp.issue_agent("acme", "planner", "p").unwrap_err(),
        ),
        (
            "issue suspended",
            K::TenantSuspended,
            cp.issue_agent("idle", "a", "t").unwrap_err(),
        ),
        (
            "revoke unknown agent",
            K::UnknownAgent,
            cp.revoke_agent("acme", "ghost").await.unwrap_err(),
        ),
        (
            "revoke unknown tenant",
            K::UnknownTenant,
            cp.revoke_agent("nope", "planner").await.unwrap_err(),
        ),
        (
            "revoke bad id",
            K::InvalidId,
            cp.revoke_agent("acme", "a>").await.unwrap_err(),
        ),
        (
            "suspend unknown",
            K::UnknownTenant,
            cp.suspend_tenant("nope").await.unwrap_err(),
        ),
        (
            "suspend twice",
            K::InvalidTransition,
            cp.suspend_tenant("idle").await.unwrap_err(),
        ),
        (
            "activate active",
            K::InvalidTransition,
            cp.activate_tenant("acme").await.unwrap_err(),
        ),
        (
            "activate unknown",
            K::UnknownTenant,
            cp.activate_tenant("nope").await.unwrap_err(),
        ),
        (
            "rotate unknown",
            K::UnknownTenant,
            cp.rotate_key("nope").unwrap_err(),
        ),
        (
            "keys unknown",
            K::UnknownTenant,
            cp.key_set("nope").unwrap_err(),
        ),
        (
            "agents unknown",
            K::UnknownTenant,
            cp.agents("nope").unwrap_err(),
        ),
        (
            "quotas unknown",
            K::UnknownTenant,
            cp.update_quotas("nope", Quotas::for_tier(Tier::Free))
                .await
                .unwrap_err(),
        ),
        (
            "bad url",
            K::InvalidUrl,
            cp.set_server_url("http://x y").unwrap_err(),
        ),
        (
            "bad service",
            K::InvalidId,
            cp.issue_platform_service("Svc!").unwrap_err(),
        ),
        ("sync offline", K::Push, cp.sync().await.unwrap_err()),
    ];
    for (what, kind, e) in &cases {
        assert_eq!(e.kind(), *kind, "{what}: {e}");
    }
    assert_eq!(snapshot(&dir), before, "failed calls changed the state dir");
}

#[tokio::test]
async fn key_rotation_keeps_previous_version() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::init(tmp.path().join("s")).unwrap();
    cp.create_tenant("acme", Tier::Free).await.unwrap();
    let v1 = cp.issue_agent("acme", "a", "t").unwrap().keys;
    assert_eq!(v1.versions().collect::<Vec<_>>(), vec![1]);
    let v2 = cp.rotate_key("acme").unwrap();
    assert_eq!(
        (v2.current_version(), v2.versions().collect::<Vec<_>>()),
        (2, vec![1, 2])
    );
    let b = cp.issue_agent("acme", "b", "t").unwrap();
    assert_eq!(b.keys.current_version(), 2);
    let v3 = cp.rotate_key("acme").unwrap();
    assert_eq!(
        (v3.current_version(), v3.versions().collect::<Vec<_>>()),
        (3, vec![2, 3])
    );
    assert_eq!(cp.tenant("acme").unwrap().current_key, 3);
    // The same derivation on reopen.
    let again = ControlPlane::open(cp.dir()).unwrap();
    let k = again.key_set("acme").unwrap();
    assert_eq!(k.current_version(), 3);
    // Keys are per tenant.
    cp.create_tenant("other", Tier::Free).await.unwrap();
    assert_eq!(cp.key_set("other").unwrap().tenant().as_str(), "other");
    assert_eq!(cp.tenant("acme").unwrap().status, TenantStatus::Active);
}

fn nats_server_bin() -> PathBuf {
    agentbus_control::local_server::locate_nats_server().unwrap()
}

/// `nats-server -t -c <file>`: the server's own config check.
fn server_accepts(config: &Path) {
    let out = std::process::Command::new(nats_server_bin())
        .arg("-t")
        .arg("-c")
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} rejected: {}{}",
        config.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn generated_configs_are_accepted_by_nats_server() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::init(tmp.path().join("s")).unwrap();
    let path = cp
        .write_server_config(&cp.default_server_options())
        .unwrap();
    assert_eq!(path, cp.state_dir().server_conf());
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(cp.system_account()));
    assert!(text.contains(cp.platform_account()));
    server_accepts(&path);

    // The 3-node cluster templates with a generated operator snippet.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../nats-config/cluster-3-node");
    let cluster = tmp.path().join("cluster");
    std::fs::create_dir(&cluster).unwrap();
    let mut nodes = 0;
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "conf") {
            std::fs::copy(&p, cluster.join(p.file_name().unwrap())).unwrap();
            nodes += 1;
        }
    }
    assert_eq!(nodes, 3, "three node configs");
    cp.write_operator_snippet(Some(&cluster.join("operator.conf")))
        .unwrap();
    for n in 1..=3 {
        server_accepts(&cluster.join(format!("node-{n}.conf")));
    }
}

/// A tenant created while no server runs is written to the resolver dir, and a
/// server started later serves it; a reconnecting control plane can re-push all.
#[tokio::test]
async fn offline_tenant_is_served_after_start() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::init(tmp.path().join("s")).unwrap();
    cp.create_tenant("acme", Tier::Free).await.unwrap();
    let bundle = cp.issue_agent("acme", "planner", "planner").unwrap();
    let config = cp.server_config(&cp.default_server_options()).unwrap();
    let server = Server::with_options(ServerOptions::new().config(config));

    let client = async_nats::ConnectOptions::with_credentials(bundle.creds.as_deref().unwrap())
        .unwrap()
        .custom_inbox_prefix("tenant.acme._INBOX")
        .connect(server.url())
        .await
        .unwrap();
    let mut sub = client.subscribe("tenant.acme.ping").await.unwrap();
    client
        .publish("tenant.acme.ping", "hi".into())
        .await
        .unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(2), futures::StreamExt::next(&mut sub))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&msg.payload[..], b"hi");

    cp.connect(&server.url()).await.unwrap();
    assert_eq!(cp.sync().await.unwrap(), 2, "PLATFORM + acme");
    // A platform-service user connects to PLATFORM and has JetStream there.
    let svc = cp.issue_platform_service("registry").unwrap();
    let pclient = async_nats::ConnectOptions::with_credentials(&svc)
        .unwrap()
        .connect(server.url())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(pclient);
    let kv = js
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: "registry".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    kv.put("acme", "free".into()).await.unwrap();
    assert_eq!(&kv.get("acme").await.unwrap().unwrap()[..], b"free");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The 3-node templates, run on free ports: the control plane pushes to node 1, and
/// the update reaches a connection on node 3 (new tenant served there; suspension
/// closes the node-3 connection).
#[tokio::test]
async fn cluster_templates_propagate_claim_updates() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::init(tmp.path().join("s")).unwrap();
    let snippet = tmp.path().join("operator.conf");
    cp.write_operator_snippet(Some(&snippet)).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../nats-config/cluster-3-node");
    let client: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let route: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut servers = Vec::new();
    for (n, &port) in client.iter().enumerate() {
        let mut text = std::fs::read_to_string(src.join(format!("node-{}.conf", n + 1))).unwrap();
        for (i, &r) in route.iter().enumerate() {
            text = text.replace(&format!(":{}", 6222 + i), &format!(":{r}"));
            text = text.replace(&format!("port: {}", 6222 + i), &format!("port: {r}"));
            text = text.replace(
                &format!("127.0.0.1:{}", 8222 + i),
                &format!("127.0.0.1:{}", free_port()),
            );
        }
        let data = tmp.path().join(format!("data/n{}", n + 1));
        text = text.replace(&format!("./data/n{}", n + 1), &data.to_string_lossy());
        // `include` paths are relative to the including file (server.conf in dir).
        let dir = tmp.path().join(format!("node{}", n + 1));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(&snippet, dir.join("operator.conf")).unwrap();
        servers.push(Server::with_options(
            ServerOptions::new().config(text).port(port).dir(dir),
        ));
    }
    let urls: Vec<String> = servers.iter().map(|s| s.url()).collect();
    cp.connect(&urls[0]).await.unwrap();

    // Wait (bounded) for the routes: a system-user request on node 3 sees 3 servers.
    let sys3 = async_nats::ConnectOptions::with_credentials(&cp.system_creds().unwrap())
        .unwrap()
        .connect(&urls[2])
        .await
        .unwrap();
    let formed = nats_harness::eventually(Duration::from_secs(10), || {
        let sys3 = sys3.clone();
        async move {
            let mut inbox = sys3.subscribe("_INBOX.cluster.ping").await.ok()?;
            sys3.publish_with_reply("$SYS.REQ.SERVER.PING", "_INBOX.cluster.ping", "".into())
                .await
                .ok()?;
            let mut n = 0;
            while let Ok(Some(_)) = tokio::time::timeout(
                Duration::from_millis(300),
                futures::StreamExt::next(&mut inbox),
            )
            .await
            {
                n += 1;
            }
            (n == 3).then_some(())
        }
    })
    .await;
    assert!(formed.is_some(), "cluster did not form");

    cp.set_server_url(&urls.join(",")).unwrap();
    cp.create_tenant("acme", Tier::Free).await.unwrap();
    let bundle = cp.issue_agent("acme", "a", "t").unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let on3 = async_nats::ConnectOptions::with_credentials(bundle.creds.as_deref().unwrap())
        .unwrap()
        .custom_inbox_prefix("tenant.acme._INBOX")
        .event_callback(move |e| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(format!("{e:?}"));
            }
        })
        .connect(&urls[2])
        .await
        .unwrap();
    let mut sub = on3.subscribe("tenant.acme.x").await.unwrap();
    on3.publish("tenant.acme.x", "hi".into()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), futures::StreamExt::next(&mut sub))
        .await
        .unwrap()
        .unwrap();

    cp.suspend_tenant("acme").await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(e) = rx.recv().await {
            if e.contains("Disconnected") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        closed,
        Ok(true),
        "node 3 did not apply the suspension pushed to node 1"
    );
    drop(servers);
}
