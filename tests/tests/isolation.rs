//! Server-enforced tenant isolation, attacked with raw async-nats (no tenant-bus in
//! between) holding tenant `a`'s real credentials from the control plane, against
//! a real nats-server in operator mode.
//!
//! - `escape_suite`: every attempt to reach tenant `b` (or the system, or raw
//!   JetStream/KV subjects) is refused by the server, the refusal is *observed* as a
//!   permission violation on the connection's event callback, and nothing of `b`'s
//!   arrives, while `b` is demonstrably publishing. Each attempt sits beside a
//!   positive control: the same client doing the corresponding thing in its own
//!   tenant.
//! - limits from the tier table (connections, payload, subscriptions);
//! - a tenant created while the server runs connects within 1 s;
//! - suspension, activation and per-agent revocation take effect within 2 s.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_runtime::tiers::{Quotas, Tier};
use async_nats::jetstream::{self, consumer::pull, kv, stream};
use futures::StreamExt as _;
use nats_harness::{platform, raw_options, Events};
use tenant_bus::CredentialBundle;

const WAIT: Duration = Duration::from_secs(2);

// ----- harness ---------------------------------------------------------------------

fn is_violation(e: &str) -> bool {
    e.to_lowercase().contains("permissions violation")
}

fn options(bundle: &CredentialBundle) -> (async_nats::ConnectOptions, Events) {
    raw_options(bundle, WAIT)
}

async fn connect(url: &str, bundle: &CredentialBundle) -> (async_nats::Client, Events) {
    let (opts, events) = options(bundle);
    let client = opts
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("{}/{} connect: {e}", bundle.tenant, bundle.agent));
    (client, events)
}

async fn try_connect(
    url: &str,
    bundle: &CredentialBundle,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    options(bundle).0.connect(url).await
}

/// Subscribe, publish, receive: a round trip on one connection (the server handles
/// one connection's SUB before its later PUB).
async fn pub_sub_round_trip(
    client: &async_nats::Client,
    sub: &str,
    subject: &str,
) -> Result<(), String> {
    let mut s = client
        .subscribe(sub.to_string())
        .await
        .map_err(|e| e.to_string())?;
    let body = format!("own:{subject}");
    client
        .publish(subject.to_string(), body.clone().into())
        .await
        .map_err(|e| e.to_string())?;
    client.flush().await.map_err(|e| e.to_string())?;
    let msg = tokio::time::timeout(WAIT, s.next())
        .await
        .map_err(|_| format!("no message on {sub} for {subject}"))?
        .ok_or("subscription ended")?;
    if msg.payload != body.as_bytes() {
        return Err(format!("wrong payload on {}", msg.subject));
    }
    let _ = s.unsubscribe().await;
    Ok(())
}

/// Nothing arrives on `sub` within `limit`.
async fn stays_empty(sub: &mut async_nats::Subscriber, limit: Duration) -> Result<(), String> {
    match tokio::time::timeout(limit, sub.next()).await {
        Ok(Some(m)) => Err(format!(
            "received {} ({} bytes)",
            m.subject,
            m.payload.len()
        )),
        _ => Ok(()),
    }
}

// ----- the escape suite -------------------------------------------------------------

/// What the attacker tries.
enum Attack {
    Pub(String),
    Sub(String),
    QueueSub(String, String),
    /// Publish with a reply inbox, as a request does (the inbox is watched).
    Request(String, String),
}

/// The positive control beside an attack.
enum Control {
    /// Subscribe to the first, publish to the second, receive.
    PubSub(String, String),
    /// Queue-subscribe (subject, group), publish, receive.
    QueuePubSub(String, String),
    /// Request the tenant's own echo service.
    Echo,
    /// Publish a task to the own `TASKS` stream and get the JetStream ack.
    JsPublish,
    /// Publish a task and pull it from the own consumer, acking with a round trip.
    JsPull,
    /// Stream info of the own `TASKS`: its subjects are the tenant's.
    JsInfo,
    /// Create-or-get the own `TASKS` stream and its consumer.
    JsCreate,
    /// Read the own KV bucket (and not see `b`'s key in it).
    KvGet,
    /// Write the own KV bucket.
    KvPut,
    /// Watch a key of the own bucket and see an update.
    KvWatch,
}

struct A {
    client: async_nats::Client,
    events: Events,
    js: jetstream::Context,
    kv: kv::Store,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    seq: usize,
}

