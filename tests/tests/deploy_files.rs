//! The files shipped for deployment: the 3-node cluster configs
//! (`nats-config/cluster-3-node/`) are accepted by nats-server once their
//! per-installation includes are generated, and they authenticate routes,
//! open no monitoring port and let the resolver delete accounts.

use std::path::{Path, PathBuf};
use std::process::Command;

use agentbus_control::local_server::locate_nats_server;
use agentbus_control::server_config::{render_operator_snippet, RouteCredentials};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn cluster_dir() -> PathBuf {
    repo_root().join("nats-config/cluster-3-node")
}

/// `nats-server -t -c <conf>` run in the config's directory: Ok or the output.
fn config_test(conf: &Path) -> Result<(), String> {
    let out = Command::new(locate_nats_server().unwrap())
        .arg("-t")
        .arg("-c")
        .arg(conf)
        .current_dir(conf.parent().unwrap())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(text)
    }
}

/// A temp dir holding the shipped node configs and `operator.conf` generated from
/// a fresh installation (no `routes.conf` yet).
fn staged_cluster_configs() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for n in 1..=3 {
        let name = format!("node-{n}.conf");
        std::fs::copy(cluster_dir().join(&name), tmp.path().join(&name)).unwrap();
    }
    let install = agentbus_control::Installation::init(tmp.path().join("state")).unwrap();
    std::fs::write(
        tmp.path().join("operator.conf"),
        render_operator_snippet(&install.operator_facts()),
    )
    .unwrap();
    tmp
}

#[test]
fn shipped_node_configs_authenticate_routes_and_open_no_monitoring_port() {
    for n in 1..=3 {
        let path = cluster_dir().join(format!("node-{n}.conf"));
        let text = std::fs::read_to_string(&path).unwrap();
        let live: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .collect();
        assert!(
            !live
                .iter()
                .any(|l| l.starts_with("http") || l.starts_with("monitor")),
            "{}: a monitoring listener",
            path.display()
        );
        let cluster_block = &text[text.find("cluster {").expect("a cluster block")..];
        let cluster_block = &cluster_block[..cluster_block.find("\n}").unwrap()];
        assert!(
            cluster_block.contains("include ./routes.conf"),
            "{}: routes are not from the generated credentials",
            path.display()
        );
        assert!(
            !cluster_block
                .lines()
                .any(|l| !l.trim().starts_with('#') && l.contains("nats-route://")),
            "{}: an unauthenticated route",
            path.display()
        );
        assert!(live.contains(&"allow_delete: true"), "{}", path.display());
        assert!(
            live.contains(&"include ./operator.conf"),
            "{}",
            path.display()
        );
    }
}

#[test]
fn shipped_node_configs_are_accepted_by_nats_server_with_generated_routes() {
    let tmp = staged_cluster_configs();
    // Without routes.conf the configs are incomplete: nats-server refuses them
    // (so the check below really reads the include).
    assert!(config_test(&tmp.path().join("node-1.conf")).is_err());

    // routes.conf from the shipped generator: 0600, a strong password, one route
    // per node, each carrying the credentials.
    let script = cluster_dir().join("gen-routes-conf.sh");
    let status = Command::new("sh")
        .arg(&script)
        .arg(tmp.path().join("routes.conf"))
        .status()
        .unwrap();
    assert!(status.success());
    let routes = tmp.path().join("routes.conf");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&routes).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let text = std::fs::read_to_string(&routes).unwrap();
    let password = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("password: \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("a password line")
        .to_string();
    assert!(password.len() >= 43, "{password}");
    assert_eq!(
        text.matches(&format!("nats-route://route:{password}@"))
            .count(),
        3
    );
    // It never overwrites: rotation is explicit.
    let again = Command::new("sh")
        .arg(&script)
        .arg(&routes)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert_eq!(std::fs::read_to_string(&routes).unwrap(), text);

    for n in 1..=3 {
        let conf = tmp.path().join(format!("node-{n}.conf"));
        if let Err(out) = config_test(&conf) {
            panic!("node-{n}.conf refused: {out}");
        }
    }

    // The same include rendered by the library is accepted too.
    let route = RouteCredentials::generate().unwrap();
    let nodes: Vec<(String, u16)> = (6222..=6224).map(|p| ("127.0.0.1".into(), p)).collect();
    std::fs::write(&routes, route.render_routes_include(&nodes)).unwrap();
    for n in 1..=3 {
        let conf = tmp.path().join(format!("node-{n}.conf"));
        if let Err(out) = config_test(&conf) {
            panic!("node-{n}.conf with the rendered include refused: {out}");
        }
    }
}

/// The shipped systemd units, `(file name, expected command after the binary)`.
const UNITS: [(&str, &str); 2] = [
    ("agentbus.service", "up --state /var/lib/agentbus"),
    (
        "agentbus-controller.service",
        "controller --url nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224 --state /etc/agentbus",
    ),
];

#[test]
fn systemd_units_are_hardened_and_run_the_documented_commands() {
    for (name, command) in UNITS {
        let text =
            std::fs::read_to_string(repo_root().join("nats-config/systemd").join(name)).unwrap();
        let keys: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#') && l.contains('='))
            .collect();
        assert!(
            keys.contains(&format!("ExecStart=/usr/local/bin/agentbus {command}").as_str()),
            "{name}: ExecStart"
        );
        for required in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "Restart=on-failure",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "CapabilityBoundingSet=",
        ] {
            assert!(keys.contains(&required), "{name}: {required}");
        }
        assert!(
            keys.contains(&"DynamicUser=yes") || keys.iter().any(|k| k.starts_with("User=")),
            "{name}: runs as root"
        );
    }
    let up =
        std::fs::read_to_string(repo_root().join("nats-config/systemd/agentbus.service")).unwrap();
    assert!(up.contains("\nStateDirectory=agentbus\n"));
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let Some(analyze) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
    else {
        println!("note: systemd-analyze not found; systemd unit verification skipped");
        return;
    };
    // verify checks that ExecStart's binary exists: point it at /bin/true (the
    // arguments stay) in a copy of each unit.
    let tmp = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (name, _) in UNITS {
        let text =
            std::fs::read_to_string(repo_root().join("nats-config/systemd").join(name)).unwrap();
        let rewritten = text.replace("ExecStart=/usr/local/bin/agentbus ", "ExecStart=/bin/true ");
        assert_ne!(rewritten, text, "{name}: ExecStart not found");
        let path = tmp.path().join(name);
        std::fs::write(&path, rewritten).unwrap();
        paths.push(path);
    }
    let out = Command::new(&analyze)
        .arg("verify")
        .args(&paths)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{text}"
    );
    // Unknown keys and bad values are warnings with status 0: none may name our
    // units (lines about other units of the host are not ours to judge).
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| UNITS.iter().any(|(name, _)| l.contains(name)))
        .collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify warns:\n{}",
        ours.join("\n")
    );
}
