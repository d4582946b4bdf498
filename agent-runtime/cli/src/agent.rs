//! `agentbus agent ...` and `agentbus admin ...`: calls to the controller, rendered.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use agentbus_control::api::Role;
use agentbus_control::store::{AdminRecord, AgentRecord};

use crate::output::{print, usage, Failure, Output};
use crate::remote::Remote;

/// `agentbus agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    command: AgentCommand,
}

/// `agentbus agent` commands.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Issue an agent's credential bundle (JSON: url, tenant, agent, creds, keys).
    Create(CreateArgs),
    /// List a tenant's agents (revoked ones included).
    List {
        /// The tenant id.
        tenant: String,
    },
    /// Show one agent.
    Get {
        /// The tenant id.
        tenant: String,
        /// The agent id.
        agent: String,
    },
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
    /// Where to write the bundle (created 0600; must not exist; never follows a
    /// symlink).
    #[arg(long)]
    pub out: PathBuf,
}

fn check_ids(tenant: &str, agent: Option<&str>) -> Result<(), Failure> {
    tenant_bus::TenantId::new(tenant)
        .map_err(|e| usage(format!("invalid tenant id {tenant:?}: {e}")))?;
    if let Some(a) = agent {
        tenant_bus::AgentId::new(a).map_err(|e| usage(format!("invalid agent id {a:?}: {e}")))?;
    }
    Ok(())
}

fn agents_table(list: &[AgentRecord]) -> String {
    let mut out = format!("{:<24} {:<16} {:<8} USER", "AGENT", "TYPE", "STATE");
    for a in list {
        out.push_str(&format!(
            "\n{:<24} {:<16} {:<8} {}",
            a.agent.as_str(),
            a.agent_type,
            if a.revoked_at.is_some() {
                "revoked"
            } else {
                "active"
            },
            a.user
        ));
    }
    out
}

/// Creates `path` for writing: exclusively (fails if anything exists there,
/// including a dangling symlink) and 0600 from the start.
fn create_exclusive(path: &Path) -> Result<std::fs::File, Failure> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        // O_NOFOLLOW as well: `create_new` already refuses an existing symlink.
        options.mode(0o600).custom_flags(libc_nofollow());
    }
    options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            usage(format!(
                "{} already exists; not overwriting credentials",
                path.display()
            ))
        } else {
            usage(format!("cannot create {}: {e}", path.display()))
        }
    })
}

#[cfg(unix)]
fn libc_nofollow() -> i32 {
    // O_NOFOLLOW on Linux (all architectures agentbus builds for) and the BSDs.
    #[cfg(target_os = "linux")]
    {
        0o400000
    }
    #[cfg(not(target_os = "linux"))]
    {
        0x100
    }
}

/// Runs an agent command.
pub async fn run(output: Output, args: AgentArgs) -> Result<(), Failure> {
    match &args.command {
        AgentCommand::Create(a) => {
            check_ids(&a.tenant, Some(&a.agent))?;
            tenant_bus::ids::validate_slug(&a.agent_type)
                .map_err(|k| usage(format!("invalid agent type {:?}: {k}", a.agent_type)))?;
        }
        AgentCommand::List { tenant } => check_ids(tenant, None)?,
        AgentCommand::Get { tenant, agent } | AgentCommand::Revoke { tenant, agent } => {
            check_ids(tenant, Some(agent))?
        }
    }
    if let AgentCommand::Create(a) = &args.command {
        // Claim the output file before anything is issued.
        let file = create_exclusive(&a.out)?;
        let client = match args.remote.connect().await {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&a.out);
                return Err(e);
            }
        };
        let issued = match client
            .create_agent(&a.tenant, &a.agent, &a.agent_type)
            .await
        {
            Ok(i) => i,
            Err(e) => {
                let _ = std::fs::remove_file(&a.out);
                return Err(e.into());
            }
        };
        let written = serde_json::to_vec_pretty(&issued.bundle)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                use std::io::Write as _;
                let mut file = file;
                file.write_all(&bytes)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&a.out);
            let _ = client.revoke_agent(&a.tenant, &a.agent).await;
            return Err(usage(format!(
                "writing {}: {e} (the agent was revoked again)",
                a.out.display()
            )));
        }
        let shown = serde_json::json!({ "agent": issued.agent, "out": a.out });
        return print(output, &shown, || {
            format!(
                "wrote credentials of agent {} ({}) of tenant {} to {}",
                a.agent,
                a.agent_type,
                a.tenant,
                a.out.display()
            )
        });
    }
    let client = args.remote.connect().await?;
    match args.command {
        AgentCommand::Create(_) => Ok(()),
        AgentCommand::List { tenant } => {
            let list = client.agents(&tenant).await?;
            print(output, &list, || agents_table(&list))
        }
        AgentCommand::Get { tenant, agent } => {
            let a = client.agent(&tenant, &agent).await?;
            print(output, &a, || agents_table(std::slice::from_ref(&a)))
        }
        AgentCommand::Revoke { tenant, agent } => {
            let a = client.revoke_agent(&tenant, &agent).await?;
            print(output, &a, || {
                format!("revoked agent {agent} of tenant {tenant}")
            })
        }
    }
}

