"""Every attack of tests/tests/bus_attacks.rs, injected with a raw nats-py client
into a Python subscription on a real server: each is refused (never delivered),
counted under the same reason name as in Rust, and leaves the subscription
working."""

import asyncio
import os
from collections import Counter
from typing import Dict, List, Optional, Tuple

import nats
import pytest

import tenantbus as tb
from tenantbus.envelope import FIXED_HEADER_LEN

from conftest import MASTER, make_bundle, unique_tenant

R = tb.DropReason


class XorShift:
    def __init__(self, seed: int) -> None:
        self.s = seed

    def next(self) -> int:
        m = (1 << 64) - 1
        self.s ^= (self.s << 13) & m
        self.s ^= self.s >> 7
        self.s ^= (self.s << 17) & m
        return self.s

    def bytes(self, n: int) -> bytes:
        return bytes(self.next() & 0xFF for _ in range(n))


def mutate(body: bytes, at: int, value: Optional[int] = None, xor: int = 0) -> bytes:
    b = bytearray(body)
    b[at] = value if value is not None else b[at] ^ xor
    return bytes(b)


def splice(body: bytes, at: int, data: bytes) -> bytes:
    return body[:at] + data + body[at + len(data):]


class Target:
    """A victim subscription on ``orders.>`` of a fresh tenant, a raw injector,
    and the drop counts expected so far."""

    def __init__(self, ns, sub, raw, tenant: str, **opts) -> None:
        self.ns, self.sub, self.raw, self.tenant = ns, sub, raw, tenant
        self.subject = f"tenant.{tenant}.orders.created"
        self.expected: Counter = Counter()
        self.legit = 0

    @classmethod
    async def new(cls, server, tenant: str = "", **opts) -> "Target":
        tenant = tenant or unique_tenant("alpha")
        ns = await tb.connect(make_bundle(server.url, tenant, "victim"), **opts)
        sub = await ns.subscribe("orders.>")
        raw = await nats.connect(server.url)
        return cls(ns, sub, raw, tenant)

    async def close(self) -> None:
        await self.raw.close()
        await self.ns.close()

    def valid(self, payload: bytes, reply: Optional[str] = None) -> Tuple[tb.MessageId, bytes]:
        return self.ns.sealer.seal(self.subject, reply, payload)

    async def inject(self, body: bytes, subject: Optional[str] = None, reply: str = "") -> None:
        await self.raw.publish(subject or self.subject, body, reply=reply)

    async def expect_only_legit_then(self, drops: Dict[R, int], what: str) -> None:
        self.legit += 1
        payload = f"legit-{self.legit}".encode()
        mid, body = self.valid(payload)
        await self.inject(body)
        await self.raw.flush()
        m = await self.sub.next_msg(timeout=5)
        assert (m.msg_id, m.payload) == (mid, payload), f"{what}: an injected message was delivered"
        self.expected.update({r: n for r, n in drops.items()})
        snap = self.ns.counters()
        for r in R:
            assert snap.dropped[r.value] == self.expected[r], f"{what}: count of {r.value}: {snap}"

    async def attack(self, bodies: List[bytes], reason: R, what: str) -> None:
        for b in bodies:
            await self.inject(b)
        await self.expect_only_legit_then({reason: len(bodies)}, what)


@pytest.fixture
async def target(nats_server):
    t = await Target.new(nats_server)
    yield t
    await t.close()


def hlen(body: bytes) -> int:
    return tb.decode_header(body).header_len


async def test_flipped_ciphertext_or_tag_bits_fail_authentication(target) -> None:
    _, body = target.valid(b"payload")
    h, last = hlen(body), len(body) - 1
    bodies = [mutate(body, h, xor=1), mutate(body, h + 3, xor=0x80), mutate(body, last, xor=1),
              mutate(body, last - 15, xor=0x40)]
    await target.attack(bodies, R.AUTHENTICATION, "flipped bits")
    await target.inject(body)
    assert (await target.sub.next_msg(5)).payload == b"payload"


async def test_altered_tenant_field_is_wrong_tenant_or_malformed(nats_server) -> None:
    # A 5-letter tenant (as "alpha" in the Rust test), unique in the session.
    t = await Target.new(nats_server, tenant="a" + unique_tenant("").replace("-", "")[-4:].rjust(4, "0"))
    try:
        _, body = t.valid(b"payload")
        at = FIXED_HEADER_LEN
        n = len(t.tenant)
        assert body[at:at + n] == t.tenant.encode()
        other = "bravo"[:n].ljust(n, "z")
        await t.attack([splice(body, at, other.encode()), mutate(body, at + n - 1, ord("b") if t.tenant[-1] != "b" else ord("c"))],
                       R.WRONG_TENANT, "altered tenant")
        await t.attack([mutate(body, at, ord("A")), mutate(body, at + n - 1, ord("-")),
                        mutate(body, at + 2, ord(".")), mutate(body, at + 1, 0xD0)],
                       R.MALFORMED, "tenant not a slug")
    finally:
        await t.close()


