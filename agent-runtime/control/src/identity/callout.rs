//! NATS auth callout on the wire: the request and response claims, their
//! xkey encryption, and the auth account the server sends logins to.
//!
//! Written here rather than taken from a crate: the Rust crates that have these
//! types make fields mandatory that nats-server omits when empty (Go's
//! `omitempty`), so they fail on real requests. Every field the server may omit
//! is optional here, and the decode test uses a request captured from
//! nats-server 2.15.
//!
//! # Protocol (nats-server `server/auth_callout.go`)
//! - A client that connects with no JWT gets the server's `default_sentinel`: a
//!   bearer user of the auth account, whose JWT carries `authorization {
//!   auth_users, allowed_accounts, xkey }`. Such users are sent to the callout.
//! - The server publishes a request JWT (signed by its own `N…` key, `aud`
//!   [`REQUEST_AUDIENCE`]) on [`AUTH_SUBJECT`] in the auth account, sealed to the
//!   service's xkey (header [`XKEY_HEADER`] names the server's xkey).
//! - The service answers with a response JWT signed by the auth account: `sub`
//!   is the request's `user_nkey`, `aud` the server id, and `nats.jwt` a user JWT
//!   (also `sub = user_nkey`) signed by the target account's signing key with
//!   `issuer_account` naming the account; or `nats.error`. The answer is sealed
//!   back to the server's xkey.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use nkeys::{KeyPair, XKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::jwt::{
    AccountClaims, AccountLimits, AccountNats, Claims, ExternalAuthorization, Permission, UserNats,
    NO_LIMIT,
};

/// Where the server sends auth requests (in the auth account).
pub const AUTH_SUBJECT: &str = "$SYS.REQ.USER.AUTH";
/// The header naming the server's public xkey on an encrypted request.
pub const XKEY_HEADER: &str = "Nats-Server-Xkey";
/// The `aud` of every request.
pub const REQUEST_AUDIENCE: &str = "nats-authorization-request";
/// The largest request accepted (a request carries the client's TLS chain at most).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Why a callout message could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalloutError(pub String);

impl std::fmt::Display for CalloutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "auth callout: {}", self.0)
    }
}

impl std::error::Error for CalloutError {}

fn bad(detail: impl Into<String>) -> CalloutError {
    CalloutError(detail.into())
}

/// The server that sent a request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerId {
    /// The server's name.
    #[serde(default)]
    pub name: String,
    /// Its host.
    #[serde(default)]
    pub host: String,
    /// Its id (the `aud` of the answer).
    #[serde(default)]
    pub id: String,
    /// Its version.
    #[serde(default)]
    pub version: String,
    /// Its cluster.
    #[serde(default)]
    pub cluster: String,
    /// Its public xkey.
    #[serde(default)]
    pub xkey: String,
}

/// The connecting client as the server sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    /// The client's address.
    #[serde(default)]
    pub host: String,
    /// The server's connection id (CID) of the client.
    #[serde(default)]
    pub id: u64,
    /// The user name, if one was given.
    #[serde(default)]
    pub user: String,
    /// The client's connection name.
    #[serde(default)]
    pub name: String,
    /// `Client`, `Leafnode`, ...
    #[serde(default)]
    pub kind: String,
    /// `nats`, `websocket`, `mqtt`.
    #[serde(default, rename = "type")]
    pub client_type: String,
}

/// The client's CONNECT options (only those the callout reads).
#[derive(Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectOpts {
    /// A JWT the client sent (the sentinel's when it sent none).
    #[serde(default)]
    pub jwt: String,
    /// The token (`nats.connect(url, token=KEY)`).
    #[serde(default)]
    pub auth_token: String,
    /// A user name.
    #[serde(default)]
    pub user: String,
    /// A password.
    #[serde(default)]
    pub pass: String,
    /// The client's name.
    #[serde(default)]
    pub name: String,
    /// The client library.
    #[serde(default)]
    pub lang: String,
    /// Its version.
    #[serde(default)]
    pub version: String,
}

