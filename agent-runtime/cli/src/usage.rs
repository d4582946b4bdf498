//! `agentbus usage TENANT`: the tenant's usage as the NATS servers counted it.

use clap::{Args, ValueEnum};

use agentbus_control::usage::{rfc3339, Granularity, UsageRequest, UsageRow};

use crate::output::{print, usage, Failure, Output};
use crate::remote::Remote;

/// `agentbus usage`.
#[derive(Debug, Args)]
pub struct UsageArgs {
    #[command(flatten)]
    remote: Remote,
    /// The tenant id.
    pub tenant: String,
    /// Start: RFC 3339 (`2026-12-01T00:00:00Z`) or a time ago (`24h`, `7d`).
    /// Default: 24 hours ago.
    #[arg(long)]
    pub from: Option<String>,
    /// End (exclusive): RFC 3339 or a time ago. Default: now.
    #[arg(long)]
    pub to: Option<String>,
    /// One row per hour or per UTC day.
    #[arg(long, value_enum, default_value_t = By::Hour)]
    pub by: By,
}

/// Row granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum By {
    /// One row per hour.
    Hour,
    /// One row per UTC day.
    Day,
}

fn instant(text: &str, now_ms: u64) -> Result<u64, Failure> {
    if let Some(ms) = agentbus_control::usage::parse_rfc3339(text) {
        return Ok(ms);
    }
    let ago = crate::key::parse_duration(text).map_err(|_| {
        usage(format!(
            "{text:?}: expected RFC 3339 (2026-12-01T00:00:00Z) or a time ago (24h, 7d)"
        ))
    })?;
    Ok(now_ms.saturating_sub(u64::try_from(ago.as_millis()).unwrap_or(u64::MAX)))
}

/// Reported units as `unit=amount;...` (unit names hold no `;`, `=` or `,`).
fn units(r: &UsageRow) -> String {
    r.units
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(";")
}

fn csv(rows: &[UsageRow]) -> String {
    let mut out =
        String::from("tenant,period_start,period_end,msgs_in,bytes_in,msgs_out,bytes_out,units");
    for r in rows {
        out.push_str(&format!(
            "\n{},{},{},{},{},{},{},{}",
            r.tenant,
            r.period_start,
            r.period_end,
            r.msgs_in,
            r.bytes_in,
            r.msgs_out,
            r.bytes_out,
            units(r)
        ));
    }
    out
}

fn table(rows: &[UsageRow]) -> String {
    let mut out = format!(
        "{:<20}  {:>12}  {:>14}  {:>12}  {:>14}  UNITS",
        "PERIOD_START", "MSGS_IN", "BYTES_IN", "MSGS_OUT", "BYTES_OUT"
    );
    for r in rows {
        out.push_str(&format!(
            "\n{:<20}  {:>12}  {:>14}  {:>12}  {:>14}  {}",
            r.period_start,
            r.msgs_in,
            r.bytes_in,
            r.msgs_out,
            r.bytes_out,
            units(r)
        ));
    }
    if rows.is_empty() {
        out.push_str("\n(no usage in this range)");
    }
    out
}

/// Runs `agentbus usage`.
pub async fn run(output: Output, args: UsageArgs) -> Result<(), Failure> {
    crate::parse_tenant(&args.tenant).map_err(|e| usage(e.0))?;
    let now = tenant_bus::envelope::now_ms();
    let from_ms = match &args.from {
        Some(t) => instant(t, now)?,
        None => now.saturating_sub(24 * 3_600_000),
    };
    let to_ms = match &args.to {
        Some(t) => instant(t, now)?,
        None => now + 1,
    };
    if to_ms <= from_ms {
        return Err(usage(format!(
            "--from {} is not before --to {}",
            rfc3339(from_ms),
            rfc3339(to_ms)
        )));
    }
    let req = UsageRequest {
        from_ms,
        to_ms,
        by: match args.by {
            By::Hour => Granularity::Hour,
            By::Day => Granularity::Day,
        },
    };
    let client = args.remote.connect().await?;
    let rows = client.usage(&args.tenant, &req).await?;
    if output == Output::Csv {
        crate::write_stdout(&csv(&rows));
        return Ok(());
    }
    print(output, &rows, || table(&rows))
}
