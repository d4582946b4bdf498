//! `agentbus up`: the embedded default server.
//!
//! On first run it creates the operator and accounts; then it starts nats-server
//! (found as the test harness finds it) in operator mode with JetStream on
//! 127.0.0.1, pushes every account, prints the URL on its own line and runs until
//! Ctrl-C or SIGTERM, when it stops the server gracefully.

use std::path::Path;
use std::time::Duration;

use clap::Args;

use super::CliError;
use agentbus_control::local_server::{LocalServer, ServerOptions};
use agentbus_control::{ControlErrorKind, ControlPlane};

/// Arguments of `agentbus up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Client port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 4222)]
    pub port: u16,
}

/// Runs `agentbus up`.
pub async fn run(state: &Path, args: UpArgs) -> Result<(), CliError> {
    let mut cp = match ControlPlane::open(state) {
        Ok(cp) => cp,
        Err(e) if e.kind() == ControlErrorKind::NotInitialized => {
            eprintln!(
                "agentbus: creating operator and accounts in {}",
                state.display()
            );
            ControlPlane::init(state)?
        }
        Err(e) => return Err(e.into()),
    };
    if args.port != 0 && std::net::TcpStream::connect(("127.0.0.1", args.port)).is_ok() {
        return Err(CliError(format!(
            "port {} on 127.0.0.1 is already in use (another `agentbus up`?); pass --port",
            args.port
        )));
    }
    let mut options = cp.default_server_options();
    options.port = args.port;
    let config = cp.server_config(&options)?;
    let mut server_options = ServerOptions::new()
        .config(config)
        .dir(state.join("server"));
    if args.port != 0 {
        server_options = server_options.port(args.port);
    }
    let mut server = LocalServer::start(server_options)
        .map_err(|e| CliError(super::one_line(&e.to_string())))?;
    let url = server.url();
    cp.set_server_url(&url)?;
    cp.connect(&url).await?;
    let pushed = cp.sync().await?;
    eprintln!(
        "agentbus: nats-server running (pid {}), {pushed} accounts loaded; Ctrl-C to stop",
        server.pid().unwrap_or(0)
    );
    println!("{url}");

    wait_for_shutdown().await;
    eprintln!("agentbus: stopping nats-server");
    cp.disconnect().await;
    server.shutdown(Duration::from_secs(10));
    Ok(())
}

async fn wait_for_shutdown() {
    #[cfg(unix)]
    {
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
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
