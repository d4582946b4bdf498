//! Property tests (proptest, modest case counts): subject scoping, and the envelope
//! decoder and opener on arbitrary and mutated bytes.

use std::sync::Arc;

use proptest::prelude::*;
use tenant_bus::envelope::{decode_header, open, Sealer};
use tenant_bus::replay::{ReplayGuard, ReplayOptions};
use tenant_bus::subject::{namespace_prefix, scope, unscope, SubjectErrorKind};
use tenant_bus::verify::{Counters, Freshness, Verifier};
use tenant_bus::{
    AgentId, DropReason, MasterSecret, Subject, SubjectPattern, TenantId, TenantKeySet,
};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Valid tenant ids: slugs of 1 to 63 bytes.
fn tenant_id() -> impl Strategy<Value = TenantId> {
    "[a-z0-9]{1,12}(-[a-z0-9]{1,8}){0,3}".prop_map(|s| TenantId::new(&s).unwrap())
}

/// One valid subject token (printable ASCII without `.`, `*`, `>`).
fn token() -> impl Strategy<Value = String> {
    "[!-)+-\\-/-=?-~]{1,12}"
}

/// Valid concrete relative subjects.
fn valid_subject() -> impl Strategy<Value = String> {
    prop::collection::vec(token(), 1..=16)
        .prop_map(|tokens| tokens.join("."))
        .prop_filter("reserved or too long", |s| {
            let first = s.split('.').next().unwrap_or("");
            !first.starts_with('$') && !first.starts_with("_INBOX") && s.len() <= 256
        })
}

/// Arbitrary text, biased towards the characters that matter to NATS subjects.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z.*> \\t\\r\\n\\x00$_A-Z]{0,40}",
        "(tenant|\\.|[a-z]{1,3}|\\*|>|_INBOX|\\$SYS| |\u{430}|\u{ff41}){0,12}",
        prop::collection::vec(token(), 1..=20).prop_map(|t| t.join(".")),
    ]
}

fn keys_for(tenant: &TenantId) -> TenantKeySet {
    MasterSecret::from_bytes(&[42u8; 32])
        .unwrap()
        .key_set(tenant, [1, 2], 2)
        .unwrap()
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn scoping_round_trips(t in tenant_id(), s in valid_subject()) {
        let subject = Subject::new(&s).unwrap();
        let full = scope(&t, subject.as_str());
        prop_assert_eq!(unscope(&t, &full).unwrap(), subject.clone());
        prop_assert!(full.starts_with(&namespace_prefix(&t)));
        // Scoped in one tenant, the subject is outside every other tenant.
        let other = TenantId::new(&format!("{t}-x")).unwrap();
        prop_assert_eq!(
            unscope(&other, &full).unwrap_err().kind(),
            SubjectErrorKind::OutsideNamespace
        );
        // A concrete subject is a pattern that matches itself.
        prop_assert!(SubjectPattern::from(subject.clone()).matches(&subject));
    }

    #[test]
    fn no_input_escapes_the_namespace(t in tenant_id(), s in any_text()) {
        let prefix = namespace_prefix(&t);
        let tokens_of = |full: &str| full.split('.').map(str::to_string).collect::<Vec<_>>();
        if let Ok(subject) = Subject::new(&s) {
            let full = scope(&t, subject.as_str());
            prop_assert!(full.starts_with(&prefix), "{full:?}");
            let tokens = tokens_of(&full);
            prop_assert_eq!(tokens[0].as_str(), "tenant");
            prop_assert_eq!(tokens[1].as_str(), t.as_str());
            prop_assert_eq!(tokens.len(), 2 + s.split('.').count());
            prop_assert!(tokens.iter().all(|tok| !tok.is_empty()
                && tok.bytes().all(|b| (0x21..=0x7e).contains(&b))
                && tok != "*" && tok != ">"));
            prop_assert!(!tokens[2].starts_with('$') && !tokens[2].starts_with("_INBOX"));
            let back = unscope(&t, &full).unwrap();
            prop_assert_eq!(back.as_str(), s.as_str());
        }
        if let Ok(pattern) = SubjectPattern::new(&s) {
            let full = scope(&t, pattern.as_str());
            prop_assert!(full.starts_with(&prefix), "{full:?}");
            let tokens = tokens_of(&full);
            prop_assert_eq!(tokens[1].as_str(), t.as_str());
            // Wildcards only after the tenant's id, whole tokens, `>` last.
            prop_assert!(tokens.iter().all(|tok| !tok.is_empty()
                && (tok == "*" || tok == ">" || !tok.contains(['*', '>']))));
            prop_assert!(tokens[..tokens.len() - 1].iter().all(|tok| tok != ">"));
        }
        // Nothing that is not a slug names a tenant.
        if let Ok(id) = TenantId::new(&s) {
            prop_assert!(!id.as_str().contains(['.', '*', '>', ' ']));
            prop_assert!(id.as_str().bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        }
    }

    #[test]
    fn decoder_and_open_never_panic_on_arbitrary_bytes(
        body in prop::collection::vec(any::<u8>(), 0..400),
        subject in any_text(),
    ) {
        let t = TenantId::new("acme").unwrap();
        let keys = keys_for(&t);
        let _ = decode_header(&body);
        let _ = open(&keys, &subject, None, &body);
        let _ = open(&keys, "tenant.acme.x", Some(&subject), &body);
        // Random bytes never open.
        prop_assert!(open(&keys, "tenant.acme.x", None, &body).is_err());
    }
}

/// A valid envelope for `tenant.acme.orders.created` plus what sealed it.
fn sealed(payload: &[u8], reply: Option<&str>) -> (TenantKeySet, Vec<u8>) {
    let t = TenantId::new("acme").unwrap();
    let keys = keys_for(&t);
    let sealer = Sealer::new(
        Arc::new(keys.clone()),
        Some(AgentId::new("planner").unwrap()),
    )
    .unwrap();
    let (_, body) = sealer
        .seal("tenant.acme.orders.created", reply, payload)
        .unwrap();
    (keys, body.to_vec())
}

#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Xor(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
    Remove(usize),
    Append(Vec<u8>),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        (any::<usize>(), 1..=255u8).prop_map(|(i, b)| Edit::Xor(i, b)),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Remove),
        prop::collection::vec(any::<u8>(), 1..20).prop_map(Edit::Append),
    ]
}

