//! `agentbus tenant ...`: tenants through the registry (the JetStream key-value
//! bucket in the platform account, the one source of truth for tenant records)
//! and the control plane (each tenant's NATS account, pushed live).
//!
//! Order of writes, so a failure leaves nothing half-done:
//! - `create`: the registry record first (its atomic create rejects a duplicate id
//!   across every instance), then the account; if the account fails, the record is
//!   deleted again.
//! - `update`: every `--set` is validated before anything is written; the record,
//!   then the account limits; if the account fails, the record is restored.
//! - `suspend`/`activate`: the account first (the server acts on it), then the
//!   record; if the record fails, the account is restored.

use std::path::Path;

use clap::{Args, Subcommand};
use tenant_bus::TenantId;

use super::{open_live, parse_tenant, CliError};
use agentbus_control::registry::{
    Registry, RegistryErrorKind, SettingsPatch, TenantRecord, TenantSettings,
};
use agentbus_control::tiers::{Quotas, Tier};
use agentbus_control::{ControlErrorKind, ControlPlane};

/// `agentbus tenant` commands.
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant: a registry record and its own NATS account.
    Create(CreateArgs),
    /// List tenants.
    List,
    /// Show one tenant: record, effective quotas, account.
    Get {
        /// The tenant id.
        id: String,
    },
    /// Change a tenant: `--set KEY=VALUE` for `name`, `tier`, or any quota field.
    Update(UpdateArgs),
    /// Suspend a tenant: the server closes its connections and refuses new ones.
    Suspend {
        /// The tenant id.
        id: String,
    },
    /// Re-activate a suspended tenant.
    Activate {
        /// The tenant id.
        id: String,
    },
}

/// Arguments of `tenant create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The tenant id: a lowercase slug, 1 to 63 characters.
    pub id: String,
    /// The tier: free, pro or enterprise.
    #[arg(long, default_value = "free")]
    pub tier: String,
    /// A display name (default: the id).
    #[arg(long)]
    pub name: Option<String>,
    /// An agent type the tenant may run (repeatable; default: `default`).
    #[arg(long = "agent-type")]
    pub agent_types: Vec<String>,
}

/// Arguments of `tenant update`.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The tenant id.
    pub id: String,
    /// `KEY=VALUE`: `name`, `tier`, `allow-agent-type`, or a quota field
    /// (e.g. `max_agents=20`). Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE", required = true)]
    pub sets: Vec<String>,
}

/// Runs a tenant command.
pub async fn run(state: &Path, cmd: TenantCommand) -> Result<(), CliError> {
    // Validate the id before touching anything.
    let id = match &cmd {
        TenantCommand::List => {
            let (_, registry) = connect(state).await?;
            return list(&registry).await;
        }
        TenantCommand::Create(a) => parse_tenant(&a.id)?,
        TenantCommand::Update(a) => parse_tenant(&a.id)?,
        TenantCommand::Get { id }
        | TenantCommand::Suspend { id }
        | TenantCommand::Activate { id } => parse_tenant(id)?,
    };
    let (mut cp, registry) = connect(state).await?;
    match cmd {
        TenantCommand::Create(args) => create(&mut cp, &registry, &id, args).await,
        TenantCommand::List => list(&registry).await,
        TenantCommand::Get { .. } => get(&cp, &registry, &id).await,
        TenantCommand::Update(args) => update(&mut cp, &registry, &id, &args.sets).await,
        TenantCommand::Suspend { .. } => set_status(&mut cp, &registry, &id, true).await,
        TenantCommand::Activate { .. } => set_status(&mut cp, &registry, &id, false).await,
    }
}

/// Connects the control plane (live) and the registry (as a platform service).
pub async fn connect(state: &Path) -> Result<(ControlPlane, Registry), CliError> {
    let cp = open_live(state).await?;
    let creds = cp.issue_platform_service("agentbus-cli")?;
    let client = async_nats::ConnectOptions::with_credentials(&creds)
        .map_err(|e| CliError(format!("platform credentials: {e}")))?
        .name("agentbus-cli")
        .connect(cp.server_url())
        .await
        .map_err(|e| CliError(format!("connecting to {}: {e}", cp.server_url())))?;
    let registry = Registry::open(client)
        .await
        .map_err(|e| CliError(super::one_line(&e.to_string())))?;
    Ok((cp, registry))
}

fn reg_err(e: agentbus_control::registry::RegistryError) -> CliError {
    CliError(super::one_line(&e.to_string()))
}

async fn create(
    cp: &mut ControlPlane,
    registry: &Registry,
    id: &TenantId,
    args: CreateArgs,
) -> Result<(), CliError> {
    let tier: Tier = args.tier.parse().map_err(|e| CliError(format!("{e}")))?;
    let name = args.name.unwrap_or_else(|| id.to_string());
    let mut settings = TenantSettings::new();
    let types = if args.agent_types.is_empty() {
        vec!["default".to_string()]
    } else {
        args.agent_types
    };
    for t in &types {
        settings = settings.allow_agent_type(t);
    }
    let record = registry
        .create(id.as_str(), &name, tier, settings)
        .await
        .map_err(reg_err)?;
    if let Err(e) = cp
        .create_tenant_with_quotas(id.as_str(), tier, record.quotas())
        .await
    {
        // Undo the record so a retry starts clean.
        let _ = registry.delete(id).await;
        return Err(e.into());
    }
    println!(
        "created tenant {id} ({tier}), account {}",
        cp.tenant(id.as_str())?.account
    );
    Ok(())
}

