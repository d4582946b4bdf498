//! An installation's local files: only what cannot live in NATS.
//!
//! ```text
//! <state>/                 0700
//!   install.json           public facts: operator, SYS and PLATFORM keys and JWTs,
//!                          server URLs, replicas
//!   kek              0600  the key-encryption key (or AGENTBUS_KEK): unlocks the
//!                          secrets bucket; controller hosts only
//!   sys.creds        0600  the system user (claim pushes); controller hosts only
//!   controller.creds 0600  the controller's user of the platform account
//!   admin.creds      0600  the first platform-admin (the local CLI's default)
//!   callout.creds    0600  the auth callout service's user of the auth account;
//!                          controller hosts only
//!   bootstrap.sealed 0600  the secrets, sealed under the KEK, until the first
//!                          controller stores them in NATS (then removed)
//!   server.conf            the rendered single-node config (no secret)
//!   resolver/ jetstream/   the server's account resolver and store
//!   up.lock                held by a running `agentbus up`
//! ```
//!
//! Everything else (tenants, agents, admins, account and signing seeds, tenant key
//! roots) lives in JetStream KV ([`crate::store`]). A new state directory is built
//! under a random temporary name beside it and renamed into place in one step.
//!
//! State directories of format 1 (the pre-controller layout with `control.json`)
//! are refused with a message: this is a clean break, documented in the README.

use std::path::{Path, PathBuf};

use nkeys::KeyPair;
use serde::{Deserialize, Serialize};
use tenant_bus::error::Error;

use crate::api::Role;
use crate::error::{io_err, ControlError, ControlErrorKind};
use crate::jwt::Permission;
use crate::kek::Kek;
use crate::store::{secret_name, AdminRecord};
use crate::{accounts, jwt};

/// The format of `install.json`.
pub const FORMAT: u32 = 2;
/// The name of the first platform-admin.
pub const BOOTSTRAP_ADMIN: &str = "admin";
/// The default server URL.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

type Result<T> = std::result::Result<T, ControlError>;

fn err(kind: ControlErrorKind, detail: impl Into<std::borrow::Cow<'static, str>>) -> ControlError {
    Error::new(kind, detail)
}

/// `install.json`: the public facts of an installation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallFacts {
    /// [`FORMAT`].
    pub format: u32,
    /// The operator's public key.
    pub operator: String,
    /// The operator JWT.
    pub operator_jwt: String,
    /// The system account's public key.
    pub system_account: String,
    /// The system account JWT.
    pub system_account_jwt: String,
    /// The platform account's public key.
    pub platform_account: String,
    /// The platform account JWT.
    pub platform_account_jwt: String,
    /// The server URLs bundles and clients use.
    pub urls: Vec<String>,
    /// Replicas of every bucket and stream (1 on one node, 3 on a cluster).
    pub replicas: usize,
    /// When it was created, Unix seconds.
    pub created_at: i64,
    /// The auth account's public key (empty in installations made before the
    /// auth callout: no logins by key or token there).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub auth_account: String,
    /// The auth account JWT (it names the callout user and xkey).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub auth_account_jwt: String,
    /// The servers' `default_sentinel`: a bearer user of the auth account that
    /// may do nothing; clients that send no JWT get it, and with it the callout.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sentinel_jwt: String,
}

/// The secrets a new installation hands to its first controller.
#[derive(Serialize, Deserialize)]
pub struct Bootstrap {
    /// `(secret name, seed text)`.
    pub secrets: Vec<(String, String)>,
    /// The first platform-admin.
    pub admin: AdminRecord,
}

/// An installation's state directory.
#[derive(Debug, Clone)]
pub struct Installation {
    root: PathBuf,
    facts: InstallFacts,
}

/// Unix seconds now.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn seed(kp: &KeyPair) -> Result<String> {
    kp.seed()
        .map_err(|e| Error::with_source(ControlErrorKind::Crypto, "reading a seed", e))
}

fn write_new_private(path: &Path, bytes: &[u8]) -> Result<()> {
    tenant_bus::bundle::write_private(path, bytes).map_err(|e| io_err("writing", path, e))
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| io_err("writing", path, e))?;
    std::io::Write::write_all(&mut tmp, bytes).map_err(|e| io_err("writing", path, e))?;
    tmp.persist(path)
        .map_err(|e| io_err("writing", path, e.error))?;
    Ok(())
}

