"""Typed errors.

Every error the package raises on purpose is a :class:`TenantBusError`. Each
carries a ``kind`` (a small :class:`enum.Enum` per operation, mirroring the Rust
crate's ``*ErrorKind`` enums) and a human-readable ``detail``. Branch on
``kind``; the message text is for people and may change.
"""

from __future__ import annotations

import enum
from typing import Generic, TypeVar

K = TypeVar("K", bound=enum.Enum)


class TenantBusError(Exception, Generic[K]):
    """Base class: an error of a ``kind`` with a ``detail``."""

    kind: K
    detail: str

    def __init__(self, kind: K, detail: str = "") -> None:
        self.kind = kind
        self.detail = detail
        text = str(kind.value).replace("_", " ")
        super().__init__(f"{text}: {detail}" if detail else text)


class IdErrorKind(enum.Enum):
    """Which slug rule an id broke (``bus/src/ids.rs``)."""

    EMPTY = "empty"
    TOO_LONG = "too_long"
    INVALID_CHAR = "invalid_char"
    LEADING_HYPHEN = "leading_hyphen"
    TRAILING_HYPHEN = "trailing_hyphen"
    DOUBLE_HYPHEN = "double_hyphen"


class IdError(TenantBusError[IdErrorKind], ValueError):
    """An invalid tenant or agent id."""


class SubjectErrorKind(enum.Enum):
    """Which subject rule was broken (``bus/src/subject.rs``)."""

    EMPTY = "empty"
    TOO_LONG = "too_long"
    TOO_MANY_TOKENS = "too_many_tokens"
    EMPTY_TOKEN = "empty_token"
    INVALID_CHAR = "invalid_char"
    WILDCARD = "wildcard"
    TAIL_WILDCARD_NOT_LAST = "tail_wildcard_not_last"
    RESERVED = "reserved"
    OUTSIDE_NAMESPACE = "outside_namespace"


class SubjectError(TenantBusError[SubjectErrorKind], ValueError):
    """An invalid relative subject or pattern."""


class KeySetErrorKind(enum.Enum):
    """What went wrong with a key or key set."""

    INVALID_MATERIAL = "invalid_material"
    UNKNOWN_VERSION = "unknown_version"
    INVALID_KEY_SET = "invalid_key_set"
    WRONG_TENANT = "wrong_tenant"


class KeySetError(TenantBusError[KeySetErrorKind], ValueError):
    """A key or key-set error."""


class BundleErrorKind(enum.Enum):
    """What went wrong reading a credential bundle."""

    IO = "io"
    INVALID = "invalid"
    TENANT_MISMATCH = "tenant_mismatch"


class BundleError(TenantBusError[BundleErrorKind], ValueError):
    """A credential-bundle error."""


class SealErrorKind(enum.Enum):
    """What went wrong sealing."""

    EXHAUSTED = "exhausted"
    TOO_LONG = "too_long"
    CRYPTO = "crypto"


class SealError(TenantBusError[SealErrorKind]):
    """A sealing error."""


class ConnectErrorKind(enum.Enum):
    """What went wrong connecting."""

    CREDENTIALS = "credentials"
    KEYS = "keys"
    CONNECTION = "connection"
    AUTHORIZATION = "authorization"
    #: :func:`tenantbus.connect_with_key`: the text is not an API key (prefix,
    #: length, characters or checksum), decided offline before any connection.
    INVALID_KEY = "invalid_key"
    #: :func:`tenantbus.connect_with_key`: the server or the control plane
    #: refused the key (unknown, revoked, expired, or its tenant suspended).
    REFUSED = "refused"


class ConnectError(TenantBusError[ConnectErrorKind]):
    """A connect error."""


class ApiKeyErrorKind(enum.Enum):
    """Why a text is not an API key (``KeyFormatError`` of
    ``agent-runtime/control/src/identity/apikey.rs``), decided offline."""

    PREFIX = "prefix"
    LENGTH = "length"
    CHARSET = "charset"
    CHECKSUM = "checksum"

    @property
    def reason(self) -> str:
        """The Rust audit reason (``key_prefix``, ``key_checksum``, ...)."""
        return f"key_{self.value}"


