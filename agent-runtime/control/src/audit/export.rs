//! Exporting audit events to files and SIEMs: JSON lines (the canonical
//! bytes), CSV (RFC 4180), OCSF 1.x JSON lines, Elastic Common Schema (ECS)
//! JSON lines and CEF in RFC 5424 syslog framing. JSON lines and CSV parse back to the same events
//! ([`parse_jsonl`], [`parse_csv`]). See `docs/audit.md` (Export).

use serde_json::{json, Value};

use super::event::{Actor, AuditEvent, Outcome};

/// An export format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One event per line, its canonical JSON (what is hashed).
    Jsonl,
    /// RFC 4180 CSV with a header line ([`CSV_HEADER`]).
    Csv,
    /// One OCSF event per line (JSON): Authentication (3002), Account Change
    /// (3001) or API Activity (6003).
    Ocsf,
    /// One CEF line per event in RFC 5424 syslog framing.
    Cef,
    /// One Elastic Common Schema (ECS 8.x) document per line (JSON).
    Ecs,
}

/// An unknown format name, or an export line that does not parse back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportError(pub String);

impl std::fmt::Display for ExportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ExportError {}

impl std::str::FromStr for Format {
    type Err = ExportError;
    fn from_str(s: &str) -> Result<Self, ExportError> {
        match s {
            "jsonl" => Ok(Self::Jsonl),
            "csv" => Ok(Self::Csv),
            "ocsf" => Ok(Self::Ocsf),
            "cef" => Ok(Self::Cef),
            "ecs" => Ok(Self::Ecs),
            other => Err(ExportError(format!(
                "unknown format {other:?} (jsonl, csv, ocsf, ecs or cef)"
            ))),
        }
    }
}

/// `events` in `format`, one record per line (CSV: with its header line),
/// each line ending in `\n`.
pub fn export(events: &[AuditEvent], format: Format) -> String {
    match format {
        Format::Jsonl => jsonl(events),
        Format::Csv => to_csv(events),
        Format::Ocsf => events.iter().map(|e| format!("{}\n", ocsf(e))).collect(),
        Format::Cef => events.iter().map(|e| format!("{}\n", cef(e))).collect(),
        Format::Ecs => events.iter().map(|e| format!("{}\n", ecs(e))).collect(),
    }
}

// ----- Elastic Common Schema ------------------------------------------------------

/// The ECS version the documents follow.
pub const ECS_VERSION: &str = "8.11.0";

/// `e` as an ECS document: `@timestamp`, `ecs.version`, `event` (`kind`
/// `event`, `category` and `type` from the allowed ECS values, `action`,
/// `outcome` `success`/`failure`, `reason`, `id`, `sequence`, `dataset`
/// `agentbus.audit`), `user` (the actor), `organization.id` (the tenant),
/// `service` (the recording controller), `labels` (resource, request id,
/// actor kind) and `message`. The category follows the OCSF class
/// ([`ocsf_class`]): Authentication -> `authentication`, Account Change ->
/// `iam`, API Activity -> `configuration` (`runtime.*` -> `process`).
pub fn ecs(e: &AuditEvent) -> Value {
    let class = ocsf_class(e);
    let category = if e.action.starts_with("runtime.") {
        "process"
    } else {
        match class.class_uid {
            3002 => "authentication",
            3001 => "iam",
            _ => "configuration",
        }
    };
    let mut types: Vec<&str> = vec![match e.outcome {
        Outcome::Allowed => "allowed",
        Outcome::Denied => "denied",
        Outcome::Failed => "error",
    }];
    match (category, class.activity_id) {
        ("iam", 1) | ("configuration", 1) => types.push("creation"),
        ("iam", _) | ("configuration", 3) => types.push("change"),
        ("configuration", 4) => types.push("deletion"),
        ("configuration", 2) => types.push("access"),
        ("authentication", _) => types.push("start"),
        _ => types.push("info"),
    }
    let mut roles = Vec::new();
    if !e.actor.role.is_empty() {
        roles.push(e.actor.role.clone());
    }
    json!({
        "@timestamp": iso_time(e.time_ms),
        "ecs": { "version": ECS_VERSION },
        "event": {
            "kind": "event",
            "category": [category],
            "type": types,
            "action": e.action,
            "outcome": if e.outcome == Outcome::Allowed { "success" } else { "failure" },
            "reason": e.reason,
            "id": e.id,
            "sequence": e.index,
            "dataset": "agentbus.audit",
            "module": "agentbus",
            "provider": "agentbus-controller",
        },
        "user": {
            "name": e.actor.id,
            "id": if e.actor.key.is_empty() { e.actor.id.clone() } else { e.actor.key.clone() },
            "roles": roles,
        },
        "organization": { "id": e.tenant },
        "service": { "name": "agentbus-controller", "type": "nats", "node": { "name": e.controller } },
        "labels": {
            "resource": e.resource,
            "request_id": e.request_id,
            "actor_kind": e.actor.kind,
            "audit_log": e.tenant,
        },
        "message": format!("{} {} {}", e.action, e.resource, e.outcome),
    })
}

