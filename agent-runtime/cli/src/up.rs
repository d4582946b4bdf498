//! `agentbus up` (the local server with an embedded controller) and
//! `agentbus controller` (a controller instance on its own).
//!
//! `up` takes an exclusive lock on the state directory (a second `up` exits with
//! one line and changes nothing), creates the installation on first run, starts
//! nats-server (one node, or `--cluster N` nodes with authenticated routes) and
//! supervises it: a server that exits is restarted with backoff, at most
//! [`MAX_RESTARTS`] times in [`RESTART_WINDOW`], after which `up` exits non-zero
//! rather than run on without a server. Monitoring stays off.

use std::path::Path;
use std::time::{Duration, Instant};

use clap::Args;

use agentbus_control::controller::shutdown::Shutdown;
use agentbus_control::local_server::{ClusterOptions, LocalCluster, LocalServer, ServerOptions};
use agentbus_control::{Controller, ControllerConfig, Installation};

use crate::output::{
    fail, usage, Failure, EXIT_INTERNAL, EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_USAGE,
};

/// Restarts of a failed server allowed within [`RESTART_WINDOW`].
pub const MAX_RESTARTS: usize = 5;
/// The window [`MAX_RESTARTS`] counts in.
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// Arguments of `agentbus up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// The state directory (KEK, credentials, server config and store).
    #[arg(long, default_value = ".agentbus", env = "AGENTBUS_STATE")]
    pub state: std::path::PathBuf,
    /// The address clients connect to (127.0.0.1 by default; 0.0.0.0 for all).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Client port (0 picks a free one). With --cluster, node i uses PORT+i.
    #[arg(long, default_value_t = 4222)]
    pub port: u16,
    /// Run a local cluster of this many nodes (3 for development and tests).
    #[arg(long)]
    pub cluster: Option<usize>,
    /// With --cluster, on a state directory a single server used: copy its
    /// data (tenants, keys, agents, usage, budgets, audit log, every
    /// tenant's streams) into the new cluster, then move its store aside.
    #[arg(long, requires = "cluster")]
    pub from_single: bool,
    /// Replicas of every bucket and stream: 1 to the number of nodes, at most 5
    /// (default: 1 on one node, 3 on three or more).
    #[arg(long)]
    pub replicas: Option<usize>,
    /// With --cluster: TLS for routes, this certificate (PEM; valid for 127.0.0.1).
    #[arg(long, requires_all = ["route_key", "route_ca"])]
    pub route_cert: Option<std::path::PathBuf>,
    /// With --cluster: the route certificate's private key (PEM).
    #[arg(long, requires = "route_cert")]
    pub route_key: Option<std::path::PathBuf>,
    /// With --cluster: the CA that route peers' certificates must chain to.
    #[arg(long, requires = "route_cert")]
    pub route_ca: Option<std::path::PathBuf>,
    /// Accept logins with the platform identity provider's JWTs (as the NATS
    /// token): this JSON file names the issuer, audience, tenant claim, roles
    /// claim and role-to-agent-type map (docs/identity.md). Needs --jwks.
    #[arg(long, requires = "jwks", value_name = "FILE")]
    pub jwt_config: Option<std::path::PathBuf>,
    /// The identity provider's public keys (a JWKS file) for --jwt-config.
    #[arg(long, requires = "jwt_config", value_name = "FILE")]
    pub jwks: Option<std::path::PathBuf>,
    /// Serve Prometheus metrics (logins, policing, usage per tenant, bus
    /// drops) at http://ADDR/metrics, e.g. `127.0.0.1:9464`. Off by default;
    /// bind to loopback unless a scraper needs more.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
}