impl A {
    async fn control(&mut self, c: &Control) -> Result<(), String> {
        self.seq += 1;
        let n = self.seq;
        match c {
            Control::PubSub(sub, subject) => pub_sub_round_trip(&self.client, sub, subject).await,
            Control::QueuePubSub(subject, group) => {
                let mut s = self
                    .client
                    .queue_subscribe(subject.clone(), group.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                self.client
                    .publish(subject.clone(), "q".into())
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::time::timeout(WAIT, s.next())
                    .await
                    .map_err(|_| "queue message not received".to_string())?
                    .ok_or("ended")?;
                Ok(())
            }
            Control::Echo => {
                let reply = self
                    .client
                    .request("tenant.a.svc.echo", format!("ping-{n}").into())
                    .await
                    .map_err(|e| e.to_string())?;
                if reply.payload != format!("a-echo:ping-{n}").as_bytes() {
                    return Err("wrong echo".into());
                }
                Ok(())
            }
            Control::JsPublish => {
                let ack = self
                    .js
                    .publish(A_TASK, format!("a-task-{n}").into())
                    .await
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())?;
                if ack.stream != "TASKS" {
                    return Err(format!("acked by {}", ack.stream));
                }
                Ok(())
            }
            Control::JsPull => {
                self.js
                    .publish(A_TASK, format!("a-task-{n}").into())
                    .await
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())?;
                let mut msgs = self
                    .consumer
                    .fetch()
                    .max_messages(1)
                    .expires(WAIT)
                    .messages()
                    .await
                    .map_err(|e| e.to_string())?;
                let msg = tokio::time::timeout(WAIT + WAIT, msgs.next())
                    .await
                    .map_err(|_| "no task pulled".to_string())?
                    .ok_or("no task")?
                    .map_err(|e| e.to_string())?;
                if !msg.payload.starts_with(b"a-task-") {
                    return Err(format!("pulled a foreign task {:?}", msg.payload));
                }
                msg.double_ack().await.map_err(|e| e.to_string())
            }
            Control::JsInfo => {
                let mut s = self
                    .js
                    .get_stream("TASKS")
                    .await
                    .map_err(|e| e.to_string())?;
                let info = s.info().await.map_err(|e| e.to_string())?;
                if info.config.subjects != vec!["tenant.a.tasks.>".to_string()] {
                    return Err(format!("not a's stream: {:?}", info.config.subjects));
                }
                Ok(())
            }
            Control::JsCreate => {
                let s = self
                    .js
                    .get_or_create_stream(tasks_config("a"))
                    .await
                    .map_err(|e| e.to_string())?;
                s.get_or_create_consumer::<pull::Config>(A_WORKER, worker_config())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            }
            Control::KvGet => {
                let v = self.kv.get("mine").await.map_err(|e| e.to_string())?;
                if v.as_deref() != Some(&b"a-value"[..]) {
                    return Err(format!("own key reads {v:?}"));
                }
                // Same bucket name as b's, but b's key is not in it: accounts are
                // separate JetStreams.
                let b_key = self.kv.get("secret").await.map_err(|e| e.to_string())?;
                if b_key.is_some() {
                    return Err("b's key visible in a's bucket".into());
                }
                Ok(())
            }
            Control::KvPut => {
                self.kv
                    .put(format!("k{n}"), "v".into())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            }
            Control::KvWatch => {
                let mut w = self.kv.watch("watched").await.map_err(|e| e.to_string())?;
                self.kv
                    .put("watched", format!("w{n}").into())
                    .await
                    .map_err(|e| e.to_string())?;
                let entry = tokio::time::timeout(WAIT, w.next())
                    .await
                    .map_err(|_| "no watch update".to_string())?
                    .ok_or("watch ended")?
                    .map_err(|e| e.to_string())?;
                if entry.key != "watched" {
                    return Err(format!("watched {}", entry.key));
                }
                Ok(())
            }
        }
    }
}

fn tasks_config(tenant: &str) -> stream::Config {
    stream::Config {
        name: "TASKS".into(),
        subjects: vec![format!("tenant.{tenant}.tasks.>")],
        retention: stream::RetentionPolicy::WorkQueue,
        ..Default::default()
    }
}

/// The subject a's tasks are published on, and the worker consumer that reads
/// them: the shape task dispatch uses (`tasks.queue.<type>`, a consumer filtered
/// to one type), the only consumer of `TASKS` the agent allow-list permits.
const A_TASK: &str = "tenant.a.tasks.queue.new";
const A_WORKER: &str = "work-new";