class ApiKeyError(TenantBusError[ApiKeyErrorKind], ValueError):
    """A malformed API key (see :func:`tenantbus.parse_api_key`)."""


class PublishErrorKind(enum.Enum):
    """What went wrong publishing (also ``respond``)."""

    INVALID_SUBJECT = "invalid_subject"
    REJECTED = "rejected"
    SEAL = "seal"
    SERIALIZE = "serialize"
    SEND = "send"
    NO_REPLY = "no_reply"


class PublishError(TenantBusError[PublishErrorKind]):
    """A publish error."""


class SubscribeErrorKind(enum.Enum):
    """What went wrong subscribing or receiving."""

    INVALID_SUBJECT = "invalid_subject"
    INVALID_QUEUE = "invalid_queue"
    SEND = "send"
    TIMED_OUT = "timed_out"
    CLOSED = "closed"


class SubscribeError(TenantBusError[SubscribeErrorKind]):
    """A subscribe error, or a receive that timed out or found the subscription closed."""


class RequestErrorKind(enum.Enum):
    """What went wrong with a request."""

    INVALID_SUBJECT = "invalid_subject"
    REJECTED = "rejected"
    TIMED_OUT = "timed_out"
    NO_RESPONDERS = "no_responders"
    SEAL = "seal"
    SERIALIZE = "serialize"
    SEND = "send"
    TOO_MANY_PENDING = "too_many_pending"


class RequestError(TenantBusError[RequestErrorKind]):
    """A request error."""


class DispatchErrorKind(enum.Enum):
    """What went wrong dispatching or working."""

    INVALID_TASK_TYPE = "invalid_task_type"
    STREAM_CONFLICT = "stream_conflict"
    UNAVAILABLE = "unavailable"
    SEAL = "seal"
    TIMED_OUT = "timed_out"
    CORRUPT = "corrupt"
    #: The server refused this connection a JetStream API subject the step
    #: needs (its credentials' permissions): the detail names the subject.
    PERMISSION_DENIED = "permission_denied"


class DispatchError(TenantBusError[DispatchErrorKind]):
    """A task-dispatch error."""


class DropReason(enum.Enum):
    """Why a received message was dropped. The values are the Rust
    ``DropReason::as_str`` names, used as counter keys."""

    MALFORMED = "malformed"
    UNSUPPORTED_VERSION = "unsupported_version"
    WRONG_TENANT = "wrong_tenant"
    OUTSIDE_NAMESPACE = "outside_namespace"
    UNKNOWN_KEY = "unknown_key"
    AUTHENTICATION = "authentication"
    STALE = "stale"
    FUTURE = "future"
    REPLAY = "replay"
    REPLAY_STATE_FULL = "replay_state_full"
    #: The receive byte budget was used up: the message was dropped on arrival,
    #: unopened, rather than buffered. Counted by the Rust subscriptions (see
    #: ``bus/src/budget.rs``); the Python verifier never raises it.
    RECEIVE_BUDGET = "receive_budget"


class EnvelopeError(TenantBusError[DropReason]):
    """A received body failed decoding or verification; ``kind`` (also
    ``reason``) is the :class:`DropReason`. The only exception the decoder and
    the verifier raise, whatever the bytes."""

    @property
    def reason(self) -> DropReason:
        """The drop reason (same as ``kind``)."""
        return self.kind


class UsageErrorKind(enum.Enum):
    """Why :func:`tenantbus.report_usage` failed (the controller's error codes)."""

    #: A bad unit, amount or idempotency key (checked before sending, too).
    INVALID_INPUT = "invalid_input"
    #: A budget's hard cap refused the charge; ``detail`` names the budget and
    #: when a retry can succeed. Nothing was counted.
    BUDGET_EXCEEDED = "budget_exceeded"
    #: The account is not the tenant's.
    FORBIDDEN = "forbidden"
    #: Refused by policy (e.g. too many distinct units this hour).
    REFUSED = "refused"
    #: The controller or JetStream could not be reached: an outage, not a
    #: refusal; retry with the same idempotency key.
    UNAVAILABLE = "unavailable"
    #: Anything else the controller answered.
    INTERNAL = "internal"


class UsageError(TenantBusError[UsageErrorKind]):
    """A usage report was not counted."""
