//! Audit log figures: events appended per second through a serving
//! controller's [`agentbus_control::audit::AuditLog`] (with its checkpointer
//! signing every 100 events per log), and the time to verify a log offline
//! (every entry, every checkpoint, an inclusion proof per entry, a consistency
//! proof per checkpoint).

use std::sync::Arc;
use std::time::Instant;

use agentbus_control::audit::event::{new_event_id, Actor, AuditEvent, Outcome, SCHEMA_VERSION};
use agentbus_control::audit::merkle::{self, CompactRange};
use agentbus_control::audit::note::{Checkpoint, Signer, Verifier};
use agentbus_control::audit::verify::{verify_log, StoredCheckpoint, StoredEntry};

use crate::BenchError;

/// Logs the appends are spread over, and appenders running at once.
pub const LOGS: usize = 64;

fn event(log: &str, i: u64) -> AuditEvent {
    AuditEvent {
        action: "tenant.update".into(),
        actor: Actor {
            id: "bench".into(),
            key: "UBENCH".into(),
            kind: "admin".into(),
            role: "platform-admin".into(),
        },
        controller: String::new(),
        id: new_event_id(),
        index: 0,
        outcome: Outcome::Allowed,
        prev: String::new(),
        reason: String::new(),
        request_id: format!("bench-{i}"),
        resource: format!("tenant/{log}"),
        tenant: log.to_string(),
        time_ms: tenant_bus::envelope::now_ms(),
        version: SCHEMA_VERSION,
    }
}

/// Events one runtime-style caller hands over at once in [`appends`] with
/// `batch` > 1 (a runtime host's sink sends up to 48 KiB, about 100 of these).
pub const RUNTIME_BATCH: u64 = 50;

/// What [`appends`] measured in one run.
#[derive(Debug, Clone, Copy)]
pub struct AppendRun {
    /// Events appended per second, the last checkpoints included.
    pub per_sec: f64,
    /// Events per stream round trip (group commit batch).
    pub per_batch: f64,
    /// Checkpoints signed during the run.
    pub checkpoints: u64,
}

/// Appends `count` events over [`LOGS`] logs ([`LOGS`] appenders, one per
/// log) to the AUDIT stream of a fresh operator-mode server through a serving
/// controller, then signs the last checkpoints; one [`AppendRun`] for each of
/// `repeats` runs. With `batch` = 1 each appender waits for its event before
/// the next, as an admin request does (`AuditLog::record`); with more, it hands
/// over `batch` events at once and waits for all of them, as the controller
/// does with a runtime host's batch (`AuditLog::record_many`).
pub async fn appends(count: u64, repeats: usize, batch: u64) -> Result<Vec<AppendRun>, BenchError> {
    let platform = crate::platform::OperatorPlatform::start().await?;
    let audit = platform.controller.audit().clone();
    let per_log = (count / LOGS as u64).max(1);
    let mut rates = Vec::new();
    for r in 0..repeats.max(1) {
        // The logs' homes (the shared stream), as `tenant create` would fix
        // them: events of an id without a home and without a tenant would
        // go to the platform log instead.
        for l in 0..LOGS {
            let id = tenant_bus::TenantId::new(&format!("bench{r}x{l}"))
                .map_err(|e| BenchError(format!("bench log id: {e}")))?;
            audit
                .claim_home(&id, None)
                .await
                .map_err(|e| BenchError(format!("audit log home: {e}")))?;
        }
        let before = audit.counters().snapshot();
        let t = Instant::now();
        let mut tasks = Vec::new();
        for l in 0..LOGS {
            let audit = Arc::clone(&audit);
            let log = format!("bench{r}x{l}");
            tasks.push(tokio::spawn(async move {
                let mut ok = 0u64;
                let mut i = 0;
                while i < per_log {
                    let n = batch.clamp(1, per_log - i);
                    if n == 1 {
                        if audit.record(event(&log, i)).await.is_some() {
                            ok += 1;
                        }
                    } else {
                        let events = (i..i + n).map(|j| event(&log, j)).collect();
                        let done = audit.record_many(events).await;
                        ok += done.iter().filter(|d| d.is_some()).count() as u64;
                    }
                    i += n;
                }
                if let Err(e) = audit.checkpoint(&log).await {
                    return Err(BenchError(format!("checkpoint of {log}: {e}")));
                }
                Ok(ok)
            }));
        }
        let mut appended = 0u64;
        for task in tasks {
            appended += task
                .await
                .map_err(|e| BenchError(format!("appender: {e}")))??;
        }
        let secs = t.elapsed().as_secs_f64();
        let after = audit.counters().snapshot();
        if appended != per_log * LOGS as u64 || after.append_failed != before.append_failed {
            return Err(BenchError(format!(
                "audit appends failed: {appended} of {}",
                per_log * LOGS as u64
            )));
        }
        rates.push(AppendRun {
            per_sec: appended as f64 / secs,
            per_batch: (after.appended - before.appended) as f64
                / (after.batches - before.batches).max(1) as f64,
            checkpoints: after.checkpoints - before.checkpoints,
        });
    }
    Ok(rates)
}

/// A log of `count` events with a signed checkpoint every 100 entries (and at
/// the end), as stored: entries, checkpoints, verifier, origin.
pub fn synthetic_log(
    count: u64,
) -> Result<(Vec<StoredEntry>, Vec<StoredCheckpoint>, Verifier, String), BenchError> {
    let signer = Signer::from_seed("agentbus/BENCH/audit", &[5u8; 32])
        .map_err(|e| BenchError(e.to_string()))?;
    let verifier: Verifier = signer
        .verifier_key()
        .parse()
        .map_err(|e: agentbus_control::audit::note::NoteError| BenchError(e.0))?;
    let origin = "agentbus/BENCH/audit/acme".to_string();
    let mut entries = Vec::with_capacity(count as usize);
    let mut cps = Vec::new();
    let mut range = CompactRange::new();
    let mut prev = String::new();
    for i in 0..count {
        let mut e = event("acme", i);
        e.controller = "bench".into();
        e.index = i;
        e.prev = prev;
        let data = e.canonical();
        let leaf = merkle::leaf_hash(&data);
        prev = merkle::hex(&leaf);
        range.push_leaf_hash(leaf);
        entries.push(StoredEntry { seq: i + 1, data });
        if (i + 1) % 100 == 0 || i + 1 == count {
            let note = signer.sign(&Checkpoint {
                origin: origin.clone(),
                size: i + 1,
                root: range.root(),
                time_ms: 1,
            });
            cps.push(StoredCheckpoint {
                seq: count + cps.len() as u64 + 1,
                note,
            });
        }
    }
    Ok((entries, cps, verifier, origin))
}

/// Seconds to verify a synthetic log of `count` events (see [`synthetic_log`])
/// offline, for each of `repeats` runs.
pub fn verify_secs(count: u64, repeats: usize) -> Result<Vec<f64>, BenchError> {
    let (entries, cps, verifier, origin) = synthetic_log(count)?;
    let mut out = Vec::new();
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        let report = verify_log("acme", &origin, &verifier, &entries, &cps)
            .map_err(|f| BenchError(format!("synthetic log does not verify: {f}")))?;
        out.push(t.elapsed().as_secs_f64());
        if report.entries != count {
            return Err(BenchError("verified the wrong number of entries".into()));
        }
    }
    Ok(out)
}
