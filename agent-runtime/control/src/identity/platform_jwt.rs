//! Platform JWTs: tokens of the platform's identity provider, verified against
//! the provider's public keys (a JWKS file), turned into a tenant, a subject and
//! an agent type.
//!
//! Pure: no NATS, no clock, no network. [`JwksVerifier::verify`] takes the
//! current time as an argument, so callers (and tests) decide what "now" is.
//!
//! # What is checked, in order
//! 1. Size: a token longer than [`MAX_TOKEN_LEN`] bytes is refused before any
//!    parsing ([`TooLarge`](IdentityErrorKind::TooLarge)).
//! 2. Shape and algorithm: three base64url parts; the header's `alg` must be
//!    one of [`ALGORITHMS`] (`RS256`, `ES256`, `EdDSA`). `none`, every HMAC
//!    algorithm (`HS256`, ...) and everything else is refused
//!    ([`UnsupportedAlgorithm`](IdentityErrorKind::UnsupportedAlgorithm)), so
//!    the classic confusion, an `HS256` token "signed" with the RSA public key
//!    as the HMAC secret, never reaches a key.
//! 3. Key: chosen only by the header's `kid` among the configured JWKS keys
//!    ([`UnknownKey`](IdentityErrorKind::UnknownKey) without one). Keys the
//!    token carries or points to (`jwk`, `jku`, `x5u`, `x5c`) are never used.
//!    The key type must fit the algorithm (RSA for `RS256`, EC P-256 for
//!    `ES256`, OKP Ed25519 for `EdDSA`) and a key's own `alg`, if it has one,
//!    must equal the token's ([`KeyMismatch`](IdentityErrorKind::KeyMismatch)).
//! 4. Signature, by the `jsonwebtoken` crate (RustCrypto backend); no claim is
//!    looked at before it holds ([`BadSignature`](IdentityErrorKind::BadSignature)).
//! 5. `iss` must be the configured issuer (a single string) and `aud` the
//!    configured audience (or an array holding it).
//! 6. `exp` is required and `nbf` optional, both checked against the `now_unix`
//!    passed in, with the configured leeway (default [`DEFAULT_LEEWAY`]): the
//!    token is valid while `nbf - leeway <= now < exp + leeway`. `iat` is not
//!    required.
//! 7. `sub` must be a non-empty string (the identity's subject).
//! 8. Tenant: the string value of the configured tenant claim (for example
//!    `org_id`) must be a valid [`TenantId`] ([`NoTenant`](IdentityErrorKind::NoTenant),
//!    [`BadTenant`](IdentityErrorKind::BadTenant)). The tenant comes only from
//!    this one verified claim; no other claim, header or connection detail is
//!    consulted.
//! 9. Agent type: the roles claim (a JSON array of strings, like `roles`, or a
//!    space-separated string, like the OAuth `scope`) is matched against the
//!    configured role map in its order; the first mapping whose role the token
//!    holds gives the agent type. No match: refused
//!    ([`NoRole`](IdentityErrorKind::NoRole)).
//!
//! # Claim names
//! The tenant and roles claims are each one top-level claim name, matched
//! exactly. A name with dots or slashes, such as the namespaced
//! `https://example.com/tenant`, is still one top-level name: there are no
//! paths into nested objects.
//!
//! # Configuration
//! [`PlatformJwtConfig`] is stored as JSON:
//! ```json
//! {
//!   "issuer": "https://id.example.com/",
//!   "audience": "agentbus",
//!   "tenant_claim": "org_id",
//!   "roles_claim": "roles",
//!   "role_map": [
//!     { "role": "agentbus:planner", "agent_type": "planner" },
//!     { "role": "agentbus:worker", "agent_type": "worker" }
//!   ],
//!   "leeway_secs": 30
//! }
//! ```
//! `leeway_secs` may be left out (30). Unknown fields are refused, so a typo
//! cannot silently fall back to a default.
//!
//! # The JWKS
//! A JSON object with a `keys` array, as identity providers publish it. Keys
//! without a `kid`, and keys whose `use` is not `sig` (or whose `key_ops` lack
//! `verify`), are skipped. A symmetric (`oct`) key, a malformed RSA, P-256 or
//! Ed25519 key, an RSA modulus outside 2048..=4096 bits, or a repeated `kid` is
//! a configuration error; keys of other types and curves are kept but refuse
//! every token that names them. At least one usable key is required.
//!
//! # Errors
//! [`IdentityError`]'s display never holds the token; it may hold the token's
//! `alg` and `kid` (escaped, at most 64 characters). For audit logs,
//! [`IdentityErrorKind::reason`] gives a short stable reason string.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::crypto::CryptoProvider;
use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tenant_bus::error::Error;
use tenant_bus::TenantId;

/// The longest token accepted, in bytes (checked before any parsing).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// The largest JWKS document accepted, in bytes.
pub const MAX_JWKS_LEN: usize = 1024 * 1024;
/// The clock-skew leeway for `exp` and `nbf` unless configured otherwise.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// The largest configurable leeway.
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);
/// The most entries a role map may have.
pub const MAX_ROLE_MAPPINGS: usize = 256;
/// The token algorithms accepted (the header's `alg`); nothing else is.
pub const ALGORITHMS: [&str; 3] = ["RS256", "ES256", "EdDSA"];

/// The smallest RSA modulus accepted in the JWKS, in bits.
const MIN_RSA_BITS: usize = 2048;
/// The largest RSA modulus accepted in the JWKS, in bits (the RSA backend's limit).
const MAX_RSA_BITS: usize = 4096;
/// Registered claims that cannot name the tenant.
const REGISTERED_CLAIMS: [&str; 7] = ["iss", "sub", "aud", "exp", "nbf", "iat", "jti"];

/// Why a token (or the verifier's configuration) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IdentityErrorKind {
    /// The token is longer than [`MAX_TOKEN_LEN`] bytes.
    TooLarge,
    /// The token is not a compact JWS with a JSON header and claims, or a
    /// required claim (`exp`, `sub`) is missing or of the wrong type.
    Malformed,
    /// The header's `alg` is not one of [`ALGORITHMS`] (`none`, HMAC, ...).
    UnsupportedAlgorithm,
    /// The token names no key (`kid`), or a key the JWKS does not have.
    UnknownKey,
    /// The named key does not fit the token's algorithm (key type, curve, or
    /// the key's own `alg`).
    KeyMismatch,
    /// The signature does not verify.
    BadSignature,
    /// `iss` is missing or not the configured issuer.
    WrongIssuer,
    /// `aud` is missing or does not hold the configured audience.
    WrongAudience,
    /// `exp` (plus the leeway) has passed.
    Expired,
    /// `nbf` (minus the leeway) is still ahead.
    NotYetValid,
    /// The configured tenant claim is absent.
    NoTenant,
    /// The tenant claim is not a string or not a valid tenant id.
    BadTenant,
    /// The roles claim is absent or holds no role of the role map.
    NoRole,
    /// The configuration or the JWKS is invalid or unreadable.
    Config,
}

tenant_bus::kind_display!(IdentityErrorKind {
    TooLarge => "token too large",
    Malformed => "malformed token",
    UnsupportedAlgorithm => "unsupported token algorithm",
    UnknownKey => "unknown signing key",
    KeyMismatch => "signing key does not fit the token",
    BadSignature => "bad token signature",
    WrongIssuer => "wrong token issuer",
    WrongAudience => "wrong token audience",
    Expired => "token expired",
    NotYetValid => "token not yet valid",
    NoTenant => "token names no tenant",
    BadTenant => "token names an invalid tenant",
    NoRole => "token holds no mapped role",
    Config => "invalid platform JWT configuration",
});