async def test_altered_header_fields_fail_authentication(target) -> None:
    _, body = target.valid(b"payload")
    h = hlen(body)
    sender_at = FIXED_HEADER_LEN + len(target.tenant) + 1
    assert body[sender_at:h] == b"victim"
    bodies = [mutate(body, i, xor=1) for i in (6, 21, 29, 27, 30)]
    bodies.append(splice(body, sender_at, b"attack"))
    await target.attack(bodies, R.AUTHENTICATION, "altered header")


async def test_moved_or_re_addressed_messages(target) -> None:
    t = target
    _, body = t.valid(b"payload")
    p = f"tenant.{t.tenant}"
    for s in [f"{p}.orders.cancelled", f"{p}.orders.created.x", f"{p}.orders.x"]:
        await t.inject(body, subject=s)
    await t.inject(body, reply=f"{p}._INBOX.evil.1")
    await t.expect_only_legit_then({R.AUTHENTICATION: 4}, "moved")
    _, req = t.valid(b"request", reply=f"{p}._INBOX.abc.1")
    await t.inject(req, reply=f"{p}._INBOX.abc.2")
    await t.inject(req)
    await t.expect_only_legit_then({R.AUTHENTICATION: 2}, "re-addressed")
    _, out = t.valid(b"request", reply="_INBOX.elsewhere.1")
    await t.inject(out, reply="_INBOX.elsewhere.1")
    await t.expect_only_legit_then({R.OUTSIDE_NAMESPACE: 1}, "outside reply")
    await t.inject(req, reply=f"{p}._INBOX.abc.1")
    m = await t.sub.next_msg(5)
    assert (m.payload, m.reply) == (b"request", f"{p}._INBOX.abc.1")


async def test_message_sealed_with_another_key_fails_authentication(target) -> None:
    t = target
    forger = tb.Sealer(tb.TenantKeySet.from_master(os.urandom(32), t.tenant, [1], 1), "victim")
    bodies = [forger.seal(t.subject, None, f"forged {i}".encode())[1] for i in range(3)]
    other = "z" * len(t.tenant)
    relabel = tb.Sealer(tb.TenantKeySet.from_master(MASTER, other, [1], 1), "victim")
    _, b = relabel.seal(t.subject, None, b"relabelled")
    bodies.append(splice(b, FIXED_HEADER_LEN, t.tenant.encode()))
    await t.attack(bodies, R.AUTHENTICATION, "foreign key")


async def test_replays_are_refused_whatever_the_order(target) -> None:
    t = target
    mid, body = t.valid(b"once")
    await t.inject(body)
    assert (await t.sub.next_msg(5)).msg_id == mid
    await t.attack([body, body, body], R.REPLAY, "replay")
    s = tb.Sealer(t.ns.keys, "other")
    msgs = [s.seal(t.subject, None, f"seq {i}".encode()) for i in (1, 2, 3)]
    for seq in (3, 1, 2, 1, 3):
        await t.inject(msgs[seq - 1][1])
    for seq in (3, 1, 2):
        m = await t.sub.next_msg(5)
        assert (m.msg_id.sequence, m.payload) == (seq, f"seq {seq}".encode())
    await t.expect_only_legit_then({R.REPLAY: 2}, "out-of-order duplicates")
    for seq in (2, 3, 1):
        await t.inject(msgs[seq - 1][1])
    await t.expect_only_legit_then({R.REPLAY: 3}, "late duplicates")


async def test_stale_and_future_messages_are_refused(target) -> None:
    t = target
    now = tb.now_ms()
    at = lambda ts: t.ns.sealer.seal_at(t.subject, None, b"timed", ts)[1]  # noqa: E731
    await t.attack([at(now - 600_000), at(now - 301_000), at(0)], R.STALE, "stale")
    await t.attack([at(now + 600_000), at(now + 31_000), at((1 << 64) - 1)], R.FUTURE, "future")
    for ts in (now - 60_000, now + 5_000):
        await t.inject(at(ts))
        assert (await t.sub.next_msg(5)).payload == b"timed"
    await t.expect_only_legit_then({}, "fresh enough")