// ----- JSON lines ---------------------------------------------------------------

/// Each event's canonical JSON on its own line.
pub fn jsonl(events: &[AuditEvent]) -> String {
    let mut out = String::new();
    for e in events {
        out.push_str(&String::from_utf8_lossy(&e.canonical()));
        out.push('\n');
    }
    out
}

/// Events from [`jsonl`] output (blank lines ignored).
pub fn parse_jsonl(text: &str) -> Result<Vec<AuditEvent>, ExportError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            AuditEvent::decode(l.as_bytes())
                .map_err(|e| ExportError(format!("line {}: {e}", n + 1)))
        })
        .collect()
}

// ----- CSV ----------------------------------------------------------------------

/// The CSV columns (`audit list -o csv` and `audit export --format csv`):
/// `time` is ISO 8601 UTC, `time_ms` the same in Unix milliseconds.
pub const CSV_HEADER: &str = "time,id,index,tenant,actor_kind,actor,actor_key,actor_role,action,resource,outcome,reason,request_id,controller,time_ms,prev,version";

/// Unix ms as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC).
pub fn iso_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// One CSV field, quoted when it holds a comma, quote or line break.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Events as CSV (RFC 4180: a header line, fields quoted when needed, CRLF
/// inside quoted fields kept as is).
pub fn to_csv(events: &[AuditEvent]) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for e in events {
        let fields = [
            iso_time(e.time_ms),
            e.id.clone(),
            e.index.to_string(),
            e.tenant.clone(),
            e.actor.kind.clone(),
            e.actor.id.clone(),
            e.actor.key.clone(),
            e.actor.role.clone(),
            e.action.clone(),
            e.resource.clone(),
            e.outcome.to_string(),
            e.reason.clone(),
            e.request_id.clone(),
            e.controller.clone(),
            e.time_ms.to_string(),
            e.prev.clone(),
            e.version.to_string(),
        ];
        let row: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out
}

/// RFC 4180 records: fields split on commas, quoted fields with `""` for a
/// quote and line breaks inside.
fn csv_records(text: &str) -> Result<Vec<Vec<String>>, ExportError> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        any = true;
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() => quoted = true,
            ',' => record.push(std::mem::take(&mut field)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
                any = false;
            }
            _ => field.push(c),
        }
    }
    if quoted {
        return Err(ExportError("unterminated quoted field".into()));
    }
    if any {
        record.push(field);
        records.push(record);
    }
    Ok(records)
}

/// Events from [`to_csv`] output.
pub fn parse_csv(text: &str) -> Result<Vec<AuditEvent>, ExportError> {
    let mut records = csv_records(text)?.into_iter();
    let header = records
        .next()
        .ok_or_else(|| ExportError("no header line".into()))?;
    if header.join(",") != CSV_HEADER {
        return Err(ExportError(format!("header is not {CSV_HEADER:?}")));
    }
    records
        .enumerate()
        .map(|(n, r)| {
            let bad = |what: &str| ExportError(format!("record {}: {what}", n + 1));
            let [_, id, index, tenant, kind, actor, key, role, action, resource, outcome, reason, request_id, controller, time_ms, prev, version] =
                <[String; 17]>::try_from(r).map_err(|_| bad("not 17 fields"))?;
            Ok(AuditEvent {
                action,
                actor: Actor {
                    id: actor,
                    key,
                    kind,
                    role,
                },
                controller,
                id,
                index: index.parse().map_err(|_| bad("index"))?,
                outcome: outcome.parse().map_err(|e: String| bad(&e))?,
                prev,
                reason,
                request_id,
                resource,
                tenant,
                time_ms: time_ms.parse().map_err(|_| bad("time_ms"))?,
                version: version.parse().map_err(|_| bad("version"))?,
            })
        })
        .collect()
}

