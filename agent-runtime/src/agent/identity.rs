//! Which tenant a connection belongs to, as the NATS server says, not as the
//! bundle says.
//!
//! A credential bundle's `tenant` field is a label in a JSON file its holder can
//! edit. A tenant that relabels its own bundle as another tenant's would get the
//! other tenant's agent slots, scheduler windows and receive budget from a host
//! that believed the label (the server still confines its connection to its own
//! account, so it could not read or write the other tenant's data, only spend
//! its resources). So before an [`AgentHost`](super::AgentHost) gives a
//! namespace anything of a tenant, it asks the server which account the
//! connection was placed in, and compares it with the account the tenant
//! registry names for the label ([`TenantRecord::account`], set by the
//! controller):
//!
//! - the server answers `$SYS.REQ.USER.INFO` for any authenticated client with
//!   JSON `{"server": {...}, "data": {"user", "account", "account_name",
//!   "user_name", "permissions"}}` (checked against nats-server 2.15); agent
//!   users may publish there (`agentbus_control::accounts::USER_INFO_SUBJECT`);
//! - the reply must come back to the label's inbox (`tenant.<label>._INBOX.…`).
//!   A connection of another tenant may not subscribe there, so for a
//!   relabelled bundle the server refuses the subscription: that refusal is the
//!   server's answer too, reported as [`AgentErrorKind::WrongAccount`] at once;
//! - an account that differs from the record's: [`AgentErrorKind::WrongAccount`];
//! - no answer within [`IDENTITY_TIMEOUT`], the question itself refused (agents
//!   issued before the permission existed), or a reply without an account:
//!   [`AgentErrorKind::IdentityUnverified`]. The host refuses rather than guess.
//!
//! # Without accounts (plain mode)
//!
//! A tenant whose registry record names no account (records written without a
//! controller, e.g. on a development server without operator mode) cannot be
//! checked: every client of such a server shares one account (`$G`, as the
//! server reports), so no server-side fact tells tenants apart. There the label
//! is taken as given and nothing is asked; what still holds is the bus's own
//! isolation, the tenant key: a relabelled bundle holds the other tenant's label
//! but not its key, so it can neither read nor seal that tenant's messages. It
//! can still spend the labelled tenant's slots and windows on this host, which
//! is why tenants that do not trust each other need operator mode.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use tenant_bus::error::Error;
use tenant_bus::{BusEvent, TenantNamespace};
use tokio::sync::broadcast;

use super::{AgentError, AgentErrorKind};
use crate::registry::TenantRecord;

/// The server's "who am I" subject (nats-server's `userInfoReqSubj`).
pub use agentbus_control::accounts::USER_INFO_SUBJECT;

/// How long the host waits for the server to say which account a connection
/// is in. One round trip to the server normally; generous for a loaded server.
pub const IDENTITY_TIMEOUT: Duration = Duration::from_secs(5);

/// What the server says about a connection (the `data` of its
/// `$SYS.REQ.USER.INFO` reply).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ServerIdentity {
    /// The account's public key in operator mode (`A…`), or its name otherwise
    /// (`$G` when the server has no accounts).
    pub account: String,
    /// The user's public key in operator mode (`U…`); empty without users.
    #[serde(default)]
    pub user: String,
    /// The account's name (the account JWT's `name`, e.g. `tenant-acme`).
    #[serde(default)]
    pub account_name: String,
    /// The user's name (the user JWT's `name`, e.g. the agent id).
    #[serde(default)]
    pub user_name: String,
}

#[derive(serde::Deserialize)]
struct Reply {
    data: Option<ServerIdentity>,
    error: Option<ReplyError>,
}

#[derive(serde::Deserialize)]
struct ReplyError {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    description: String,
}

fn unverified(tenant: &tenant_bus::TenantId, why: impl std::fmt::Display) -> AgentError {
    Error::new(
        AgentErrorKind::IdentityUnverified,
        format!("tenant {tenant}: {why}"),
    )
}

