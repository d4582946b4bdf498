//! The `agentbus` command line: a thin client. It parses, calls the controller
//! (or the bus, for `pub`/`sub`/`request`, or the benchmark), and renders; it holds
//! no state of its own.
//!
//! Admin commands (`tenant`, `agent`, `admin`, `status`) reach the controller with
//! `--url` and `--creds`, by default those of the local installation in `--state`.
//! Every one takes `-o table|json`; exit codes are in [`output`].
//!
//! # Layout
//! - [`up`]: `agentbus up` (server + embedded controller) and `agentbus controller`;
//!   [`stores`]: which stores a state directory holds, so `up` never hides them;
//!   [`import`]: `agentbus import` and `up --cluster N --from-single` copy a
//!   deployment's data into new servers.
//! - [`tenant`]: `agentbus tenant ...`.
//! - [`agent`]: `agentbus agent ...`, `agentbus admin ...`, `agentbus status`.
//! - [`audit`]: `agentbus audit list | verify | proof | check-proof`.
//! - [`key`], [`usage`], [`budget`]: API keys, usage rows, budgets.
//! - [`msg`]: `agentbus pub | sub | request`.
//! - [`output`], [`remote`]: rendering, exit codes, reaching the controller.

pub mod agent;
pub mod audit;
pub mod budget;
pub mod import;
pub mod key;
pub mod msg;
pub mod output;
pub mod remote;
pub mod stores;
pub mod tenant;
pub mod up;
pub mod usage;

use clap::{Parser, Subcommand};

use output::{Failure, Output};

/// Operate a multi-tenant agent bus on NATS: tenants, agents, admins and the local server.
#[derive(Debug, Parser)]
#[command(
    name = "agentbus",
    version,
    about = "Operate agentbus, a multi-tenant message bus for AI agents on NATS: run the server and controller, manage tenants, agents and admins, and message as an agent.",
    long_about = None
)]
pub struct Cli {
    /// Output format of admin commands.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,

    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start nats-server in operator mode with an embedded controller (creating
    /// the installation on first run).
    Up(up::UpArgs),
    /// Run a controller instance (any number may run; they share the work).
    Controller(up::ControllerArgs),
    /// Copy a deployment's data (every tenant, key, agent, usage, budget, audit
    /// log and tenant stream) from other servers into the installation's, before
    /// any controller serves them.
    Import(import::ImportArgs),
    /// Show the server, nodes, controllers and buckets with their replicas.
    Status(remote::Remote),
    /// Create, inspect, change, suspend, delete tenants and rotate their keys.
    Tenant(tenant::TenantArgs),
    /// Issue, list and revoke agent credentials.
    Agent(agent::AgentArgs),
    /// Create, list and revoke admin identities.
    Admin(agent::AdminArgs),
    /// Create, list, revoke and rotate API keys (agents log in with one as their token).
    Key(key::KeyArgs),
    /// A tenant's usage per hour or day, as the NATS servers counted it.
    Usage(usage::UsageArgs),
    /// Budgets: caps on a reported unit per tenant per day or month.
    Budget(budget::BudgetArgs),
    /// Read, verify and prove the tamper-evident audit log.
    Audit(audit::AuditArgs),
    /// Print a shell completion script.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Publish a sealed message as an agent.
    Pub(msg::PubArgs),
    /// Subscribe as an agent and print verified messages.
    Sub(msg::SubArgs),
    /// Send a sealed request as an agent and print the verified reply.
    Request(msg::RequestArgs),
    /// Answer requests as an agent (sealed): echo each payload, or a fixed reply.
    Reply(msg::ReplyArgs),
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

/// Writes a line to stdout; a closed pipe (`agentbus ... | head`) ends the
/// process quietly with exit 0 instead of a panic.
pub fn write_stdout(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
        std::process::exit(0);
    }
}

/// Runs a parsed command.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    let output = cli.output;
    match cli.command {
        Command::Up(args) => up::run(args).await,
        Command::Controller(args) => up::controller(args).await,
        Command::Import(args) => import::run(output, args).await,
        Command::Status(remote) => agent::status(output, remote).await,
        Command::Tenant(args) => tenant::run(output, args).await,
        Command::Agent(args) => agent::run(output, args).await,
        Command::Admin(args) => agent::run_admin(output, args).await,
        Command::Key(args) => key::run(output, args).await,
        Command::Usage(args) => usage::run(output, args).await,
        Command::Budget(args) => budget::run(output, args).await,
        Command::Audit(args) => audit::run(output, args).await,
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "agentbus", &mut std::io::stdout());
            Ok(())
        }
        Command::Pub(args) => msg::publish(args, output).await,
        Command::Sub(args) => msg::subscribe(args, output).await,
        Command::Request(args) => msg::request(args, output).await,
        Command::Reply(args) => msg::reply(args).await,
        Command::Bench(args) => Ok(agentbus_bench::run(args).await.map_err(|e| CliError(e.0))?),
        // Workers build their own single-threaded runtime; run them off this one.
        Command::BenchWorker(cmd) => {
            Ok(
                tokio::task::spawn_blocking(move || agentbus_bench::worker::run(cmd))
                    .await
                    .map_err(|e| CliError(format!("bench worker: {e}")))?
                    .map_err(|e| CliError(e.0))?,
            )
        }
    }
}
