//! NATS JWTs (v2) and `.creds` files, written by hand with serde.
//!
//! A NATS JWT is `base64url(header) "." base64url(claims) "." base64url(signature)`
//! (no padding), where the header is `{"typ":"JWT","alg":"ed25519-nkey"}` and the
//! signature is ed25519 over the first two parts, made with the issuer's nkey.
//!
//! The claims are the registered ones (`jti`, `iat`, `iss`, `name`, `sub`, optionally
//! `exp`) plus a `nats` object whose `type` is `operator`, `account` or `user` and
//! whose `version` is 2. The `jti` is computed as `nats-io/jwt` v2 does it
//! (`ClaimsData.hash`): the JSON of the registered claims *without* `jti`, in the
//! Go field order `aud, exp, jti, iat, iss, name, nbf, sub` with empty fields left
//! out, hashed with SHA-512/256 and encoded as base32 without padding. The `nats`
//! part is not hashed, so two JWTs for one subject signed in the same second share a
//! `jti`. A push on `$SYS.REQ.CLAIMS.UPDATE` is applied by the receiving server
//! whatever its `iat` (checked against nats-server 2.15.1), but the `full`
//! resolvers of a cluster, when they exchange JWTs, keep the one with the newer
//! `iat` and skip one with an equal `jti`; so the control plane re-signs an
//! account with a strictly newer `iat` every time (see
//! [`crate::accounts::next_iat`]) and every node converges on the latest.
//!
//! Field names follow `nats-io/jwt` v2 (`account_claims.go`, `user_claims.go`,
//! `types.go`, `operator_claims.go`). Go's `omitempty` drops zero limits, and the
//! server reads a missing limit as 0 (for `conn` that means "no connection"), so
//! every limit is always written here, with -1 for "unlimited".

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use nkeys::KeyPair;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tenant_bus::error::Error;

use crate::error::{ControlError, ControlErrorKind};

/// The JWT header's `alg` for nkey-signed NATS JWTs.
pub const ALGORITHM: &str = "ed25519-nkey";
/// The JWT header's `typ`.
pub const TOKEN_TYPE: &str = "JWT";
/// "No limit" in NATS limits.
pub const NO_LIMIT: i64 = -1;
/// The revocation key that revokes every user of an account.
pub const REVOKE_ALL: &str = "*";

/// The JWT header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Always `JWT`.
    pub typ: String,
    /// Always `ed25519-nkey`.
    pub alg: String,
}

/// A NATS JWT's claims: the registered claims plus a `nats` payload `T`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims<T> {
    /// The JWT id (SHA-512/256 of the registered claims, base32).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub jti: String,
    /// Issued-at, Unix seconds.
    pub iat: i64,
    /// The issuer's public nkey.
    pub iss: String,
    /// A display name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The subject's public nkey.
    pub sub: String,
    /// Expiry, Unix seconds (absent: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    /// The NATS-specific part.
    pub nats: T,
}

/// The registered claims in `nats-io/jwt`'s `ClaimsData` field order, for the `jti`.
#[derive(Serialize)]
struct ClaimsDataForHash<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<i64>,
    #[serde(skip_serializing_if = "is_zero")]
    iat: i64,
    #[serde(skip_serializing_if = "str::is_empty")]
    iss: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    name: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    sub: &'a str,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

impl<T> Claims<T> {
    /// Claims for `sub`, named `name`, issued at `iat`; `iss` and `jti` are set by
    /// [`encode`].
    pub fn new(sub: impl Into<String>, name: impl Into<String>, iat: i64, nats: T) -> Self {
        Self {
            jti: String::new(),
            iat,
            iss: String::new(),
            name: name.into(),
            sub: sub.into(),
            exp: None,
            nats,
        }
    }

    /// The `jti` these claims should carry (see the module docs).
    pub fn compute_jti(&self) -> Result<String, ControlError> {
        let data = ClaimsDataForHash {
            exp: self.exp.filter(|e| *e != 0),
            iat: self.iat,
            iss: &self.iss,
            name: &self.name,
            sub: &self.sub,
        };
        let json = serde_json::to_vec(&data)
            .map_err(|e| Error::with_source(ControlErrorKind::Jwt, "serializing claims", e))?;
        let digest = ring::digest::digest(&ring::digest::SHA512_256, &json);
        Ok(data_encoding::BASE32_NOPAD.encode(digest.as_ref()))
    }
}

