"""The sealed envelope, byte for byte as ``docs/wire-format.md`` (version 1).

======  =====  =============================================
offset  size   field
======  =====  =============================================
0       1      format version ``0x01``
1       1      flags ``0x00``
2       4      key version (big-endian)
6       16     message id: sender instance (8) + sequence (8)
22      8      timestamp, ms since the Unix epoch
30      12     nonce ``(I * 2^32 + s) mod 2^96``
42      1      tenant id length ``T`` (1..=63)
43      T      tenant id
43+T    1      sender id length ``S`` (0 = none, ..=63)
44+T    S      sender id
44+T+S  n+16   AES-256-GCM ciphertext of the payload, then the tag
======  =====  =============================================

AAD = header || u16 len(subject) || subject || u16 len(reply) || reply.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import Optional, Tuple

from cryptography.exceptions import InvalidTag

from .errors import DropReason, EnvelopeError, SealError, SealErrorKind
from .ids import MAX_ID_LEN, slug_error_bytes
from .keys import TenantKeySet

#: The format version written and read.
FORMAT_VERSION = 1
#: Fixed header bytes before the tenant id.
FIXED_HEADER_LEN = 43
#: Length of the GCM tag.
TAG_LEN = 16
#: Length of the nonce.
NONCE_LEN = 12
#: The largest sequence a sealer issues (2^48).
MAX_SEQUENCE = 1 << 48
#: The longest subject or reply that can be authenticated (u16 length prefix).
MAX_AAD_FIELD = 0xFFFF
_MIN_BODY = FIXED_HEADER_LEN + 1 + 1 + TAG_LEN
_NONCE_MOD = 1 << 96
_U64 = (1 << 64) - 1

_FIXED = struct.Struct(">BBI16sQ12sB")  # version, flags, key version, id, ts, nonce, T
_IDS = struct.Struct(">QQ")
_U16 = struct.Struct(">H")


def now_ms() -> int:
    """The current time in ms since the Unix epoch."""
    return time.time_ns() // 1_000_000


class MessageId(bytes):
    """A 128-bit message id: the sender instance (high 8 bytes) and its sequence."""

    def __new__(cls, raw: bytes) -> "MessageId":
        if len(raw) != 16:
            raise ValueError("a message id is 16 bytes")
        return super().__new__(cls, raw)

    @classmethod
    def of(cls, instance: int, sequence: int) -> "MessageId":
        """The id ``instance || sequence``."""
        return cls(instance.to_bytes(8, "big") + sequence.to_bytes(8, "big"))

    @classmethod
    def from_hex(cls, text: str) -> "MessageId":
        """Parses 32 hex digits."""
        return cls(bytes.fromhex(text))

    @property
    def instance(self) -> int:
        """The random id of the sealer that issued the message."""
        return int.from_bytes(self[:8], "big")

    @property
    def sequence(self) -> int:
        """The sealer's sequence number of the message."""
        return int.from_bytes(self[8:], "big")

    def to_hex(self) -> str:
        """The id as 32 lowercase hex digits (as Rust's ``MessageId::to_hex``)."""
        return self.hex()

    def __str__(self) -> str:
        return self.hex()

    def __repr__(self) -> str:
        return f"MessageId({self.hex()})"


def _aad(header: bytes, subject: str, reply: Optional[str]) -> Optional[bytes]:
    s = subject.encode("utf-8", "surrogateescape")
    r = reply.encode("utf-8", "surrogateescape") if reply else b""
    if len(s) > MAX_AAD_FIELD or len(r) > MAX_AAD_FIELD:
        return None
    return b"".join((header, _U16.pack(len(s)), s, _U16.pack(len(r)), r))


