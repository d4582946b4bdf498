//! `agentbus pub | sub | request | reply`: messaging as an agent, from its bundle.
//! Subjects are relative to the bundle's tenant.
//!
//! Every failure is one line with its own cause and exit code: an unreachable
//! server (unavailable), refused credentials or a tenant at its connection limit
//! (refused), a payload over the server's limit (usage), a reply that arrived but
//! failed verification (internal), a connection the server closed for
//! authorization or revocation while listening (refused).

use std::io::Read as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use futures::StreamExt as _;
use tenant_bus::{
    BusEvent, ConnectErrorKind, CredentialBundle, NamespaceOptions, RequestErrorKind,
    TenantMessage, TenantNamespace,
};
use tokio::sync::broadcast;

use crate::output::{
    fail, Failure, Output, EXIT_INTERNAL, EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_USAGE,
};
use crate::{one_line, write_stdout};

/// Arguments of `agentbus pub`.
#[derive(Debug, Args)]
pub struct PubArgs {
    /// The agent's credential bundle (from `agentbus agent create`).
    #[arg(long)]
    pub creds: PathBuf,
    /// The subject, relative to the tenant (e.g. `orders.created`).
    pub subject: String,
    /// The payload (UTF-8 text); `-` reads it from stdin.
    pub data: String,
}

/// Arguments of `agentbus sub`.
#[derive(Debug, Args)]
pub struct SubArgs {
    /// The agent's credential bundle.
    #[arg(long)]
    pub creds: PathBuf,
    /// The subject or pattern, relative to the tenant (`*` and `>` allowed).
    pub subject: String,
    /// Exit after this many messages (0: never).
    #[arg(long)]
    pub count: Option<u64>,
}

/// Arguments of `agentbus request`.
#[derive(Debug, Args)]
pub struct RequestArgs {
    /// The agent's credential bundle.
    #[arg(long)]
    pub creds: PathBuf,
    /// The subject, relative to the tenant.
    pub subject: String,
    /// The payload (UTF-8 text); `-` reads it from stdin.
    pub data: String,
    /// How long to wait for the reply, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    pub timeout_ms: u64,
}

/// Arguments of `agentbus reply`.
#[derive(Debug, Args)]
pub struct ReplyArgs {
    /// The agent's credential bundle.
    #[arg(long)]
    pub creds: PathBuf,
    /// The subject or pattern to answer requests on, relative to the tenant.
    pub subject: String,
    /// Answer every request with its own payload (the default).
    #[arg(long, conflicts_with = "data")]
    pub echo: bool,
    /// Answer every request with this text (`-` reads it from stdin, once).
    #[arg(long)]
    pub data: Option<String>,
    /// Exit after answering this many requests (0: never).
    #[arg(long)]
    pub count: Option<u64>,
}

/// The whole source chain of an error, as one lower-case line (to recognise the
/// server's own words, which async-nats keeps as a source).
fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text.to_ascii_lowercase()
}

/// The payload argument: the text itself, or stdin for `-`.
fn payload(data: &str) -> Result<Vec<u8>, Failure> {
    if data != "-" {
        return Ok(data.as_bytes().to_vec());
    }
    let mut bytes = Vec::new();
    std::io::stdin()
        .lock()
        .read_to_end(&mut bytes)
        .map_err(|e| {
            fail(
                EXIT_USAGE,
                format!("cannot read the payload from stdin: {e}"),
            )
        })?;
    Ok(bytes)
}

async fn connect(creds: &PathBuf, options: NamespaceOptions) -> Result<TenantNamespace, Failure> {
    let bundle = CredentialBundle::from_file(creds)
        .map_err(|e| fail(EXIT_USAGE, format!("cannot use bundle: {e}")))?;
    options.connect(&bundle).await.map_err(|e| {
        let text = chain_text(&e);
        if text.contains("maximum account active connections")
            || text.contains("maximum connections exceeded")
        {
            return fail(
                EXIT_REFUSED,
                format!(
                    "the server refused the connection: tenant {} is at its connection limit \
                     (or suspended): maximum account active connections exceeded",
                    bundle.tenant
                ),
            );
        }
        match e.kind() {
            ConnectErrorKind::InvalidUrl => fail(EXIT_USAGE, e.to_string()),
            ConnectErrorKind::Authorization => fail(
                EXIT_REFUSED,
                format!(
                    "the server refused agent {} of tenant {} (revoked, suspended or unknown)",
                    bundle.agent, bundle.tenant
                ),
            ),
            ConnectErrorKind::Connection => fail(
                EXIT_UNAVAILABLE,
                format!("cannot reach a server at {}: {e}", bundle.url),
            ),
            _ => fail(EXIT_USAGE, e.to_string()),
        }
    })
}

