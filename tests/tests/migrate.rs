//! `agentbus_control::migrate::copy_streams` between two real servers:
//! every message of every stream reaches the target in order, with its
//! subject, headers and payload, whatever the gaps in the source's sequences.

use std::time::Instant;

use async_nats::jetstream::{self, kv, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt as _;
use nats_harness::Server;

/// Every message of `name` on `js`, in order: (subject, payload, the
/// `X-*` headers).
async fn messages(
    js: &jetstream::Context,
    name: &str,
) -> Vec<(String, Bytes, Vec<(String, String)>)> {
    let stream = js.get_stream(name).await.unwrap();
    let last = stream.get_info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    let mut seq = 1;
    while seq <= last {
        match stream
            .raw_message_builder()
            .sequence(seq)
            .next_by_subject(">")
            .send()
            .await
        {
            Ok(m) => {
                let mut headers: Vec<(String, String)> = m
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v[0].to_string()))
                    .filter(|(k, _)| k.starts_with("X-"))
                    .collect();
                headers.sort();
                out.push((m.subject.to_string(), m.payload, headers));
                seq = m.sequence + 1;
            }
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => break,
            Err(e) => panic!("reading {name}: {e}"),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_is_copied_in_order_across_gaps_and_sparse_streams() {
    let from = Server::jetstream();
    let to = Server::jetstream();
    let from_client = from.raw_client().await;
    let from_js = jetstream::new(from_client.clone());

    // Dense with gaps: 20,000 messages, every 7th deleted, some with headers.
    let dense = from_js
        .create_stream(stream::Config {
            name: "DENSE".into(),
            subjects: vec!["dense.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut acks = Vec::new();
    for i in 0..20_000u32 {
        let mut h = HeaderMap::new();
        if i % 3 == 0 {
            h.insert("X-Index", i.to_string().as_str());
        }
        acks.push(
            from_js
                .publish_with_headers(format!("dense.{}", i % 10), h, Bytes::from(i.to_string()))
                .await
                .unwrap(),
        );
        if acks.len() >= 512 {
            for a in acks.drain(..) {
                a.await.unwrap();
            }
        }
    }
    for a in acks.drain(..) {
        a.await.unwrap();
    }
    for seq in (7..=20_000u64).step_by(7) {
        dense.delete_message(seq).await.unwrap();
    }
    // Sparse: a bucket of 50 keys each written 100 times (history 1), so
    // 50 live messages among 5,000 sequences.
    let bucket = from_js
        .create_key_value(kv::Config {
            bucket: "SPARSE".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    for round in 0..100u32 {
        for key in 0..50u32 {
            bucket
                .put(format!("k{key}"), Bytes::from(format!("{round}")))
                .await
                .unwrap();
        }
    }
    // A work queue: read without taking its messages.
    from_js
        .create_stream(stream::Config {
            name: "QUEUE".into(),
            subjects: vec!["queue.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .unwrap();
    for i in 0..500u32 {
        from_js
            .publish(format!("queue.{i}"), Bytes::from(i.to_string()))
            .await
            .unwrap()
            .await
            .unwrap();
    }

    let to_js = jetstream::new(to.raw_client().await);
    let started = Instant::now();
    let mut seen = Vec::new();
    let copies = agentbus_control::migrate::copy_streams(
        &from_client,
        &to.raw_client().await,
        1,
        &[],
        |c| seen.push(c.stream.clone()),
    )
    .await
    .unwrap();
    let took = started.elapsed();
    let total: u64 = copies.iter().map(|c| c.messages).sum();
    eprintln!(
        "copied {total} messages in {:.2} s ({:.0}/s)",
        took.as_secs_f64(),
        total as f64 / took.as_secs_f64().max(1e-9)
    );
    assert_eq!(seen, ["DENSE", "KV_SPARSE", "QUEUE"]);
    let counts: Vec<(String, u64)> = copies
        .iter()
        .map(|c| (c.stream.clone(), c.messages))
        .collect();
    let dense_live = 20_000 - 20_000 / 7;
    assert_eq!(
        counts,
        [
            ("DENSE".to_string(), dense_live),
            ("KV_SPARSE".to_string(), 50),
            ("QUEUE".to_string(), 500)
        ]
    );
    for name in ["DENSE", "KV_SPARSE", "QUEUE"] {
        let want = messages(&from_js, name).await;
        let got = messages(&to_js, name).await;
        assert_eq!(got.len(), want.len(), "{name}");
        assert!(got == want, "{name}: the copy differs from the source");
    }
    // The work queue still holds every task on the source.
    let mut queue = from_js.get_stream("QUEUE").await.unwrap();
    assert_eq!(queue.info().await.unwrap().state.messages, 500);
    // The copied bucket reads back.
    let copied = jetstream::new(to.raw_client().await)
        .get_key_value("SPARSE")
        .await
        .unwrap();
    let mut keys: Vec<String> = copied
        .keys()
        .await
        .unwrap()
        .map(|k| k.unwrap())
        .collect()
        .await;
    keys.sort();
    assert_eq!(keys.len(), 50);
    assert_eq!(
        copied.get("k7").await.unwrap(),
        Some(Bytes::from_static(b"99"))
    );
}