async def test_unknown_key_versions_are_refused(target) -> None:
    t = target
    bodies = []
    for v in (2, 7, 0xFFFFFFFF, 0):
        s = tb.Sealer(tb.TenantKeySet.from_master(MASTER, t.tenant, [v], v), "newer")
        bodies.append(s.seal(t.subject, None, b"other version")[1])
    _, body = t.valid(b"payload")
    bodies.append(mutate(body, 5, 9))
    await t.attack(bodies, R.UNKNOWN_KEY, "unknown key")


async def test_truncated_random_and_malformed_bytes_are_refused(target) -> None:
    t = target
    _, body = t.valid(b"some payload")
    h = hlen(body)
    n = len(t.tenant)
    bodies = [b"", body[:1], body[:10], body[:FIXED_HEADER_LEN], body[:h], body[:h + 15],
              mutate(body, 1, 1), mutate(body, 42, 0), mutate(body, 42, 64), mutate(body, 42, 255),
              mutate(body, FIXED_HEADER_LEN + n, 64), mutate(body, FIXED_HEADER_LEN + n, 63)]
    rng = XorShift(0x9E3779B97F4A7C15)
    bodies += [rng.bytes(k) for k in (5, 20, 43, 59)]
    for k in (60, 100, 300, 2000):
        v = bytearray(rng.bytes(k))
        v[0] = 1
        v[1] |= 1
        bodies.append(bytes(v))
    for k in (64, 200):
        v = bytearray(rng.bytes(k))
        v[0], v[1] = 1, 0
        v[42] = 64 + (v[42] % 192)
        bodies.append(bytes(v))
    for b in bodies:
        with pytest.raises(tb.EnvelopeError) as e:
            tb.decode_header(b)
        assert e.value.reason is R.MALFORMED
    await t.attack(bodies, R.MALFORMED, "malformed")
    _, req = t.valid(b"r", reply=f"tenant.{t.tenant}._INBOX.x.1")
    await t.inject(req[:30], reply=f"tenant.{t.tenant}._INBOX.x.1")
    await t.expect_only_legit_then({R.MALFORMED: 1}, "truncated request")


async def test_unsupported_version_byte_is_refused(target) -> None:
    t = target
    _, body = t.valid(b"payload")
    bodies = [mutate(body, 0, v) for v in (0, 2, 0x7F, 0xFF)]
    rng = XorShift(0x2545F4914F6CDD1D)
    for k in (64, 500):
        v = bytearray(rng.bytes(k))
        v[0] = 0x7B
        bodies.append(bytes(v))
    bodies.append(b'{"tenant":"alpha","payload":"plain JSON pretending to be a message"}')
    await t.attack(bodies, R.UNSUPPORTED_VERSION, "version")


async def test_every_attack_in_one_subscription_counts_each_reason_exactly(target) -> None:
    t = target
    _, body = t.valid(b"payload")
    h = hlen(body)
    forger = tb.Sealer(tb.TenantKeySet.from_master(os.urandom(32), t.tenant, [1], 1))
    v2 = tb.Sealer(tb.TenantKeySet.from_master(MASTER, t.tenant, [2], 2))
    s = t.ns.sealer
    _, delivered = s.seal(t.subject, None, b"first")
    now = tb.now_ms()
    injected = [
        (delivered, None),
        (mutate(body, h, xor=1), R.AUTHENTICATION),
        (mutate(body, FIXED_HEADER_LEN, ord("z") if t.tenant[0] != "z" else ord("y")), R.WRONG_TENANT),
        (mutate(body, 10, xor=1), R.AUTHENTICATION),
        (mutate(body, 25, xor=1), R.AUTHENTICATION),
        (forger.seal(t.subject, None, b"forged")[1], R.AUTHENTICATION),
        (delivered, R.REPLAY),
        (s.seal_at(t.subject, None, b"old", now - 3_600_000)[1], R.STALE),
        (s.seal_at(t.subject, None, b"new", now + 3_600_000)[1], R.FUTURE),
        (v2.seal(t.subject, None, b"v2")[1], R.UNKNOWN_KEY),
        (body[:20], R.MALFORMED),
        (mutate(body, 0, 9), R.UNSUPPORTED_VERSION),
    ]
    for b, _ in injected:
        await t.inject(b)
    assert (await t.sub.next_msg(5)).payload == b"first"
    drops = Counter(r for _, r in injected if r is not None)
    await t.expect_only_legit_then(dict(drops), "all attacks")
    snap = t.ns.counters()
    assert snap.dropped_total() == len(injected) - 1
    assert snap.delivered == 2  # first, legit (no probe message in Python)