/// A permission list: subjects allowed and denied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permission {
    /// Subjects allowed (wildcards allowed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Subjects denied (wildcards allowed); deny wins over allow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

/// The `nats` part of an operator JWT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorNats {
    /// The system account's public key.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub system_account: String,
    /// Operator signing keys (none: the operator identity key signs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signing_keys: Vec<String>,
    /// Tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Always `operator`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Always 2.
    pub version: u32,
}

/// Account limits (`OperatorLimits` in `nats-io/jwt`: NATS, account and JetStream
/// limits flattened into one object). -1 is unlimited; 0 is zero.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountLimits {
    /// Subscriptions per connection.
    pub subs: i64,
    /// Bytes (not enforced by the server for accounts; -1).
    pub data: i64,
    /// Largest message payload.
    pub payload: i64,
    /// Imports allowed.
    pub imports: i64,
    /// Exports allowed.
    pub exports: i64,
    /// Whether exports may use wildcards.
    #[serde(default)]
    pub wildcards: bool,
    /// Whether user JWTs may be bearer tokens (no nonce signature).
    #[serde(default)]
    pub disallow_bearer: bool,
    /// Client connections, account-wide.
    pub conn: i64,
    /// Leaf-node connections.
    pub leaf: i64,
    /// JetStream memory storage in bytes (0 with `disk_storage` 0: no JetStream).
    #[serde(default)]
    pub mem_storage: i64,
    /// JetStream file storage in bytes.
    #[serde(default)]
    pub disk_storage: i64,
    /// JetStream streams.
    #[serde(default)]
    pub streams: i64,
    /// JetStream consumers.
    #[serde(default)]
    pub consumer: i64,
}

impl AccountLimits {
    /// No limit on anything, JetStream disabled.
    pub fn unlimited_without_jetstream() -> Self {
        Self {
            subs: NO_LIMIT,
            data: NO_LIMIT,
            payload: NO_LIMIT,
            imports: NO_LIMIT,
            exports: NO_LIMIT,
            wildcards: true,
            disallow_bearer: false,
            conn: NO_LIMIT,
            leaf: NO_LIMIT,
            mem_storage: 0,
            disk_storage: 0,
            streams: 0,
            consumer: 0,
        }
    }
}

/// The `nats` part of an account JWT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountNats {
    /// Limits.
    pub limits: AccountLimits,
    /// Revoked users: public key (or `*`) to Unix seconds; user JWTs of that key
    /// issued at or before the time are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub revocations: BTreeMap<String, i64>,
    /// Account signing keys (they sign the account's users).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signing_keys: Vec<String>,
    /// Services and streams imported from other accounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub imports: Vec<Import>,
    /// Services and streams offered to other accounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exports: Vec<Export>,
    /// Tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Auth callout: the account's users are authorized by an external service
    /// (only the auth account has it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<ExternalAuthorization>,
    /// Always `account`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Always 2.
    pub version: u32,
}

/// The `authorization` block of an account JWT (`ExternalAuthorization` in
/// `nats-io/jwt` v2): users of this account are sent to the auth callout
/// service, which connects as one of `auth_users`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalAuthorization {
    /// The callout service's users (they bypass the callout).
    pub auth_users: Vec<String>,
    /// Accounts the callout may place users in (`*`: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_accounts: Vec<String>,
    /// The service's public xkey: requests are sealed to it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub xkey: String,
}

/// An import of another account's service or stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Import {
    /// A name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The subject in the exporting account.
    pub subject: String,
    /// The exporting account's public key.
    pub account: String,
    /// `service` or `stream`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Where a stream import's messages appear in the importing account.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub local_subject: String,
}

/// An export to other accounts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    /// A name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The exported subject.
    pub subject: String,
    /// `service` or `stream`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The 1-based token of the subject that must equal the importing account's
    /// public key (0: none), so an account can only ever import its own subject.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub account_token_position: u32,
}

