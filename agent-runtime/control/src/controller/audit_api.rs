//! The controller's side of the audit log: the one hook that records each
//! request's decision, and the `agentbus.admin.v1.audit.<log>.<verb>` subjects.
//!
//! Recorded: every mutation (tenant create, update, suspend, activate, delete,
//! rotate-key; agent create, revoke; admin create, revoke), whatever its outcome,
//! and every refused request (authentication or authorization), reads included.
//! Allowed reads are not recorded.

use serde_json::Value;

use super::auth::Caller;
use super::Controller;
use crate::api::{self, ApiError, ErrorCode};
use crate::audit::event::{new_event_id, Actor, AuditEvent, Outcome, PLATFORM_LOG};
use crate::audit::{self, ListRequest, ProofRequest, VerifyDataRequest};

/// The longest claimed name, action or request id copied into an event.
const MAX_FIELD: usize = 64;

fn clip(s: &str) -> String {
    s.chars().take(MAX_FIELD).collect()
}

fn log_of(token: &str) -> String {
    if tenant_bus::TenantId::new(token).is_ok() {
        token.to_string()
    } else {
        PLATFORM_LOG.to_string()
    }
}

fn body_str(body: &[u8], field: &str) -> Option<String> {
    serde_json::from_slice::<Value>(body)
        .ok()?
        .get(field)?
        .as_str()
        .map(clip)
}

/// What a request was: action, log, resource, and whether it changes state.
struct Classified {
    action: String,
    log: String,
    resource: String,
    mutation: bool,
}

