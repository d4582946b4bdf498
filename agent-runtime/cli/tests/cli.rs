//! The `agentbus` CLI, run as a process against the real nats-server that

// Test code: a failed set-up step should abort the test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `agentbus up` starts: admin commands through the embedded controller, their
//! `-o json` output, every documented exit code, concurrent creates, and a second
//! `up` refused.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_agentbus");

struct Up {
    child: Child,
}

impl Drop for Up {
    fn drop(&mut self) {
        // SIGTERM, as an operator would; agentbus stops its server cleanly.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn up(state: &Path) -> Up {
    let mut child = Command::new(BIN)
        .args(["up", "--state", state.to_str().unwrap(), "--port", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn agentbus up");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read url");
    let url = line.trim().to_string();
    assert!(url.starts_with("nats://127.0.0.1:"), "url line: {url:?}");
    Up { child }
}

/// `agentbus <group> --state S <rest...>`: admin commands find the local
/// installation's URL and admin creds through `--state`.
fn run(state: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).arg("--state").arg(state);
    cmd.stdin(Stdio::null()).output().expect("run agentbus")
}

fn ok(state: &Path, args: &[&str]) -> String {
    let out = run(state, args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(state: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let text = ok(state, &all);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {text}"))
}

/// The installation's URL list.
fn server_url(state: &Path) -> String {
    let facts: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("install.json")).unwrap()).unwrap();
    facts["urls"][0].as_str().unwrap().to_string()
}

/// Fails with exit `code` and one line on stderr containing `needle`.
fn fails(state: &Path, args: &[&str], code: i32, needle: &str) {
    let out = run(state, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
}

#[test]
fn admin_commands_json_exit_codes_and_a_second_up() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let server = up(&state);

    // A second `up` on the same state is refused and changes nothing.
    let before = std::fs::read(state.join("install.json")).unwrap();
    let second = Command::new(BIN)
        .args(["up", "--state", state.to_str().unwrap(), "--port", "0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        second.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(String::from_utf8_lossy(&second.stderr).contains("another `agentbus up`"));
    assert_eq!(std::fs::read(state.join("install.json")).unwrap(), before);

    let t = json(&state, &["tenant", "create", "acme", "--tier", "pro"]);
    assert_eq!(t["id"], "acme");
    assert_eq!(t["tier"], "pro");
    assert!(t["account"].as_str().unwrap().starts_with('A'));
    let list = json(&state, &["tenant", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let got = json(&state, &["tenant", "get", "acme"]);
    assert_eq!(got["quotas"]["max_agents"], 50);
    let upd = json(
        &state,
        &["tenant", "update", "acme", "--set", "max_agents=7"],
    );
    assert_eq!(upd["quotas"]["max_agents"], 7);
    let back = json(
        &state,
        &["tenant", "update", "acme", "--unset", "max_agents"],
    );
    assert_eq!(back["quotas"]["max_agents"], 50);
    let status = json(&state, &["status"]);
    // Every controller bucket, plus the other streams of the platform account.
    assert!(status["buckets"].as_array().unwrap().len() >= agentbus_control::store::BUCKETS.len());
    assert_eq!(status["controllers"], 1);

    // Every documented exit code, each by its case.
    fails(&state, &["tenant", "get", "nope"], 3, "nope");
    fails(&state, &["tenant", "create", "acme"], 4, "already exists");
    fails(
        &state,
        &["tenant", "create", "Bad!"],
        2,
        "invalid tenant id",
    );
    fails(&state, &["tenant", "activate", "acme"], 5, "already active");
    fails(
        &state,
        &["tenant", "update", "acme", "--set", "no_such=1"],
        2,
        "no_such",
    );
    fails(&state, &["tenant", "delete", "acme"], 2, "--yes");
    let out = Command::new(BIN)
        .args(["tenant", "list", "--url", "nats://127.0.0.1:1", "--creds"])
        .arg(state.join("admin.creds"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A format-1 state directory (before the controller) is refused, unchanged.
    let old_dir = tmp.path().join("old");
    std::fs::create_dir(&old_dir).unwrap();
    std::fs::write(old_dir.join("control.json"), b"{\"format\":1}").unwrap();
    let out = Command::new(BIN)
        .args(["up", "--state", old_dir.to_str().unwrap(), "--port", "0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("format-1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_dir(&old_dir).unwrap().count(),
        1,
        "the old directory was changed"
    );

    // Exit 2: a replica count the nodes (or JetStream) cannot keep is refused
    // before anything is created, not lowered to what fits.
    let fresh = tmp.path().join("fresh");
    for (args, needle) in [
        (
            vec!["--replicas", "3"],
            "--replicas 3: one node keeps 1 copy",
        ),
        (
            vec!["--replicas", "0"],
            "--replicas 0: one node keeps 1 copy",
        ),
        (
            vec!["--cluster", "3", "--replicas", "4"],
            "--replicas 4: must be 1 to 3 with 3 nodes",
        ),
    ] {
        let out = Command::new(BIN)
            .args(["up", "--state", fresh.to_str().unwrap(), "--port", "0"])
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!fresh.exists(), "{args:?} created the state directory");
    }
    // And a controller asked for more than JetStream keeps.
    let out = Command::new(BIN)
        .args([
            "controller",
            "--state",
            state.to_str().unwrap(),
            "--replicas",
            "6",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--replicas 6: JetStream keeps 1 to 5 copies"),
        "{stderr}"
    );

    // Exit 1: a broken installation (the KEK readable by others) stops a
    // controller before it touches anything.
    use std::os::unix::fs::PermissionsExt as _;
    let kek = state.join("kek");
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(BIN)
        .args(["controller", "--state", state.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));

    // 50 concurrent `agent create` runs for one tenant: none lost, none duplicated.
    let dir = tmp.path().join("bundles");
    std::fs::create_dir(&dir).unwrap();
    let children: Vec<_> = (0..50)
        .map(|i| {
            Command::new(BIN)
                .args(["agent", "create", "acme", &format!("a{i}"), "--out"])
                .arg(dir.join(format!("a{i}.json")))
                .arg("--state")
                .arg(&state)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let agents = json(&state, &["agent", "list", "acme"]);
    let names: std::collections::BTreeSet<String> = agents
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["agent"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.len(), 50);
    assert_eq!(agents.as_array().unwrap().len(), 50);
    // The bundle files are 0600 and the output path is never overwritten.
    let mode = std::fs::metadata(dir.join("a0.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    fails(
        &state,
        &[
            "agent",
            "create",
            "acme",
            "again",
            "--out",
            dir.join("a0.json").to_str().unwrap(),
        ],
        2,
        "already exists",
    );
    std::os::unix::fs::symlink(tmp.path().join("nowhere"), dir.join("link.json")).unwrap();
    fails(
        &state,
        &[
            "agent",
            "create",
            "acme",
            "link",
            "--out",
            dir.join("link.json").to_str().unwrap(),
        ],
        2,
        "already exists",
    );
    assert!(!tmp.path().join("nowhere").exists());
    // Every credential connects with a raw client; 50 concurrent `agent revoke`
    // runs revoke them all, and then every raw client is refused.
    let bundles: Vec<tenant_bus::CredentialBundle> = (0..50)
        .map(|i| tenant_bus::CredentialBundle::from_file(dir.join(format!("a{i}.json"))).unwrap())
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let connects = |bundles: &[tenant_bus::CredentialBundle]| -> Vec<bool> {
        rt.block_on(async {
            let mut out = Vec::new();
            for b in bundles {
                let opts =
                    async_nats::ConnectOptions::with_credentials(b.creds.as_deref().unwrap())
                        .unwrap()
                        .connection_timeout(Duration::from_secs(2));
                out.push(opts.connect(b.url.as_str()).await.is_ok());
            }
            out
        })
    };
    assert!(connects(&bundles).iter().all(|ok| *ok));
    let children: Vec<_> = (0..50)
        .map(|i| {
            Command::new(BIN)
                .args(["agent", "revoke", "acme", &format!("a{i}"), "--state"])
                .arg(&state)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let agents = json(&state, &["agent", "list", "acme"]);
    assert!(agents
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["revoked_at"].is_number()));
    let after = connects(&bundles);
    assert!(after.iter().all(|ok| !ok), "still connecting: {after:?}");

    // Admins and single agents in JSON too.
    let a = json(&state, &["agent", "get", "acme", "a2"]);
    assert_eq!(a["agent"], "a2");
    assert_eq!(a["tenant"], "acme");
    let creds = tmp.path().join("ops.creds");
    let made = json(
        &state,
        &[
            "admin",
            "create",
            "ops",
            "--role",
            "tenant-admin",
            "--tenant",
            "acme",
            "--out",
            creds.to_str().unwrap(),
        ],
    );
    assert_eq!(made["admin"]["role"], "tenant-admin");
    let admins = json(&state, &["admin", "list"]);
    assert_eq!(admins.as_array().unwrap().len(), 2);
    // The tenant-admin's own creds work for its tenant, and are refused elsewhere.
    let mine = Command::new(BIN)
        .args([
            "agent",
            "list",
            "acme",
            "-o",
            "json",
            "--url",
            &server_url(&state),
            "--creds",
        ])
        .arg(&creds)
        .output()
        .unwrap();
    assert!(
        mine.status.success(),
        "{}",
        String::from_utf8_lossy(&mine.stderr)
    );
    let other = Command::new(BIN)
        .args(["tenant", "list", "--url", &server_url(&state), "--creds"])
        .arg(&creds)
        .output()
        .unwrap();
    assert!(!other.status.success());
    json(&state, &["admin", "revoke", "ops"]);

    // Delete leaves nothing; the id can be created again.
    json(&state, &["tenant", "delete", "acme", "--yes"]);
    fails(&state, &["tenant", "get", "acme"], 3, "acme");
    json(&state, &["tenant", "create", "acme"]);
    assert!(json(&state, &["agent", "list", "acme"])
        .as_array()
        .unwrap()
        .is_empty());

    // Completions render.
    let comp = Command::new(BIN)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(comp.status.success() && !comp.stdout.is_empty());
    drop(server);

    // The single server's data is not hidden behind an empty cluster: `up
    // --cluster 3` on this directory is refused, creating nothing, and the
    // single server still serves acme.
    up_refused(&state, &["--cluster", "3"], "single server's data");
    assert!(
        !state.join("cluster").exists(),
        "a cluster store was created"
    );
    let server = up(&state);
    assert_eq!(json(&state, &["tenant", "get", "acme"])["id"], "acme");
    drop(server);
}

/// `agentbus up --state S --port 0 ARGS` exits 5 at once with one line on
/// stderr containing `needle`.
fn up_refused(state: &Path, args: &[&str], needle: &str) {
    let out = Command::new(BIN)
        .args(["up", "--state", state.to_str().unwrap(), "--port", "0"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{args:?}: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: {stderr}");
}

#[test]
fn up_cluster_3_serves_with_r3_buckets_and_a_url_list() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mut child = Command::new(BIN)
        .args([
            "up",
            "--state",
            state.to_str().unwrap(),
            "--port",
            "0",
            "--cluster",
            "3",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn agentbus up --cluster 3");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read urls");
    let server = Up { child };
    let urls: Vec<&str> = line.trim().split(',').collect();
    assert_eq!(urls.len(), 3, "url line: {line:?}");
    json(&state, &["tenant", "create", "acme"]);
    let status = json(&state, &["status"]);
    for b in status["buckets"].as_array().unwrap() {
        assert_eq!(b["replicas"], 3, "{b}");
    }
    assert_eq!(status["urls"].as_array().unwrap().len(), 3);
    drop(server);

    // Nor is the cluster's hidden behind an empty single server, or stranded
    // by fewer nodes than hold it.
    up_refused(&state, &[], "3-node cluster's data");
    up_refused(&state, &["--cluster", "2"], "lose their quorum");
    assert!(
        std::fs::read_dir(state.join("jetstream")).map_or(true, |mut d| d.next().is_none()),
        "the single server's store was used"
    );
}

#[test]
fn up_restarts_a_nats_server_that_dies_and_the_controller_serves_again() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let server = up(&state);
    json(&state, &["tenant", "create", "acme"]);
    // The nats-server `up` started (its only child process).
    let children = Command::new("pgrep")
        .args(["-P", &server.child.id().to_string(), "nats-server"])
        .output()
        .expect("pgrep");
    let pids: Vec<String> = String::from_utf8_lossy(&children.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(pids.len(), 1, "children of up: {pids:?}");
    let status = Command::new("kill")
        .args(["-KILL", &pids[0]])
        .status()
        .unwrap();
    assert!(status.success());
    // Restarted on the same port and store: the record is still there.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut back = None;
    while Instant::now() < deadline {
        let out = run(&state, &["tenant", "get", "acme", "-o", "json"]);
        if out.status.success() {
            back = Some(Instant::now());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        back.is_some(),
        "the control plane did not come back after the server was killed"
    );
    let again = Command::new("pgrep")
        .args(["-P", &server.child.id().to_string(), "nats-server"])
        .output()
        .unwrap();
    let new_pids = String::from_utf8_lossy(&again.stdout).trim().to_string();
    assert!(
        !new_pids.is_empty() && new_pids != pids[0],
        "no new server: {new_pids:?}"
    );
    drop(server);
}

#[test]
fn up_cluster_3_with_tls_routes() {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("skipped: openssl is not installed (needed to make a test certificate)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // A CA and a route certificate for 127.0.0.1, signed by it.
    let sh = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(d)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=agentbus test CA",
    ]);
    sh(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "route.key",
        "-out",
        "route.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    sh(&[
        "x509",
        "-req",
        "-in",
        "route.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "route.pem",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    ]);
    let state = d.join("state");
    let mut child = Command::new(BIN)
        .args([
            "up",
            "--state",
            state.to_str().unwrap(),
            "--port",
            "0",
            "--cluster",
            "3",
        ])
        .arg("--route-cert")
        .arg(d.join("route.pem"))
        .arg("--route-key")
        .arg(d.join("route.key"))
        .arg("--route-ca")
        .arg(d.join("ca.pem"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read urls");
    let server = Up { child };
    assert_eq!(line.trim().split(',').count(), 3, "url line: {line:?}");
    // The routes carry traffic (R3 buckets need them): the control plane works.
    json(&state, &["tenant", "create", "acme"]);
    let status = json(&state, &["status"]);
    assert!(status["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["replicas"] == 3));
    let conf = std::fs::read_dir(state.join("cluster"))
        .unwrap()
        .filter_map(|e| e.ok())
        .find_map(|e| std::fs::read_to_string(e.path().join("server.conf")).ok());
    let conf = conf.expect("a node's server.conf");
    assert!(conf.contains("tls"), "no tls block in the node config");
    drop(server);
}

#[test]
fn every_command_has_help() {
    for args in [
        vec!["--help"],
        vec!["up", "--help"],
        vec!["tenant", "--help"],
        vec!["tenant", "create", "--help"],
        vec!["tenant", "update", "--help"],
        vec!["agent", "create", "--help"],
        vec!["agent", "revoke", "--help"],
        vec!["agent", "list", "--help"],
        vec!["admin", "create", "--help"],
        vec!["controller", "--help"],
        vec!["import", "--help"],
        vec!["status", "--help"],
        vec!["reply", "--help"],
        vec!["tenant", "delete", "--help"],
        vec!["tenant", "rotate-key", "--help"],
        vec!["pub", "--help"],
        vec!["sub", "--help"],
        vec!["request", "--help"],
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage:"), "{args:?}");
    }
}

// ---------------------------------------------------------------------------
// Messaging as an agent (`pub`, `sub`, `request`, `reply`) against a plain
// nats-server (no auth), with credential bundles that carry no `creds`: these do
// not depend on the controller.
// ---------------------------------------------------------------------------

mod messaging {
    use super::BIN;
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Output, Stdio};
    use std::time::{Duration, Instant};

    use agentbus_control::local_server::{LocalServer, ServerOptions};
    use tenant_bus::{AgentId, CredentialBundle, MasterSecret, TenantId};

    fn server(config: &str) -> LocalServer {
        let mut options = ServerOptions::new();
        if !config.is_empty() {
            options = options.config(config);
        }
        LocalServer::start(options).expect("nats-server")
    }

    /// A bundle of agent `agent` of tenant acme with `master`'s key, no creds.
    fn bundle(dir: &Path, url: &str, master: &MasterSecret, agent: &str) -> PathBuf {
        let tenant = TenantId::new("acme").unwrap();
        let b = CredentialBundle {
            url: url.to_string(),
            tenant: tenant.clone(),
            agent: AgentId::new(agent).unwrap(),
            creds: None,
            keys: master.key_set(&tenant, [1], 1).unwrap(),
            placement: Default::default(),
        };
        let path = dir.join(format!("{agent}-{}.json", rand_suffix()));
        b.write_to_file(&path).unwrap();
        path
    }

    fn rand_suffix() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    }

    /// Spawns a listening command and waits (at most 10 s) for its stderr line
    /// that says it listens; returns the child with stdout piped.
    fn listening(args: &[&str], marker: &str) -> Child {
        listening_with_stderr(args, marker).0
    }

    /// [`listening`], also returning everything the child writes to stderr.
    fn listening_with_stderr(
        args: &[&str],
        marker: &str,
    ) -> (Child, std::sync::Arc<std::sync::Mutex<String>>) {
        let collected = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = collected.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                sink.lock().unwrap().push_str(&line);
                let _ = tx.send(line.clone());
                line.clear();
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(marker) => break,
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    std::thread::sleep(Duration::from_millis(100));
                    panic!(
                        "{args:?} did not print {marker:?} in 10 s; stderr: {}",
                        collected.lock().unwrap()
                    );
                }
            }
        }
        (child, collected)
    }

    /// Waits (at most `limit`) for `child` to exit.
    fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("process did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn agentbus(args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn stderr_of(out: &Output) -> String {
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    #[test]
    fn reply_answers_requests_echo_and_fixed() {
        let srv = server("");
        let dir = tempfile::tempdir().unwrap();
        let master = MasterSecret::generate().unwrap();
        let svc = bundle(dir.path(), &srv.url(), &master, "svc");
        let client = bundle(dir.path(), &srv.url(), &master, "client");
        let (svc, client) = (svc.to_str().unwrap(), client.to_str().unwrap());

        let mut echo = listening(
            &["reply", "--creds", svc, "svc.summarize", "--count", "1"],
            "answering requests",
        );
        let out = agentbus(&["request", "--creds", client, "svc.summarize", "some text"]);
        assert!(out.status.success(), "{}", stderr_of(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "some text");
        assert!(wait_exit(&mut echo, Duration::from_secs(10)).success());
        let mut printed = String::new();
        echo.stdout
            .take()
            .unwrap()
            .read_to_string(&mut printed)
            .unwrap();
        assert!(
            printed.contains("answered svc.summarize from client"),
            "{printed}"
        );

        let mut fixed = listening(
            &[
                "reply", "--creds", svc, "svc.>", "--data", "done", "--count", "1",
            ],
            "answering requests",
        );
        let out = agentbus(&["request", "--creds", client, "svc.any", "x"]);
        assert!(out.status.success(), "{}", stderr_of(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "done");
        assert!(wait_exit(&mut fixed, Duration::from_secs(10)).success());
    }

    #[test]
    fn a_reply_that_fails_verification_is_its_own_error() {
        let srv = server("");
        let dir = tempfile::tempdir().unwrap();
        // The responder seals with another master secret: the requester drops it.
        let svc = bundle(
            dir.path(),
            &srv.url(),
            &MasterSecret::generate().unwrap(),
            "svc",
        );
        let client = bundle(
            dir.path(),
            &srv.url(),
            &MasterSecret::generate().unwrap(),
            "client",
        );
        let mut responder = listening(
            &["reply", "--creds", svc.to_str().unwrap(), "svc.x"],
            "answering requests",
        );
        let out = agentbus(&[
            "request",
            "--creds",
            client.to_str().unwrap(),
            "svc.x",
            "hi",
            "--timeout-ms",
            "1500",
        ]);
        let _ = responder.kill();
        let _ = responder.wait();
        let err = stderr_of(&out);
        assert!(!out.status.success());
        // The responder cannot open the request either (another key), so nothing
        // comes back: a plain timeout, not a dropped reply.
        assert!(err.contains("no reply"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");

        // A raw NATS client echoes the sealed request bytes to the reply inbox: a
        // reply arrives, but its seal is bound to another subject, so the
        // requester drops it as unverifiable and says so.
        let raw = std::thread::spawn({
            let url = srv.url();
            move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    use futures::StreamExt as _;
                    let c = async_nats::connect(url).await.unwrap();
                    let mut sub = c.subscribe("tenant.acme.svc.raw").await.unwrap();
                    c.flush().await.unwrap();
                    if let Ok(Some(m)) =
                        tokio::time::timeout(Duration::from_secs(10), sub.next()).await
                    {
                        if let Some(reply) = m.reply {
                            c.publish(reply, m.payload).await.unwrap();
                            c.flush().await.unwrap();
                        }
                    }
                })
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        let out = agentbus(&[
            "request",
            "--creds",
            client.to_str().unwrap(),
            "svc.raw",
            "hi",
            "--timeout-ms",
            "2000",
        ]);
        raw.join().unwrap();
        let err = stderr_of(&out);
        assert!(!out.status.success());
        assert!(err.contains("arrived but was dropped"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }

    #[test]
    fn messaging_commands_print_json_with_o_json() {
        let srv = server("");
        let dir = tempfile::tempdir().unwrap();
        let master = MasterSecret::generate().unwrap();
        let a = bundle(dir.path(), &srv.url(), &master, "a");
        let b = bundle(dir.path(), &srv.url(), &master, "b");
        let mut sub = listening(
            &[
                "sub",
                "--creds",
                b.to_str().unwrap(),
                "jobs.>",
                "--count",
                "1",
                "-o",
                "json",
            ],
            "listening on",
        );
        let out = Command::new(BIN)
            .args([
                "pub",
                "--creds",
                a.to_str().unwrap(),
                "jobs.new",
                "hello",
                "-o",
                "json",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
        let published: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(published["subject"], "jobs.new");
        assert!(wait_exit(&mut sub, Duration::from_secs(10)).success());
        let mut printed = String::new();
        sub.stdout
            .take()
            .unwrap()
            .read_to_string(&mut printed)
            .unwrap();
        let line: serde_json::Value = serde_json::from_str(printed.trim()).unwrap();
        assert_eq!(line["subject"], "jobs.new");
        assert_eq!(line["payload"], "hello");
        assert_eq!(line["sender"], "a");
        assert_eq!(line["tenant"], "acme");
        assert_eq!(line["msg_id"], published["msg_id"]);
    }

    #[test]
    fn pub_reads_the_payload_from_stdin() {
        let srv = server("");
        let dir = tempfile::tempdir().unwrap();
        let master = MasterSecret::generate().unwrap();
        let a = bundle(dir.path(), &srv.url(), &master, "a");
        let b = bundle(dir.path(), &srv.url(), &master, "b");
        let mut sub = listening(
            &[
                "sub",
                "--creds",
                b.to_str().unwrap(),
                "jobs.>",
                "--count",
                "1",
            ],
            "listening on",
        );
        let mut publisher = Command::new(BIN)
            .args(["pub", "--creds", a.to_str().unwrap(), "jobs.new", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        publisher
            .stdin
            .take()
            .unwrap()
            .write_all(b"{\"from\": \"stdin\"}")
            .unwrap();
        let out = publisher.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
        assert!(wait_exit(&mut sub, Duration::from_secs(10)).success());
        let mut printed = String::new();
        sub.stdout
            .take()
            .unwrap()
            .read_to_string(&mut printed)
            .unwrap();
        assert!(
            printed.contains("jobs.new from a: {\"from\": \"stdin\"}"),
            "{printed}"
        );
    }

    #[test]
    fn sub_into_a_closed_pipe_exits_zero_without_a_panic() {
        let srv = server("");
        let dir = tempfile::tempdir().unwrap();
        let master = MasterSecret::generate().unwrap();
        let a = bundle(dir.path(), &srv.url(), &master, "a");
        let b = bundle(dir.path(), &srv.url(), &master, "b");
        let mut sub = Command::new(BIN)
            .args([
                "sub",
                "--creds",
                b.to_str().unwrap(),
                "feed.>",
                "--count",
                "0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // `| head -1`: read one line, then close the pipe.
        let stdout = sub.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).unwrap();
            line
        });
        let publish = |i: usize| {
            let out = agentbus(&[
                "pub",
                "--creds",
                a.to_str().unwrap(),
                "feed.item",
                &format!("item {i}"),
            ]);
            assert!(out.status.success(), "{}", stderr_of(&out));
        };
        // Publish until the reader has its line (the subscription becomes live
        // at some point after spawning), bounded.
        let mut i = 0;
        while !reader.is_finished() {
            assert!(i < 100, "sub printed nothing");
            publish(i);
            i += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        let line = reader.join().unwrap();
        assert!(line.contains("feed.item from a"), "{line}");
        // The pipe is closed now; the next lines hit EPIPE.
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = sub.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "sub still running after EPIPE");
            publish(i);
            i += 1;
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut err = String::new();
        sub.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert_eq!(status.code(), Some(0), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }

    #[test]
    fn an_oversized_pub_is_its_own_error_at_once() {
        let srv = server("max_payload: 1024\n");
        let dir = tempfile::tempdir().unwrap();
        let master = MasterSecret::generate().unwrap();
        let a = bundle(dir.path(), &srv.url(), &master, "a");
        // Over the limit as data, and under it as data but over it once sealed.
        for size in [4000, 1010] {
            let data = "x".repeat(size);
            let started = Instant::now();
            let out = agentbus(&["pub", "--creds", a.to_str().unwrap(), "big", &data]);
            let err = stderr_of(&out);
            assert_eq!(out.status.code(), Some(2), "{size}: {err}");
            assert!(err.contains("payload too large"), "{size}: {err}");
            assert!(err.contains("1024"), "{size}: {err}");
            assert_eq!(err.trim().lines().count(), 1, "{size}: {err}");
            assert!(started.elapsed() < Duration::from_secs(5), "{size}: slow");
        }
        // A small one still goes through.
        let out = agentbus(&["pub", "--creds", a.to_str().unwrap(), "small", "ok"]);
        assert!(out.status.success(), "{}", stderr_of(&out));
    }

    #[test]
    fn a_full_server_is_reported_as_a_connection_limit() {
        let srv = server("max_connections: 1\n");
        let dir = tempfile::tempdir().unwrap();
        let master = MasterSecret::generate().unwrap();
        let a = bundle(dir.path(), &srv.url(), &master, "a");
        let b = bundle(dir.path(), &srv.url(), &master, "b");
        let mut holder = listening(
            &["sub", "--creds", b.to_str().unwrap(), "x"],
            "listening on",
        );
        let out = agentbus(&["pub", "--creds", a.to_str().unwrap(), "x", "hi"]);
        let _ = holder.kill();
        let _ = holder.wait();
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(5), "{err}");
        assert!(err.contains("connection limit"), "{err}");
        assert!(!err.contains("no server running"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }

    #[test]
    fn sub_stops_with_one_line_when_the_server_revokes_its_authorization() {
        // Anonymous clients are user `agent` (no_auth_user); the bundle has no
        // creds. The reload below removes that user: the server closes the
        // connection for authorization and refuses every reconnect.
        let dir = tempfile::tempdir().unwrap();
        let mut srv = LocalServer::start(
            ServerOptions::new()
                .config(
                    "accounts { A { users: [ { user: agent, password: first } ] } }\n\
                     no_auth_user: agent\n",
                )
                .dir(dir.path().join("server")),
        )
        .unwrap();
        let url = srv.url();
        let master = MasterSecret::generate().unwrap();
        let b = bundle(dir.path(), &url, &master, "b");
        let (mut sub, stderr) = listening_with_stderr(
            &["sub", "--creds", b.to_str().unwrap(), "x"],
            "listening on",
        );
        // Remove the user and reload.
        std::fs::write(
            srv.dir().join("server.conf"),
            "accounts { A { users: [ { user: other, password: second } ] } }\n",
        )
        .unwrap();
        let pid = srv.pid().unwrap();
        assert!(Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success());
        let status = wait_exit(&mut sub, Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(100));
        let err = stderr.lock().unwrap().clone();
        assert_eq!(status.code(), Some(5), "{err}");
        // One line after the listening note: the reason, no stream of warnings.
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| !l.contains("listening on"))
            .collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(lines[0].contains("closed the connection"), "{err}");
        assert!(!err.contains('\u{1b}'), "colour codes on a pipe: {err:?}");
        srv.stop();
    }
}

/// A raw nats-py client (no agentbus code) that uses a `.creds` file and the
/// tenant's inbox prefix: pub/sub and request/reply inside `tenant.<id>.`, and a
/// publish to another tenant refused by the server.
/// Arguments: URL(S) CREDS INBOX_PREFIX TENANT.
const RAW_NATS_PY: &str = r#"
import asyncio, sys
import nats

async def main():
    url, creds, inbox, tenant = sys.argv[1:5]
    errors = []
    async def on_error(e):
        errors.append(str(e))
    nc = await nats.connect(url.split(","), user_credentials=creds, inbox_prefix=inbox,
                            error_cb=on_error, allow_reconnect=False, connect_timeout=5)
    base = f"tenant.{tenant}"
    sub = await nc.subscribe(f"{base}.x")
    await nc.publish(f"{base}.x", b"raw hello")
    msg = await sub.next_msg(timeout=5)
    assert msg.data == b"raw hello", msg.data
    async def echo(m):
        await m.respond(b"echo:" + m.data)
    await nc.subscribe(f"{base}.svc", cb=echo)
    reply = await nc.request(f"{base}.svc", b"ping", timeout=5)
    assert reply.data == b"echo:ping", reply.data
    await nc.publish("tenant.globex.x", b"escape")
    await nc.flush(timeout=5)
    for _ in range(50):
        if any("permissions violation" in e.lower() for e in errors):
            break
        await asyncio.sleep(0.1)
    assert any("permissions violation" in e.lower() for e in errors), errors
    await nc.close()
    print("RAW OK")

asyncio.run(main())
"#;

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// `.tools/venv/bin/python` if it has nats-py with nkeys (`scripts/test-python`
/// installs them).
fn python_with_nats() -> Option<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let py = root.join(".tools/venv/bin/python");
    let ok = Command::new(&py)
        .args(["-c", "import nats, nkeys"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok.then_some(py)
}

#[test]
fn agent_create_writes_bundles_creds_files_and_nats_contexts() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let server = up(&state);
    json(&state, &["tenant", "create", "acme", "--tier", "pro"]);
    let dir = tmp.path().join("out");
    std::fs::create_dir(&dir).unwrap();
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();

    // bundle, the default.
    let b = json(
        &state,
        &["agent", "create", "acme", "b1", "--out", &p("b1.json")],
    );
    assert_eq!(b["format"], "bundle");
    assert_eq!(b["agent"]["agent"], "b1");
    assert_eq!(mode(&dir.join("b1.json")), 0o600);
    let bundle: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("b1.json")).unwrap()).unwrap();
    let url = bundle["url"].as_str().unwrap().to_string();
    assert!(bundle["keys"]["keys"].is_array());

    // creds: exactly the bundle's kind of `.creds` text.
    let c = json(
        &state,
        &[
            "agent",
            "create",
            "acme",
            "c1",
            "--format",
            "creds",
            "--out",
            &p("c1.creds"),
        ],
    );
    assert_eq!(c["format"], "creds");
    assert_eq!(mode(&dir.join("c1.creds")), 0o600);
    let creds = std::fs::read_to_string(dir.join("c1.creds")).unwrap();
    assert!(creds.contains("-----BEGIN NATS USER JWT-----"), "{creds}");
    assert!(creds.contains("-----BEGIN USER NKEY SEED-----"), "{creds}");
    assert!(!creds.trim_start().starts_with('{'));

    // context into a directory that does not exist yet (created 0700).
    let ctx_dir = tmp.path().join("contexts");
    let x = json(
        &state,
        &[
            "agent",
            "create",
            "acme",
            "x1",
            "--format",
            "context",
            "--out",
            ctx_dir.to_str().unwrap(),
        ],
    );
    assert_eq!(x["format"], "context");
    assert_eq!(x["context"], "acme.x1");
    assert_eq!(mode(&ctx_dir), 0o700);
    let ctx_json = ctx_dir.join("acme.x1.json");
    let ctx_creds = ctx_dir.join("acme.x1.creds");
    assert_eq!(x["out"], ctx_json.to_str().unwrap());
    assert_eq!(mode(&ctx_json), 0o600);
    assert_eq!(mode(&ctx_creds), 0o600);
    let ctx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&ctx_json).unwrap()).unwrap();
    assert_eq!(ctx["url"], url.as_str());
    assert_eq!(ctx["creds"], ctx_creds.to_str().unwrap());
    assert!(Path::new(ctx["creds"].as_str().unwrap()).is_absolute());
    assert_eq!(ctx["inbox_prefix"], "tenant.acme._INBOX");
    assert!(std::fs::read_to_string(&ctx_creds)
        .unwrap()
        .contains("-----BEGIN NATS USER JWT-----"));

    // --name; a taken name is never overwritten and issues nothing.
    let n = json(
        &state,
        &[
            "agent",
            "create",
            "acme",
            "x2",
            "--format",
            "context",
            "--name",
            "ops",
            "--out",
            ctx_dir.to_str().unwrap(),
        ],
    );
    assert_eq!(n["context"], "ops");
    let ops_before = std::fs::read(ctx_dir.join("ops.json")).unwrap();
    fails(
        &state,
        &[
            "agent",
            "create",
            "acme",
            "x3",
            "--format",
            "context",
            "--name",
            "ops",
            "--out",
            ctx_dir.to_str().unwrap(),
        ],
        2,
        "already exists",
    );
    assert_eq!(std::fs::read(ctx_dir.join("ops.json")).unwrap(), ops_before);
    fails(&state, &["agent", "get", "acme", "x3"], 3, "x3");
    // Only the JSON is taken: the creds file just claimed is removed again.
    std::fs::write(ctx_dir.join("half.json"), b"{}").unwrap();
    fails(
        &state,
        &[
            "agent",
            "create",
            "acme",
            "x4",
            "--format",
            "context",
            "--name",
            "half",
            "--out",
            ctx_dir.to_str().unwrap(),
        ],
        2,
        "already exists",
    );
    assert!(!ctx_dir.join("half.creds").exists());
    // A symlink in the way is not followed.
    std::os::unix::fs::symlink(tmp.path().join("nowhere"), ctx_dir.join("ln.creds")).unwrap();
    fails(
        &state,
        &[
            "agent",
            "create",
            "acme",
            "x5",
            "--format",
            "context",
            "--name",
            "ln",
            "--out",
            ctx_dir.to_str().unwrap(),
        ],
        2,
        "already exists",
    );
    assert!(!tmp.path().join("nowhere").exists());
    // Usage errors.
    fails(
        &state,
        &["agent", "create", "acme", "x6", "--format", "creds"],
        2,
        "--out",
    );
    fails(
        &state,
        &[
            "agent",
            "create",
            "acme",
            "x6",
            "--name",
            "n",
            "--out",
            &p("x6.json"),
        ],
        2,
        "--name",
    );
    fails(
        &state,
        &[
            "agent",
            "create",
            "acme",
            "x6",
            "--format",
            "context",
            "--name",
            "../up",
            "--out",
            ctx_dir.to_str().unwrap(),
        ],
        2,
        "invalid context name",
    );
    fails(
        &state,
        &[
            "agent",
            "create",
            "acme",
            "x6",
            "--format",
            "context",
            "--out",
            &p("b1.json"),
        ],
        2,
        "not a directory",
    );

    // The default directory is the nats CLI's: $XDG_CONFIG_HOME, else ~/.config.
    let home = tmp.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let out = Command::new(BIN)
        .args(["agent", "create", "acme", "d1", "--format", "context"])
        .arg("--state")
        .arg(&state)
        .env("HOME", &home)
        .env_remove("XDG_CONFIG_HOME")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d1 = home.join(".config/nats/context/acme.d1.json");
    assert_eq!(mode(&d1), 0o600);
    assert!(String::from_utf8_lossy(&out.stdout).contains("nats --context acme.d1"));
    let xdg = tmp.path().join("xdg");
    let out = Command::new(BIN)
        .args(["agent", "create", "acme", "d2", "--format", "context"])
        .arg("--state")
        .arg(&state)
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", &xdg)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(&xdg.join("nats/context/acme.d2.json")), 0o600);

    // A raw NATS client works with the `.creds` file and with the context.
    let Some(py) = python_with_nats() else {
        eprintln!(
            "note: .tools/venv/bin/python lacks nats-py[nkeys] (run scripts/test-python); \
             skipping the raw-client checks"
        );
        drop(server);
        return;
    };
    let script = tmp.path().join("raw.py");
    std::fs::write(&script, RAW_NATS_PY).unwrap();
    for (creds, inbox) in [
        (dir.join("c1.creds"), "tenant.acme._INBOX".to_string()),
        (
            ctx_creds.clone(),
            ctx["inbox_prefix"].as_str().unwrap().to_string(),
        ),
    ] {
        let out = Command::new(&py)
            .arg(&script)
            .arg(ctx["url"].as_str().unwrap())
            .arg(&creds)
            .arg(&inbox)
            .arg("acme")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("RAW OK"),
            "{}: {}{}",
            creds.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    drop(server);
}

/// `up --cluster 3 --from-single`: a single server's tenants, agents,
/// budgets with their spending, audit log and each tenant's streams reach
/// the new cluster; the old store is moved aside, not deleted.
#[test]
fn up_from_single_copies_a_single_servers_data_into_a_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let dir = tmp.path();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // The single server: a tenant, an agent with a state value and three
    // queued tasks, and a budget with 300 spent.
    let server = up(&state);
    json(&state, &["tenant", "create", "acme"]);
    let bundle_path = dir.join("bot.json");
    ok(
        &state,
        &[
            "agent",
            "create",
            "acme",
            "bot",
            "--out",
            bundle_path.to_str().unwrap(),
        ],
    );
    json(
        &state,
        &[
            "budget",
            "set",
            "acme",
            "llm",
            "--unit",
            "llm.tokens",
            "--hard",
            "1000",
        ],
    );
    let mut bundle = tenant_bus::CredentialBundle::from_file(&bundle_path).unwrap();
    rt.block_on(async {
        let ns = tenant_bus::TenantNamespace::connect(&bundle).await.unwrap();
        ns.kv("sessions")
            .await
            .unwrap()
            .put("s1", b"kept")
            .await
            .unwrap();
        let account = agentbus_control::keys::bundle_account(&bundle).unwrap();
        assert!(
            agentbus_control::keys::report_usage(&ns, &account, "llm.tokens", 300, "r-1")
                .await
                .unwrap()
        );
        // A raw client of the agent's creds (its inboxes are under its tenant).
        let raw = async_nats::ConnectOptions::with_credentials(bundle.creds.as_deref().unwrap())
            .unwrap()
            .custom_inbox_prefix("tenant.acme._INBOX")
            .connect(bundle.url.as_str())
            .await
            .unwrap();
        let js = async_nats::jetstream::new(raw);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "TASKS".into(),
            subjects: vec!["tenant.acme.tasks.queue.>".into()],
            retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .unwrap();
        for i in 0..3 {
            js.publish("tenant.acme.tasks.queue.resize", format!("task {i}").into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
    drop(server);

    // Without --cluster the flag is a usage error; into a cluster it copies.
    let out = Command::new(BIN)
        .args(["up", "--state", state.to_str().unwrap(), "--from-single"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut child = Command::new(BIN)
        .args([
            "up",
            "--state",
            state.to_str().unwrap(),
            "--port",
            "0",
            "--cluster",
            "3",
            "--from-single",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("up.err")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let cluster = Up { child };
    let urls = line.trim().to_string();
    let progress = std::fs::read_to_string(dir.join("up.err")).unwrap();
    assert_eq!(
        urls.split(',').count(),
        3,
        "url line: {line:?}; stderr: {progress}"
    );
    // It said what it copied.
    assert!(
        progress.contains("copied tenant acme stream TASKS (3 messages)"),
        "{progress}"
    );

    // Everything is there, replicated three times.
    assert_eq!(json(&state, &["tenant", "get", "acme"])["id"], "acme");
    let agents = json(&state, &["agent", "list", "acme"]);
    assert_eq!(agents.as_array().unwrap().len(), 1, "{agents}");
    let budgets = json(&state, &["budget", "list", "acme"]);
    assert_eq!(budgets[0]["spent"], 300, "{budgets}");
    let status = json(&state, &["status"]);
    for b in status["buckets"].as_array().unwrap() {
        assert_eq!(b["replicas"], 3, "{b}");
    }
    let verify = run(&state, &["audit", "verify", "acme"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    bundle.url = urls.clone();
    rt.block_on(async {
        let ns = tenant_bus::TenantNamespace::connect(&bundle).await.unwrap();
        let kv = ns.kv("sessions").await.unwrap();
        assert_eq!(kv.get("s1").await.unwrap().value.as_ref(), b"kept");
        let raw = async_nats::ConnectOptions::with_credentials(bundle.creds.as_deref().unwrap())
            .unwrap()
            .custom_inbox_prefix("tenant.acme._INBOX")
            .connect(urls.split(',').collect::<Vec<_>>())
            .await
            .unwrap();
        let js = async_nats::jetstream::new(raw);
        let info = js.get_stream("TASKS").await.unwrap().cached_info().clone();
        assert_eq!(info.state.messages, 3);
        assert_eq!(info.config.num_replicas, 3);
        // The cap still holds with the copied spending: 800 more do not fit.
        let account = agentbus_control::keys::bundle_account(&bundle).unwrap();
        let err = agentbus_control::keys::report_usage(&ns, &account, "llm.tokens", 800, "r-2")
            .await
            .unwrap_err();
        assert_eq!(
            err.code,
            agentbus_control::api::ErrorCode::BudgetExceeded,
            "{err}"
        );
    });
    drop(cluster);

    // The old store was moved aside, not deleted; the directory now holds a
    // cluster's data, and a second copy is refused.
    let aside: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("jetstream.copied-")
        })
        .collect();
    assert_eq!(aside.len(), 1);
    assert!(std::fs::read_dir(aside[0].path()).unwrap().next().is_some());
    up_refused(&state, &[], "3-node cluster's data");
    up_refused(
        &state,
        &["--cluster", "3", "--from-single"],
        "no single server's data",
    );
}

/// `agentbus import`: servers not run by `agentbus up` (here a hand-built
/// three-node cluster of the same installation) take a single server's data
/// before any controller serves them; a controller then serves it.
#[test]
fn import_copies_a_deployment_into_servers_no_controller_has_served() {
    use agentbus_control::local_server::{
        ClusterOptions, LocalCluster, LocalServer, ServerOptions,
    };
    use agentbus_control::server_config::{render_operator_snippet, render_resolver_block};
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = up(&state);
    json(&state, &["tenant", "create", "acme"]);
    let bundle_path = tmp.path().join("bot.json");
    ok(
        &state,
        &[
            "agent",
            "create",
            "acme",
            "bot",
            "--out",
            bundle_path.to_str().unwrap(),
        ],
    );
    let mut bundle = tenant_bus::CredentialBundle::from_file(&bundle_path).unwrap();
    rt.block_on(async {
        let ns = tenant_bus::TenantNamespace::connect(&bundle).await.unwrap();
        ns.kv("sessions")
            .await
            .unwrap()
            .put("s1", b"kept")
            .await
            .unwrap();
    });
    drop(server);

    // The old server again, and a new cluster of the same installation.
    let install = agentbus_control::Installation::open(&state).unwrap();
    let mut options = install
        .default_server_options()
        .listen("127.0.0.1".to_string(), 0);
    options.server_name = "agentbus".to_string();
    let mut old = LocalServer::start(
        ServerOptions::new()
            .config(install.server_config(&options))
            .dir(state.join("server")),
    )
    .unwrap();
    let cluster = rt.block_on(async {
        LocalCluster::start(
            ClusterOptions::new()
                .nodes(3)
                .config(render_operator_snippet(&install.operator_facts()))
                .node_config(|_, dir| render_resolver_block(&dir.join("resolver")))
                .probe_creds(install.creds("sys.creds").unwrap())
                .dir(tmp.path().join("cluster")),
        )
        .await
        .unwrap()
    });
    let urls = cluster.urls();
    let out = Command::new(BIN)
        .args([
            "import",
            "--state",
            state.to_str().unwrap(),
            "--from",
            &old.url(),
        ])
        .args(["--url", &urls, "--replicas", "3", "-o", "json"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(done["platform_streams"].as_u64().unwrap() >= 10, "{done}");
    assert_eq!(done["tenant_streams"], 1, "{done}: {stderr}");
    assert!(
        stderr.contains("copied tenant acme stream KV_STATE (1 messages)"),
        "{stderr}"
    );
    // A second import into the same servers is refused: never merged.
    let again = Command::new(BIN)
        .args([
            "import",
            "--state",
            state.to_str().unwrap(),
            "--from",
            &old.url(),
        ])
        .args(["--url", &urls])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("never merged"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    old.shutdown(Duration::from_secs(10));

    // A controller serves the cluster: the tenant, its agent and its state.
    let controller = Up {
        child: Command::new(BIN)
            .args(["controller", "--state", state.to_str().unwrap()])
            .args(["--url", &urls, "--replicas", "3"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    };
    let admin = state.join("admin.creds");
    let deadline = Instant::now() + Duration::from_secs(30);
    let got = loop {
        let out = Command::new(BIN)
            .args([
                "tenant", "get", "acme", "-o", "json", "--url", &urls, "--creds",
            ])
            .arg(&admin)
            .output()
            .unwrap();
        if out.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(got["id"], "acme");
    bundle.url = urls.clone();
    rt.block_on(async {
        let ns = tenant_bus::TenantNamespace::connect(&bundle).await.unwrap();
        let kv = ns.kv("sessions").await.unwrap();
        assert_eq!(kv.get("s1").await.unwrap().value.as_ref(), b"kept");
    });
    drop(controller);
    drop(cluster);
}