fn worker_config() -> pull::Config {
    pull::Config {
        durable_name: Some(A_WORKER.into()),
        filter_subject: A_TASK.into(),
        ..Default::default()
    }
}

fn attacks() -> Vec<(&'static str, Attack, Control)> {
    use Attack::*;
    use Control::*;
    let s = |x: &str| x.to_string();
    let own = |sub: &str, subject: &str| PubSub(s(sub), s(subject));
    let req = |subject: &str, inbox: &str| Request(s(subject), s(inbox));
    vec![
        (
            "publish to b's subject",
            Pub(s("tenant.b.data")),
            own("tenant.a.data", "tenant.a.data"),
        ),
        (
            "inject a task into b's stream subject",
            Pub(s("tenant.b.tasks.new")),
            JsPublish,
        ),
        (
            "forge a reply into b's inbox",
            Pub(s("tenant.b._INBOX.forged")),
            own("tenant.a._INBOX.x", "tenant.a._INBOX.x"),
        ),
        (
            "publish to the default inbox space",
            Pub(s("_INBOX.forged")),
            own("tenant.a._INBOX.>", "tenant.a._INBOX.y"),
        ),
        (
            "publish to a wildcard tenant",
            Pub(s("tenant.*.data")),
            own("tenant.a.*", "tenant.a.data2"),
        ),
        (
            "publish to >",
            Pub(s(">")),
            own("tenant.a.>", "tenant.a.any"),
        ),
        (
            "push a claims update",
            Pub(s("$SYS.REQ.CLAIMS.UPDATE")),
            Echo,
        ),
        (
            "write b's KV bucket subject",
            Pub(s("$KV.SECRETS.key")),
            KvPut,
        ),
        (
            "request b's service",
            req("tenant.b.svc.echo", "tenant.a._INBOX.r1"),
            Echo,
        ),
        (
            "ping the system account",
            req("$SYS.REQ.SERVER.PING", "tenant.a._INBOX.r2"),
            Echo,
        ),
        (
            "list connections of other accounts",
            req("$SYS.REQ.ACCOUNT.PING.CONNZ", "tenant.a._INBOX.r3"),
            Echo,
        ),
        (
            "subscribe tenant.b.>",
            Sub(s("tenant.b.>")),
            own("tenant.a.>", "tenant.a.s1"),
        ),
        (
            "subscribe tenant.*.>",
            Sub(s("tenant.*.>")),
            own("tenant.a.*", "tenant.a.s2"),
        ),
        ("subscribe >", Sub(s(">")), own("tenant.a.>", "tenant.a.s3")),
        (
            "subscribe b's exact subject",
            Sub(s("tenant.b.data")),
            own("tenant.a.data", "tenant.a.data"),
        ),
        (
            "subscribe _INBOX.>",
            Sub(s("_INBOX.>")),
            own("tenant.a._INBOX.>", "tenant.a._INBOX.z"),
        ),
        (
            "sniff b's inbox",
            Sub(s("tenant.b._INBOX.>")),
            own("tenant.a._INBOX.>", "tenant.a._INBOX.w"),
        ),
        (
            "subscribe $SYS.>",
            Sub(s("$SYS.>")),
            own("tenant.a.sys.>", "tenant.a.sys.x"),
        ),
        ("subscribe $JS.API.>", Sub(s("$JS.API.>")), JsInfo),
        ("subscribe $KV.>", Sub(s("$KV.>")), KvGet),
        (
            "subscribe raw bucket subjects",
            Sub(s("$KV.STATE.>")),
            KvWatch,
        ),
        ("subscribe JetStream acks", Sub(s("$JS.ACK.>")), JsPull),
        (
            "subscribe JetStream advisories",
            Sub(s("$JS.EVENT.>")),
            JsInfo,
        ),
        (
            "subscribe b's task subjects",
            Sub(s("tenant.b.tasks.>")),
            JsPull,
        ),
        (
            "steal b's requests with a queue group",
            QueueSub(s("tenant.b.svc.echo"), s("workers")),
            QueuePubSub(s("tenant.a.svc.q"), s("workers")),
        ),
        (
            "list streams",
            req("$JS.API.STREAM.NAMES", "tenant.a._INBOX.j1"),
            JsInfo,
        ),
        (
            "list stream infos",
            req("$JS.API.STREAM.LIST", "tenant.a._INBOX.j2"),
            JsInfo,
        ),
        (
            "raw read of a task stream",
            req("$JS.API.STREAM.MSG.GET.TASKS", "tenant.a._INBOX.j3"),
            JsPull,
        ),
        (
            "direct read of a task stream",
            req("$JS.API.DIRECT.GET.TASKS", "tenant.a._INBOX.j4"),
            JsPull,
        ),
        (
            "purge a task stream",
            req("$JS.API.STREAM.PURGE.TASKS", "tenant.a._INBOX.j5"),
            JsInfo,
        ),
        (
            "delete a task stream",
            req("$JS.API.STREAM.DELETE.TASKS", "tenant.a._INBOX.j6"),
            JsInfo,
        ),
        (
            "mirror b's stream via its JS API",
            req("$JS.API.STREAM.CREATE.MIRROR", "tenant.a._INBOX.j7"),
            JsCreate,
        ),
        (
            "use b's JetStream domain",
            req("$JS.b.API.STREAM.INFO.TASKS", "tenant.a._INBOX.j8"),
            JsInfo,
        ),
        (
            "read another bucket",
            req("$JS.API.STREAM.INFO.KV_SECRETS", "tenant.a._INBOX.j9"),
            KvGet,
        ),
        (
            "direct-get another bucket",
            req(
                "$JS.API.DIRECT.GET.KV_SECRETS.$KV.SECRETS.x",
                "tenant.a._INBOX.j10",
            ),
            KvGet,
        ),
        (
            "consume another stream",
            req("$JS.API.CONSUMER.CREATE.OTHER", "tenant.a._INBOX.j11"),
            JsCreate,
        ),
        (
            "snapshot a task stream",
            req("$JS.API.STREAM.SNAPSHOT.TASKS", "tenant.a._INBOX.j12"),
            JsInfo,
        ),
    ]
}

