"""Reported usage and budgets, as ``agentbus_control::keys::report_usage``.

An agent reports what only it sees (tokens, cost, tool calls) with
:func:`report_usage`; the controller counts each ``idempotency_key`` once
within 24 h and charges the tenant's budgets on that unit first. A budget's
hard cap refuses the charge atomically cluster-wide
(:attr:`UsageErrorKind.BUDGET_EXCEEDED`); report *before* spending. Money is an
integer unit (micro-dollars: ``llm.cost_usd_micros``, $0.50 = 500000).

The request goes to ``agentbus.usage.v1.<account>``, a service of the platform
account that every tenant account imports bound to itself, so a tenant can
only charge itself. The account comes from the server
(``$SYS.REQ.USER.INFO``), never from the bundle's label.

Budget alerts arrive sealed on the tenant's own ``events.budget``::

    sub = await ns.subscribe("events.budget")
    alert = (await sub.next_msg(timeout=60)).json()   # {"budget", "threshold", ...}
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, Mapping, Optional

from .errors import UsageError, UsageErrorKind
from .namespace import TenantNamespace

#: The prefix of the usage service; the reporting account's key follows.
USAGE_PREFIX = "agentbus.usage.v1"
#: The server's "who am I" subject (allowed to every agent).
USER_INFO_SUBJECT = "$SYS.REQ.USER.INFO"
#: The longest unit name.
MAX_UNIT_LEN = 64
_UNIT = re.compile(r"^[a-z0-9._-]{1,64}$")
_U64_MAX = (1 << 64) - 1

_CODES = {k.value: k for k in UsageErrorKind}


def valid_unit(unit: str) -> bool:
    """1 to 64 lowercase letters, digits, ``.``, ``_`` or ``-`` (as Rust)."""
    return isinstance(unit, str) and _UNIT.fullmatch(unit) is not None


async def account_of(ns: TenantNamespace, timeout: float = 5.0) -> str:
    """The account the server placed ``ns``'s connection in."""
    try:
        reply = await ns.nats.request(USER_INFO_SUBJECT, b"", timeout=timeout)
        info = json.loads(reply.data)
    except Exception as e:
        raise UsageError(UsageErrorKind.UNAVAILABLE, f"asking the server who we are: {e}") from None
    data = info.get("data") if isinstance(info, Mapping) else None
    account = data.get("account") if isinstance(data, Mapping) else None
    if not isinstance(account, str) or not account:
        raise UsageError(UsageErrorKind.UNAVAILABLE, "the server's user info named no account")
    return account


async def report_usage(
    ns: TenantNamespace,
    unit: str,
    amount: int,
    idempotency_key: str,
    *,
    account: Optional[str] = None,
    timeout: float = 5.0,
) -> bool:
    """Reports ``amount`` of ``unit`` for ``ns``'s tenant. Returns ``True`` if
    this call counted it, ``False`` if the key was counted before (a retry).
    Raises :class:`UsageError` (``BUDGET_EXCEEDED`` when a budget refuses it,
    ``UNAVAILABLE`` on an outage: retry with the same key)."""
    if not valid_unit(unit):
        raise UsageError(
            UsageErrorKind.INVALID_INPUT,
            f"unit {unit!r}: 1 to {MAX_UNIT_LEN} lowercase letters, digits, '.', '_' or '-'",
        )
    if isinstance(amount, bool) or not isinstance(amount, int) or not 0 <= amount <= _U64_MAX:
        raise UsageError(UsageErrorKind.INVALID_INPUT, f"amount {amount!r} is not a u64")
    if not isinstance(idempotency_key, str) or not 1 <= len(idempotency_key.encode()) <= 256:
        raise UsageError(UsageErrorKind.INVALID_INPUT, "idempotency_key: 1 to 256 bytes")
    acc = account if account is not None else await account_of(ns, timeout)
    body = json.dumps(
        {"tenant": ns.tenant, "unit": unit, "amount": amount, "idempotency_key": idempotency_key},
        separators=(",", ":"),
    ).encode()
    try:
        reply = await ns.nats.request(f"{USAGE_PREFIX}.{acc}", body, timeout=timeout)
    except Exception as e:
        raise UsageError(UsageErrorKind.UNAVAILABLE, f"the usage service: {e}") from None
    return parse_answer(reply.data)


def parse_answer(data: bytes) -> bool:
    """The usage service's answer: ``{"ok": {"counted": bool}}`` or
    ``{"error": {"code", "message"}}``."""
    try:
        v: Any = json.loads(data)
    except ValueError as e:
        raise UsageError(UsageErrorKind.INTERNAL, f"usage service answer: {e}") from None
    if isinstance(v, Mapping) and isinstance(v.get("ok"), Mapping):
        counted = v["ok"].get("counted")
        if isinstance(counted, bool):
            return counted
    if isinstance(v, Mapping) and isinstance(v.get("error"), Mapping):
        err: Dict[str, Any] = dict(v["error"])
        kind = _CODES.get(str(err.get("code")), UsageErrorKind.INTERNAL)
        raise UsageError(kind, str(err.get("message", "")))
    raise UsageError(UsageErrorKind.INTERNAL, "usage service answer: unexpected shape")


__all__ = ["USAGE_PREFIX", "account_of", "parse_answer", "report_usage", "valid_unit"]