// ----- OCSF ---------------------------------------------------------------------

/// The OCSF schema version the events follow.
pub const OCSF_VERSION: &str = "1.3.0";

/// OCSF class, category and activity chosen for an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OcsfClass {
    /// `class_uid`: 3002 Authentication, 3001 Account Change, 6003 API Activity.
    pub class_uid: u32,
    /// `category_uid`: 3 Identity & Access Management, 6 Application Activity.
    pub category_uid: u32,
    /// `activity_id` within the class.
    pub activity_id: u32,
    /// The class's name.
    pub class_name: &'static str,
    /// The activity's name.
    pub activity_name: &'static str,
}

/// The class of `e`, chosen by its action (and, for a refusal before
/// authentication, by that):
/// - **Authentication (3002)**, activity Logon (1): actions `login.*` and
///   `auth.*`, and any request refused without an authenticated caller (the
///   event has no actor key): a failed logon to the control plane;
/// - **Account Change (3001)**: `admin.create` and `agent.create` (Create, 1),
///   `admin.revoke` and `agent.revoke` (Disable, 5: credentials revoked),
///   `tenant.rotate-key` (Password Change, 3: the tenant's signing keys);
/// - **API Activity (6003)**: everything else; `*.create` Create (1), reads
///   (`get`, `list`, `status`, `proof`, `verify-data`) Read (2), `update`,
///   `suspend`, `activate` Update (3), `delete` Delete (4), else Other (99).
pub fn ocsf_class(e: &AuditEvent) -> OcsfClass {
    let verb = e.action.rsplit('.').next().unwrap_or("");
    let class = |class_uid, category_uid, activity_id, class_name, activity_name| OcsfClass {
        class_uid,
        category_uid,
        activity_id,
        class_name,
        activity_name,
    };
    let unauthenticated = e.outcome == Outcome::Denied && e.actor.key.is_empty();
    if e.action.starts_with("login.") || e.action.starts_with("auth.") || unauthenticated {
        return class(3002, 3, 1, "Authentication", "Logon");
    }
    match e.action.as_str() {
        "admin.create" | "agent.create" => return class(3001, 3, 1, "Account Change", "Create"),
        "admin.revoke" | "agent.revoke" => return class(3001, 3, 5, "Account Change", "Disable"),
        "tenant.rotate-key" => return class(3001, 3, 3, "Account Change", "Password Change"),
        _ => {}
    }
    let (id, name) = match verb {
        "create" => (1, "Create"),
        "get" | "list" | "stats" | "status" | "proof" | "verify-data" => (2, "Read"),
        "update" | "suspend" | "activate" => (3, "Update"),
        "delete" => (4, "Delete"),
        _ => (99, "Other"),
    };
    class(6003, 6, id, "API Activity", name)
}

