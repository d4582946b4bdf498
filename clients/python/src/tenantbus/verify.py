"""Verification on receive, and the drop counters (``bus/src/verify.rs``).

A received message is delivered only if it decodes, names this tenant, is
sealed with a key version the key set holds, authenticates (header, full
subject and reply bound in), arrived on a subject inside the namespace (a reply
inbox inside ``tenant.<id>._INBOX.``), is fresh (not older than the replay
window, not further ahead than the clock skew) and is not a replay. Otherwise it
is dropped and counted under its :class:`~tenantbus.errors.DropReason`.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import Dict, Optional

from .envelope import MessageId, now_ms, open_parts
from .errors import DropReason, EnvelopeError
from .ids import slug_error_bytes
from .keys import TenantKeySet
from .message import TenantMessage
from .replay import ReplayGuard
from .subject import is_tenant_inbox, namespace_prefix, subject_error

log = logging.getLogger("tenantbus")
_IDS = struct.Struct(">QQ")


@dataclass(frozen=True)
class Freshness:
    """Freshness settings (ms)."""

    #: Messages older than this are stale. Default 5 minutes.
    replay_window_ms: int = 300_000
    #: Messages stamped further ahead than this are refused. Default 30 s.
    clock_skew_ms: int = 30_000

    def check(self, timestamp_ms: int, now: int) -> None:
        """Raises ``stale`` or ``future`` :class:`EnvelopeError` if ``timestamp_ms``
        is outside the window around ``now``."""
        if timestamp_ms + self.replay_window_ms < now:
            raise EnvelopeError(DropReason.STALE, "")
        if timestamp_ms > now + self.clock_skew_ms:
            raise EnvelopeError(DropReason.FUTURE, "")

    @property
    def retain_ms(self) -> int:
        """How long anti-replay state remembers a sender (window + skew)."""
        return self.replay_window_ms + self.clock_skew_ms


@dataclass
class CountersSnapshot:
    """A point-in-time copy of a namespace's counters."""

    #: Messages delivered to the application.
    delivered: int = 0
    #: Drops per reason name (every reason present, zeros included).
    dropped: Dict[str, int] = field(default_factory=dict)
    #: Slow-consumer events (nats-py dropped messages client-side).
    slow_consumer: int = 0
    #: Permission violations reported by the server.
    permission_violation: int = 0
    #: Other server or connection errors.
    server_error: int = 0
    #: Outgoing messages refused by the admission hook.
    rejected_by_admission: int = 0

    def dropped_total(self) -> int:
        """All drops."""
        return sum(self.dropped.values())

    def __getitem__(self, reason: str) -> int:
        """Drops of one reason, by name (``snap["replay"]``)."""
        return self.dropped[reason]


class Counters:
    """Delivery and drop counters of one namespace."""

    def __init__(self) -> None:
        self.delivered = 0
        self.dropped: Dict[DropReason, int] = {r: 0 for r in DropReason}
        self.slow_consumer = 0
        self.permission_violation = 0
        self.server_error = 0
        self.rejected_by_admission = 0

    def snapshot(self) -> CountersSnapshot:
        """A copy of every counter."""
        return CountersSnapshot(
            delivered=self.delivered,
            dropped={r.value: n for r, n in self.dropped.items()},
            slow_consumer=self.slow_consumer,
            permission_violation=self.permission_violation,
            server_error=self.server_error,
            rejected_by_admission=self.rejected_by_admission,
        )


class Verifier:
    """Verifies received bodies for one tenant and counts the outcome."""

    def __init__(
        self,
        keys: TenantKeySet,
        freshness: Optional[Freshness] = None,
        counters: Optional[Counters] = None,
    ) -> None:
        self.keys = keys
        self.freshness = freshness or Freshness()
        self.counters = counters or Counters()
        self._prefix = namespace_prefix(keys.tenant)

    @property
    def tenant(self) -> str:
        """The tenant whose messages this verifier accepts."""
        return self.keys.tenant

    def replay_guard(self, max_senders: int = 100_000) -> ReplayGuard:
        """A fresh anti-replay state sized for these settings."""
        return ReplayGuard(self.freshness.retain_ms, max_senders)

    def verify(
        self,
        guard: ReplayGuard,
        subject: str,
        reply: Optional[str],
        body: bytes,
        now: int,
        response_to: Optional[str] = None,
    ) -> TenantMessage:
        """Verifies one message received on the full ``subject`` (with ``reply``,
        ``None`` or empty for none) against the replay state ``guard``, at time
        ``now`` (ms). ``response_to`` is the request's relative subject when this
        is a response (the subject must then be one of the tenant's inboxes).
        Returns the message or raises :class:`EnvelopeError`; counts nothing."""
        reply = reply or None
        keys = self.keys
        tenant = keys.tenant
        (key_version, mid, ts, _, _, sender_b, _), payload = open_parts(keys, subject, reply, body)
        if response_to is not None:
            if not is_tenant_inbox(tenant, subject):
                raise EnvelopeError(DropReason.OUTSIDE_NAMESPACE, "response subject")
            relative = response_to
        else:
            last = guard.last_subject
            if last[0] == subject and subject:
                relative = last[1]
            else:
                prefix = self._prefix
                if not subject.startswith(prefix):
                    raise EnvelopeError(DropReason.OUTSIDE_NAMESPACE, "subject")
                relative = subject[len(prefix) :]
                if subject_error(relative, False) is not None:
                    raise EnvelopeError(DropReason.OUTSIDE_NAMESPACE, "subject")
                guard.last_subject = (subject, relative)
        if reply is not None and not is_tenant_inbox(tenant, reply):
            raise EnvelopeError(DropReason.OUTSIDE_NAMESPACE, "reply")
        self.freshness.check(ts, now)
        instance, sequence = _IDS.unpack(mid)
        guard.check(instance, sequence, now)
        sender = None
        if sender_b is not None:
            last_sender = guard.last_sender
            if last_sender[0] == sender_b:
                sender = last_sender[1]
            else:
                if slug_error_bytes(sender_b) is not None:
                    raise EnvelopeError(DropReason.MALFORMED, "sender id")
                sender = sender_b.decode("ascii")
                guard.last_sender = (sender_b, sender)
        return TenantMessage(relative, tenant, MessageId(mid), ts, sender, key_version, payload, reply)

    def verify_counted(
        self,
        guard: ReplayGuard,
        subject: str,
        reply: Optional[str],
        body: bytes,
        response_to: Optional[str] = None,
    ) -> Optional[TenantMessage]:
        """:meth:`verify` now, counting the outcome and logging drops at warning
        level (the first 10 of each reason, then every power of two)."""
        try:
            msg = self.verify(guard, subject, reply, body, now_ms(), response_to)
        except EnvelopeError as e:
            reason = e.kind
            c = self.counters
            n = c.dropped[reason] + 1
            c.dropped[reason] = n
            if n <= 10 or (n & (n - 1)) == 0:
                log.warning(
                    "dropped a message that failed verification: tenant=%s subject=%r reason=%s count=%d",
                    self.keys.tenant,
                    subject[:120],
                    reason.value,
                    n,
                )
            return None
        self.counters.delivered += 1
        return msg
