//! Copying a deployment's data into new servers: `agentbus up --cluster N
//! --from-single` (a state directory's single server grows into a local
//! cluster) and `agentbus import --from URL` (the same for servers not run
//! by `agentbus up`: the installation's servers, before any controller
//! serves them, take the data of the servers at URL).
//!
//! NATS cannot reuse a single server's store in a cluster (see
//! [`crate::stores`]), so the data is copied, stream by stream
//! ([`agentbus_control::migrate`]):
//!
//! 1. the single server starts again, on a free port, from its own store;
//! 2. the new cluster starts empty;
//! 3. every stream of the platform account (registry, secrets, agents, API
//!    keys, usage, budgets, audit log) is copied with the cluster's replicas,
//!    except the live logins of the old server (`agentbus-sessions`: its
//!    connections are gone);
//! 4. the controller starts on the cluster and pushes every tenant's account
//!    there, then each tenant's streams (`TASKS`, `KV_TASKS_DONE`,
//!    `KV_STATE`) are copied as a user of its account;
//! 5. the single server stops and its store moves aside to
//!    `STATE/jetstream.copied-<unix seconds>` (never deleted), so the
//!    directory now holds a cluster's data only.
//!
//! A failure at any step stops `up` with the reason; the single server's
//! store is untouched until step 5, and the cluster's partial copy is
//! refused by a second attempt until the operator moves `STATE/cluster`
//! aside.

use std::path::{Path, PathBuf};

use agentbus_control::local_server::LocalServer;
use agentbus_control::migrate::{copy_streams, StreamCopy};
use agentbus_control::{Controller, ControllerConfig, Installation};
use clap::Args;
use serde::Serialize;

use crate::output::{fail, print, Failure, Output, EXIT_INTERNAL, EXIT_UNAVAILABLE, EXIT_USAGE};

/// Arguments of `agentbus import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The state directory of the installation (its KEK and controller
    /// credentials; the source must be the same installation's servers).
    #[arg(long, default_value = ".agentbus", env = "AGENTBUS_STATE")]
    pub state: PathBuf,
    /// The servers holding the data now (URL list, comma-separated).
    #[arg(long, value_name = "URLS")]
    pub from: String,
    /// The servers to copy into (default: the installation's). No controller
    /// may have served them yet: a stream that already holds messages there
    /// is refused, never merged.
    #[arg(long, env = "AGENTBUS_URL")]
    pub url: Option<String>,
    /// Replicas of the copies (default: the installation's).
    #[arg(long)]
    pub replicas: Option<usize>,
}

/// What `agentbus import` copied.
#[derive(Debug, Serialize)]
pub struct Imported {
    /// The servers copied from.
    pub from: String,
    /// The servers copied into.
    pub to: String,
    /// Streams of the platform account copied.
    pub platform_streams: usize,
    /// Streams of tenants' accounts copied.
    pub tenant_streams: usize,
}

/// Runs `agentbus import`: the platform account's streams, then (through a
/// controller connected to the target, which pushes the tenants' accounts
/// there) every tenant's. It does not serve: start the controllers after.
pub async fn run(output: Output, args: ImportArgs) -> Result<(), Failure> {
    let install = Installation::open(&args.state)?;
    let to = args.url.unwrap_or_else(|| install.url_list());
    let replicas = args.replicas.unwrap_or(install.facts().replicas);
    tenant_bus::region::check_replicas(replicas)
        .map_err(|e| fail(EXIT_USAGE, format!("--replicas {e}")))?;
    if args.from == to {
        return Err(fail(
            EXIT_USAGE,
            "--from names the servers copied into; give the old servers' URLs",
        ));
    }
    let platform_streams = copy_platform(&install, &args.from, &to, replicas).await?;
    let controller =
        Controller::connect(&install, ControllerConfig::new(&to).replicas(replicas)).await?;
    let tenant_streams = copy_tenants(&controller, &args.from, &to, replicas).await?;
    let done = Imported {
        from: args.from,
        to,
        platform_streams,
        tenant_streams,
    };
    print(output, &done, || {
        format!(
            "copied {} platform and {} tenant streams from {} into {}; start the controllers",
            done.platform_streams, done.tenant_streams, done.from, done.to
        )
    })
}