impl IdentityErrorKind {
    /// A short stable reason for logs and audit events (`"bad_signature"`, ...).
    pub fn reason(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::Malformed => "malformed",
            Self::UnsupportedAlgorithm => "unsupported_alg",
            Self::UnknownKey => "unknown_key",
            Self::KeyMismatch => "key_mismatch",
            Self::BadSignature => "bad_signature",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::NoTenant => "no_tenant",
            Self::BadTenant => "bad_tenant",
            Self::NoRole => "no_role",
            Self::Config => "config",
        }
    }
}

/// A refused platform JWT or an invalid configuration; `.kind().reason()` is
/// the audit reason. Its display never holds the token.
pub type IdentityError = Error<IdentityErrorKind>;

fn err(
    kind: IdentityErrorKind,
    detail: impl Into<std::borrow::Cow<'static, str>>,
) -> IdentityError {
    Error::new(kind, detail)
}

fn config_err(detail: impl Into<std::borrow::Cow<'static, str>>) -> IdentityError {
    err(IdentityErrorKind::Config, detail)
}

/// Untrusted text for a message: at most 64 characters, Debug-escaped (so
/// control characters cannot forge log lines).
fn shown(s: &str) -> String {
    let cut: String = s.chars().take(64).collect();
    format!("{cut:?}")
}

/// One entry of the role map: tokens holding `role` get `agent_type`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleMapping {
    /// A role or scope string, matched exactly (case-sensitive).
    pub role: String,
    /// The agent type granted (a lowercase slug).
    pub agent_type: String,
}

/// How platform JWTs are checked and mapped (see the module docs for the JSON).
///
/// Build it with [`PlatformJwtConfig::builder`] or deserialize it; both check
/// it the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ConfigJson", into = "ConfigJson")]
pub struct PlatformJwtConfig {
    issuer: String,
    audience: String,
    tenant_claim: String,
    roles_claim: String,
    role_map: Vec<RoleMapping>,
    leeway_secs: u64,
}

/// The stored JSON form of [`PlatformJwtConfig`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigJson {
    issuer: String,
    audience: String,
    tenant_claim: String,
    roles_claim: String,
    role_map: Vec<RoleMapping>,
    #[serde(default = "default_leeway_secs")]
    leeway_secs: u64,
}

fn default_leeway_secs() -> u64 {
    DEFAULT_LEEWAY.as_secs()
}

impl TryFrom<ConfigJson> for PlatformJwtConfig {
    type Error = IdentityError;

    fn try_from(j: ConfigJson) -> Result<Self, IdentityError> {
        Self {
            issuer: j.issuer,
            audience: j.audience,
            tenant_claim: j.tenant_claim,
            roles_claim: j.roles_claim,
            role_map: j.role_map,
            leeway_secs: j.leeway_secs,
        }
        .checked()
    }
}

impl From<PlatformJwtConfig> for ConfigJson {
    fn from(c: PlatformJwtConfig) -> Self {
        Self {
            issuer: c.issuer,
            audience: c.audience,
            tenant_claim: c.tenant_claim,
            roles_claim: c.roles_claim,
            role_map: c.role_map,
            leeway_secs: c.leeway_secs,
        }
    }
}

impl PlatformJwtConfig {
    /// A builder; `issuer`, `audience`, `tenant_claim`, `roles_claim` and at
    /// least one [`map_role`](PlatformJwtConfigBuilder::map_role) are required.
    pub fn builder() -> PlatformJwtConfigBuilder {
        PlatformJwtConfigBuilder::default()
    }

    /// Parses and checks the stored JSON form.
    pub fn from_json(json: &str) -> Result<Self, IdentityError> {
        serde_json::from_str(json).map_err(|e| {
            Error::with_source(IdentityErrorKind::Config, "parsing platform JWT config", e)
        })
    }

    /// The stored JSON form.
    pub fn to_json(&self) -> Result<String, IdentityError> {
        serde_json::to_string_pretty(self).map_err(|e| {
            Error::with_source(
                IdentityErrorKind::Config,
                "serializing platform JWT config",
                e,
            )
        })
    }

    /// The required `iss`.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The audience `aud` must hold.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// The top-level claim naming the tenant.
    pub fn tenant_claim(&self) -> &str {
        &self.tenant_claim
    }

    /// The top-level claim holding roles (array) or scopes (space-separated).
    pub fn roles_claim(&self) -> &str {
        &self.roles_claim
    }

    /// The role map, in matching order.
    pub fn role_map(&self) -> &[RoleMapping] {
        &self.role_map
    }

    /// The clock-skew leeway for `exp` and `nbf` (whole seconds).
    pub fn leeway(&self) -> Duration {
        Duration::from_secs(self.leeway_secs)
    }

    fn checked(self) -> Result<Self, IdentityError> {
        for (name, value) in [
            ("issuer", &self.issuer),
            ("audience", &self.audience),
            ("tenant_claim", &self.tenant_claim),
            ("roles_claim", &self.roles_claim),
        ] {
            if value.is_empty() {
                return Err(config_err(format!("{name} is empty")));
            }
        }
        if REGISTERED_CLAIMS.contains(&self.tenant_claim.as_str()) {
            return Err(config_err(format!(
                "tenant_claim {} is a registered JWT claim",
                shown(&self.tenant_claim)
            )));
        }
        if self.tenant_claim == self.roles_claim {
            return Err(config_err(
                "tenant_claim and roles_claim are the same claim",
            ));
        }
        if self.role_map.is_empty() {
            return Err(config_err(
                "role_map is empty (every token would be refused)",
            ));
        }
        if self.role_map.len() > MAX_ROLE_MAPPINGS {
            return Err(config_err(format!(
                "role_map has more than {MAX_ROLE_MAPPINGS} entries"
            )));
        }
        let mut seen = HashSet::new();
        for m in &self.role_map {
            if m.role.is_empty() || m.role.chars().any(char::is_control) {
                return Err(config_err(format!("invalid role {}", shown(&m.role))));
            }
            if !seen.insert(m.role.as_str()) {
                return Err(config_err(format!(
                    "role {} is mapped twice",
                    shown(&m.role)
                )));
            }
            tenant_bus::ids::validate_slug(&m.agent_type).map_err(|k| {
                config_err(format!(
                    "role {}: invalid agent type {}: {k}",
                    shown(&m.role),
                    shown(&m.agent_type)
                ))
            })?;
        }
        if self.leeway_secs > MAX_LEEWAY.as_secs() {
            return Err(config_err(format!(
                "leeway of {} s is more than {} s",
                self.leeway_secs,
                MAX_LEEWAY.as_secs()
            )));
        }
        Ok(self)
    }
}

/// Builds a [`PlatformJwtConfig`].
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct PlatformJwtConfigBuilder {
    issuer: String,
    audience: String,
    tenant_claim: String,
    roles_claim: String,
    role_map: Vec<RoleMapping>,
    leeway: Option<Duration>,
}

impl PlatformJwtConfigBuilder {
    /// The required `iss` (exact match).
    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = issuer.into();
        self
    }

    /// The audience `aud` must hold (exact match).
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.audience = audience.into();
        self
    }

    /// The top-level claim naming the tenant (for example `org_id`).
    pub fn tenant_claim(mut self, claim: impl Into<String>) -> Self {
        self.tenant_claim = claim.into();
        self
    }

    /// The top-level claim holding roles (for example `roles`, an array) or
    /// scopes (for example `scope`, space-separated).
    pub fn roles_claim(mut self, claim: impl Into<String>) -> Self {
        self.roles_claim = claim.into();
        self
    }

    /// Appends a mapping: tokens holding `role` get `agent_type`, unless an
    /// earlier mapping matched.
    pub fn map_role(mut self, role: impl Into<String>, agent_type: impl Into<String>) -> Self {
        self.role_map.push(RoleMapping {
            role: role.into(),
            agent_type: agent_type.into(),
        });
        self
    }

    /// The clock-skew leeway for `exp` and `nbf` (default [`DEFAULT_LEEWAY`],
    /// at most [`MAX_LEEWAY`]; rounded down to whole seconds).
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = Some(leeway);
        self
    }

    /// Checks and returns the configuration.
    pub fn build(self) -> Result<PlatformJwtConfig, IdentityError> {
        PlatformJwtConfig {
            issuer: self.issuer,
            audience: self.audience,
            tenant_claim: self.tenant_claim,
            roles_claim: self.roles_claim,
            role_map: self.role_map,
            leeway_secs: self.leeway.unwrap_or(DEFAULT_LEEWAY).as_secs(),
        }
        .checked()
    }
}

