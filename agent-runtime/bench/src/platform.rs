//! An operator-mode deployment for the measurements that need the control
//! plane (onboarding, audit, logins, metering): a fresh installation in a
//! temporary state directory, a nats-server configured from it (per-tenant
//! accounts, full resolver, JetStream, the auth callout's account and
//! sentinel), a controller serving in this process, and the bootstrap
//! platform-admin's client. Everything is torn down on drop.
//!
//! The controller can be stopped and started again with another
//! [`ControllerConfig`] while the server keeps running: the metering section
//! measures throughput with the controller polling and with no controller at
//! all.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbus_control::controller::shutdown::Shutdown;
use agentbus_control::local_server::{LocalServer, ServerOptions};
use agentbus_control::{AdminClient, Controller, ControllerConfig, Installation};

use crate::BenchError;

/// How long a stopping controller may take: its own drain
/// ([`agentbus_control::controller::SHUTDOWN_DRAIN`], 5 s) and some slack.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running operator-mode deployment (see the module docs).
pub struct OperatorPlatform {
    /// The platform-admin's client of the controller.
    pub cp: AdminClient,
    /// The controller last started (after [`Self::stop_controller`], the
    /// stopped one until [`Self::start_controller`] replaces it).
    pub controller: Arc<Controller>,
    /// The installation (state directory, KEK, credentials).
    pub install: Installation,
    shutdown: Shutdown,
    /// The serving task; `None` while stopped.
    serving: Option<tokio::task::JoinHandle<()>>,
    // Declared after everything that talks to it: fields drop in order, so the
    // server outlives the clients and the state directory outlives the server.
    server: LocalServer,
    dir: tempfile::TempDir,
}

impl OperatorPlatform {
    /// Initialises the installation, starts the server and the controller
    /// (default configuration), and waits until the controller answers (so no
    /// measurement includes its start-up).
    pub async fn start() -> Result<Self, BenchError> {
        Self::start_with(|c| c).await
    }

    /// As [`Self::start`], with the controller's configuration adjusted by
    /// `configure` (e.g. `|c| c.usage_every(..).police_every(..)`).
    pub async fn start_with(
        configure: impl FnOnce(ControllerConfig) -> ControllerConfig,
    ) -> Result<Self, BenchError> {
        let dir = tempfile::tempdir().map_err(|e| BenchError(format!("temp dir: {e}")))?;
        let mut install = Installation::init(dir.path().join("state"))?;
        let config = install.server_config(&install.default_server_options());
        let server = LocalServer::start(ServerOptions::new().config(config))
            .map_err(|e| BenchError(crate::one_line(&e.to_string())))?;
        install.set_urls(vec![server.url()], 1)?;
        let (controller, shutdown, serving) =
            spawn_controller(&install, configure(ControllerConfig::new(server.url()))).await?;
        let api = |e: agentbus_control::ApiError| BenchError(e.to_string());
        let cp = AdminClient::connect(&server.url(), &install.creds("admin.creds")?)
            .await
            .map_err(api)?;
        let platform = Self {
            cp,
            controller,
            install,
            shutdown,
            serving: Some(serving),
            server,
            dir,
        };
        platform.wait_answering().await?;
        Ok(platform)
    }

    /// A configuration for this deployment's server with the controller's
    /// defaults, to adjust and pass to [`Self::start_controller`].
    pub fn controller_config(&self) -> ControllerConfig {
        ControllerConfig::new(self.server.url())
    }

    /// Stops the controller and waits (at most 10 s) until it has stopped
    /// serving. Nothing polls the servers until [`Self::start_controller`].
    /// Stopping a stopped controller does nothing.
    pub async fn stop_controller(&mut self) -> Result<(), BenchError> {
        let Some(serving) = self.serving.take() else {
            return Ok(());
        };
        self.shutdown.fire();
        tokio::time::timeout(STOP_TIMEOUT, serving)
            .await
            .map_err(|_| {
                BenchError(format!(
                    "the controller did not stop within {STOP_TIMEOUT:?}"
                ))
            })?
            .map_err(|e| BenchError(format!("the controller's task: {e}")))
    }

    /// Starts a controller with `config` (stopping a running one first) and
    /// waits until it answers.
    pub async fn start_controller(&mut self, config: ControllerConfig) -> Result<(), BenchError> {
        self.stop_controller().await?;
        let (controller, shutdown, serving) = spawn_controller(&self.install, config).await?;
        self.controller = controller;
        self.shutdown = shutdown;
        self.serving = Some(serving);
        self.wait_answering().await
    }

    /// Waits (at most 10 s) until a controller answers the admin client.
    async fn wait_answering(&self) -> Result<(), BenchError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = self.cp.status().await {
            if Instant::now() > deadline {
                return Err(BenchError(format!("the controller never answered: {e}")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// The server's client URL.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// A private scratch directory (the temporary directory that holds the
    /// state directory; `tempfile` creates it with mode 0700), removed on drop.
    pub fn scratch(&self) -> &std::path::Path {
        self.dir.path()
    }
}

/// Connects a controller and serves it on a task of this runtime until the
/// returned signal fires.
async fn spawn_controller(
    install: &Installation,
    config: ControllerConfig,
) -> Result<(Arc<Controller>, Shutdown, tokio::task::JoinHandle<()>), BenchError> {
    let controller = Controller::connect(install, config).await?;
    let shutdown = Shutdown::new();
    let serving = controller.clone();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = serving.serve(stop).await {
            eprintln!("agentbus bench: controller stopped: {e}");
        }
    });
    Ok((controller, shutdown, task))
}

impl Drop for OperatorPlatform {
    fn drop(&mut self) {
        self.shutdown.fire();
    }
}