/// `agentbus admin`.
#[derive(Debug, Args)]
pub struct AdminArgs {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    command: AdminCommand,
}

/// `agentbus admin` commands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create an admin identity and write its `.creds` (0600).
    Create {
        /// The admin's name (a slug).
        name: String,
        /// platform-admin, tenant-admin or viewer.
        #[arg(long)]
        role: Role,
        /// The tenant of a tenant-admin (or of a tenant-scoped viewer).
        #[arg(long)]
        tenant: Option<String>,
        /// Where to write the `.creds` (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// List admins.
    List,
    /// Revoke an admin: the controller refuses its requests from now on.
    Revoke {
        /// The admin's name.
        name: String,
    },
}

fn admins_table(list: &[AdminRecord]) -> String {
    let mut out = format!("{:<20} {:<15} {:<20} STATE", "NAME", "ROLE", "TENANT");
    for a in list {
        out.push_str(&format!(
            "\n{:<20} {:<15} {:<20} {}",
            a.name,
            a.role.to_string(),
            a.tenant
                .as_ref()
                .map(|t| t.to_string())
                .unwrap_or_else(|| "-".into()),
            if a.revoked_at.is_some() {
                "revoked"
            } else {
                "active"
            }
        ));
    }
    out
}

/// Runs an admin command.
pub async fn run_admin(output: Output, args: AdminArgs) -> Result<(), Failure> {
    match args.command {
        AdminCommand::Create {
            name,
            role,
            tenant,
            out,
        } => {
            tenant_bus::ids::validate_slug(&name)
                .map_err(|k| usage(format!("invalid admin name {name:?}: {k}")))?;
            let file = create_exclusive(&out)?;
            let client = match args.remote.connect().await {
                Ok(c) => c,
                Err(e) => {
                    let _ = std::fs::remove_file(&out);
                    return Err(e);
                }
            };
            let issued = match client.create_admin(&name, role, tenant.as_deref()).await {
                Ok(i) => i,
                Err(e) => {
                    let _ = std::fs::remove_file(&out);
                    return Err(e.into());
                }
            };
            {
                use std::io::Write as _;
                let mut file = file;
                file.write_all(issued.creds.as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(|e| usage(format!("writing {}: {e}", out.display())))?;
            }
            let shown = serde_json::json!({ "admin": issued.admin, "out": out });
            print(output, &shown, || {
                format!("wrote {role} {name} credentials to {}", out.display())
            })
        }
        AdminCommand::List => {
            let client = args.remote.connect().await?;
            let list = client.admins().await?;
            print(output, &list, || admins_table(&list))
        }
        AdminCommand::Revoke { name } => {
            let client = args.remote.connect().await?;
            let a = client.revoke_admin(&name).await?;
            print(output, &a, || format!("revoked admin {name}"))
        }
    }
}

/// `agentbus status`.
pub async fn status(output: Output, remote: Remote) -> Result<(), Failure> {
    let client = remote.connect().await?;
    let s = client.status().await?;
    print(output, &s, || {
        let mut out = format!(
            "server       {}\nurls         {}\ncontrollers  {} (answered: {})\ntenants      {}\nnodes        {}\nbuckets",
            s.server,
            s.urls.join(","),
            s.controllers,
            s.controller_id,
            s.tenants,
            if s.nodes.is_empty() { "1 (single node)".to_string() } else { s.nodes.join(", ") },
        );
        for b in &s.buckets {
            out.push_str(&format!(
                "\n  {:<20} R{}  {} values  leader {}",
                b.bucket,
                b.replicas,
                b.values,
                b.leader.as_deref().unwrap_or("-")
            ));
        }
        out
    })
}
