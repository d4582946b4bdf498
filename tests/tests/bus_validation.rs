//! Validation of tenant ids, agent ids, subjects and patterns, each rejection
//! asserted on its error kind; and bad input to the namespace API returns a typed
//! error and sends nothing.

mod bus_common;

use bus_common::*;
use nats_harness::Server;
use tenant_bus::ids::IdErrorKind;
use tenant_bus::subject::{scope, SubjectErrorKind};
use tenant_bus::{
    AgentId, MasterSecret, PublishErrorKind, RequestErrorKind, Subject, SubjectPattern,
    SubscribeErrorKind, TenantId,
};

fn bad_ids() -> Vec<(String, IdErrorKind)> {
    use IdErrorKind::*;
    let fixed: &[(&str, IdErrorKind)] = &[
        ("", Empty),
        ("a.b", InvalidChar),
        ("*", InvalidChar),
        (">", InvalidChar),
        ("a b", InvalidChar),
        ("A", InvalidChar),
        ("Acme", InvalidChar),
        ("acmE", InvalidChar),
        ("-a", LeadingHyphen),
        ("a-", TrailingHyphen),
        ("-", LeadingHyphen),
        ("--", LeadingHyphen),
        ("-a-b", LeadingHyphen),
        ("a-b-", TrailingHyphen),
        ("a--b", DoubleHyphen),
        ("a---b", DoubleHyphen),
        ("\u{430}cme", InvalidChar),       // Cyrillic a
        ("\u{441}\u{43e}m", InvalidChar),  // Cyrillic s, o
        ("\u{ff41}cme", InvalidChar),      // fullwidth a
        ("\u{ff11}\u{ff12}", InvalidChar), // fullwidth digits
        ("\u{391}\u{392}", InvalidChar),   // Greek capitals
        ("a\u{2010}b", InvalidChar),       // Unicode hyphen
        ("a\u{2212}b", InvalidChar),       // minus sign
        ("a\u{200b}b", InvalidChar),       // zero-width space
        ("a\u{a0}b", InvalidChar),         // no-break space
        ("\u{feff}acme", InvalidChar),     // byte-order mark
        ("acme\u{301}", InvalidChar),      // combining accent
        ("\u{e9}", InvalidChar),
        ("\u{df}", InvalidChar),
        ("acme\r\n", InvalidChar),
        ("\r\nacme", InvalidChar),
        ("a\nb", InvalidChar),
        ("ac\0me", InvalidChar),
        ("\0", InvalidChar),
        ("a\x7f", InvalidChar),
        ("a\x1b[31m", InvalidChar),
        ("$SYS", InvalidChar),
        ("$sys", InvalidChar),
        ("_INBOX", InvalidChar),
        ("_inbox", InvalidChar),
        ("a\tb", InvalidChar),
        ("\t", InvalidChar),
        (" ", InvalidChar),
        (" a", InvalidChar),
        ("a ", InvalidChar),
        ("a..b", InvalidChar),
        (".a", InvalidChar),
        ("a.", InvalidChar),
        (".", InvalidChar),
        ("tenant.b", InvalidChar),
        ("a*", InvalidChar),
        ("a>", InvalidChar),
        ("a_b", InvalidChar),
        ("a:b", InvalidChar),
        ("a/b", InvalidChar),
        ("a\\b", InvalidChar),
        ("../etc", InvalidChar),
        ("a@b", InvalidChar),
        ("a=b", InvalidChar),
        ("a,b", InvalidChar),
        ("a;b", InvalidChar),
        ("a%2eb", InvalidChar),
        ("'a'", InvalidChar),
        ("\"a\"", InvalidChar),
        ("a+b", InvalidChar),
        ("a~b", InvalidChar),
    ];
    let mut v: Vec<(String, IdErrorKind)> =
        fixed.iter().map(|(s, k)| (s.to_string(), *k)).collect();
    v.push(("x".repeat(64), TooLong));
    v.push(("x".repeat(1000), TooLong));
    v.push((format!("{}-", "a".repeat(63)), TooLong));
    // 32 characters, 64 bytes: the limit is in bytes.
    v.push(("\u{e9}".repeat(32), TooLong));
    v
}

