//! `agentbus key ...`: API keys, through the controller.
//!
//! A key is printed once, by `create` and `rotate`; the controller keeps only
//! its keyed hash. An agent logs in with it as its NATS token
//! (`nats.connect(url, token=KEY)`); the auth callout places it in its tenant.

use std::time::Duration;

use clap::{Args, Subcommand};

use agentbus_control::api::{CreateApiKey, IssuedApiKey};
use agentbus_control::store::ApiKeyRecord;

use crate::output::{print, usage, Failure, Output};
use crate::remote::Remote;

/// `agentbus key`.
#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    command: KeyCommand,
}

/// `agentbus key` commands.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create an API key; it is printed once (`-o json`: `{"id", "key", ...}`).
    Create {
        /// The tenant id.
        tenant: String,
        /// A label for the key (letters, digits, '-', '_').
        #[arg(long)]
        name: String,
        /// The agent type its logins act as (one of the tenant's allowed types).
        #[arg(long = "agent-type", default_value = "default")]
        agent_type: String,
        /// Narrow it: `pub:<pattern>`, `sub:<pattern>` (relative to the tenant's
        /// subjects) or `js` (task dispatch and state). Repeatable. None: an
        /// agent's full permissions in its tenant.
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
        /// Lifetime, e.g. `90m`, `24h`, `30d` (default: until revoked).
        #[arg(long, value_parser = parse_duration)]
        expires: Option<Duration>,
    },
    /// List a tenant's keys (ids and status; never a key).
    List {
        /// The tenant id.
        tenant: String,
    },
    /// Revoke a key: new logins are refused and live connections closed at once.
    Revoke {
        /// The tenant id.
        tenant: String,
        /// The key id.
        id: String,
    },
    /// Replace a key: prints the new one; the old one works until the grace ends.
    Rotate {
        /// The tenant id.
        tenant: String,
        /// The key id.
        id: String,
        /// How long the old key keeps working, e.g. `24h` (default `24h`).
        #[arg(long, value_parser = parse_duration, default_value = "24h")]
        grace: Duration,
    },
}

/// `45s`, `90m`, `24h`, `30d`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit (s, m, h, d)"))?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => None,
    }
    .ok_or_else(|| format!("{s:?}: expected a number and a unit (s, m, h, d)"))?;
    Ok(Duration::from_secs(secs))
}

fn when(t: Option<i64>) -> String {
    t.map(|t| t.to_string()).unwrap_or_else(|| "-".into())
}

fn table(now: i64, keys: &[ApiKeyRecord]) -> String {
    let mut out = format!(
        "{:<12}  {:<16}  {:<12}  {:<8}  {:>12}  {:>12}  SCOPES",
        "ID", "NAME", "TYPE", "STATUS", "EXPIRES", "LAST_USED"
    );
    for k in keys {
        out.push_str(&format!(
            "\n{:<12}  {:<16}  {:<12}  {:<8}  {:>12}  {:>12}  {}",
            k.id,
            k.name,
            k.agent_type,
            k.status(now),
            when(k.expires_at),
            when(k.last_used_at),
            if k.scopes.is_empty() {
                "(agent)".to_string()
            } else {
                k.scopes.join(",")
            }
        ));
    }
    out
}

fn issued(output: Output, k: &IssuedApiKey) -> Result<(), Failure> {
    print(output, k, || {
        format!(
            "{}\n(key id {}; shown once: the controller keeps only its hash)",
            k.key, k.id
        )
    })
}

/// Runs `agentbus key ...`.
pub async fn run(output: Output, args: KeyArgs) -> Result<(), Failure> {
    let now = agentbus_control::install::now_unix();
    match args.command {
        KeyCommand::Create {
            tenant,
            name,
            agent_type,
            scopes,
            expires,
        } => {
            crate::parse_tenant(&tenant).map_err(|e| usage(e.0))?;
            for s in &scopes {
                agentbus_control::identity::scopes::parse(s).map_err(usage)?;
            }
            let client = args.remote.connect().await?;
            let req = CreateApiKey {
                name,
                agent_type: Some(agent_type),
                scopes,
                expires_in_secs: expires.map(|d| d.as_secs().max(1)),
            };
            issued(output, &client.create_apikey(&tenant, &req).await?)
        }
        KeyCommand::List { tenant } => {
            crate::parse_tenant(&tenant).map_err(|e| usage(e.0))?;
            let client = args.remote.connect().await?;
            let keys = client.apikeys(&tenant).await?;
            print(output, &keys, || table(now, &keys))
        }
        KeyCommand::Revoke { tenant, id } => {
            crate::parse_tenant(&tenant).map_err(|e| usage(e.0))?;
            let client = args.remote.connect().await?;
            let k = client.revoke_apikey(&tenant, &id).await?;
            print(output, &k, || {
                format!("revoked key {} of tenant {tenant}", k.id)
            })
        }
        KeyCommand::Rotate { tenant, id, grace } => {
            crate::parse_tenant(&tenant).map_err(|e| usage(e.0))?;
            let client = args.remote.connect().await?;
            issued(output, &client.rotate_apikey(&tenant, &id, grace).await?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("45s").unwrap(), Duration::from_secs(45));
        assert_eq!(parse_duration("90m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(2_592_000)
        );
        assert_eq!(parse_duration("12").unwrap(), Duration::from_secs(12));
        for bad in ["", "d", "1w", "-1h", "1.5h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
