"""tenantbus: the Python client of the agentbus multi-tenant NATS message bus.

A :class:`TenantNamespace` confines an agent to subjects under ``tenant.<id>.``;
every message it sends is stamped (tenant, message id, timestamp, sender) and
sealed with AES-256-GCM under the tenant's key, byte for byte as the Rust
``tenant-bus`` crate does (``docs/wire-format.md``); every message it delivers
passed the same verification (tenant, subject, key, tag, freshness, replay)::

    import tenantbus

    ns = await tenantbus.connect("planner.json")
    sub = await ns.subscribe("jobs.>")
    await ns.publish("jobs.created", b'{"id": 1}')
    msg = await sub.next_msg(timeout=5)
    print(msg.subject, msg.sender, msg.payload)
    await ns.close()

With only an API key (``agentbus key create``) instead of a bundle,
:func:`connect_with_key` logs in through the control plane, learns its tenant
from the server and fetches the tenant's key set::

    ns = await tenantbus.connect_with_key("nats://127.0.0.1:4222", key)

Task dispatch interoperating with the Rust dispatcher is in :mod:`tenantbus.dispatch`;
the tenant's sealed state store, shared with Rust agents, is ``await ns.kv("sessions")``
(:mod:`tenantbus.kv`).
"""

from .apikey import KeyRefresher, connect_with_key, is_api_key, parse_api_key
from .bundle import CredentialBundle, Placement
from .envelope import (
    FORMAT_VERSION,
    Header,
    MessageId,
    Sealer,
    Stamp,
    decode_header,
    now_ms,
    open_envelope,
)
from .errors import (
    ApiKeyError,
    ApiKeyErrorKind,
    BundleError,
    BundleErrorKind,
    ConnectError,
    ConnectErrorKind,
    DispatchError,
    DispatchErrorKind,
    DropReason,
    EnvelopeError,
    IdError,
    IdErrorKind,
    KeySetError,
    KeySetErrorKind,
    PublishError,
    PublishErrorKind,
    RequestError,
    RequestErrorKind,
    SealError,
    SealErrorKind,
    SubjectError,
    SubjectErrorKind,
    SubscribeError,
    SubscribeErrorKind,
    TenantBusError,
    UsageError,
    UsageErrorKind,
)
from .ids import validate_agent_id, validate_tenant_id
from .keys import TenantKey, TenantKeySet, derive_key
from .kv import KvChange, KvEntry, KvError, KvErrorKind, KvOptions, TenantKv
from .message import TenantMessage
from .namespace import NamespaceOptions, Subscription, TenantNamespace, connect
from .replay import ReplayGuard
from .subject import inbox_prefix, scope, unscope, validate_pattern, validate_subject
from .usage import report_usage
from .verify import Counters, CountersSnapshot, Freshness, Verifier

__version__ = "0.1.0"

__all__ = [
    "KvChange",
    "KvEntry",
    "KvError",
    "KvErrorKind",
    "KvOptions",
    "TenantKv",
    "UsageError",
    "UsageErrorKind",
    "report_usage",
    "ApiKeyError",
    "ApiKeyErrorKind",
    "BundleError",
    "BundleErrorKind",
    "ConnectError",
    "ConnectErrorKind",
    "Counters",
    "CountersSnapshot",
    "CredentialBundle",
    "DispatchError",
    "DispatchErrorKind",
    "DropReason",
    "EnvelopeError",
    "FORMAT_VERSION",
    "Freshness",
    "Header",
    "IdError",
    "IdErrorKind",
    "KeyRefresher",
    "KeySetError",
    "KeySetErrorKind",
    "MessageId",
    "NamespaceOptions",
    "Placement",
    "PublishError",
    "PublishErrorKind",
    "ReplayGuard",
    "RequestError",
    "RequestErrorKind",
    "SealError",
    "SealErrorKind",
    "Sealer",
    "Stamp",
    "SubjectError",
    "SubjectErrorKind",
    "SubscribeError",
    "SubscribeErrorKind",
    "Subscription",
    "TenantBusError",
    "TenantKey",
    "TenantKeySet",
    "TenantMessage",
    "TenantNamespace",
    "Verifier",
    "connect",
    "connect_with_key",
    "decode_header",
    "derive_key",
    "inbox_prefix",
    "is_api_key",
    "now_ms",
    "open_envelope",
    "parse_api_key",
    "scope",
    "unscope",
    "validate_agent_id",
    "validate_pattern",
    "validate_subject",
    "validate_tenant_id",
]