fn private_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| io_err("creating", path, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io_err("securing", path, e))?;
    }
    Ok(())
}

/// The `.creds` text of an admin user signed by the platform signing key, with
/// the role's subject permissions.
pub fn admin_creds(
    platform_signing: &KeyPair,
    platform_account: &str,
    admin: &AdminRecord,
    user: &KeyPair,
) -> Result<String> {
    let user_jwt = accounts::user_jwt(
        platform_signing,
        Some(platform_account),
        &user.public_key(),
        &admin.name,
        Permission {
            allow: crate::api::role_publish_allow(admin.role, admin.tenant.as_ref()),
            deny: vec![],
        },
        Permission {
            allow: vec![format!("{}.>", crate::api::admin_inbox(&admin.name))],
            deny: vec![],
        },
        vec![format!("role:{}", admin.role)],
        now_unix(),
    )?;
    Ok(jwt::format_creds(&user_jwt, &seed(user)?))
}

impl Installation {
    /// The paths and facts of an existing installation at `dir`;
    /// [`ControlErrorKind::NotInitialized`] if there is none.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let root = dir.as_ref().to_path_buf();
        let facts_path = root.join("install.json");
        if !facts_path.is_file() {
            if root.join("control.json").is_file() {
                return Err(err(
                    ControlErrorKind::InvalidState,
                    format!(
                        "{} is a format-1 state directory (before the controller); \
                         this release keeps state in NATS and cannot import it: \
                         create a new one and re-create tenants (see README, \"Upgrading\")",
                        root.display()
                    ),
                ));
            }
            return Err(err(
                ControlErrorKind::NotInitialized,
                format!("{} (run `agentbus up` first)", root.display()),
            ));
        }
        let text =
            std::fs::read_to_string(&facts_path).map_err(|e| io_err("reading", &facts_path, e))?;
        let facts: InstallFacts = serde_json::from_str(&text)
            .map_err(|e| Error::with_source(ControlErrorKind::InvalidState, "install.json", e))?;
        if facts.format != FORMAT {
            return Err(err(
                ControlErrorKind::InvalidState,
                format!("install.json format {} (expected {FORMAT})", facts.format),
            ));
        }
        Ok(Self { root, facts })
    }

    /// Opens the installation at `dir`, creating it if `dir` is missing or empty.
    pub fn open_or_init(dir: impl AsRef<Path>) -> Result<(Self, bool)> {
        match Self::open(dir.as_ref()) {
            Ok(i) => Ok((i, false)),
            Err(e) if e.kind() == ControlErrorKind::NotInitialized => {
                Ok((Self::init(dir.as_ref())?, true))
            }
            Err(e) => Err(e),
        }
    }

    /// Creates an installation in `dir` (missing or empty): operator, system and
    /// platform accounts, the KEK, the system, controller and first admin users,
    /// and the sealed bootstrap secrets.
    pub fn init(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if dir.exists() {
            let mut entries = std::fs::read_dir(dir).map_err(|e| io_err("reading", dir, e))?;
            if entries.next().is_some() {
                return Err(err(
                    ControlErrorKind::InvalidState,
                    format!("{} is not empty and holds no install.json", dir.display()),
                ));
            }
        }
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| io_err("creating", &parent, e))?;
        // A random, exclusive temporary name (no predictable path to pre-create).
        let tmp = tempfile::Builder::new()
            .prefix(".agentbus-init-")
            .tempdir_in(&parent)
            .map_err(|e| io_err("creating a temporary directory in", &parent, e))?;
        let facts = Self::build(tmp.path())?;
        let tmp_path = tmp.keep();
        // `rename` replaces an empty directory on Unix.
        if let Err(e) = std::fs::rename(&tmp_path, dir) {
            let _ = std::fs::remove_dir_all(&tmp_path);
            return Err(io_err("renaming into", dir, e));
        }
        Ok(Self {
            root: dir.to_path_buf(),
            facts,
        })
    }

    fn build(root: &Path) -> Result<InstallFacts> {
        private_dir(root)?;
        private_dir(&root.join("resolver"))?;
        private_dir(&root.join("jetstream"))?;
        let now = now_unix();
        let kek = Kek::generate()?;
        let operator = KeyPair::new_operator();
        let sys = KeyPair::new_account();
        let platform = KeyPair::new_account();
        let platform_signing = KeyPair::new_account();
        let sys_user = KeyPair::new_user();
        let controller_user = KeyPair::new_user();
        let admin_user = KeyPair::new_user();
        let auth = KeyPair::new_account();
        let callout_user = KeyPair::new_user();
        let auth_xkey = nkeys::XKey::new();

        let operator_jwt = accounts::operator_jwt(&operator, &sys.public_key(), now)?;
        let sys_jwt = accounts::system_account_jwt(&operator, &sys.public_key(), now)?;
        let platform_jwt = accounts::platform_account_jwt(
            &operator,
            &platform.public_key(),
            &platform_signing.public_key(),
            now,
        )?;
        let sys_user_jwt = accounts::user_jwt(
            &sys,
            None,
            &sys_user.public_key(),
            "sys",
            Permission::default(),
            Permission::default(),
            vec![],
            now,
        )?;
        let controller_jwt = accounts::user_jwt(
            &platform_signing,
            Some(&platform.public_key()),
            &controller_user.public_key(),
            "controller",
            Permission::default(),
            Permission::default(),
            vec!["service:controller".to_string()],
            now,
        )?;
        let callout_err =
            |e: crate::identity::callout::CalloutError| err(ControlErrorKind::Jwt, e.to_string());
        let auth_jwt = crate::identity::callout::auth_account_jwt(
            &operator,
            &auth.public_key(),
            &callout_user.public_key(),
            &auth_xkey.public_key(),
            now,
        )
        .map_err(callout_err)?;
        let sentinel_jwt =
            crate::identity::callout::sentinel_jwt(&auth, now).map_err(callout_err)?;
        let callout_jwt =
            crate::identity::callout::callout_user_jwt(&auth, &callout_user.public_key(), now)
                .map_err(callout_err)?;
        let auth_xkey_seed = auth_xkey
            .seed()
            .map_err(|e| Error::with_source(ControlErrorKind::Crypto, "reading a seed", e))?;
        let admin = AdminRecord {
            name: BOOTSTRAP_ADMIN.to_string(),
            role: Role::PlatformAdmin,
            tenant: None,
            user: admin_user.public_key(),
            created_at: now,
            revoked_at: None,
        };
        let admin_creds = admin_creds(
            &platform_signing,
            &platform.public_key(),
            &admin,
            &admin_user,
        )?;
        let bootstrap = Bootstrap {
            secrets: vec![
                (secret_name::OPERATOR.to_string(), seed(&operator)?),
                (secret_name::SYSTEM_ACCOUNT.to_string(), seed(&sys)?),
                (secret_name::PLATFORM_ACCOUNT.to_string(), seed(&platform)?),
                (
                    secret_name::PLATFORM_SIGNING.to_string(),
                    seed(&platform_signing)?,
                ),
                (secret_name::AUTH_ACCOUNT.to_string(), seed(&auth)?),
                (secret_name::AUTH_XKEY.to_string(), auth_xkey_seed),
            ],
            admin,
        };
        let bootstrap_json = serde_json::to_vec(&bootstrap)
            .map_err(|e| Error::with_source(ControlErrorKind::InvalidState, "bootstrap", e))?;
        let sealed = kek.seal("bootstrap", &bootstrap_json)?;

        write_new_private(&root.join("kek"), kek.to_base64().as_bytes())?;
        write_new_private(
            &root.join("sys.creds"),
            jwt::format_creds(&sys_user_jwt, &seed(&sys_user)?).as_bytes(),
        )?;
        write_new_private(
            &root.join("controller.creds"),
            jwt::format_creds(&controller_jwt, &seed(&controller_user)?).as_bytes(),
        )?;
        write_new_private(&root.join("admin.creds"), admin_creds.as_bytes())?;
        write_new_private(
            &root.join("callout.creds"),
            jwt::format_creds(&callout_jwt, &seed(&callout_user)?).as_bytes(),
        )?;
        write_new_private(&root.join("bootstrap.sealed"), &sealed)?;
        let facts = InstallFacts {
            format: FORMAT,
            operator: operator.public_key(),
            operator_jwt,
            system_account: sys.public_key(),
            system_account_jwt: sys_jwt,
            platform_account: platform.public_key(),
            platform_account_jwt: platform_jwt,
            urls: vec![DEFAULT_URL.to_string()],
            replicas: 1,
            created_at: now,
            auth_account: auth.public_key(),
            auth_account_jwt: auth_jwt,
            sentinel_jwt,
        };
        let text = serde_json::to_vec_pretty(&facts)
            .map_err(|e| Error::with_source(ControlErrorKind::InvalidState, "install.json", e))?;
        write_public(&root.join("install.json"), &text)?;
        Ok(facts)
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The public facts.
    pub fn facts(&self) -> &InstallFacts {
        &self.facts
    }

    /// Sets the server URLs and replicas (persisted). A replica count outside
    /// [`tenant_bus::region::REPLICAS`] is refused
    /// ([`ControlErrorKind::InvalidReplicas`]) and nothing is written.
    pub fn set_urls(&mut self, urls: Vec<String>, replicas: usize) -> Result<()> {
        for u in &urls {
            crate::parse_urls(u)?;
        }
        tenant_bus::region::check_replicas(replicas)
            .map_err(|e| Error::new(ControlErrorKind::InvalidReplicas, format!("replicas {e}")))?;
        let mut next = self.facts.clone();
        next.urls = urls;
        next.replicas = replicas;
        let text = serde_json::to_vec_pretty(&next)
            .map_err(|e| Error::with_source(ControlErrorKind::InvalidState, "install.json", e))?;
        write_public(&self.root.join("install.json"), &text)?;
        self.facts = next;
        Ok(())
    }

    /// The URLs as one comma-separated list (what bundles carry).
    pub fn url_list(&self) -> String {
        self.facts.urls.join(",")
    }

    /// A file of the state directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The KEK (from [`crate::kek::KEK_ENV`] or the `kek` file).
    pub fn kek(&self) -> Result<Kek> {
        Kek::load(&self.path("kek"))
    }

    /// A `.creds` file's text.
    pub fn creds(&self, name: &str) -> Result<String> {
        let path = self.path(name);
        std::fs::read_to_string(&path).map_err(|e| io_err("reading", &path, e))
    }

    /// The operator facts for server configs.
    pub fn operator_facts(&self) -> crate::server_config::OperatorFacts {
        let mut preload = vec![
            (
                self.facts.system_account.clone(),
                self.facts.system_account_jwt.clone(),
            ),
            (
                self.facts.platform_account.clone(),
                self.facts.platform_account_jwt.clone(),
            ),
        ];
        let mut default_sentinel = None;
        if !self.facts.auth_account.is_empty() {
            preload.push((
                self.facts.auth_account.clone(),
                self.facts.auth_account_jwt.clone(),
            ));
            default_sentinel = Some(self.facts.sentinel_jwt.clone());
        }
        crate::server_config::OperatorFacts {
            operator_jwt: self.facts.operator_jwt.clone(),
            system_account: self.facts.system_account.clone(),
            preload,
            default_sentinel,
        }
    }

    /// Whether this installation has the auth account (logins by key or token).
    pub fn has_callout(&self) -> bool {
        !self.facts.auth_account.is_empty() && self.path("callout.creds").is_file()
    }

    /// Config options with this state's `jetstream/` and `resolver/` dirs.
    pub fn default_server_options(&self) -> crate::server_config::ServerConfigOptions {
        crate::server_config::ServerConfigOptions::new(
            self.path("jetstream"),
            self.path("resolver"),
        )
    }

    /// The single-node server config text (no secret).
    pub fn server_config(&self, options: &crate::server_config::ServerConfigOptions) -> String {
        crate::server_config::render_server_config(&self.operator_facts(), options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_outside_one_to_five_are_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut install = Installation::init(dir.path()).unwrap();
        let url = "nats://127.0.0.1:4222".to_string();
        install.set_urls(vec![url.clone()], 3).unwrap();
        let before = std::fs::read(install.root().join("install.json")).unwrap();
        for bad in [0, 6, usize::MAX] {
            let e = install
                .set_urls(vec!["nats://127.0.0.1:5222".to_string()], bad)
                .unwrap_err();
            assert_eq!(e.kind(), ControlErrorKind::InvalidReplicas, "{bad}: {e}");
            assert_eq!(install.facts().replicas, 3);
            assert_eq!(install.facts().urls, vec![url.clone()]);
        }
        let after = std::fs::read(install.root().join("install.json")).unwrap();
        assert_eq!(before, after);
        // A reopened installation reads what was written last.
        assert_eq!(Installation::open(dir.path()).unwrap().facts().replicas, 3);
    }
}
