//! How admin commands reach the controller: `--url` and `--creds`, or the local
//! installation's defaults (`<state>/install.json` and `<state>/admin.creds`).

use std::path::PathBuf;

use clap::Args;

use agentbus_control::{AdminClient, Installation};

use crate::output::{usage, Failure, EXIT_NOT_FOUND};

/// Where the controller is, and who is asking.
#[derive(Debug, Clone, Args)]
pub struct Remote {
    /// The local installation's state directory (for the default URL and creds).
    #[arg(
        long,
        global = true,
        default_value = ".agentbus",
        env = "AGENTBUS_STATE"
    )]
    pub state: PathBuf,
    /// Server URL(s), comma-separated (default: the local installation's).
    #[arg(long, global = true, env = "AGENTBUS_URL")]
    pub url: Option<String>,
    /// An admin's `.creds` file (default: `<state>/admin.creds`).
    #[arg(long, global = true, env = "AGENTBUS_CREDS")]
    pub creds: Option<PathBuf>,
}

impl Remote {
    /// Connects as the admin.
    pub async fn connect(&self) -> Result<AdminClient, Failure> {
        let local = || {
            Installation::open(&self.state).map_err(|e| Failure {
                message: format!(
                    "{} (pass --url and --creds to reach a remote controller)",
                    agentbus_control::one_line(&e.to_string())
                ),
                code: EXIT_NOT_FOUND,
            })
        };
        let url = match &self.url {
            Some(u) => u.clone(),
            None => local()?.url_list(),
        };
        let creds_path = match &self.creds {
            Some(p) => p.clone(),
            None => local()?.path("admin.creds"),
        };
        let creds = std::fs::read_to_string(&creds_path)
            .map_err(|e| usage(format!("cannot read {}: {e}", creds_path.display())))?;
        Ok(AdminClient::connect(&url, &creds).await?)
    }
}