fn apply(body: &mut Vec<u8>, e: &Edit) {
    let n = body.len();
    match e {
        Edit::Set(i, b) if n > 0 => body[i % n] = *b,
        Edit::Xor(i, b) if n > 0 => body[i % n] ^= *b,
        Edit::Truncate(i) => body.truncate(i % (n + 1)),
        Edit::Insert(i, b) => body.insert(i % (n + 1), *b),
        Edit::Remove(i) if n > 0 => {
            body.remove(i % n);
        }
        Edit::Append(bytes) => body.extend_from_slice(bytes),
        _ => {}
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn mutated_envelopes_never_panic_and_never_open_altered(
        payload in prop::collection::vec(any::<u8>(), 0..64),
        edits in prop::collection::vec(edit(), 1..6),
        with_reply in any::<bool>(),
    ) {
        let reply = with_reply.then_some("tenant.acme._INBOX.abc.1");
        let (keys, original) = sealed(&payload, reply);
        let mut body = original.clone();
        for e in &edits {
            apply(&mut body, e);
        }
        let _ = decode_header(&body);
        let opened = open(&keys, "tenant.acme.orders.created", reply, &body);
        if body == original {
            prop_assert_eq!(&opened.unwrap().1[..], &payload[..]);
        } else {
            prop_assert!(opened.is_err(), "an altered envelope opened: {:?}", edits);
        }
        // The verifier agrees, and never panics either.
        let verifier = Verifier::new(Arc::new(keys), Freshness::default(), Arc::new(Counters::default()));
        let mut guard = ReplayGuard::new(ReplayOptions { retain_ms: 1_000, max_senders: 4 });
        let verified = verifier.verify(
            &mut guard,
            "tenant.acme.orders.created",
            reply,
            &body,
            tenant_bus::envelope::now_ms(),
            None,
        );
        prop_assert_eq!(verified.is_ok(), body == original);
    }

    #[test]
    fn any_single_byte_change_never_opens(
        payload in prop::collection::vec(any::<u8>(), 0..64),
        index in any::<usize>(),
        xor in 1..=255u8,
        with_reply in any::<bool>(),
    ) {
        let reply = with_reply.then_some("tenant.acme._INBOX.abc.1");
        let (keys, mut body) = sealed(&payload, reply);
        let i = index % body.len();
        body[i] ^= xor;
        let err = open(&keys, "tenant.acme.orders.created", reply, &body).unwrap_err();
        // Which check refuses it depends on the byte, but it is one of these.
        prop_assert!(matches!(
            err,
            DropReason::Malformed
                | DropReason::UnsupportedVersion
                | DropReason::WrongTenant
                | DropReason::UnknownKey
                | DropReason::Authentication
        ), "byte {} xor {:#x}: {:?}", i, xor, err);
        if i == 0 {
            prop_assert_eq!(err, DropReason::UnsupportedVersion);
        }
        if i >= decode_header(&body).map(|h| h.header_len).unwrap_or(usize::MAX) {
            // Ciphertext and tag bytes: only the tag check can notice.
            prop_assert_eq!(err, DropReason::Authentication);
        }
    }
}

#[test]
fn every_single_byte_change_of_one_envelope_never_opens() {
    // Exhaustive over positions and a few bit patterns, complementing the property.
    let (keys, body) = sealed(b"hello", Some("tenant.acme._INBOX.abc.1"));
    let header_len = decode_header(&body).unwrap().header_len;
    for i in 0..body.len() {
        for xor in [0x01u8, 0x80, 0xff] {
            let mut b = body.clone();
            b[i] ^= xor;
            let err = open(
                &keys,
                "tenant.acme.orders.created",
                Some("tenant.acme._INBOX.abc.1"),
                &b,
            )
            .unwrap_err();
            let expected = match i {
                0 => Some(DropReason::UnsupportedVersion),
                1 => Some(DropReason::Malformed),
                // Key version: 1 becomes a version the set does not hold.
                2..=5 => Some(DropReason::UnknownKey),
                // Message id, timestamp, nonce: only the tag notices.
                6..=41 => Some(DropReason::Authentication),
                i if i >= header_len => Some(DropReason::Authentication),
                _ => None,
            };
            if let Some(expected) = expected {
                assert_eq!(err, expected, "byte {i} xor {xor:#x}");
            }
        }
    }
    // The original opens; with any other subject or reply it does not.
    assert!(open(
        &keys,
        "tenant.acme.orders.created",
        Some("tenant.acme._INBOX.abc.1"),
        &body
    )
    .is_ok());
    assert!(open(&keys, "tenant.acme.orders.created", None, &body).is_err());
    assert!(open(
        &keys,
        "tenant.acme.orders.createD",
        Some("tenant.acme._INBOX.abc.1"),
        &body
    )
    .is_err());
}