/// Asks the server which user and account `ns`'s connection is (at most
/// `timeout`). The reply is read on the namespace's own tenant inbox, so a
/// connection that may not use its label's subjects gets
/// [`AgentErrorKind::WrongAccount`] instead of a reply (see the module docs).
pub async fn server_identity(
    ns: &TenantNamespace,
    timeout: Duration,
) -> Result<ServerIdentity, AgentError> {
    let tenant = ns.tenant();
    let client = ns.nats();
    // Before anything is sent, so no refusal of the server is missed.
    let mut events = ns.events();
    // `tenant.<label>._INBOX.<random>`: the namespace's inbox prefix.
    let inbox = client.new_inbox();
    let mut replies = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| Error::with_source(AgentErrorKind::Bus, "identity inbox", e))?;
    client
        .publish_with_reply(USER_INFO_SUBJECT, inbox.clone(), Bytes::new())
        .await
        .map_err(|e| Error::with_source(AgentErrorKind::Bus, "identity request", e))?;
    client
        .flush()
        .await
        .map_err(|e| Error::with_source(AgentErrorKind::Bus, "identity request", e))?;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut watching = true;
    loop {
        tokio::select! {
            reply = replies.next() => {
                let Some(reply) = reply else {
                    return Err(unverified(tenant, "the connection closed before the server answered"));
                };
                return parse(tenant, &reply.payload);
            }
            event = events.recv(), if watching => match event {
                Ok(BusEvent::PermissionViolation { detail }) if detail.contains(inbox.as_str()) => {
                    return Err(Error::new(
                        AgentErrorKind::WrongAccount,
                        format!(
                            "the server does not let this connection use tenant {tenant}'s \
                             subjects ({detail}): its credentials belong to another tenant, \
                             the bundle's tenant label is not its own"
                        ),
                    ));
                }
                Ok(BusEvent::PermissionViolation { detail }) if detail.contains(USER_INFO_SUBJECT) => {
                    return Err(unverified(
                        tenant,
                        format!(
                            "the credentials may not ask the server who they are ({detail}); \
                             issue the agent again (`agentbus agent create`): credentials \
                             issued before this check existed lack that permission"
                        ),
                    ));
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                // No more events: only the reply or the deadline can end the wait.
                Err(broadcast::error::RecvError::Closed) => watching = false,
            },
            _ = &mut deadline => {
                return Err(unverified(
                    tenant,
                    format!("the server did not say which account the connection is in within {timeout:?}"),
                ));
            }
        }
    }
}

fn parse(tenant: &tenant_bus::TenantId, payload: &[u8]) -> Result<ServerIdentity, AgentError> {
    let reply: Reply = serde_json::from_slice(payload).map_err(|e| {
        Error::with_source(
            AgentErrorKind::IdentityUnverified,
            format!("tenant {tenant}: the server's user info is not valid JSON"),
            e,
        )
    })?;
    if let Some(e) = reply.error {
        return Err(unverified(
            tenant,
            format!(
                "the server refused user info: {} ({})",
                e.description, e.code
            ),
        ));
    }
    match reply.data {
        Some(data) if !data.account.is_empty() => Ok(data),
        _ => Err(unverified(
            tenant,
            "the server's user info names no account",
        )),
    }
}

/// Checks that `ns`'s connection is in the account `record` (the registry's
/// record of `ns`'s tenant label) names: Ok if it is, or if the record names no
/// account (plain mode, see the module docs); otherwise refused with
/// [`AgentErrorKind::WrongAccount`] or [`AgentErrorKind::IdentityUnverified`].
pub async fn verify_account(ns: &TenantNamespace, record: &TenantRecord) -> Result<(), AgentError> {
    if record.account.is_empty() {
        return Ok(());
    }
    let identity = server_identity(ns, IDENTITY_TIMEOUT).await?;
    if identity.account != record.account {
        return Err(Error::new(
            AgentErrorKind::WrongAccount,
            format!(
                "the bundle says tenant {}, whose account is {}, but the server placed the \
                 connection in account {} ({}): the bundle's tenant label is not its own",
                record.id, record.account, identity.account, identity.account_name
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn tenant() -> tenant_bus::TenantId {
        tenant_bus::TenantId::new("acme").unwrap()
    }

    /// The shape nats-server 2.15 answers with (trimmed from a real reply).
    #[test]
    fn parses_the_servers_user_info() {
        let reply = br#"{"server":{"name":"agentbus","id":"NCVP","ver":"2.15.1"},
            "data":{"user":"UCTD","account":"ACCZ","account_name":"tenant-acme",
            "user_name":"planner","permissions":{"publish":{"allow":["tenant.acme.>"]}}}}"#;
        let id = parse(&tenant(), reply).unwrap();
        assert_eq!(
            id,
            ServerIdentity {
                user: "UCTD".into(),
                account: "ACCZ".into(),
                account_name: "tenant-acme".into(),
                user_name: "planner".into(),
            }
        );
        let plain = br#"{"server":{},"data":{"user":"","account":"$G","account_name":"$G"}}"#;
        assert_eq!(parse(&tenant(), plain).unwrap().account, "$G");
    }

    #[test]
    fn replies_without_an_account_are_unverified() {
        for reply in [
            &br#"{"server":{},"error":{"code":500,"description":"no account"}}"#[..],
            br#"{"server":{},"data":{"user":"U","account":""}}"#,
            br#"{"server":{}}"#,
            b"not json",
        ] {
            let e = parse(&tenant(), reply).unwrap_err();
            assert_eq!(e.kind(), AgentErrorKind::IdentityUnverified, "{e}");
        }
    }
}
