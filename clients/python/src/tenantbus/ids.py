"""Validated identifiers: tenant and agent ids are lowercase slugs
(``^[a-z0-9]+(?:-[a-z0-9]+)*$``, 1 to 63 bytes), exactly as ``bus/src/ids.rs``."""

from __future__ import annotations

from .errors import IdError, IdErrorKind

#: The longest id, in bytes (a DNS label's limit).
MAX_ID_LEN = 63

_ALLOWED = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-")


def slug_error(s: str) -> IdErrorKind | None:
    """The first slug rule ``s`` breaks, or ``None`` if it is a valid id."""
    try:
        b = s.encode("utf-8")
    except UnicodeEncodeError:
        return IdErrorKind.INVALID_CHAR
    return slug_error_bytes(b)


def slug_error_bytes(b: bytes) -> IdErrorKind | None:
    """:func:`slug_error` for raw bytes (as found in an envelope)."""
    if not b:
        return IdErrorKind.EMPTY
    if len(b) > MAX_ID_LEN:
        return IdErrorKind.TOO_LONG
    for c in b:
        if c not in _ALLOWED:
            return IdErrorKind.INVALID_CHAR
    if b[0] == 0x2D:
        return IdErrorKind.LEADING_HYPHEN
    if b[-1] == 0x2D:
        return IdErrorKind.TRAILING_HYPHEN
    if b"--" in b:
        return IdErrorKind.DOUBLE_HYPHEN
    return None


def is_slug(s: str) -> bool:
    """Whether ``s`` is a valid tenant or agent id."""
    return isinstance(s, str) and slug_error(s) is None


def validate_id(s: str, what: str = "id") -> str:
    """Returns ``s`` if it is a valid id, else raises :class:`IdError` naming the rule."""
    if not isinstance(s, str):
        raise IdError(IdErrorKind.INVALID_CHAR, f"invalid {what}: not a string")
    kind = slug_error(s)
    if kind is not None:
        raise IdError(kind, f"invalid {what} {s[:80]!r}")
    return s


def validate_tenant_id(s: str) -> str:
    """Validates a tenant id."""
    return validate_id(s, "tenant id")


def validate_agent_id(s: str) -> str:
    """Validates an agent id."""
    return validate_id(s, "agent id")
