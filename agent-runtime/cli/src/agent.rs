//! `agentbus agent ...`: agent credentials.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use super::CliError;

/// `agentbus agent` commands.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Issue an agent's credential bundle (JSON: url, tenant, agent, creds, keys).
    Create(CreateArgs),
    /// Revoke an agent: the server closes its connections and refuses new ones.
    Revoke {
        /// The tenant id.
        tenant: String,
        /// The agent id.
        agent: String,
    },
}

/// Arguments of `agent create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The tenant id.
    pub tenant: String,
    /// The agent id (a lowercase slug, unique in the tenant).
    pub agent: String,
    /// The agent type; must be one of the tenant's allowed agent types.
    #[arg(long = "type", default_value = "default")]
    pub agent_type: String,
    /// Where to write the bundle (created with 0600 permissions; must not exist).
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs an agent command.
pub async fn run(state: &Path, cmd: AgentCommand) -> Result<(), CliError> {
    match cmd {
        AgentCommand::Create(args) => create(state, args).await,
        AgentCommand::Revoke { tenant, agent } => {
            let tenant = super::parse_tenant(&tenant)?;
            let agent = super::parse_agent(&agent)?;
            let mut cp = super::open_live(state).await?;
            cp.revoke_agent(tenant.as_str(), agent.as_str()).await?;
            println!("revoked agent {agent} of tenant {tenant}");
            Ok(())
        }
    }
}

async fn create(state: &Path, args: CreateArgs) -> Result<(), CliError> {
    let tenant = super::parse_tenant(&args.tenant)?;
    let agent = super::parse_agent(&args.agent)?;
    tenant_bus::ids::validate_slug(&args.agent_type)
        .map_err(|k| CliError(format!("invalid agent type {:?}: {k}", args.agent_type)))?;
    if args.out.exists() {
        return Err(CliError(format!(
            "{} already exists; not overwriting credentials",
            args.out.display()
        )));
    }
    let (mut cp, registry) = super::tenant::connect(state).await?;
    let record = registry.get(&tenant).await.map_err(|e| {
        if super::tenant::is_not_found(&e) {
            CliError(format!("unknown tenant {tenant}"))
        } else {
            CliError(super::one_line(&e.to_string()))
        }
    })?;
    if !record.is_active() {
        return Err(CliError(format!(
            "tenant {tenant} is suspended; no credentials are issued"
        )));
    }
    if !record.allows_agent_type(&args.agent_type) {
        let allowed: Vec<&str> = record
            .settings
            .allowed_agent_types
            .iter()
            .map(String::as_str)
            .collect();
        return Err(CliError(format!(
            "agent type {:?} is not allowed for tenant {tenant} (allowed: {})",
            args.agent_type,
            if allowed.is_empty() {
                "none".to_string()
            } else {
                allowed.join(", ")
            }
        )));
    }
    // Claim the output file first, so an unwritable path fails before anything is
    // issued.
    tenant_bus::bundle::write_private(&args.out, b"")
        .map_err(|e| CliError(format!("cannot write {}: {e}", args.out.display())))?;
    let bundle = match cp.issue_agent(tenant.as_str(), agent.as_str(), &args.agent_type) {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_file(&args.out);
            return Err(e.into());
        }
    };
    if let Err(e) = bundle.write_to_file(&args.out) {
        let _ = std::fs::remove_file(&args.out);
        let _ = cp.revoke_agent(tenant.as_str(), agent.as_str()).await;
        return Err(CliError(super::one_line(&e.to_string())));
    }
    println!(
        "wrote credentials of agent {agent} ({}) of tenant {tenant} to {}",
        args.agent_type,
        args.out.display()
    );
    Ok(())
}
