//! The control plane: server-enforced tenant isolation with NATS decentralised auth
//! (operator mode).
//!
//! A [`ControlPlane`] owns a state directory (layout in [`state`]) holding an
//! operator, a system account `SYS` (whose user pushes claim updates), a platform
//! account `PLATFORM` (the runtime's own services and JetStream registry) and one
//! NATS account per tenant, all as nkey-signed JWTs ([`jwt`]). The server trusts
//! the operator ([`server_config`]) and resolves accounts with a `full` resolver.
//!
//! - Each tenant's account carries the limits of its [`Quotas`] (connections,
//!   subscriptions, payload, JetStream memory/storage/streams/consumers) and has no
//!   imports or exports, so nothing crosses between tenants ([`accounts`]).
//! - [`ControlPlane::issue_agent`] signs a user of the tenant's account whose
//!   permissions allow `tenant.<id>.>` plus the tenant's own `TASKS` stream and
//!   `STATE` and `TASKS_DONE` buckets (allow-list in [`accounts`]), and returns a
//!   [`CredentialBundle`] with the `.creds` text and the tenant's key set.
//! - [`ControlPlane::suspend_tenant`] re-signs the account with `conn: 0`, `leaf: 0`
//!   and a `*` revocation: the server closes the tenant's connections and refuses
//!   new ones. [`ControlPlane::activate_tenant`] undoes both.
//!   [`ControlPlane::revoke_agent`] revokes one user's public key.
//!
//! While connected ([`ControlPlane::connect`]), every account change is pushed to
//! the server as a request on `$SYS.REQ.CLAIMS.UPDATE` from the system user, and the
//! server's answer is checked: no restart, no reload. Without a connection, the
//! account JWT is written into the resolver directory, where a server started later
//! (or one that has not yet loaded that account) finds it; after connecting,
//! [`ControlPlane::sync`] pushes every account again.
//!
//! Changes are checked before anything is written; while connected, the server is
//! updated first and the state directory second, so a rejected push changes
//! nothing on disk.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nkeys::KeyPair;
use tenant_bus::error::Error;
use tenant_bus::ids::validate_slug;
use tenant_bus::{AgentId, CredentialBundle, MasterSecret, TenantId, TenantKeySet};

pub use crate::accounts::{JetStreamScope, STATE_BUCKET, TASKS_DONE_BUCKET, TASKS_STREAM};
pub use crate::error::{ControlError, ControlErrorKind};
pub use crate::server_config::{OperatorFacts, ServerConfigOptions};
pub use crate::state::{AgentRecord, StateDir, TenantRecord, TenantStatus};

use crate::error::io_err;
use crate::jwt::{AccountNats, Permission, REVOKE_ALL};
use crate::state::{
    create_private_dir, now_unix, read_json, read_text, write_atomic, write_json, ControlFile,
    ACCOUNT_JWT, ACCOUNT_SEED, AGENTS_JSON, FORMAT, TENANT_JSON,
};
use crate::tiers::{Quotas, Tier};

/// The system account's name (and its directory under `accounts/`).
pub const SYSTEM_ACCOUNT: &str = "SYS";
/// The platform account's name (and its directory under `accounts/`).
pub const PLATFORM_ACCOUNT: &str = "PLATFORM";
/// The server URL written into bundles until [`ControlPlane::set_server_url`].
pub const DEFAULT_SERVER_URL: &str = "nats://127.0.0.1:4222";
/// How long a claim push waits for the server's answer.
pub const PUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// The subject claim updates are pushed on.
pub const CLAIMS_UPDATE_SUBJECT: &str = "$SYS.REQ.CLAIMS.UPDATE";

type Result<T> = std::result::Result<T, ControlError>;

fn err(kind: ControlErrorKind, detail: impl Into<std::borrow::Cow<'static, str>>) -> ControlError {
    Error::new(kind, detail)
}

fn crypto(what: &'static str) -> impl FnOnce(nkeys::error::Error) -> ControlError {
    move |e| Error::with_source(ControlErrorKind::Crypto, what, e)
}

fn tenant_id(id: &str) -> Result<TenantId> {
    TenantId::new(id).map_err(|e| Error::with_source(ControlErrorKind::InvalidId, "tenant id", e))
}

fn agent_id(id: &str) -> Result<AgentId> {
    AgentId::new(id).map_err(|e| Error::with_source(ControlErrorKind::InvalidId, "agent id", e))
}