class Sealer:
    """Seals messages for one tenant: a random 64-bit instance id drawn once,
    and a sequence counted from 1. Thread-safe."""

    def __init__(
        self, keys: TenantKeySet, sender: Optional[str] = None, instance: Optional[int] = None
    ) -> None:
        """``instance`` is for test vectors only: reusing an instance id under
        the same key repeats nonces."""
        self._keys = keys
        if sender is not None:
            from .ids import validate_agent_id

            validate_agent_id(sender)
        self.sender = sender
        self._sender_b = sender.encode("ascii") if sender else b""
        self.instance: int = (
            int.from_bytes(os.urandom(8), "big") if instance is None else instance & _U64
        )
        self._seq = 0
        self._lock = threading.Lock()
        self._prefix_cache: Tuple[int, bytes] = (-1, b"")

    @property
    def keys(self) -> TenantKeySet:
        """The key set used (its current version seals)."""
        return self._keys

    def set_keys(self, keys: TenantKeySet) -> None:
        """Installs a refreshed key set of the same tenant (a rotation)."""
        keys.ensure_tenant(self._keys.tenant)
        self._keys = keys

    def seal(
        self, subject: str, reply: Optional[str], payload: bytes
    ) -> Tuple[MessageId, bytes]:
        """Seals ``payload`` for the full ``subject`` (and ``reply``), stamped now."""
        return self.seal_at(subject, reply, payload, now_ms())

    def seal_at(
        self, subject: str, reply: Optional[str], payload: bytes, timestamp_ms: int
    ) -> Tuple[MessageId, bytes]:
        """Seals with an explicit timestamp (tests, vectors)."""
        with self._lock:
            self._seq += 1
            seq = self._seq
        if seq >= MAX_SEQUENCE:
            raise SealError(SealErrorKind.EXHAUSTED, "create a new sealer")
        keys = self._keys
        key = keys.current_key
        tenant = keys.tenant.encode("ascii")
        msg_id = self.instance.to_bytes(8, "big") + seq.to_bytes(8, "big")
        nonce = (((self.instance << 32) + seq) % _NONCE_MOD).to_bytes(NONCE_LEN, "big")
        header = b"".join(
            (
                _FIXED.pack(
                    FORMAT_VERSION, 0, key.version, msg_id, timestamp_ms & _U64, nonce, len(tenant)
                ),
                tenant,
                bytes((len(self._sender_b),)),
                self._sender_b,
            )
        )
        aad = _aad(header, subject, reply)
        if aad is None:
            raise SealError(SealErrorKind.TOO_LONG, subject[:80])
        try:
            sealed = key.aead.encrypt(nonce, bytes(payload), aad)
        except (OverflowError, ValueError) as e:
            raise SealError(SealErrorKind.CRYPTO, str(e)) from e
        return MessageId(msg_id), header + sealed


@dataclass(frozen=True)
class Header:
    """A decoded (not yet authenticated) envelope header."""

    key_version: int
    msg_id: MessageId
    timestamp_ms: int
    nonce: bytes
    tenant: bytes
    sender: Optional[bytes]
    header_len: int


_FIELDS = Tuple[int, bytes, int, bytes, bytes, Optional[bytes], int]
_HEAD = struct.Struct(">BBI16sQ12sB")


def _decode_fields(body: bytes) -> _FIELDS:
    """(key_version, msg_id, timestamp, nonce, tenant, sender, header_len); the
    ids' slug rule is left to the caller."""
    n = len(body)
    if n < _MIN_BODY:
        raise EnvelopeError(DropReason.MALFORMED, "too short")
    if body[0] != FORMAT_VERSION:
        raise EnvelopeError(DropReason.UNSUPPORTED_VERSION, str(body[0]))
    if body[1] != 0:
        raise EnvelopeError(DropReason.MALFORMED, "flags")
    _, _, key_version, msg_id, ts, nonce, tlen = _HEAD.unpack_from(body, 0)
    if tlen == 0 or tlen > MAX_ID_LEN:
        raise EnvelopeError(DropReason.MALFORMED, "tenant length")
    tenant_end = FIXED_HEADER_LEN + tlen
    if tenant_end >= n:
        raise EnvelopeError(DropReason.MALFORMED, "truncated")
    slen = body[tenant_end]
    if slen > MAX_ID_LEN:
        raise EnvelopeError(DropReason.MALFORMED, "sender length")
    header_len = tenant_end + 1 + slen
    if n < header_len + TAG_LEN:
        raise EnvelopeError(DropReason.MALFORMED, "truncated")
    tenant = body[FIXED_HEADER_LEN:tenant_end]
    sender = body[tenant_end + 1 : header_len] if slen else None
    if not tenant.isascii() or (sender is not None and not sender.isascii()):
        try:
            tenant.decode("utf-8")
            if sender is not None:
                sender.decode("utf-8")
        except UnicodeDecodeError:
            raise EnvelopeError(DropReason.MALFORMED, "ids are not UTF-8") from None
    return key_version, msg_id, ts, nonce, tenant, sender, header_len