#[test]
fn bad_tenant_and_agent_ids_are_rejected_with_their_kind() {
    let cases = bad_ids();
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    for (s, kind) in &cases {
        let t = TenantId::new(s);
        assert_eq!(t.as_ref().err().map(|e| e.kind()), Some(*kind), "{s:?}");
        let a = AgentId::new(s);
        assert_eq!(a.as_ref().err().map(|e| e.kind()), Some(*kind), "{s:?}");
        assert_eq!(
            s.parse::<TenantId>().err().map(|e| e.kind()),
            Some(*kind),
            "{s:?}"
        );
        // serde goes through the same validation.
        let json = serde_json::to_string(s).unwrap();
        assert!(serde_json::from_str::<TenantId>(&json).is_err(), "{s:?}");
        assert!(serde_json::from_str::<AgentId>(&json).is_err(), "{s:?}");
        // The error text does not echo raw control characters.
        let text = t.err().unwrap().to_string();
        assert!(!text.contains(['\r', '\n', '\0', '\x1b']), "{text:?}");
    }
}

#[test]
fn good_ids_are_accepted() {
    for s in [
        "a",
        "0",
        "acme",
        "acme-2",
        "a1-b2-c3",
        "x-y-z",
        &"x".repeat(63),
    ] {
        assert_eq!(TenantId::new(s).unwrap().as_str(), s);
        assert_eq!(AgentId::new(s).unwrap().as_str(), s);
    }
}

fn bad_subjects() -> Vec<(String, SubjectErrorKind)> {
    use SubjectErrorKind::*;
    let fixed: &[(&str, SubjectErrorKind)] = &[
        ("", Empty),
        ("*", Wildcard),
        (">", Wildcard),
        ("a.*", Wildcard),
        ("*.a", Wildcard),
        ("a.>", Wildcard),
        ("a.>.b", Wildcard),
        ("a*", Wildcard),
        ("*a", Wildcard),
        ("a>b", Wildcard),
        ("a.b*", Wildcard),
        ("a b", InvalidChar),
        (" a", InvalidChar),
        ("a ", InvalidChar),
        (" ", InvalidChar),
        ("a\tb", InvalidChar),
        ("\t", InvalidChar),
        ("a\r\nb", InvalidChar),
        ("orders\r\nPUB x 1", InvalidChar),
        ("a\nb", InvalidChar),
        ("a\0b", InvalidChar),
        ("\0", InvalidChar),
        ("a\x7f", InvalidChar),
        ("a.b c", InvalidChar),
        ("a. b", InvalidChar),
        ("\u{43e}rders", InvalidChar),         // Cyrillic o
        ("orders.cre\u{430}ted", InvalidChar), // Cyrillic a
        ("\u{ff4f}rders", InvalidChar),        // fullwidth o
        ("a\u{ff0e}b", InvalidChar),           // fullwidth full stop
        ("a\u{2024}b", InvalidChar),           // one dot leader
        ("a\u{200b}", InvalidChar),            // zero-width space
        ("caf\u{e9}", InvalidChar),
        ("a..b", EmptyToken),
        (".a", EmptyToken),
        ("a.", EmptyToken),
        (".", EmptyToken),
        ("..", EmptyToken),
        ("a.b.", EmptyToken),
        ("$SYS", Reserved),
        ("$SYS.REQ.SERVER.PING", Reserved),
        ("$JS.API.STREAM.LIST", Reserved),
        ("$KV.bucket.key", Reserved),
        ("$", Reserved),
        ("_INBOX", Reserved),
        ("_INBOX.x", Reserved),
        ("_INBOX.abc.1", Reserved),
        ("_INBOXES", Reserved),
    ];
    let mut v: Vec<(String, SubjectErrorKind)> =
        fixed.iter().map(|(s, k)| (s.to_string(), *k)).collect();
    v.push(("a".repeat(257), TooLong));
    v.push((format!("{}.b", "a".repeat(255)), TooLong));
    v.push(("a.".repeat(200) + "a", TooLong));
    v.push((vec!["a"; 17].join("."), TooManyTokens));
    v.push((vec!["tok"; 40].join("."), TooManyTokens));
    v
}

#[test]
fn bad_subjects_are_rejected_with_their_kind() {
    let cases = bad_subjects();
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    for (s, kind) in &cases {
        let e = Subject::new(s).err().map(|e| e.kind());
        assert_eq!(e, Some(*kind), "{s:?}");
        assert_eq!(
            s.parse::<Subject>().err().map(|e| e.kind()),
            Some(*kind),
            "{s:?}"
        );
        // Text through TryFrom<String> as well.
        assert!(Subject::try_from(s.clone()).is_err(), "{s:?}");
    }
}