/// What a verified platform JWT says, after mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedIdentity {
    /// The tenant, from the configured tenant claim.
    pub tenant: TenantId,
    /// The token's `sub`.
    pub subject: String,
    /// The agent type of the first role-map entry the token matched.
    pub agent_type: String,
    /// The role or scope that matched.
    pub role: String,
    /// The token's `exp` (Unix seconds).
    pub expires_at: u64,
    /// The token's `iss` (the configured issuer).
    pub issuer: String,
}

/// A JWKS key, prepared once.
enum KeyEntry {
    /// A key of a type this verifier accepts.
    Usable {
        /// The one accepted algorithm its type fits.
        fits: Algorithm,
        /// The key's own `alg`, if it names one.
        declared: Option<KeyAlgorithm>,
        key: DecodingKey,
    },
    /// A key of another type or curve: refuses every token naming it.
    Unusable(&'static str),
}

/// Verifies platform JWTs against a fixed set of public keys (a JWKS).
pub struct JwksVerifier {
    config: PlatformJwtConfig,
    keys: HashMap<String, KeyEntry>,
}

impl fmt::Debug for JwksVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        f.debug_struct("JwksVerifier")
            .field("config", &self.config)
            .field("kids", &kids)
            .finish()
    }
}

impl JwksVerifier {
    /// A verifier for the keys of a JWKS document (see the module docs for
    /// which keys are used).
    pub fn from_jwks_json(jwks: &str, config: PlatformJwtConfig) -> Result<Self, IdentityError> {
        ensure_crypto_provider()?;
        if jwks.len() > MAX_JWKS_LEN {
            return Err(config_err(format!(
                "JWKS is larger than {MAX_JWKS_LEN} bytes"
            )));
        }
        #[derive(Deserialize)]
        struct RawSet {
            keys: Vec<Value>,
        }
        let set: RawSet = serde_json::from_str(jwks).map_err(|e| {
            Error::with_source(
                IdentityErrorKind::Config,
                "JWKS is not a JSON object with a keys array",
                e,
            )
        })?;
        let mut keys = HashMap::new();
        for raw in set.keys {
            let Some((kid, entry)) = prepare_key(raw)? else {
                continue;
            };
            if keys.contains_key(&kid) {
                return Err(config_err(format!(
                    "JWKS has two keys with kid {}",
                    shown(&kid)
                )));
            }
            keys.insert(kid, entry);
        }
        if !keys.values().any(|k| matches!(k, KeyEntry::Usable { .. })) {
            return Err(config_err(
                "JWKS has no usable signing key (RSA, EC P-256 or Ed25519, with a kid)",
            ));
        }
        Ok(Self { config, keys })
    }

    /// A verifier for the JWKS in the file at `path`.
    pub fn from_file(
        path: impl AsRef<Path>,
        config: PlatformJwtConfig,
    ) -> Result<Self, IdentityError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::with_source(
                IdentityErrorKind::Config,
                format!("reading JWKS {}", path.display()),
                e,
            )
        })?;
        Self::from_jwks_json(&text, config)
            .map_err(|e| err(e.kind(), format!("{}: {}", path.display(), e.detail())))
    }

    /// The configuration.
    pub fn config(&self) -> &PlatformJwtConfig {
        &self.config
    }

    /// The key ids of the JWKS (usable or not), sorted.
    pub fn key_ids(&self) -> Vec<&str> {
        let mut kids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        kids
    }

    /// Verifies `token` at time `now_unix` (Unix seconds) and maps it to an
    /// identity, or says why not (see the module docs for the checks).
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<VerifiedIdentity, IdentityError> {
        use IdentityErrorKind::*;
        if token.len() > MAX_TOKEN_LEN {
            return Err(err(
                TooLarge,
                format!("{} bytes, at most {MAX_TOKEN_LEN}", token.len()),
            ));
        }
        let mut parts = token.split('.');
        let (Some(header), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(err(Malformed, "not three dot-separated parts"));
        };
        let header: Map<String, Value> = URL_SAFE_NO_PAD
            .decode(header)
            .ok()
            .and_then(|h| serde_json::from_slice(&h).ok())
            .ok_or_else(|| err(Malformed, "header is not base64url JSON object"))?;
        let alg = match header.get("alg") {
            Some(Value::String(alg)) => alg.as_str(),
            _ => return Err(err(Malformed, "header has no alg")),
        };
        let alg = match alg {
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            "EdDSA" => Algorithm::EdDSA,
            other => return Err(err(UnsupportedAlgorithm, format!("alg {}", shown(other)))),
        };
        let kid = match header.get("kid") {
            Some(Value::String(kid)) => kid.as_str(),
            _ => return Err(err(UnknownKey, "header has no kid")),
        };
        let key = match self.keys.get(kid) {
            None => return Err(err(UnknownKey, format!("kid {}", shown(kid)))),
            Some(KeyEntry::Unusable(why)) => {
                return Err(err(KeyMismatch, format!("kid {}: {why}", shown(kid))));
            }
            Some(KeyEntry::Usable {
                fits,
                declared,
                key,
            }) => {
                if *fits != alg {
                    return Err(err(
                        KeyMismatch,
                        format!("kid {} is a {fits:?} key, token alg {alg:?}", shown(kid)),
                    ));
                }
                if let Some(declared) = declared {
                    if *declared != KeyAlgorithm::from(alg) {
                        return Err(err(
                            KeyMismatch,
                            format!("kid {} has alg {declared}, token alg {alg:?}", shown(kid)),
                        ));
                    }
                }
                key
            }
        };

        let mut validation = Validation::new(alg);
        validation.validate_exp = false; // checked below against now_unix
        validation.validate_nbf = false;
        validation.leeway = 0;
        validation.validate_aud = true;
        validation.set_required_spec_claims(&["iss", "aud"]);
        validation.set_issuer(&[self.config.issuer.as_str()]);
        validation.set_audience(&[self.config.audience.as_str()]);
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation)
            .map_err(|e| map_jwt_error(e.kind()))?
            .claims;

        // iss: jsonwebtoken accepts an array holding the issuer; RFC 7519 says
        // one string.
        let issuer = match claims.get("iss") {
            Some(Value::String(iss)) if *iss == self.config.issuer => iss.clone(),
            _ => return Err(err(WrongIssuer, "iss is not the configured issuer")),
        };

        let leeway = self.config.leeway_secs;
        let expires_at = match claims.get("exp") {
            None => return Err(err(Malformed, "no exp")),
            Some(v) => numeric_date(v).ok_or_else(|| err(Malformed, "exp is not a time"))?,
        };
        if now_unix >= expires_at.saturating_add(leeway) {
            return Err(err(
                Expired,
                format!("exp {expires_at}, now {now_unix}, leeway {leeway} s"),
            ));
        }
        if let Some(v) = claims.get("nbf") {
            let nbf = numeric_date(v).ok_or_else(|| err(Malformed, "nbf is not a time"))?;
            if now_unix.saturating_add(leeway) < nbf {
                return Err(err(
                    NotYetValid,
                    format!("nbf {nbf}, now {now_unix}, leeway {leeway} s"),
                ));
            }
        }

        let subject = match claims.get("sub") {
            Some(Value::String(sub)) if !sub.is_empty() && !sub.chars().any(char::is_control) => {
                sub.clone()
            }
            _ => return Err(err(Malformed, "sub is not a non-empty string")),
        };

        let tenant = match claims.get(&self.config.tenant_claim) {
            None | Some(Value::Null) => {
                return Err(err(
                    NoTenant,
                    format!("no claim {}", shown(&self.config.tenant_claim)),
                ));
            }
            Some(Value::String(t)) => TenantId::new(t).map_err(|e| {
                Error::with_source(
                    BadTenant,
                    format!("claim {}", shown(&self.config.tenant_claim)),
                    e,
                )
            })?,
            Some(_) => {
                return Err(err(
                    BadTenant,
                    format!("claim {} is not a string", shown(&self.config.tenant_claim)),
                ));
            }
        };

        let held: HashSet<&str> = match claims.get(&self.config.roles_claim) {
            Some(Value::Array(roles)) => roles.iter().filter_map(Value::as_str).collect(),
            Some(Value::String(scopes)) => scopes.split_ascii_whitespace().collect(),
            _ => HashSet::new(),
        };
        let Some(mapping) = self
            .config
            .role_map
            .iter()
            .find(|m| held.contains(m.role.as_str()))
        else {
            return Err(err(
                NoRole,
                format!(
                    "claim {} holds no mapped role",
                    shown(&self.config.roles_claim)
                ),
            ));
        };

        Ok(VerifiedIdentity {
            tenant,
            subject,
            agent_type: mapping.agent_type.clone(),
            role: mapping.role.clone(),
            expires_at,
            issuer,
        })
    }
}

