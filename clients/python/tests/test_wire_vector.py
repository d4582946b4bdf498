"""The test vector of docs/wire-format.md."""

import tenantbus as tb
from tenantbus import envelope

MASTER = bytes(range(32))
SUBJECT = "tenant.acme.orders.created"
VECTOR = bytes.fromhex(
    "010000000001010203040506070800000000000000010000018bcfe568000102030405060708"
    "000000010461636d6507706c616e6e65723392ef3d3591c4ad4c390683d6fb4734011a6c6786"
)


def keys() -> tb.TenantKeySet:
    return tb.TenantKeySet.from_master(MASTER, "acme", [1], 1)


def test_seal_reproduces_the_documented_bytes() -> None:
    s = tb.Sealer(keys(), "planner", instance=0x0102030405060708)
    msg_id, body = s.seal_at(SUBJECT, None, b"hello", 1700000000000)
    assert len(body) == 76
    assert body == VECTOR
    assert msg_id.instance == 0x0102030405060708 and msg_id.sequence == 1
    assert msg_id.to_hex() == "01020304050607080000000000000001"


def test_documented_bytes_open() -> None:
    stamp, plain = tb.open_envelope(keys(), SUBJECT, None, VECTOR)
    assert plain == b"hello"
    assert stamp == tb.Stamp(1, "acme", tb.MessageId.of(0x0102030405060708, 1), 1700000000000, "planner")
    h = tb.decode_header(VECTOR)
    assert (h.key_version, h.tenant, h.sender, h.header_len) == (1, b"acme", b"planner", 55)
    assert h.nonce == bytes.fromhex("010203040506070800000001")


def test_nonce_is_instance_times_2_32_plus_sequence_mod_2_96() -> None:
    inst = 0xFFFFFFFFFFFFFFFF
    s = tb.Sealer(keys(), None, instance=inst)
    for seq in (1, 2):
        _, body = s.seal_at(SUBJECT, None, b"", 0)
        h = tb.decode_header(body)
        assert h.nonce == (((inst << 32) + seq) % (1 << 96)).to_bytes(12, "big")
        assert h.sender is None and h.msg_id.sequence == seq


def test_the_vector_fails_elsewhere() -> None:
    for subject, reply in [("tenant.acme.orders.x", None), (SUBJECT, "tenant.acme._INBOX.a.1")]:
        try:
            tb.open_envelope(keys(), subject, reply, VECTOR)
        except tb.EnvelopeError as e:
            assert e.reason is tb.DropReason.AUTHENTICATION
        else:
            raise AssertionError("opened on another subject or reply")


def test_sealer_refuses_past_max_sequence() -> None:
    s = tb.Sealer(keys(), None, instance=1)
    s._seq = envelope.MAX_SEQUENCE - 1
    try:
        s.seal(SUBJECT, None, b"")
    except tb.SealError as e:
        assert e.kind is tb.SealErrorKind.EXHAUSTED
    else:
        raise AssertionError("sealed past MAX_SEQUENCE")
