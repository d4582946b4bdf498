"""The tenant state store: ``await ns.kv("sessions")``, byte for byte the Rust
``tenant_bus::kv`` (``bus/src/kv.rs``), so Rust and Python agents of a tenant
share it.

- **Where.** One JetStream KV bucket ``STATE`` in the tenant's own account (the
  account keeps tenants apart; the agent allow-list lets an agent create, read,
  write and watch exactly that bucket). Opened, or created with the bundle's
  placement (replicas, and the region's tag: never elsewhere).
- **Stores.** Many named stores share the bucket: store ``s`` key ``k`` is the
  bucket key ``s.k``. A store name is a slug (no ``.``), so the first token of a
  bucket key always names the store; a key is a concrete relative subject whose
  characters are ``A-Z a-z 0-9 - _ / = .``.
- **Sealing.** A value is stored as ``0x01 || u64 expires-at-ms (big endian) ||
  envelope``; the envelope (``docs/wire-format.md``) is sealed with the tenant's
  current key, its "subject" ``$KV.<bucket>.<store>.<key>`` and its "reply"
  ``exp=<ms>``: a value moved to another key, store, bucket or tenant, or with
  its expiry changed, fails to open (:attr:`KvErrorKind.TAMPERED`). Old values
  stay readable while their key version is held (:attr:`KvErrorKind.KEY_VERSION`
  after it is dropped).
- **Expiry.** ``KvOptions.ttl`` seconds, checked on read: an expired value is
  absent for :meth:`TenantKv.get`, :meth:`TenantKv.keys` and
  :meth:`TenantKv.watch`, and :meth:`TenantKv.create` may replace it.
- **Bounds.** Values at most ``max_value_len`` bytes, ``keys()`` at most
  ``max_keys`` keys, each server wait at most ``timeout`` seconds; a watch
  buffers at most 1,024 changes and 8 MiB.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from dataclasses import dataclass
from typing import Any, AsyncIterator, List, Optional

import nats.errors
import nats.js.errors
from nats.js import api

from .envelope import now_ms, open_envelope
from .errors import EnvelopeError, DropReason, TenantBusError
from .ids import validate_id
from .settle import while_settling, while_unanswered, while_unrouted
from .subject import validate_subject

#: The tenant state bucket's name (in each tenant's own account).
STATE_BUCKET = "STATE"
#: The first byte of every stored value.
VALUE_FORMAT = 1
#: Bytes before the envelope: format (1) and expiry (8).
VALUE_PREFIX_LEN = 9
DEFAULT_MAX_VALUE_LEN = 256 * 1024
MAX_VALUE_LEN = 8 * 1024 * 1024
DEFAULT_MAX_KEYS = 10_000
MAX_KEYS = 1_000_000
#: What a watch buffers at most.
WATCH_MAX_MSGS = 1024
WATCH_MAX_BYTES = 8 * 1024 * 1024

_KEY_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_/=")
_EXP = struct.Struct(">Q")


class KvErrorKind(enum.Enum):
    """What went wrong with the state store (the Rust ``KvErrorKind``)."""

    INVALID_STORE = "invalid_store"
    INVALID_KEY = "invalid_key"
    INVALID_OPTIONS = "invalid_options"
    TOO_LARGE = "too_large"
    NOT_FOUND = "not_found"
    EXISTS = "exists"
    WRONG_REVISION = "wrong_revision"
    TAMPERED = "tampered"
    KEY_VERSION = "key_version"
    SEAL = "seal"
    UNAVAILABLE = "unavailable"
    OUTSIDE_REGION = "outside_region"


class KvError(TenantBusError[KvErrorKind]):
    """A state store error."""


@dataclass
class KvOptions:
    """Options of a store."""

    #: Seconds each written value lives (checked on read); ``None``: forever.
    ttl: Optional[float] = None
    max_value_len: int = DEFAULT_MAX_VALUE_LEN
    max_keys: int = DEFAULT_MAX_KEYS
    #: Seconds any one server wait may take.
    timeout: float = 5.0
    #: Replicas of a bucket created here; default: the bundle's placement, else 1.
    replicas: Optional[int] = None
    bucket: str = STATE_BUCKET

    def check(self) -> None:
        if self.ttl is not None and not self.ttl > 0:
            raise KvError(KvErrorKind.INVALID_OPTIONS, "ttl must be positive")
        if not 1 <= self.max_value_len <= MAX_VALUE_LEN:
            raise KvError(KvErrorKind.INVALID_OPTIONS, f"max_value_len 1 to {MAX_VALUE_LEN}")
        if not 1 <= self.max_keys <= MAX_KEYS:
            raise KvError(KvErrorKind.INVALID_OPTIONS, f"max_keys 1 to {MAX_KEYS}")
        if not self.timeout > 0:
            raise KvError(KvErrorKind.INVALID_OPTIONS, "timeout must be positive")
        if self.replicas is not None and not 1 <= self.replicas <= 5:
            raise KvError(KvErrorKind.INVALID_OPTIONS, "replicas 1 to 5")
        if not self.bucket or any(c in self.bucket for c in " .*>/\\\t\r\n"):
            raise KvError(KvErrorKind.INVALID_OPTIONS, f"bucket name {self.bucket!r}")


@dataclass(frozen=True)
class KvEntry:
    """A value read from the store, opened and verified."""

    key: str
    value: bytes
    revision: int
    key_version: int
    sealed_at_ms: int
    writer: Optional[str]
    expires_at_ms: Optional[int]


@dataclass(frozen=True)
class KvChange:
    """One change seen by :meth:`TenantKv.watch`: a written value (``entry``),
    a delete (neither), or a value that did not open (``error``)."""

    key: str
    revision: int
    entry: Optional[KvEntry] = None
    error: Optional[KvError] = None

    @property
    def deleted(self) -> bool:
        return self.entry is None and self.error is None


def validate_store(store: str) -> None:
    try:
        validate_id(store)
    except Exception as e:
        raise KvError(KvErrorKind.INVALID_STORE, f"{store[:64]!r}: {e}") from None


def validate_key(key: str) -> None:
    try:
        validate_subject(key)
    except Exception as e:
        raise KvError(KvErrorKind.INVALID_KEY, f"{key[:64]!r}: {e}") from None
    bad = next((c for c in key.encode("utf-8", "surrogateescape") if c not in _KEY_CHARS), None)
    if bad is not None:
        raise KvError(KvErrorKind.INVALID_KEY, f"{key[:64]!r}: character {chr(bad)!r} is not allowed in a key")


def _unavailable(what: str, e: BaseException) -> KvError:
    return KvError(KvErrorKind.UNAVAILABLE, f"{what}: {type(e).__name__}: {e}")


def _is_delete(headers: Optional[dict]) -> bool:
    return bool(headers) and (
        headers.get("KV-Operation") is not None or headers.get("Nats-Marker-Reason") is not None
    )


class TenantKv:
    """Store ``store`` of the tenant's state bucket. Use :meth:`open` (or
    ``await ns.kv(store)``)."""

    def __init__(self, ns: Any, store: str, options: KvOptions, kv: Any) -> None:
        self._ns = ns
        self.store = store
        self.options = options
        self._kv = kv
        self._prefix = f"{store}."

    def __repr__(self) -> str:
        return f"TenantKv(tenant={self._ns.tenant!r}, store={self.store!r})"

    @classmethod
    async def open(cls, ns: Any, store: str, options: Optional[KvOptions] = None) -> "TenantKv":
        """Opens (or creates, with the bundle's placement) the bucket and returns
        store ``store`` of it."""
        from .dispatch import _kv_stream_config

        options = options or KvOptions()
        validate_store(store)
        options.check()
        placement = getattr(ns, "placement", None)
        replicas = options.replicas or (placement.replicas if placement else None) or 1
        region = placement.region if placement else None
        js_placement = api.Placement(tags=placement.tags) if region is not None else None
        where = f" in region {region} (servers tagged {placement.tags[0]})" if region is not None else ""
        js = ns.nats.jetstream(timeout=options.timeout)
        bucket = options.bucket
        try:
            try:
                info = await while_unanswered(lambda: js.stream_info(f"KV_{bucket}"))
            except nats.js.errors.NotFoundError:
                config = _kv_stream_config(
                    bucket, f"agentbus state of tenant {ns.tenant}", 0.0, replicas, js_placement, None
                )
                try:
                    info = await while_settling(lambda: js.add_stream(config))
                except nats.js.errors.BadRequestError as refused:
                    try:  # created concurrently?
                        info = await js.stream_info(f"KV_{bucket}")
                    except nats.js.errors.NotFoundError:
                        raise KvError(
                            KvErrorKind.UNAVAILABLE,
                            f"bucket {bucket} of tenant {ns.tenant}: cannot create it{where}: {refused}",
                        ) from refused
            kv = await js.key_value(bucket)
        except KvError:
            raise
        except Exception as e:
            raise _unavailable(f"bucket {bucket}{where}", e) from e
        if region is not None:
            tags = list(getattr(info.config.placement, "tags", None) or [])
            if placement.tags[0] not in tags:
                raise KvError(
                    KvErrorKind.OUTSIDE_REGION,
                    f"bucket {bucket} of tenant {ns.tenant} is not placed in region {region}",
                )
        return cls(ns, store, options, kv)

    def bucket_key(self, key: str) -> str:
        """``<store>.<key>`` (validated)."""
        validate_key(key)
        return self._prefix + key

    def _aad_subject(self, bucket_key: str) -> str:
        return f"$KV.{self.options.bucket}.{bucket_key}"

    def _seal(self, bucket_key: str, value: bytes) -> bytes:
        value = bytes(value)
        if len(value) > self.options.max_value_len:
            raise KvError(KvErrorKind.TOO_LARGE, f"{len(value)} bytes, at most {self.options.max_value_len}")
        exp = 0 if self.options.ttl is None else now_ms() + int(self.options.ttl * 1000)
        try:
            _, body = self._ns.sealer.seal(self._aad_subject(bucket_key), f"exp={exp}", value)
        except TenantBusError as e:
            raise KvError(KvErrorKind.SEAL, str(e)) from e
        return bytes((VALUE_FORMAT,)) + _EXP.pack(exp) + body

    def _open_any(self, key: str, revision: int, stored: bytes) -> KvEntry:
        def tampered(why: str) -> KvError:
            return KvError(KvErrorKind.TAMPERED, f"{self.store}/{key} revision {revision}: {why}")

        if len(stored) < VALUE_PREFIX_LEN:
            raise tampered("truncated" if stored else "empty")
        if stored[0] != VALUE_FORMAT:
            raise tampered("unknown value format")
        (exp,) = _EXP.unpack_from(stored, 1)
        keys = self._ns.keys
        try:
            stamp, plain = open_envelope(
                keys, self._aad_subject(self._prefix + key), f"exp={exp}", stored[VALUE_PREFIX_LEN:]
            )
        except EnvelopeError as e:
            if e.reason == DropReason.UNKNOWN_KEY:
                raise KvError(
                    KvErrorKind.KEY_VERSION,
                    f"{self.store}/{key} revision {revision}: versions held {sorted(keys.versions())}",
                ) from None
            raise tampered(e.reason.value) from None
        return KvEntry(
            key=key,
            value=plain,
            revision=revision,
            key_version=stamp.key_version,
            sealed_at_ms=stamp.timestamp_ms,
            writer=stamp.sender,
            expires_at_ms=exp or None,
        )

    def _open_value(self, key: str, revision: int, stored: bytes) -> KvEntry:
        entry = self._open_any(key, revision, stored)
        if entry.expires_at_ms is not None and entry.expires_at_ms <= now_ms():
            raise KvError(KvErrorKind.NOT_FOUND, f"{key}: expired")
        return entry

    async def _raw(self, bucket_key: str) -> Any:
        """The latest bucket entry of ``bucket_key`` (a delete marker too), or None."""
        try:
            return await self._kv.get(bucket_key)
        except nats.js.errors.KeyNotFoundError as e:
            # nats-py reports a delete marker as not found, with its entry.
            return getattr(e, "entry", None)
        except Exception as e:
            raise _unavailable(f"get {bucket_key}", e) from e

    async def get(self, key: str) -> KvEntry:
        """The current value of ``key``, opened and verified."""
        bucket_key = self.bucket_key(key)
        try:
            e = await self._kv.get(bucket_key)
        except nats.js.errors.KeyNotFoundError:
            raise KvError(KvErrorKind.NOT_FOUND, key) from None
        except Exception as e:
            raise _unavailable(f"get {key}", e) from e
        return self._open_value(key, e.revision, e.value or b"")

    async def put(self, key: str, value: bytes) -> int:
        """Writes ``value`` under ``key``; the new revision."""
        bucket_key = self.bucket_key(key)
        stored = self._seal(bucket_key, value)
        try:
            return int(await while_unrouted(lambda: self._kv.put(bucket_key, stored)))
        except Exception as e:
            raise _unavailable(f"put {key}", e) from e

    async def create(self, key: str, value: bytes) -> int:
        """Writes ``value`` only if ``key`` holds no value (never written,
        deleted or expired); :attr:`KvErrorKind.EXISTS` otherwise."""
        bucket_key = self.bucket_key(key)
        stored = self._seal(bucket_key, value)
        try:
            return int(await while_unrouted(lambda: self._kv.create(bucket_key, stored)))
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        except Exception as e:
            raise _unavailable(f"create {key}", e) from e
        # An expired value counts as absent: replace exactly it (CAS).
        try:
            await self.get(key)
            raise KvError(KvErrorKind.EXISTS, key)
        except KvError as g:
            if g.kind != KvErrorKind.NOT_FOUND:
                if g.kind in (KvErrorKind.TAMPERED, KvErrorKind.KEY_VERSION):
                    raise KvError(KvErrorKind.EXISTS, key) from None
                raise
        current = await self._raw(bucket_key)
        if current is None:
            raise KvError(KvErrorKind.EXISTS, key)
        try:
            return int(await self._kv.update(bucket_key, stored, last=current.revision))
        except nats.js.errors.KeyWrongLastSequenceError:
            raise KvError(KvErrorKind.EXISTS, key) from None
        except Exception as e:
            raise _unavailable(f"create {key}", e) from e

    async def update(self, key: str, value: bytes, revision: int) -> int:
        """Writes ``value`` only if ``key``'s latest revision is ``revision``
        (compare-and-set); :attr:`KvErrorKind.WRONG_REVISION` otherwise."""
        bucket_key = self.bucket_key(key)
        stored = self._seal(bucket_key, value)
        try:
            return int(
                await while_unrouted(lambda: self._kv.update(bucket_key, stored, last=revision))
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            raise KvError(KvErrorKind.WRONG_REVISION, f"{key}: not at revision {revision}") from None
        except Exception as e:
            raise _unavailable(f"update {key}", e) from e

    async def delete(self, key: str) -> None:
        """Deletes ``key`` (a delete marker; idempotent)."""
        bucket_key = self.bucket_key(key)
        try:
            await while_unrouted(lambda: self._kv.delete(bucket_key))
        except Exception as e:
            raise _unavailable(f"delete {key}", e) from e

    async def delete_if(self, key: str, revision: int) -> None:
        """Deletes ``key`` only if its latest revision is ``revision``."""
        bucket_key = self.bucket_key(key)
        try:
            await while_unrouted(lambda: self._kv.delete(bucket_key, last=revision))
        except nats.js.errors.APIError as e:
            if e.err_code in (10071, 10164):
                raise KvError(KvErrorKind.WRONG_REVISION, f"{key}: not at revision {revision}") from None
            raise _unavailable(f"delete {key}", e) from e
        except Exception as e:
            raise _unavailable(f"delete {key}", e) from e

    async def _subscribe(self, deliver_policy: api.DeliverPolicy, cb: Any) -> Any:
        js = self._ns.nats.jetstream(timeout=self.options.timeout)
        try:
            return await js.subscribe(
                f"$KV.{self.options.bucket}.{self._prefix}>",
                stream=f"KV_{self.options.bucket}",
                cb=cb,
                ordered_consumer=True,
                deliver_policy=deliver_policy,
                pending_msgs_limit=WATCH_MAX_MSGS,
                pending_bytes_limit=WATCH_MAX_BYTES,
            )
        except Exception as e:
            raise _unavailable("subscribing to the store", e) from e

    async def keys(self) -> List[str]:
        """This store's keys holding an unexpired value, at most ``max_keys``
        (more: :attr:`KvErrorKind.TOO_LARGE`). Values are not opened."""
        out: List[str] = []
        done: asyncio.Future[Optional[KvError]] = asyncio.get_running_loop().create_future()
        prefix = f"$KV.{self.options.bucket}.{self._prefix}"
        now = now_ms()

        async def cb(msg: Any) -> None:
            if done.done():
                return
            data = msg.data or b""
            expired = len(data) >= VALUE_PREFIX_LEN and 0 != _EXP.unpack_from(data, 1)[0] <= now
            if not _is_delete(msg.headers) and not expired and msg.subject.startswith(prefix):
                if len(out) >= self.options.max_keys:
                    done.set_result(KvError(KvErrorKind.TOO_LARGE, f"more than {self.options.max_keys} keys"))
                    return
                out.append(msg.subject[len(prefix) :])
            if msg.metadata.num_pending == 0:
                done.set_result(None)

        sub = await self._subscribe(api.DeliverPolicy.LAST_PER_SUBJECT, cb)
        try:
            info = await sub.consumer_info()
            # Empty only by the server's own count: nothing left and nothing
            # ever sent. The pushed messages and this reply travel separately
            # inside the server, so the reply may overtake messages already
            # sent (then this subscription has not seen them yet, and the
            # callback's last message, num_pending 0, ends the wait).
            if info.num_pending == 0 and info.delivered.consumer_seq == 0:
                return []
            err = await asyncio.wait_for(done, self.options.timeout + 0.1 * len(out))
        except asyncio.TimeoutError:
            raise KvError(KvErrorKind.UNAVAILABLE, "keys: timed out") from None
        except KvError:
            raise
        except Exception as e:
            raise _unavailable("keys", e) from e
        finally:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        if err is not None:
            raise err
        return out

    async def watch(self) -> "KvWatch":
        """This store's changes from now on (see :class:`KvChange`)."""
        queue: asyncio.Queue[Any] = asyncio.Queue(WATCH_MAX_MSGS)
        prefix = f"$KV.{self.options.bucket}.{self._prefix}"

        async def cb(msg: Any) -> None:
            key = msg.subject[len(prefix) :] if msg.subject.startswith(prefix) else msg.subject
            revision = msg.metadata.sequence.stream
            if _is_delete(msg.headers):
                change = KvChange(key, revision)
            else:
                try:
                    change = KvChange(key, revision, entry=self._open_value(key, revision, msg.data or b""))
                except KvError as e:
                    if e.kind == KvErrorKind.NOT_FOUND:
                        return  # expired
                    change = KvChange(key, revision, error=e)
            await queue.put(change)

        sub = await self._subscribe(api.DeliverPolicy.NEW, cb)
        return KvWatch(sub, queue)


class KvWatch:
    """The changes of :meth:`TenantKv.watch`: ``async for change in watch``,
    or :meth:`next` with a timeout; :meth:`stop` ends it."""

    def __init__(self, sub: Any, queue: "asyncio.Queue[Any]") -> None:
        self._sub = sub
        self._queue = queue

    async def next(self, timeout: Optional[float] = None) -> KvChange:
        """The next change; ``asyncio.TimeoutError`` after ``timeout`` seconds."""
        return await asyncio.wait_for(self._queue.get(), timeout)

    def __aiter__(self) -> AsyncIterator[KvChange]:
        return self

    async def __anext__(self) -> KvChange:
        return await self._queue.get()

    async def stop(self) -> None:
        try:
            await self._sub.unsubscribe()
        except Exception:
            pass