fn is_false(v: &bool) -> bool {
    !*v
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

/// The `nats` part of a generic JWT (the operator's account-delete request).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteAccountsNats {
    /// The account public keys to delete.
    pub accounts: Vec<String>,
}

/// The `nats` part of a user JWT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserNats {
    /// Publish permissions.
    #[serde(rename = "pub", default)]
    pub publish: Permission,
    /// Subscribe permissions.
    #[serde(rename = "sub", default)]
    pub subscribe: Permission,
    /// Subscriptions (-1: the account's limit applies).
    pub subs: i64,
    /// Bytes (-1).
    pub data: i64,
    /// Largest payload (-1: the account's limit applies).
    pub payload: i64,
    /// The account a signing key signed this user for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_account: Option<String>,
    /// A bearer JWT: the server accepts it without a signed nonce (the auth
    /// callout's sentinel user).
    #[serde(default, skip_serializing_if = "is_false")]
    pub bearer_token: bool,
    /// Tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Always `user`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Always 2.
    pub version: u32,
}

/// Operator claims.
pub type OperatorClaims = Claims<OperatorNats>;
/// Account claims.
pub type AccountClaims = Claims<AccountNats>;
/// User claims.
pub type UserClaims = Claims<UserNats>;

fn header() -> Header {
    Header {
        typ: TOKEN_TYPE.to_string(),
        alg: ALGORITHM.to_string(),
    }
}

fn jwt_err(detail: impl Into<std::borrow::Cow<'static, str>>) -> ControlError {
    Error::new(ControlErrorKind::Jwt, detail)
}

/// Signs `claims` with `signer`: sets `iss` to the signer's public key and `jti`,
/// and returns the encoded JWT.
pub fn encode<T: Serialize>(
    claims: &mut Claims<T>,
    signer: &KeyPair,
) -> Result<String, ControlError> {
    if claims.sub.is_empty() {
        return Err(jwt_err("claims have no subject"));
    }
    claims.iss = signer.public_key();
    claims.jti = String::new();
    claims.jti = claims.compute_jti()?;
    let header = serde_json::to_vec(&header())
        .map_err(|e| Error::with_source(ControlErrorKind::Jwt, "serializing header", e))?;
    let body = serde_json::to_vec(claims)
        .map_err(|e| Error::with_source(ControlErrorKind::Jwt, "serializing claims", e))?;
    let signing_input = format!("{}.{}", B64URL.encode(header), B64URL.encode(body));
    let signature = signer
        .sign(signing_input.as_bytes())
        .map_err(|e| Error::with_source(ControlErrorKind::Crypto, "signing JWT", e))?;
    Ok(format!("{signing_input}.{}", B64URL.encode(signature)))
}

/// Decodes `token`, checking the header, the `jti` and the signature against the
/// claimed issuer. Does not check who the issuer is: use [`decode_issued_by`].
pub fn decode<T: DeserializeOwned>(token: &str) -> Result<Claims<T>, ControlError> {
    let mut parts = token.trim().split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(jwt_err("a JWT has three dot-separated parts"));
    };
    let b64 = |part: &str, what: &'static str| {
        B64URL
            .decode(part)
            .map_err(|e| Error::with_source(ControlErrorKind::Jwt, what, e))
    };
    let header: Header = serde_json::from_slice(&b64(h, "header base64")?)
        .map_err(|e| Error::with_source(ControlErrorKind::Jwt, "header JSON", e))?;
    if header.alg != ALGORITHM || !header.typ.eq_ignore_ascii_case(TOKEN_TYPE) {
        return Err(jwt_err(format!(
            "unsupported header typ={:?} alg={:?}",
            header.typ, header.alg
        )));
    }
    let claims: Claims<T> = serde_json::from_slice(&b64(c, "claims base64")?)
        .map_err(|e| Error::with_source(ControlErrorKind::Jwt, "claims JSON", e))?;
    let signature = b64(s, "signature base64")?;
    let issuer = KeyPair::from_public_key(&claims.iss)
        .map_err(|e| Error::with_source(ControlErrorKind::Jwt, "issuer is not a public nkey", e))?;
    let signing_input = &token.trim()[..h.len() + 1 + c.len()];
    issuer
        .verify(signing_input.as_bytes(), &signature)
        .map_err(|e| Error::with_source(ControlErrorKind::Jwt, "bad signature", e))?;
    if claims.jti != claims.compute_jti()? {
        return Err(jwt_err("jti does not match the claims"));
    }
    Ok(claims)
}

