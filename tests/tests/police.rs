//! Policing against a raw client: a tenant publishing far above its rate with
//! plain async-nats (no library, no scheduler) is cut by the controller from the
//! servers' own counters within two polls, and cannot come back during its
//! backoff; a tenant within its rate, at the same time, is never touched.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbus_control::tiers::Tier;
use nats_harness::platform;

const POLL: Duration = Duration::from_millis(500);

async fn creds(p: &nats_harness::Platform, tenant: &str, agent: &str) -> String {
    let issued = p.cp.create_agent(tenant, agent, "default").await.unwrap();
    issued.bundle.creds.unwrap()
}

/// A raw client whose disconnects are flagged.
async fn watched(url: &str, creds: &str, flag: Arc<AtomicBool>) -> async_nats::Client {
    async_nats::ConnectOptions::with_credentials(creds)
        .unwrap()
        .event_callback(move |e| {
            let flag = flag.clone();
            async move {
                if matches!(e, async_nats::Event::Disconnected) {
                    flag.store(true, Ordering::SeqCst);
                }
            }
        })
        .connect(url)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_flood_is_cut_within_two_polls_and_a_calm_neighbour_is_not() {
    let p = platform().await;
    p.shutdown.fire();
    let url = p.server.url();
    let controller = agentbus_control::Controller::connect(
        &p.install,
        agentbus_control::ControllerConfig::new(&url).police_every(POLL),
    )
    .await
    .unwrap();
    let shutdown = agentbus_control::controller::shutdown::Shutdown::new();
    tokio::spawn(controller.clone().serve(shutdown.clone()));

    // Both free tier: 1,000 messages per second.
    p.cp.create_tenant("flood", Tier::Free).await.unwrap();
    p.cp.create_tenant("calm", Tier::Free).await.unwrap();
    let flood_creds = creds(&p, "flood", "raw").await;
    let calm_creds = creds(&p, "calm", "raw").await;
    let flood_cut = Arc::new(AtomicBool::new(false));
    let calm_cut = Arc::new(AtomicBool::new(false));
    let flood = watched(&url, &flood_creds, flood_cut.clone()).await;
    let calm = watched(&url, &calm_creds, calm_cut.clone()).await;

    // The neighbour: 300 messages per second for the whole test.
    let calm_sent = Arc::new(AtomicU64::new(0));
    let neighbour = tokio::spawn({
        let (calm, sent) = (calm.clone(), calm_sent.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            for _ in 0..600 {
                tick.tick().await;
                for _ in 0..3 {
                    let _ = calm.publish("tenant.calm.x", "ok".into()).await;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });

    // The flood: 20 times the cap (20,000 messages per second) from its own
    // thread and runtime, so it competes with the controller only for the CPU
    // as a remote client would, for at most 10 s.
    let started = Instant::now();
    let flood_started_ms = tenant_bus::envelope::now_ms();
    let flooder = std::thread::spawn({
        let (flood, cut) = (flood.clone(), flood_cut.clone());
        move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut sent = 0u64;
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                while !cut.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(10) {
                    tick.tick().await;
                    for _ in 0..200 {
                        let _ = flood.publish("tenant.flood.x", vec![0u8; 64].into()).await;
                    }
                    sent += 200;
                }
                sent
            })
        }
    });
    let sent = tokio::task::spawn_blocking(move || flooder.join().unwrap())
        .await
        .unwrap();
    let cut_after = started.elapsed();
    eprintln!("flood of {sent} messages cut after {cut_after:?}");
    assert!(flood_cut.load(Ordering::SeqCst), "the flood was never cut");
    // Two polls (detection) plus 2 s to cut, as the README states, plus one
    // poll of scheduling slack on a loaded 2-core machine.
    assert!(
        cut_after < 3 * POLL + Duration::from_secs(2),
        "{cut_after:?}"
    );

    // During the backoff the same credentials are refused.
    let again = async_nats::ConnectOptions::with_credentials(&flood_creds)
        .unwrap()
        .max_reconnects(Some(0))
        .connect(&url)
        .await;
    assert!(again.is_err(), "reconnected during the backoff");

    // The neighbour kept going and was never cut.
    neighbour.await.unwrap();
    assert!(
        !calm_cut.load(Ordering::SeqCst),
        "a tenant within its rate was cut"
    );
    assert!(calm_sent.load(Ordering::Relaxed) >= 1_800);

    // The throttle is in the audit log; after the backoff (5 s) the flooding
    // tenant's credentials work again.
    let (events, _) = agentbus_control::audit::fetch_events(&p.cp, "flood")
        .await
        .unwrap();
    let throttle = events
        .iter()
        .find(|e| e.action == "policing.throttle")
        .expect("a policing.throttle audit event");
    eprintln!(
        "throttle recorded {} ms after the flood started: {}",
        throttle.time_ms.saturating_sub(flood_started_ms),
        throttle.reason
    );
    let back = nats_harness::eventually(Duration::from_secs(15), || {
        let (url, c) = (url.clone(), flood_creds.clone());
        async move {
            async_nats::ConnectOptions::with_credentials(&c)
                .ok()?
                .max_reconnects(Some(0))
                .connect(&url)
                .await
                .ok()
        }
    })
    .await;
    assert!(back.is_some(), "the backoff never ended");
    shutdown.fire();
}