async def test_outside_namespace_subjects_are_refused(target) -> None:
    # Authentic messages sealed for (and injected on) a subject the pattern
    # matches but which names the library's inboxes are skipped, and a
    # subscription on ">" never sees other tenants at all; a message sealed for
    # another subject than the one it arrives on fails authentication.
    t = target
    sub_all = await t.ns.subscribe(">")
    inbox = f"tenant.{t.tenant}._INBOX.zz.1"
    _, b = t.ns.sealer.seal(inbox, None, b"inbox traffic")
    await t.inject(b, subject=inbox)
    mid, good = t.valid(b"to all")
    await t.inject(good)
    await t.raw.flush()
    assert (await sub_all.next_msg(5)).msg_id == mid
    assert (await t.sub.next_msg(5)).msg_id == mid
    assert t.ns.counters().dropped_total() == 0


async def test_forged_responses_do_not_satisfy_a_request(nats_server) -> None:
    tenant = unique_tenant("alpha")
    requester = await tb.connect(make_bundle(nats_server.url, tenant, "requester"))
    responder = await tb.connect(make_bundle(nats_server.url, tenant, "responder"))
    raw = await nats.connect(nats_server.url)
    try:
        svc = await responder.subscribe("svc.slow")
        call = asyncio.ensure_future(requester.request("svc.slow", b"question", timeout=10))
        req = await svc.next_msg(5)
        inbox = req.reply
        assert inbox.startswith(f"tenant.{tenant}._INBOX."), inbox
        forger = tb.Sealer(tb.TenantKeySet.from_master(os.urandom(32), tenant, [1], 1), "responder")
        legit_keys = tb.Sealer(requester.keys, "responder")
        _, elsewhere = legit_keys.seal(inbox + "0", None, b"for another inbox")
        _, stale = legit_keys.seal_at(inbox, None, b"old", tb.now_ms() - 3_600_000)
        _, forged = forger.seal(inbox, None, b"forged answer")
        for body in (b"garbage", forged, elsewhere, stale):
            await raw.publish(inbox, body)
        await raw.flush()
        await asyncio.sleep(0.2)
        assert not call.done()
        await responder.respond(req, b"the real answer")
        response = await call
        assert (response.payload, response.sender) == (b"the real answer", "responder")
        snap = requester.counters()
        assert (snap["malformed"], snap["authentication"], snap["stale"]) == (1, 2, 1), snap
        assert snap.dropped_total() == 4 and snap.delivered == 1
    finally:
        await raw.close()
        await requester.close()
        await responder.close()


async def test_replay_state_at_its_cap_refuses_new_senders_but_keeps_known_ones(nats_server) -> None:
    t = await Target.new(nats_server, max_replay_senders=2)
    try:
        sealers = [tb.Sealer(t.ns.keys, "sender") for _ in range(4)]
        send = lambda i: sealers[i].seal(t.subject, None, f"from {i}".encode())  # noqa: E731
        for i in (0, 1):
            mid, body = send(i)
            await t.inject(body)
            assert (await t.sub.next_msg(5)).msg_id == mid
        for i in (2, 3, 2):
            await t.inject(send(i)[1])
        mid, body = send(1)
        await t.inject(body)
        assert (await t.sub.next_msg(5)).msg_id == mid
        snap = t.ns.counters()
        assert snap["replay_state_full"] == 3 and snap.dropped_total() == 3
        assert t.sub.replay_senders == 2
    finally:
        await t.close()


async def test_a_flood_of_bad_messages_does_not_hide_good_ones(target) -> None:
    t = target
    _, body = t.valid(b"payload")
    h = hlen(body)
    bad = 5000
    for i in range(bad):
        await t.inject(mutate(body, h + i % 7, xor=1 + i % 255))
    mid, legit = t.valid(b"after the flood")
    await t.inject(legit)
    await t.raw.flush()
    m = await t.sub.next_msg(20)
    assert m.msg_id == mid
    assert t.ns.counters()["authentication"] == bad
    assert t.ns.counters().delivered == 1


async def test_a_shorter_replay_window_makes_older_messages_stale(nats_server) -> None:
    t = await Target.new(nats_server, replay_window_ms=2_000, clock_skew_ms=500)
    try:
        now = tb.now_ms()
        at = lambda ts: t.ns.sealer.seal_at(t.subject, None, b"t", ts)  # noqa: E731
        for ts in (now - 5_000, now + 3_000):
            await t.inject(at(ts)[1])
        mid, body = at(now - 1_000)
        await t.inject(body)
        assert (await t.sub.next_msg(5)).msg_id == mid
        snap = t.ns.counters()
        assert (snap["stale"], snap["future"]) == (1, 1)
    finally:
        await t.close()