impl std::fmt::Debug for ConnectOpts {
    // Never print secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOpts")
            .field("user", &self.user)
            .field("name", &self.name)
            .field("lang", &self.lang)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// The `nats` part of a request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthRequestNats {
    /// The sending server.
    #[serde(default)]
    pub server_id: ServerId,
    /// The per-connection user key the answer must be issued to.
    pub user_nkey: String,
    /// The client.
    #[serde(default)]
    pub client_info: ClientInfo,
    /// Its CONNECT options.
    #[serde(default)]
    pub connect_opts: ConnectOpts,
    /// `authorization_request`.
    #[serde(default, rename = "type")]
    pub kind: String,
    /// 2.
    #[serde(default)]
    pub version: u32,
}

/// The `nats` part of a response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthResponseNats {
    /// The user JWT (allowed).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub jwt: String,
    /// Why not (denied).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// `authorization_response`.
    #[serde(rename = "type")]
    pub kind: String,
    /// 2.
    pub version: u32,
}

/// Generic JWT claims with `aud` (callout messages have one; the claims of
/// [`crate::jwt`] do not).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AudClaims<T> {
    /// The audience.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub aud: String,
    /// Expiry, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    /// The JWT id.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub jti: String,
    /// Issued at.
    #[serde(default)]
    pub iat: i64,
    /// The issuer's public nkey.
    pub iss: String,
    /// A name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The subject.
    pub sub: String,
    /// The NATS part.
    pub nats: T,
}

/// A decoded, verified request.
#[derive(Debug, Clone)]
pub struct AuthRequest {
    /// Its claims.
    pub claims: AudClaims<AuthRequestNats>,
    /// The server's public xkey when the request was encrypted.
    pub server_xkey: Option<String>,
}

impl AuthRequest {
    /// The `nats` part.
    pub fn nats(&self) -> &AuthRequestNats {
        &self.claims.nats
    }
}

#[derive(Serialize)]
struct HashOrder<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    aud: &'a str,
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

fn encode<T: Serialize>(
    claims: &mut AudClaims<T>,
    signer: &KeyPair,
) -> Result<String, CalloutError> {
    claims.iss = signer.public_key();
    let order = HashOrder {
        aud: &claims.aud,
        exp: claims.exp,
        iat: claims.iat,
        iss: &claims.iss,
        name: &claims.name,
        sub: &claims.sub,
    };
    let json = serde_json::to_vec(&order).map_err(|e| bad(e.to_string()))?;
    claims.jti = data_encoding::BASE32_NOPAD
        .encode(ring::digest::digest(&ring::digest::SHA512_256, &json).as_ref());
    let header = br#"{"typ":"JWT","alg":"ed25519-nkey"}"#;
    let body = serde_json::to_vec(claims).map_err(|e| bad(e.to_string()))?;
    let input = format!("{}.{}", B64URL.encode(header), B64URL.encode(body));
    let sig = signer
        .sign(input.as_bytes())
        .map_err(|e| bad(format!("signing: {e}")))?;
    Ok(format!("{input}.{}", B64URL.encode(sig)))
}

/// Decodes a JWT with `aud` and checks its ed25519 signature against its
/// claimed issuer (callers check who the issuer is).
fn decode<T: DeserializeOwned>(token: &str) -> Result<AudClaims<T>, CalloutError> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("not a JWT"));
    };
    let header: serde_json::Value =
        serde_json::from_slice(&B64URL.decode(h).map_err(|_| bad("header base64"))?)
            .map_err(|_| bad("header JSON"))?;
    if header.get("alg").and_then(|a| a.as_str()) != Some(crate::jwt::ALGORITHM) {
        return Err(bad("unsupported JWT algorithm"));
    }
    let claims: AudClaims<T> =
        serde_json::from_slice(&B64URL.decode(c).map_err(|_| bad("claims base64"))?)
            .map_err(|e| bad(format!("claims JSON: {e}")))?;
    let sig = B64URL.decode(s).map_err(|_| bad("signature base64"))?;
    let issuer = KeyPair::from_public_key(&claims.iss).map_err(|_| bad("issuer is not an nkey"))?;
    issuer
        .verify(&token.as_bytes()[..h.len() + 1 + c.len()], &sig)
        .map_err(|_| bad("bad signature"))?;
    Ok(claims)
}

