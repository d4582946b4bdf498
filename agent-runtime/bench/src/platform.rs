//! An operator-mode deployment for the measurements that need the control
//! plane (onboarding, audit, logins): a fresh installation in a temporary
//! state directory, a nats-server configured from it (per-tenant accounts,
//! full resolver, JetStream, the auth callout's account and sentinel), a
//! controller serving in this process, and the bootstrap platform-admin's
//! client. Everything is torn down on drop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbus_control::controller::shutdown::Shutdown;
use agentbus_control::local_server::{LocalServer, ServerOptions};
use agentbus_control::{AdminClient, Controller, ControllerConfig, Installation};

use crate::BenchError;

/// A running operator-mode deployment (see the module docs).
pub struct OperatorPlatform {
    /// The platform-admin's client of the controller.
    pub cp: AdminClient,
    /// The serving controller.
    pub controller: Arc<Controller>,
    /// The installation (state directory, KEK, credentials).
    pub install: Installation,
    shutdown: Shutdown,
    // Declared after everything that talks to it: fields drop in order, so the
    // server outlives the clients and the state directory outlives the server.
    server: LocalServer,
    dir: tempfile::TempDir,
}

impl OperatorPlatform {
    /// Initialises the installation, starts the server and the controller,
    /// and waits until the controller answers (so no measurement includes its
    /// start-up).
    pub async fn start() -> Result<Self, BenchError> {
        let dir = tempfile::tempdir().map_err(|e| BenchError(format!("temp dir: {e}")))?;
        let mut install = Installation::init(dir.path().join("state"))?;
        let config = install.server_config(&install.default_server_options());
        let server = LocalServer::start(ServerOptions::new().config(config))
            .map_err(|e| BenchError(crate::one_line(&e.to_string())))?;
        install.set_urls(vec![server.url()], 1)?;
        let controller = Controller::connect(&install, ControllerConfig::new(server.url())).await?;
        let shutdown = Shutdown::new();
        let serving = controller.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = serving.serve(stop).await {
                eprintln!("agentbus bench: controller stopped: {e}");
            }
        });
        let api = |e: agentbus_control::ApiError| BenchError(e.to_string());
        let cp = AdminClient::connect(&server.url(), &install.creds("admin.creds")?)
            .await
            .map_err(api)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = cp.status().await {
            if Instant::now() > deadline {
                return Err(BenchError(format!("the controller never answered: {e}")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            cp,
            controller,
            install,
            shutdown,
            server,
            dir,
        })
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

impl Drop for OperatorPlatform {
    fn drop(&mut self) {
        self.shutdown.fire();
    }
}
