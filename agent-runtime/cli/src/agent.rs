//! `agentbus agent ...` and `agentbus admin ...`: calls to the controller, rendered.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};

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
    /// Issue an agent: write its credential bundle, a `.creds` file or a `nats` context.
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
    /// `bundle` and `creds`: the file to write. `context`: the directory that
    /// receives `NAME.json` and `NAME.creds` (default: the `nats` CLI's,
    /// `$XDG_CONFIG_HOME/nats/context` or `~/.config/nats/context`, created 0700 if
    /// missing). Files are created 0600, never overwrite anything and never follow
    /// a symlink.
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
    /// What to write: `bundle` (JSON for the agentbus libraries: url, tenant,
    /// agent, creds, keys), `creds` (a standard NATS `.creds` file) or `context`
    /// (a `nats` CLI context with url, creds and the tenant's inbox prefix, plus
    /// its `.creds` file beside it).
    #[arg(long, value_enum, default_value_t = CredsFormat::Bundle)]
    pub format: CredsFormat,
    /// The context's name with `--format context` (default `<tenant>.<agent>`).
    #[arg(long)]
    pub name: Option<String>,
}

/// What `agent create` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CredsFormat {
    /// The credential bundle (JSON) the agentbus libraries read.
    Bundle,
    /// A standard NATS `.creds` file (user JWT and seed), for any NATS client.
    Creds,
    /// A `nats` CLI context (ADR-21) and the `.creds` file it names.
    Context,
}

impl CredsFormat {
    fn as_str(self) -> &'static str {
        match self {
            Self::Bundle => "bundle",
            Self::Creds => "creds",
            Self::Context => "context",
        }
    }
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

/// The files `agent create` writes, in order; for a context, the `.creds` file
/// comes first and the context names it.
struct Targets {
    paths: Vec<PathBuf>,
    /// The context's name (`--format context`).
    context: Option<String>,
}

/// The `nats` CLI's context directory: `$XDG_CONFIG_HOME/nats/context`, else
/// `$HOME/.config/nats/context` (as natscli resolves it).
fn default_context_dir() -> Result<PathBuf, Failure> {
    let config = match std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from) {
        Some(x) if x.is_absolute() => x,
        _ => match std::env::var_os("HOME").map(PathBuf::from) {
            Some(home) if home.is_absolute() => home.join(".config"),
            _ => {
                return Err(usage(
                    "neither XDG_CONFIG_HOME nor HOME is set; pass --out DIR for the context",
                ))
            }
        },
    };
    Ok(config.join("nats").join("context"))
}

/// A context name natscli accepts, kept to a portable file-name alphabet.
fn check_context_name(name: &str) -> Result<(), Failure> {
    let fine = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && !name.contains("..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if fine {
        Ok(())
    } else {
        Err(usage(format!(
            "invalid context name {name:?}: use letters, digits, '.', '_' and '-' (no leading '.', no '..')"
        )))
    }
}

/// An existing directory, or one created now (0700, parents too).
fn ensure_dir(dir: &Path) -> Result<(), Failure> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(usage(format!(
            "{} is not a directory (--format context writes NAME.json and NAME.creds into --out DIR)",
            dir.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::DirBuilderExt as _;
                builder.mode(0o700);
            }
            builder
                .create(dir)
                .map_err(|e| usage(format!("cannot create {}: {e}", dir.display())))
        }
        Err(e) => Err(usage(format!("cannot use {}: {e}", dir.display()))),
    }
}

fn targets(a: &CreateArgs) -> Result<Targets, Failure> {
    match a.format {
        CredsFormat::Bundle | CredsFormat::Creds => {
            if a.name.is_some() {
                return Err(usage("--name applies to --format context only"));
            }
            let out = a.out.clone().ok_or_else(|| {
                usage(format!(
                    "--out FILE is required with --format {}",
                    a.format.as_str()
                ))
            })?;
            Ok(Targets {
                paths: vec![out],
                context: None,
            })
        }
        CredsFormat::Context => {
            let name = match &a.name {
                Some(n) => {
                    check_context_name(n)?;
                    n.clone()
                }
                None => format!("{}.{}", a.tenant, a.agent),
            };
            let dir = match &a.out {
                Some(d) => d.clone(),
                None => default_context_dir()?,
            };
            ensure_dir(&dir)?;
            // The context names its creds file by an absolute path: natscli and
            // nats-py read it from wherever they run.
            let dir = std::path::absolute(&dir)
                .map_err(|e| usage(format!("cannot resolve {}: {e}", dir.display())))?;
            Ok(Targets {
                paths: vec![
                    dir.join(format!("{name}.creds")),
                    dir.join(format!("{name}.json")),
                ],
                context: Some(name),
            })
        }
    }
}