fn classify(subject: &str, body: &[u8], result: &Result<Value, ApiError>) -> Classified {
    let rest = subject
        .strip_prefix(api::ADMIN_PREFIX)
        .and_then(|r| r.strip_prefix('.'))
        .unwrap_or(subject);
    let tokens: Vec<&str> = rest.split('.').collect();
    let c = |action: String, log: String, resource: String, mutation: bool| Classified {
        action: clip(&action),
        log,
        resource: clip(&resource),
        mutation,
    };
    match tokens.as_slice() {
        ["tenant", id, verb] => c(
            format!("tenant.{verb}"),
            log_of(id),
            format!("tenant/{id}"),
            matches!(
                *verb,
                "create" | "update" | "suspend" | "activate" | "delete" | "rotate-key"
            ),
        ),
        ["agent", t, verb] => c(
            format!("agent.{verb}"),
            log_of(t),
            format!(
                "agent/{t}/{}",
                body_str(body, "agent").unwrap_or_else(|| "*".into())
            ),
            matches!(*verb, "create" | "revoke"),
        ),
        ["budget", t, verb] => c(
            format!("budget.{verb}"),
            log_of(t),
            format!(
                "budget/{t}/{}",
                body_str(body, "name").unwrap_or_else(|| "*".into())
            ),
            matches!(*verb, "set" | "delete"),
        ),
        ["apikey", t, verb] => {
            // The key id: named in the request (revoke, rotate) or the answer
            // (create); never the key itself.
            let id = body_str(body, "id")
                .or_else(|| {
                    result
                        .as_ref()
                        .ok()
                        .and_then(|v| v.get("id"))
                        .and_then(Value::as_str)
                        .map(clip)
                })
                .unwrap_or_else(|| "*".into());
            c(
                format!("key.{verb}"),
                log_of(t),
                format!("key/{t}/{id}"),
                matches!(*verb, "create" | "revoke" | "rotate"),
            )
        }
        ["admins", verb] => {
            // An admin of one tenant is recorded in that tenant's log.
            let tenant = result
                .as_ref()
                .ok()
                .and_then(|v| {
                    v.get("admin")
                        .unwrap_or(v)
                        .get("tenant")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .or_else(|| body_str(body, "tenant"));
            c(
                format!("admin.{verb}"),
                tenant.as_deref().map(log_of).unwrap_or(PLATFORM_LOG.into()),
                format!(
                    "admin/{}",
                    body_str(body, "name").unwrap_or_else(|| "*".into())
                ),
                matches!(*verb, "create" | "revoke"),
            )
        }
        ["audit", log, verb] => c(
            format!("audit.{verb}"),
            log_of(log),
            format!("audit/{log}"),
            false,
        ),
        ["tenants", verb] => c(
            format!("tenant.{verb}"),
            PLATFORM_LOG.into(),
            "platform".into(),
            false,
        ),
        ["status"] => c(
            "status".into(),
            PLATFORM_LOG.into(),
            "platform".into(),
            false,
        ),
        _ => c(
            "unknown".into(),
            PLATFORM_LOG.into(),
            subject.to_string(),
            false,
        ),
    }
}

impl Controller {
    /// Records the decision on one admin request: every mutation and every
    /// refusal, one event each. Never fails the request (see
    /// [`crate::audit::AuditLog::record`]).
    pub(super) async fn audit_request(
        &self,
        message: &async_nats::Message,
        caller: Option<&Caller>,
        result: &Result<Value, ApiError>,
    ) {
        let what = classify(message.subject.as_str(), &message.payload, result);
        let (outcome, reason) = match result {
            Ok(_) => (Outcome::Allowed, String::new()),
            Err(e) if matches!(e.code, ErrorCode::Forbidden | ErrorCode::Refused) => {
                (Outcome::Denied, crate::one_line(&e.message))
            }
            Err(e) => (Outcome::Failed, crate::one_line(&e.message)),
        };
        if outcome == Outcome::Allowed && !what.mutation {
            return;
        }
        if outcome == Outcome::Failed && !what.mutation {
            return;
        }
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| clip(v.as_str()))
                .unwrap_or_default()
        };
        let actor = match caller {
            Some(c) => Actor {
                id: c.admin.name.clone(),
                key: c.admin.user.clone(),
                kind: "admin".into(),
                role: c.admin.role.to_string(),
            },
            None => {
                let claimed = header(api::HDR_ADMIN);
                Actor {
                    kind: if claimed.is_empty() {
                        "unknown"
                    } else {
                        "admin"
                    }
                    .into(),
                    id: claimed,
                    key: String::new(),
                    role: String::new(),
                }
            }
        };
        let event = AuditEvent {
            action: what.action,
            actor,
            controller: String::new(),
            id: new_event_id(),
            index: 0,
            outcome,
            prev: String::new(),
            reason,
            request_id: header(api::HDR_REQUEST_ID),
            resource: what.resource,
            tenant: what.log,
            time_ms: tenant_bus::envelope::now_ms(),
            version: audit::event::SCHEMA_VERSION,
        };
        self.audit.record(event).await;
    }

    /// `agentbus.runtime.v1.audit`: a batch of runtime security events
    /// (`audit::sink`). Only platform-account users reach this subject (tenant
    /// accounts do not import it; admin roles may publish only below
    /// `agentbus.admin.v1`). Each valid event is appended to its tenant's log
    /// with the agent as the actor; invalid ones are counted and skipped.
    pub(super) async fn runtime_append(&self, body: &[u8]) -> Result<Value, ApiError> {
        use crate::audit::sink::{BatchAnswer, RuntimeBatch, MAX_FIELD, RUNTIME_ACTIONS};
        let batch: RuntimeBatch = serde_json::from_slice(body)
            .map_err(|e| ApiError::new(ErrorCode::InvalidInput, format!("invalid batch: {e}")))?;
        let mut answer = BatchAnswer {
            appended: 0,
            rejected: 0,
        };
        let mut events = Vec::with_capacity(batch.events.len());
        for e in batch.events {
            let valid = tenant_bus::TenantId::new(&e.tenant).is_ok()
                && tenant_bus::AgentId::new(&e.agent).is_ok()
                && RUNTIME_ACTIONS.contains(&e.action.as_str())
                && [&e.resource, &e.reason, &e.request_id]
                    .iter()
                    .all(|f| f.len() <= MAX_FIELD);
            if !valid {
                answer.rejected += 1;
                continue;
            }
            events.push(AuditEvent {
                action: e.action,
                actor: Actor {
                    id: e.agent,
                    key: String::new(),
                    kind: "agent".into(),
                    role: String::new(),
                },
                controller: String::new(),
                id: new_event_id(),
                index: 0,
                outcome: e.outcome,
                prev: String::new(),
                reason: e.reason,
                request_id: e.request_id,
                resource: e.resource,
                tenant: e.tenant,
                time_ms: tenant_bus::envelope::now_ms(),
                version: audit::event::SCHEMA_VERSION,
            });
        }
        // All at once: they share the group commit's batches, each log's in
        // the batch's order.
        for appended in self.audit.record_many(events).await {
            match appended {
                Some(_) => answer.appended += 1,
                // The log is unreachable: the runtime retries the batch (events
                // already appended from it are appended again: at least once).
                None => {
                    return Err(ApiError::new(
                        ErrorCode::Unavailable,
                        "the audit log did not take the event",
                    ))
                }
            }
        }
        serde_json::to_value(answer).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))
    }

    /// `agentbus.admin.v1.audit.<log>.{list,proof,verify-data}`. The role check
    /// (a tenant's admins and viewers: their tenant's log only) is done by the
    /// server and again by [`super::auth::authenticate`].
    pub(super) async fn audit_api(
        &self,
        log: &str,
        verb: &str,
        body: &[u8],
    ) -> Result<Value, ApiError> {
        audit::check_log(log)?;
        let parse = |body: &[u8]| -> Result<Value, ApiError> {
            if body.is_empty() {
                Ok(Value::Object(Default::default()))
            } else {
                serde_json::from_slice(body).map_err(|e| {
                    ApiError::new(ErrorCode::InvalidInput, format!("request body: {e}"))
                })
            }
        };
        let json = |v: serde_json::Result<Value>| {
            v.map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))
        };
        let bad = |e: serde_json::Error| {
            ApiError::new(ErrorCode::InvalidInput, format!("request body: {e}"))
        };
        match verb {
            "list" => {
                let req: ListRequest = serde_json::from_value(parse(body)?).map_err(bad)?;
                json(serde_json::to_value(self.audit.list(log, &req).await?))
            }
            "verify-data" => {
                let req: VerifyDataRequest = serde_json::from_value(parse(body)?).map_err(bad)?;
                json(serde_json::to_value(
                    self.audit.verify_data(log, &req).await?,
                ))
            }
            "proof" => {
                let req: ProofRequest = serde_json::from_value(parse(body)?).map_err(bad)?;
                json(serde_json::to_value(
                    self.audit.proof(log, &req.event_id).await?,
                ))
            }
            other => Err(ApiError::new(
                ErrorCode::InvalidInput,
                format!("unknown audit verb {other:?} (list, proof, verify-data)"),
            )),
        }
    }
}