/// [`decode`], and checks that `issuer` signed it.
pub fn decode_issued_by<T: DeserializeOwned>(
    token: &str,
    issuer: &str,
) -> Result<Claims<T>, ControlError> {
    let claims = decode::<T>(token)?;
    if claims.iss != issuer {
        return Err(jwt_err(format!(
            "issued by {}, expected {issuer}",
            claims.iss
        )));
    }
    Ok(claims)
}

/// The text of a standard NATS `.creds` file holding `user_jwt` and the user's
/// `seed`.
pub fn format_creds(user_jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
************************* IMPORTANT *************************\n\
NKEY Seed printed below can be used to sign and prove identity.\n\
NKEYs are sensitive and should be treated as secrets.\n\n\
-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
*************************************************************\n"
    )
}

/// Splits `.creds` text into its user JWT and seed.
pub fn parse_creds(text: &str) -> Result<(String, String), ControlError> {
    let mut blocks = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        if line.starts_with("-----BEGIN") && line.ends_with("-----") {
            let Some(value) = lines.next() else {
                break;
            };
            blocks.push(value.to_string());
        }
    }
    match blocks.as_slice() {
        [jwt, seed] if !jwt.is_empty() && !seed.is_empty() => Ok((jwt.clone(), seed.clone())),
        _ => Err(jwt_err("creds text must hold a JWT block and a seed block")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jti_matches_go_field_order() {
        let c = Claims::new("UABC", "n", 1_700_000_000, ());
        let mut c2 = c.clone();
        c2.iss = "AXYZ".into();
        // Go: {"iat":1700000000,"iss":"AXYZ","name":"n","sub":"UABC"}
        let json = br#"{"iat":1700000000,"iss":"AXYZ","name":"n","sub":"UABC"}"#;
        let expect = data_encoding::BASE32_NOPAD
            .encode(ring::digest::digest(&ring::digest::SHA512_256, json).as_ref());
        assert_eq!(c2.compute_jti().unwrap(), expect);
    }

    #[test]
    fn round_trip_and_tamper() {
        let op = KeyPair::new_operator();
        let acct = KeyPair::new_account();
        let mut claims = Claims::new(
            acct.public_key(),
            "acme",
            1_700_000_000,
            AccountNats {
                limits: AccountLimits::unlimited_without_jetstream(),
                revocations: BTreeMap::new(),
                signing_keys: vec![],
                imports: vec![],
                exports: vec![],
                tags: vec![],
                authorization: None,
                kind: "account".into(),
                version: 2,
            },
        );
        let token = encode(&mut claims, &op).unwrap();
        let back: AccountClaims = decode_issued_by(&token, &op.public_key()).unwrap();
        assert_eq!(back, claims);
        let other = KeyPair::new_operator();
        assert_eq!(
            decode_issued_by::<AccountNats>(&token, &other.public_key())
                .unwrap_err()
                .kind(),
            ControlErrorKind::Jwt
        );
        let mut parts: Vec<String> = token.split('.').map(String::from).collect();
        claims.name = "evil".into();
        parts[1] = B64URL.encode(serde_json::to_vec(&claims).unwrap());
        assert_eq!(
            decode::<AccountNats>(&parts.join(".")).unwrap_err().kind(),
            ControlErrorKind::Jwt
        );
    }

    #[test]
    fn creds_round_trip() {
        let text = format_creds("eyJhb.x.y", "SUAB");
        assert_eq!(
            parse_creds(&text).unwrap(),
            ("eyJhb.x.y".to_string(), "SUAB".to_string())
        );
        assert!(parse_creds("nothing").is_err());
    }
}
