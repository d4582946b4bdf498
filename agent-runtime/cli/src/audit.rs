//! `agentbus audit ...`: read, verify and prove the tamper-evident audit log
//! (see `docs/audit.md`). Reads go through the controller; verification runs
//! here, on the raw entries and signed checkpoints.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use agentbus_control::audit::event::{AuditEvent, PLATFORM_LOG};
use agentbus_control::audit::export::{self, Format};
use agentbus_control::audit::verify::{verify_bundle, InclusionBundle};
use agentbus_control::audit::{self, ListRequest, VerifyError};

use crate::output::{print, usage, Failure, Output, EXIT_INTERNAL};
use crate::remote::Remote;

/// `agentbus audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    command: AuditCommand,
}

/// `agentbus audit` commands. `TENANT` is a tenant id or `_platform` (the
/// platform-wide log).
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List a log's events, oldest first (`-o table|json|csv`).
    List(ListArgs),
    /// Recompute a log's Merkle tree and check every entry, every checkpoint's
    /// signature, inclusion and consistency proofs; exit 1 naming the first bad
    /// entry.
    Verify {
        /// The tenant id, or `_platform`.
        tenant: String,
        /// Trust only this checkpoint key (`NAME+KEYID+KEY`, printed by an
        /// earlier verify) instead of the one the controller reports.
        #[arg(long)]
        key: Option<String>,
    },
    /// Print an inclusion proof of one event as JSON (checkpoint included): it
    /// verifies offline with `audit check-proof`.
    Proof {
        /// The tenant id, or `_platform`.
        tenant: String,
        /// The event's id.
        event_id: String,
    },
    /// Export a log's events to a file format or a SIEM: `jsonl` (canonical
    /// JSON, one per line), `csv`, `ocsf` (OCSF JSON lines: Authentication,
    /// Account Change, API Activity), `ecs` (Elastic Common Schema JSON lines)
    /// or `cef` (CEF in RFC 5424 syslog lines).
    /// Written to stdout.
    Export {
        /// The tenant id, or `_platform`.
        tenant: String,
        /// `jsonl`, `csv`, `ocsf`, `ecs` or `cef`.
        #[arg(long, default_value = "jsonl")]
        format: String,
        /// Events at or after: Unix ms, or an age such as `7d`.
        #[arg(long)]
        since: Option<String>,
        /// Events before: Unix ms, or an age such as `1h`.
        #[arg(long)]
        until: Option<String>,
    },
    /// Verify a proof printed by `audit proof`, offline.
    CheckProof {
        /// The proof file (`-` for stdin).
        file: PathBuf,
        /// Trust only this checkpoint key (default: the one the proof names).
        #[arg(long)]
        key: Option<String>,
    },
}

/// Arguments of `audit list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// The tenant id, or `_platform`.
    pub tenant: String,
    /// Events at or after: Unix ms, or an age such as `90s`, `15m`, `2h`, `7d`.
    #[arg(long)]
    pub since: Option<String>,
    /// Events before: Unix ms, or an age such as `1h`.
    #[arg(long)]
    pub until: Option<String>,
    /// Only this action (`tenant.create`), or every action under a prefix
    /// ending in `.` (`agent.`).
    #[arg(long)]
    pub action: Option<String>,
    /// Only this actor (admin name).
    #[arg(long)]
    pub actor: Option<String>,
    /// At most this many (the newest).
    #[arg(long)]
    pub limit: Option<usize>,
}

fn check_log(log: &str) -> Result<(), Failure> {
    if log == PLATFORM_LOG || tenant_bus::TenantId::new(log).is_ok() {
        Ok(())
    } else {
        Err(usage(format!(
            "{log:?} is neither a tenant id nor {PLATFORM_LOG}"
        )))
    }
}

/// A time from the command line: Unix ms, or an age before now.
pub fn parse_time(text: &str, now_ms: u64) -> Result<u64, Failure> {
    let text = text.trim();
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    let split = text.len().saturating_sub(1);
    let (n, unit) = text.split_at(split);
    let scale: u64 = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => 0,
    };
    match n.parse::<u64>() {
        Ok(n) if scale > 0 => Ok(now_ms.saturating_sub(n.saturating_mul(scale))),
        _ => Err(usage(format!(
            "bad time {text:?}: Unix milliseconds, or an age like 90s, 15m, 2h, 7d"
        ))),
    }
}

pub use agentbus_control::audit::export::{iso_time, to_csv, CSV_HEADER};

fn table(events: &[AuditEvent]) -> String {
    let mut out = format!(
        "{:<6} {:<24} {:<18} {:<16} {:<28} {:<8} REASON",
        "INDEX", "TIME", "ACTOR", "ACTION", "RESOURCE", "OUTCOME"
    );
    for e in events {
        out.push_str(&format!(
            "\n{:<6} {:<24} {:<18} {:<16} {:<28} {:<8} {}",
            e.index,
            iso_time(e.time_ms),
            e.actor.id,
            e.action,
            e.resource,
            e.outcome,
            e.reason
        ));
    }
    out
}

fn read_text(file: &PathBuf) -> Result<String, Failure> {
    if file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| usage(format!("reading stdin: {e}")))?;
        Ok(text)
    } else {
        std::fs::read_to_string(file)
            .map_err(|e| usage(format!("cannot read {}: {e}", file.display())))
    }
}

fn bad_log(message: String) -> Failure {
    Failure {
        message,
        code: EXIT_INTERNAL,
    }
}

