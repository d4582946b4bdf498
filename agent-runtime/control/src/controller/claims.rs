//! Account claims on the server: push, list and delete through `$SYS`, as the
//! system user.

use std::time::Duration;

use nkeys::KeyPair;

use crate::api::{ApiError, ErrorCode};
use crate::install::now_unix;
use crate::registry::TenantRecord;

/// `$SYS.REQ.CLAIMS.UPDATE`.
pub const UPDATE: &str = "$SYS.REQ.CLAIMS.UPDATE";
/// `$SYS.REQ.CLAIMS.LIST`.
pub const LIST: &str = "$SYS.REQ.CLAIMS.LIST";
/// `$SYS.REQ.CLAIMS.DELETE`.
pub const DELETE: &str = "$SYS.REQ.CLAIMS.DELETE";
/// How long a `$SYS` request waits for the server's answer.
pub const TIMEOUT: Duration = Duration::from_secs(5);

fn unavailable(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, format!("{what}: {e}"))
}

async fn sys_request(
    sys: &async_nats::Client,
    subject: &'static str,
    body: String,
) -> Result<serde_json::Value, ApiError> {
    let reply = tokio::time::timeout(TIMEOUT, sys.request(subject, body.into()))
        .await
        .map_err(|_| unavailable(subject, "no answer from the server"))?
        .map_err(|e| unavailable(subject, e))?;
    serde_json::from_slice(&reply.payload).map_err(|e| unavailable(subject, e))
}

fn check_answer(subject: &str, answer: &serde_json::Value) -> Result<(), ApiError> {
    if let Some(error) = answer.get("error") {
        return Err(ApiError::new(
            ErrorCode::Internal,
            format!("the server refused {subject}: {error}"),
        ));
    }
    Ok(())
}

/// Signs the tenant's account JWT from its record.
pub fn tenant_jwt(
    operator: &KeyPair,
    record: &TenantRecord,
    platform_account: &str,
) -> Result<String, ApiError> {
    crate::accounts::tenant_account_jwt(operator, record, platform_account, record.account_iat)
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))
}

/// Pushes an account JWT and checks the answer.
pub async fn push(sys: &async_nats::Client, account_jwt: &str) -> Result<(), ApiError> {
    let answer = sys_request(sys, UPDATE, account_jwt.to_string()).await?;
    check_answer(UPDATE, &answer)?;
    match answer
        .get("data")
        .and_then(|d| d.get("code"))
        .and_then(|c| c.as_u64())
    {
        Some(200) => Ok(()),
        _ => Err(ApiError::new(
            ErrorCode::Internal,
            format!("unexpected answer to a claim push: {answer}"),
        )),
    }
}

/// The accounts the server's resolver holds.
pub async fn list(sys: &async_nats::Client) -> Result<Vec<String>, ApiError> {
    let answer = sys_request(sys, LIST, String::new()).await?;
    check_answer(LIST, &answer)?;
    let mut out = Vec::new();
    collect_accounts(answer.get("data").unwrap_or(&answer), &mut out);
    out.sort();
    out.dedup();
    Ok(out)
}

fn collect_accounts(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) if s.len() == 56 && s.starts_with('A') => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_accounts(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| collect_accounts(x, out)),
        _ => {}
    }
}

/// Deletes accounts from the resolver (operator-signed request).
pub async fn delete(
    sys: &async_nats::Client,
    operator: &KeyPair,
    accounts: Vec<String>,
) -> Result<(), ApiError> {
    let request = crate::accounts::delete_accounts_jwt(operator, accounts, now_unix())
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    let answer = sys_request(sys, DELETE, request).await?;
    check_answer(DELETE, &answer)
}
