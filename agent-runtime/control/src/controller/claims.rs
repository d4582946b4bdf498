//! Account claims on the server: push, list and delete through `$SYS`, as the
//! system user.

use std::time::Duration;

use futures::StreamExt as _;
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

/// Pushes an account JWT to every server and checks the answers.
///
/// Every server of a cluster subscribes to [`UPDATE`] and applies the JWT
/// itself, so the push collects answers until `expected` servers took it (or
/// [`TIMEOUT`] passed). Returning after the first answer raced on clusters: a
/// client served by a node that had the account, whose JetStream request went
/// to a meta leader that did not yet, was told "JetStream not enabled for
/// account". A server that does not answer in time (down, partitioned) learns
/// the JWT from its resolver peers later; one answer is the minimum. Returns
/// how many servers answered.
pub async fn push(
    sys: &async_nats::Client,
    account_jwt: &str,
    expected: usize,
) -> Result<usize, ApiError> {
    let inbox = sys.new_inbox();
    let mut answers = sys
        .subscribe(inbox.clone())
        .await
        .map_err(|e| unavailable(UPDATE, e))?;
    sys.publish_with_reply(UPDATE, inbox, account_jwt.to_string().into())
        .await
        .map_err(|e| unavailable(UPDATE, e))?;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut taken = 0usize;
    while taken < expected.max(1) {
        let Ok(Some(msg)) = tokio::time::timeout_at(deadline, answers.next()).await else {
            break;
        };
        let answer: serde_json::Value =
            serde_json::from_slice(&msg.payload).map_err(|e| unavailable(UPDATE, e))?;
        check_answer(UPDATE, &answer)?;
        match answer
            .get("data")
            .and_then(|d| d.get("code"))
            .and_then(|c| c.as_u64())
        {
            Some(200) => taken += 1,
            _ => {
                return Err(ApiError::new(
                    ErrorCode::Internal,
                    format!("unexpected answer to a claim push: {answer}"),
                ))
            }
        }
    }
    let _ = answers.unsubscribe().await;
    match taken {
        0 => Err(unavailable(UPDATE, "no answer from the server")),
        n if n < expected => {
            tracing::warn!(
                answered = n,
                expected,
                "not every server took the account JWT in time; the others learn it from their resolver peers"
            );
            Ok(n)
        }
        n => Ok(n),
    }
}

/// How many servers are up, as the connected server sees it: itself plus every
/// cluster peer it has a route to (routes are pooled: distinct remote ids). 1
/// when the server does not answer (the push then needs one answer).
pub async fn live_servers(sys: &async_nats::Client) -> usize {
    let id = sys.server_info().server_id;
    let subject = format!("$SYS.REQ.SERVER.{id}.ROUTEZ");
    let Ok(Ok(reply)) = tokio::time::timeout(TIMEOUT, sys.request(subject, "{}".into())).await
    else {
        return 1;
    };
    let Ok(answer) = serde_json::from_slice::<serde_json::Value>(&reply.payload) else {
        return 1;
    };
    let peers: std::collections::BTreeSet<&str> = answer
        .pointer("/data/routes")
        .and_then(|r| r.as_array())
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("remote_id").and_then(|v| v.as_str()))
        .collect();
    peers.len() + 1
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
