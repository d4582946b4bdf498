//! Test harness: real `nats-server` processes for the integration tests.
//!
//! Each [`Server`] runs its own nats-server on a random 127.0.0.1 port with a private
//! temp dir (log, pid, JetStream store), and is killed and removed on drop. The
//! binary is found as `agentbus up` finds it: `NATS_SERVER_BIN`, then the
//! project-local install (`scripts/install-nats-server.sh`), then `PATH`; if none is
//! there, [`Server::new`] panics with the install instructions (this is test code).

use std::time::Duration;

pub use agent_runtime::local_server::{LocalServer, ServerOptions};

/// A nats-server for one test.
pub struct Server {
    inner: LocalServer,
}

impl Server {
    /// A plain server (no JetStream, no auth).
    pub fn new() -> Self {
        Self::with_options(ServerOptions::new())
    }

    /// A server with JetStream (file store in its temp dir).
    pub fn jetstream() -> Self {
        Self::with_options(ServerOptions::new().jetstream(true))
    }

    /// A server with a config file.
    pub fn with_config(config: &str) -> Self {
        Self::with_options(ServerOptions::new().config(config))
    }

    /// A server with explicit options.
    pub fn with_options(options: ServerOptions) -> Self {
        match LocalServer::start(options) {
            Ok(inner) => Self { inner },
            Err(e) => panic!("cannot start nats-server for the test: {e}"),
        }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.inner.url()
    }

    /// The underlying process handle (restart, stop, log).
    pub fn process(&mut self) -> &mut LocalServer {
        &mut self.inner
    }

    /// Restarts on the same port and store, panicking on failure.
    pub fn restart(&mut self) {
        if let Err(e) = self.inner.restart() {
            panic!("restarting nats-server: {e}");
        }
    }

    /// A raw async-nats client (no library in between).
    pub async fn raw_client(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("raw connect to {}: {e}", self.url()))
    }
}

impl Default for Server {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `f` until it returns `Some`, polling every 10 ms, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An operator-mode deployment for one test: a control-plane state directory, a
/// nats-server configured from it (per-tenant accounts, full resolver, JetStream),
/// and the control plane connected live, so tenant changes are pushed at once.
pub struct Platform {
    /// The server.
    pub server: Server,
    /// The control plane, connected as the system user.
    pub cp: agent_runtime::control::ControlPlane,
    // Held for its Drop: removes the state directory.
    _tmp: tempfile::TempDir,
}

/// Starts a [`Platform`], panicking on failure (this is test code).
pub async fn platform() -> Platform {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let mut cp = agent_runtime::control::ControlPlane::init(tmp.path().join("state"))
        .unwrap_or_else(|e| panic!("control plane init: {e}"));
    let config = cp
        .server_config(&cp.default_server_options())
        .unwrap_or_else(|e| panic!("server config: {e}"));
    let server = Server::with_options(ServerOptions::new().config(config));
    cp.set_server_url(&server.url())
        .unwrap_or_else(|e| panic!("server url: {e}"));
    cp.connect(&server.url())
        .await
        .unwrap_or_else(|e| panic!("control plane connect: {e}"));
    Platform {
        server,
        cp,
        _tmp: tmp,
    }
}
