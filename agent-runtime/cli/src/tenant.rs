//! `agentbus tenant ...`: calls to the controller, rendered.

use clap::{Args, Subcommand};

use agentbus_control::api::{CreateTenant, UpdateTenant};
use agentbus_control::controller::handlers::TenantView;

use crate::output::{print, usage, Failure, Output};
use crate::remote::Remote;

/// `agentbus tenant`.
#[derive(Debug, Args)]
pub struct TenantArgs {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    command: TenantCommand,
}

/// `agentbus tenant` commands.
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant: its own NATS account, limits from its tier.
    Create(CreateArgs),
    /// List tenants.
    List,
    /// Show one tenant: record, effective quotas, account, key versions.
    Get {
        /// The tenant id.
        id: String,
    },
    /// One tenant's figures: live connections and server counters, metered
    /// usage this hour and today, budgets, policing, agents and API keys.
    Stats {
        /// The tenant id.
        id: String,
    },
    /// Change a tenant: `--set KEY=VALUE`, `--unset FIELD`.
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
    /// Delete a tenant: its account, JetStream data, records and keys.
    Delete {
        /// The tenant id.
        id: String,
        /// Confirm (required).
        #[arg(long)]
        yes: bool,
    },
    /// Rotate the tenant's message key; running agents pick it up without restarting.
    RotateKey {
        /// The tenant id.
        id: String,
        /// Seconds until agents seal with the new key (default: the controller's, 30).
        #[arg(long)]
        grace_secs: Option<u64>,
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
    /// A quota override `FIELD=VALUE` (repeatable).
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    pub sets: Vec<String>,
    /// Create it without JetStream (every JetStream limit 0: no task
    /// dispatch or state store) instead of being refused when its JetStream
    /// reservation does not fit what the servers allow.
    #[arg(long = "no-jetstream")]
    pub no_jetstream: bool,
    /// Data residency: keep the tenant's streams and buckets on the servers
    /// tagged `region:<REGION>` in their config. Refused when fewer such
    /// servers answer than the deployment's replicas; cannot change later.
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
}

/// Arguments of `tenant update`.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The tenant id.
    pub id: String,
    /// `KEY=VALUE`: `name`, `tier`, `allow-agent-type`, `disallow-agent-type` or a
    /// quota field (e.g. `max_agents=20`). Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// A quota field whose override is removed (back to the tier's default).
    #[arg(long = "unset", value_name = "FIELD")]
    pub unsets: Vec<String>,
}

fn pairs(sets: &[String]) -> Result<Vec<(String, String)>, Failure> {
    sets.iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| usage(format!("--set {s:?}: expected KEY=VALUE")))
        })
        .collect()
}

fn table(list: &[TenantView]) -> String {
    let mut out = format!(
        "{:<24} {:<11} {:<10} {:<4} NAME",
        "ID", "TIER", "STATUS", "KEY"
    );
    for t in list {
        out.push_str(&format!(
            "\n{:<24} {:<11} {:<10} {:<4} {}",
            t.record.id.as_str(),
            t.record.tier.to_string(),
            t.record.status.to_string(),
            t.record.current_key,
            t.record.name
        ));
    }
    out
}

fn detail(t: &TenantView) -> String {
    let r = &t.record;
    let mut out = format!(
        "tenant     {}\nname       {}\ntier       {}\nstatus     {}\naccount    {}\nkeys       {:?} (current {})\nagent types {}\nquotas",
        r.id,
        r.name,
        r.tier,
        r.status,
        r.account,
        r.key_versions,
        r.current_key,
        r.settings.allowed_agent_types.iter().cloned().collect::<Vec<_>>().join(", "),
    );
    for field in agentbus_control::tiers::Quotas::FIELDS {
        if let Some(v) = t.quotas.get(field) {
            let mark = if r.settings.quota_overrides.contains_key(*field) {
                " (override)"
            } else {
                ""
            };
            out.push_str(&format!("\n  {field:<26} {v}{mark}"));
        }
    }
    out
}

/// Runs a tenant command.
pub async fn run(output: Output, args: TenantArgs) -> Result<(), Failure> {
    // Ids are checked here too, so a typo fails before any connection.
    let id = match &args.command {
        TenantCommand::List => None,
        TenantCommand::Create(a) => Some(a.id.clone()),
        TenantCommand::Update(a) => Some(a.id.clone()),
        TenantCommand::Get { id }
        | TenantCommand::Stats { id }
        | TenantCommand::Suspend { id }
        | TenantCommand::Activate { id }
        | TenantCommand::Delete { id, .. }
        | TenantCommand::RotateKey { id, .. } => Some(id.clone()),
    };
    if let Some(id) = &id {
        tenant_bus::TenantId::new(id)
            .map_err(|e| usage(format!("invalid tenant id {id:?}: {e}")))?;
    }
    match &args.command {
        TenantCommand::Update(a) if a.sets.is_empty() && a.unsets.is_empty() => {
            return Err(usage(
                "nothing to change: pass --set KEY=VALUE or --unset FIELD",
            ));
        }
        TenantCommand::Delete { yes: false, id } => {
            return Err(usage(format!(
                "deleting {id} destroys its account, data and keys: pass --yes"
            )));
        }
        _ => {}
    }
    let client = args.remote.connect().await?;
    match args.command {
        TenantCommand::Create(a) => {
            let req = CreateTenant {
                tier: Some(a.tier),
                name: a.name,
                agent_types: a.agent_types,
                quotas: pairs(&a.sets)?.into_iter().collect(),
                no_jetstream: a.no_jetstream,
                region: a.region,
            };
            let t = client.create_tenant_with(&a.id, &req).await?;
            print(output, &t, || {
                format!(
                    "created tenant {} ({}), account {}",
                    t.record.id, t.record.tier, t.record.account
                )
            })
        }
        TenantCommand::List => {
            let list = client.tenants().await?;
            print(output, &list, || table(&list))
        }
        TenantCommand::Get { id } => {
            let t = client.tenant(&id).await?;
            print(output, &t, || detail(&t))
        }
        TenantCommand::Stats { id } => {
            let s = client.tenant_stats(&id).await?;
            print(output, &s, || stats_table(&s))
        }
        TenantCommand::Update(a) => {
            let req = UpdateTenant {
                set: pairs(&a.sets)?,
                unset: a.unsets,
            };
            let t = client.update_tenant(&a.id, &req).await?;
            print(output, &t, || format!("updated tenant {}", t.record.id))
        }
        TenantCommand::Suspend { id } => {
            let t = client.suspend_tenant(&id).await?;
            print(output, &t, || format!("tenant {id} suspended"))
        }
        TenantCommand::Activate { id } => {
            let t = client.activate_tenant(&id).await?;
            print(output, &t, || format!("tenant {id} activated"))
        }
        TenantCommand::Delete { id, .. } => {
            let v = client.delete_tenant(&id).await?;
            print(output, &v, || format!("deleted tenant {id}"))
        }
        TenantCommand::RotateKey { id, grace_secs } => {
            let t = client
                .rotate_key(&id, grace_secs.map(std::time::Duration::from_secs))
                .await?;
            print(output, &t, || {
                format!(
                    "tenant {id}: key version {} added; agents seal with it from {} ms (accepted: {:?})",
                    t.record.current_key, t.record.key_promote_at_ms, t.record.key_versions
                )
            })
        }
    }
}

