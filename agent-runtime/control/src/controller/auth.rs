//! Who is calling: the signed headers of an admin request, checked against the
//! admin's record, and the role check (the second one: the server's subject
//! permissions on the admin's NATS user are the first).

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;

use crate::api::{self, ApiError, ErrorCode};
use crate::store::{AdminRecord, Store};

fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Forbidden, message)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The admin's record.
    pub admin: AdminRecord,
    /// The request id.
    pub request_id: String,
}

/// Checks the request's signature, freshness and the caller's role for `subject`.
pub async fn authenticate(
    store: &Store,
    message: &async_nats::Message,
) -> Result<Caller, ApiError> {
    let headers = message
        .headers
        .as_ref()
        .ok_or_else(|| forbidden("unsigned request (no headers)"))?;
    let get = |name: &str| -> Result<String, ApiError> {
        headers
            .get(name)
            .map(|v| v.as_str().to_string())
            .ok_or_else(|| forbidden(format!("unsigned request (no {name})")))
    };
    let name = get(api::HDR_ADMIN)?;
    let request_id = get(api::HDR_REQUEST_ID)?;
    let time: u64 = get(api::HDR_TIME)?
        .parse()
        .map_err(|_| forbidden("bad request time"))?;
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(get(api::HDR_SIG)?.as_bytes())
        .map_err(|_| forbidden("bad signature encoding"))?;
    if request_id.is_empty() || request_id.len() > 64 || !request_id.is_ascii() {
        return Err(ApiError::new(
            ErrorCode::InvalidInput,
            "request id must be 1 to 64 ASCII characters",
        ));
    }
    if now_ms().abs_diff(time) > api::MAX_CLOCK_SKEW_MS {
        return Err(forbidden(
            "request time is too far from the controller's clock",
        ));
    }
    let Some((admin, _)) = store.admin(&name).await? else {
        return Err(forbidden(format!("unknown admin {name:?}")));
    };
    if admin.revoked_at.is_some() {
        return Err(forbidden(format!("admin {name:?} is revoked")));
    }
    let key = nkeys::KeyPair::from_public_key(&admin.user)
        .map_err(|_| ApiError::new(ErrorCode::Internal, "stored admin key is invalid"))?;
    let text = api::signed_text(
        message.subject.as_str(),
        &request_id,
        time,
        &message.payload,
    );
    key.verify(&text, &sig)
        .map_err(|_| forbidden("bad request signature"))?;
    if !api::role_allows(admin.role, admin.tenant.as_ref(), message.subject.as_str()) {
        return Err(forbidden(format!(
            "{} {name:?} may not call {}",
            admin.role, message.subject
        )));
    }
    // Request ids are scoped to the admin: one admin can never make the
    // controller take its request for a retry of another admin's.
    let request_id = format!("{name}/{request_id}");
    Ok(Caller { admin, request_id })
}
