"""Property tests (hypothesis): the decoder and verifier only ever raise their
typed error, whatever the bytes; no accepted subject leaves ``tenant.<id>.``;
sealing round-trips; the replay guard delivers each id at most once."""

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tenantbus as tb
from tenantbus.subject import pattern_matches

MASTER = bytes(range(32))
KEYS = tb.TenantKeySet.from_master(MASTER, "acme", [1, 2], 2)
SEALER = tb.Sealer(KEYS, "prop", instance=42)
SUBJECT = "tenant.acme.orders.created"
_, VALID = tb.Sealer(KEYS, "prop", instance=7).seal(SUBJECT, None, b"payload")

fast = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

slug = st.from_regex(r"\A[a-z0-9]{1,8}(-[a-z0-9]{1,8}){0,3}\Z")
token_chars = st.sampled_from(list(string.printable) + ["ü", "\u00a0", "\u2024", "*", ">", "$", "."])
any_text = st.text(token_chars, max_size=40) | st.text(max_size=20)


def verifier() -> tb.Verifier:
    return tb.Verifier(KEYS)


@fast
@given(st.binary(max_size=400))
def test_decoder_raises_only_its_typed_error_on_random_bytes(body: bytes) -> None:
    for f in (lambda: tb.decode_header(body), lambda: tb.open_envelope(KEYS, SUBJECT, None, body)):
        try:
            f()
        except tb.EnvelopeError as e:
            assert isinstance(e.reason, tb.DropReason)


@fast
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, len(VALID)), st.booleans())
def test_mutated_envelopes_never_open_and_raise_only_envelope_error(edits, cut, truncate) -> None:
    body = bytearray(VALID)
    for at, v in edits:
        body[at % len(body)] = v
    if truncate:
        body = body[:cut]
    body = bytes(body)
    g = verifier().replay_guard()
    try:
        m = verifier().verify(g, SUBJECT, None, body, tb.now_ms())
    except tb.EnvelopeError as e:
        assert isinstance(e.reason, tb.DropReason)
    else:
        assert body == VALID and m.payload == b"payload"


@fast
@given(st.binary(max_size=300), any_text, st.one_of(st.none(), any_text))
def test_verifier_raises_only_envelope_error_for_any_subject_and_reply(body, subject, reply) -> None:
    g = verifier().replay_guard()
    try:
        verifier().verify(g, subject, reply, body, tb.now_ms())
    except tb.EnvelopeError:
        pass


@fast
@given(any_text)
def test_no_accepted_subject_leaves_the_namespace(rel: str) -> None:
    for allow, validate in ((False, tb.validate_subject), (True, tb.validate_pattern)):
        try:
            validate(rel)
        except tb.SubjectError as e:
            assert isinstance(e.kind, tb.SubjectErrorKind)
            continue
        full = tb.scope("acme", rel)
        assert full.startswith("tenant.acme.") and full[len("tenant.acme."):] == rel
        toks = rel.split(".")
        assert all(toks) and len(toks) <= 16 and len(rel.encode()) <= 256
        assert all(0x21 <= ord(c) <= 0x7E for c in rel)
        assert not toks[0].startswith("$") and not toks[0].startswith("_INBOX")
        if not allow:
            assert tb.unscope("acme", full) == rel
            assert "*" not in rel and ">" not in rel
        else:
            # A pattern only matches subjects under the same prefix: no token
            # can climb out (no "..", no wildcard spanning the tenant token).
            assert all(t in ("*", ">") or ("*" not in t and ">" not in t) for t in toks)


@fast
@given(slug, any_text)
def test_unscope_only_accepts_the_own_namespace(tenant: str, full: str) -> None:
    try:
        rel = tb.unscope(tenant, full)
    except tb.SubjectError:
        return
    assert full == f"tenant.{tenant}.{rel}"
    tb.validate_subject(rel)


@fast
@given(slug, slug, st.from_regex(r"\A[a-z]{1,5}(\.[a-z0-9]{1,5}){0,4}\Z"), st.binary(max_size=300),
       st.one_of(st.none(), st.just("tenant.x._INBOX.a.1")))
def test_seal_open_round_trip(tenant, sender, rel, payload, reply) -> None:
    keys = tb.TenantKeySet.from_master(MASTER, tenant, [3], 3)
    s = tb.Sealer(keys, sender)
    full = tb.scope(tenant, rel)
    mid, body = s.seal(full, reply, payload)
    stamp, plain = tb.open_envelope(keys, full, reply, body)
    assert (plain, stamp.sender, stamp.msg_id, stamp.key_version) == (payload, sender, mid, 3)
    h = tb.decode_header(body)
    assert len(body) == h.header_len + len(payload) + 16


@fast
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 400)), max_size=200))
def test_replay_guard_delivers_each_id_at_most_once(seen) -> None:
    g = tb.ReplayGuard(retain_ms=1_000_000, max_senders=10)
    delivered = set()
    top = {}
    for inst, seq in seen:
        try:
            g.check(inst, seq, 0)
        except tb.EnvelopeError as e:
            assert e.reason is tb.DropReason.REPLAY
            # Refused: a duplicate, or too far behind the sender's newest.
            assert (inst, seq) in delivered or top[inst] - seq >= 128
        else:
            assert (inst, seq) not in delivered
            delivered.add((inst, seq))
            top[inst] = max(top.get(inst, 0), seq)


@fast
@given(st.from_regex(r"\A[a-z*]{1,3}(\.[a-z*]{1,3}){0,3}(\.>)?\Z"), st.from_regex(r"\A[a-z]{1,3}(\.[a-z]{1,3}){0,4}\Z"))
def test_pattern_matching_agrees_with_a_regex(pattern, subject) -> None:
    import re

    try:
        tb.validate_pattern(pattern)
    except tb.SubjectError:
        return
    rx = "\\.".join("[^.]+" if t == "*" else (".+" if t == ">" else re.escape(t)) for t in pattern.split("."))
    assert pattern_matches(pattern, subject) == bool(re.fullmatch(rx, subject))
