"""Ids, subjects, key sets, bundles and the replay guard: the same rules and
cases as the Rust unit tests."""

import json

import pytest

import tenantbus as tb
from tenantbus.subject import is_tenant_inbox, pattern_matches

I = tb.IdErrorKind
S = tb.SubjectErrorKind


def test_ids_accept_slugs_and_name_the_broken_rule() -> None:
    for ok in ["a", "acme", "acme-corp", "a1-b2-c3", "0", "x" * 63]:
        assert tb.validate_tenant_id(ok) == ok
    for bad, kind in [("", I.EMPTY), ("x" * 64, I.TOO_LONG), ("A", I.INVALID_CHAR), ("a.b", I.INVALID_CHAR),
                      ("-a", I.LEADING_HYPHEN), ("a-", I.TRAILING_HYPHEN), ("a--b", I.DOUBLE_HYPHEN),
                      ("é", I.INVALID_CHAR), ("a b", I.INVALID_CHAR)]:
        with pytest.raises(tb.IdError) as e:
            tb.validate_agent_id(bad)
        assert e.value.kind is kind, bad


@pytest.mark.parametrize("s,kind", [
    ("", S.EMPTY), ("a" * 257, S.TOO_LONG), (".".join("a" * 17), S.TOO_MANY_TOKENS),
    ("a..b", S.EMPTY_TOKEN), (".a", S.EMPTY_TOKEN), ("a.", S.EMPTY_TOKEN), ("a b", S.INVALID_CHAR),
    ("a\tb", S.INVALID_CHAR), ("caf\u00e9", S.INVALID_CHAR), ("a.*", S.WILDCARD), ("a.>", S.WILDCARD),
    ("a*", S.WILDCARD), ("$SYS.x", S.RESERVED), ("_INBOX.x", S.RESERVED), ("_INBOXES", S.RESERVED),
])
def test_subject_rules(s, kind) -> None:
    with pytest.raises(tb.SubjectError) as e:
        tb.validate_subject(s)
    assert e.value.kind is kind


def test_pattern_rules_and_matching() -> None:
    for ok in ["a.*.c", "a.>", ">", "*", "orders.created"]:
        tb.validate_pattern(ok)
    for bad, kind in [("a.>.c", S.TAIL_WILDCARD_NOT_LAST), ("a*", S.WILDCARD), ("$JS.>", S.RESERVED)]:
        with pytest.raises(tb.SubjectError) as e:
            tb.validate_pattern(bad)
        assert e.value.kind is kind
    assert pattern_matches("a.*.c", "a.b.c") and not pattern_matches("a.*.c", "a.b.c.d")
    assert pattern_matches("a.>", "a.b.c") and not pattern_matches("a.>", "a")


def test_scope_unscope_and_inboxes() -> None:
    full = tb.scope("acme", "orders.created")
    assert full == "tenant.acme.orders.created"
    assert tb.unscope("acme", full) == "orders.created"
    for tenant, f in [("acme-2", full), ("acme", "tenant.acmex.orders")]:
        with pytest.raises(tb.SubjectError) as e:
            tb.unscope(tenant, f)
        assert e.value.kind is S.OUTSIDE_NAMESPACE
    assert tb.inbox_prefix("acme") == "tenant.acme._INBOX"
    assert is_tenant_inbox("acme", "tenant.acme._INBOX.abc.1")
    for no in ["tenant.acme._INBOX", "tenant.acme._INBOX.", "tenant.other._INBOX.abc", "_INBOX.abc",
               "tenant.acme._INBOX.a.*"]:
        assert not is_tenant_inbox("acme", no)


