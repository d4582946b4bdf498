"""Subjects relative to a tenant's namespace (``bus/src/subject.rs``).

A relative subject is 1 to 256 bytes and at most 16 tokens separated by single
dots; token characters are printable ASCII (``!`` to ``~``) other than ``.``;
``*`` and ``>`` only as whole tokens, only in patterns, and ``>`` only last;
the first token must not start with ``$`` or ``_INBOX``. The full NATS subject
is always ``tenant.<id>.<relative>``, built by :func:`scope` alone.
"""

from __future__ import annotations

from .errors import SubjectError, SubjectErrorKind

#: The longest relative subject, in bytes.
MAX_SUBJECT_LEN = 256
#: The most tokens in a relative subject.
MAX_TOKENS = 16
#: The first token of every scoped subject.
TENANT_PREFIX = "tenant"
#: The token (after ``tenant.<id>.``) under which reply inboxes live.
INBOX_TOKEN = "_INBOX"


def _printable(token: str) -> bool:
    for ch in token:
        o = ord(ch)
        if o < 0x21 or o > 0x7E:
            return False
    return True


def subject_error(s: str, allow_wildcards: bool) -> SubjectErrorKind | None:
    """The first rule ``s`` breaks as a subject (or, with ``allow_wildcards``,
    a pattern), or ``None``. Same order of checks as the Rust ``check``."""
    if not isinstance(s, str) or not s:
        return SubjectErrorKind.EMPTY
    try:
        n = len(s.encode("utf-8"))
    except UnicodeEncodeError:
        n = len(s.encode("utf-8", "surrogatepass"))
    if n > MAX_SUBJECT_LEN:
        return SubjectErrorKind.TOO_LONG
    tokens = s.split(".")
    last = len(tokens) - 1
    for i, token in enumerate(tokens):
        if i + 1 > MAX_TOKENS:
            return SubjectErrorKind.TOO_MANY_TOKENS
        if not token:
            return SubjectErrorKind.EMPTY_TOKEN
        if not _printable(token):
            return SubjectErrorKind.INVALID_CHAR
        if token in ("*", ">"):
            if not allow_wildcards:
                return SubjectErrorKind.WILDCARD
            if token == ">" and i != last:
                return SubjectErrorKind.TAIL_WILDCARD_NOT_LAST
        elif "*" in token or ">" in token:
            return SubjectErrorKind.WILDCARD
        if i == 0 and (token.startswith("$") or token.startswith(INBOX_TOKEN)):
            return SubjectErrorKind.RESERVED
    return None


def validate_subject(s: str) -> str:
    """Returns ``s`` if it is a valid concrete relative subject, else raises
    :class:`SubjectError`."""
    kind = subject_error(s, False)
    if kind is not None:
        raise SubjectError(kind, repr(s[:80]) if isinstance(s, str) else repr(s))
    return s


def validate_pattern(s: str) -> str:
    """Returns ``s`` if it is a valid relative subscribe pattern, else raises
    :class:`SubjectError`."""
    kind = subject_error(s, True)
    if kind is not None:
        raise SubjectError(kind, repr(s[:80]) if isinstance(s, str) else repr(s))
    return s


def pattern_matches(pattern: str, subject: str) -> bool:
    """Whether the concrete ``subject`` matches the (valid) ``pattern``."""
    p = pattern.split(".")
    t = subject.split(".")
    for i, tok in enumerate(p):
        if i >= len(t):
            return False
        if tok == ">":
            return True
        if tok != "*" and tok != t[i]:
            return False
    return len(p) == len(t)


def namespace_prefix(tenant: str) -> str:
    """``tenant.<id>.``: the prefix of every subject of ``tenant``."""
    return f"{TENANT_PREFIX}.{tenant}."


def scope(tenant: str, relative: str) -> str:
    """The full NATS subject ``tenant.<id>.<relative>`` (both parts validated by
    the caller)."""
    return f"{TENANT_PREFIX}.{tenant}.{relative}"


def unscope(tenant: str, full: str) -> str:
    """The relative subject of a full subject in ``tenant``'s namespace, or
    :class:`SubjectError` (``outside_namespace``) if it lies elsewhere or is invalid."""
    prefix = namespace_prefix(tenant)
    if not full.startswith(prefix):
        raise SubjectError(SubjectErrorKind.OUTSIDE_NAMESPACE, repr(full[:80]))
    rest = full[len(prefix) :]
    kind = subject_error(rest, False)
    if kind is not None:
        raise SubjectError(kind, repr(full[:80]))
    return rest


def inbox_prefix(tenant: str) -> str:
    """The full prefix of the tenant's reply inboxes: ``tenant.<id>._INBOX``."""
    return scope(tenant, INBOX_TOKEN)


def is_tenant_inbox(tenant: str, full: str) -> bool:
    """Whether ``full`` is a reply inbox inside ``tenant``'s namespace
    (``tenant.<id>._INBOX.<token>...``)."""
    prefix = inbox_prefix(tenant) + "."
    if not full.startswith(prefix):
        return False
    rest = full[len(prefix) :]
    if not rest or len(rest.encode("utf-8", "surrogatepass")) > MAX_SUBJECT_LEN:
        return False
    for t in rest.split("."):
        if not t or not _printable(t) or "*" in t or ">" in t:
            return False
    return True
