""":class:`TenantNamespace`: an agent's scoped, sealed connection to its tenant.

Everything it sends is sealed under the tenant's current key and addressed to
``tenant.<id>.<relative>``; everything it delivers passed verification. Reply
inboxes live at ``tenant.<id>._INBOX.<instance>.<n>`` (and nats-py's own inbox
prefix is set to ``tenant.<id>._INBOX``), inside the namespace, so the tenant's
server permissions cover them and no other tenant can read them.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    ContextManager,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Tuple,
    Union,
)

import nats
from nats.aio.client import DEFAULT_FLUSH_TIMEOUT
from nats.aio.client import Client as NatsClient
from nats.aio.client import RawCredentials
from nats.aio.msg import Msg

from .bundle import CredentialBundle, PathLike, Placement
from .envelope import MessageId, Sealer
from .errors import (
    ConnectError,
    ConnectErrorKind,
    KeySetError,
    PublishError,
    PublishErrorKind,
    RequestError,
    RequestErrorKind,
    SealError,
    SubjectError,
    SubscribeError,
    SubscribeErrorKind,
)
from .keys import TenantKeySet
from .message import TenantMessage
from .replay import ReplayGuard
from .subject import inbox_prefix, scope, validate_pattern, validate_subject
from .verify import Counters, CountersSnapshot, Freshness, Verifier

if TYPE_CHECKING:  # pragma: no cover
    from .apikey import KeyRefresher
    from .kv import KvOptions, TenantKv

Payload = Union[bytes, bytearray, memoryview, str]
#: An admission hook: called with the payload length before every publish,
#: request and response; returns (or resolves to) ``None`` to admit, or a reason
#: string to refuse.
Admission = Callable[[int], Union[Optional[str], Awaitable[Optional[str]]]]

_NO_RESPONDERS = "503"
_CLOSED = object()


def _as_bytes(payload: Payload) -> bytes:
    if isinstance(payload, str):
        return payload.encode("utf-8")
    return bytes(payload)


@dataclass
class NamespaceOptions:
    """How a namespace connects and verifies (defaults as the Rust crate's)."""

    #: Messages older than this (ms) are dropped as stale. Default 5 minutes.
    replay_window_ms: int = 300_000
    #: Messages stamped further ahead than this (ms) are dropped. Default 30 s.
    clock_skew_ms: int = 30_000
    #: Verified messages buffered per subscription before the reader is
    #: back-pressured (nats-py then buffers, and reports a slow consumer at its
    #: own limit). Default 65,536.
    subscription_capacity: int = 65_536
    #: Sender instances one subscription's anti-replay state tracks. Default 100,000.
    max_replay_senders: int = 100_000
    #: Requests in flight at once; one more fails with ``too_many_pending``.
    max_pending_requests: int = 65_536
    #: How long ``request`` waits for a verified response, seconds. Default 10.
    request_timeout: float = 10.0
    #: How long connecting may take, seconds. Default 5.
    connect_timeout: float = 5.0
    #: The tenant's admission hook (see :data:`Admission`). Default none.
    admission: Optional[Admission] = None
    #: Extra keyword arguments for ``nats.connect`` (e.g. ``tls``).
    nats_options: Dict[str, Any] = field(default_factory=dict)
    #: A NATS token to log in with when the bundle has no ``creds`` (an API
    #: key: :func:`tenantbus.connect_with_key` sets it). Never shown by ``repr``.
    auth_token: Optional[str] = field(default=None, repr=False)

    @property
    def freshness(self) -> Freshness:
        """The freshness settings."""
        return Freshness(self.replay_window_ms, self.clock_skew_ms)


def _validate_creds(creds: str) -> None:
    if (
        "BEGIN NATS USER JWT" not in creds
        or "BEGIN USER NKEY SEED" not in creds
        or "\n" not in creds
    ):
        raise ConnectError(ConnectErrorKind.CREDENTIALS, "bundle creds is not a NATS .creds file")


async def server_barrier(nc: NatsClient, timeout: int = DEFAULT_FLUSH_TIMEOUT) -> None:
    """Returns once the server has processed every command ``nc`` was given
    before the call (a SUB is then live, a PUB delivered to its subscribers).

    One ``nc.flush()`` is not that barrier: nats-py (2.16) writes the flush's
    PING straight to the socket while commands it queued for its flusher task
    (a SUB, a PUB) may still wait in the client, so the PONG can arrive before
    the server has seen them, and a message published from another connection
    right after a ``subscribe`` was lost (seen in CI, reproduced in about 1 of
    100 subscribe-then-publish rounds). Two round trips are: the flusher task
    is already runnable when the first PING goes out and runs before the
    first PONG can be read, so everything queued before the call is on the
    socket ahead of the second PING. ``timeout`` (seconds) applies to each
    round trip; the default is nats-py's own flush timeout."""
    await nc.flush(timeout=timeout)
    await nc.flush(timeout=timeout)


async def connect(
    bundle: Union[CredentialBundle, Mapping[str, Any], PathLike],
    options: Optional[NamespaceOptions] = None,
    **overrides: Any,
) -> "TenantNamespace":
    """Connects to the tenant's namespace with a credential bundle (a file path,
    a dict, or a :class:`CredentialBundle`). Keyword ``overrides`` set fields of
    :class:`NamespaceOptions` (e.g. ``request_timeout=2``)."""
    b = CredentialBundle.load(bundle)
    return await _connect(b, _apply_overrides(options, overrides))


def _apply_overrides(options: Optional[NamespaceOptions], overrides: Mapping[str, Any]) -> NamespaceOptions:
    opts = options or NamespaceOptions()
    for k, v in overrides.items():
        if not hasattr(opts, k):
            raise TypeError(f"unknown namespace option {k!r}")
        setattr(opts, k, v)
    return opts


class PermissionWatch:
    """Hands the server's permission violations on this connection to the
    steps watching for them (:meth:`TenantNamespace.watch_permissions`).

    The server answers a request its permissions deny with nothing; the
    client only hears ``Permissions Violation for Publish to "<subject>"`` on
    the connection. A step that watches can fail at once, naming the subject,
    instead of timing out as if the server were down. Each watcher holds at
    most 64 texts; more are dropped (the count is in the counters)."""

    def __init__(self) -> None:
        self._queues: "set[asyncio.Queue[str]]" = set()

    def publish(self, text: str) -> None:
        for q in list(self._queues):
            if not q.full():
                q.put_nowait(text)

    @contextlib.contextmanager
    def watch(self) -> Iterator["asyncio.Queue[str]"]:
        q: "asyncio.Queue[str]" = asyncio.Queue(maxsize=64)
        self._queues.add(q)
        try:
            yield q
        finally:
            self._queues.discard(q)


async def _connect(
    b: CredentialBundle, opts: NamespaceOptions, fail_fast_auth: bool = False
) -> "TenantNamespace":
    """Connects a loaded bundle. With ``fail_fast_auth`` a server refusing the
    login raises ``authorization`` at once instead of being retried like an
    unreachable server (unreachable servers are still retried)."""
    try:
        b.keys.ensure_tenant(b.tenant)
    except KeySetError as e:
        raise ConnectError(ConnectErrorKind.KEYS, str(e)) from e
    counters = Counters()
    permissions = PermissionWatch()

    async def error_cb(e: Exception) -> None:
        name = type(e).__name__
        text = str(e).lower()
        if name == "SlowConsumerError":
            counters.slow_consumer += 1
        elif "permission" in text:
            counters.permission_violation += 1
            permissions.publish(str(e))
        else:
            counters.server_error += 1

    kwargs: Dict[str, Any] = dict(
        servers=b.servers,
        name=f"agentbus/{b.tenant}/{b.agent}",
        inbox_prefix=inbox_prefix(b.tenant),
        connect_timeout=max(1, int(round(opts.connect_timeout))),
        error_cb=error_cb,
        max_reconnect_attempts=-1,
        allow_reconnect=True,
    )
    if b.creds is not None:
        _validate_creds(b.creds)
        kwargs["user_credentials"] = RawCredentials(b.creds)
    elif opts.auth_token is not None:
        kwargs["token"] = opts.auth_token
    kwargs.update(opts.nats_options)
    nc = NatsClient()
    first: Dict[str, Any] = {"max_reconnect_attempts": 1}
    if fail_fast_auth:
        # A refused CONNECT is raised by nats-py at once only without
        # reconnects; unreachable servers are still tried in turn.
        first["allow_reconnect"] = False
    try:
        # nats-py retries the initial connect like a reconnect: bound it.
        await asyncio.wait_for(nc.connect(**{**kwargs, **first}), timeout=opts.connect_timeout * 2 + 1)
    except Exception as e:
        try:
            await nc.close()
        except Exception:
            pass
        text = f"{type(e).__name__}: {e}"
        kind = (
            ConnectErrorKind.AUTHORIZATION
            if "authoriz" in text.lower() or "authentication" in text.lower()
            else ConnectErrorKind.CONNECTION
        )
        raise ConnectError(kind, f"{b.url}: {text}") from e
    # From now on, reconnect forever (as async-nats does).
    nc.options["max_reconnect_attempts"] = -1
    nc.options["allow_reconnect"] = kwargs["allow_reconnect"]
    counters.server_error = 0  # failed attempts before the connection was made
    return TenantNamespace(nc, b, opts, counters, permissions)


class Subscription:
    """A subscription inside a tenant namespace: yields only messages that
    passed verification (``await sub.next_msg(timeout)`` or ``async for``)."""

    def __init__(self, ns: "TenantNamespace", pattern: str, capacity: int) -> None:
        self._ns = ns
        self.pattern = pattern
        self._verifier = ns.verifier
        self._guard: ReplayGuard = ns.verifier.replay_guard(ns.options.max_replay_senders)
        self._queue: "asyncio.Queue[Any]" = asyncio.Queue(maxsize=max(1, capacity))
        self._inbox = inbox_prefix(ns.tenant) + "."
        self._closed = False
        self._sub: Any = None

    async def _on_msg(self, msg: Msg) -> None:
        subject = msg.subject
        # Reply inboxes belong to request muxers: a leading wildcard pattern
        # matches them; skip such traffic uncounted (as the Rust Subscription).
        if subject.startswith(self._inbox):
            return
        m = self._verifier.verify_counted(self._guard, subject, msg.reply, msg.data)
        if m is not None:
            q = self._queue
            if q.full():
                await q.put(m)
            else:
                q.put_nowait(m)

    @property
    def replay_senders(self) -> int:
        """Sender instances tracked by this subscription's anti-replay state."""
        return self._guard.senders()

    def _mark_closed(self) -> None:
        if not self._closed:
            self._closed = True
            if not self._queue.full():
                self._queue.put_nowait(_CLOSED)

    async def next_msg(self, timeout: Optional[float] = None) -> TenantMessage:
        """The next verified message. Raises :class:`SubscribeError` with kind
        ``timed_out`` after ``timeout`` seconds (``None``: wait forever), or
        ``closed`` once the subscription or namespace is closed and drained."""
        q = self._queue
        if q.empty():
            if self._closed:
                raise SubscribeError(SubscribeErrorKind.CLOSED, self.pattern)
            try:
                item = await asyncio.wait_for(q.get(), timeout)
            except asyncio.TimeoutError:
                raise SubscribeError(SubscribeErrorKind.TIMED_OUT, self.pattern) from None
        else:
            item = q.get_nowait()
        if item is _CLOSED:
            if not q.full():
                q.put_nowait(_CLOSED)  # for other readers
            raise SubscribeError(SubscribeErrorKind.CLOSED, self.pattern)
        return item  # type: ignore[no-any-return]

    def __aiter__(self) -> AsyncIterator[TenantMessage]:
        return self

    async def __anext__(self) -> TenantMessage:
        try:
            return await self.next_msg(None)
        except SubscribeError as e:
            if e.kind is SubscribeErrorKind.CLOSED:
                raise StopAsyncIteration from None
            raise

    async def unsubscribe(self) -> None:
        """Stops the subscription at the server; buffered messages can still be read."""
        if self._closed:
            return
        try:
            await self._sub.unsubscribe()
        except Exception:
            pass  # connection already gone, which ends it too
        self._mark_closed()
        self._ns._subs.discard(self)


class TenantNamespace:
    """An agent's connection to its tenant's namespace. Use :func:`connect`."""

    def __init__(
        self,
        nc: NatsClient,
        bundle: CredentialBundle,
        options: NamespaceOptions,
        counters: Counters,
        permissions: Optional[PermissionWatch] = None,
    ) -> None:
        self._nc = nc
        self._permissions = permissions or PermissionWatch()
        self.tenant: str = bundle.tenant
        self.agent: str = bundle.agent
        #: Replicas and region for the streams and buckets this agent creates,
        #: from its bundle (``placement``): task dispatch uses them unless its
        #: options say otherwise, as the Rust state store and dispatcher do.
        self.placement: Placement = bundle.placement
        self.options = options
        self.sealer = Sealer(bundle.keys, bundle.agent)
        self.verifier = Verifier(bundle.keys, options.freshness, counters)
        self._subs: "set[Subscription]" = set()
        self._muxer: Optional[_Muxer] = None
        self._muxer_lock = asyncio.Lock()
        self._tasks: "set[asyncio.Task[Any]]" = set()
        #: The key-set refresher of a namespace joined with an API key
        #: (:func:`tenantbus.connect_with_key`); ``None`` otherwise.
        self.key_refresher: Optional["KeyRefresher"] = None

    def __repr__(self) -> str:
        return f"TenantNamespace(tenant={self.tenant!r}, agent={self.agent!r})"

    async def __aenter__(self) -> "TenantNamespace":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- accessors -------------------------------------------------------

    @property
    def nats(self) -> NatsClient:
        """The underlying nats-py client (for layers such as task dispatch). The
        server's account permissions still confine it."""
        return self._nc

    async def kv(self, store: str, options: Optional["KvOptions"] = None) -> "TenantKv":
        """The tenant's sealed state store ``store`` (see :mod:`tenantbus.kv`),
        the same store Rust agents open with ``ns.kv(store)``."""
        from .kv import TenantKv

        return await TenantKv.open(self, store, options)

    @property
    def keys(self) -> TenantKeySet:
        """The tenant's key set in force."""
        return self.sealer.keys

    def watch_permissions(self) -> ContextManager["asyncio.Queue[str]"]:
        """A queue of the server's permission-violation texts on this
        connection while the ``with`` block runs (see :class:`PermissionWatch`)."""
        return self._permissions.watch()

    def counters(self) -> CountersSnapshot:
        """Delivery and drop counters (drops per reason, same names as Rust)."""
        return self.verifier.counters.snapshot()

    def update_keys(self, keys: TenantKeySet) -> None:
        """Installs a refreshed key set of this tenant (a rotation): new messages
        are sealed with its current version; receive accepts exactly its versions."""
        keys.ensure_tenant(self.tenant)
        self.sealer.set_keys(keys)
        self.verifier.keys = keys

    def full_subject(self, relative: str) -> str:
        """``tenant.<id>.<relative>`` for a valid relative subject."""
        return scope(self.tenant, validate_subject(relative))

    async def _admit(self, n: int) -> Optional[str]:
        hook = self.options.admission
        if hook is None:
            return None
        outcome = hook(n)
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome is not None:
            self.verifier.counters.rejected_by_admission += 1
        return outcome  # type: ignore[return-value]

    # -- publish ---------------------------------------------------------

    async def publish(self, subject: str, payload: Payload) -> MessageId:
        """Seals and publishes ``payload`` to the relative ``subject``."""
        try:
            validate_subject(subject)
        except SubjectError as e:
            raise PublishError(PublishErrorKind.INVALID_SUBJECT, str(e)) from e
        data = _as_bytes(payload)
        rejected = await self._admit(len(data))
        if rejected is not None:
            raise PublishError(PublishErrorKind.REJECTED, f"{subject}: {rejected}")
        full = scope(self.tenant, subject)
        try:
            msg_id, body = self.sealer.seal(full, None, data)
        except SealError as e:
            raise PublishError(PublishErrorKind.SEAL, str(e)) from e
        try:
            await self._nc.publish(full, body)
        except Exception as e:
            raise PublishError(PublishErrorKind.SEND, f"{type(e).__name__}: {e}") from e
        return msg_id

    async def publish_json(self, subject: str, value: Any) -> MessageId:
        """Serializes ``value`` as JSON, then :meth:`publish` es it."""
        try:
            data = json.dumps(value, separators=(",", ":")).encode()
        except (TypeError, ValueError) as e:
            raise PublishError(PublishErrorKind.SERIALIZE, str(e)) from e
        return await self.publish(subject, data)

    # -- subscribe -------------------------------------------------------

    async def subscribe(self, pattern: str) -> Subscription:
        """Subscribes to a relative subject or pattern (``*``, final ``>``). The
        subscription is live at the server when this returns."""
        return await self._subscribe(pattern, "")

    async def queue_subscribe(self, pattern: str, queue: str) -> Subscription:
        """Subscribes as a member of queue group ``queue`` (one token: printable
        ASCII without ``.``, ``*``, ``>``, at most 64 bytes)."""
        ok = (
            isinstance(queue, str)
            and 0 < len(queue) <= 64
            and all(0x21 <= ord(c) <= 0x7E and c not in ".*>" for c in queue)
        )
        if not ok:
            raise SubscribeError(SubscribeErrorKind.INVALID_QUEUE, repr(str(queue)[:80]))
        return await self._subscribe(pattern, queue)

    async def _subscribe(self, pattern: str, queue: str) -> Subscription:
        try:
            validate_pattern(pattern)
        except SubjectError as e:
            raise SubscribeError(SubscribeErrorKind.INVALID_SUBJECT, str(e)) from e
        sub = Subscription(self, pattern, self.options.subscription_capacity)
        try:
            sub._sub = await self._nc.subscribe(
                scope(self.tenant, pattern),
                queue=queue,
                cb=sub._on_msg,
                pending_msgs_limit=self.options.subscription_capacity,
            )
        except Exception as e:
            raise SubscribeError(SubscribeErrorKind.SEND, f"{type(e).__name__}: {e}") from e
        self._subs.add(sub)
        await self.sync()
        return sub

    async def sync(self) -> None:
        """Waits until the server has processed everything this connection sent
        (see :func:`server_barrier`)."""
        try:
            await server_barrier(self._nc, max(1, int(self.options.request_timeout)))
        except Exception as e:
            raise SubscribeError(SubscribeErrorKind.SEND, f"sync: {type(e).__name__}: {e}") from e

    # -- request / respond -----------------------------------------------

    async def _get_muxer(self) -> "_Muxer":
        if self._muxer is None:
            async with self._muxer_lock:
                if self._muxer is None:
                    m = _Muxer(self)
                    await m.start()
                    self._muxer = m
        return self._muxer

    async def request(
        self, subject: str, payload: Payload, timeout: Optional[float] = None
    ) -> TenantMessage:
        """Sends a sealed request to the relative ``subject`` and waits (``timeout``
        seconds, default the options' ``request_timeout``) for a verified, sealed
        response. Its ``subject`` is the request's."""
        try:
            validate_subject(subject)
        except SubjectError as e:
            raise RequestError(RequestErrorKind.INVALID_SUBJECT, str(e)) from e
        data = _as_bytes(payload)
        rejected = await self._admit(len(data))
        if rejected is not None:
            raise RequestError(RequestErrorKind.REJECTED, f"{subject}: {rejected}")
        muxer = await self._get_muxer()
        token, reply, fut = muxer.register(subject, self.options.max_pending_requests)
        try:
            full = scope(self.tenant, subject)
            try:
                _, body = self.sealer.seal(full, reply, data)
            except SealError as e:
                raise RequestError(RequestErrorKind.SEAL, str(e)) from e
            try:
                await self._nc.publish(full, body, reply=reply)
            except Exception as e:
                raise RequestError(RequestErrorKind.SEND, f"{type(e).__name__}: {e}") from e
            wait = self.options.request_timeout if timeout is None else timeout
            try:
                return await asyncio.wait_for(fut, wait)
            except asyncio.TimeoutError:
                raise RequestError(
                    RequestErrorKind.TIMED_OUT, f"{subject} after {int(wait * 1000)} ms"
                ) from None
        finally:
            muxer.forget(token)

    async def request_json(
        self, subject: str, value: Any, timeout: Optional[float] = None
    ) -> Any:
        """A JSON request: serializes ``value``, decodes the response as JSON."""
        try:
            data = json.dumps(value, separators=(",", ":")).encode()
        except (TypeError, ValueError) as e:
            raise RequestError(RequestErrorKind.SERIALIZE, f"request: {e}") from e
        response = await self.request(subject, data, timeout)
        try:
            return response.json()
        except ValueError as e:
            raise RequestError(RequestErrorKind.SERIALIZE, f"response: {e}") from e

    async def respond(self, to: TenantMessage, payload: Payload) -> MessageId:
        """Seals ``payload`` and sends it to the reply inbox of the verified request ``to``."""
        if not to.reply:
            raise PublishError(PublishErrorKind.NO_REPLY, to.subject)
        data = _as_bytes(payload)
        rejected = await self._admit(len(data))
        if rejected is not None:
            raise PublishError(PublishErrorKind.REJECTED, f"respond: {rejected}")
        try:
            msg_id, body = self.sealer.seal(to.reply, None, data)
        except SealError as e:
            raise PublishError(PublishErrorKind.SEAL, str(e)) from e
        try:
            await self._nc.publish(to.reply, body)
        except Exception as e:
            raise PublishError(PublishErrorKind.SEND, f"{type(e).__name__}: {e}") from e
        return msg_id

    async def respond_json(self, to: TenantMessage, value: Any) -> MessageId:
        """:meth:`respond` with a JSON body."""
        try:
            data = json.dumps(value, separators=(",", ":")).encode()
        except (TypeError, ValueError) as e:
            raise PublishError(PublishErrorKind.SERIALIZE, str(e)) from e
        return await self.respond(to, data)

    # -- lifecycle -------------------------------------------------------

    async def flush(self) -> None:
        """Writes buffered messages and waits until the server has processed
        them (see :func:`server_barrier`)."""
        try:
            await server_barrier(self._nc)
        except Exception as e:
            raise PublishError(PublishErrorKind.SEND, f"flush: {type(e).__name__}: {e}") from e

    @property
    def is_closed(self) -> bool:
        """Whether the connection is closed."""
        return bool(self._nc.is_closed)

    def _own_task(self, task: "asyncio.Task[Any]") -> None:
        """Ties a background task (such as a key refresher) to this namespace:
        :meth:`close` cancels it."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, timeout: float = 5.0) -> None:
        """Flushes everything published, drains the subscriptions (their
        buffered messages stay readable) and closes the connection. Background
        tasks of the namespace (a key refresher) are cancelled first."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            # Cancelled (or already failed): either way they are over.
            await asyncio.gather(*tasks, return_exceptions=True)
        nc = self._nc
        if nc.is_closed:
            for s in list(self._subs):
                s._mark_closed()
            return
        try:
            await nc.flush(timeout=max(1, int(timeout)))
        except Exception:
            pass
        try:
            await asyncio.wait_for(nc.drain(), timeout)
        except Exception:
            pass
        if not nc.is_closed:
            try:
                await nc.close()
            except Exception:
                pass
        for s in list(self._subs):
            s._mark_closed()
        self._subs.clear()


class _Muxer:
    """Routes responses arriving on one wildcard inbox subscription
    (``tenant.<id>._INBOX.<instance hex>.*``) to their waiters."""

    def __init__(self, ns: TenantNamespace) -> None:
        self._ns = ns
        self.prefix = f"{inbox_prefix(ns.tenant)}.{ns.sealer.instance:016x}"
        self._next = itertools.count()
        self._waiters: Dict[int, Tuple[str, "asyncio.Future[TenantMessage]"]] = {}
        self._guard = ns.verifier.replay_guard(ns.options.max_replay_senders)

    async def start(self) -> None:
        try:
            await self._ns._nc.subscribe(f"{self.prefix}.*", cb=self._on_msg)
            # The inbox must be live before the first request goes out, or a
            # fast responder's answer finds no subscription.
            await server_barrier(self._ns._nc)
        except Exception as e:
            raise RequestError(RequestErrorKind.SEND, f"inbox subscribe: {type(e).__name__}: {e}") from e

    def register(self, subject: str, max_pending: int) -> Tuple[int, str, "asyncio.Future[TenantMessage]"]:
        if len(self._waiters) >= max_pending:
            raise RequestError(
                RequestErrorKind.TOO_MANY_PENDING, f"{max_pending} requests already in flight"
            )
        token = next(self._next)
        fut: "asyncio.Future[TenantMessage]" = asyncio.get_running_loop().create_future()
        self._waiters[token] = (subject, fut)
        return token, f"{self.prefix}.{token}", fut

    def forget(self, token: int) -> None:
        self._waiters.pop(token, None)

    async def _on_msg(self, msg: Msg) -> None:
        subject = msg.subject
        rest = subject[len(self.prefix) + 1 :] if subject.startswith(self.prefix + ".") else ""
        if not rest.isdigit() or not rest.isascii():
            return
        entry = self._waiters.get(int(rest))
        if entry is None:
            return  # late, or never issued: ignored without being opened
        request, fut = entry
        if fut.done():
            return
        if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS and not msg.data:
            fut.set_exception(RequestError(RequestErrorKind.NO_RESPONDERS, request))
            return
        m = self._ns.verifier.verify_counted(self._guard, subject, msg.reply, msg.data, response_to=request)
        if m is not None:
            fut.set_result(m)
        # A forged or replayed response satisfies nobody; the real one may still come.