/// Refuses a payload whose sealed envelope exceeds the server's `max_payload`
/// (the server would close the connection on it).
fn check_size(ns: &TenantNamespace, subject: &str, data: &[u8]) -> Result<(), Failure> {
    let max = ns.nats().server_info().max_payload;
    let full = ns
        .full_subject(subject)
        .map_err(|e| fail(EXIT_USAGE, format!("invalid subject {subject:?}: {e}")))?;
    let sealed = ns
        .sealer()
        .seal(&full, None, data)
        .map_err(|e| fail(EXIT_INTERNAL, format!("cannot seal the payload: {e}")))?
        .1
        .len();
    if max > 0 && sealed > max {
        return Err(too_large(data.len(), sealed, &format!("{max} bytes")));
    }
    Ok(())
}

fn too_large(data: usize, sealed: usize, limit: &str) -> Failure {
    fail(
        EXIT_USAGE,
        format!(
            "payload too large: {data} bytes ({sealed} sealed) exceed the server's max_payload of {limit}"
        ),
    )
}

/// Why the server closed or refused this connection, from the events seen so
/// far, if it was for authorization, revocation, suspension or size.
fn fatal_event(event: &BusEvent) -> Option<String> {
    match event {
        BusEvent::AuthorizationViolation => Some("authorization violation".to_string()),
        BusEvent::Error { detail } => {
            let lower = detail.to_ascii_lowercase();
            [
                "revoked",
                "authorization",
                "authentication",
                "maximum account active connections",
                "maximum payload",
                "account has been deleted",
                "expired",
            ]
            .iter()
            .any(|w| lower.contains(w))
            .then(|| detail.trim().to_string())
        }
        _ => None,
    }
}

/// Drains the events received so far, returning the first fatal one.
fn drain_fatal(events: &mut broadcast::Receiver<BusEvent>) -> Option<String> {
    let mut found = None;
    loop {
        match events.try_recv() {
            Ok(e) => {
                if found.is_none() {
                    found = fatal_event(&e);
                }
            }
            Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
            Err(_) => return found,
        }
    }
}

/// Runs `agentbus pub`.
pub async fn publish(args: PubArgs, output: Output) -> Result<(), Failure> {
    let data = payload(&args.data)?;
    let ns = connect(&args.creds, NamespaceOptions::new()).await?;
    check_size(&ns, &args.subject, &data)?;
    let mut events = ns.events();
    let connects = ns
        .nats()
        .statistics()
        .connects
        .load(std::sync::atomic::Ordering::Relaxed);
    let id = ns
        .publish(args.subject.as_str(), &data)
        .await
        .map_err(|e| {
            let text = chain_text(&e);
            if text.contains("max payload") || text.contains("payload size limit") {
                too_large(
                    data.len(),
                    data.len(),
                    &format!("{} bytes", ns.nats().server_info().max_payload),
                )
            } else {
                fail(EXIT_USAGE, e.to_string())
            }
        })?;
    // A server round trip, so the message left before we exit; a connection the
    // server closed meanwhile (a lower per-account payload limit, suspension)
    // means the message was not accepted, even if the round trip succeeded after
    // a reconnect.
    let synced = ns.sync().await;
    let reconnected = ns
        .nats()
        .statistics()
        .connects
        .load(std::sync::atomic::Ordering::Relaxed)
        != connects;
    if let Some(reason) = drain_fatal(&mut events) {
        if reason.to_ascii_lowercase().contains("maximum payload") {
            return Err(fail(
                EXIT_USAGE,
                format!(
                    "payload too large: the server refused {} bytes for tenant {} ({reason}); \
                     the message was not delivered",
                    data.len(),
                    ns.tenant()
                ),
            ));
        }
        return Err(fail(
            EXIT_REFUSED,
            format!("the server closed the connection ({reason}); the message was not delivered"),
        ));
    }
    if reconnected {
        return Err(fail(
            EXIT_UNAVAILABLE,
            "the connection was lost while publishing; the message may not have been delivered",
        ));
    }
    synced.map_err(|_| {
        fail(
            EXIT_UNAVAILABLE,
            "the server did not confirm the publish in time; the message may not have been delivered",
        )
    })?;
    match output {
        Output::Json | Output::Csv => write_stdout(
            &serde_json::json!({ "msg_id": id.to_string(), "subject": args.subject }).to_string(),
        ),
        Output::Table => write_stdout(&format!("published {id} to {}", args.subject)),
    }
    Ok(())
}

