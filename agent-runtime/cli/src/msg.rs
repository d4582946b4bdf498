//! `agentbus pub | sub | request`: messaging as an agent, from its bundle.
//! Subjects are relative to the bundle's tenant.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use futures::StreamExt as _;
use tenant_bus::{ConnectErrorKind, CredentialBundle, NamespaceOptions, TenantNamespace};

use super::{one_line, CliError};

/// Arguments of `agentbus pub`.
#[derive(Debug, Args)]
pub struct PubArgs {
    /// The agent's credential bundle (from `agentbus agent create`).
    #[arg(long)]
    pub creds: PathBuf,
    /// The subject, relative to the tenant (e.g. `orders.created`).
    pub subject: String,
    /// The payload (UTF-8 text).
    pub data: String,
}

/// Arguments of `agentbus sub`.
#[derive(Debug, Args)]
pub struct SubArgs {
    /// The agent's credential bundle.
    #[arg(long)]
    pub creds: PathBuf,
    /// The subject or pattern, relative to the tenant (`*` and `>` allowed).
    pub subject: String,
    /// Exit after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
}

/// Arguments of `agentbus request`.
#[derive(Debug, Args)]
pub struct RequestArgs {
    /// The agent's credential bundle.
    #[arg(long)]
    pub creds: PathBuf,
    /// The subject, relative to the tenant.
    pub subject: String,
    /// The payload (UTF-8 text).
    pub data: String,
    /// How long to wait for the reply, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    pub timeout_ms: u64,
}

async fn connect(creds: &PathBuf, options: NamespaceOptions) -> Result<TenantNamespace, CliError> {
    let bundle = CredentialBundle::from_file(creds)
        .map_err(|e| CliError(format!("cannot use bundle: {}", one_line(&e.to_string()))))?;
    options.connect(&bundle).await.map_err(|e| match e.kind() {
        ConnectErrorKind::Connection => CliError(format!("no server running at {}", bundle.url)),
        ConnectErrorKind::Authorization => CliError(format!(
            "the server refused agent {} of tenant {} (revoked, suspended or unknown)",
            bundle.agent, bundle.tenant
        )),
        _ => CliError(one_line(&e.to_string())),
    })
}

/// Runs `agentbus pub`.
pub async fn publish(args: PubArgs) -> Result<(), CliError> {
    let ns = connect(&args.creds, NamespaceOptions::new()).await?;
    let id = ns
        .publish(args.subject.as_str(), args.data.as_bytes())
        .await
        .map_err(|e| CliError(one_line(&e.to_string())))?;
    // A server round trip, so the message left before we exit.
    ns.sync()
        .await
        .map_err(|e| CliError(one_line(&e.to_string())))?;
    println!("published {id} to {}", args.subject);
    Ok(())
}

/// Runs `agentbus sub`.
pub async fn subscribe(args: SubArgs) -> Result<(), CliError> {
    let ns = connect(&args.creds, NamespaceOptions::new()).await?;
    let mut sub = ns
        .subscribe(args.subject.as_str())
        .await
        .map_err(|e| CliError(one_line(&e.to_string())))?;
    eprintln!(
        "agentbus: listening on {} (tenant {})",
        args.subject,
        ns.tenant()
    );
    let mut seen = 0u64;
    while args.count.is_none_or(|n| seen < n) {
        tokio::select! {
            msg = sub.next() => {
                let Some(msg) = msg else { break };
                seen += 1;
                let sender = msg.sender.as_ref().map(|s| s.as_str()).unwrap_or("-");
                println!("[{}] {} from {}: {}", seen, msg.subject, sender, String::from_utf8_lossy(&msg.payload));
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    Ok(())
}

/// Runs `agentbus request`.
pub async fn request(args: RequestArgs) -> Result<(), CliError> {
    let options = NamespaceOptions::new().request_timeout(Duration::from_millis(args.timeout_ms));
    let ns = connect(&args.creds, options).await?;
    let reply = ns
        .request(args.subject.as_str(), args.data.as_bytes())
        .await
        .map_err(|e| CliError(one_line(&e.to_string())))?;
    println!("{}", String::from_utf8_lossy(&reply.payload));
    Ok(())
}