/// Arguments of `agentbus controller`.
#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// The state directory holding the KEK and the controller's credentials.
    #[arg(long, default_value = ".agentbus", env = "AGENTBUS_STATE")]
    pub state: std::path::PathBuf,
    /// Server URL(s), comma-separated (default: the installation's).
    #[arg(long, env = "AGENTBUS_URL")]
    pub url: Option<String>,
    /// The deployment's replicas (default: the installation's): of the
    /// buckets it creates, and every existing stream kept with fewer is raised
    /// to it (never lowered).
    #[arg(long)]
    pub replicas: Option<usize>,
    /// Accept logins with the platform identity provider's JWTs (as the NATS
    /// token): this JSON file names the issuer, audience, tenant claim, roles
    /// claim and role-to-agent-type map (docs/identity.md). Needs --jwks.
    #[arg(long, requires = "jwks", value_name = "FILE")]
    pub jwt_config: Option<std::path::PathBuf>,
    /// The identity provider's public keys (a JWKS file) for --jwt-config.
    #[arg(long, requires = "jwt_config", value_name = "FILE")]
    pub jwks: Option<std::path::PathBuf>,
    /// Serve Prometheus metrics (logins, policing, usage per tenant, bus
    /// drops) at http://ADDR/metrics, e.g. `127.0.0.1:9464`. Off by default;
    /// bind to loopback unless a scraper needs more.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
}

/// Installs the Prometheus exporter when `--metrics ADDR` is given.
fn serve_metrics(addr: Option<std::net::SocketAddr>) -> Result<(), Failure> {
    let Some(addr) = addr else { return Ok(()) };
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| fail(EXIT_UNAVAILABLE, format!("metrics on {addr}: {e}")))?;
    eprintln!("agentbus: metrics at http://{addr}/metrics");
    Ok(())
}

/// Adds the platform-JWT verifier to `config` when both files are given.
fn with_platform_jwt(
    config: ControllerConfig,
    jwt_config: Option<&Path>,
    jwks: Option<&Path>,
) -> Result<ControllerConfig, Failure> {
    use agentbus_control::identity::platform_jwt::{JwksVerifier, PlatformJwtConfig};
    let (Some(cfg), Some(jwks)) = (jwt_config, jwks) else {
        return Ok(config);
    };
    let text = std::fs::read_to_string(cfg)
        .map_err(|e| usage(format!("cannot read {}: {e}", cfg.display())))?;
    let parsed = PlatformJwtConfig::from_json(&text)
        .map_err(|e| usage(format!("{}: {e}", cfg.display())))?;
    let verifier = JwksVerifier::from_file(jwks, parsed)
        .map_err(|e| usage(format!("{}: {e}", jwks.display())))?;
    Ok(config.platform_jwt(verifier))
}

