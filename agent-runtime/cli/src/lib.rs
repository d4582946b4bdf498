//! The `agentbus` command line: argument definitions and dispatch.
//!
//! Every command finds its state through `--state DIR` (default `.agentbus/` in
//! the working directory). Errors print one line on stderr (`agentbus: ...`) and
//! exit non-zero; a failed command leaves the state as it was.
//!
//! # Layout
//! - [`up`]: `agentbus up`, the embedded local server.
//! - [`tenant`]: `agentbus tenant ...`.
//! - [`agent`]: `agentbus agent ...`.
//! - [`msg`]: `agentbus pub | sub | request`.

pub mod agent;
pub mod msg;
pub mod tenant;
pub mod up;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use agentbus_control::{ControlError, ControlErrorKind, ControlPlane};

/// Operate a multi-tenant agent bus on NATS.
#[derive(Debug, Parser)]
#[command(name = "agentbus", version, about, long_about = None)]
pub struct Cli {
    /// The control-plane state directory (operator, accounts, keys).
    #[arg(
        long,
        global = true,
        default_value = ".agentbus",
        env = "AGENTBUS_STATE"
    )]
    pub state: PathBuf,

    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a local nats-server in operator mode (creating the state on first run).
    Up(up::UpArgs),
    /// Create, inspect, tier, suspend and activate tenants.
    #[command(subcommand)]
    Tenant(tenant::TenantCommand),
    /// Issue and revoke agent credentials.
    #[command(subcommand)]
    Agent(agent::AgentCommand),
    /// Publish a sealed message as an agent.
    Pub(msg::PubArgs),
    /// Subscribe as an agent and print verified messages.
    Sub(msg::SubArgs),
    /// Send a sealed request as an agent and print the verified reply.
    Request(msg::RequestArgs),
    /// Benchmark the sealed bus against raw async-nats (writes BENCHMARKS.md with --out).
    Bench(agentbus_bench::BenchArgs),
    /// One benchmark measurement in its own process (used by `bench`).
    #[command(subcommand, hide = true)]
    BenchWorker(agentbus_bench::worker::WorkerCommand),
}

/// A command's failure: one line for the user.
#[derive(Debug)]
pub struct CliError(pub String);

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CliError {}

impl From<ControlError> for CliError {
    fn from(e: ControlError) -> Self {
        CliError(one_line(&e.to_string()))
    }
}

/// A tenant id from the command line, or the rule it broke.
pub fn parse_tenant(s: &str) -> Result<tenant_bus::TenantId, CliError> {
    tenant_bus::TenantId::new(s).map_err(|e| CliError(format!("invalid tenant id: {e}")))
}

/// An agent id from the command line, or the rule it broke.
pub fn parse_agent(s: &str) -> Result<tenant_bus::AgentId, CliError> {
    tenant_bus::AgentId::new(s).map_err(|e| CliError(format!("invalid agent id: {e}")))
}

/// Collapses a multi-line error into one line.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Runs a parsed command.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Up(args) => up::run(&cli.state, args).await,
        Command::Tenant(cmd) => tenant::run(&cli.state, cmd).await,
        Command::Agent(cmd) => agent::run(&cli.state, cmd).await,
        Command::Pub(args) => msg::publish(args).await,
        Command::Sub(args) => msg::subscribe(args).await,
        Command::Request(args) => msg::request(args).await,
        Command::Bench(args) => agentbus_bench::run(args).await.map_err(|e| CliError(e.0)),
        // Workers build their own single-threaded runtime; run them off this one.
        Command::BenchWorker(cmd) => {
            tokio::task::spawn_blocking(move || agentbus_bench::worker::run(cmd))
                .await
                .map_err(|e| CliError(format!("bench worker: {e}")))?
                .map_err(|e| CliError(e.0))
        }
    }
}

/// Opens an existing state directory, with a hint when there is none.
pub fn open_state(state: &std::path::Path) -> Result<ControlPlane, CliError> {
    ControlPlane::open(state).map_err(|e| {
        if e.kind() == ControlErrorKind::NotInitialized {
            CliError(format!(
                "no agentbus state at {} (run `agentbus up` first, or pass --state DIR)",
                state.display()
            ))
        } else {
            e.into()
        }
    })
}

/// Opens the state and connects to its server as the system user, so changes are
/// pushed live.
pub async fn open_live(state: &std::path::Path) -> Result<ControlPlane, CliError> {
    let mut cp = open_state(state)?;
    let url = cp.server_url().to_string();
    cp.connect(&url).await.map_err(|e| {
        if e.kind() == ControlErrorKind::Connect {
            CliError(format!(
                "no server running at {url} (start it with `agentbus up --state {}`)",
                state.display()
            ))
        } else {
            e.into()
        }
    })?;
    Ok(cp)
}
