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
    assert_eq!(status["buckets"].as_array().unwrap().len(), 4);
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
    use std::os::unix::fs::PermissionsExt as _;
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
    // Revoked agents cannot connect (a raw client: `sub` with the bundle).
    let got = json(&state, &["agent", "revoke", "acme", "a1"]);
    assert!(got["revoked_at"].is_number());
    let sub = Command::new(BIN)
        .args(["sub", "--creds"])
        .arg(dir.join("a1.json"))
        .args(["x", "--count", "1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!sub.status.success());

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
        vec!["status", "--help"],
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