/// Opens and verifies a request: decrypts it with `service_xkey` when the
/// server sealed it (`server_xkey` from [`XKEY_HEADER`]), checks the JWT's
/// signature, that a server key (`N…`) issued it, its audience and its expiry
/// (against `now`, Unix seconds).
pub fn open_request(
    payload: &[u8],
    server_xkey: Option<&str>,
    service_xkey: &XKey,
    now: i64,
) -> Result<AuthRequest, CalloutError> {
    if payload.len() > MAX_REQUEST_BYTES {
        return Err(bad("request too large"));
    }
    let plain;
    let token = match server_xkey {
        Some(sender) => {
            let sender = XKey::from_public_key(sender).map_err(|_| bad("server xkey"))?;
            plain = service_xkey
                .open(payload, &sender)
                .map_err(|_| bad("cannot open the sealed request"))?;
            &plain[..]
        }
        None => payload,
    };
    let token = std::str::from_utf8(token).map_err(|_| bad("request is not text"))?;
    let claims: AudClaims<AuthRequestNats> = decode(token.trim())?;
    if !claims.iss.starts_with('N') {
        return Err(bad("request not issued by a server key"));
    }
    if claims.aud != REQUEST_AUDIENCE {
        return Err(bad("request audience"));
    }
    if claims.exp.is_some_and(|exp| exp < now) {
        return Err(bad("request expired"));
    }
    if !claims.nats.user_nkey.starts_with('U') {
        return Err(bad("request has no user nkey"));
    }
    Ok(AuthRequest {
        claims,
        server_xkey: server_xkey.map(str::to_string),
    })
}

/// The answer to `request`: a user JWT (`Ok`) or a denial (`Err`, the reason
/// the server logs), signed by the auth account and sealed to the server's
/// xkey when the request was sealed.
pub fn answer(
    request: &AuthRequest,
    outcome: Result<String, String>,
    auth_account: &KeyPair,
    service_xkey: &XKey,
    now: i64,
) -> Result<Vec<u8>, CalloutError> {
    let (jwt, error) = match outcome {
        Ok(jwt) => (jwt, String::new()),
        Err(e) => (String::new(), e),
    };
    let mut claims = AudClaims {
        aud: request.nats().server_id.id.clone(),
        exp: None,
        jti: String::new(),
        iat: now,
        iss: String::new(),
        name: String::new(),
        sub: request.nats().user_nkey.clone(),
        nats: AuthResponseNats {
            jwt,
            error,
            kind: "authorization_response".to_string(),
            version: 2,
        },
    };
    let token = encode(&mut claims, auth_account)?;
    match &request.server_xkey {
        Some(server) => {
            let recipient = XKey::from_public_key(server).map_err(|_| bad("server xkey"))?;
            service_xkey
                .seal(token.as_bytes(), &recipient)
                .map_err(|_| bad("sealing the answer"))
        }
        None => Ok(token.into_bytes()),
    }
}

/// The user JWT a callout issues: `sub` = the request's `user_nkey`, signed by
/// the tenant account's signing key for `account`, expiring at `exp`.
#[allow(clippy::too_many_arguments)]
pub fn issue_user(
    signing: &KeyPair,
    account: &str,
    user_nkey: &str,
    name: &str,
    publish: Permission,
    subscribe: Permission,
    tags: Vec<String>,
    iat: i64,
    exp: i64,
) -> Result<String, CalloutError> {
    let mut claims = Claims::new(
        user_nkey,
        name,
        iat,
        UserNats {
            publish,
            subscribe,
            subs: NO_LIMIT,
            data: NO_LIMIT,
            payload: NO_LIMIT,
            issuer_account: Some(account.to_string()),
            bearer_token: false,
            tags,
            kind: "user".to_string(),
            version: 2,
        },
    );
    claims.exp = Some(exp);
    crate::jwt::encode(&mut claims, signing).map_err(|e| bad(e.to_string()))
}