/// Runs `agentbus audit`.
pub async fn run(output: Output, args: AuditArgs) -> Result<(), Failure> {
    match args.command {
        AuditCommand::List(l) => {
            check_log(&l.tenant)?;
            let now = tenant_bus::envelope::now_ms();
            let req = ListRequest {
                since_ms: l.since.as_deref().map(|t| parse_time(t, now)).transpose()?,
                until_ms: l.until.as_deref().map(|t| parse_time(t, now)).transpose()?,
                action: l.action,
                actor: l.actor,
                limit: l.limit,
            };
            let client = args.remote.connect().await?;
            let events = audit::list(&client, &l.tenant, &req).await?;
            if output == Output::Csv {
                let csv = to_csv(&events);
                crate::write_stdout(csv.strip_suffix('\n').unwrap_or(&csv));
                return Ok(());
            }
            print(output, &events, || table(&events))
        }
        AuditCommand::Verify { tenant, key } => {
            check_log(&tenant)?;
            let client = args.remote.connect().await?;
            match audit::verify_remote(&client, &tenant, key.as_deref()).await {
                Ok((report, key)) => {
                    let value =
                        serde_json::json!({ "ok": true, "report": report, "verifier_key": key });
                    print(output, &value, || {
                        let first = report.first_index;
                        let end = first + report.entries;
                        let signed = match report.signed_size {
                            0 => "none signed yet".to_string(),
                            n => format!("entries {first} to {} signed", n - 1),
                        };
                        let range = match (end, report.pruned_at_ms) {
                            (0, _) => "no entries".to_string(),
                            (_, None) => format!("entries 0 to {} (the whole log)", end - 1),
                            (_, Some(at)) => format!(
                                "entries {first} to {} (entries 0 to {} pruned by retention at {}; their tree is the anchor checkpoint of size {first})",
                                end.saturating_sub(1),
                                first.saturating_sub(1),
                                iso_time(at)
                            ),
                        };
                        format!(
                            "audit log {} verifies: covered {range}\n{} entries, {} checkpoints ({signed}, {} after the last checkpoint), {} inclusion and {} consistency proofs checked\nroot  {}\nkey   {key}",
                            report.log,
                            report.entries,
                            report.checkpoints,
                            report.unsigned_tail,
                            report.inclusion_proofs,
                            report.consistency_proofs,
                            report.root,
                        )
                    })
                }
                Err(VerifyError::Bad(f)) => {
                    if output != Output::Table {
                        let value = serde_json::json!({ "ok": false, "failure": f });
                        crate::write_stdout(&value.to_string());
                    }
                    Err(bad_log(format!(
                        "audit log {tenant} does not verify: {}",
                        f.message
                    )))
                }
                Err(VerifyError::Key(e)) => Err(usage(format!("--key: {e}"))),
                Err(VerifyError::Api(e)) => Err(e.into()),
            }
        }
        AuditCommand::Export {
            tenant,
            format,
            since,
            until,
        } => {
            check_log(&tenant)?;
            let format: Format = format
                .parse()
                .map_err(|e: export::ExportError| usage(e.0))?;
            let now = tenant_bus::envelope::now_ms();
            let filter = ListRequest {
                since_ms: since.as_deref().map(|t| parse_time(t, now)).transpose()?,
                until_ms: until.as_deref().map(|t| parse_time(t, now)).transpose()?,
                ..Default::default()
            };
            let client = args.remote.connect().await?;
            let (events, skipped) = audit::fetch_events(&client, &tenant).await?;
            if skipped > 0 {
                eprintln!(
                    "warning: {skipped} stored entries of {tenant} do not decode and are not exported (run audit verify)"
                );
            }
            let events: Vec<AuditEvent> =
                events.into_iter().filter(|e| filter.matches(e)).collect();
            let text = export::export(&events, format);
            if !text.is_empty() {
                crate::write_stdout(text.strip_suffix('\n').unwrap_or(&text));
            }
            Ok(())
        }
        AuditCommand::Proof { tenant, event_id } => {
            check_log(&tenant)?;
            let client = args.remote.connect().await?;
            let bundle = audit::proof(&client, &tenant, &event_id).await?;
            // Always JSON: the proof is for machines and offline checks.
            print(Output::Json, &bundle, String::new)
        }
        AuditCommand::CheckProof { file, key } => {
            let text = read_text(&file)?;
            let bundle: InclusionBundle = serde_json::from_str(&text)
                .map_err(|e| usage(format!("not an audit proof: {e}")))?;
            let pinned = key.as_deref().map(str::parse).transpose().map_err(
                |e: agentbus_control::audit::note::NoteError| usage(format!("--key: {e}")),
            )?;
            let cp = verify_bundle(&bundle, pinned.as_ref())
                .map_err(|f| bad_log(format!("the proof does not verify: {}", f.message)))?;
            let value = serde_json::json!({
                "ok": true, "log": bundle.log, "event_id": bundle.event_id,
                "index": bundle.index, "tree_size": cp.size, "origin": cp.origin,
            });
            print(output, &value, || {
                format!(
                    "ok: event {} is entry {} of log {}, in the signed checkpoint of size {} ({})",
                    bundle.event_id, bundle.index, bundle.log, cp.size, cp.origin
                )
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn times_and_csv() {
        assert_eq!(iso_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso_time(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(iso_time(1_700_000_000_000), "2023-11-14T22:13:20.000Z");
        assert_eq!(parse_time("1234", 0).unwrap(), 1234);
        assert_eq!(
            parse_time("2h", 10_000_000).unwrap(),
            10_000_000 - 7_200_000
        );
        assert!(parse_time("2y", 0).is_err());
        assert!(to_csv(&[]).starts_with(CSV_HEADER));
    }
}