#[tokio::test]
async fn escape_suite() {
    let p = platform().await;
    let url = p.server.url();
    p.cp.create_tenant("a", Tier::Free).await.unwrap();
    p.cp.create_tenant("b", Tier::Free).await.unwrap();
    let a_bundle = p.cp.issue_agent("a", "worker", "default").await.unwrap();
    let a2_bundle = p.cp.issue_agent("a", "helper", "default").await.unwrap();
    let b_bundle = p.cp.issue_agent("b", "producer", "default").await.unwrap();
    let b_obs_bundle = p.cp.issue_agent("b", "observer", "default").await.unwrap();

    // ---- b: JetStream data, a service, an observer and a steady publisher.
    let (b, mut b_events) = connect(&url, &b_bundle).await;
    let b_js = jetstream::new(b.clone());
    b_js.create_stream(tasks_config("b")).await.unwrap();
    let b_kv = b_js
        .create_key_value(kv::Config {
            bucket: "STATE".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    b_kv.put("secret", "b-secret".into()).await.unwrap();
    for i in 0..3 {
        b_js.publish("tenant.b.tasks.new", format!("b-task-{i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let mut b_svc = b.subscribe("tenant.b.svc.echo").await.unwrap();
    let b_responder = b.clone();
    let b_served = Arc::new(AtomicUsize::new(0));
    let served = b_served.clone();
    let b_service = tokio::spawn(async move {
        while let Some(m) = b_svc.next().await {
            if let Some(reply) = m.reply {
                served.fetch_add(1, Ordering::Relaxed);
                let _ = b_responder.publish(reply, "b-echo".into()).await;
            }
        }
    });
    let (b_obs, _b_obs_events) = connect(&url, &b_obs_bundle).await;
    let mut observed = b_obs.subscribe("tenant.b.>").await.unwrap();
    // Barrier across connections: b publishes probes until the observer sees one.
    let mut ready = false;
    for _ in 0..100 {
        b.publish("tenant.b.probe", "probe".into()).await.unwrap();
        b.flush().await.unwrap();
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(50), observed.next()).await
        {
            ready = true;
            break;
        }
    }
    assert!(ready, "b's observer never saw b's probe");
    let b_observed = Arc::new(AtomicUsize::new(0));
    let counter = b_observed.clone();
    let b_observer = tokio::spawn(async move {
        while let Some(m) = observed.next().await {
            if m.subject.starts_with("tenant.b.") {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let b_traffic = {
        let b = b.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut sent = 0usize;
            for i in 0..10_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                for subject in ["tenant.b.data", "tenant.b._INBOX.abc", "tenant.b.sys.x"] {
                    let _ = b.publish(subject, format!("b-secret-{i}").into()).await;
                    sent += 1;
                }
                let _ = b.request("tenant.b.svc.echo", "from-b".into()).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            sent
        })
    };

    // ---- a: its own service (second agent), stream, consumer and bucket.
    let (a2, _a2_events) = connect(&url, &a2_bundle).await;
    let mut a_svc = a2.subscribe("tenant.a.svc.echo").await.unwrap();
    let a_responder = a2.clone();
    let a_service = tokio::spawn(async move {
        while let Some(m) = a_svc.next().await {
            if let Some(reply) = m.reply {
                let body = format!("a-echo:{}", String::from_utf8_lossy(&m.payload));
                let _ = a_responder.publish(reply, body.into()).await;
            }
        }
    });
    let (client, events) = connect(&url, &a_bundle).await;
    let js = jetstream::new(client.clone());
    let tasks = js.create_stream(tasks_config("a")).await.unwrap();
    let consumer = tasks
        .get_or_create_consumer::<pull::Config>(A_WORKER, worker_config())
        .await
        .unwrap();
    let kv = js
        .create_key_value(kv::Config {
            bucket: "STATE".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    kv.put("mine", "a-value".into()).await.unwrap();
    let mut a = A {
        client,
        events,
        js,
        kv,
        consumer,
        seq: 0,
    };
    // a's own service must be live before the controls use it (cross-connection).
    let mut echo_ready = false;
    for _ in 0..50 {
        if a.control(&Control::Echo).await.is_ok() {
            echo_ready = true;
            break;
        }
    }
    assert!(echo_ready, "a's echo service never answered");
    let setup_events = a.events.drain();
    assert!(
        !setup_events.iter().any(|e| is_violation(e)),
        "a's own set-up hit a violation: {setup_events:?}"
    );

    // ---- the attempts.
    let list = attacks();
    assert!(list.len() >= 25, "at least 25 distinct attempts");
    let mut refused = Vec::new();
    let mut held_subs = Vec::new();
    let mut failures = Vec::new();
    for (name, attack, control) in &list {
        // Positive control first: the same client can do this inside its tenant,
        // without any violation.
        a.events.drain();
        if let Err(e) = a.control(control).await {
            failures.push(format!("{name}: control failed: {e}"));
        }
        let after_control = a.events.drain();
        if let Some(v) = after_control.iter().find(|e| is_violation(e)) {
            failures.push(format!("{name}: control hit a violation: {v}"));
        }

        let (needle, kind) = match attack {
            Attack::Pub(subject) => {
                a.client
                    .publish(subject.clone(), "from-a".into())
                    .await
                    .unwrap();
                (subject.clone(), "publish")
            }
            Attack::Request(subject, inbox) => {
                held_subs.push((
                    format!("{name} (reply inbox)"),
                    a.client.subscribe(inbox.clone()).await.unwrap(),
                ));
                a.client
                    .publish_with_reply(subject.clone(), inbox.clone(), "{}".into())
                    .await
                    .unwrap();
                (subject.clone(), "publish")
            }
            Attack::Sub(subject) => {
                held_subs.push((
                    name.to_string(),
                    a.client.subscribe(subject.clone()).await.unwrap(),
                ));
                (subject.clone(), "subscription")
            }
            Attack::QueueSub(subject, group) => {
                held_subs.push((
                    name.to_string(),
                    a.client
                        .queue_subscribe(subject.clone(), group.clone())
                        .await
                        .unwrap(),
                ));
                (subject.clone(), "subscription")
            }
        };
        a.client.flush().await.unwrap();
        let quoted = format!("\\\"{needle}\\\"");
        match a
            .events
            .wait_for(WAIT, |e| {
                is_violation(e) && e.to_lowercase().contains(kind) && e.contains(&quoted)
            })
            .await
        {
            Some(v) => refused.push(format!("{name}: {v}")),
            None => failures.push(format!(
                "{name}: no {kind} violation observed for {needle:?}; events: {:?}",
                a.events.seen()
            )),
        }
    }

    // ---- b was busy all along, and none of it reached a.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let sent = b_traffic.await.unwrap();
    assert!(sent > 30, "b published only {sent} messages");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let seen_by_b = b_observed.load(Ordering::Relaxed);
    assert!(
        seen_by_b >= sent,
        "b's observer saw {seen_by_b} of {sent}: b's traffic must flow"
    );
    assert!(b_served.load(Ordering::Relaxed) > 5, "b's service served b");
    for (name, sub) in &mut held_subs {
        if let Err(e) = stays_empty(sub, Duration::from_millis(20)).await {
            failures.push(format!("{name}: b's data reached a: {e}"));
        }
    }
    // a's work queue holds only a's tasks, b's stream still holds b's three.
    let mut b_tasks = b_js.get_stream("TASKS").await.unwrap();
    assert_eq!(
        b_tasks.info().await.unwrap().state.messages,
        3,
        "b's tasks untouched"
    );
    assert_eq!(
        b_kv.get("secret").await.unwrap().as_deref(),
        Some(&b"b-secret"[..])
    );
    let b_violations: Vec<_> = b_events
        .drain()
        .into_iter()
        .filter(|e| is_violation(e))
        .collect();
    assert!(
        b_violations.is_empty(),
        "b hit violations: {b_violations:?}"
    );

    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(refused.len(), list.len());
    for r in &refused {
        eprintln!("refused: {r}");
    }
    eprintln!("b sent {sent}, b's observer saw {seen_by_b}");
    b_service.abort();
    a_service.abort();
    b_observer.abort();
}

// ----- limits -----------------------------------------------------------------------

#[tokio::test]
async fn tier_limits_are_enforced_by_the_server() {
    let p = platform().await;
    let url = p.server.url();
    let mut quotas = Quotas::for_tier(Tier::Free);
    quotas.max_connections = 2;
    quotas.max_payload = 1024;
    quotas.max_subscriptions = 5;
    p.cp.create_tenant_with_quotas("small", Tier::Free, quotas)
        .await
        .unwrap();
    let b1 = p.cp.issue_agent("small", "one", "default").await.unwrap();
    let b2 = p.cp.issue_agent("small", "two", "default").await.unwrap();
    let b3 = p.cp.issue_agent("small", "three", "default").await.unwrap();

    // Connections: the third is refused by the account limit.
    let (c1, mut e1) = connect(&url, &b1).await;
    let (c2, mut e2) = connect(&url, &b2).await;
    let third = try_connect(&url, &b3).await;
    let Err(err) = third else {
        panic!("a third connection past max_connections=2 must be refused");
    };
    assert!(
        err.to_string()
            .to_lowercase()
            .contains("maximum account active connections")
            || err.kind() == async_nats::ConnectErrorKind::AuthorizationViolation,
        "{err}"
    );

    // Payload: 1024 bytes pass, 1025 are refused (the server closes that
    // connection) and never delivered.
    let mut sub = c1.subscribe("tenant.small.big").await.unwrap();
    c1.publish("tenant.small.big", vec![7u8; 1024].into())
        .await
        .unwrap();
    let ok = tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ok.payload.len(), 1024);
    c2.publish("tenant.small.big", vec![7u8; 1025].into())
        .await
        .unwrap();
    let _ = c2.flush().await;
    let v = e2
        .wait_for(WAIT, |e| e.to_lowercase().contains("maximum payload"))
        .await;
    assert!(
        v.is_some(),
        "no payload violation observed: {:?}",
        e2.seen()
    );
    stays_empty(&mut sub, Duration::from_millis(200))
        .await
        .unwrap();

    // Subscriptions per connection: the sixth is refused.
    let mut subs = vec![sub];
    for i in 0..5 {
        subs.push(c1.subscribe(format!("tenant.small.s{i}")).await.unwrap());
    }
    let _ = c1.flush().await;
    let v = e1
        .wait_for(WAIT, |e| e.to_lowercase().contains("maximum subscriptions"))
        .await;
    assert!(
        v.is_some(),
        "no subscription-limit violation: {:?}",
        e1.seen()
    );
}

// ----- live tenant creation ------------------------------------------------------------

#[tokio::test]
async fn tenant_created_while_running_connects_within_1s() {
    let mut p = platform().await;
    let url = p.server.url();
    // The server is up and serving another tenant already.
    p.cp.create_tenant("early", Tier::Free).await.unwrap();
    let early = p.cp.issue_agent("early", "x", "default").await.unwrap();
    let (ec, _) = connect(&url, &early).await;
    pub_sub_round_trip(&ec, "tenant.early.>", "tenant.early.ping")
        .await
        .unwrap();
    let pid = p.server.process().pid();

    let start = Instant::now();
    p.cp.create_tenant("late", Tier::Pro).await.unwrap();
    let bundle = p.cp.issue_agent("late", "agent", "default").await.unwrap();
    let (client, _) = connect(&url, &bundle).await;
    pub_sub_round_trip(&client, "tenant.late.>", "tenant.late.hello")
        .await
        .unwrap();
    let elapsed = start.elapsed();
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    assert_eq!(p.server.process().pid(), pid, "no restart");
    // JetStream is on in the new account, with the tier's limits.
    let js = jetstream::new(client);
    let info = js.query_account().await.unwrap();
    assert_eq!(
        info.limits.max_streams,
        Some(Quotas::for_tier(Tier::Pro).js_max_streams as i64)
    );
    js.create_stream(tasks_config("late")).await.unwrap();
}

// ----- suspension, activation, revocation ---------------------------------------------

async fn wait_disconnected(events: &mut Events, limit: Duration) -> Option<String> {
    events.wait_for(limit, |e| e.contains("Disconnected")).await
}

#[tokio::test]
async fn suspension_closes_and_refuses_within_2s_and_activation_restores() {
    let p = platform().await;
    let url = p.server.url();
    p.cp.create_tenant("s", Tier::Free).await.unwrap();
    p.cp.create_tenant("other", Tier::Free).await.unwrap();
    let s1 = p.cp.issue_agent("s", "one", "default").await.unwrap();
    let s2 = p.cp.issue_agent("s", "two", "default").await.unwrap();
    let o = p.cp.issue_agent("other", "x", "default").await.unwrap();
    let (c1, mut e1) = connect(&url, &s1).await;
    let (c2, mut e2) = connect(&url, &s2).await;
    let (oc, mut oe) = connect(&url, &o).await;
    pub_sub_round_trip(&c1, "tenant.s.>", "tenant.s.a")
        .await
        .unwrap();

    let start = Instant::now();
    p.cp.suspend_tenant("s").await.unwrap();
    assert!(
        wait_disconnected(&mut e1, WAIT).await.is_some(),
        "c1 not closed: {:?}",
        e1.seen()
    );
    assert!(
        wait_disconnected(&mut e2, WAIT).await.is_some(),
        "c2 not closed: {:?}",
        e2.seen()
    );
    let refused = try_connect(&url, &s1).await;
    assert!(
        refused.is_err(),
        "a new connection of a suspended tenant must be refused"
    );
    let elapsed = start.elapsed();
    assert!(
        elapsed < Duration::from_secs(2),
        "suspension took {elapsed:?}"
    );
    // The old connections stay down (their reconnects are refused too).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_ne!(
        c1.connection_state(),
        async_nats::connection::State::Connected
    );
    assert_ne!(
        c2.connection_state(),
        async_nats::connection::State::Connected
    );
    // Other tenants are untouched.
    pub_sub_round_trip(&oc, "tenant.other.>", "tenant.other.still")
        .await
        .unwrap();
    assert!(wait_disconnected(&mut oe, Duration::from_millis(10))
        .await
        .is_none());

    // Activation: the same bundle connects again.
    let start = Instant::now();
    p.cp.activate_tenant("s").await.unwrap();
    let back = try_connect(&url, &s1)
        .await
        .expect("reconnect after activation");
    pub_sub_round_trip(&back, "tenant.s.>", "tenant.s.back")
        .await
        .unwrap();
    assert!(start.elapsed() < Duration::from_secs(2));
    // And agents issued after activation work too.
    let s3 = p.cp.issue_agent("s", "three", "default").await.unwrap();
    let (c3, _) = connect(&url, &s3).await;
    pub_sub_round_trip(&c3, "tenant.s.>", "tenant.s.new")
        .await
        .unwrap();
}

#[tokio::test]
async fn agent_revocation_is_per_agent_and_within_2s() {
    let p = platform().await;
    let url = p.server.url();
    p.cp.create_tenant("r", Tier::Free).await.unwrap();
    let bad = p.cp.issue_agent("r", "bad", "default").await.unwrap();
    let good = p.cp.issue_agent("r", "good", "default").await.unwrap();
    let (bc, mut be) = connect(&url, &bad).await;
    let (gc, mut ge) = connect(&url, &good).await;
    pub_sub_round_trip(&bc, "tenant.r.>", "tenant.r.x")
        .await
        .unwrap();

    let start = Instant::now();
    let rec = p.cp.revoke_agent("r", "bad").await.unwrap();
    assert!(rec.revoked_at.is_some());
    assert!(
        wait_disconnected(&mut be, WAIT).await.is_some(),
        "revoked agent not closed: {:?}",
        be.seen()
    );
    assert!(
        try_connect(&url, &bad).await.is_err(),
        "revoked creds must be refused"
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "revocation took {:?}",
        start.elapsed()
    );
    // The other agent of the tenant is untouched.
    pub_sub_round_trip(&gc, "tenant.r.>", "tenant.r.ok")
        .await
        .unwrap();
    assert!(wait_disconnected(&mut ge, Duration::from_millis(10))
        .await
        .is_none());
    assert!(try_connect(&url, &good).await.is_ok());
    // The agent id can be issued again, with a new user key that works.
    let again = p.cp.issue_agent("r", "bad", "default").await.unwrap();
    let (ac, _) = connect(&url, &again).await;
    pub_sub_round_trip(&ac, "tenant.r.>", "tenant.r.again")
        .await
        .unwrap();
    assert!(
        try_connect(&url, &bad).await.is_err(),
        "the old creds stay revoked"
    );
}

/// What nats-server does with each half of a suspension on its own, pushed live as
/// a hand-signed account JWT: `conn: 0` alone, and a `*` revocation alone. The
/// control plane sets both; this pins down that each is enforced by the server
/// (existing connections closed, new ones refused) within 2 s, and that pushing
/// the unsuspended account again restores the tenant.
#[tokio::test]
async fn each_suspension_mechanism_is_enforced_by_the_server() {
    use agentbus_control::{accounts, jwt};

    let p = platform().await;
    let url = p.server.url();
    // The operator seed lives in the secrets bucket, sealed under the KEK.
    let kek = p.install.kek().unwrap();
    let seed = p
        .controller
        .store()
        .secret(&kek, agentbus_control::store::secret_name::OPERATOR)
        .await
        .unwrap()
        .unwrap();
    let operator = nkeys::KeyPair::from_seed(std::str::from_utf8(&seed).unwrap().trim()).unwrap();
    let platform_account = p.install.facts().platform_account.clone();
    let sys = async_nats::ConnectOptions::with_credentials(&p.install.creds("sys.creds").unwrap())
        .unwrap()
        .connect(&url)
        .await
        .unwrap();
    let push = |jwt: String| {
        let sys = sys.clone();
        async move {
            let reply = sys
                .request("$SYS.REQ.CLAIMS.UPDATE", jwt.into())
                .await
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
            assert!(v.get("error").is_none(), "{v}");
        }
    };
    for variant in ["conn-zero", "revoke-all"] {
        let tenant = format!("v-{variant}");
        let rec =
            p.cp.create_tenant(&tenant, Tier::Free)
                .await
                .unwrap()
                .record;
        let bundle = p.cp.issue_agent(&tenant, "agent", "default").await.unwrap();
        let (c, mut e) = connect(&url, &bundle).await;
        let sub = format!("tenant.{tenant}.>");
        pub_sub_round_trip(&c, &sub, &format!("tenant.{tenant}.x"))
            .await
            .unwrap();

        // Revocations apply to user JWTs issued at or before their time: stamp it
        // now, after the agent was issued.
        let now = agentbus_control::install::now_unix();
        let mut changed = rec.clone();
        match variant {
            "conn-zero" => {
                changed
                    .settings
                    .quota_overrides
                    .insert("max_connections".into(), "0".into());
            }
            _ => {
                changed.revocations.insert(jwt::REVOKE_ALL.into(), now);
            }
        }
        let start = Instant::now();
        push(
            accounts::tenant_account_jwt(&operator, &changed, &platform_account, now + 1).unwrap(),
        )
        .await;
        assert!(
            wait_disconnected(&mut e, WAIT).await.is_some(),
            "{variant}: existing connection not closed: {:?}",
            e.seen()
        );
        assert!(
            try_connect(&url, &bundle).await.is_err(),
            "{variant}: new connection accepted"
        );
        assert!(start.elapsed() < WAIT, "{variant}: {:?}", start.elapsed());

        // Re-pushing the unsuspended account restores the tenant.
        push(accounts::tenant_account_jwt(&operator, &rec, &platform_account, now + 2).unwrap())
            .await;
        let back = try_connect(&url, &bundle).await;
        assert!(back.is_ok(), "{variant}: not restored");
    }
}