/// The auth account's JWT: no JetStream, and every user but `callout_user`
/// sent to the callout, whose requests are sealed to `xkey`. The callout may
/// place users in any account (`*`): tenant accounts come and go, and the
/// server still checks that a tenant account's own signing key signed each
/// user JWT, which only the controller holds.
pub fn auth_account_jwt(
    operator: &KeyPair,
    auth_account: &str,
    callout_user: &str,
    xkey: &str,
    iat: i64,
) -> Result<String, CalloutError> {
    let mut claims: AccountClaims = Claims::new(
        auth_account,
        crate::AUTH_ACCOUNT,
        iat,
        AccountNats {
            limits: AccountLimits::unlimited_without_jetstream(),
            revocations: Default::default(),
            signing_keys: vec![],
            imports: vec![],
            exports: vec![],
            tags: vec![],
            authorization: Some(ExternalAuthorization {
                auth_users: vec![callout_user.to_string()],
                allowed_accounts: vec!["*".to_string()],
                xkey: xkey.to_string(),
            }),
            kind: "account".to_string(),
            version: 2,
        },
    );
    crate::jwt::encode(&mut claims, operator).map_err(|e| bad(e.to_string()))
}

fn user_of_auth(
    auth_account: &KeyPair,
    user: &str,
    name: &str,
    deny_all: bool,
    bearer: bool,
    iat: i64,
) -> Result<String, CalloutError> {
    let deny = if deny_all {
        vec![">".to_string()]
    } else {
        vec![]
    };
    let mut claims = Claims::new(
        user,
        name,
        iat,
        UserNats {
            publish: Permission {
                allow: vec![],
                deny: deny.clone(),
            },
            subscribe: Permission {
                allow: vec![],
                deny,
            },
            subs: NO_LIMIT,
            data: NO_LIMIT,
            payload: NO_LIMIT,
            issuer_account: None,
            bearer_token: bearer,
            tags: vec![],
            kind: "user".to_string(),
            version: 2,
        },
    );
    crate::jwt::encode(&mut claims, auth_account).map_err(|e| bad(e.to_string()))
}

/// The server's `default_sentinel`: a bearer user of the auth account that may
/// do nothing (clients that send no JWT get it, and with it the callout).
pub fn sentinel_jwt(auth_account: &KeyPair, iat: i64) -> Result<String, CalloutError> {
    let user = KeyPair::new_user();
    user_of_auth(
        auth_account,
        &user.public_key(),
        "sentinel",
        true,
        true,
        iat,
    )
}

