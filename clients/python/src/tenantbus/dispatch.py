"""Task dispatch on JetStream, interoperating with the Rust dispatcher
(``agent-runtime/src/dispatch``): same stream, consumer, subjects, headers,
done-bucket conventions and sealed results, so a Python worker runs tasks a
Rust dispatcher submitted and the reverse.

Names (subjects relative to ``tenant.<id>.``):

==================  ==========================================================
work-queue stream   ``TASKS`` (``TASKS_<id>`` with ``per_tenant_names``), subjects
                    ``tasks.queue.>`` and ``tasks.dead.>``, WorkQueue, file storage
a task              ``tasks.queue.<type>``, sealed (reply empty);
                    ``Nats-Msg-Id`` = the message id in hex
worker consumer     durable ``work-<type>``, pull, explicit ack, filter
                    ``tasks.queue.<type>``, no server delivery limit
dead letter         ``tasks.dead.<type>``: sealed JSON, ``Nats-Msg-Id`` =
                    ``dead-<task id>``
result              ``tasks.results.<task id hex>``: sealed outcome, core NATS
done bucket         ``TASKS_DONE`` (``TASKS_DONE_<id>``): key = task id hex,
                    value = the sealed result; republishes every write to
                    ``tasks.results.<key>``
==================  ==========================================================

One copy per id (``DispatchOptions.one_copy_per_id``, the stream's setting:
``max_msgs_per_subject`` 1, discard new per subject): tasks are published on
``tasks.queue.<type>.<task id hex>`` and dead letters on
``tasks.dead.<type>.<task id hex>``, still sealed for the subject without the
id token, which must name the sealed id. The server then refuses a second copy
of an id while one is queued or running, whatever the duplicate window, so two
workers never hold copies of one task at once (``submit`` reports it as a
duplicate with sequence 0). Every dispatcher and worker follows the stream it
finds. Costs about 18% of raw publish and 12% of raw consume throughput
(measured on one node, 128-byte messages).

The done bucket republishes each recorded outcome to its result subject, so the
server hands it to the requester and a worker sends one message per outcome. A
bucket created before it did (agents cannot change it) is used as it is, and
workers then publish each outcome themselves.

A result plaintext is ``0x00 || output`` (completed) or ``0x01 || u32 deliveries
|| UTF-8 reason`` (dead-lettered). Workers open tasks with the envelope alone
(authentic, this tenant, a held key version, exactly the subject it arrived on),
refuse tasks stamped further ahead than the clock skew, dead-letter tasks older
than ``task_max_age``, and never run a task whose id is in the done bucket with
a record that opens as its sealed outcome (a record that does not is ignored and
counted in ``WorkerStats.unverified_done``).

Agents may create the stream and the done bucket but not change them (the
control plane's allow-list has no ``STREAM.UPDATE``), so the dispatcher refuses
(``STREAM_CONFLICT``) a stream whose subjects are not exactly the tenant's task
subjects or whose configuration would lose, move or copy tasks, and a done
bucket that forgets sooner than ``task_max_age``, as the Rust dispatcher does.

Placement (data residency): the stream and the done bucket are created with
``DispatchOptions.replicas``, else the bundle's ``placement.replicas``, else 1
replica, and, when the bundle names a region, with the JetStream placement tag
``region:<r>`` so every replica lives on that region's servers. When the region
cannot hold them JetStream refuses, and so does :meth:`Dispatcher.create`
(``UNAVAILABLE``, naming the region): they are never created elsewhere. A
stream or bucket found existing without the region's tag (created by someone
else) is refused (``STREAM_CONFLICT``) rather than used: tasks put there would
leave the region.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Dict, List, Optional, Set, Tuple, Union

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from .bundle import MAX_REPLICAS, MIN_REPLICAS, Placement, region_holds
from .envelope import MessageId, now_ms, open_envelope
from .errors import DispatchError, DispatchErrorKind, DropReason, EnvelopeError, IdError, SealError
from .ids import validate_id
from .namespace import TenantNamespace, _as_bytes
from .settle import while_settling, while_unanswered, while_unrouted
from .subject import scope

log = logging.getLogger("tenantbus.dispatch")

#: The default work-queue stream name.
DEFAULT_STREAM = "TASKS"
#: The default bucket of finished task ids.
DEFAULT_DONE_BUCKET = "TASKS_DONE"
#: The header JetStream de-duplicates on.
MSG_ID_HEADER = "Nats-Msg-Id"


@dataclass
class DispatchOptions:
    """Options of a :class:`Dispatcher` and its workers (defaults as Rust's)."""

    #: Stream name.
    stream: str = DEFAULT_STREAM
    #: Done-bucket name.
    done_bucket: str = DEFAULT_DONE_BUCKET
    #: Suffix stream and bucket with ``_<tenant id>`` (tenants sharing an account).
    per_tenant_names: bool = False
    #: JetStream's de-duplication window, seconds.
    duplicate_window: float = 120.0
    #: Deliveries before a failing task is dead-lettered.
    max_deliveries: int = 5
    #: Redelivery delays after the 1st, 2nd, ... failure (the last repeats), seconds.
    backoff: List[float] = field(default_factory=lambda: [1.0, 5.0, 30.0])
    #: How long the server waits for an ack before redelivering, seconds.
    ack_wait: float = 30.0
    #: A handler running longer than this fails the attempt, seconds.
    handler_timeout: float = 300.0
    #: Older tasks are dead-lettered as expired instead of run, seconds.
    task_max_age: float = 24 * 3600.0
    #: How long finished ids (and results) are remembered, seconds (at least ``task_max_age``).
    done_retention: float = 7 * 24 * 3600.0
    #: How often a waiting requester re-reads the done bucket, seconds.
    result_poll: float = 1.0
    #: Replicas of the stream and the done bucket when :meth:`Dispatcher.create`
    #: creates them (1 to 5; existing ones are used as they are). ``None``: the
    #: bundle's ``placement.replicas`` (the deployment's count), else 1.
    replicas: Optional[int] = None
    #: A stream this dispatcher creates admits at most one queued copy of each
    #: task id, enforced by the server (tasks and dead letters on
    #: ``<subject>.<task id hex>``). The stream's setting: every dispatcher
    #: and worker follows the stream it finds, as the Rust one does.
    one_copy_per_id: bool = False

    def names(self, tenant: str) -> Tuple[str, str]:
        """The stream and bucket names for ``tenant``."""
        if self.per_tenant_names:
            return f"{self.stream}_{tenant}", f"{self.done_bucket}_{tenant}"
        return self.stream, self.done_bucket

    def backoff_for(self, delivered: int) -> float:
        """The redelivery delay after the ``delivered``-th failure."""
        if not self.backoff:
            return 1.0
        return self.backoff[min(max(delivered - 1, 0), len(self.backoff) - 1)]


@dataclass(frozen=True)
class TaskOutcome:
    """How a task ended: ``completed`` with ``output``, or dead-lettered with
    ``reason`` after ``deliveries``."""

    completed: bool
    output: bytes = b""
    reason: str = ""
    deliveries: int = 0

    def encode(self) -> bytes:
        """The result plaintext."""
        if self.completed:
            return b"\x00" + self.output
        return b"\x01" + self.deliveries.to_bytes(4, "big") + self.reason.encode("utf-8")

    @classmethod
    def decode(cls, plain: bytes) -> Optional["TaskOutcome"]:
        """Parses a result plaintext, or ``None``."""
        if not plain:
            return None
        if plain[0] == 0:
            return cls(True, output=bytes(plain[1:]))
        if plain[0] == 1 and len(plain) >= 5:
            try:
                reason = bytes(plain[5:]).decode("utf-8")
            except UnicodeDecodeError:
                return None
            return cls(False, reason=reason, deliveries=int.from_bytes(plain[1:5], "big"))
        return None


@dataclass(frozen=True)
class DeadLetter:
    """A task that will not be retried, with why (the JSON of ``tasks.dead.<type>``)."""

    task_id: str
    task_type: str
    reason: str
    deliveries: int
    dispatched_at_ms: int
    sender: Optional[str]
    payload_b64: str

    @property
    def payload(self) -> bytes:
        """The original task payload."""
        return base64.b64decode(self.payload_b64)

    def to_json(self) -> bytes:
        """The JSON form (``sender`` omitted when unknown, as serde does)."""
        d: Dict[str, Any] = {
            "task_id": self.task_id,
            "task_type": self.task_type,
            "reason": self.reason,
            "deliveries": self.deliveries,
            "dispatched_at_ms": self.dispatched_at_ms,
        }
        if self.sender is not None:
            d["sender"] = self.sender
        d["payload_b64"] = self.payload_b64
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "DeadLetter":
        """Parses the JSON form."""
        d = json.loads(data)
        return cls(
            d["task_id"], d["task_type"], d["reason"], int(d["deliveries"]),
            int(d["dispatched_at_ms"]), d.get("sender"), d["payload_b64"],
        )


@dataclass(frozen=True)
class Task:
    """A task as a handler sees it: verified, decrypted."""

    #: Its message id (its idempotency key).
    id: MessageId
    #: Its type.
    task_type: str
    #: The decrypted payload.
    payload: bytes
    #: The dispatching agent, if it identified itself.
    sender: Optional[str]
    #: When it was dispatched, ms since the epoch (sender's clock).
    dispatched_at_ms: int
    #: This delivery's number, from 1.
    delivery: int
    #: Deliveries allowed before the task is dead-lettered.
    max_deliveries: int


#: A handler: ``async def handler(task) -> bytes``; raising fails the attempt
#: (retried with backoff, then dead-lettered with ``str(exception)`` as reason).
TaskHandler = Callable[[Task], Awaitable[Union[bytes, bytearray, str]]]


@dataclass(frozen=True)
class SealedTask:
    """A sealed task, ready to submit (and to submit again after a lost ack)."""

    id: MessageId
    task_type: str
    subject: str
    body: bytes


@dataclass(frozen=True)
class Submitted:
    """What the stream said about a submission."""

    id: MessageId
    sequence: int
    duplicate: bool


def _unavailable(what: str, e: BaseException) -> DispatchError:
    return DispatchError(DispatchErrorKind.UNAVAILABLE, f"{what}: {type(e).__name__}: {e}")


def _cannot_create(what: str, where: str, e: BaseException) -> DispatchError:
    """JetStream refused to create ``what``: with a region, that is its
    servers being unable to hold it (down, or too few for the replicas), an
    outage of the region rather than a conflict; never retried elsewhere."""
    detail = getattr(e, "description", None) or str(e)
    return DispatchError(DispatchErrorKind.UNAVAILABLE, f"cannot create {what}{where}: {detail}")


def _refuses(text: str, name: str) -> bool:
    """Whether a permissions-violation text (``... to "<subject>"``) names a
    ``$JS.API`` subject carrying ``name``'s tokens consecutively (as the Rust
    ``dispatch::refuses``; nats-py lowercases the text, so case is ignored)."""
    parts = text.split('"')
    if len(parts) < 2:
        return False
    subject = parts[1].lower()
    if not subject.startswith("$js.api."):
        return False
    tokens = subject.split(".")
    want = name.lower().split(".")
    return any(tokens[i : i + len(want)] == want for i in range(len(tokens) - len(want) + 1))


async def _api_call(ns: TenantNamespace, what: str, name: str, step: Awaitable[Any]) -> Any:
    """Runs ``step``, a JetStream API call about ``name`` (a stream name, or
    ``<stream>.<durable>`` for a consumer). If meanwhile the server refuses
    this connection a ``$JS.API`` subject naming ``name``, raises ``PERMISSION_DENIED`` at once
    naming the subject (the server answers a denied request with nothing, so
    the step itself would only time out), as the Rust ``dispatch::api_call``."""
    with ns.watch_permissions() as violations:
        running = asyncio.ensure_future(step)
        try:
            while True:
                refused = asyncio.ensure_future(violations.get())
                done, _ = await asyncio.wait({running, refused}, return_when=asyncio.FIRST_COMPLETED)
                if running in done:
                    refused.cancel()
                    return running.result()
                text = refused.result()
                if _refuses(text, name):
                    raise DispatchError(
                        DispatchErrorKind.PERMISSION_DENIED,
                        f"{what}: the server refused this connection ({text}); "
                        "its credentials do not allow this step, reissue them",
                    )
        finally:
            if not running.done():
                running.cancel()


async def _after_lookup(
    js: Any, stream: str, durable: str, subscribe: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any
) -> Any:
    """Looks consumer ``durable`` of ``stream`` up, asking again while no
    answer comes (a consumer electing a new leader answers nothing: see
    :func:`tenantbus.settle.while_unanswered`), then runs
    ``subscribe(*args, **kwargs)``: nats-py's ``pull_subscribe``, which looks
    it up once more (answered now) and creates it when it does not exist.
    The first four parameters are positional-only: ``stream`` and ``durable``
    are also keywords of ``pull_subscribe``."""
    try:
        await while_unanswered(lambda: js.consumer_info(stream, durable))
    except nats.js.errors.NotFoundError:
        pass
    return await subscribe(*args, **kwargs)


def validate_task_type(task_type: str) -> str:
    """A task type is a slug (one subject token)."""
    try:
        return validate_id(task_type, "task type")
    except IdError as e:
        raise DispatchError(DispatchErrorKind.INVALID_TASK_TYPE, str(e)) from e


def _placement_tags(placement: Any) -> List[str]:
    """The tags of a stream's configured placement (for messages)."""
    return list(getattr(placement, "tags", None) or [])


#: nats-py's StreamConfig fields (older releases lack some).
_STREAM_FIELDS = frozenset(getattr(api.StreamConfig, "__dataclass_fields__", {}))


def _results_republish(tenant: str, bucket: str) -> api.RePublish:
    """The done bucket's republish: every write to ``tasks.results.<key>``
    (as the Rust dispatcher creates it)."""
    return api.RePublish(src=f"$KV.{bucket}.>", dest=scope(tenant, "tasks.results.>"), headers_only=False)


def _republishes(config: Any, expected: api.RePublish) -> bool:
    """Whether a bucket's stream config republishes as ``expected``."""
    got = getattr(config, "republish", None)
    return (
        got is not None
        and got.src == expected.src
        and got.dest == expected.dest
        and not got.headers_only
    )


def _kv_stream_config(
    bucket: str,
    description: str,
    ttl: float,
    replicas: int,
    placement: Optional[api.Placement],
    republish: api.RePublish,
) -> api.StreamConfig:
    """The stream of a done bucket (``KV_<bucket>``) as nats-py's and
    async-nats's ``create_key_value`` build it, plus ``placement``: nats-py's
    ``create_key_value`` does not pass ``KeyValueConfig.placement`` on to the
    stream (2.16), and a bucket in the region must never be created without
    it, so the dispatcher creates the stream itself."""
    fields: Dict[str, Any] = dict(
        name=f"KV_{bucket}",
        description=description,
        subjects=[f"$KV.{bucket}.>"],
        allow_rollup_hdrs=True,
        deny_delete=True,
        discard=api.DiscardPolicy.NEW,
        duplicate_window=min(120.0, ttl) if ttl else 120.0,
        max_age=ttl,
        max_bytes=-1,
        max_consumers=-1,
        max_msg_size=-1,
        max_msgs=-1,
        max_msgs_per_subject=1,
        num_replicas=replicas,
        storage=api.StorageType.FILE,
        placement=placement,
        allow_msg_ttl=True,
        republish=republish,
    )
    return api.StreamConfig(**{k: v for k, v in fields.items() if k in _STREAM_FIELDS})


def _unusable_task_stream(config: Any, subjects: List[str]) -> Optional[str]:
    """Why an existing task stream cannot be used, if it cannot (the same rules
    as the Rust dispatcher): not exactly the tenant's task subjects, not a work
    queue, a limit that drops queued tasks, or a transform, republish, mirror,
    sources or seal that moves, copies or stops them."""
    have = list(config.subjects or [])
    if len(have) != len(subjects) or any(s not in have for s in subjects):
        return f"has subjects {have}"
    if config.retention != api.RetentionPolicy.WORK_QUEUE:
        return f"retention {config.retention}, not a work queue"
    # One message per subject with new ones refused (one copy per id) drops
    # nothing queued: a copy is refused to its publisher instead.
    per_subject = 0 if _one_copy_per_id(config) else config.max_msgs_per_subject
    limits = [config.max_msgs, config.max_bytes, per_subject]
    if any((v or 0) > 0 for v in limits) or (config.max_age or 0) > 0:
        return (
            f"limits would drop queued tasks (max_msgs {config.max_msgs}, max_bytes {config.max_bytes}, "
            f"max_msgs_per_subject {config.max_msgs_per_subject}, max_age {config.max_age})"
        )
    # getattr: older nats-py releases lack some of these fields.
    if (
        getattr(config, "subject_transform", None) is not None
        or getattr(config, "republish", None) is not None
        or getattr(config, "mirror", None) is not None
        or getattr(config, "sources", None)
        or getattr(config, "sealed", False)
    ):
        return "a subject transform, republish, mirror, sources or seal would move, copy or stop tasks"
    return None


def _one_copy_per_id(config: Any) -> bool:
    """Whether a task stream admits exactly one queued copy per subject, new
    copies refused (what ``one_copy_per_id`` creates)."""
    return (
        config.max_msgs_per_subject == 1
        and config.discard == api.DiscardPolicy.NEW
        and bool(getattr(config, "discard_new_per_subject", False))
    )


def _split_per_id(subject: str) -> Optional[Tuple[str, str]]:
    """On a one-copy-per-id stream: the subject a message's seal is bound to
    and the task id its subject names, or None for a subject without that
    last token (never published by a dispatcher)."""
    sealed_for, _, tid = subject.rpartition(".")
    if sealed_for and len(tid) == 32 and all(c in "0123456789abcdef" for c in tid):
        return sealed_for, tid
    return None


#: What the server says to a copy refused because its subject holds one.
_COPY_REFUSED = (10077, "maximum messages per subject exceeded")


class Dispatcher:
    """Dispatches tasks of one tenant and starts its workers. Create with
    ``await Dispatcher.create(ns, options)``."""

    def __init__(
        self, ns: TenantNamespace, options: DispatchOptions, js: Any, kv: Any, stream: str, republishes: bool = False
    ) -> None:
        self.ns = ns
        self.options = options
        self.js = js
        self.done = kv
        self.stream_name = stream
        self.done_bucket = options.names(ns.tenant)[1]
        #: The done bucket republishes each recorded outcome to its requester.
        self.republishes = republishes
        #: The stream admits one queued copy per task id (set by :meth:`create`).
        self.one_copy_per_id = False

    @classmethod
    async def create(cls, ns: TenantNamespace, options: Optional[DispatchOptions] = None) -> "Dispatcher":
        """Creates (or opens) the tenant's stream and done bucket, replicated
        and placed as the options and the bundle's ``placement`` say (see the
        module docs). Raises :class:`~tenantbus.DispatchError`:
        ``STREAM_CONFLICT`` for an existing stream or bucket that would lose
        tasks or is not placed in the bundle's region, ``UNAVAILABLE`` when
        JetStream cannot be reached or cannot hold them (in the region)."""
        options = options or DispatchOptions()
        options.done_retention = max(options.done_retention, options.task_max_age)
        placement: Placement = getattr(ns, "placement", None) or Placement()
        replicas = options.replicas if options.replicas is not None else (placement.replicas or 1)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or not MIN_REPLICAS <= replicas <= MAX_REPLICAS:
            raise ValueError(f"replicas must be {MIN_REPLICAS} to {MAX_REPLICAS}, not {replicas!r}")
        region = placement.region
        js_placement = api.Placement(tags=placement.tags) if region is not None else None
        # Named in every failure to create, so "the region cannot hold it"
        # reads as such and not as a generic outage.
        where = f" in region {region} (servers tagged {placement.tags[0]})" if region is not None else ""
        stream, bucket = options.names(ns.tenant)
        js = ns.nats.jetstream()
        subjects = [scope(ns.tenant, "tasks.queue.>"), scope(ns.tenant, "tasks.dead.>")]
        try:
            try:
                # A tenant created a moment ago, or a stream electing a new
                # leader: see tenantbus.settle.
                info = await while_unanswered(lambda: js.stream_info(stream))
            except nats.js.errors.NotFoundError:
                try:
                    # A tenant created a moment ago may not be known to
                    # JetStream on every server yet (see tenantbus.settle).
                    config = api.StreamConfig(
                        name=stream,
                        description=f"agentbus tasks of tenant {ns.tenant}",
                        subjects=subjects,
                        retention=api.RetentionPolicy.WORK_QUEUE,
                        storage=api.StorageType.FILE,
                        duplicate_window=options.duplicate_window,
                        num_replicas=replicas,
                        placement=js_placement,
                    )
                    if options.one_copy_per_id:
                        config.max_msgs_per_subject = 1
                        config.discard = api.DiscardPolicy.NEW
                        config.discard_new_per_subject = True
                    info = await while_settling(lambda: js.add_stream(config))
                except nats.js.errors.BadRequestError as refused:
                    # Created concurrently (a different config: checked below),
                    # or refused, e.g. no server of the region can hold it.
                    try:
                        info = await js.stream_info(stream)
                    except nats.js.errors.NotFoundError:
                        raise _cannot_create(f"stream {stream} of tenant {ns.tenant}", where, refused) from refused
        except DispatchError:
            raise
        except Exception as e:
            raise _unavailable(f"stream {stream}{where}", e) from e
        why = _unusable_task_stream(info.config, subjects)
        if why is not None:
            raise DispatchError(DispatchErrorKind.STREAM_CONFLICT, f"stream {stream}: {why}")
        if region is not None and not region_holds(region, info.config.placement):
            raise DispatchError(
                DispatchErrorKind.STREAM_CONFLICT,
                f"stream {stream} of tenant {ns.tenant} is not placed in region {region} "
                f"(placement tags {_placement_tags(info.config.placement)})",
            )
        description = f"agentbus finished tasks of tenant {ns.tenant}"
        republish = _results_republish(ns.tenant, bucket)
        created = False
        try:
            try:
                kv = await while_unanswered(lambda: js.key_value(bucket))
            except nats.js.errors.BucketNotFoundError:
                if js_placement is None:
                    done_config = api.KeyValueConfig(
                        bucket=bucket,
                        description=description,
                        history=1,
                        ttl=options.done_retention,
                        storage=api.StorageType.FILE,
                        replicas=replicas,
                        republish=republish,
                    )
                    kv = await while_settling(lambda: js.create_key_value(done_config))
                    created = True
                else:
                    try:
                        kv_stream = _kv_stream_config(
                            bucket, description, options.done_retention, replicas, js_placement, republish
                        )
                        await while_settling(lambda: js.add_stream(kv_stream))
                        created = True
                    except nats.js.errors.BadRequestError as refused:
                        try:
                            await js.stream_info(f"KV_{bucket}")  # created concurrently?
                        except nats.js.errors.NotFoundError:
                            raise _cannot_create(f"bucket {bucket} of tenant {ns.tenant}", where, refused) from refused
                    kv = await js.key_value(bucket)
            # Someone else's bucket: a done record must outlive the task max age,
            # or a replayed copy of a finished task would be neither recognised as
            # done nor refused as expired (ours keeps at least that long). And it
            # must be in the region: done records hold sealed task outputs.
            kv_config = None if created else (await js.stream_info(f"KV_{bucket}")).config
        except DispatchError:
            raise
        except Exception as e:
            raise _unavailable(f"bucket {bucket}{where}", e) from e
        kept = 0.0 if kv_config is None else (kv_config.max_age or 0)
        if kv_config is not None and region is not None and not region_holds(region, kv_config.placement):
            raise DispatchError(
                DispatchErrorKind.STREAM_CONFLICT,
                f"bucket {bucket} of tenant {ns.tenant} is not placed in region {region} "
                f"(placement tags {_placement_tags(kv_config.placement)})",
            )
        if kept > 0 and kept < options.task_max_age:
            raise DispatchError(
                DispatchErrorKind.STREAM_CONFLICT,
                f"bucket {bucket} keeps records {int(kept)} s, less than the task max age of "
                f"{int(options.task_max_age)} s",
            )
        republishes = kv_config is None or _republishes(kv_config, republish)
        d = cls(ns, options, js, kv, stream, republishes)
        d.one_copy_per_id = _one_copy_per_id(info.config)
        return d

    # -- subjects --------------------------------------------------------

    def task_subject(self, task_type: str) -> str:
        """The full subject of tasks of ``task_type``, which their seals are
        bound to (and which they are published on, unless the stream admits
        one copy per id: see :meth:`queue_subject`)."""
        return scope(self.ns.tenant, f"tasks.queue.{task_type}")

    def queue_subject(self, task_type: str, task_id: MessageId) -> str:
        """The full subject task ``task_id`` is published on."""
        return self._per_id(self.task_subject(task_type), task_id)

    def _per_id(self, subject: str, task_id: MessageId) -> str:
        return f"{subject}.{task_id.to_hex()}" if self.one_copy_per_id else subject

    def _sealed_for(self, subject: str) -> Tuple[str, Optional[str]]:
        """The subject a stored message's seal is bound to, and the task id
        its subject names (one copy per id; an empty subject when it names
        none, which no seal opens for)."""
        if not self.one_copy_per_id:
            return subject, None
        split = _split_per_id(subject)
        return split if split is not None else ("", None)

    def result_subject(self, task_id: MessageId) -> str:
        """The full subject the outcome of task ``task_id`` is published on."""
        return scope(self.ns.tenant, f"tasks.results.{task_id.to_hex()}")

    def dead_subject(self, task_type: str) -> str:
        """The full subject of dead letters of ``task_type``."""
        return scope(self.ns.tenant, f"tasks.dead.{task_type}")

    # -- dispatch --------------------------------------------------------

    def seal(self, task_type: str, payload: Union[bytes, str]) -> SealedTask:
        """Seals a task (not yet submitted)."""
        validate_task_type(task_type)
        sealed_for = self.task_subject(task_type)
        try:
            tid, body = self.ns.sealer.seal(sealed_for, None, _as_bytes(payload))
        except SealError as e:
            raise DispatchError(DispatchErrorKind.SEAL, str(e)) from e
        return SealedTask(tid, task_type, self._per_id(sealed_for, tid), body)

    async def submit(self, task: SealedTask) -> Submitted:
        """Publishes a sealed task with ``Nats-Msg-Id`` = its id and waits for
        the stream's ack. Safe to repeat (a duplicate inside the window is
        dropped; on a one-copy-per-id stream so is a copy while another is
        queued or running: ``duplicate``, sequence 0)."""
        try:
            # Right after the stream was created on a cluster this client's
            # server may not know its subjects yet: see tenantbus.settle (the
            # message id makes a retry safe).
            ack = await while_unrouted(
                lambda: self.js.publish(
                    task.subject, task.body, headers={MSG_ID_HEADER: task.id.to_hex()}
                )
            )
        except nats.js.errors.APIError as e:
            if self.one_copy_per_id and (e.err_code, e.description) == _COPY_REFUSED:
                return Submitted(task.id, 0, True)
            raise _unavailable("publish task", e) from e
        except Exception as e:
            raise _unavailable("publish task", e) from e
        return Submitted(task.id, int(ack.seq), bool(ack.duplicate))

    async def dispatch(self, task_type: str, payload: Union[bytes, str]) -> "TaskHandle":
        """Seals and submits a task, returning a handle to await its outcome."""
        task = self.seal(task_type, payload)
        handle = await self.handle(task.id)
        try:
            await self.submit(task)
        except BaseException:
            await handle.close()
            raise
        return handle

    async def handle(self, task_id: MessageId) -> "TaskHandle":
        """A handle on the outcome of task ``task_id`` (subscribes to its result subject)."""
        h = TaskHandle(self, task_id)
        try:
            h._sub = await self.ns.nats.subscribe(self.result_subject(task_id), cb=h._on_msg)
        except Exception as e:
            raise _unavailable("result subscribe", e) from e
        return h

    def open_result(self, subject: str, body: bytes) -> TaskOutcome:
        """Opens a sealed result (no freshness check: a result is keyed by task id)."""
        try:
            _, plain = open_envelope(self.ns.keys, subject, None, body)
        except EnvelopeError as e:
            raise DispatchError(DispatchErrorKind.CORRUPT, e.kind.value) from e
        outcome = TaskOutcome.decode(plain)
        if outcome is None:
            raise DispatchError(DispatchErrorKind.CORRUPT, "undecodable outcome")
        return outcome

    async def outcome(self, task_id: MessageId) -> Optional[TaskOutcome]:
        """The recorded outcome of ``task_id`` if it has finished (done bucket)."""
        body = await self._done_get(task_id.to_hex())
        if body is None:
            return None
        return self.open_result(self.result_subject(task_id), body)

    async def _done_get(self, key: str) -> Optional[bytes]:
        try:
            entry = await self.done.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        except Exception as e:
            raise _unavailable("done bucket read", e) from e
        return bytes(entry.value) if entry.value is not None else None

    async def worker(
        self,
        task_type: str,
        handler: TaskHandler,
        concurrency: int = 4,
        fetch_expires: float = 2.0,
    ) -> "Worker":
        """Starts a worker for ``task_type`` running ``handler``."""
        validate_task_type(task_type)
        w = Worker(self, task_type, handler, max(1, concurrency), max(0.1, fetch_expires))
        await w._start()
        return w

    async def dead_letters(self, timeout: float = 1.0, max_letters: int = 100) -> List[DeadLetter]:
        """Reads (and removes) up to ``max_letters`` dead letters through the
        durable consumer ``dead-letters``, waiting up to ``timeout`` seconds."""
        sub = await _api_call(
            self.ns,
            "dead-letter consumer",
            f"{self.stream_name}.dead-letters",
            _after_lookup(
                self.js,
                self.stream_name,
                "dead-letters",
                self.js.pull_subscribe,
                scope(self.ns.tenant, "tasks.dead.>"),
                durable="dead-letters",
                stream=self.stream_name,
                config=api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT),
            ),
        )
        out: List[DeadLetter] = []
        deadline = time.monotonic() + timeout
        try:
            while len(out) < max_letters:
                left = deadline - time.monotonic()
                if left <= 0.05:
                    break
                try:
                    msgs = await sub.fetch(max_letters - len(out), timeout=left)
                except asyncio.TimeoutError:
                    # nats-py's TimeoutError subclasses asyncio's, which the fetch
                    # also raises itself when it times out elsewhere (under load).
                    break
                for m in msgs:
                    try:
                        # One copy per id: sealed for the subject without its
                        # id token, which must name the letter's task.
                        sealed_for, named = self._sealed_for(m.subject)
                        _, plain = open_envelope(self.ns.keys, sealed_for, None, m.data)
                        letter = DeadLetter.from_json(plain)
                        if named is not None and named != letter.task_id:
                            raise EnvelopeError(DropReason.AUTHENTICATION, "moved to another id")
                        out.append(letter)
                        await m.ack()
                    except Exception:
                        log.warning("terminating an unverifiable dead letter on %s", m.subject)
                        await m.term()
        finally:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        return out


