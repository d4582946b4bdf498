//! A Rust agent driven by its arguments, for interoperability tests with other
//! implementations of the bus (the Python client's tests). It prints one JSON
//! object per line on stdout: `{"event": "ready"}` once it is listening, then one
//! line per message or outcome, then `{"event": "done", ...}` with its counters.
//!
//! ```text
//! interop_peer BUNDLE pub SUBJECT COUNT PREFIX      publish COUNT messages PREFIX-<i>
//! interop_peer BUNDLE sub PATTERN COUNT TIMEOUT_MS  print COUNT verified messages
//! interop_peer BUNDLE respond SUBJECT COUNT TIMEOUT_MS   answer requests "echo:<payload>"
//! interop_peer BUNDLE request SUBJECT PAYLOAD TIMEOUT_MS print the response
//! interop_peer BUNDLE dispatch TYPE PAYLOAD TIMEOUT_MS   submit a task, print its outcome
//! interop_peer BUNDLE work TYPE COUNT TIMEOUT_MS    run a worker ("done:<payload>")
//! interop_peer BUNDLE kv-put STORE KEY VALUE        write VALUE to the state store
//! interop_peer BUNDLE kv-get STORE KEY              print the value (or its error kind)
//! ```
//!
//! Dispatch uses per-tenant stream and bucket names (`TASKS_<id>`,
//! `TASKS_DONE_<id>`), as on a server whose tenants share one account.
//! Exits 0 when it did what was asked, 1 otherwise.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_runtime::dispatch::{DispatchOptions, Dispatcher, Task, TaskOutcome, WorkerOptions};
use futures::StreamExt as _;
use serde_json::{json, Value};
use tenant_bus::{CredentialBundle, DropReason, TenantMessage, TenantNamespace};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const USAGE: &str = "usage: interop_peer BUNDLE (pub SUBJECT COUNT PREFIX | sub PATTERN COUNT TIMEOUT_MS | respond SUBJECT COUNT TIMEOUT_MS | request SUBJECT PAYLOAD TIMEOUT_MS | dispatch TYPE PAYLOAD TIMEOUT_MS | work TYPE COUNT TIMEOUT_MS | kv-put STORE KEY VALUE | kv-get STORE KEY)";

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args).await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            emit(json!({"event": "error", "error": e.to_string()}));
            std::process::exit(1);
        }
    }
}