/// The platform streams not copied: the old server's live logins.
const NOT_COPIED: &[&str] = &["KV_agentbus-sessions"];

fn unavailable(what: &str, e: impl std::fmt::Display) -> Failure {
    fail(
        EXIT_UNAVAILABLE,
        format!(
            "copying the single server's data: {what}: {}",
            agentbus_control::one_line(&e.to_string())
        ),
    )
}

fn report(owner: &str) -> impl FnMut(&StreamCopy) + '_ {
    move |c: &StreamCopy| {
        eprintln!(
            "agentbus: copied {owner} stream {} ({} messages)",
            c.stream, c.messages
        );
    }
}

async fn connect(url: &str, creds: &str, name: &str) -> Result<async_nats::Client, Failure> {
    agentbus_control::controller::connect(url, creds, name)
        .await
        .map_err(|e| unavailable(&format!("connecting to {url}"), e))
}

/// Step 3: the platform account's streams, from `old_url` to `new_urls`.
pub async fn copy_platform(
    install: &Installation,
    old_url: &str,
    new_urls: &str,
    replicas: usize,
) -> Result<usize, Failure> {
    let creds = install.creds("controller.creds")?;
    let from = connect(old_url, &creds, "agentbus-import").await?;
    let to = connect(new_urls, &creds, "agentbus-import").await?;
    let copied = copy_streams(&from, &to, replicas, NOT_COPIED, report("platform"))
        .await
        .map_err(|e| unavailable("platform account", e.message))?;
    let _ = from.drain().await;
    let _ = to.drain().await;
    Ok(copied.len())
}

/// Step 4: every tenant's streams, once `controller` (serving the cluster)
/// has pushed the tenants' accounts there.
pub async fn copy_tenants(
    controller: &Controller,
    old_url: &str,
    new_urls: &str,
    replicas: usize,
) -> Result<usize, Failure> {
    controller
        .reconcile()
        .await
        .map_err(|e| unavailable("pushing the tenants' accounts to the cluster", e))?;
    let tenants = controller
        .store()
        .registry
        .list()
        .await
        .map_err(|e| unavailable("listing tenants", e))?;
    let mut copied = 0;
    for record in tenants
        .iter()
        .filter(|r| !r.deleting && !r.account.is_empty())
    {
        let Some(creds) = controller
            .tenant_user_creds(&record.id, "agentbus-import")
            .await
            .map_err(|e| unavailable(&format!("tenant {}", record.id), e.message))?
        else {
            continue; // being deleted
        };
        let from = connect(old_url, &creds, "agentbus-import").await?;
        let to = connect(new_urls, &creds, "agentbus-import").await?;
        let owner = format!("tenant {}", record.id);
        copied += copy_streams(&from, &to, replicas, &[], report(&owner))
            .await
            .map_err(|e| unavailable(&owner, e.message))?
            .len();
        let _ = from.drain().await;
        let _ = to.drain().await;
    }
    Ok(copied)
}

/// Step 5: stops the single server and moves its store aside, leaving an
/// empty store directory; returns where the old store went.
pub fn retire(mut old: LocalServer, state: &Path) -> Result<PathBuf, Failure> {
    old.shutdown(std::time::Duration::from_secs(10));
    let store = state.join("jetstream");
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let aside = state.join(format!("jetstream.copied-{secs}"));
    std::fs::rename(&store, &aside).map_err(|e| {
        fail(
            EXIT_INTERNAL,
            format!("moving {} aside: {e}", store.display()),
        )
    })?;
    std::fs::create_dir(&store)
        .map_err(|e| fail(EXIT_INTERNAL, format!("creating {}: {e}", store.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| fail(EXIT_INTERNAL, format!("securing {}: {e}", store.display())))?;
    }
    Ok(aside)
}
