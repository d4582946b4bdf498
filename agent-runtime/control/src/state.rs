//! The control plane's state directory: its layout, records and safe writes.
//!
//! ```text
//! <state>/                       0700
//!   control.json                 format, server URL, operator/SYS/PLATFORM public keys
//!   master.key                   0600  platform master secret (base64)
//!   operator/operator.jwt              operator JWT (self-signed)
//!   operator/operator.nk         0600  operator seed
//!   accounts/SYS/account.jwt           system account JWT
//!   accounts/SYS/account.nk      0600  system account seed
//!   accounts/SYS/sys.creds       0600  system user creds (pushes claim updates)
//!   accounts/PLATFORM/account.jwt      platform account JWT (JetStream on)
//!   accounts/PLATFORM/account.nk 0600  platform account seed
//!   tenants/<id>/tenant.json           tier, quotas, state, key versions, revocations
//!   tenants/<id>/account.jwt           the tenant's account JWT
//!   tenants/<id>/account.nk      0600  the tenant's account seed
//!   tenants/<id>/agents.json           issued agents (tenant, agent, user key, type)
//!   resolver/                          the server's `full` resolver dir (server-owned)
//!   jetstream/                         the default JetStream store dir
//!   server.conf                        the rendered single-node server config
//!   operator.conf                      the operator/resolver snippet for clusters
//! ```
//!
//! Every file is written to a temporary name in its directory and renamed into
//! place, so a reader sees the old or the new content, never a torn one. Seeds and
//! the master secret are created 0600 from the start
//! ([`tenant_bus::bundle::write_private`]). A new tenant's directory is built under
//! a temporary name and renamed into place in one step.
//!
//! One process at a time should change a state directory (the CLI is one-shot).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tenant_bus::error::Error;
use tenant_bus::{AgentId, TenantId};

use crate::error::{io_err, ControlError, ControlErrorKind};
use crate::tiers::{Quotas, Tier};

/// The state format version written to `control.json`.
pub const FORMAT: u32 = 1;

/// `control.json`: the public facts about the installation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlFile {
    /// [`FORMAT`].
    pub format: u32,
    /// The URL written into credential bundles.
    pub server_url: String,
    /// The operator's public key.
    pub operator: String,
    /// The system account's public key.
    pub system_account: String,
    /// The platform account's public key.
    pub platform_account: String,
    /// When the state was created (Unix seconds).
    pub created_at: i64,
}

/// Whether a tenant may connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantStatus {
    /// Connections allowed.
    Active,
    /// Connections refused and existing ones closed by the server.
    Suspended,
}

/// `tenants/<id>/tenant.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    /// The tenant.
    pub tenant: TenantId,
    /// Its tier.
    pub tier: Tier,
    /// Its effective quotas (tier defaults with overrides).
    pub quotas: Quotas,
    /// The public key of its NATS account.
    pub account: String,
    /// Active or suspended.
    pub status: TenantStatus,
    /// Key versions agents still accept, ascending.
    pub key_versions: Vec<u32>,
    /// The key version agents seal with.
    pub current_key: u32,
    /// User revocations (user public key, or `*` while suspended, to Unix seconds),
    /// copied into the account JWT.
    #[serde(default)]
    pub revocations: BTreeMap<String, i64>,
    /// When the tenant was created (Unix seconds).
    pub created_at: i64,
}

/// One entry of `tenants/<id>/agents.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// The tenant.
    pub tenant: TenantId,
    /// The agent.
    pub agent: AgentId,
    /// The public key of the agent's NATS user.
    pub user: String,
    /// The agent type.
    pub agent_type: String,
    /// When its user JWT was issued (Unix seconds).
    pub issued_at: i64,
    /// When it was revoked (Unix seconds), if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
}

/// Paths inside a state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The state directory at `root` (nothing is checked).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `control.json`.
    pub fn control(&self) -> PathBuf {
        self.root.join("control.json")
    }
    /// `master.key`.
    pub fn master(&self) -> PathBuf {
        self.root.join("master.key")
    }
    /// `operator/`.
    pub fn operator_dir(&self) -> PathBuf {
        self.root.join("operator")
    }
    /// `operator/operator.jwt`.
    pub fn operator_jwt(&self) -> PathBuf {
        self.operator_dir().join("operator.jwt")
    }
    /// `operator/operator.nk`.
    pub fn operator_seed(&self) -> PathBuf {
        self.operator_dir().join("operator.nk")
    }
    /// `accounts/<name>/` for `SYS` and `PLATFORM`.
    pub fn account_dir(&self, name: &str) -> PathBuf {
        self.root.join("accounts").join(name)
    }
    /// `accounts/SYS/sys.creds`.
    pub fn sys_creds(&self) -> PathBuf {
        self.account_dir(crate::SYSTEM_ACCOUNT).join("sys.creds")
    }
    /// `tenants/`.
    pub fn tenants_dir(&self) -> PathBuf {
        self.root.join("tenants")
    }
    /// `tenants/<id>/`.
    pub fn tenant_dir(&self, tenant: &TenantId) -> PathBuf {
        self.tenants_dir().join(tenant.as_str())
    }
    /// `resolver/`.
    pub fn resolver(&self) -> PathBuf {
        self.root.join("resolver")
    }
    /// `jetstream/`.
    pub fn jetstream(&self) -> PathBuf {
        self.root.join("jetstream")
    }
    /// `server.conf`.
    pub fn server_conf(&self) -> PathBuf {
        self.root.join("server.conf")
    }
    /// `operator.conf`.
    pub fn operator_conf(&self) -> PathBuf {
        self.root.join("operator.conf")
    }
}

/// File names inside an account or tenant directory.
pub const ACCOUNT_JWT: &str = "account.jwt";
/// The account seed's file name.
pub const ACCOUNT_SEED: &str = "account.nk";
/// The tenant record's file name.
pub const TENANT_JSON: &str = "tenant.json";
/// The agents list's file name.
pub const AGENTS_JSON: &str = "agents.json";

/// Creates `dir` (and parents) with mode 0700.
pub fn create_private_dir(dir: &Path) -> Result<(), ControlError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|e| io_err("creating", dir, e))
}

fn temp_name(path: &Path) -> Result<PathBuf, ControlError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::new(ControlErrorKind::Io, format!("bad path {}", path.display())))?;
    Ok(path.with_file_name(format!(".{name}.tmp-{}", std::process::id())))
}

/// Writes `bytes` to `path` atomically (temp file + rename); `private` files are
/// 0600 from creation on.
pub fn write_atomic(path: &Path, bytes: &[u8], private: bool) -> Result<(), ControlError> {
    let tmp = temp_name(path)?;
    let written = if private {
        tenant_bus::bundle::write_private(&tmp, bytes)
    } else {
        write_public(&tmp, bytes)
    };
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err("writing", &tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err("renaming into", path, e)
    })
}

fn write_public(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Writes `value` as pretty JSON, atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ControlError> {
    let json = serde_json::to_vec_pretty(value).map_err(|e| {
        Error::with_source(
            ControlErrorKind::InvalidState,
            format!("serializing {}", path.display()),
            e,
        )
    })?;
    write_atomic(path, &json, false)
}

/// Reads a text file.
pub fn read_text(path: &Path) -> Result<String, ControlError> {
    std::fs::read_to_string(path).map_err(|e| io_err("reading", path, e))
}

/// Reads a JSON file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, ControlError> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|e| {
        Error::with_source(
            ControlErrorKind::InvalidState,
            format!("parsing {}", path.display()),
            e,
        )
    })
}

/// Now, in Unix seconds.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