fn slug(what: &'static str, s: &str) -> Result<()> {
    validate_slug(s).map_err(|kind| {
        let shown: String = s.chars().take(80).collect();
        err(
            ControlErrorKind::InvalidId,
            format!("{what} {shown:?}: {kind}"),
        )
    })
}

/// The control plane over one state directory.
#[derive(Debug)]
pub struct ControlPlane {
    state: StateDir,
    control: ControlFile,
    live: Option<async_nats::Client>,
}

impl ControlPlane {
    /// Opens the state at `dir`, creating it (operator, `SYS`, `PLATFORM`, system
    /// user, master secret) if `dir` does not exist or is empty. A non-empty `dir`
    /// that is not a state directory is refused ([`ControlErrorKind::InvalidState`]).
    pub fn init(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let state = StateDir::new(dir);
        if state.control().exists() {
            return Self::open(dir);
        }
        if dir.exists() {
            let mut entries = std::fs::read_dir(dir).map_err(|e| io_err("reading", dir, e))?;
            if entries.next().is_some() {
                return Err(err(
                    ControlErrorKind::InvalidState,
                    format!("{} is not empty and holds no control.json", dir.display()),
                ));
            }
        }
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| err(ControlErrorKind::Io, format!("bad path {}", dir.display())))?;
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| io_err("creating", &parent, e))?;
        let tmp = parent.join(format!(".{name}.init-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let built = Self::build_state(&StateDir::new(&tmp));
        let control = match built {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        // `rename` replaces an empty directory on Unix.
        if let Err(e) = std::fs::rename(&tmp, dir) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(io_err("renaming into", dir, e));
        }
        Ok(Self {
            state,
            control,
            live: None,
        })
    }

    fn build_state(st: &StateDir) -> Result<ControlFile> {
        create_private_dir(st.root())?;
        create_private_dir(&st.operator_dir())?;
        create_private_dir(&st.account_dir(SYSTEM_ACCOUNT))?;
        create_private_dir(&st.account_dir(PLATFORM_ACCOUNT))?;
        create_private_dir(&st.tenants_dir())?;
        create_private_dir(&st.resolver())?;
        create_private_dir(&st.jetstream())?;

        let master = MasterSecret::generate()
            .map_err(|e| Error::with_source(ControlErrorKind::Crypto, "master secret", e))?;
        write_atomic(&st.master(), master.to_base64().as_bytes(), true)?;

        let now = now_unix();
        let operator = KeyPair::new_operator();
        let sys = KeyPair::new_account();
        let platform = KeyPair::new_account();
        let sys_user = KeyPair::new_user();

        let op_jwt = crate::accounts::operator_jwt(&operator, &sys.public_key(), now)?;
        write_atomic(&st.operator_seed(), seed(&operator)?.as_bytes(), true)?;
        write_atomic(&st.operator_jwt(), op_jwt.as_bytes(), false)?;

        let sys_jwt = crate::accounts::system_account_jwt(&operator, &sys.public_key(), now)?;
        let sys_dir = st.account_dir(SYSTEM_ACCOUNT);
        write_atomic(&sys_dir.join(ACCOUNT_SEED), seed(&sys)?.as_bytes(), true)?;
        write_atomic(&sys_dir.join(ACCOUNT_JWT), sys_jwt.as_bytes(), false)?;
        let sys_user_jwt = crate::accounts::user_jwt(
            &sys,
            &sys_user.public_key(),
            "sys",
            Permission::default(),
            Permission::default(),
            vec![],
            now,
        )?;
        let creds = crate::jwt::format_creds(&sys_user_jwt, &seed(&sys_user)?);
        write_atomic(&st.sys_creds(), creds.as_bytes(), true)?;

        let platform_jwt =
            crate::accounts::platform_account_jwt(&operator, &platform.public_key(), now)?;
        let pdir = st.account_dir(PLATFORM_ACCOUNT);
        write_atomic(&pdir.join(ACCOUNT_SEED), seed(&platform)?.as_bytes(), true)?;
        write_atomic(&pdir.join(ACCOUNT_JWT), platform_jwt.as_bytes(), false)?;

        let control = ControlFile {
            format: FORMAT,
            server_url: DEFAULT_SERVER_URL.to_string(),
            operator: operator.public_key(),
            system_account: sys.public_key(),
            platform_account: platform.public_key(),
            created_at: now,
        };
        write_json(&st.control(), &control)?;
        Ok(control)
    }

    /// Opens an existing state directory; [`ControlErrorKind::NotInitialized`] if
    /// `dir` or its `control.json` is missing.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let state = StateDir::new(dir);
        if !dir.is_dir() || !state.control().is_file() {
            return Err(err(
                ControlErrorKind::NotInitialized,
                format!("{} (run init first)", dir.display()),
            ));
        }
        let control: ControlFile = read_json(&state.control())?;
        if control.format != FORMAT {
            return Err(err(
                ControlErrorKind::InvalidState,
                format!("state format {} (expected {FORMAT})", control.format),
            ));
        }
        let plane = Self {
            state,
            control,
            live: None,
        };
        // Fail early on a broken operator key.
        plane.operator_key()?;
        Ok(plane)
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        self.state.root()
    }

    /// The state directory's paths.
    pub fn state_dir(&self) -> &StateDir {
        &self.state
    }

    /// The server URL written into credential bundles.
    pub fn server_url(&self) -> &str {
        &self.control.server_url
    }

    /// Sets (and persists) the server URL written into credential bundles.
    pub fn set_server_url(&mut self, url: &str) -> Result<()> {
        let url = url.trim();
        const SCHEMES: [&str; 4] = ["nats://", "tls://", "ws://", "wss://"];
        let ok_scheme = url
            .split(',')
            .all(|u| SCHEMES.iter().any(|s| u.starts_with(s)));
        if url.is_empty() || !ok_scheme || url.chars().any(char::is_whitespace) {
            return Err(err(
                ControlErrorKind::InvalidUrl,
                format!("server URL {url:?} (expected nats://host:port[,...])"),
            ));
        }
        let mut next = self.control.clone();
        next.server_url = url.to_string();
        write_json(&self.state.control(), &next)?;
        self.control = next;
        Ok(())
    }

    /// The operator's public key.
    pub fn operator_public_key(&self) -> &str {
        &self.control.operator
    }

    /// The system account's public key.
    pub fn system_account(&self) -> &str {
        &self.control.system_account
    }

    /// The platform account's public key.
    pub fn platform_account(&self) -> &str {
        &self.control.platform_account
    }

    /// The operator JWT.
    pub fn operator_jwt(&self) -> Result<String> {
        read_text(&self.state.operator_jwt()).map(|s| s.trim().to_string())
    }

    /// The system account JWT.
    pub fn system_account_jwt(&self) -> Result<String> {
        self.named_account_jwt(SYSTEM_ACCOUNT)
    }

    /// The platform account JWT.
    pub fn platform_account_jwt(&self) -> Result<String> {
        self.named_account_jwt(PLATFORM_ACCOUNT)
    }

    fn named_account_jwt(&self, name: &str) -> Result<String> {
        read_text(&self.state.account_dir(name).join(ACCOUNT_JWT)).map(|s| s.trim().to_string())
    }

    /// The system user's `.creds` text (it may push claim updates: keep it secret).
    pub fn system_creds(&self) -> Result<String> {
        read_text(&self.state.sys_creds())
    }

    fn operator_key(&self) -> Result<KeyPair> {
        load_seed(&self.state.operator_seed())
    }

    fn master(&self) -> Result<MasterSecret> {
        let text = read_text(&self.state.master())?;
        MasterSecret::from_base64(&text)
            .map_err(|e| Error::with_source(ControlErrorKind::InvalidState, "master.key", e))
    }

    // ----- server configuration -------------------------------------------------

    /// The operator, system account and preloads (`SYS`, `PLATFORM`).
    pub fn operator_facts(&self) -> Result<OperatorFacts> {
        Ok(OperatorFacts {
            operator_jwt: self.operator_jwt()?,
            system_account: self.control.system_account.clone(),
            preload: vec![
                (
                    self.control.system_account.clone(),
                    self.system_account_jwt()?,
                ),
                (
                    self.control.platform_account.clone(),
                    self.platform_account_jwt()?,
                ),
            ],
        })
    }

    /// Config options with this state's `jetstream/` and `resolver/` dirs.
    pub fn default_server_options(&self) -> ServerConfigOptions {
        ServerConfigOptions::new(self.state.jetstream(), self.state.resolver())
    }

    /// The single-node server config text (holds no secret).
    pub fn server_config(&self, options: &ServerConfigOptions) -> Result<String> {
        Ok(crate::server_config::render_server_config(
            &self.operator_facts()?,
            options,
        ))
    }

    /// Renders the single-node config to `<state>/server.conf` and returns its path.
    pub fn write_server_config(&self, options: &ServerConfigOptions) -> Result<PathBuf> {
        let text = self.server_config(options)?;
        let path = self.state.server_conf();
        write_atomic(&path, text.as_bytes(), false)?;
        Ok(path)
    }

    /// The operator/system-account/preload snippet for cluster configs.
    pub fn operator_snippet(&self) -> Result<String> {
        Ok(crate::server_config::render_operator_snippet(
            &self.operator_facts()?,
        ))
    }

    /// Writes [`Self::operator_snippet`] to `path` (default `<state>/operator.conf`).
    pub fn write_operator_snippet(&self, path: Option<&Path>) -> Result<PathBuf> {
        let path = path.map_or_else(|| self.state.operator_conf(), Path::to_path_buf);
        write_atomic(&path, self.operator_snippet()?.as_bytes(), false)?;
        Ok(path)
    }

    // ----- live connection ----------------------------------------------------------

    /// Connects to the server at `url` as the system user; from now on account
    /// changes are pushed live.
    pub async fn connect(&mut self, url: &str) -> Result<()> {
        let creds = self.system_creds()?;
        let options = async_nats::ConnectOptions::with_credentials(&creds)
            .map_err(|e| Error::with_source(ControlErrorKind::InvalidState, "sys.creds", e))?
            .name("agentbus-control-plane")
            .connection_timeout(Duration::from_secs(5));
        let client = options
            .connect(url)
            .await
            .map_err(|e| Error::with_source(ControlErrorKind::Connect, url.to_string(), e))?;
        self.live = Some(client);
        Ok(())
    }

    /// Whether account changes are pushed live.
    pub fn is_live(&self) -> bool {
        self.live.is_some()
    }

    /// Drops the live connection (changes then go to the resolver directory).
    pub async fn disconnect(&mut self) {
        if let Some(client) = self.live.take() {
            let _ = client.drain().await;
        }
    }

    /// Pushes one account JWT on `$SYS.REQ.CLAIMS.UPDATE` and checks the answer.
    async fn push(client: &async_nats::Client, account_jwt: &str) -> Result<()> {
        let request = client.request(CLAIMS_UPDATE_SUBJECT, account_jwt.to_string().into());
        let reply = tokio::time::timeout(PUSH_TIMEOUT, request)
            .await
            .map_err(|_| err(ControlErrorKind::Push, "no answer from the server"))?
            .map_err(|e| Error::with_source(ControlErrorKind::Push, "request", e))?;
        let answer: serde_json::Value = serde_json::from_slice(&reply.payload)
            .map_err(|e| Error::with_source(ControlErrorKind::Push, "answer is not JSON", e))?;
        if let Some(error) = answer.get("error") {
            return Err(err(
                ControlErrorKind::Push,
                format!("server refused the account JWT: {error}"),
            ));
        }
        match answer
            .get("data")
            .and_then(|d| d.get("code"))
            .and_then(|c| c.as_u64())
        {
            Some(200) => Ok(()),
            _ => Err(err(
                ControlErrorKind::Push,
                format!("unexpected answer: {answer}"),
            )),
        }
    }

    /// Publishes an account JWT: pushed live if connected, else written into the
    /// resolver directory (where a server that has not loaded it yet reads it).
    async fn publish_account(&self, account: &str, account_jwt: &str) -> Result<()> {
        if let Some(client) = &self.live {
            return Self::push(client, account_jwt).await;
        }
        let dir = self.state.resolver();
        create_private_dir(&dir)?;
        write_atomic(
            &dir.join(format!("{account}.jwt")),
            account_jwt.as_bytes(),
            false,
        )
    }

    /// Pushes the platform account and every tenant account to the connected
    /// server (after a connect, to reconcile changes made while offline). Returns
    /// how many accounts were pushed.
    pub async fn sync(&self) -> Result<usize> {
        let Some(client) = &self.live else {
            return Err(err(ControlErrorKind::Push, "not connected"));
        };
        Self::push(client, &self.platform_account_jwt()?).await?;
        let mut n = 1;
        for record in self.tenants()? {
            let jwt = read_text(&self.state.tenant_dir(&record.tenant).join(ACCOUNT_JWT))?;
            Self::push(client, jwt.trim()).await?;
            n += 1;
        }
        Ok(n)
    }

    // ----- platform services --------------------------------------------------------

    /// Issues the `.creds` text of a platform-service user `name` in the `PLATFORM`
    /// account (no subject restrictions inside that account; it shares nothing with
    /// tenant accounts).
    pub fn issue_platform_service(&self, name: &str) -> Result<String> {
        slug("service name", name)?;
        let account = load_seed(&self.state.account_dir(PLATFORM_ACCOUNT).join(ACCOUNT_SEED))?;
        let user = KeyPair::new_user();
        let user_jwt = crate::accounts::user_jwt(
            &account,
            &user.public_key(),
            name,
            Permission::default(),
            Permission::default(),
            vec![format!("service:{name}")],
            now_unix(),
        )?;
        Ok(crate::jwt::format_creds(&user_jwt, &seed(&user)?))
    }

    // ----- tenants --------------------------------------------------------------------

    /// Every tenant, by id.
    pub fn tenants(&self) -> Result<Vec<TenantRecord>> {
        let dir = self.state.tenants_dir();
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err("reading", &dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io_err("reading", &dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            // Skips temp dirs (`.x.new-<pid>`) and anything not a valid id.
            let Ok(id) = TenantId::new(name) else {
                continue;
            };
            out.push(read_json(&self.state.tenant_dir(&id).join(TENANT_JSON))?);
        }
        out.sort_by(|a: &TenantRecord, b| a.tenant.cmp(&b.tenant));
        Ok(out)
    }

    /// One tenant's record.
    pub fn tenant(&self, id: &str) -> Result<TenantRecord> {
        let id = tenant_id(id)?;
        self.load_tenant(&id)
    }

    fn load_tenant(&self, id: &TenantId) -> Result<TenantRecord> {
        let path = self.state.tenant_dir(id).join(TENANT_JSON);
        if !path.is_file() {
            return Err(err(ControlErrorKind::UnknownTenant, id.to_string()));
        }
        read_json(&path)
    }

    /// The tenant's current account JWT.
    pub fn account_jwt(&self, id: &str) -> Result<String> {
        let id = tenant_id(id)?;
        self.load_tenant(&id)?;
        read_text(&self.state.tenant_dir(&id).join(ACCOUNT_JWT)).map(|s| s.trim().to_string())
    }

    /// Creates tenant `id` with its tier's default quotas.
    pub async fn create_tenant(&mut self, id: &str, tier: Tier) -> Result<TenantRecord> {
        self.create_tenant_with_quotas(id, tier, Quotas::for_tier(tier))
            .await
    }

    /// Creates tenant `id` with explicit quotas: a new NATS account with those
    /// limits, key version 1. Pushed live if connected.
    pub async fn create_tenant_with_quotas(
        &mut self,
        id: &str,
        tier: Tier,
        quotas: Quotas,
    ) -> Result<TenantRecord> {
        let id = tenant_id(id)?;
        let dir = self.state.tenant_dir(&id);
        if dir.exists() {
            return Err(err(ControlErrorKind::DuplicateTenant, id.to_string()));
        }
        let operator = self.operator_key()?;
        let account = KeyPair::new_account();
        let now = now_unix();
        let record = TenantRecord {
            tenant: id.clone(),
            tier,
            quotas,
            account: account.public_key(),
            status: TenantStatus::Active,
            key_versions: vec![1],
            current_key: 1,
            revocations: Default::default(),
            created_at: now,
        };
        let account_jwt = crate::accounts::tenant_account_jwt(&operator, &record, now)?;

        // Build the directory under a temp name, publish, then rename into place.
        let tmp = self
            .state
            .tenants_dir()
            .join(format!(".{id}.new-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let built = (|| {
            create_private_dir(&tmp)?;
            write_atomic(&tmp.join(ACCOUNT_SEED), seed(&account)?.as_bytes(), true)?;
            write_atomic(&tmp.join(ACCOUNT_JWT), account_jwt.as_bytes(), false)?;
            write_json(&tmp.join(TENANT_JSON), &record)?;
            write_json(&tmp.join(AGENTS_JSON), &Vec::<AgentRecord>::new())
        })();
        if let Err(e) = built {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if let Err(e) = self.publish_account(&record.account, &account_jwt).await {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if let Err(e) = std::fs::rename(&tmp, &dir) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(io_err("renaming into", &dir, e));
        }
        Ok(record)
    }

    /// Re-signs the tenant's account from `next` (strictly newer `iat`), publishes
    /// it, then saves the record and JWT.
    async fn apply_tenant(&self, next: &TenantRecord) -> Result<()> {
        let dir = self.state.tenant_dir(&next.tenant);
        let previous = read_text(&dir.join(ACCOUNT_JWT))
            .ok()
            .and_then(|t| crate::jwt::decode::<AccountNats>(t.trim()).ok())
            .map(|c| c.iat);
        let iat = crate::accounts::next_iat(now_unix(), previous);
        let account_jwt = crate::accounts::tenant_account_jwt(&self.operator_key()?, next, iat)?;
        self.publish_account(&next.account, &account_jwt).await?;
        write_atomic(&dir.join(ACCOUNT_JWT), account_jwt.as_bytes(), false)?;
        write_json(&dir.join(TENANT_JSON), next)
    }

    /// Replaces the tenant's quotas (account limits); pushed live if connected.
    pub async fn update_quotas(&mut self, id: &str, quotas: Quotas) -> Result<TenantRecord> {
        let id = tenant_id(id)?;
        let mut record = self.load_tenant(&id)?;
        record.quotas = quotas;
        self.apply_tenant(&record).await?;
        Ok(record)
    }

    /// Suspends the tenant: its account gets `conn: 0`, `leaf: 0` and a `*`
    /// revocation of every user issued until now, so the server closes its
    /// connections and refuses new ones. Pushed live if connected.
    pub async fn suspend_tenant(&mut self, id: &str) -> Result<TenantRecord> {
        let id = tenant_id(id)?;
        let mut record = self.load_tenant(&id)?;
        if record.status == TenantStatus::Suspended {
            return Err(err(
                ControlErrorKind::InvalidTransition,
                format!("{id} is already suspended"),
            ));
        }
        record.status = TenantStatus::Suspended;
        record
            .revocations
            .insert(REVOKE_ALL.to_string(), now_unix());
        self.apply_tenant(&record).await?;
        Ok(record)
    }

    /// Lifts a suspension: connection limits restored, the `*` revocation removed
    /// (per-agent revocations stay). Pushed live if connected.
    pub async fn activate_tenant(&mut self, id: &str) -> Result<TenantRecord> {
        let id = tenant_id(id)?;
        let mut record = self.load_tenant(&id)?;
        if record.status == TenantStatus::Active {
            return Err(err(
                ControlErrorKind::InvalidTransition,
                format!("{id} is not suspended"),
            ));
        }
        record.status = TenantStatus::Active;
        record.revocations.remove(REVOKE_ALL);
        self.apply_tenant(&record).await?;
        Ok(record)
    }

    // ----- keys -------------------------------------------------------------------------

    /// The tenant's current key set (derived from the master secret).
    pub fn key_set(&self, id: &str) -> Result<TenantKeySet> {
        let id = tenant_id(id)?;
        let record = self.load_tenant(&id)?;
        self.derive_key_set(&record)
    }

    fn derive_key_set(&self, record: &TenantRecord) -> Result<TenantKeySet> {
        self.master()?
            .key_set(
                &record.tenant,
                record.key_versions.iter().copied(),
                record.current_key,
            )
            .map_err(|e| Error::with_source(ControlErrorKind::InvalidState, "tenant key set", e))
    }

    /// Rotates the tenant's key: version n+1 becomes current, version n stays
    /// accepted, older versions are dropped. Bundles issued afterwards carry both;
    /// agents holding older bundles need new ones to read n+1.
    pub fn rotate_key(&mut self, id: &str) -> Result<TenantKeySet> {
        let id = tenant_id(id)?;
        let mut record = self.load_tenant(&id)?;
        let current = record.current_key;
        let next = current
            .checked_add(1)
            .ok_or_else(|| err(ControlErrorKind::InvalidState, "key version overflow"))?;
        record.key_versions = vec![current, next];
        record.current_key = next;
        let set = self.derive_key_set(&record)?;
        write_json(&self.state.tenant_dir(&id).join(TENANT_JSON), &record)?;
        Ok(set)
    }

    // ----- agents -------------------------------------------------------------------------

    /// The tenant's issued agents (revoked ones included, with `revoked_at`).
    pub fn agents(&self, tenant: &str) -> Result<Vec<AgentRecord>> {
        let id = tenant_id(tenant)?;
        self.load_tenant(&id)?;
        read_json(&self.state.tenant_dir(&id).join(AGENTS_JSON))
    }

    /// Issues credentials for agent `agent` of type `agent_type` in `tenant`: a new
    /// user of the tenant's account with the tenant-scoped permissions (see
    /// [`accounts`]), and the tenant's key set. An agent id may be issued again
    /// only after it was revoked.
    pub fn issue_agent(
        &mut self,
        tenant: &str,
        agent: &str,
        agent_type: &str,
    ) -> Result<CredentialBundle> {
        let tid = tenant_id(tenant)?;
        let aid = agent_id(agent)?;
        slug("agent type", agent_type)?;
        let record = self.load_tenant(&tid)?;
        if record.status == TenantStatus::Suspended {
            return Err(err(ControlErrorKind::TenantSuspended, tid.to_string()));
        }
        let dir = self.state.tenant_dir(&tid);
        let mut agents: Vec<AgentRecord> = read_json(&dir.join(AGENTS_JSON))?;
        if agents
            .iter()
            .any(|a| a.agent == aid && a.revoked_at.is_none())
        {
            return Err(err(
                ControlErrorKind::DuplicateAgent,
                format!("{tid}/{aid}"),
            ));
        }
        let keys = self.derive_key_set(&record)?;
        let account = load_seed(&dir.join(ACCOUNT_SEED))?;
        if account.public_key() != record.account {
            return Err(err(
                ControlErrorKind::InvalidState,
                format!("{tid}: account seed does not match the record"),
            ));
        }
        let user = KeyPair::new_user();
        let now = now_unix();
        let scope = JetStreamScope::default();
        let user_jwt = crate::accounts::user_jwt(
            &account,
            &user.public_key(),
            aid.as_str(),
            Permission {
                allow: crate::accounts::agent_publish_allow(&tid, &scope),
                deny: vec![],
            },
            Permission {
                allow: crate::accounts::agent_subscribe_allow(&tid),
                deny: vec![],
            },
            vec![
                format!("tenant:{tid}"),
                format!("agent:{aid}"),
                format!("type:{agent_type}"),
            ],
            now,
        )?;
        let creds = crate::jwt::format_creds(&user_jwt, &seed(&user)?);
        agents.retain(|a| a.agent != aid);
        agents.push(AgentRecord {
            tenant: tid.clone(),
            agent: aid.clone(),
            user: user.public_key(),
            agent_type: agent_type.to_string(),
            issued_at: now,
            revoked_at: None,
        });
        write_json(&dir.join(AGENTS_JSON), &agents)?;
        Ok(CredentialBundle {
            url: self.control.server_url.clone(),
            tenant: tid,
            agent: aid,
            creds: Some(creds),
            keys,
        })
    }

    /// Revokes one agent: its user key goes into the account's revocations, so the
    /// server closes its connections and refuses it; other agents are untouched.
    /// Pushed live if connected.
    pub async fn revoke_agent(&mut self, tenant: &str, agent: &str) -> Result<AgentRecord> {
        let tid = tenant_id(tenant)?;
        let aid = agent_id(agent)?;
        let mut record = self.load_tenant(&tid)?;
        let dir = self.state.tenant_dir(&tid);
        let mut agents: Vec<AgentRecord> = read_json(&dir.join(AGENTS_JSON))?;
        let Some(entry) = agents
            .iter_mut()
            .find(|a| a.agent == aid && a.revoked_at.is_none())
        else {
            return Err(err(ControlErrorKind::UnknownAgent, format!("{tid}/{aid}")));
        };
        let now = now_unix();
        entry.revoked_at = Some(now);
        let revoked = entry.clone();
        record.revocations.insert(revoked.user.clone(), now);
        self.apply_tenant(&record).await?;
        write_json(&dir.join(AGENTS_JSON), &agents)?;
        Ok(revoked)
    }
}

fn seed(kp: &KeyPair) -> Result<String> {
    kp.seed().map_err(crypto("reading a seed"))
}

fn load_seed(path: &Path) -> Result<KeyPair> {
    let text = read_text(path)?;
    KeyPair::from_seed(text.trim()).map_err(|e| {
        Error::with_source(
            ControlErrorKind::InvalidState,
            format!("bad seed in {}", path.display()),
            e,
        )
    })
}