#[test]
fn bad_patterns_are_rejected_with_their_kind() {
    use SubjectErrorKind::*;
    let mut cases: Vec<(String, SubjectErrorKind)> = [
        ("", Empty),
        ("a.>.b", TailWildcardNotLast),
        (">.a", TailWildcardNotLast),
        (">.>", TailWildcardNotLast),
        ("a*", Wildcard),
        ("*a", Wildcard),
        ("a.b>", Wildcard),
        ("a.**", Wildcard),
        ("a.>>", Wildcard),
        ("$SYS.>", Reserved),
        ("$JS.*", Reserved),
        ("_INBOX.>", Reserved),
        ("_INBOX.*.*", Reserved),
        ("a..>", EmptyToken),
        (".>", EmptyToken),
        ("*.", EmptyToken),
        ("a. >", InvalidChar),
        ("\u{ff1e}", InvalidChar), // fullwidth >
        ("a\r\n>", InvalidChar),
    ]
    .iter()
    .map(|(s, k)| (s.to_string(), *k))
    .collect();
    cases.push((vec!["*"; 17].join("."), TooManyTokens));
    cases.push((format!("{}.>", "a".repeat(255)), TooLong));
    for (s, kind) in &cases {
        let e = SubjectPattern::new(s).err().map(|e| e.kind());
        assert_eq!(e, Some(*kind), "{s:?}");
    }
    // Everything that is a bad subject for a reason other than wildcards is a bad
    // pattern for the same reason.
    for (s, kind) in bad_subjects() {
        if kind != Wildcard {
            assert_eq!(
                SubjectPattern::new(&s).err().map(|e| e.kind()),
                Some(kind),
                "{s:?}"
            );
        }
    }
}

#[test]
fn good_subjects_and_patterns_are_accepted_and_scoped() {
    let t = tenant("acme");
    for s in [
        "a",
        "orders.created",
        "Orders.CREATED",
        "a-b_c~d!e",
        "x._INBOX",
        "x.$SYS",
        "tenant.other.x",
        &"a".repeat(256),
        &vec!["a"; 16].join("."),
    ] {
        let subj = Subject::new(s).unwrap();
        assert_eq!(scope(&t, subj.as_str()), format!("tenant.acme.{s}"));
    }
    for p in [
        ">",
        "*",
        "a.*",
        "a.>",
        "*.*.>",
        "a.*.c",
        &vec!["*"; 16].join("."),
    ] {
        let pat = SubjectPattern::new(p).unwrap();
        assert_eq!(scope(&t, pat.as_str()), format!("tenant.acme.{p}"));
    }
}

#[tokio::test]
async fn bad_input_to_the_namespace_api_returns_typed_errors_and_sends_nothing() {
    let server = Server::new();
    let master = MasterSecret::generate().unwrap();
    let mut spy = Spy::start(&server).await;
    let ns = connect(&server, &master, "acme", "agent").await;
    spy.sync().await;

    let subjects = bad_subjects();
    for (s, _) in &subjects {
        let e = ns.publish(s.as_str(), b"payload").await.unwrap_err();
        assert_eq!(e.kind(), PublishErrorKind::InvalidSubject, "{s:?}");
        let e = ns.publish_json(s.as_str(), &1).await.unwrap_err();
        assert_eq!(e.kind(), PublishErrorKind::InvalidSubject, "{s:?}");
        let e = ns.request(s.as_str(), b"payload").await.unwrap_err();
        assert_eq!(e.kind(), RequestErrorKind::InvalidSubject, "{s:?}");
        let e = ns.request_json::<_, u32>(s.as_str(), &1).await.unwrap_err();
        assert_eq!(e.kind(), RequestErrorKind::InvalidSubject, "{s:?}");
        assert!(ns.full_subject(s.as_str()).is_err(), "{s:?}");
    }
    let bad_patterns = ["", "a.>.b", "a*", "$SYS.>", "_INBOX.>", "a b", "a..b", ".>"];
    for p in bad_patterns {
        let e = ns.subscribe(p).await.unwrap_err();
        assert_eq!(e.kind(), SubscribeErrorKind::InvalidSubject, "{p:?}");
        let e = ns.queue_subscribe(p, "workers").await.unwrap_err();
        assert_eq!(e.kind(), SubscribeErrorKind::InvalidSubject, "{p:?}");
    }
    let long_queue = "q".repeat(65);
    let bad_queues = [
        "",
        "a.b",
        "*",
        ">",
        "a*",
        "a b",
        "a\tb",
        "a\r\n",
        "\0",
        "caf\u{e9}",
        "\u{ff51}",
        long_queue.as_str(),
    ];
    for q in bad_queues {
        let e = ns.queue_subscribe("jobs.*", q).await.unwrap_err();
        assert_eq!(e.kind(), SubscribeErrorKind::InvalidQueue, "{q:?}");
    }
    // Nothing above reached the server: the first message the spy sees from this
    // point is the marker published after all of it, on the same connection.
    let marker = ns.publish("zz-marker", b"marker").await.unwrap();
    let seen = spy.next().await;
    assert_eq!(seen.subject.as_str(), "tenant.acme.zz-marker");
    let opened = tenant_bus::envelope::open(&ns.keys(), &seen.subject, None, &seen.payload)
        .unwrap()
        .0;
    assert_eq!(opened.msg_id, marker);
    let rest = spy.sync().await;
    assert!(rest.is_empty(), "unexpected traffic: {rest:?}");
    assert_eq!(ns.counters().snapshot().rejected_by_admission, 0);

    // The limits are inclusive: a queue name of 64 bytes is fine.
    let mut q = ns.queue_subscribe("jobs.*", &"q".repeat(64)).await.unwrap();
    echo_barrier(&ns, &mut q, "jobs.probe").await;
}

