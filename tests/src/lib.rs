//! Test harness: real `nats-server` processes for the integration tests.
//!
//! Each [`Server`] runs its own nats-server on a random 127.0.0.1 port with a private
//! temp dir (log, pid, JetStream store), and is killed and removed on drop. The
//! binary is found as `agentbus up` finds it: `NATS_SERVER_BIN`, then the
//! project-local install (`scripts/install-nats-server.sh`), then `PATH`; if none is
//! there, [`Server::new`] panics with the install instructions (this is test code).

use std::time::Duration;

pub use agentbus_control::local_server::{
    ClusterOptions, LocalCluster, LocalServer, ServerOptions,
};

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

/// Starts a [`LocalCluster`] (authenticated routes, every pair checked), panicking
/// on failure (this is test code).
pub async fn cluster(options: ClusterOptions) -> LocalCluster {
    match LocalCluster::start(options).await {
        Ok(c) => c,
        Err(e) => panic!("cannot start a nats-server cluster for the test: {e}"),
    }
}

/// Waits until `js` answers JetStream requests (a fresh cluster does once it
/// has a meta leader), polling every 200 ms; panics after `limit`.
pub async fn jetstream_ready(js: &async_nats::jetstream::Context, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while js.query_account().await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "JetStream never became ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the server has processed everything `client` sent before the
/// call, so that its subscriptions are live for every other connection.
///
/// async-nats' `flush` only writes the client's buffer to the socket: a message
/// another connection publishes right after it can still reach the server
/// before this client's SUB (CI lost one such message in about one run of
/// three on a loaded machine). The server handles one connection's protocol in
/// order, so a marker published on `subject` and echoed back through a fresh
/// subscription of the same client is a barrier. `subject` must be one the
/// client may publish and subscribe to; a subscription of the test that
/// matches it receives the marker (payload `server-sync`). Panics after 10 s.
pub async fn server_sync(client: &async_nats::Client, subject: &str) {
    let mut probe = client
        .subscribe(subject.to_string())
        .await
        .unwrap_or_else(|e| panic!("server_sync: subscribe {subject}: {e}"));
    client
        .publish(subject.to_string(), "server-sync".into())
        .await
        .unwrap_or_else(|e| panic!("server_sync: publish {subject}: {e}"));
    client
        .flush()
        .await
        .unwrap_or_else(|e| panic!("server_sync: flush: {e}"));
    let echoed = tokio::time::timeout(
        Duration::from_secs(10),
        futures::StreamExt::next(&mut probe),
    )
    .await;
    assert!(
        matches!(echoed, Ok(Some(_))),
        "server_sync: the server did not echo the marker on {subject} in 10 s"
    );
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

/// An operator-mode deployment for one test: an installation (state directory),
/// a nats-server configured from it (per-tenant accounts, full resolver,
/// JetStream), a controller serving in-process, and the bootstrap platform-admin's
/// client as `cp`, so tenant changes go through the controller as in production.
pub struct Platform {
    /// The server.
    pub server: Server,
    /// The platform-admin's client of the controller.
    pub cp: agentbus_control::AdminClient,
    /// The installation (state directory, KEK, credentials).
    pub install: agentbus_control::Installation,
    /// The running controller.
    pub controller: std::sync::Arc<agentbus_control::Controller>,
    /// Stops the controller.
    pub shutdown: agentbus_control::controller::shutdown::Shutdown,
    // Held for its Drop: removes the state directory.
    _tmp: tempfile::TempDir,
}

impl Platform {
    /// Starts another controller instance on the same installation (its own
    /// connections; same queue group).
    pub async fn another_controller(
        &self,
    ) -> (
        std::sync::Arc<agentbus_control::Controller>,
        agentbus_control::controller::shutdown::Shutdown,
    ) {
        start_controller(&self.install, &self.server.url()).await
    }

    /// A connection with the platform's own credentials (`controller.creds`),
    /// as a runtime instance has: the registry, the runtime APIs, the raw
    /// platform streams. `name` is the connection's name.
    pub async fn platform_client(&self, name: &str) -> async_nats::Client {
        let creds = self
            .install
            .creds("controller.creds")
            .unwrap_or_else(|e| panic!("controller.creds: {e}"));
        agentbus_control::controller::connect(&self.server.url(), &creds, name)
            .await
            .unwrap_or_else(|e| panic!("platform connect: {e}"))
    }

    /// Another admin client from `.creds` text.
    pub async fn admin_client(&self, creds: &str) -> agentbus_control::AdminClient {
        agentbus_control::AdminClient::connect(&self.server.url(), creds)
            .await
            .unwrap_or_else(|e| panic!("admin connect: {e}"))
    }
}

/// A cluster-wide scheduler (default config) whose rate and slot buckets are
/// created with `replicas`, as a runtime instance makes it with the
/// deployment's setting.
pub async fn replicated_scheduler(
    js: &async_nats::jetstream::Context,
    replicas: usize,
) -> Result<agent_runtime::scheduler::Scheduler, agent_runtime::scheduler::SchedulerError> {
    use agent_runtime::scheduler::{RateBucket, Scheduler, SchedulerConfig, SlotBucket};
    Scheduler::connect(
        js,
        SchedulerConfig::default(),
        &RateBucket {
            replicas,
            ..RateBucket::default()
        },
        &SlotBucket {
            replicas,
            ..SlotBucket::default()
        },
    )
    .await
}

/// Starts a controller for `install` on `url`, serving in a task.
pub async fn start_controller(
    install: &agentbus_control::Installation,
    url: &str,
) -> (
    std::sync::Arc<agentbus_control::Controller>,
    agentbus_control::controller::shutdown::Shutdown,
) {
    let config = agentbus_control::ControllerConfig::new(url)
        .rotation_grace(Duration::from_millis(500))
        .fault(None);
    let controller = agentbus_control::Controller::connect(install, config)
        .await
        .unwrap_or_else(|e| panic!("controller connect: {e}"));
    let shutdown = agentbus_control::controller::shutdown::Shutdown::new();
    let (c, s) = (controller.clone(), shutdown.clone());
    tokio::spawn(async move {
        if let Err(e) = c.serve(s).await {
            eprintln!("controller stopped: {e}");
        }
    });
    (controller, shutdown)
}

/// Starts a [`Platform`], panicking on failure (this is test code).
pub async fn platform() -> Platform {
    platform_with(|_| {}).await
}

/// Starts a [`Platform`] whose server config options `adjust` changes first
/// (e.g. a small `max_file_store`).
pub async fn platform_with(
    adjust: impl FnOnce(&mut agentbus_control::server_config::ServerConfigOptions),
) -> Platform {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let mut install = agentbus_control::Installation::init(tmp.path().join("state"))
        .unwrap_or_else(|e| panic!("installation init: {e}"));
    let mut options = install.default_server_options();
    adjust(&mut options);
    let config = install.server_config(&options);
    let server = Server::with_options(ServerOptions::new().config(config));
    install
        .set_urls(vec![server.url()], 1)
        .unwrap_or_else(|e| panic!("server url: {e}"));
    let (controller, shutdown) = start_controller(&install, &server.url()).await;
    let creds = install
        .creds("admin.creds")
        .unwrap_or_else(|e| panic!("admin creds: {e}"));
    let cp = agentbus_control::AdminClient::connect(&server.url(), &creds)
        .await
        .unwrap_or_else(|e| panic!("admin connect: {e}"));
    // The controller's endpoints are up once it answers.
    eventually(Duration::from_secs(10), || async { cp.status().await.ok() })
        .await
        .unwrap_or_else(|| panic!("the controller never answered"));
    Platform {
        server,
        cp,
        install,
        controller,
        shutdown,
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