fn units_text(units: &std::collections::BTreeMap<String, u64>) -> String {
    if units.is_empty() {
        return "-".into();
    }
    units
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `agentbus tenant stats` for people.
fn stats_table(s: &agentbus_control::api::TenantStats) -> String {
    let c = |t: &agentbus_control::api::UsageTotals| {
        format!(
            "msgs_in {} bytes_in {} msgs_out {} bytes_out {}  units {}",
            t.counters.msgs_in,
            t.counters.bytes_in,
            t.counters.msgs_out,
            t.counters.bytes_out,
            units_text(&t.units)
        )
    };
    let mut out = format!(
        "tenant       {} ({}, {})\n\
         live         {} connections, {} subscriptions, {} slow consumers ({} servers answered)\n\
         this hour    {}\n\
         today        {}\n\
         agents       {} issued, {} revoked; {} API keys active\n\
         policing     {} strikes in 10 min; {} credentials cut",
        s.tenant,
        s.status,
        s.tier,
        s.live.connections,
        s.live.subscriptions,
        s.live.slow_consumers,
        s.live.servers,
        c(&s.usage_this_hour),
        c(&s.usage_today),
        s.agents_issued,
        s.agents_revoked,
        s.api_keys_active,
        s.strikes_last_10m,
        s.throttled.len()
    );
    for b in &s.budgets {
        out.push_str(&format!(
            "\nbudget       {}: {} of {} {} this {} ({}; {} left)",
            b.spec.name,
            b.spent,
            b.spec.hard,
            b.spec.unit,
            b.spec.period,
            b.spec.action,
            b.remaining
        ));
    }
    if !s.audit_log.is_empty() {
        out.push_str(&format!("\naudit log    in stream {}", s.audit_log));
    }
    for st in &s.streams {
        let place = match st.in_region {
            Some(true) => "; in region",
            Some(false) => "; OUTSIDE its region",
            None => "",
        };
        // Raised by the placement pass within a pass or two; one that stays
        // marked could not be raised (the controller's log says why).
        let below = if st.replicas < s.replicas {
            format!("; BELOW the deployment's R{}", s.replicas)
        } else {
            String::new()
        };
        out.push_str(&format!(
            "\nstream       {} R{} on {}{place}{below}",
            st.name,
            st.replicas,
            st.nodes.join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentbus_control::api::{LiveStats, TenantStats, TenantStream, UsageTotals};
    use agentbus_control::tiers::{Quotas, Tier};

    fn stats(replicas: usize, streams: &[(&str, usize)]) -> TenantStats {
        TenantStats {
            tenant: "acme".into(),
            status: "active".into(),
            tier: "pro".into(),
            quotas: Quotas::for_tier(Tier::Pro),
            live: LiveStats::default(),
            usage_this_hour: UsageTotals::default(),
            usage_today: UsageTotals::default(),
            budgets: Vec::new(),
            throttled: Default::default(),
            strikes_last_10m: 0,
            agents_issued: 1,
            agents_revoked: 0,
            api_keys_active: 0,
            streams: streams
                .iter()
                .map(|(name, r)| TenantStream {
                    name: name.to_string(),
                    replicas: *r,
                    nodes: vec!["n1".into()],
                    in_region: None,
                })
                .collect(),
            replicas,
            audit_log: String::new(),
        }
    }

    #[test]
    fn a_stream_below_the_deployments_replicas_is_marked() {
        let text = stats_table(&stats(3, &[("TASKS", 1), ("KV_STATE", 3)]));
        let line = |name: &str| {
            text.lines()
                .find(|l| l.contains(&format!(" {name} R")))
                .unwrap_or_else(|| panic!("no line for {name}: {text}"))
                .to_string()
        };
        assert!(
            line("TASKS").ends_with("; BELOW the deployment's R3"),
            "{text}"
        );
        assert!(!line("KV_STATE").contains("BELOW"), "{text}");
        // An older controller (no count): nothing is marked.
        assert!(!stats_table(&stats(0, &[("TASKS", 1)])).contains("BELOW"));
    }
}