/// Makes sure `jsonwebtoken` has a crypto backend: with both of its backends
/// enabled by feature unification it has no default and would panic.
fn ensure_crypto_provider() -> Result<(), IdentityError> {
    if CryptoProvider::try_get_default().is_none() {
        // Losing a race to another installer is fine: then that one is set.
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
    }
    match CryptoProvider::try_get_default() {
        Some(_) => Ok(()),
        None => Err(config_err("no jsonwebtoken crypto provider")),
    }
}

/// A JWT NumericDate (seconds; a fraction is dropped), or `None`.
fn numeric_date(v: &Value) -> Option<u64> {
    let Value::Number(n) = v else {
        return None;
    };
    if let Some(secs) = n.as_u64() {
        return Some(secs);
    }
    let f = n.as_f64()?;
    // Saturates at u64::MAX for huge values, which only means "far future".
    (f.is_finite() && f >= 0.0).then_some(f as u64)
}

/// The error kind for a `jsonwebtoken` failure (no detail from the library:
/// its messages may quote claim values).
fn map_jwt_error(kind: &JwtErrorKind) -> IdentityError {
    use IdentityErrorKind::*;
    match kind {
        JwtErrorKind::InvalidSignature => err(BadSignature, "signature does not verify"),
        JwtErrorKind::InvalidIssuer => err(WrongIssuer, "iss is not the configured issuer"),
        JwtErrorKind::InvalidAudience => err(WrongAudience, "aud does not hold the audience"),
        JwtErrorKind::MissingRequiredClaim(c) | JwtErrorKind::InvalidClaimFormat(c)
            if c == "iss" =>
        {
            err(WrongIssuer, "iss is missing or not a string")
        }
        JwtErrorKind::MissingRequiredClaim(c) | JwtErrorKind::InvalidClaimFormat(c)
            if c == "aud" =>
        {
            err(WrongAudience, "aud is missing or not a string or array")
        }
        JwtErrorKind::InvalidAlgorithm | JwtErrorKind::UnsupportedAlgorithm => {
            err(UnsupportedAlgorithm, "algorithm refused by the verifier")
        }
        JwtErrorKind::InvalidRsaKey(_)
        | JwtErrorKind::InvalidEcdsaKey
        | JwtErrorKind::InvalidEddsaKey
        | JwtErrorKind::InvalidKeyFormat => err(KeyMismatch, "the key cannot verify this token"),
        JwtErrorKind::Base64(_) => err(Malformed, "a part is not base64url"),
        JwtErrorKind::Json(_) | JwtErrorKind::Utf8(_) => err(Malformed, "invalid JSON"),
        _ => err(Malformed, "token refused by the JWT decoder"),
    }
}

/// Decodes a base64url JWK member, or says which is wrong.
fn jwk_bytes(kid: &str, member: &str, value: &str) -> Result<Vec<u8>, IdentityError> {
    URL_SAFE_NO_PAD.decode(value).map_err(|_| {
        config_err(format!(
            "JWKS key {}: {member} is not base64url",
            shown(kid)
        ))
    })
}

/// Prepares one JWKS member: `None` for a key that is skipped.
fn prepare_key(raw: Value) -> Result<Option<(String, KeyEntry)>, IdentityError> {
    let Some(kid) = raw.get("kid").and_then(Value::as_str).map(str::to_string) else {
        return Ok(None);
    };
    if raw.get("use").is_some_and(|u| u.as_str() != Some("sig")) {
        return Ok(None);
    }
    if let Some(ops) = raw.get("key_ops") {
        let verifies = ops
            .as_array()
            .is_some_and(|ops| ops.iter().any(|op| op.as_str() == Some("verify")));
        if !verifies {
            return Ok(None);
        }
    }
    if raw.get("kty").and_then(Value::as_str) == Some("oct") {
        return Err(config_err(format!(
            "JWKS key {} is a symmetric (oct) key: only public keys belong in the JWKS",
            shown(&kid)
        )));
    }
    let jwk: Jwk = serde_json::from_value(raw).map_err(|e| {
        Error::with_source(
            IdentityErrorKind::Config,
            format!("JWKS key {} is not a valid JWK", shown(&kid)),
            e,
        )
    })?;
    let fits = match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => {
            let n = jwk_bytes(&kid, "n", &p.n)?;
            let e = jwk_bytes(&kid, "e", &p.e)?;
            let n_bits = bit_len(&n);
            if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&n_bits) {
                return Err(config_err(format!(
                    "JWKS key {}: RSA modulus of {n_bits} bits (accepted: {MIN_RSA_BITS} to {MAX_RSA_BITS})",
                    shown(&kid)
                )));
            }
            // A public exponent is odd and > 1; 8 bytes is far beyond any in use.
            let e_ok = bit_len(&e) > 1 && bit_len(&e) <= 64 && e.last().is_some_and(|b| b & 1 == 1);
            if !e_ok {
                return Err(config_err(format!(
                    "JWKS key {}: invalid RSA exponent",
                    shown(&kid)
                )));
            }
            Algorithm::RS256
        }
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
            let x = jwk_bytes(&kid, "x", &p.x)?;
            let y = jwk_bytes(&kid, "y", &p.y)?;
            if x.len() != 32 || y.len() != 32 {
                return Err(config_err(format!(
                    "JWKS key {}: P-256 coordinates are not 32 bytes",
                    shown(&kid)
                )));
            }
            Algorithm::ES256
        }
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            if jwk_bytes(&kid, "x", &p.x)?.len() != 32 {
                return Err(config_err(format!(
                    "JWKS key {}: Ed25519 key is not 32 bytes",
                    shown(&kid)
                )));
            }
            Algorithm::EdDSA
        }
        AlgorithmParameters::EllipticCurve(_) => {
            return Ok(Some((kid, KeyEntry::Unusable("EC key not on P-256"))));
        }
        AlgorithmParameters::OctetKeyPair(_) => {
            return Ok(Some((kid, KeyEntry::Unusable("OKP key not Ed25519"))));
        }
        _ => return Ok(Some((kid, KeyEntry::Unusable("unsupported key type")))),
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| {
        Error::with_source(
            IdentityErrorKind::Config,
            format!("JWKS key {} is not usable", shown(&kid)),
            e,
        )
    })?;
    Ok(Some((
        kid,
        KeyEntry::Usable {
            fits,
            declared: jwk.common.key_algorithm,
            key,
        },
    )))
}

