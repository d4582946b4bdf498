//! The credential bundle an agent connects with.
//!
//! One JSON file per agent, written by the control plane (`agentbus agent create`):
//!
//! ```json
//! { "url": "nats://127.0.0.1:4222", "tenant": "acme", "agent": "planner",
//!   "creds": "-----BEGIN NATS USER JWT-----\n...", "keys": { "tenant": "acme", ... },
//!   "placement": { "replicas": 3, "region": "eu" } }
//! ```
//!
//! `creds` is the text of a standard NATS `.creds` file (user JWT and nkey seed),
//! usable by any NATS client; it may be absent for a server without auth (tests,
//! laptops). `keys` is the tenant's [`TenantKeySet`]. Loading checks that the key set
//! belongs to the bundle's tenant. `placement` (optional) says how many replicas,
//! and in which region, the streams and buckets the agent creates get
//! ([`crate::region::StorePlacement`]). `Debug` never prints the creds or keys.

use std::fmt;
use std::path::Path;

use crate::error::Error;
use crate::ids::{AgentId, TenantId};
use crate::keys::TenantKeySet;
use crate::region::StorePlacement;

/// What went wrong reading or writing a bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BundleErrorKind {
    /// The file could not be read or written.
    Io,
    /// The file is not a valid bundle (bad JSON, a missing key, an invalid id).
    Invalid,
    /// The key set belongs to another tenant than the bundle names.
    TenantMismatch,
}

crate::kind_display!(BundleErrorKind {
    Io => "credential bundle i/o failed",
    Invalid => "invalid credential bundle",
    TenantMismatch => "credential bundle's key set belongs to another tenant",
});

/// A bundle error.
pub type BundleError = Error<BundleErrorKind>;

/// Everything an agent needs to join its tenant's namespace.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct CredentialBundle {
    /// The NATS server URL (`nats://host:port`, comma-separated for a
    /// cluster). Without `creds` (or a token in the options), a user and
    /// password in it (`nats://user:password@host:port`) log in as that
    /// nats-server config user.
    pub url: String,
    /// The agent's tenant.
    pub tenant: TenantId,
    /// The agent's id inside its tenant.
    pub agent: AgentId,
    /// The text of a NATS `.creds` file (user JWT + seed); `None` without auth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creds: Option<String>,
    /// The tenant's key set.
    pub keys: TenantKeySet,
    /// Replicas and region of the streams and buckets this agent creates
    /// (written by the control plane from the deployment and the tenant;
    /// absent: one replica, no region). See [`crate::region`].
    #[serde(default, skip_serializing_if = "StorePlacement::is_unset")]
    pub placement: StorePlacement,
}

impl CredentialBundle {
    /// Parses a bundle from JSON and checks its consistency.
    pub fn from_json(json: &str) -> Result<Self, BundleError> {
        let bundle: Self = serde_json::from_str(json)
            .map_err(|e| Error::with_source(BundleErrorKind::Invalid, "parsing JSON", e))?;
        bundle.check()?;
        Ok(bundle)
    }

    /// Reads a bundle file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, BundleError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::with_source(
                BundleErrorKind::Io,
                format!("reading {}", path.display()),
                e,
            )
        })?;
        Self::from_json(&text)
            .map_err(|e| Error::new(e.kind(), format!("{}: {}", path.display(), e)))
    }

    /// The bundle as pretty JSON (holds secrets: write it only where the agent reads).
    pub fn to_json(&self) -> Result<String, BundleError> {
        serde_json::to_string_pretty(self)
            .map_err(|e| Error::with_source(BundleErrorKind::Invalid, "serializing", e))
    }

    /// Writes the bundle to `path`, readable by the owner only (0600 on Unix).
    pub fn write_to_file(&self, path: impl AsRef<Path>) -> Result<(), BundleError> {
        let path = path.as_ref();
        let json = self.to_json()?;
        write_private(path, json.as_bytes()).map_err(|e| {
            Error::with_source(
                BundleErrorKind::Io,
                format!("writing {}", path.display()),
                e,
            )
        })
    }

    /// The bundle's server addresses: [`CredentialBundle::url`] split as a
    /// comma-separated list (see [`crate::connect::server_addrs`]).
    pub fn server_addrs(
        &self,
    ) -> Result<Vec<crate::connect::ServerAddr>, crate::connect::ServerAddrError> {
        crate::connect::server_addrs(&self.url)
    }

    fn check(&self) -> Result<(), BundleError> {
        if !self.placement.is_valid() {
            return Err(Error::new(
                BundleErrorKind::Invalid,
                "placement.replicas must be 1 to 5",
            ));
        }
        self.keys
            .ensure_tenant(&self.tenant)
            .map_err(|e| Error::new(BundleErrorKind::TenantMismatch, e.detail().to_string()))
    }
}

/// Writes `bytes` to `path` with owner-only permissions, created so from the start
/// (no window in which the file is world-readable).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    #[cfg(unix)]
    {
        // An existing file keeps its old mode through `open`; force it.
        use std::os::unix::fs::PermissionsExt as _;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(bytes)?;
    file.sync_all()
}

impl fmt::Debug for CredentialBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialBundle")
            .field("url", &self.url)
            .field("tenant", &self.tenant)
            .field("agent", &self.agent)
            .field("creds", &self.creds.as_ref().map(|_| "<redacted>"))
            .field("keys", &self.keys)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::MasterSecret;

    fn bundle(tenant: &str, key_tenant: &str) -> CredentialBundle {
        let m = MasterSecret::generate().unwrap();
        CredentialBundle {
            url: "nats://127.0.0.1:4222".into(),
            tenant: TenantId::new(tenant).unwrap(),
            agent: AgentId::new("planner").unwrap(),
            creds: Some("-----BEGIN NATS USER JWT-----\nsecret".into()),
            keys: m
                .key_set(&TenantId::new(key_tenant).unwrap(), [1], 1)
                .unwrap(),
            placement: Default::default(),
        }
    }

    #[test]
    fn round_trip_and_mismatch() {
        let b = bundle("acme", "acme");
        let back = CredentialBundle::from_json(&b.to_json().unwrap()).unwrap();
        assert_eq!(back.tenant.as_str(), "acme");
        let bad = bundle("acme", "other").to_json().unwrap();
        assert_eq!(
            CredentialBundle::from_json(&bad).unwrap_err().kind(),
            BundleErrorKind::TenantMismatch
        );
        assert_eq!(
            CredentialBundle::from_json("{").unwrap_err().kind(),
            BundleErrorKind::Invalid
        );
        assert!(!format!("{b:?}").contains("secret"));
    }

    #[test]
    fn file_is_private() {
        let dir = std::env::temp_dir().join(format!("bundle-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.json");
        bundle("acme", "acme").write_to_file(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(CredentialBundle::from_file(&path).is_ok());
        let missing = CredentialBundle::from_file(dir.join("nope.json")).unwrap_err();
        assert_eq!(missing.kind(), BundleErrorKind::Io);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
