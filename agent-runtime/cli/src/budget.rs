//! `agentbus budget ...`: caps on a unit agents report, per tenant per UTC day
//! or month, enforced atomically by the controller (see
//! `agentbus_control::budget`).

use std::time::Duration;

use clap::{Args, Subcommand};

use agentbus_control::budget::{Action, BudgetSpec, BudgetView, Period};

use crate::output::{print, usage, Failure, Output};
use crate::remote::Remote;

/// `agentbus budget`.
#[derive(Debug, Args)]
pub struct BudgetArgs {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    command: BudgetCommand,
}

/// `agentbus budget` commands.
#[derive(Debug, Subcommand)]
pub enum BudgetCommand {
    /// Create or replace a budget on a reported unit.
    ///
    /// Amounts are integers in the unit's own base: report money in
    /// micro-dollars (`llm.cost_usd_micros`, $0.50 = 500000).
    Set {
        /// The tenant id.
        tenant: String,
        /// The budget's name (lowercase letters, digits, '-', '_').
        name: String,
        /// The unit it caps, as agents report it (e.g. `llm.cost_usd_micros`).
        #[arg(long)]
        unit: String,
        /// The period: `day` or `month` (UTC).
        #[arg(long = "per", value_parser = parse_period, default_value = "month")]
        period: Period,
        /// The hard cap per period.
        #[arg(long)]
        hard: u64,
        /// A lower threshold that only alerts.
        #[arg(long)]
        soft: Option<u64>,
        /// At the cap: `warn` (alert only), `throttle` (one charge per
        /// interval), `block` (refuse until the period ends) or `revoke`
        /// (block and suspend the tenant).
        #[arg(long, value_parser = parse_action, default_value = "block")]
        action: Action,
        /// Under `throttle`: the spacing of admitted charges, e.g. `60s`.
        #[arg(long = "throttle-interval", value_parser = crate::key::parse_duration, default_value = "60s")]
        throttle_interval: Duration,
    },
    /// List a tenant's budgets with this period's spending.
    List {
        /// The tenant id.
        tenant: String,
    },
    /// Delete a budget.
    Delete {
        /// The tenant id.
        tenant: String,
        /// The budget's name.
        name: String,
    },
}

fn parse_period(s: &str) -> Result<Period, String> {
    s.parse()
}

fn parse_action(s: &str) -> Result<Action, String> {
    s.parse()
}

fn table(budgets: &[BudgetView]) -> String {
    let mut out = format!(
        "{:<16}  {:<24}  {:<6}  {:>14}  {:>14}  {:>14}  {:<8}  PERIOD",
        "NAME", "UNIT", "PER", "SPENT", "SOFT", "HARD", "ACTION"
    );
    for b in budgets {
        out.push_str(&format!(
            "\n{:<16}  {:<24}  {:<6}  {:>14}  {:>14}  {:>14}  {:<8}  {} (ends {})",
            b.spec.name,
            b.spec.unit,
            b.spec.period,
            b.spent,
            b.spec
                .soft
                .map(|s| s.to_string())
                .unwrap_or_else(|| "-".into()),
            b.spec.hard,
            b.spec.action,
            b.period_id,
            b.period_end
        ));
    }
    if budgets.is_empty() {
        out.push_str("\n(no budgets)");
    }
    out
}

/// Runs `agentbus budget ...`.
pub async fn run(output: Output, args: BudgetArgs) -> Result<(), Failure> {
    match args.command {
        BudgetCommand::Set {
            tenant,
            name,
            unit,
            period,
            hard,
            soft,
            action,
            throttle_interval,
        } => {
            crate::parse_tenant(&tenant).map_err(|e| usage(e.0))?;
            let spec = BudgetSpec {
                name,
                unit,
                period,
                hard,
                soft,
                action,
                throttle_interval_ms: u64::try_from(throttle_interval.as_millis())
                    .unwrap_or(u64::MAX),
            };
            // The same checks as the controller's, before connecting.
            spec.validate().map_err(|e| usage(e.0))?;
            let client = args.remote.connect().await?;
            let view = client.set_budget(&tenant, &spec).await?;
            print(output, &view, || table(std::slice::from_ref(&view)))
        }
        BudgetCommand::List { tenant } => {
            crate::parse_tenant(&tenant).map_err(|e| usage(e.0))?;
            let client = args.remote.connect().await?;
            let budgets = client.budgets(&tenant).await?;
            print(output, &budgets, || table(&budgets))
        }
        BudgetCommand::Delete { tenant, name } => {
            crate::parse_tenant(&tenant).map_err(|e| usage(e.0))?;
            if !agentbus_control::budget::valid_name(&name) {
                return Err(usage(format!("budget name {name:?} is not valid")));
            }
            let client = args.remote.connect().await?;
            let answer = client.delete_budget(&tenant, &name).await?;
            print(output, &answer, || {
                format!("deleted budget {name} of tenant {tenant}")
            })
        }
    }
}