/// The bit length of a big-endian unsigned integer.
fn bit_len(be: &[u8]) -> usize {
    match be.iter().position(|b| *b != 0) {
        None => 0,
        Some(i) => (be.len() - i - 1) * 8 + (8 - be[i].leading_zeros() as usize),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{self as sig, KeyPair as _};
    use serde_json::json;
    use IdentityErrorKind::*;

    const NOW: u64 = 1_800_000_000;
    const ISS: &str = "https://id.example.com/";
    const AUD: &str = "agentbus";
    const RSA_PK8_PEM: &str = include_str!("testdata/rsa-2048.pk8.pem");
    const RSA_PUB_PEM: &str = include_str!("testdata/rsa-2048.pub.pem");

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    }

    enum TestKey {
        Rsa(sig::RsaKeyPair),
        Ec(sig::EcdsaKeyPair),
        Ed(sig::Ed25519KeyPair),
    }

    impl TestKey {
        fn rsa() -> Self {
            Self::Rsa(sig::RsaKeyPair::from_pkcs8(&pem_der(RSA_PK8_PEM)).unwrap())
        }

        fn ec() -> Self {
            let rng = SystemRandom::new();
            let alg = &sig::ECDSA_P256_SHA256_FIXED_SIGNING;
            let pkcs8 = sig::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
            Self::Ec(sig::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap())
        }

        fn ed() -> Self {
            let pkcs8 = sig::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
            Self::Ed(sig::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap())
        }

        fn alg(&self) -> &'static str {
            match self {
                Self::Rsa(_) => "RS256",
                Self::Ec(_) => "ES256",
                Self::Ed(_) => "EdDSA",
            }
        }

        fn sign(&self, msg: &[u8]) -> Vec<u8> {
            let rng = SystemRandom::new();
            match self {
                Self::Rsa(k) => {
                    let mut out = vec![0; k.public().modulus_len()];
                    k.sign(&sig::RSA_PKCS1_SHA256, &rng, msg, &mut out).unwrap();
                    out
                }
                Self::Ec(k) => k.sign(&rng, msg).unwrap().as_ref().to_vec(),
                Self::Ed(k) => k.sign(msg).as_ref().to_vec(),
            }
        }

        /// The public JWK, with `alg` if given.
        fn jwk(&self, kid: &str, alg: Option<&str>) -> Value {
            let mut jwk = match self {
                Self::Rsa(k) => {
                    let c = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(k.public());
                    json!({"kty": "RSA", "n": b64(&c.n), "e": b64(&c.e)})
                }
                Self::Ec(k) => {
                    let p = k.public_key().as_ref();
                    assert_eq!(p.len(), 65);
                    json!({"kty": "EC", "crv": "P-256", "x": b64(&p[1..33]), "y": b64(&p[33..])})
                }
                Self::Ed(k) => {
                    json!({"kty": "OKP", "crv": "Ed25519", "x": b64(k.public_key().as_ref())})
                }
            };
            jwk["kid"] = json!(kid);
            jwk["use"] = json!("sig");
            if let Some(alg) = alg {
                jwk["alg"] = json!(alg);
            }
            jwk
        }
    }

    struct Fixture {
        rsa: TestKey,
        ec: TestKey,
        ed: TestKey,
    }

    impl Fixture {
        fn new() -> Self {
            Self {
                rsa: TestKey::rsa(),
                ec: TestKey::ec(),
                ed: TestKey::ed(),
            }
        }

        fn jwks(&self) -> Value {
            json!({"keys": [
                self.rsa.jwk("rsa-1", Some("RS256")),
                self.ec.jwk("ec-1", Some("ES256")),
                self.ed.jwk("ed-1", None),
                // The RSA key again, declared for another algorithm.
                self.rsa.jwk("rsa-384", Some("RS384")),
            ]})
        }

        fn verifier(&self) -> JwksVerifier {
            self.verifier_with(config())
        }

        fn verifier_with(&self, config: PlatformJwtConfig) -> JwksVerifier {
            JwksVerifier::from_jwks_json(&self.jwks().to_string(), config).unwrap()
        }

        /// (key, kid) pairs for every accepted algorithm.
        fn signers(&self) -> [(&TestKey, &'static str); 3] {
            [(&self.rsa, "rsa-1"), (&self.ec, "ec-1"), (&self.ed, "ed-1")]
        }
    }

    fn config_builder() -> PlatformJwtConfigBuilder {
        PlatformJwtConfig::builder()
            .issuer(ISS)
            .audience(AUD)
            .tenant_claim("org_id")
            .roles_claim("roles")
            .map_role("agentbus:planner", "planner")
            .map_role("agentbus:worker", "worker")
    }

    fn config() -> PlatformJwtConfig {
        config_builder().build().unwrap()
    }

    fn claims() -> Value {
        json!({
            "iss": ISS,
            "aud": AUD,
            "sub": "user-42",
            "org_id": "acme",
            "roles": ["agentbus:worker"],
            "iat": NOW - 10,
            "nbf": NOW - 10,
            "exp": NOW + 600,
        })
    }

    fn signed_raw(header: &Value, claims: &Value, key: &TestKey) -> String {
        let msg = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = key.sign(msg.as_bytes());
        format!("{msg}.{}", b64(&signature))
    }

    fn signed(claims: &Value, key: &TestKey, kid: &str) -> String {
        signed_raw(
            &json!({"typ": "JWT", "alg": key.alg(), "kid": kid}),
            claims,
            key,
        )
    }

    fn kind(r: Result<VerifiedIdentity, IdentityError>) -> IdentityErrorKind {
        match r {
            Ok(id) => panic!("accepted: {id:?}"),
            Err(e) => {
                // The display is safe to log: never the token or its parts.
                assert!(!e.to_string().contains("eyJ"), "{e}");
                e.kind()
            }
        }
    }

    fn hmac_sha256_token(header: &Value, claims: &Value, secret: &[u8]) -> String {
        let msg = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let tag = ring::hmac::sign(&key, msg.as_bytes());
        format!("{msg}.{}", b64(tag.as_ref()))
    }

    #[test]
    fn valid_rs256_es256_and_eddsa_tokens_verify() {
        let f = Fixture::new();
        let v = f.verifier();
        for (key, kid) in f.signers() {
            let id = v.verify(&signed(&claims(), key, kid), NOW).unwrap();
            assert_eq!(
                id,
                VerifiedIdentity {
                    tenant: TenantId::new("acme").unwrap(),
                    subject: "user-42".into(),
                    agent_type: "worker".into(),
                    role: "agentbus:worker".into(),
                    expires_at: NOW + 600,
                    issuer: ISS.into(),
                },
                "{}",
                key.alg()
            );
        }
    }

    #[test]
    fn a_flipped_signature_byte_is_a_bad_signature() {
        let f = Fixture::new();
        let v = f.verifier();
        for (key, kid) in f.signers() {
            let token = signed(&claims(), key, kid);
            let (msg, s) = token.rsplit_once('.').unwrap();
            let mut s = URL_SAFE_NO_PAD.decode(s).unwrap();
            s[7] ^= 0x01;
            let bad = format!("{msg}.{}", b64(&s));
            assert_eq!(kind(v.verify(&bad, NOW)), BadSignature, "{}", key.alg());
        }
    }

    #[test]
    fn changed_claims_under_a_kept_signature_are_a_bad_signature() {
        let f = Fixture::new();
        let v = f.verifier();
        for (key, kid) in f.signers() {
            let token = signed(&claims(), key, kid);
            let (_, s) = token.rsplit_once('.').unwrap();
            let mut other = claims();
            other["org_id"] = json!("globex");
            let forged_msg = signed(&other, key, kid);
            let (forged_msg, _) = forged_msg.rsplit_once('.').unwrap();
            let forged = format!("{forged_msg}.{s}");
            assert_eq!(kind(v.verify(&forged, NOW)), BadSignature, "{}", key.alg());
        }
    }

    #[test]
    fn a_token_signed_by_a_key_outside_the_jwks_is_a_bad_signature() {
        let f = Fixture::new();
        let v = f.verifier();
        let stranger = TestKey::ec();
        assert_eq!(
            kind(v.verify(&signed(&claims(), &stranger, "ec-1"), NOW)),
            BadSignature
        );
    }

    #[test]
    fn wrong_or_missing_audience_is_refused() {
        let f = Fixture::new();
        let v = f.verifier();
        let mut c = claims();
        c["aud"] = json!("other-service");
        assert_eq!(
            kind(v.verify(&signed(&c, &f.rsa, "rsa-1"), NOW)),
            WrongAudience
        );
        c["aud"] = json!(["other-service", "another"]);
        assert_eq!(
            kind(v.verify(&signed(&c, &f.rsa, "rsa-1"), NOW)),
            WrongAudience
        );
        c.as_object_mut().unwrap().remove("aud");
        assert_eq!(
            kind(v.verify(&signed(&c, &f.rsa, "rsa-1"), NOW)),
            WrongAudience
        );
        // An array holding the audience is fine.
        c["aud"] = json!(["other-service", AUD]);
        assert!(v.verify(&signed(&c, &f.rsa, "rsa-1"), NOW).is_ok());
    }

    #[test]
    fn wrong_or_missing_issuer_is_refused() {
        let f = Fixture::new();
        let v = f.verifier();
        let mut c = claims();
        c["iss"] = json!("https://evil.example.com/");
        assert_eq!(kind(v.verify(&signed(&c, &f.ec, "ec-1"), NOW)), WrongIssuer);
        c["iss"] = json!([ISS]);
        assert_eq!(kind(v.verify(&signed(&c, &f.ec, "ec-1"), NOW)), WrongIssuer);
        c.as_object_mut().unwrap().remove("iss");
        assert_eq!(kind(v.verify(&signed(&c, &f.ec, "ec-1"), NOW)), WrongIssuer);
    }

    #[test]
    fn expiry_is_checked_against_now_with_the_leeway() {
        let f = Fixture::new();
        let v = f.verifier();
        let at = |exp: u64| {
            let mut c = claims();
            c["exp"] = json!(exp);
            c["nbf"] = json!(NOW - 1000);
            v.verify(&signed(&c, &f.ed, "ed-1"), NOW)
        };
        assert_eq!(kind(at(NOW - 31)), Expired);
        assert_eq!(kind(at(NOW - 30)), Expired); // now == exp + leeway
        assert_eq!(at(NOW - 29).unwrap().expires_at, NOW - 29);
        assert!(at(NOW + 1).is_ok());
        // Without a leeway, exp == now is already expired.
        let strict = f.verifier_with(config_builder().leeway(Duration::ZERO).build().unwrap());
        let mut c = claims();
        c["exp"] = json!(NOW);
        assert_eq!(
            kind(strict.verify(&signed(&c, &f.ed, "ed-1"), NOW)),
            Expired
        );
        assert!(strict.verify(&signed(&c, &f.ed, "ed-1"), NOW - 1).is_ok());
    }

    #[test]
    fn exp_is_required_and_must_be_a_time() {
        let f = Fixture::new();
        let v = f.verifier();
        let mut c = claims();
        c.as_object_mut().unwrap().remove("exp");
        assert_eq!(kind(v.verify(&signed(&c, &f.rsa, "rsa-1"), NOW)), Malformed);
        c["exp"] = json!("tomorrow");
        assert_eq!(kind(v.verify(&signed(&c, &f.rsa, "rsa-1"), NOW)), Malformed);
        c["exp"] = json!(-5);
        assert_eq!(kind(v.verify(&signed(&c, &f.rsa, "rsa-1"), NOW)), Malformed);
        // A fractional NumericDate is fine.
        c["exp"] = json!((NOW + 60) as f64 + 0.5);
        assert_eq!(
            v.verify(&signed(&c, &f.rsa, "rsa-1"), NOW)
                .unwrap()
                .expires_at,
            NOW + 60
        );
    }

    #[test]
    fn not_yet_valid_is_checked_against_now_with_the_leeway() {
        let f = Fixture::new();
        let v = f.verifier();
        let at = |nbf: u64| {
            let mut c = claims();
            c["nbf"] = json!(nbf);
            v.verify(&signed(&c, &f.ec, "ec-1"), NOW)
        };
        assert_eq!(kind(at(NOW + 31)), NotYetValid);
        assert!(at(NOW + 30).is_ok());
        assert!(at(NOW).is_ok());
        // nbf is optional.
        let mut c = claims();
        c.as_object_mut().unwrap().remove("nbf");
        c.as_object_mut().unwrap().remove("iat");
        assert!(v.verify(&signed(&c, &f.ec, "ec-1"), NOW).is_ok());
    }

    #[test]
    fn a_missing_tenant_claim_is_no_tenant() {
        let f = Fixture::new();
        let v = f.verifier();
        let mut c = claims();
        c.as_object_mut().unwrap().remove("org_id");
        c["tenant"] = json!("acme"); // not the configured claim
        assert_eq!(kind(v.verify(&signed(&c, &f.rsa, "rsa-1"), NOW)), NoTenant);
        c["org_id"] = Value::Null;
        assert_eq!(kind(v.verify(&signed(&c, &f.rsa, "rsa-1"), NOW)), NoTenant);
    }

    #[test]
    fn an_invalid_tenant_id_is_bad_tenant() {
        let f = Fixture::new();
        let v = f.verifier();
        for bad in [
            json!("Acme Corp"),
            json!("acme.>"),
            json!("ACME"),
            json!(""),
            json!("a".repeat(64)),
            json!(42),
            json!(["acme"]),
            json!({"id": "acme"}),
        ] {
            let mut c = claims();
            c["org_id"] = bad.clone();
            assert_eq!(
                kind(v.verify(&signed(&c, &f.ed, "ed-1"), NOW)),
                BadTenant,
                "{bad}"
            );
        }
    }

    #[test]
    fn the_tenant_comes_only_from_the_configured_claim() {
        let f = Fixture::new();
        let v = f.verifier();
        let mut c = claims();
        c["tenant"] = json!("globex");
        c["tenant_id"] = json!("globex");
        let header = json!({"alg": "RS256", "kid": "rsa-1", "tenant": "globex"});
        let id = v.verify(&signed_raw(&header, &c, &f.rsa), NOW).unwrap();
        assert_eq!(id.tenant.as_str(), "acme");
        // A namespaced claim name is one top-level claim.
        let v = f.verifier_with(
            config_builder()
                .tenant_claim("https://example.com/tenant")
                .build()
                .unwrap(),
        );
        c["https://example.com/tenant"] = json!("initech");
        c["https://example"] = json!({"com/tenant": "globex"});
        let id = v.verify(&signed(&c, &f.rsa, "rsa-1"), NOW).unwrap();
        assert_eq!(id.tenant.as_str(), "initech");
    }

    #[test]
    fn alg_none_is_refused() {
        let f = Fixture::new();
        let v = f.verifier();
        let body = b64(claims().to_string().as_bytes());
        for alg in ["none", "None", "NONE", ""] {
            let header = b64(json!({"alg": alg, "kid": "rsa-1"}).to_string().as_bytes());
            for token in [
                format!("{header}.{body}."),
                format!("{header}.{body}.{}", b64(b"x")),
            ] {
                assert_eq!(kind(v.verify(&token, NOW)), UnsupportedAlgorithm, "{alg}");
            }
        }
        // No alg at all.
        let header = b64(json!({"kid": "rsa-1"}).to_string().as_bytes());
        assert_eq!(kind(v.verify(&format!("{header}.{body}."), NOW)), Malformed);
    }

    #[test]
    fn hs256_signed_with_the_rsa_public_key_is_refused() {
        let f = Fixture::new();
        let v = f.verifier();
        let TestKey::Rsa(rsa) = &f.rsa else {
            unreachable!()
        };
        let jwk = f.rsa.jwk("rsa-1", Some("RS256"));
        // Every form an attacker might guess the verifier uses as the secret.
        let secrets: Vec<Vec<u8>> = vec![
            RSA_PUB_PEM.as_bytes().to_vec(),
            pem_der(RSA_PUB_PEM),
            rsa.public().as_ref().to_vec(), // PKCS#1 DER
            URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap(),
            jwk.to_string().into_bytes(),
            f.jwks().to_string().into_bytes(),
        ];
        for kid in ["rsa-1", "rsa-384"] {
            for (i, secret) in secrets.iter().enumerate() {
                let header = json!({"typ": "JWT", "alg": "HS256", "kid": kid});
                let token = hmac_sha256_token(&header, &claims(), secret);
                assert_eq!(
                    kind(v.verify(&token, NOW)),
                    UnsupportedAlgorithm,
                    "secret {i}"
                );
            }
        }
        for alg in ["HS384", "HS512", "hs256"] {
            let header = json!({"alg": alg, "kid": "rsa-1"});
            let token = hmac_sha256_token(&header, &claims(), RSA_PUB_PEM.as_bytes());
            assert_eq!(kind(v.verify(&token, NOW)), UnsupportedAlgorithm, "{alg}");
        }
    }

    #[test]
    fn other_asymmetric_algorithms_are_refused() {
        let f = Fixture::new();
        let v = f.verifier();
        for alg in [
            "RS384", "RS512", "PS256", "ES384", "ES512", "Ed25519", "rs256",
        ] {
            let header = json!({"alg": alg, "kid": "rsa-1"});
            let token = signed_raw(&header, &claims(), &f.rsa);
            assert_eq!(kind(v.verify(&token, NOW)), UnsupportedAlgorithm, "{alg}");
        }
    }

    #[test]
    fn an_unknown_or_missing_kid_is_unknown_key() {
        let f = Fixture::new();
        let v = f.verifier();
        assert_eq!(
            kind(v.verify(&signed(&claims(), &f.rsa, "rsa-2"), NOW)),
            UnknownKey
        );
        let header = json!({"alg": "RS256"});
        assert_eq!(
            kind(v.verify(&signed_raw(&header, &claims(), &f.rsa), NOW)),
            UnknownKey
        );
        let header = json!({"alg": "RS256", "kid": 1});
        assert_eq!(
            kind(v.verify(&signed_raw(&header, &claims(), &f.rsa), NOW)),
            UnknownKey
        );
        // A key carried in the header is never used.
        let header = json!({"alg": "ES256", "kid": "ec-9", "jwk": f.ec.jwk("ec-9", None)});
        assert_eq!(
            kind(v.verify(&signed_raw(&header, &claims(), &f.ec), NOW)),
            UnknownKey
        );
    }

    #[test]
    fn a_key_whose_alg_differs_from_the_tokens_is_refused() {
        let f = Fixture::new();
        let v = f.verifier();
        // rsa-384 is the same RSA key, declared RS384: an RS256 token naming it.
        assert_eq!(
            kind(v.verify(&signed(&claims(), &f.rsa, "rsa-384"), NOW)),
            KeyMismatch
        );
        // The key type must fit the algorithm: an ES256 token naming the RSA
        // key, an EdDSA token naming the EC key.
        assert_eq!(
            kind(v.verify(&signed(&claims(), &f.ec, "rsa-1"), NOW)),
            KeyMismatch
        );
        assert_eq!(
            kind(v.verify(&signed(&claims(), &f.ed, "ec-1"), NOW)),
            KeyMismatch
        );
        // A key of an unsupported curve refuses every token naming it.
        let mut jwks = f.jwks();
        jwks["keys"].as_array_mut().unwrap().push(json!({
            "kty": "EC", "crv": "P-384", "kid": "ec-384",
            "x": b64(&[1; 48]), "y": b64(&[2; 48]),
        }));
        let v = JwksVerifier::from_jwks_json(&jwks.to_string(), config()).unwrap();
        assert_eq!(
            kind(v.verify(&signed(&claims(), &f.ec, "ec-384"), NOW)),
            KeyMismatch
        );
    }

    #[test]
    fn roles_map_to_the_first_matching_agent_type_in_config_order() {
        let f = Fixture::new();
        let v = f.verifier();
        let mut c = claims();
        // Token order does not matter; config order does (planner first).
        c["roles"] = json!(["openid", "agentbus:worker", 7, "agentbus:planner"]);
        let id = v.verify(&signed(&c, &f.rsa, "rsa-1"), NOW).unwrap();
        assert_eq!(
            (id.agent_type.as_str(), id.role.as_str()),
            ("planner", "agentbus:planner")
        );

        c["roles"] = json!(["openid", "Agentbus:Planner", "agentbus:admin"]);
        assert_eq!(kind(v.verify(&signed(&c, &f.rsa, "rsa-1"), NOW)), NoRole);
        c["roles"] = json!([]);
        assert_eq!(kind(v.verify(&signed(&c, &f.rsa, "rsa-1"), NOW)), NoRole);
        c["roles"] = json!({"agentbus:planner": true});
        assert_eq!(kind(v.verify(&signed(&c, &f.rsa, "rsa-1"), NOW)), NoRole);
        c.as_object_mut().unwrap().remove("roles");
        assert_eq!(kind(v.verify(&signed(&c, &f.rsa, "rsa-1"), NOW)), NoRole);
    }

    #[test]
    fn a_space_separated_scope_claim_maps_too() {
        let f = Fixture::new();
        let v = f.verifier_with(config_builder().roles_claim("scope").build().unwrap());
        let mut c = claims();
        c["scope"] = json!("openid  profile\tagentbus:worker");
        let id = v.verify(&signed(&c, &f.ed, "ed-1"), NOW).unwrap();
        assert_eq!(id.agent_type, "worker");
        c["scope"] = json!("openid agentbus:workers agentbus");
        assert_eq!(kind(v.verify(&signed(&c, &f.ed, "ed-1"), NOW)), NoRole);
        // The roles claim is not consulted when scope is configured.
        c["roles"] = json!(["agentbus:planner"]);
        assert_eq!(kind(v.verify(&signed(&c, &f.ed, "ed-1"), NOW)), NoRole);
    }

    #[test]
    fn an_oversize_token_is_refused_before_parsing() {
        let f = Fixture::new();
        let v = f.verifier();
        let mut c = claims();
        c["padding"] = json!("x".repeat(MAX_TOKEN_LEN));
        let token = signed(&c, &f.ed, "ed-1");
        assert!(token.len() > MAX_TOKEN_LEN);
        assert_eq!(kind(v.verify(&token, NOW)), TooLarge);
        // Not even the shape is looked at.
        assert_eq!(
            kind(v.verify(&".".repeat(MAX_TOKEN_LEN + 1), NOW)),
            TooLarge
        );
        // Just under the limit still verifies.
        let mut c = claims();
        c["padding"] = json!("");
        let base = signed(&c, &f.ed, "ed-1").len();
        let room = (MAX_TOKEN_LEN - base) * 3 / 4;
        c["padding"] = json!("x".repeat(room));
        let token = signed(&c, &f.ed, "ed-1");
        assert!(token.len() <= MAX_TOKEN_LEN && token.len() > MAX_TOKEN_LEN - 8);
        assert!(v.verify(&token, NOW).is_ok());
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let f = Fixture::new();
        let v = f.verifier();
        let good = signed(&claims(), &f.rsa, "rsa-1");
        let (h, rest) = good.split_once('.').unwrap();
        for bad in [
            String::new(),
            "abc".into(),
            "a.b".into(),
            format!("{good}.x"),
            format!("!!.{rest}"),
            format!("{}.{rest}", b64(b"[1,2]")),
            format!("{}.{rest}", b64(b"not json")),
        ] {
            assert_eq!(kind(v.verify(&bad, NOW)), Malformed, "{bad:.40}");
        }
        // The signature is checked before the claims are decoded.
        let garbage = format!("{h}.%%%.{}", b64(b"sig"));
        assert_eq!(kind(v.verify(&garbage, NOW)), BadSignature);
        // A sub is required.
        let mut c = claims();
        c.as_object_mut().unwrap().remove("sub");
        assert_eq!(kind(v.verify(&signed(&c, &f.rsa, "rsa-1"), NOW)), Malformed);
        c["sub"] = json!("user\n42");
        assert_eq!(kind(v.verify(&signed(&c, &f.rsa, "rsa-1"), NOW)), Malformed);
    }

    #[test]
    fn config_round_trips_through_json_and_is_checked() {
        let c = config_builder()
            .leeway(Duration::from_secs(10))
            .build()
            .unwrap();
        let json = c.to_json().unwrap();
        assert_eq!(PlatformJwtConfig::from_json(&json).unwrap(), c);
        let stored = json!({
            "issuer": ISS, "audience": AUD, "tenant_claim": "org_id", "roles_claim": "roles",
            "role_map": [{"role": "agentbus:planner", "agent_type": "planner"}],
        });
        let parsed = PlatformJwtConfig::from_json(&stored.to_string()).unwrap();
        assert_eq!(parsed.leeway(), DEFAULT_LEEWAY);
        assert_eq!(parsed.role_map()[0].agent_type, "planner");

        let refused = |patch: Value| {
            let mut j = stored.clone();
            for (k, v) in patch.as_object().unwrap() {
                j[k] = v.clone();
            }
            PlatformJwtConfig::from_json(&j.to_string()).unwrap_err()
        };
        for patch in [
            json!({"leeway": 30}),
            json!({"leeway_secs": 301}),
            json!({"issuer": ""}),
            json!({"audience": ""}),
            json!({"tenant_claim": "sub"}),
            json!({"roles_claim": "org_id"}),
            json!({"role_map": []}),
            json!({"role_map": [{"role": "a", "agent_type": "Planner"}]}),
            json!({"role_map": [{"role": "", "agent_type": "planner"}]}),
            json!({"role_map": [{"role": "a", "agent_type": "x"}, {"role": "a", "agent_type": "y"}]}),
            json!({"role_map": [{"role": "a", "agent": "x"}]}),
        ] {
            assert_eq!(refused(patch.clone()).kind(), Config, "{patch}");
        }
        assert_eq!(
            PlatformJwtConfig::builder().build().unwrap_err().kind(),
            Config
        );
        assert_eq!(
            config_builder()
                .leeway(Duration::from_secs(301))
                .build()
                .unwrap_err()
                .kind(),
            Config
        );
    }

    #[test]
    fn bad_jwks_are_config_errors() {
        let f = Fixture::new();
        let load = |jwks: Value| JwksVerifier::from_jwks_json(&jwks.to_string(), config());
        let refused = |jwks: Value| match load(jwks) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.kind(),
        };
        assert_eq!(refused(json!({"keys": []})), Config);
        assert_eq!(refused(json!([f.rsa.jwk("rsa-1", None)])), Config);
        assert_eq!(
            refused(json!({"keys": [f.rsa.jwk("a", None), f.ec.jwk("a", None)]})),
            Config
        );
        assert_eq!(
            refused(
                json!({"keys": [f.rsa.jwk("rsa-1", None), {"kty": "oct", "kid": "h", "k": b64(b"secret")}]})
            ),
            Config
        );
        // Only keys that cannot be used: none usable.
        let mut enc = f.rsa.jwk("enc", None);
        enc["use"] = json!("enc");
        let mut no_kid = f.ec.jwk("x", None);
        no_kid.as_object_mut().unwrap().remove("kid");
        assert_eq!(refused(json!({"keys": [enc, no_kid]})), Config);
        // A 1024-bit RSA modulus, a short P-256 coordinate, a long Ed25519 key.
        let weak = json!({"kty": "RSA", "kid": "weak", "n": b64(&[0xC5; 128]), "e": "AQAB"});
        assert_eq!(refused(json!({"keys": [weak]})), Config);
        let mut short = f.ec.jwk("short", None);
        short["x"] = json!(b64(&[7; 31]));
        assert_eq!(refused(json!({"keys": [short]})), Config);
        let mut long = f.ed.jwk("long", None);
        long["x"] = json!(b64(&[7; 33]));
        assert_eq!(refused(json!({"keys": [long]})), Config);
        let mut even = f.rsa.jwk("even", None);
        even["e"] = json!(b64(&[1, 0, 0]));
        assert_eq!(refused(json!({"keys": [even]})), Config);

        // Skipped keys next to a usable one are fine and cannot be selected.
        let mut enc = f.rsa.jwk("enc", None);
        enc["use"] = json!("enc");
        let v = load(json!({"keys": [enc, f.ed.jwk("ed-1", None)]})).unwrap();
        assert_eq!(v.key_ids(), vec!["ed-1"]);
        assert_eq!(
            kind(v.verify(&signed(&claims(), &f.rsa, "enc"), NOW)),
            UnknownKey
        );
    }

    #[test]
    fn from_file_reads_a_jwks_file() {
        let f = Fixture::new();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, f.jwks().to_string()).unwrap();
        let v = JwksVerifier::from_file(&path, config()).unwrap();
        assert_eq!(v.key_ids(), vec!["ec-1", "ed-1", "rsa-1", "rsa-384"]);
        assert!(v.verify(&signed(&claims(), &f.ec, "ec-1"), NOW).is_ok());
        let missing = JwksVerifier::from_file(dir.path().join("nope.json"), config());
        assert_eq!(missing.map(|_| ()).unwrap_err().kind(), Config);
    }

    #[test]
    fn reasons_are_distinct_and_errors_do_not_show_the_token() {
        let kinds = [
            TooLarge,
            Malformed,
            UnsupportedAlgorithm,
            UnknownKey,
            KeyMismatch,
            BadSignature,
            WrongIssuer,
            WrongAudience,
            Expired,
            NotYetValid,
            NoTenant,
            BadTenant,
            NoRole,
            Config,
        ];
        let reasons: HashSet<&str> = kinds.iter().map(|k| k.reason()).collect();
        assert_eq!(reasons.len(), kinds.len());
        assert_eq!(BadSignature.reason(), "bad_signature");

        let f = Fixture::new();
        let v = f.verifier();
        let token = signed(&claims(), &f.rsa, "rsa-1");
        let late = v.verify(&token, NOW + 10_000).unwrap_err();
        let (_, s) = token.rsplit_once('.').unwrap();
        assert!(!late.to_string().contains(s));
        assert!(!format!("{late:?}").contains(s));
        // A hostile kid is escaped and cut short.
        let header = json!({"alg": "RS256", "kid": format!("x\n{}", "k".repeat(500))});
        let e = v
            .verify(&signed_raw(&header, &claims(), &f.rsa), NOW)
            .unwrap_err();
        assert_eq!(e.kind(), UnknownKey);
        assert!(
            !e.to_string().contains('\n') && e.to_string().len() < 200,
            "{e}"
        );
    }
}