def decode_header(body: bytes) -> Header:
    """Parses the header of ``body`` without authenticating anything, checking
    that both ids are valid slugs. Raises only :class:`EnvelopeError`."""
    try:
        kv, mid, ts, nonce, tenant, sender, hl = _decode_fields(bytes(body))
    except EnvelopeError:
        raise
    except Exception as e:  # never anything but the typed error
        raise EnvelopeError(DropReason.MALFORMED, type(e).__name__) from None
    if slug_error_bytes(tenant) is not None:
        raise EnvelopeError(DropReason.MALFORMED, "tenant id")
    if sender is not None and slug_error_bytes(sender) is not None:
        raise EnvelopeError(DropReason.MALFORMED, "sender id")
    return Header(kv, MessageId(mid), ts, nonce, tenant, sender, hl)


def open_parts(
    keys: TenantKeySet, subject: str, reply: Optional[str], body: bytes
) -> Tuple[_FIELDS, bytes]:
    """Authenticates and decrypts ``body`` received on the full ``subject`` with
    ``reply``: format, tenant, key version, tag, in that order. Returns the
    decoded fields ``(key_version, msg_id, timestamp, nonce, tenant, sender,
    header_len)`` and the plaintext; the sender id is not yet checked against the
    slug rule. Raises only :class:`EnvelopeError`."""
    try:
        if type(body) is not bytes:
            body = bytes(body)
        fields = _decode_fields(body)
        if fields[4] != keys.tenant_bytes:
            if slug_error_bytes(fields[4]) is None:
                raise EnvelopeError(DropReason.WRONG_TENANT, "")
            raise EnvelopeError(DropReason.MALFORMED, "tenant id")
        key = keys.get(fields[0])
        if key is None:
            raise EnvelopeError(DropReason.UNKNOWN_KEY, str(fields[0]))
        hl = fields[6]
        aad = _aad(body[:hl], subject, reply)
        if aad is None:
            raise EnvelopeError(DropReason.OUTSIDE_NAMESPACE, "subject too long")
        try:
            plain = key.aead.decrypt(fields[3], body[hl:], aad)
        except InvalidTag:
            raise EnvelopeError(DropReason.AUTHENTICATION, "") from None
        return fields, plain
    except EnvelopeError:
        raise
    except Exception as e:  # never anything but the typed error
        raise EnvelopeError(DropReason.MALFORMED, type(e).__name__) from None


@dataclass(frozen=True)
class Stamp:
    """The authenticated stamp of an opened message."""

    key_version: int
    tenant: str
    msg_id: MessageId
    timestamp_ms: int
    sender: Optional[str]


def open_envelope(
    keys: TenantKeySet, subject: str, reply: Optional[str], body: bytes
) -> Tuple[Stamp, bytes]:
    """Authenticates and decrypts ``body`` (no freshness or replay check: see
    :mod:`tenantbus.verify`). Returns the stamp and the plaintext. Raises only
    :class:`EnvelopeError`."""
    (kv, mid, ts, _, _, sender_b, _), plain = open_parts(keys, subject, reply, body)
    sender = None
    if sender_b is not None:
        if slug_error_bytes(sender_b) is not None:
            raise EnvelopeError(DropReason.MALFORMED, "sender id")
        sender = sender_b.decode("ascii")
    return Stamp(kv, keys.tenant, MessageId(mid), ts, sender), plain