/// `e` as an OCSF event: the base event's required fields (`activity_id,
/// category_uid, class_uid, metadata, severity_id, time, type_uid`; `metadata`
/// with `product`, `version`, `tenant_uid`, `uid`, `correlation_uid`), the
/// status, the actor, and each class's own required fields (`user` for 3001 and
/// 3002; `actor`, `api`, `src_endpoint` for 6003). The source address of the
/// request is not recorded: `src_endpoint` names the NATS service.
pub fn ocsf(e: &AuditEvent) -> Value {
    let c = ocsf_class(e);
    let (severity_id, severity) = match e.outcome {
        Outcome::Allowed => (1, "Informational"),
        Outcome::Failed => (2, "Low"),
        Outcome::Denied => (3, "Medium"),
    };
    let (status_id, status) = match e.outcome {
        Outcome::Allowed => (1, "Success"),
        _ => (2, "Failure"),
    };
    let user = json!({
        "name": e.actor.id,
        "uid": if e.actor.key.is_empty() { e.actor.id.clone() } else { e.actor.key.clone() },
        "type": e.actor.kind,
    });
    let mut v = json!({
        "activity_id": c.activity_id,
        "activity_name": c.activity_name,
        "category_uid": c.category_uid,
        "category_name": if c.category_uid == 3 { "Identity & Access Management" } else { "Application Activity" },
        "class_uid": c.class_uid,
        "class_name": c.class_name,
        "type_uid": u64::from(c.class_uid) * 100 + u64::from(c.activity_id),
        "type_name": format!("{}: {}", c.class_name, c.activity_name),
        "severity_id": severity_id,
        "severity": severity,
        "status_id": status_id,
        "status": status,
        "status_detail": e.reason,
        "time": e.time_ms,
        "message": format!("{} {} {}", e.action, e.resource, e.outcome),
        "metadata": {
            "version": OCSF_VERSION,
            "product": { "name": "agentbus", "vendor_name": "agentbus", "version": env!("CARGO_PKG_VERSION") },
            "tenant_uid": e.tenant,
            "uid": e.id,
            "correlation_uid": e.request_id,
            "log_name": format!("audit/{}", e.tenant),
            "sequence": e.index,
            "logged_time": e.time_ms,
        },
        "actor": { "user": user.clone(), "app_name": e.controller },
        "unmapped": { "agentbus_action": e.action, "agentbus_resource": e.resource, "agentbus_outcome": e.outcome.to_string() },
    });
    if let Value::Object(m) = &mut v {
        match c.class_uid {
            6003 => {
                m.insert(
                    "api".into(),
                    json!({
                        "operation": e.action,
                        "service": { "name": "agentbus.admin.v1" },
                        "request": { "uid": e.request_id },
                    }),
                );
                m.insert(
                    "resources".into(),
                    json!([{ "uid": e.resource, "type": "agentbus" }]),
                );
                m.insert("src_endpoint".into(), json!({ "svc_name": "nats" }));
            }
            3002 => {
                m.insert("user".into(), user);
                m.insert("service".into(), json!({ "name": "agentbus.admin.v1" }));
                m.insert("src_endpoint".into(), json!({ "svc_name": "nats" }));
            }
            _ => {
                // The account changed is the resource's last component.
                let name = e.resource.rsplit('/').next().unwrap_or(&e.resource);
                m.insert("user".into(), json!({ "name": name, "uid": e.resource }));
            }
        }
    }
    v
}

// ----- CEF in RFC 5424 ----------------------------------------------------------

/// A CEF header field: `\` and `|` escaped with a backslash, line breaks as
/// spaces (they are not allowed in the header).
pub fn cef_header(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('|', "\\|")
        .replace(['\r', '\n'], " ")
}

/// A CEF extension value: `\` and `=` escaped with a backslash, line breaks as
/// `\n` and `\r`.
pub fn cef_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('=', "\\=")
        .replace('\n', "\\n")
        .replace('\r', "\\r")
}

/// An RFC 5424 header field: printable US-ASCII without spaces, at most `max`
/// characters, `-` when empty.
fn syslog_token(s: &str, max: usize) -> String {
    let t: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if t.is_empty() {
        "-".into()
    } else {
        t
    }
}