/// Freshness options out of range are a typed error when connecting. Before,
/// `replay_window(Duration::MAX)` connected and the first subscription panicked
/// (Duration overflow in the anti-replay retention), and a window of 2^64 ms or
/// more was silently truncated.
#[tokio::test]
async fn freshness_options_out_of_range_are_refused_on_connect() {
    use std::time::Duration;
    use tenant_bus::verify::{FreshnessErrorKind, MAX_CLOCK_SKEW, MAX_REPLAY_WINDOW};
    use tenant_bus::{ConnectErrorKind, NamespaceOptions};

    let server = Server::new();
    let master = MasterSecret::generate().unwrap();
    let b = bundle(&server, keys(&master, "acme"), "agent");
    let cases = [
        (
            NamespaceOptions::new().replay_window(Duration::MAX),
            FreshnessErrorKind::ReplayWindow,
        ),
        (
            NamespaceOptions::new().replay_window(Duration::from_millis(u64::MAX)),
            FreshnessErrorKind::ReplayWindow,
        ),
        (
            NamespaceOptions::new().replay_window(MAX_REPLAY_WINDOW + Duration::from_millis(1)),
            FreshnessErrorKind::ReplayWindow,
        ),
        (
            NamespaceOptions::new().replay_window(Duration::ZERO),
            FreshnessErrorKind::ReplayWindow,
        ),
        (
            NamespaceOptions::new().clock_skew(Duration::MAX),
            FreshnessErrorKind::ClockSkew,
        ),
        (
            NamespaceOptions::new().clock_skew(MAX_CLOCK_SKEW + Duration::from_secs(1)),
            FreshnessErrorKind::ClockSkew,
        ),
    ];
    for (options, want) in cases {
        assert_eq!(options.freshness().unwrap_err().kind(), want);
        let e = options.connect(&b).await.unwrap_err();
        assert_eq!(e.kind(), ConnectErrorKind::InvalidOptions, "{e}");
        let source = std::error::Error::source(&e).unwrap().to_string();
        assert!(source.contains("out of range"), "{source}");
    }
    // The documented maxima themselves work end to end.
    let ns = NamespaceOptions::new()
        .replay_window(MAX_REPLAY_WINDOW)
        .clock_skew(MAX_CLOCK_SKEW)
        .connect(&b)
        .await
        .unwrap();
    let mut sub = ns.subscribe("jobs.>").await.unwrap();
    echo_barrier(&ns, &mut sub, "jobs.probe").await;
}

/// `nats://user:password@host` logs in as that user (async-nats parses a
/// URL's user and password but does not send them); a wrong password is an
/// authorization error, not a connection failure.
#[tokio::test]
async fn a_user_and_password_in_the_url_log_in() {
    use tenant_bus::{namespace::ConnectErrorKind, CredentialBundle, TenantNamespace};
    let server = Server::with_config(
        "authorization { users = [ { user: \"agent\", password: \"right\" } ] }\n",
    );
    let master = MasterSecret::generate().unwrap();
    let t = TenantId::new("acme").unwrap();
    let bundle = |password: &str| CredentialBundle {
        url: server
            .url()
            .replacen("nats://", &format!("nats://agent:{password}@"), 1),
        tenant: t.clone(),
        agent: AgentId::new("planner").unwrap(),
        creds: None,
        keys: master.key_set(&t, [1], 1).unwrap(),
        placement: Default::default(),
    };
    let ns = TenantNamespace::connect(&bundle("right")).await.unwrap();
    ns.nats().flush().await.unwrap();
    let wrong = TenantNamespace::connect(&bundle("wrong")).await.err();
    assert_eq!(
        wrong.map(|e| e.kind()),
        Some(ConnectErrorKind::Authorization)
    );
}
