//! Scopes of API keys: permissions narrower than a tenant's agent.
//!
//! | scope            | grants                                                      |
//! |------------------|-------------------------------------------------------------|
//! | `pub:<pattern>`  | publish on `tenant.<id>.<pattern>`                          |
//! | `sub:<pattern>`  | subscribe to `tenant.<id>.<pattern>`                        |
//! | `js`             | the JetStream allow-list of an agent (task dispatch, state) |
//!
//! Patterns are relative subjects as the bus validates them (`*` for one token,
//! a final `>` for the rest). A scoped key always keeps what request and reply
//! need inside its own tenant (its inboxes `tenant.<id>._INBOX.>`, both ways),
//! the key service and `$SYS.REQ.USER.INFO` (the runtime's account check). No scopes at all: an agent's full allow-list. Every
//! subject a scope can produce lies inside `tenant.<id>.`: the tenant is part
//! of the subject, never of the scope.

use tenant_bus::{SubjectPattern, TenantId};

use crate::accounts::{self, JetStreamScope};
use crate::jwt::Permission;

/// At most this many scopes per key.
pub const MAX_SCOPES: usize = 32;

/// A parsed scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Publish on a relative pattern.
    Publish(SubjectPattern),
    /// Subscribe to a relative pattern.
    Subscribe(SubjectPattern),
    /// The JetStream allow-list.
    JetStream,
}

/// Parses one scope (see the module docs).
pub fn parse(text: &str) -> Result<Scope, String> {
    let pattern = |p: &str| SubjectPattern::new(p).map_err(|e| format!("scope {text:?}: {e}"));
    match text.split_once(':') {
        Some(("pub", p)) => Ok(Scope::Publish(pattern(p)?)),
        Some(("sub", p)) => Ok(Scope::Subscribe(pattern(p)?)),
        None if text == "js" => Ok(Scope::JetStream),
        _ => Err(format!(
            "scope {text:?}: expected pub:<pattern>, sub:<pattern> or js"
        )),
    }
}

/// Validates a list of scopes (at most [`MAX_SCOPES`]).
pub fn validate(scopes: &[String]) -> Result<Vec<Scope>, String> {
    if scopes.len() > MAX_SCOPES {
        return Err(format!("at most {MAX_SCOPES} scopes"));
    }
    scopes.iter().map(|s| parse(s)).collect()
}

/// The publish and subscribe permissions of a login of `tenant` (account
/// `account`) with `scopes` (already validated by [`validate`]).
pub fn permissions(tenant: &TenantId, account: &str, scopes: &[Scope]) -> (Permission, Permission) {
    if scopes.is_empty() {
        return (
            Permission {
                allow: accounts::agent_publish_allow(tenant, account, &JetStreamScope::default()),
                deny: vec![],
            },
            Permission {
                allow: accounts::agent_subscribe_allow(tenant),
                deny: vec![],
            },
        );
    }
    let inbox = format!("{}.>", tenant_bus::subject::inbox_prefix(tenant));
    // The key service, and the server's own answer to "which account am I in"
    // (the runtime checks it before it runs an agent).
    let mut publish = vec![
        inbox.clone(),
        crate::api::keys_subject(account),
        accounts::USER_INFO_SUBJECT.to_string(),
    ];
    let mut subscribe = vec![inbox];
    for scope in scopes {
        match scope {
            Scope::Publish(p) => publish.push(tenant_bus::subject::scope(tenant, p.as_str())),
            Scope::Subscribe(p) => subscribe.push(tenant_bus::subject::scope(tenant, p.as_str())),
            Scope::JetStream => {
                // The JetStream part of an agent's list: everything not under
                // the tenant's own subjects.
                let prefix = tenant_bus::subject::namespace_prefix(tenant);
                publish.extend(
                    accounts::agent_publish_allow(tenant, account, &JetStreamScope::default())
                        .into_iter()
                        .filter(|s| !s.starts_with(&prefix)),
                );
            }
        }
    }
    publish.sort();
    publish.dedup();
    subscribe.sort();
    subscribe.dedup();
    (
        Permission {
            allow: publish,
            deny: vec![],
        },
        Permission {
            allow: subscribe,
            deny: vec![],
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_and_stay_inside_the_tenant() {
        let t = TenantId::new("acme").unwrap();
        let s = validate(&["pub:jobs.>".into(), "sub:results.*".into()]).unwrap();
        let (p, sub) = permissions(&t, "AACC", &s);
        assert!(p.allow.contains(&"tenant.acme.jobs.>".to_string()));
        assert!(sub.allow.contains(&"tenant.acme.results.*".to_string()));
        assert!(sub.allow.contains(&"tenant.acme._INBOX.>".to_string()));
        assert!(!p.allow.iter().any(|s| s == "tenant.acme.>"));
        assert!(!p.allow.iter().any(|s| s.starts_with("$JS")));
        for s in p.allow.iter().chain(sub.allow.iter()) {
            assert!(
                s.starts_with("tenant.acme.")
                    || s.starts_with("agentbus.keys.v1.")
                    || s == accounts::USER_INFO_SUBJECT,
                "{s}"
            );
        }
        let (p, _) = permissions(&t, "AACC", &validate(&["js".into()]).unwrap());
        assert!(p.allow.iter().any(|s| s.starts_with("$JS.API")));
        assert!(!p.allow.iter().any(|s| s == "tenant.acme.>"));
    }

    #[test]
    fn bad_scopes_are_refused() {
        for bad in [
            "pub:",
            "pub:a..b",
            "sub:>.x",
            "pub:tenant.globex.>x",
            "publish:x",
            "js:x",
            "x",
            "pub:a b",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let many: Vec<String> = (0..=MAX_SCOPES).map(|i| format!("pub:a{i}")).collect();
        assert!(validate(&many).is_err());
    }

    #[test]
    fn no_scope_is_an_agent() {
        let t = TenantId::new("acme").unwrap();
        let (p, s) = permissions(&t, "AACC", &[]);
        assert!(p.allow.contains(&"tenant.acme.>".to_string()));
        assert_eq!(s.allow, vec!["tenant.acme.>".to_string()]);
    }
}
