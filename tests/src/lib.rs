//! Test harness: real `nats-server` processes for the integration tests.
//!
//! Each [`Server`] runs its own nats-server on a random 127.0.0.1 port with a private
//! temp dir (log, pid, JetStream store), and is killed and removed on drop. The
//! binary is found as `agentbus up` finds it: `NATS_SERVER_BIN`, then the
//! project-local install (`scripts/install-nats-server.sh`), then `PATH`; if none is
//! there, [`Server::new`] panics with the install instructions (this is test code).

use std::time::Duration;

pub use agentbus_control::local_server::{LocalServer, ServerOptions};

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
    pub cp: agentbus_control::ControlPlane,
    // Held for its Drop: removes the state directory.
    _tmp: tempfile::TempDir,
}

/// Starts a [`Platform`], panicking on failure (this is test code).
pub async fn platform() -> Platform {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let mut cp = agentbus_control::ControlPlane::init(tmp.path().join("state"))
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

/// Everything a raw connection's event callback reported, as text, so a test can
/// observe asynchronous server errors (permission violations arrive this way, not
/// as return values).
pub struct Events {
    rx: tokio::sync::mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl Events {
    /// Waits (at most `limit`) for an event matching `pred`, keeping every event seen.
    pub async fn wait_for(
        &mut self,
        limit: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        if let Some(e) = self.seen.iter().find(|e| pred(e)) {
            return Some(e.clone());
        }
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(e)) => {
                    self.seen.push(e.clone());
                    if pred(&e) {
                        return Some(e);
                    }
                }
                _ => return None,
            }
        }
    }

    /// The events seen so far by [`Events::wait_for`].
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// Takes the events reported so far.
    pub fn drain(&mut self) -> Vec<String> {
        while let Ok(e) = self.rx.try_recv() {
            self.seen.push(e);
        }
        std::mem::take(&mut self.seen)
    }
}

/// Raw async-nats options for an agent's bundle (its `.creds`, its tenant's inbox
/// prefix, `timeout` for requests and connecting), recording every event: a client
/// that bypasses the library.
pub fn raw_options(
    bundle: &tenant_bus::CredentialBundle,
    timeout: Duration,
) -> (async_nats::ConnectOptions, Events) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let creds = bundle
        .creds
        .as_deref()
        .unwrap_or_else(|| panic!("bundle of {} has no creds", bundle.agent));
    let opts = async_nats::ConnectOptions::with_credentials(creds)
        .unwrap_or_else(|e| panic!("creds of {}: {e}", bundle.agent))
        .custom_inbox_prefix(format!("tenant.{}._INBOX", bundle.tenant))
        .request_timeout(Some(timeout))
        .connection_timeout(timeout)
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(format!("{event:?}"));
            }
        });
    (opts, Events { rx, seen: vec![] })
}