/// How long a listening command waits for a lost connection to come back.
const RECONNECT_GRACE: Duration = Duration::from_secs(10);

/// Watches the connection while listening: `Err` when the server closed it for
/// authorization, revocation or suspension, or it stayed down for
/// [`RECONNECT_GRACE`].
struct Watch {
    events: broadcast::Receiver<BusEvent>,
    down_since: Option<tokio::time::Instant>,
}

impl Watch {
    fn new(ns: &TenantNamespace) -> Self {
        Self {
            events: ns.events(),
            down_since: None,
        }
    }

    /// The next reason to stop, waiting for events (never returns `Ok` while the
    /// connection is healthy).
    async fn stopped(&mut self) -> Failure {
        loop {
            let event = match self.down_since {
                Some(since) => {
                    match tokio::time::timeout_at(since + RECONNECT_GRACE, self.events.recv()).await
                    {
                        Ok(e) => e,
                        Err(_) => {
                            return fail(
                                EXIT_UNAVAILABLE,
                                format!(
                                    "lost the connection to the server for {} s",
                                    RECONNECT_GRACE.as_secs()
                                ),
                            )
                        }
                    }
                }
                None => self.events.recv().await,
            };
            match event {
                Ok(e) => {
                    if let Some(reason) = fatal_event(&e) {
                        return fail(
                            EXIT_REFUSED,
                            format!("the server closed the connection: {reason}"),
                        );
                    }
                    match e {
                        BusEvent::Disconnected => {
                            self.down_since
                                .get_or_insert_with(tokio::time::Instant::now);
                        }
                        BusEvent::Connected => self.down_since = None,
                        BusEvent::Closed => {
                            return fail(EXIT_UNAVAILABLE, "the connection was closed")
                        }
                        _ => {}
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => {
                    return fail(EXIT_UNAVAILABLE, "the connection was closed")
                }
            }
        }
    }
}

/// Runs `agentbus sub`.
pub async fn subscribe(args: SubArgs, output: Output) -> Result<(), Failure> {
    let ns = connect(&args.creds, NamespaceOptions::new()).await?;
    let mut watch = Watch::new(&ns);
    let mut sub = ns
        .subscribe(args.subject.as_str())
        .await
        .map_err(|e| fail(EXIT_USAGE, e.to_string()))?;
    eprintln!(
        "agentbus: listening on {} (tenant {})",
        args.subject,
        ns.tenant()
    );
    let limit = args.count.filter(|&n| n > 0);
    let mut seen = 0u64;
    while limit.is_none_or(|n| seen < n) {
        tokio::select! {
            msg = sub.next() => {
                let Some(msg) = msg else { break };
                seen += 1;
                let sender = msg.sender.as_ref().map(|s| s.as_str()).unwrap_or("-");
                // A closed stdout (`| head`) ends the process quietly, exit 0.
                match output {
                    // One JSON object per line.
                    Output::Json | Output::Csv => write_stdout(&message_json(&msg).to_string()),
                    Output::Table => write_stdout(&format!(
                        "[{}] {} from {}: {}",
                        seen,
                        msg.subject,
                        sender,
                        String::from_utf8_lossy(&msg.payload)
                    )),
                }
            }
            failure = watch.stopped() => return Err(failure),
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    Ok(())
}

/// Runs `agentbus request`.
pub async fn request(args: RequestArgs, output: Output) -> Result<(), Failure> {
    let data = payload(&args.data)?;
    let options = NamespaceOptions::new().request_timeout(Duration::from_millis(args.timeout_ms));
    let ns = connect(&args.creds, options).await?;
    check_size(&ns, &args.subject, &data)?;
    let before = ns.counters().snapshot();
    let reply = ns
        .request(args.subject.as_str(), &data)
        .await
        .map_err(|e| {
            if e.kind() == RequestErrorKind::TimedOut {
                // A reply that came but failed verification is not a timeout.
                let after = ns.counters().snapshot();
                let reasons: Vec<String> = after
                    .dropped
                    .iter()
                    .filter(|(r, n)| *n > before.dropped(*r))
                    .map(|(r, _)| r.as_str().to_string())
                    .collect();
                if !reasons.is_empty() {
                    return fail(
                        EXIT_INTERNAL,
                        format!(
                            "a reply to {} arrived but was dropped: it failed verification ({})",
                            args.subject,
                            reasons.join(", ")
                        ),
                    );
                }
                return fail(
                    EXIT_UNAVAILABLE,
                    format!("no reply to {} within {} ms", args.subject, args.timeout_ms),
                );
            }
            if e.kind() == RequestErrorKind::NoResponders {
                return fail(
                    EXIT_UNAVAILABLE,
                    format!("nobody answers requests on {}", args.subject),
                );
            }
            fail(EXIT_USAGE, e.to_string())
        })?;
    match output {
        Output::Json | Output::Csv => write_stdout(&message_json(&reply).to_string()),
        Output::Table => write_stdout(&String::from_utf8_lossy(&reply.payload)),
    }
    Ok(())
}

/// Runs `agentbus reply`: answers requests on a subject, as the agent, sealed.
pub async fn reply(args: ReplyArgs) -> Result<(), Failure> {
    let fixed = match &args.data {
        Some(d) => Some(payload(d)?),
        None => None,
    };
    let ns = connect(&args.creds, NamespaceOptions::new()).await?;
    if let Some(fixed) = &fixed {
        check_size(&ns, "reply", fixed)?;
    }
    let mut watch = Watch::new(&ns);
    let mut sub = ns
        .subscribe(args.subject.as_str())
        .await
        .map_err(|e| fail(EXIT_USAGE, e.to_string()))?;
    eprintln!(
        "agentbus: answering requests on {} (tenant {}, {})",
        args.subject,
        ns.tenant(),
        if fixed.is_some() {
            "fixed reply"
        } else {
            "echo"
        }
    );
    let limit = args.count.filter(|&n| n > 0);
    let mut answered = 0u64;
    while limit.is_none_or(|n| answered < n) {
        tokio::select! {
            msg = sub.next() => {
                let Some(msg) = msg else { break };
                if answer(&ns, &msg, fixed.as_deref()).await {
                    answered += 1;
                    let sender = msg.sender.as_ref().map(|s| s.as_str()).unwrap_or("-");
                    write_stdout(&format!(
                        "[{}] answered {} from {}: {}",
                        answered,
                        msg.subject,
                        sender,
                        String::from_utf8_lossy(&msg.payload)
                    ));
                }
            }
            failure = watch.stopped() => return Err(failure),
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    // The last answer must leave before the process exits.
    let _ = ns.sync().await;
    Ok(())
}

/// Answers one request; `false` (with a note on stderr) for a message that is
/// not a request or whose answer could not be sent.
async fn answer(ns: &TenantNamespace, msg: &TenantMessage, fixed: Option<&[u8]>) -> bool {
    if msg.reply.is_none() {
        eprintln!(
            "agentbus: {} is not a request (no reply inbox); skipped",
            msg.subject
        );
        return false;
    }
    let body = fixed.unwrap_or(&msg.payload);
    match ns.respond(msg, body).await {
        Ok(_) => true,
        Err(e) => {
            eprintln!(
                "agentbus: cannot answer {}: {}",
                msg.subject,
                one_line(&e.to_string())
            );
            false
        }
    }
}

/// A verified message as JSON: `subject` (relative), `tenant`, `sender`,
/// `msg_id`, `timestamp_ms`, `key_version`, and `payload` (text) or
/// `payload_base64` (when it is not UTF-8).
fn message_json(msg: &tenant_bus::TenantMessage) -> serde_json::Value {
    use base64::Engine as _;
    let ts = msg
        .timestamp
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut v = serde_json::json!({
        "subject": msg.subject.as_str(),
        "tenant": msg.tenant.as_str(),
        "sender": msg.sender.as_ref().map(|s| s.as_str()),
        "msg_id": msg.msg_id.to_string(),
        "timestamp_ms": ts,
        "key_version": msg.key_version,
    });
    match std::str::from_utf8(&msg.payload) {
        Ok(text) => v["payload"] = serde_json::Value::from(text),
        Err(_) => {
            v["payload_base64"] = serde_json::Value::from(
                base64::engine::general_purpose::STANDARD.encode(&msg.payload),
            )
        }
    }
    v
}