/// The bytes of each target, in order.
fn render(
    a: &CreateArgs,
    t: &Targets,
    bundle: &tenant_bus::CredentialBundle,
) -> Result<Vec<Vec<u8>>, String> {
    let creds = || {
        bundle.creds.clone().ok_or_else(|| {
            "the controller issued no .creds (a server without authentication)".to_string()
        })
    };
    match a.format {
        CredsFormat::Bundle => Ok(vec![
            serde_json::to_vec_pretty(bundle).map_err(|e| e.to_string())?
        ]),
        CredsFormat::Creds => Ok(vec![creds()?.into_bytes()]),
        CredsFormat::Context => {
            let creds_path = t.paths.first().ok_or("no creds path")?;
            let context = serde_json::json!({
                "description": format!(
                    "agentbus agent {} of tenant {} (subjects under tenant.{}.)",
                    a.agent, a.tenant, a.tenant
                ),
                "url": bundle.url,
                "creds": creds_path,
                "inbox_prefix": tenant_bus::subject::inbox_prefix(&bundle.tenant),
            });
            let mut json = serde_json::to_vec_pretty(&context).map_err(|e| e.to_string())?;
            json.push(b'\n');
            Ok(vec![creds()?.into_bytes(), json])
        }
    }
}

fn remove_all(paths: &[PathBuf]) {
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}

/// `agent create`: claims the output files, issues the agent, writes them.
async fn create_agent(output: Output, remote: &Remote, a: &CreateArgs) -> Result<(), Failure> {
    let t = targets(a)?;
    // Claim every output file before anything is issued.
    let mut files = Vec::new();
    for (i, path) in t.paths.iter().enumerate() {
        match create_exclusive(path) {
            Ok(f) => files.push(f),
            Err(e) => {
                remove_all(&t.paths[..i]);
                return Err(e);
            }
        }
    }
    let client = match remote.connect().await {
        Ok(c) => c,
        Err(e) => {
            remove_all(&t.paths);
            return Err(e);
        }
    };
    let issued = match client
        .create_agent(&a.tenant, &a.agent, &a.agent_type)
        .await
    {
        Ok(i) => i,
        Err(e) => {
            remove_all(&t.paths);
            return Err(e.into());
        }
    };
    let written = render(a, &t, &issued.bundle).and_then(|contents| {
        use std::io::Write as _;
        for ((mut file, bytes), path) in files.into_iter().zip(contents).zip(&t.paths) {
            file.write_all(&bytes)
                .and_then(|()| file.sync_all())
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(())
    });
    if let Err(e) = written {
        remove_all(&t.paths);
        let _ = client.revoke_agent(&a.tenant, &a.agent).await;
        return Err(usage(format!(
            "writing credentials: {e} (the agent was revoked again)"
        )));
    }
    let main = t.paths.last().cloned().unwrap_or_default();
    let shown = serde_json::json!({
        "agent": issued.agent,
        "format": a.format.as_str(),
        "out": main,
        "files": t.paths,
        "context": t.context,
    });
    print(output, &shown, || match &t.context {
        Some(name) => {
            format!(
            "wrote nats context {name} ({}) and its creds ({}) for agent {} ({}) of tenant {}\n\
             use: nats --context {name} sub 'tenant.{}.>'",
            main.display(),
            t.paths.first().map(|p| p.display().to_string()).unwrap_or_default(),
            a.agent,
            a.agent_type,
            a.tenant,
            a.tenant
        )
        }
        None => format!(
            "wrote {} of agent {} ({}) of tenant {} to {}",
            if a.format == CredsFormat::Creds {
                "the .creds"
            } else {
                "credentials"
            },
            a.agent,
            a.agent_type,
            a.tenant,
            main.display()
        ),
    })
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
        return create_agent(output, &args.remote, a).await;
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
            "server       {}\nurls         {}\ncontrollers  {} (answered: {})\ntenants      {}\nnodes        {}\nreplicas     {} (the deployment's)\nstreams and buckets of the platform account",
            s.server,
            s.urls.join(","),
            s.controllers,
            s.controller_id,
            s.tenants,
            if s.nodes.is_empty() { "1 (single node)".to_string() } else { s.nodes.join(", ") },
            s.replicas,
        );
        for b in &s.buckets {
            out.push_str(&format!(
                "\n  {:<24} {:<6}  R{}  {} values  leader {}{}",
                b.bucket,
                b.kind,
                b.replicas,
                b.values,
                b.leader.as_deref().unwrap_or("-"),
                if b.replicas < s.replicas {
                    "  BELOW THE DEPLOYMENT'S REPLICAS (raised at the next placement pass)"
                } else {
                    ""
                }
            ));
        }
        let mib = |v: u64| v as f64 / (1024.0 * 1024.0);
        let js = &s.jetstream;
        out.push_str(&format!(
            "\njetstream    tenants reserve {:.1} MiB memory, {:.1} MiB storage",
            mib(js.tenants_memory),
            mib(js.tenants_storage)
        ));
        for j in &js.servers {
            out.push_str(&format!(
                "\n  {:<24} allows {:.1} MiB memory, {:.1} MiB storage{}",
                j.server,
                mib(u64::try_from(j.max_memory).unwrap_or(0)),
                mib(u64::try_from(j.max_storage).unwrap_or(0)),
                if js.tenants_memory > u64::try_from(j.max_memory).unwrap_or(0)
                    || js.tenants_storage > u64::try_from(j.max_storage).unwrap_or(0)
                {
                    "  OVER-COMMITTED"
                } else {
                    ""
                }
            ));
        }
        out
    })
}