/// The callout service's own user in the auth account.
pub fn callout_user_jwt(
    auth_account: &KeyPair,
    user: &str,
    iat: i64,
) -> Result<String, CalloutError> {
    user_of_auth(auth_account, user, "callout", false, false, iat)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_token(server: &KeyPair, user: &str, token: &str, exp: i64) -> String {
        let mut claims = AudClaims {
            aud: REQUEST_AUDIENCE.to_string(),
            exp: Some(exp),
            jti: String::new(),
            iat: exp - 2,
            iss: String::new(),
            name: String::new(),
            sub: "AAUTH".to_string(),
            nats: serde_json::json!({
                "server_id": {"name": "n1", "host": "127.0.0.1", "id": server.public_key(), "xkey": "X"},
                "user_nkey": user,
                "client_info": {"host": "127.0.0.1", "id": 7, "kind": "Client", "type": "nats"},
                "connect_opts": {"auth_token": token, "lang": "python3", "version": "2.9.0", "protocol": 1},
                "type": "authorization_request",
                "version": 2
            }),
        };
        encode(&mut claims, server).unwrap()
    }

    #[test]
    fn a_sealed_request_opens_and_the_answer_seals_back() {
        let server = KeyPair::new_server();
        let server_x = XKey::new();
        let service_x = XKey::new();
        let user = KeyPair::new_user().public_key();
        let token = request_token(&server, &user, "abk_x", 1_000);
        let sealed = server_x.seal(token.as_bytes(), &service_x).unwrap();
        let req = open_request(&sealed, Some(&server_x.public_key()), &service_x, 999).unwrap();
        assert_eq!(req.nats().user_nkey, user);
        assert_eq!(req.nats().connect_opts.auth_token, "abk_x");
        assert_eq!(req.nats().client_info.id, 7);
        assert!(!format!("{:?}", req.nats().connect_opts).contains("abk_x"));

        let auth = KeyPair::new_account();
        let out = answer(&req, Err("no".into()), &auth, &service_x, 999).unwrap();
        let plain = server_x.open(&out, &service_x).unwrap();
        let claims: AudClaims<AuthResponseNats> =
            decode(std::str::from_utf8(&plain).unwrap()).unwrap();
        assert_eq!(claims.iss, auth.public_key());
        assert_eq!(claims.sub, user);
        assert_eq!(claims.aud, server.public_key());
        assert_eq!(claims.nats.error, "no");
        assert!(claims.nats.jwt.is_empty());
    }

    #[test]
    fn forged_expired_or_misaddressed_requests_are_refused() {
        let server = KeyPair::new_server();
        let service_x = XKey::new();
        let user = KeyPair::new_user().public_key();
        // Signed by an account key, not a server's.
        let acct = KeyPair::new_account();
        let t = request_token(&acct, &user, "k", 1_000);
        assert!(open_request(t.as_bytes(), None, &service_x, 999).is_err());
        // Expired.
        let t = request_token(&server, &user, "k", 1_000);
        assert!(open_request(t.as_bytes(), None, &service_x, 1_001).is_err());
        // Tampered claims.
        let mut parts: Vec<String> = t.split('.').map(str::to_string).collect();
        let body = B64URL.decode(&parts[1]).unwrap();
        let body = String::from_utf8(body).unwrap().replace("\"k\"", "\"K\"");
        parts[1] = B64URL.encode(body);
        assert!(open_request(parts.join(".").as_bytes(), None, &service_x, 999).is_err());
        // Sealed to another service.
        let server_x = XKey::new();
        let sealed = server_x.seal(t.as_bytes(), &XKey::new()).unwrap();
        assert!(open_request(&sealed, Some(&server_x.public_key()), &service_x, 999).is_err());
        // Garbage.
        assert!(open_request(b"garbage", None, &service_x, 999).is_err());
        assert!(open_request(&vec![b'a'; MAX_REQUEST_BYTES + 1], None, &service_x, 0).is_err());
    }

    #[test]
    fn the_auth_account_names_the_callout_user_and_xkey() {
        let op = KeyPair::new_operator();
        let auth = KeyPair::new_account();
        let x = XKey::new();
        let jwt =
            auth_account_jwt(&op, &auth.public_key(), "UCALLOUT", &x.public_key(), 5).unwrap();
        let claims: AccountClaims = crate::jwt::decode(&jwt).unwrap();
        let a = claims.nats.authorization.unwrap();
        assert_eq!(a.auth_users, vec!["UCALLOUT".to_string()]);
        assert_eq!(a.xkey, x.public_key());
        let s = sentinel_jwt(&auth, 5).unwrap();
        let s: Claims<UserNats> = crate::jwt::decode(&s).unwrap();
        assert!(s.nats.bearer_token);
        assert_eq!(s.nats.publish.deny, vec![">".to_string()]);
    }
}