def test_key_sets_json_rotation_and_redaction() -> None:
    m = bytes(range(7, 39))
    ks = tb.TenantKeySet.from_master(m, "acme", [1, 2], 2)
    back = tb.TenantKeySet.from_json(ks.to_json())
    assert back.current == 2 and back.versions() == (1, 2)
    assert back.get(1).key_bytes == ks.get(1).key_bytes
    assert "key_bytes" not in repr(ks) and ks.to_dict()["keys"][0]["key"] not in repr(ks)
    assert tb.derive_key(m, "acme", 1) != tb.derive_key(m, "acme", 2) != tb.derive_key(m, "acmf", 1)
    with pytest.raises(tb.KeySetError) as e:
        tb.TenantKeySet.from_master(m, "acme", [1], 2)
    assert e.value.kind is tb.KeySetErrorKind.INVALID_KEY_SET
    with pytest.raises(tb.KeySetError) as e:
        ks.without(2)
    assert e.value.kind is tb.KeySetErrorKind.INVALID_KEY_SET
    with pytest.raises(tb.KeySetError) as e:
        ks.without(9)
    assert e.value.kind is tb.KeySetErrorKind.UNKNOWN_VERSION
    assert ks.without(1).get(1) is None
    rotated = ks.with_key(tb.TenantKey(3, tb.derive_key(m, "acme", 3)))
    assert rotated.current == 3 and rotated.versions() == (1, 2, 3)
    with pytest.raises(tb.KeySetError):
        tb.derive_key(m[:31], "acme", 1)
    for bad in ['{"tenant":"acme","current":1,"keys":[{"version":1,"key":"AAAA"}]}',
                '{"tenant":"acme","current":1,"keys":[{"version":1,"key":"!!"}]}',
                '{"tenant":"Bad","current":1,"keys":[]}', '{', '[]']:
        with pytest.raises(tb.KeySetError):
            tb.TenantKeySet.from_json(bad)


def test_bundles_parse_check_and_redact() -> None:
    ks = tb.TenantKeySet.from_master(bytes(32), "acme", [1], 1)
    d = {"url": "nats://a:1, nats://b:2", "tenant": "acme", "agent": "planner",
         "creds": "-----BEGIN NATS USER JWT-----\nsecret", "keys": ks.to_dict()}
    b = tb.CredentialBundle.from_json(json.dumps(d))
    assert b.servers == ["nats://a:1", "nats://b:2"]
    assert "secret" not in repr(b)
    assert tb.CredentialBundle.from_dict(b.to_dict()).to_dict() == b.to_dict()
    bad = dict(d, keys=tb.TenantKeySet.from_master(bytes(32), "other", [1], 1).to_dict())
    with pytest.raises(tb.BundleError) as e:
        tb.CredentialBundle.from_dict(bad)
    assert e.value.kind is tb.BundleErrorKind.TENANT_MISMATCH
    for broken in ["{", "{}", json.dumps(dict(d, agent="Bad Agent"))]:
        with pytest.raises(tb.BundleError) as e:
            tb.CredentialBundle.from_json(broken)
        assert e.value.kind is tb.BundleErrorKind.INVALID


def test_replay_guard_as_the_rust_unit_tests() -> None:
    R = tb.DropReason
    g = tb.ReplayGuard(retain_ms=1_000, max_senders=10)
    order = [5, 1, 3, 2, 4, 9, 7, 8, 6, 130]
    for s in order:
        g.check(1, s, 0)
    for s in order:
        with pytest.raises(tb.EnvelopeError) as e:
            g.check(1, s, 0)
        assert e.value.reason is R.REPLAY
    with pytest.raises(tb.EnvelopeError):
        g.check(1, 1, 0)
    g.check(1, 131, 0)

    g = tb.ReplayGuard(retain_ms=1_000, max_senders=2)
    g.check(1, 1, 0)
    g.check(2, 1, 0)
    with pytest.raises(tb.EnvelopeError) as e:
        g.check(3, 1, 0)
    assert e.value.reason is R.REPLAY_STATE_FULL and g.senders() == 2
    g.check(3, 1, 2_000)
    assert g.senders() == 1

    g = tb.ReplayGuard(retain_ms=1_000, max_senders=1)
    g.check(7, 1, 0)
    g.check(7, 1_000_000, 0)
    g.check(7, 999_999, 0)
    with pytest.raises(tb.EnvelopeError):
        g.check(7, 999_999, 0)


def test_freshness_bounds_are_inclusive_as_in_rust() -> None:
    f = tb.Freshness(300_000, 30_000)
    now = 10_000_000
    f.check(now - 300_000, now)
    f.check(now + 30_000, now)
    with pytest.raises(tb.EnvelopeError) as e:
        f.check(now - 300_001, now)
    assert e.value.reason is tb.DropReason.STALE
    with pytest.raises(tb.EnvelopeError) as e:
        f.check(now + 30_001, now)
    assert e.value.reason is tb.DropReason.FUTURE


def test_task_outcome_wire_form() -> None:
    from tenantbus.dispatch import TaskOutcome

    for o in [TaskOutcome(True, output=b"ok"), TaskOutcome(True), TaskOutcome(False, reason="boom", deliveries=3)]:
        assert TaskOutcome.decode(o.encode()) == o
    assert TaskOutcome(False, reason="r", deliveries=2).encode() == b"\x01\x00\x00\x00\x02r"
    for bad in [b"", b"\x01\x00", b"\x09"]:
        assert TaskOutcome.decode(bad) is None