async fn list(registry: &Registry) -> Result<(), CliError> {
    let records = registry.list().await.map_err(reg_err)?;
    println!("{:<24} {:<11} {:<10} NAME", "ID", "TIER", "STATUS");
    for r in records {
        println!(
            "{:<24} {:<11} {:<10} {}",
            r.id.as_str(),
            r.tier.to_string(),
            format!("{:?}", r.status).to_lowercase(),
            r.name
        );
    }
    Ok(())
}

async fn get(cp: &ControlPlane, registry: &Registry, id: &TenantId) -> Result<(), CliError> {
    let record = registry.get(id).await.map_err(reg_err)?;
    let account = cp.tenant(id.as_str()).ok();
    let view = serde_json::json!({
        "record": record,
        "quotas": record.quotas(),
        "account": account.as_ref().map(|a| a.account.clone()),
        "key_versions": account.as_ref().map(|a| a.key_versions.clone()),
    });
    let text = serde_json::to_string_pretty(&view).map_err(|e| CliError(e.to_string()))?;
    println!("{text}");
    Ok(())
}

/// Parses and validates every `--set` into a patch before anything is written.
fn parse_sets(record: &TenantRecord, sets: &[String]) -> Result<SettingsPatch, CliError> {
    let mut patch = SettingsPatch::new();
    let mut tier = record.tier;
    let mut overrides = record.settings.quota_overrides.clone();
    for set in sets {
        let (key, value) = set
            .split_once('=')
            .ok_or_else(|| CliError(format!("--set {set:?}: expected KEY=VALUE")))?;
        let (key, value) = (key.trim(), value.trim());
        match key {
            "name" => patch = patch.name(value),
            "tier" => {
                tier = value.parse().map_err(|e| CliError(format!("{e}")))?;
                patch = patch.tier(tier);
            }
            "allow-agent-type" => {
                tenant_bus::ids::validate_slug(value)
                    .map_err(|k| CliError(format!("agent type {value:?}: {k}")))?;
                patch = patch.allow_agent_type(value);
            }
            field => {
                Quotas::for_tier(tier)
                    .set(field, value)
                    .map_err(|e| CliError(format!("--set {set:?}: {e}")))?;
                overrides.insert(field.to_string(), value.to_string());
                patch = patch.set_quota(field, value);
            }
        }
    }
    // Overrides must also hold under a changed tier.
    let mut q = Quotas::for_tier(tier);
    for (k, v) in &overrides {
        q.set(k, v).map_err(|e| CliError(format!("{e}")))?;
    }
    Ok(patch)
}

async fn update(
    cp: &mut ControlPlane,
    registry: &Registry,
    id: &TenantId,
    sets: &[String],
) -> Result<(), CliError> {
    let before = registry.get(id).await.map_err(reg_err)?;
    let patch = parse_sets(&before, sets)?;
    let after = registry.update(id, &patch).await.map_err(reg_err)?;
    if let Err(e) = cp.update_quotas(id.as_str(), after.quotas()).await {
        // Restore the previous record.
        let restore = restore_patch(&before, &after);
        let _ = registry.update(id, &restore).await;
        return Err(e.into());
    }
    println!("updated tenant {id}");
    Ok(())
}

/// A patch that turns `after` back into `before` (name, tier, overrides, types).
fn restore_patch(before: &TenantRecord, after: &TenantRecord) -> SettingsPatch {
    let mut p = SettingsPatch::new().name(&before.name).tier(before.tier);
    for k in after.settings.quota_overrides.keys() {
        match before.settings.quota_overrides.get(k) {
            Some(v) => p = p.set_quota(k, v),
            None => p = p.clear_quota(k),
        }
    }
    for t in &after.settings.allowed_agent_types {
        if !before.settings.allowed_agent_types.contains(t) {
            p = p.disallow_agent_type(t);
        }
    }
    p
}

async fn set_status(
    cp: &mut ControlPlane,
    registry: &Registry,
    id: &TenantId,
    suspend: bool,
) -> Result<(), CliError> {
    // Unknown tenants are reported by the registry, the source of truth.
    let record = registry.get(id).await.map_err(reg_err)?;
    if record.is_active() != suspend {
        let state = if suspend { "suspended" } else { "active" };
        return Err(CliError(format!("tenant {id} is already {state}")));
    }
    let account = if suspend {
        cp.suspend_tenant(id.as_str()).await
    } else {
        cp.activate_tenant(id.as_str()).await
    };
    match account {
        Ok(_) => {}
        // The account may already be in the target state (an earlier run that
        // failed between the two writes): carry on and fix the record.
        Err(e) if e.kind() == ControlErrorKind::InvalidTransition => {}
        Err(e) => return Err(e.into()),
    }
    let result = if suspend {
        registry.suspend(id).await
    } else {
        registry.activate(id).await
    };
    if let Err(e) = result {
        let _ = if suspend {
            cp.activate_tenant(id.as_str()).await
        } else {
            cp.suspend_tenant(id.as_str()).await
        };
        return Err(reg_err(e));
    }
    println!(
        "tenant {id} {}",
        if suspend { "suspended" } else { "activated" }
    );
    Ok(())
}

/// Maps a registry "not found" to the CLI's wording (used by `agent`).
pub fn is_not_found(e: &agentbus_control::registry::RegistryError) -> bool {
    e.kind() == RegistryErrorKind::NotFound
}
