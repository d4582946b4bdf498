//! The audit event, schema version 1, and its canonical bytes.
//!
//! The canonical bytes of an event are its JSON text with the members of every
//! object in lexicographic order, no insignificant whitespace, integers only
//! (all below 2^53) and strings escaped minimally (`"`, `\` and control
//! characters; `\b \f \n \r \t` short forms, other controls as lowercase
//! `\u00xx`; everything else as UTF-8). That is exactly RFC 8785 (JCS) for these
//! values, so any language can recompute it. Every field is always present
//! (absent values are empty strings), so the shape never varies. A stored entry
//! whose bytes are not the canonical form of the event they parse to is
//! rejected by verification (see `docs/audit.md`).

use serde::{Deserialize, Serialize};

/// The schema version this code writes and reads.
pub const SCHEMA_VERSION: u32 = 1;
/// The log token of platform-wide events (never a valid tenant id).
pub const PLATFORM_LOG: &str = "_platform";

/// What came of the action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Authenticated, authorized and done.
    Allowed,
    /// Refused: authentication, authorization or policy (the request changed nothing).
    Denied,
    /// Authorized but failed (invalid input, not found, conflict, outage).
    Failed,
}

tenant_bus::kind_display!(Outcome {
    Allowed => "allowed",
    Denied => "denied",
    Failed => "failed",
});

impl std::str::FromStr for Outcome {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "allowed" => Ok(Self::Allowed),
            "denied" => Ok(Self::Denied),
            "failed" => Ok(Self::Failed),
            other => Err(format!(
                "unknown outcome {other:?} (allowed, denied or failed)"
            )),
        }
    }
}

/// Who acted. Members in lexicographic order (canonical form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The admin's or agent's name as claimed (for a refused, unauthenticated
    /// request: whatever the request named, possibly empty).
    pub id: String,
    /// The public nkey that signed the request, when it was authenticated.
    pub key: String,
    /// `admin`, `agent`, `controller` or `unknown`.
    pub kind: String,
    /// The admin's role when authenticated (`platform-admin`, `tenant-admin`,
    /// `viewer`), else empty.
    pub role: String,
}

impl Actor {
    /// The controller itself (reconcile, repairs).
    pub fn controller(instance: &str) -> Self {
        Self {
            id: instance.to_string(),
            key: String::new(),
            kind: "controller".to_string(),
            role: String::new(),
        }
    }
}

/// One audit event. Members in lexicographic order: the serde order is the
/// canonical order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// What was attempted, `<object>.<verb>` (`tenant.create`, `agent.revoke`,
    /// `admin.create`, `audit.list`, ...).
    pub action: String,
    /// Who attempted it.
    pub actor: Actor,
    /// The controller instance that recorded it.
    pub controller: String,
    /// A random 128-bit id, 32 lowercase hex digits.
    pub id: String,
    /// The leaf index in its log (0-based, contiguous).
    pub index: u64,
    /// What came of it.
    pub outcome: Outcome,
    /// The leaf hash (hex) of the previous entry of the same log; empty for index 0.
    pub prev: String,
    /// Why (the error message for denied and failed; empty when allowed).
    pub reason: String,
    /// The request id (`Agentbus-Request-Id`), or empty.
    pub request_id: String,
    /// What it acted on: `tenant/<id>`, `agent/<tenant>/<agent>`, `admin/<name>`,
    /// `audit/<log>`, `platform`.
    pub resource: String,
    /// The log it belongs to: a tenant id, or [`PLATFORM_LOG`].
    pub tenant: String,
    /// When it was recorded, Unix milliseconds.
    pub time_ms: u64,
    /// [`SCHEMA_VERSION`].
    pub version: u32,
}

/// Why stored bytes are not a valid event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Not JSON of the v1 shape.
    Malformed(String),
    /// Another schema version.
    Version(u32),
    /// Valid JSON, but not in canonical form (rewritten by something else).
    NotCanonical,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Malformed(e) => write!(f, "not a v1 audit event: {e}"),
            Self::Version(v) => write!(f, "unknown audit schema version {v}"),
            Self::NotCanonical => f.write_str("not in canonical form"),
        }
    }
}

impl std::error::Error for DecodeError {}

impl AuditEvent {
    /// The canonical bytes (what is stored and hashed).
    pub fn canonical(&self) -> Vec<u8> {
        // Serializing a struct of strings and integers cannot fail; an empty
        // vector would fail verification loudly rather than pass silently.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses stored bytes, requiring the canonical form.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let version = serde_json::from_slice::<serde_json::Value>(bytes)
            .map_err(|e| DecodeError::Malformed(e.to_string()))?
            .get("version")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        if version != u64::from(SCHEMA_VERSION) {
            return Err(DecodeError::Version(version as u32));
        }
        let event: Self =
            serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if event.canonical() != bytes {
            return Err(DecodeError::NotCanonical);
        }
        Ok(event)
    }
}

/// A fresh random event id (128 bits, hex).
pub fn new_event_id() -> String {
    format!(
        "{:016x}{:016x}",
        crate::controller::rand_u64(),
        crate::controller::rand_u64()
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sample() -> AuditEvent {
        AuditEvent {
            action: "tenant.create".into(),
            actor: Actor {
                id: "admin".into(),
                key: "UABC".into(),
                kind: "admin".into(),
                role: "platform-admin".into(),
            },
            controller: "c1".into(),
            id: new_event_id(),
            index: 7,
            outcome: Outcome::Allowed,
            prev: "00".repeat(32),
            reason: "quote \" back \\ nl \n tab \t bell \u{7} é".into(),
            request_id: "r1".into(),
            resource: "tenant/acme".into(),
            tenant: "acme".into(),
            time_ms: 1_700_000_000_000,
            version: SCHEMA_VERSION,
        }
    }

    #[test]
    fn canonical_bytes_are_sorted_compact_json_and_round_trip() {
        let e = sample();
        let bytes = e.canonical();
        // serde_json::Value keeps object members sorted: re-encoding through it
        // gives the JCS member order; equal bytes mean the struct order is sorted.
        let via_value = serde_json::to_vec(&serde_json::to_value(&e).unwrap()).unwrap();
        assert_eq!(bytes, via_value);
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with("{\"action\":\"tenant.create\",\"actor\":{\"id\":"));
        assert!(text.contains("\\u0007"), "{text}");
        assert!(text.contains("é"), "{text}");
        assert_eq!(AuditEvent::decode(&bytes).unwrap(), e);
    }

    #[test]
    fn non_canonical_and_foreign_versions_are_refused() {
        let e = sample();
        let pretty = serde_json::to_vec_pretty(&e).unwrap();
        assert_eq!(AuditEvent::decode(&pretty), Err(DecodeError::NotCanonical));
        let mut v2 = e.clone();
        v2.version = 2;
        assert_eq!(
            AuditEvent::decode(&serde_json::to_vec(&v2).unwrap()),
            Err(DecodeError::Version(2))
        );
        assert!(matches!(
            AuditEvent::decode(b"{\"version\":1}"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            AuditEvent::decode(b"\xff"),
            Err(DecodeError::Malformed(_))
        ));
    }
}