fn emit(v: Value) {
    println!("{v}");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn message_json(event: &str, m: &TenantMessage) -> Value {
    json!({
        "event": event,
        "subject": m.subject.as_str(),
        "tenant": m.tenant.as_str(),
        "msg_id": m.msg_id.to_hex(),
        "timestamp_ms": m.timestamp
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        "sender": m.sender.as_ref().map(|a| a.as_str()),
        "key_version": m.key_version,
        "payload": String::from_utf8_lossy(&m.payload),
        "payload_hex": hex(&m.payload),
        "reply": m.reply.as_ref().map(|r| r.as_str()),
    })
}

fn counters_json(ns: &TenantNamespace) -> Value {
    let snap = ns.counters().snapshot();
    let dropped: serde_json::Map<String, Value> = DropReason::ALL
        .iter()
        .map(|r| (r.as_str().to_string(), json!(snap.dropped(*r))))
        .collect();
    json!({"delivered": snap.delivered, "dropped": dropped})
}

fn arg(args: &[String], i: usize) -> Result<&str> {
    args.get(i)
        .map(String::as_str)
        .ok_or_else(|| USAGE.to_string().into())
}

fn num(args: &[String], i: usize) -> Result<u64> {
    Ok(arg(args, i)?.parse::<u64>()?)
}

async fn run(args: &[String]) -> Result<bool> {
    let bundle = CredentialBundle::from_file(arg(args, 0)?)?;
    let ns = TenantNamespace::connect(&bundle).await?;
    let cmd = arg(args, 1)?;
    let ok = match cmd {
        "pub" => {
            let subject = arg(args, 2)?;
            let count = num(args, 3)?;
            let prefix = arg(args, 4)?;
            let mut ids = Vec::new();
            for i in 0..count {
                let id = ns.publish(subject, format!("{prefix}-{i}")).await?;
                ids.push(id.to_hex());
            }
            ns.flush().await?;
            emit(json!({"event": "published", "ids": ids}));
            true
        }
        "sub" => {
            let count = num(args, 3)?;
            let timeout = Duration::from_millis(num(args, 4)?);
            let mut sub = ns.subscribe(arg(args, 2)?).await?;
            emit(json!({"event": "ready"}));
            let mut got = 0;
            let deadline = tokio::time::Instant::now() + timeout;
            while got < count {
                match tokio::time::timeout_at(deadline, sub.next()).await {
                    Ok(Some(m)) => {
                        emit(message_json("message", &m));
                        got += 1;
                    }
                    _ => break,
                }
            }
            got == count
        }
        "respond" => {
            let count = num(args, 3)?;
            let timeout = Duration::from_millis(num(args, 4)?);
            let mut sub = ns.subscribe(arg(args, 2)?).await?;
            emit(json!({"event": "ready"}));
            let mut got = 0;
            let deadline = tokio::time::Instant::now() + timeout;
            while got < count {
                match tokio::time::timeout_at(deadline, sub.next()).await {
                    Ok(Some(m)) => {
                        emit(message_json("request", &m));
                        let mut answer = b"echo:".to_vec();
                        answer.extend_from_slice(&m.payload);
                        ns.respond(&m, answer).await?;
                        got += 1;
                    }
                    _ => break,
                }
            }
            ns.flush().await?;
            got == count
        }
        "request" => {
            let timeout = Duration::from_millis(num(args, 4)?);
            let call = ns.request(arg(args, 2)?, arg(args, 3)?.as_bytes().to_vec());
            match tokio::time::timeout(timeout, call).await {
                Ok(Ok(m)) => {
                    emit(message_json("response", &m));
                    true
                }
                Ok(Err(e)) => {
                    emit(
                        json!({"event": "request_error", "kind": format!("{:?}", e.kind()), "error": e.to_string()}),
                    );
                    false
                }
                Err(_) => {
                    emit(json!({"event": "request_error", "kind": "TimedOut"}));
                    false
                }
            }
        }
        "dispatch" => {
            let timeout = Duration::from_millis(num(args, 4)?);
            let d = Dispatcher::new(&ns, DispatchOptions::new().per_tenant_names(true)).await?;
            let mut handle = d.dispatch(arg(args, 2)?, arg(args, 3)?.as_bytes()).await?;
            emit(
                json!({"event": "dispatched", "id": handle.id().to_hex(), "stream": d.stream_name(), "bucket": d.done_bucket()}),
            );
            match handle.wait(timeout).await? {
                TaskOutcome::Completed(out) => {
                    emit(
                        json!({"event": "outcome", "id": handle.id().to_hex(), "completed": true,
                        "output": String::from_utf8_lossy(&out)}),
                    );
                }
                TaskOutcome::DeadLettered { reason, deliveries } => {
                    emit(
                        json!({"event": "outcome", "id": handle.id().to_hex(), "completed": false,
                        "reason": reason, "deliveries": deliveries}),
                    );
                }
            }
            true
        }
        "work" => {
            let count = num(args, 3)?;
            let timeout = Duration::from_millis(num(args, 4)?);
            let d = Dispatcher::new(&ns, DispatchOptions::new().per_tenant_names(true)).await?;
            let done = Arc::new(AtomicU64::new(0));
            let notify = Arc::new(tokio::sync::Notify::new());
            let handler = {
                let done = done.clone();
                let notify = notify.clone();
                move |task: Task| {
                    let done = done.clone();
                    let notify = notify.clone();
                    async move {
                        emit(json!({"event": "task", "id": task.id.to_hex(),
                            "type": task.task_type.as_str(),
                            "sender": task.sender.as_ref().map(|a| a.as_str()),
                            "payload": String::from_utf8_lossy(&task.payload),
                            "delivery": task.delivery}));
                        let mut out = b"done:".to_vec();
                        out.extend_from_slice(&task.payload);
                        done.fetch_add(1, Ordering::Relaxed);
                        notify.notify_one();
                        Ok::<_, String>(out)
                    }
                }
            };
            let worker = d
                .worker(arg(args, 2)?, handler, WorkerOptions::new().concurrency(2))
                .await?;
            emit(json!({"event": "ready"}));
            let deadline = tokio::time::Instant::now() + timeout;
            while done.load(Ordering::Relaxed) < count {
                if tokio::time::timeout_at(deadline, notify.notified())
                    .await
                    .is_err()
                {
                    break;
                }
            }
            // Let the last outcome be recorded and acked before stopping.
            worker.shutdown(Duration::from_secs(5)).await;
            done.load(Ordering::Relaxed) >= count
        }
        "kv-put" => {
            let store = ns.kv(arg(args, 2)?).await?;
            let revision = store.put(arg(args, 3)?, arg(args, 4)?.as_bytes()).await?;
            emit(json!({"event": "kv", "revision": revision}));
            true
        }
        "kv-get" => {
            let store = ns.kv(arg(args, 2)?).await?;
            match store.get(arg(args, 3)?).await {
                Ok(entry) => {
                    emit(json!({"event": "kv", "revision": entry.revision,
                        "value": String::from_utf8_lossy(&entry.value),
                        "writer": entry.writer.as_ref().map(|a| a.as_str()),
                        "key_version": entry.key_version}));
                    true
                }
                Err(e) => {
                    emit(
                        json!({"event": "kv_error", "kind": format!("{:?}", e.kind()), "error": e.to_string()}),
                    );
                    false
                }
            }
        }
        _ => return Err(USAGE.into()),
    };
    emit(json!({"event": "done", "ok": ok, "counters": counters_json(&ns)}));
    ns.close().await?;
    Ok(ok)
}