/// Holds `<state>/up.lock` exclusively while `up` runs.
fn lock(state: &Path) -> Result<std::fs::File, Failure> {
    std::fs::create_dir_all(state)
        .map_err(|e| fail(EXIT_INTERNAL, format!("creating {}: {e}", state.display())))?;
    let path = state.join("up.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| fail(EXIT_INTERNAL, format!("opening {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(fail(
            EXIT_REFUSED,
            format!(
                "another `agentbus up` is running on {} (stop it first, or use another --state)",
                state.display()
            ),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(fail(
            EXIT_INTERNAL,
            format!("locking {}: {e}", path.display()),
        )),
    }
}

enum Servers {
    One(LocalServer),
    Cluster(Box<LocalCluster>),
}

impl Servers {
    fn urls(&self) -> String {
        match self {
            Servers::One(s) => s.url(),
            Servers::Cluster(c) => c.urls(),
        }
    }

    /// Restarts nodes that exited; `Err` when a node cannot be kept running.
    async fn supervise(&mut self, restarts: &mut Vec<Instant>) -> Result<(), Failure> {
        let dead: Vec<usize> = match self {
            Servers::One(s) => {
                if s.is_running() {
                    vec![]
                } else {
                    vec![0]
                }
            }
            Servers::Cluster(c) => (0..c.len()).filter(|i| !c.is_running(*i)).collect(),
        };
        for i in dead {
            restarts.retain(|t| t.elapsed() < RESTART_WINDOW);
            if restarts.len() >= MAX_RESTARTS {
                return Err(fail(
                    EXIT_UNAVAILABLE,
                    format!("nats-server keeps exiting ({MAX_RESTARTS} restarts in {RESTART_WINDOW:?}); giving up"),
                ));
            }
            let backoff = Duration::from_millis(250 << restarts.len().min(5));
            eprintln!("agentbus: nats-server node {i} exited; restarting in {backoff:?}");
            tokio::time::sleep(backoff).await;
            restarts.push(Instant::now());
            let result = match self {
                Servers::One(s) => s.restart(),
                Servers::Cluster(c) => c.start_node(i).await,
            };
            if let Err(e) = result {
                eprintln!(
                    "agentbus: restarting node {i} failed: {}",
                    agentbus_control::one_line(&e.to_string())
                );
            }
        }
        Ok(())
    }

    fn shutdown(&mut self) {
        match self {
            Servers::One(s) => s.shutdown(Duration::from_secs(10)),
            Servers::Cluster(c) => c.stop(),
        }
    }
}

/// The single server of `state` (its store, resolver and config), listening
/// on `host:port` (0: a free port).
fn single_server(
    install: &Installation,
    state: &Path,
    host: &str,
    port: u16,
) -> Result<LocalServer, Failure> {
    let mut options = install
        .default_server_options()
        .listen(host.to_string(), port);
    options.server_name = "agentbus".to_string();
    let config = install.server_config(&options);
    let mut server_options = ServerOptions::new()
        .config(config)
        .dir(state.join("server"));
    if port != 0 {
        server_options = server_options.port(port);
    }
    LocalServer::start(server_options)
        .map_err(|e| fail(EXIT_UNAVAILABLE, agentbus_control::one_line(&e.to_string())))
}

/// Runs `agentbus up`.
pub async fn run(args: UpArgs) -> Result<(), Failure> {
    let state = args.state.as_path();
    let nodes = args.cluster.unwrap_or(1).max(1);
    // Checked before anything is created. An explicit count that JetStream or
    // this cluster cannot hold is refused, not quietly lowered: the operator
    // asked for that many copies.
    let most = nodes.min(*tenant_bus::region::REPLICAS.end());
    let replicas = match args.replicas {
        None => {
            if nodes >= 3 {
                3
            } else {
                1
            }
        }
        Some(r) if (1..=most).contains(&r) => r,
        Some(r) => {
            let why = if nodes == 1 {
                "one node keeps 1 copy (more need --cluster)".to_string()
            } else {
                format!("must be 1 to {most} with {nodes} nodes")
            };
            return Err(fail(EXIT_USAGE, format!("--replicas {r}: {why}")));
        }
    };
    // Creating is atomic (built aside, renamed into place), so it comes before
    // the lock; the lock file then lives inside the installation.
    let (mut install, created) = Installation::open_or_init(state)?;
    let _lock = lock(state)?;
    // Checked under the lock: another `up` may have been changing them.
    let stores = crate::stores::Stores::of(state);
    if args.from_single {
        if let Some(why) = stores.refuse_copy(state, nodes) {
            return Err(fail(EXIT_REFUSED, why));
        }
    } else if let Some(why) = stores.refuse(state, nodes) {
        return Err(fail(EXIT_REFUSED, why));
    }
    if created {
        eprintln!(
            "agentbus: created operator, accounts and KEK in {}",
            state.display()
        );
    }
    let mut servers = if nodes == 1 {
        if args.port != 0 && std::net::TcpStream::connect((args.host.as_str(), args.port)).is_ok() {
            return Err(fail(
                EXIT_REFUSED,
                format!(
                    "port {} on {} is already in use; pass --port",
                    args.port, args.host
                ),
            ));
        }
        Servers::One(single_server(&install, state, &args.host, args.port)?)
    } else {
        let snippet =
            agentbus_control::server_config::render_operator_snippet(&install.operator_facts());
        let root = state.join("cluster");
        let mut options = ClusterOptions::new();
        if let (Some(cert), Some(key)) = (&args.route_cert, &args.route_key) {
            options = options.route_tls(agentbus_control::server_config::RouteTls::new(
                cert,
                key,
                args.route_ca.clone(),
            ));
        }
        let options = options
            .nodes(nodes)
            .config(snippet)
            .node_config(|_, dir| {
                agentbus_control::server_config::render_resolver_block(&dir.join("resolver"))
            })
            .probe_creds(install.creds("sys.creds")?)
            .dir(root);
        let cluster = LocalCluster::start(options)
            .await
            .map_err(|e| fail(EXIT_UNAVAILABLE, agentbus_control::one_line(&e.to_string())))?;
        Servers::Cluster(Box::new(cluster))
    };
    let urls = servers.urls();
    // The single server's data first (before the controller opens its
    // buckets on the cluster): see `crate::import`.
    let old = if args.from_single {
        let old = single_server(&install, state, "127.0.0.1", 0)?;
        eprintln!("agentbus: copying the single server's data into the {nodes}-node cluster");
        if let Err(e) = crate::import::copy_platform(&install, &old.url(), &urls, replicas).await {
            servers.shutdown();
            return Err(e);
        }
        Some(old)
    } else {
        None
    };
    install.set_urls(urls.split(',').map(str::to_string).collect(), replicas)?;
    serve_metrics(args.metrics)?;
    let config = with_platform_jwt(
        ControllerConfig::new(&urls).replicas(replicas),
        args.jwt_config.as_deref(),
        args.jwks.as_deref(),
    )?;
    let controller = match Controller::connect(&install, config).await {
        Ok(c) => c,
        Err(e) => {
            servers.shutdown();
            return Err(e.into());
        }
    };
    if let Some(old) = old {
        let copied = crate::import::copy_tenants(&controller, &old.url(), &urls, replicas).await;
        if let Err(e) = copied {
            servers.shutdown();
            return Err(e);
        }
        let aside = crate::import::retire(old, state)?;
        eprintln!(
            "agentbus: the single server's data is in the cluster; its store moved to {}",
            aside.display()
        );
    }
    let shutdown = Shutdown::new();
    let serving = tokio::spawn(controller.clone().serve(shutdown.clone()));
    eprintln!(
        "agentbus: nats-server running ({nodes} node{}), controller serving, buckets R{replicas}; Ctrl-C to stop",
        if nodes == 1 { "" } else { "s" }
    );
    println!("{urls}");
    let mut restarts = Vec::new();
    let mut check = tokio::time::interval(Duration::from_millis(500));
    let outcome = loop {
        tokio::select! {
            _ = wait_for_shutdown() => break Ok(()),
            _ = check.tick() => {
                if let Err(e) = servers.supervise(&mut restarts).await {
                    break Err(e);
                }
            }
        }
    };
    eprintln!("agentbus: stopping");
    shutdown.fire();
    let _ = tokio::time::timeout(Duration::from_secs(5), serving).await;
    servers.shutdown();
    outcome
}

/// Runs `agentbus controller`.
pub async fn controller(args: ControllerArgs) -> Result<(), Failure> {
    let state = args.state.as_path();
    let install = Installation::open(state)?;
    let urls = args.url.unwrap_or_else(|| install.url_list());
    let replicas = args.replicas.unwrap_or(install.facts().replicas);
    tenant_bus::region::check_replicas(replicas)
        .map_err(|e| fail(EXIT_USAGE, format!("--replicas {e}")))?;
    serve_metrics(args.metrics)?;
    let config = with_platform_jwt(
        ControllerConfig::new(&urls).replicas(replicas),
        args.jwt_config.as_deref(),
        args.jwks.as_deref(),
    )?;
    let controller = Controller::connect(&install, config).await?;
    let shutdown = Shutdown::new();
    let serving = tokio::spawn(controller.serve(shutdown.clone()));
    eprintln!("agentbus: controller serving on {urls}; Ctrl-C to stop");
    wait_for_shutdown().await;
    shutdown.fire();
    let _ = tokio::time::timeout(Duration::from_secs(5), serving).await;
    Ok(())
}

async fn wait_for_shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