class TaskHandle:
    """Awaits one task's outcome."""

    def __init__(self, d: Dispatcher, task_id: MessageId) -> None:
        self._d = d
        self.id = task_id
        self._subject = d.result_subject(task_id)
        self._results: "asyncio.Queue[bytes]" = asyncio.Queue(maxsize=16)
        self._sub: Any = None

    async def _on_msg(self, msg: Msg) -> None:
        if not self._results.full():
            self._results.put_nowait(msg.data)

    async def wait(self, timeout: float = 30.0) -> TaskOutcome:
        """Waits up to ``timeout`` seconds for the outcome: the sealed result
        message, or the done bucket (re-read every ``result_poll``)."""
        deadline = time.monotonic() + timeout
        poll = self._d.options.result_poll
        try:
            while True:
                try:
                    done = await self._d.outcome(self.id)
                except DispatchError:
                    done = None
                if done is not None:
                    return done
                next_poll = min(time.monotonic() + poll, deadline)
                while True:
                    left = next_poll - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        body = await asyncio.wait_for(self._results.get(), left)
                    except asyncio.TimeoutError:
                        break
                    try:
                        return self._d.open_result(self._subject, body)
                    except DispatchError as e:
                        log.warning("dropped a task result of %s: %s", self.id, e)
                if time.monotonic() >= deadline:
                    raise DispatchError(
                        DispatchErrorKind.TIMED_OUT, f"task {self.id} after {int(timeout * 1000)} ms"
                    )
        finally:
            await self.close()

    async def close(self) -> None:
        """Stops listening for the result."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception:
                pass


@dataclass
class WorkerStats:
    """Counters of one worker."""

    runs: int = 0
    completed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    #: Deliveries of a task running here at that moment (handed back, not run
    #: twice). Nonzero means the server redelivered a task in hand: its
    #: progress acks did not arrive within ``ack_wait``.
    running_copies: int = 0
    rejected: int = 0
    #: Done records that did not open as the task's sealed outcome (ignored).
    unverified_done: int = 0


class Worker:
    """A running worker: pulls tasks of one type with a concurrency cap."""

    def __init__(
        self, d: Dispatcher, task_type: str, handler: TaskHandler, concurrency: int, fetch_expires: float
    ) -> None:
        self._d = d
        self.task_type = task_type
        self._handler = handler
        self._concurrency = concurrency
        self._fetch_expires = fetch_expires
        self.stats = WorkerStats()
        self._in_flight: Set[bytes] = set()
        self._running: Set["asyncio.Task[None]"] = set()
        self._stop = asyncio.Event()
        self._abandon = asyncio.Event()
        self._loop_task: Optional["asyncio.Task[None]"] = None
        self._sub: Any = None

    async def _start(self) -> None:
        d = self._d
        durable = f"work-{self.task_type}"
        try:
            # One copy per id: `tasks.queue.<type>.<id hex>` (as Rust's worker).
            subject = d.task_subject(self.task_type) + (".*" if d.one_copy_per_id else "")
            self._sub = await _api_call(
                d.ns,
                f"consumer {durable}",
                f"{d.stream_name}.{durable}",
                _after_lookup(
                    d.js,
                    d.stream_name,
                    durable,
                    d.js.pull_subscribe,
                    subject,
                    durable=durable,
                    stream=d.stream_name,
                    config=api.ConsumerConfig(
                        durable_name=durable,
                        filter_subject=subject,
                        ack_policy=api.AckPolicy.EXPLICIT,
                        ack_wait=max(0.5, d.options.ack_wait),
                        max_deliver=-1,
                    ),
                ),
            )
        except DispatchError:
            raise
        except Exception as e:
            raise _unavailable(f"consumer {durable}", e) from e
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stops pulling, waits up to ``timeout`` for running tasks, then hands
        the rest back to the server (nak) for another worker."""
        self._stop.set()
        if self._loop_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._loop_task), timeout)
            except asyncio.TimeoutError:
                self._abandon.set()
                try:
                    await asyncio.wait_for(self._loop_task, 2.0)
                except (asyncio.TimeoutError, asyncio.CancelledError):
                    pass
        try:
            await self._sub.unsubscribe()
        except Exception:
            pass

    def abort(self) -> None:
        """Stops at once without acking anything (as a crash would)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
        for t in list(self._running):
            t.cancel()

    async def _run(self) -> None:
        slots = asyncio.Semaphore(self._concurrency)
        backoff = 0.1
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            await slots.acquire()
            n = 1
            while n < self._concurrency and not slots.locked():
                await slots.acquire()
                n += 1
            if self._stop.is_set():
                for _ in range(n):
                    slots.release()
                break
            try:
                msgs = await self._sub.fetch(n, timeout=self._fetch_expires)
                backoff = 0.1
            except nats.errors.TimeoutError:
                msgs = []
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("task pull failed (%s); retrying", e)
                msgs = []
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            for msg in msgs:
                if self._stop.is_set() or n == 0:
                    await _settle(msg, "nak")
                    continue
                n -= 1
                t = loop.create_task(self._process_then_release(msg, slots))
                self._running.add(t)
                t.add_done_callback(self._running.discard)
            for _ in range(n):
                slots.release()
        if self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)

    async def _process_then_release(self, msg: Msg, slots: asyncio.Semaphore) -> None:
        try:
            await self._process(msg)
        except Exception as e:  # a bug here must not kill the worker
            log.warning("task processing failed: %s", e)
        finally:
            slots.release()

    async def _process(self, msg: Msg) -> None:
        d = self._d
        opts = d.options
        try:
            delivered = max(1, int(msg.metadata.num_delivered))
        except Exception:
            delivered = 1
        try:
            # One copy per id: the seal is bound to the subject without its
            # id token, and that token must name the sealed id (a task moved
            # to another id's subject is refused like a broken seal).
            sealed_for, named = d._sealed_for(msg.subject)
            stamp, payload = open_envelope(d.ns.keys, sealed_for, None, msg.data)
            if named is not None and named != stamp.msg_id.to_hex():
                raise EnvelopeError(DropReason.AUTHENTICATION, "moved to another id")
        except EnvelopeError as e:
            self.stats.rejected += 1
            log.warning("terminating a task that failed verification: %s", e.kind.value)
            await _settle(msg, "term")
            return
        now = now_ms()
        if stamp.timestamp_ms > now + d.ns.options.clock_skew_ms:
            self.stats.rejected += 1
            log.warning("terminating a task stamped in the future: %s", stamp.msg_id)
            await _settle(msg, "term")
            return
        tid = stamp.msg_id
        if tid in self._in_flight:
            self.stats.running_copies += 1
            await _settle(msg, "nak", 1.0)
            return
        self._in_flight.add(tid)
        try:
            try:
                stored = await _retry(lambda: d._done_get(tid.to_hex()))
            except Exception as e:
                log.warning("cannot read the done bucket (%s); retrying later", e)
                await _settle(msg, "nak", opts.backoff_for(1))
                return
            if stored is not None:
                # Any agent of the tenant may write the done bucket, so a record
                # counts only if it opens as this task's sealed outcome.
                try:
                    d.open_result(d.result_subject(tid), stored)
                except DispatchError as e:
                    self.stats.unverified_done += 1
                    log.warning("ignoring a done record of %s that fails verification (%s)", tid, e)
                    stored = None
            if stored is not None:
                self.stats.duplicates += 1
                try:
                    await d.ns.nats.publish(d.result_subject(tid), stored)
                except Exception:
                    pass
                await _settle(msg, "ack")
                return
            task = Task(
                id=tid,
                task_type=self.task_type,
                payload=payload,
                sender=stamp.sender,
                dispatched_at_ms=stamp.timestamp_ms,
                delivery=delivered,
                max_deliveries=opts.max_deliveries,
            )
            age_s = max(0, now - stamp.timestamp_ms) / 1000
            if age_s > opts.task_max_age:
                await self._give_up(
                    msg, task,
                    f"expired: queued {int(age_s)} s, longer than the task max age of {int(opts.task_max_age)} s",
                )
                return
            if delivered > opts.max_deliveries:
                await self._give_up(
                    msg, task,
                    f"delivery limit of {opts.max_deliveries} reached without an outcome "
                    "(a worker stopped or timed out mid-task)",
                )
                return
            self.stats.runs += 1
            result = await self._run_handler(msg, task)
            if result is None:  # abandoned at shutdown
                await _settle(msg, "nak")
                return
            ok, value = result
            if ok:
                out = value if isinstance(value, bytes) else _as_bytes(value)  # type: ignore[arg-type]
                if await self._finish(msg, tid, TaskOutcome(True, output=out)):
                    try:
                        await _retry(msg.ack)
                    except Exception:
                        log.debug("ack not sent; a redelivery will find %s done", tid)
                    self.stats.completed += 1
            elif delivered >= opts.max_deliveries:
                await self._give_up(msg, task, str(value))
            else:
                self.stats.retried += 1
                await _settle(msg, "nak", opts.backoff_for(delivered))
        finally:
            self._in_flight.discard(tid)

    async def _run_handler(self, msg: Msg, task: Task) -> Optional[Tuple[bool, Any]]:
        opts = self._d.options
        progress_every = max(opts.ack_wait / 3, 0.1)

        async def call() -> Any:
            r = self._handler(task)
            if inspect.isawaitable(r):
                r = await r
            return r

        run = asyncio.ensure_future(call())
        deadline = time.monotonic() + opts.handler_timeout
        abandon = asyncio.ensure_future(self._abandon.wait())
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    run.cancel()
                    return False, f"handler timed out after {int(opts.handler_timeout * 1000)} ms"
                done, _ = await asyncio.wait(
                    {run, abandon}, timeout=min(progress_every, left), return_when=asyncio.FIRST_COMPLETED
                )
                if run in done:
                    exc = run.exception()
                    if exc is not None:
                        return False, str(exc) or type(exc).__name__
                    return True, run.result()
                if abandon in done:
                    run.cancel()
                    return None
                await _settle(msg, "progress")
        finally:
            abandon.cancel()

    async def _finish(self, msg: Msg, tid: MessageId, outcome: TaskOutcome) -> bool:
        """Records the outcome (sealed, in the done bucket) and publishes it."""
        d = self._d
        subject = d.result_subject(tid)
        try:
            _, sealed = d.ns.sealer.seal(subject, None, outcome.encode())
        except SealError as e:
            log.warning("cannot seal the outcome of %s: %s", tid, e)
            await _settle(msg, "nak", 1.0)
            return False
        try:
            await _retry(lambda: d.done.put(tid.to_hex(), sealed))
        except Exception as e:
            log.warning("cannot record the outcome of %s (%s); handing it back", tid, e)
            await _settle(msg, "nak", 1.0)
            return False
        if not d.republishes:  # the bucket did not hand it over
            try:
                await d.ns.nats.publish(subject, sealed)
            except Exception:
                pass  # best effort: a requester that misses it reads the done bucket
        return True

    async def _give_up(self, msg: Msg, task: Task, reason: str) -> None:
        """Dead-letters the task, records the outcome, terminates it."""
        d = self._d
        letter = DeadLetter(
            task_id=task.id.to_hex(),
            task_type=task.task_type,
            reason=reason,
            deliveries=task.delivery,
            dispatched_at_ms=task.dispatched_at_ms,
            sender=task.sender,
            payload_b64=base64.b64encode(task.payload).decode("ascii"),
        )
        sealed_for = d.dead_subject(task.task_type)
        # One copy per id: one dead letter per task id, on its own subject.
        subject = d._per_id(sealed_for, task.id)
        try:
            _, body = d.ns.sealer.seal(sealed_for, None, letter.to_json())
        except SealError as e:
            log.warning("cannot seal the dead letter of %s: %s", task.id, e)
            await _settle(msg, "nak", 1.0)
            return
        try:
            await _retry(
                lambda: d.js.publish(subject, body, headers={MSG_ID_HEADER: f"dead-{task.id.to_hex()}"})
            )
        except Exception as e:
            log.warning("cannot publish the dead letter of %s (%s); handing it back", task.id, e)
            await _settle(msg, "nak", 1.0)
            return
        outcome = TaskOutcome(False, reason=reason, deliveries=task.delivery)
        if await self._finish(msg, task.id, outcome):
            await _settle(msg, "term")
            self.stats.dead_lettered += 1


async def _settle(msg: Msg, kind: str, delay: Optional[float] = None) -> None:
    try:
        if kind == "ack":
            await msg.ack()
        elif kind == "nak":
            await msg.nak(delay=delay)
        elif kind == "term":
            await msg.term()
        elif kind == "progress":
            await msg.in_progress()
    except Exception as e:
        log.debug("%s failed (%s); the server will redeliver", kind, e)


async def _retry(f: Callable[[], Awaitable[Any]], attempts: int = 16) -> Any:
    """Retries ``f`` with a growing pause (about 30 s in all)."""
    pause = 0.1
    for attempt in range(attempts + 1):
        try:
            return await f()
        except Exception:
            if attempt >= attempts:
                raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)
    raise AssertionError("unreachable")