/// `e` as one CEF line in RFC 5424 framing:
///
/// ```text
/// <PRI>1 TIMESTAMP HOSTNAME agentbus - audit - CEF:0|agentbus|agentbus|VERSION|ACTION|NAME|SEVERITY|EXTENSIONS
/// ```
///
/// PRI is facility 13 (log audit) × 8 + severity (6 informational for
/// `allowed`, 4 warning for `failed`, 5 notice for `denied`); HOSTNAME the
/// controller instance that recorded it. CEF severity 3 (`allowed`), 5
/// (`failed`), 7 (`denied`). Extensions: `rt` (ms), `externalId` (event id),
/// `act`, `outcome`, `reason`, `suser`, `suid`, `spriv` (role), `cs1` tenant,
/// `cs2` resource, `cs3` request id, `cn1` index.
pub fn cef(e: &AuditEvent) -> String {
    let (pri_sev, cef_sev) = match e.outcome {
        Outcome::Allowed => (6, 3),
        Outcome::Failed => (4, 5),
        Outcome::Denied => (5, 7),
    };
    let header = [
        "CEF:0".to_string(),
        "agentbus".to_string(),
        "agentbus".to_string(),
        cef_header(env!("CARGO_PKG_VERSION")),
        cef_header(&e.action),
        cef_header(&format!("{} {}", e.action, e.outcome)),
        cef_sev.to_string(),
    ]
    .join("|");
    let ext: Vec<String> = [
        ("rt", e.time_ms.to_string()),
        ("externalId", e.id.clone()),
        ("act", e.action.clone()),
        ("outcome", e.outcome.to_string()),
        ("reason", e.reason.clone()),
        ("suser", e.actor.id.clone()),
        ("suid", e.actor.key.clone()),
        ("spriv", e.actor.role.clone()),
        ("cs1Label", "tenant".into()),
        ("cs1", e.tenant.clone()),
        ("cs2Label", "resource".into()),
        ("cs2", e.resource.clone()),
        ("cs3Label", "requestId".into()),
        ("cs3", e.request_id.clone()),
        ("cn1Label", "index".into()),
        ("cn1", e.index.to_string()),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={}", cef_value(v)))
    .collect();
    format!(
        "<{}>1 {} {} agentbus - audit - {header}|{}",
        13 * 8 + pri_sev,
        iso_time(e.time_ms),
        syslog_token(&e.controller, 255),
        ext.join(" ")
    )
}

/// The header fields of a CEF message (the text from `CEF:0` on), split on
/// unescaped `|` and unescaped, plus the extension text: eight parts for a
/// well-formed line.
pub fn split_cef(message: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut field = String::new();
    let mut chars = message.chars();
    while let Some(c) = chars.next() {
        if parts.len() == 7 {
            field.push(c);
            continue;
        }
        match c {
            '\\' => match chars.next() {
                Some(n) => field.push(n),
                None => field.push('\\'),
            },
            '|' => parts.push(std::mem::take(&mut field)),
            _ => field.push(c),
        }
    }
    parts.push(field);
    parts
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn event(i: u64, action: &str, outcome: Outcome, reason: &str, key: &str) -> AuditEvent {
        AuditEvent {
            action: action.into(),
            actor: Actor {
                id: "ops".into(),
                key: key.into(),
                kind: "admin".into(),
                role: "platform-admin".into(),
            },
            controller: "ctl-1".into(),
            id: format!("{i:032x}"),
            index: i,
            outcome,
            prev: if i == 0 {
                String::new()
            } else {
                "ab".repeat(32)
            },
            reason: reason.into(),
            request_id: format!("r{i}"),
            resource: "tenant/acme".into(),
            tenant: "acme".into(),
            time_ms: 1_700_000_000_123 + i,
            version: 1,
        }
    }

    fn sample() -> Vec<AuditEvent> {
        vec![
            event(0, "tenant.create", Outcome::Allowed, "", "UKEY"),
            event(
                1,
                "tenant.update",
                Outcome::Denied,
                "a, \"quoted\"\nreason",
                "UKEY",
            ),
            event(
                2,
                "agent.create",
                Outcome::Failed,
                "pipe | back \\ eq = x",
                "UKEY",
            ),
            event(3, "tenant.get", Outcome::Denied, "bad signature", ""),
            event(4, "admin.revoke", Outcome::Allowed, "", "UKEY"),
        ]
    }

    #[test]
    fn jsonl_and_csv_round_trip() {
        let events = sample();
        assert_eq!(
            parse_jsonl(&export(&events, Format::Jsonl)).unwrap(),
            events
        );
        let csv = export(&events, Format::Csv);
        assert!(csv.starts_with(CSV_HEADER));
        assert_eq!(parse_csv(&csv).unwrap(), events);
        assert!(parse_csv("nope\n").is_err());
        assert_eq!("cef".parse::<Format>().unwrap(), Format::Cef);
        assert_eq!("ecs".parse::<Format>().unwrap(), Format::Ecs);
        assert!("leef".parse::<Format>().is_err());
    }

    #[test]
    fn ecs_documents_have_the_core_fields_with_allowed_values() {
        let events = sample();
        let text = export(&events, Format::Ecs);
        assert_eq!(text.lines().count(), events.len());
        for (line, e) in text.lines().zip(&events) {
            let v: Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["ecs"]["version"], ECS_VERSION);
            assert!(v["@timestamp"].as_str().unwrap().ends_with('Z'));
            assert_eq!(v["event"]["kind"], "event");
            assert_eq!(v["event"]["action"], e.action.as_str());
            assert_eq!(v["organization"]["id"], e.tenant.as_str());
            assert_eq!(v["user"]["name"], e.actor.id.as_str());
            let outcome = v["event"]["outcome"].as_str().unwrap();
            assert!(["success", "failure"].contains(&outcome));
            assert_eq!(outcome == "success", e.outcome == Outcome::Allowed);
            let allowed_categories = ["authentication", "iam", "configuration", "process"];
            for c in v["event"]["category"].as_array().unwrap() {
                assert!(allowed_categories.contains(&c.as_str().unwrap()), "{c}");
            }
            let allowed_types = [
                "allowed", "denied", "error", "creation", "change", "deletion", "access", "start",
                "info",
            ];
            for t in v["event"]["type"].as_array().unwrap() {
                assert!(allowed_types.contains(&t.as_str().unwrap()), "{t}");
            }
        }
    }

    #[test]
    fn ocsf_has_the_required_fields_and_the_class_follows_the_action() {
        let events = sample();
        let classes: Vec<u32> = events.iter().map(|e| ocsf_class(e).class_uid).collect();
        assert_eq!(classes, [6003, 6003, 3001, 3002, 3001]);
        for e in &events {
            let v = ocsf(e);
            for field in [
                "activity_id",
                "category_uid",
                "class_uid",
                "metadata",
                "severity_id",
                "time",
                "type_uid",
            ] {
                assert!(v.get(field).is_some(), "{field} missing in {v}");
            }
            let class = v["class_uid"].as_u64().unwrap();
            assert_eq!(
                v["type_uid"].as_u64().unwrap(),
                class * 100 + v["activity_id"].as_u64().unwrap()
            );
            assert_eq!(v["metadata"]["tenant_uid"], "acme");
            assert!(v["metadata"]["product"]["name"].is_string());
            assert!(v["metadata"]["version"].is_string());
            match class {
                6003 => {
                    for f in ["actor", "api", "src_endpoint"] {
                        assert!(v.get(f).is_some(), "{f}");
                    }
                }
                _ => assert!(v.get("user").is_some()),
            }
        }
        assert_eq!(ocsf(&events[1])["activity_id"], 3);
        assert_eq!(ocsf(&events[1])["status_id"], 2);
    }

    #[test]
    fn cef_lines_have_seven_header_fields_and_escape() {
        let mut e = event(
            2,
            "odd|action\\x",
            Outcome::Failed,
            "pipe | back \\ eq = x\nnext",
            "K",
        );
        e.controller = "ctl 1".into();
        let line = cef(&e);
        assert!(
            line.starts_with("<108>1 2023-11-14T22:13:20.125Z ctl1 agentbus - audit - CEF:0|"),
            "{line}"
        );
        assert_eq!(line.lines().count(), 1);
        let msg = &line[line.find("CEF:0").unwrap()..];
        let parts = split_cef(msg);
        assert_eq!(parts.len(), 8, "{parts:?}");
        assert_eq!(
            parts[..7],
            [
                "CEF:0",
                "agentbus",
                "agentbus",
                env!("CARGO_PKG_VERSION"),
                "odd|action\\x",
                "odd|action\\x failed",
                "5"
            ]
        );
        assert!(msg.contains("odd\\|action\\\\x|"), "{msg}");
        assert!(
            parts[7].contains("reason=pipe | back \\\\ eq \\= x\\nnext "),
            "{}",
            parts[7]
        );
        assert!(parts[7].starts_with("rt=1700000000125 externalId="));
        for e in sample() {
            assert_eq!(
                split_cef(&cef(&e)[cef(&e).find("CEF:0").unwrap()..]).len(),
                8
            );
        }
        assert!(cef(&sample()[0]).starts_with("<110>1 "));
        assert!(cef(&sample()[3]).starts_with("<109>1 "));
    }
}
