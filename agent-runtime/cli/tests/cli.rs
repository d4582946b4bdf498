//! The `agentbus` CLI, run as a process against the real nats-server that

// Test code: a failed set-up step should abort the test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `agentbus up` starts: every command's happy path and its bad-input paths.
//! Each bad input must exit non-zero with one line on stderr and leave the state
//! unchanged (checked by comparing every state file before and after).

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_agentbus");

struct Up {
    child: Child,
    url: String,
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
        .args(["--state", state.to_str().unwrap(), "up", "--port", "0"])
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
    Up { child, url }
}

fn run(state: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--state")
        .arg(state)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run agentbus")
}

fn ok(state: &Path, args: &[&str]) -> String {
    let out = run(state, args);
    assert!(
        out.status.success(),
        "agentbus {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Asserts failure with exactly one stderr line containing `needle`.
fn fails(state: &Path, args: &[&str], needle: &str) {
    let out = run(state, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "agentbus {args:?} should fail");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one stderr line for {args:?}: {err}"
    );
    assert!(
        err.contains(needle),
        "agentbus {args:?}: {err:?} lacks {needle:?}"
    );
}

/// Every file under `dir` with its contents, for before/after comparisons.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            // The running server's own files change on their own.
            if p.starts_with(dir.join("server")) || p.starts_with(dir.join("jetstream")) {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap_or_default()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn cli_commands_happy_and_bad_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let files = tmp.path();

    // Without state, every command says so.
    fails(&state, &["tenant", "list"], "no agentbus state");
    fails(
        &state,
        &["agent", "revoke", "acme", "x"],
        "no agentbus state",
    );

    let server = up(&state);

    // tenant create / list / get / update
    let created = ok(
        &state,
        &[
            "tenant",
            "create",
            "acme",
            "--tier",
            "pro",
            "--name",
            "Acme Corp",
        ],
    );
    assert!(created.contains("created tenant acme"), "{created}");
    ok(
        &state,
        &["tenant", "create", "globex", "--agent-type", "planner"],
    );
    let before = snapshot(&state);
    fails(&state, &["tenant", "create", "acme"], "already exists");
    fails(&state, &["tenant", "create", "Acme"], "invalid tenant id");
    fails(&state, &["tenant", "create", "a.b"], "invalid tenant id");
    fails(
        &state,
        &["tenant", "create", "new", "--tier", "gold"],
        "unknown tier",
    );
    fails(&state, &["tenant", "get", "nope"], "not found");
    fails(
        &state,
        &["tenant", "update", "acme", "--set", "nope=1"],
        "unknown quota field",
    );
    fails(
        &state,
        &["tenant", "update", "acme", "--set", "max_agents=-3"],
        "invalid quota value",
    );
    fails(
        &state,
        &["tenant", "update", "acme", "--set", "max_agents"],
        "KEY=VALUE",
    );
    fails(&state, &["tenant", "suspend", "nope"], "not found");
    fails(&state, &["tenant", "activate", "acme"], "already active");
    assert_eq!(
        snapshot(&state),
        before,
        "bad tenant commands changed the state"
    );
    let list = ok(&state, &["tenant", "list"]);
    assert!(
        list.contains("acme") && list.contains("globex") && list.contains("Acme Corp"),
        "{list}"
    );
    ok(
        &state,
        &[
            "tenant",
            "update",
            "acme",
            "--set",
            "max_agents=20",
            "--set",
            "name=Acme Inc",
        ],
    );
    let get = ok(&state, &["tenant", "get", "acme"]);
    assert!(
        get.contains("\"max_agents\": 20") && get.contains("Acme Inc"),
        "{get}"
    );

    // agent create / revoke
    let planner = files.join("planner.json");
    let worker = files.join("worker.json");
    let planner_s = planner.to_str().unwrap();
    let worker_s = worker.to_str().unwrap();
    ok(
        &state,
        &["agent", "create", "acme", "planner", "--out", planner_s],
    );
    ok(
        &state,
        &["agent", "create", "acme", "worker", "--out", worker_s],
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&planner).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let bundle: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&planner).unwrap()).unwrap();
    for key in ["url", "tenant", "agent", "creds", "keys"] {
        assert!(bundle.get(key).is_some(), "bundle lacks {key}");
    }
    let before = snapshot(&state);
    let other = files.join("other.json");
    let other_s = other.to_str().unwrap();
    fails(
        &state,
        &["agent", "create", "acme", "planner", "--out", other_s],
        "already exists",
    );
    fails(
        &state,
        &[
            "agent", "create", "acme", "x", "--type", "weird", "--out", other_s,
        ],
        "not allowed",
    );
    fails(
        &state,
        &["agent", "create", "nope", "x", "--out", other_s],
        "unknown tenant",
    );
    fails(
        &state,
        &["agent", "create", "acme", "Bad", "--out", other_s],
        "invalid agent id",
    );
    fails(
        &state,
        &["agent", "create", "acme", "x", "--out", planner_s],
        "not overwriting",
    );
    fails(
        &state,
        &["agent", "revoke", "acme", "ghost"],
        "unknown agent",
    );
    assert!(!other.exists(), "a failed create left a file");
    assert_eq!(
        snapshot(&state),
        before,
        "bad agent commands changed the state"
    );

    // pub / sub / request
    let mut sub = Command::new(BIN)
        .args(["sub", "--creds", worker_s, "jobs.>", "--count", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `sub` prints "listening" on stderr once its subscription is live.
    let mut err_line = String::new();
    BufReader::new(sub.stderr.take().unwrap())
        .read_line(&mut err_line)
        .unwrap();
    assert!(err_line.contains("listening"), "{err_line}");
    let published = ok(
        &state,
        &["pub", "--creds", planner_s, "jobs.one", "hello one"],
    );
    assert!(published.contains("published"), "{published}");
    ok(
        &state,
        &["pub", "--creds", planner_s, "jobs.two", "hello two"],
    );
    let out = sub.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("jobs.one from planner: hello one") && text.contains("jobs.two"),
        "{text}"
    );
    fails(
        &state,
        &["pub", "--creds", planner_s, "bad subject", "x"],
        "invalid subject",
    );
    fails(
        &state,
        &["pub", "--creds", planner_s, "$SYS.x", "x"],
        "reserved",
    );
    fails(
        &state,
        &["sub", "--creds", planner_s, "a.>.b"],
        "last token",
    );
    let missing = files.join("missing.json");
    fails(
        &state,
        &["pub", "--creds", missing.to_str().unwrap(), "a", "x"],
        "cannot use bundle",
    );
    let garbage = files.join("garbage.json");
    std::fs::write(&garbage, "{not json").unwrap();
    fails(
        &state,
        &["pub", "--creds", garbage.to_str().unwrap(), "a", "x"],
        "cannot use bundle",
    );
    fails(
        &state,
        &[
            "request",
            "--creds",
            planner_s,
            "svc.none",
            "x",
            "--timeout-ms",
            "500",
        ],
        "no responders",
    );

    // suspend / activate / revoke take effect on the server
    ok(&state, &["tenant", "suspend", "acme"]);
    fails(
        &state,
        &["pub", "--creds", planner_s, "jobs.x", "y"],
        "refused",
    );
    fails(&state, &["tenant", "suspend", "acme"], "already suspended");
    ok(&state, &["tenant", "activate", "acme"]);
    ok(&state, &["pub", "--creds", planner_s, "jobs.x", "y"]);
    ok(&state, &["agent", "revoke", "acme", "worker"]);
    fails(
        &state,
        &["pub", "--creds", worker_s, "jobs.x", "y"],
        "refused",
    );
    ok(&state, &["pub", "--creds", planner_s, "jobs.x", "y"]);

    // A second `up` on the port in use: refused with one line.
    let port = server.url.rsplit(':').next().unwrap().to_string();
    fails(&state, &["up", "--port", &port], "already in use");

    drop(server);
    fails(&state, &["tenant", "list"], "no server running");
    fails(
        &state,
        &["pub", "--creds", planner_s, "jobs.x", "y"],
        "no server running",
    );
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
