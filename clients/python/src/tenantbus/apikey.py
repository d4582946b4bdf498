"""Joining a tenant with an API key (``agent-runtime/control/src/keys.rs``).

An API key (``agentbus key create TENANT --name N``) is all a client needs
besides the server URL: the server hands the login to the control plane (the
NATS auth callout), which places the connection in the key's tenant account
with permissions inside ``tenant.<id>.``. A plain NATS client simply connects
with the key as its token (``nats.connect(url, token=key)``).

:func:`connect_with_key` does what the Rust ``connect_with_key`` does, to get a
sealed :class:`~tenantbus.TenantNamespace` without a credential bundle:

1. checks the key's format and checksum offline (:func:`parse_api_key`): a
   mistyped key never reaches the server;
2. logs in with the key as its token and the bootstrap inbox prefix
   ``_INBOX.<key id>`` (the callout lets a key's logins subscribe there), asks
   the server which account it was placed in (``$SYS.REQ.USER.INFO``; the
   tenant comes from the server, the account's name is ``tenant-<id>``) and
   fetches the tenant's key set from the key service
   (``agentbus.keys.v1.<account>``), with the tenant's ``placement``
   (replicas and region of what the agent creates, as in a bundle);
3. closes that connection and connects the namespace as agent
   ``key-<key id in lowercase>`` with the key as its token and the tenant's
   inbox prefix ``tenant.<id>._INBOX``;
4. keeps the key set current in the background (:class:`KeyRefresher`) until
   the namespace is closed.

Key format (44 characters)::

    abk_ 3F9xk2LmQp7Z N8cT0vWq2yHs5JdKe1RbXa uK7wQ2
    |    |            |                      + CRC32 of everything before it, 6 base62
    |    |            + secret: 22 base62 characters
    |    + key id: 12 base62 characters (public)
    + prefix
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import zlib
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

from nats.aio.client import Client as NatsClient

from .bundle import CredentialBundle, Placement
from .errors import (
    ApiKeyError,
    ApiKeyErrorKind,
    BundleError,
    ConnectError,
    ConnectErrorKind,
    IdError,
    KeySetError,
)
from .ids import validate_agent_id, validate_tenant_id
from .keys import TenantKeySet
from .namespace import NamespaceOptions, TenantNamespace, _apply_overrides, _connect

log = logging.getLogger("tenantbus")

#: Every key starts with this.
PREFIX = "abk_"
#: Characters of the key id.
ID_LEN = 12
#: Characters of the secret.
SECRET_LEN = 22
#: Characters of the checksum.
CHECKSUM_LEN = 6
#: The length of a key.
KEY_LEN = len(PREFIX) + ID_LEN + SECRET_LEN + CHECKSUM_LEN

#: The subject the server answers with the connection's user and account.
USER_INFO_SUBJECT = "$SYS.REQ.USER.INFO"
#: The key service's subject prefix (``agentbus.keys.v1.<account>``).
KEYS_PREFIX = "agentbus.keys.v1"
#: How often a key namespace's key set is refreshed at most, seconds.
DEFAULT_REFRESH_EVERY = 60.0
#: How long the namespace login is retried while the server refuses it
#: (the bootstrap connection's slot of ``max_agents`` is freed
#: asynchronously), seconds.
LOGIN_RETRY_FOR = 3.0
#: How long the bootstrap requests wait, seconds.
BOOTSTRAP_TIMEOUT = 5.0

_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BASE62_SET = frozenset(_BASE62)


def _checksum(body: str) -> str:
    """The 6-character base62 CRC-32 (IEEE, as zlib's) of ``body``."""
    v = zlib.crc32(body.encode("ascii")) & 0xFFFFFFFF
    out = []
    for _ in range(CHECKSUM_LEN):
        out.append(_BASE62[v % 62])
        v //= 62
    return "".join(reversed(out))


def parse_api_key(text: str) -> str:
    """Checks an API key's shape and checksum offline and returns its key id.

    Raises :class:`~tenantbus.ApiKeyError` whose kind says which rule failed,
    in the Rust order: ``prefix``, ``length``, ``charset``, ``checksum``.
    """
    if not isinstance(text, str) or not text.startswith(PREFIX):
        raise ApiKeyError(ApiKeyErrorKind.PREFIX, "not an API key (wrong prefix)")
    if len(text.encode("utf-8")) != KEY_LEN:
        raise ApiKeyError(ApiKeyErrorKind.LENGTH, "not an API key (wrong length)")
    rest = text[len(PREFIX) :]
    if not all(c in _BASE62_SET for c in rest):
        raise ApiKeyError(ApiKeyErrorKind.CHARSET, "not an API key (invalid character)")
    body, total = text[: KEY_LEN - CHECKSUM_LEN], text[KEY_LEN - CHECKSUM_LEN :]
    if _checksum(body) != total:
        raise ApiKeyError(ApiKeyErrorKind.CHECKSUM, "not an API key (checksum mismatch)")
    return rest[:ID_LEN]


def is_api_key(text: str) -> bool:
    """Whether ``text`` is a well-formed API key with a valid checksum."""
    try:
        parse_api_key(text)
    except ApiKeyError:
        return False
    return True


def bootstrap_inbox(key_id: str) -> str:
    """The inbox prefix a key client uses before it knows its tenant:
    ``_INBOX.<key id>``."""
    return f"_INBOX.{key_id}"


def key_agent_id(key_id: str) -> str:
    """The agent id a key client acts as: ``key-<key id in lowercase>``."""
    return validate_agent_id(f"key-{key_id.lower()}")


def keys_subject(account: str) -> str:
    """The key service's subject for ``account`` (its public key)."""
    return f"{KEYS_PREFIX}.{account}"


def _servers(url: Union[str, Sequence[str]]) -> List[str]:
    """The server URLs of a URL, a comma-separated list or a sequence."""
    parts = [url] if isinstance(url, str) else list(url)
    servers = [u.strip() for p in parts for u in str(p).split(",") if u.strip()]
    if not servers:
        raise ConnectError(ConnectErrorKind.CONNECTION, "no server URL")
    return servers


def _unavailable(what: str, e: Any) -> ConnectError:
    text = f"{type(e).__name__}: {e}" if isinstance(e, BaseException) else str(e)
    return ConnectError(ConnectErrorKind.CONNECTION, f"{what}: {text}")


#: Key-service error codes (``ErrorCode`` of ``api.rs``) that mean "not this
#: key" rather than an outage.
_REFUSING_CODES = frozenset({"forbidden", "refused", "not_found", "invalid_input"})


@dataclass(frozen=True)
class KeysAnswer:
    """The key service's answer (``KeysAnswer`` of ``api.rs``)."""

    #: The tenant's key set.
    keys: TenantKeySet
    #: When to ask again at the latest (a staged rotation promotes then), Unix ms.
    refresh_at_ms: int
    #: Replicas and region of the streams and buckets the agent creates (the
    #: deployment's replica count, the tenant's region); unset when absent.
    placement: Placement = Placement()


def parse_keys_answer(data: Union[bytes, str], tenant: str) -> Tuple[TenantKeySet, int]:
    """Parses the key service's answer (``{"ok": {"keys": ..., "refresh_at_ms":
    ...}}`` or ``{"error": {"code": ..., "message": ...}}``) into the key set of
    ``tenant`` and the time to refresh at the latest (Unix ms). See
    :func:`parse_keys_reply` for the whole answer (with ``placement``).

    Raises :class:`~tenantbus.ConnectError`: ``refused`` when the service
    refused (``forbidden``, ``refused``, ``not_found``, ``invalid_input``),
    ``connection`` for other errors or an unreadable answer, ``keys`` for a key
    set of another tenant."""
    answer = parse_keys_reply(data, tenant)
    return answer.keys, answer.refresh_at_ms


def parse_keys_reply(data: Union[bytes, str], tenant: str) -> KeysAnswer:
    """:func:`parse_keys_answer`, returning the whole :class:`KeysAnswer`:
    also its ``placement``, which an API-key login's namespace uses as a
    bundle's (an invalid one makes the answer unreadable: ``connection``)."""
    try:
        obj = json.loads(data)
    except ValueError as e:
        raise _unavailable("the key service's answer", e) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("error"), Mapping):
        err = obj["error"]
        code = str(err.get("code", ""))
        message = f"key service: {code}: {err.get('message', '')}"
        kind = ConnectErrorKind.REFUSED if code in _REFUSING_CODES else ConnectErrorKind.CONNECTION
        raise ConnectError(kind, message)
    answer = obj.get("ok") if isinstance(obj, Mapping) else None
    if not isinstance(answer, Mapping):
        raise _unavailable("the key service's answer", "neither ok nor error")
    try:
        keys = TenantKeySet.from_dict(answer["keys"])
        refresh_at_ms = answer.get("refresh_at_ms", 0)
        if isinstance(refresh_at_ms, bool) or not isinstance(refresh_at_ms, int):
            raise ValueError("refresh_at_ms is not an integer")
        # BundleError is a ValueError: a placement the Rust client would refuse.
        placement = Placement.from_dict(answer.get("placement"))
    except (KeyError, ValueError, TypeError) as e:
        raise _unavailable("the key service's answer", e) from None
    try:
        keys.ensure_tenant(tenant)
    except KeySetError as e:
        raise ConnectError(ConnectErrorKind.KEYS, str(e)) from e
    return KeysAnswer(keys, refresh_at_ms, placement)


async def fetch_key_set(
    nc: NatsClient, account: str, tenant: str, timeout: float = BOOTSTRAP_TIMEOUT
) -> Tuple[TenantKeySet, int]:
    """Asks the key service for ``tenant``'s current key set on connection
    ``nc`` (a user of ``account``): returns the set and ``refresh_at_ms``."""
    answer = await fetch_keys_answer(nc, account, tenant, timeout)
    return answer.keys, answer.refresh_at_ms


async def fetch_keys_answer(
    nc: NatsClient, account: str, tenant: str, timeout: float = BOOTSTRAP_TIMEOUT
) -> KeysAnswer:
    """:func:`fetch_key_set`, returning the whole :class:`KeysAnswer`."""
    body = json.dumps({"tenant": tenant}, separators=(",", ":")).encode()
    try:
        reply = await nc.request(keys_subject(account), body, timeout=timeout)
    except Exception as e:
        raise _unavailable("the key service", e) from None
    return parse_keys_reply(reply.data, tenant)


class KeyRefresher:
    """Keeps a namespace's key set current: fetches it from the key service
    every ``every`` seconds (sooner when the answer's ``refresh_at_ms`` says a
    staged rotation promotes) and installs it with
    :meth:`~tenantbus.TenantNamespace.update_keys`. A failed fetch is logged
    and retried after ``every``. It runs as a task of the namespace:
    :meth:`~tenantbus.TenantNamespace.close` cancels it (or call :meth:`stop`)."""

    def __init__(self, ns: TenantNamespace, account: str, every: float = DEFAULT_REFRESH_EVERY) -> None:
        if every <= 0:
            raise ValueError("every must be positive")
        self.ns = ns
        self.account = account
        self.every = float(every)
        #: Successful refreshes so far.
        self.refreshes = 0
        #: The last failure, if the last attempt failed.
        self.last_error: Optional[BaseException] = None
        self._task: Optional["asyncio.Task[None]"] = None

    def start(self, first_wait: Optional[float] = None) -> "KeyRefresher":
        """Starts the background task (the first refresh after ``first_wait``
        seconds, default ``every``) and ties it to the namespace."""
        if self._task is None:
            wait = self.every if first_wait is None else first_wait
            self._task = asyncio.get_running_loop().create_task(self._run(wait))
            self.ns._own_task(self._task)
        return self

    @property
    def running(self) -> bool:
        """Whether the background task is running."""
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Stops refreshing."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def refresh_once(self) -> float:
        """Fetches and installs the key set once; returns the seconds to wait
        before the next refresh (at most ``every``, at least 0.05)."""
        wait = self.every
        try:
            keys, refresh_at_ms = await fetch_key_set(self.ns.nats, self.account, self.ns.tenant)
        except ConnectError as e:
            self.last_error = e
            log.debug("tenantbus: key refresh of %s failed; retrying: %s", self.ns.tenant, e)
        else:
            try:
                self.ns.update_keys(keys)
            except KeySetError as e:
                self.last_error = e
                log.warning("tenantbus: refreshed key set of %s refused: %s", self.ns.tenant, e)
            else:
                self.last_error = None
                self.refreshes += 1
            now_ms = int(time.time() * 1000)
            if refresh_at_ms > now_ms:
                wait = min(wait, (refresh_at_ms - now_ms) / 1000.0)
        return max(wait, 0.05)

    async def _run(self, wait: float) -> None:
        while True:
            await asyncio.sleep(wait)
            if self.ns.nats.is_closed:
                return
            wait = await self.refresh_once()


#: nats-py options the bootstrap connection sets itself.
_BOOTSTRAP_OWN = frozenset(
    {
        "servers", "token", "user_credentials", "nkeys_seed", "user", "password", "inbox_prefix",
        "name", "allow_reconnect", "max_reconnect_attempts", "error_cb", "connect_timeout",
    }
)


async def _bootstrap(
    servers: Sequence[str], key: str, key_id: str, opts: NamespaceOptions
) -> Tuple[str, str, KeysAnswer]:
    """Logs in with the key on the bootstrap inbox; returns (account, tenant,
    the key service's answer). The connection is closed before returning. The
    namespace options' ``nats_options`` (TLS, ...) apply to it too, except
    what it sets itself."""
    timeout = BOOTSTRAP_TIMEOUT
    connect_timeout = max(1.0, opts.connect_timeout)
    extra = {k: v for k, v in opts.nats_options.items() if k not in _BOOTSTRAP_OWN}
    async def error_cb(e: Exception) -> None:
        log.debug("tenantbus: key bootstrap: %s: %s", type(e).__name__, e)

    boot = NatsClient()
    try:
        await asyncio.wait_for(
            boot.connect(
                servers=list(servers),
                token=key,
                inbox_prefix=bootstrap_inbox(key_id),
                name="agentbus-key-bootstrap",
                connect_timeout=max(1, int(round(connect_timeout))),
                allow_reconnect=False,
                max_reconnect_attempts=1,
                error_cb=error_cb,
                **extra,
            ),
            timeout=connect_timeout * 2 + 1,
        )
    except Exception as e:
        try:
            await boot.close()
        except Exception:
            pass
        text = f"{type(e).__name__}: {e}".lower()
        if "authoriz" in text or "authentication" in text:
            raise ConnectError(ConnectErrorKind.REFUSED, "the server refused the key") from None
        raise _unavailable("connecting", e) from None
    try:
        try:
            reply = await boot.request(USER_INFO_SUBJECT, b"", timeout=timeout)
            info = json.loads(reply.data)
        except Exception as e:
            raise _unavailable("asking the server who we are", e) from None
        data = info.get("data") if isinstance(info, Mapping) else None
        account = data.get("account") if isinstance(data, Mapping) else None
        if not isinstance(account, str) or not account:
            raise _unavailable("the server's user info", "no account")
        # The account's name is `tenant-<id>`; the key service checks the pair.
        name = data.get("account_name") if isinstance(data, Mapping) else None
        tenant = name[len("tenant-") :] if isinstance(name, str) and name.startswith("tenant-") else ""
        try:
            validate_tenant_id(tenant)
        except IdError:
            raise _unavailable("the server's user info", "not a tenant account") from None
        answer = await fetch_keys_answer(boot, account, tenant, timeout)
        return account, tenant, answer
    finally:
        try:
            await asyncio.wait_for(boot.close(), timeout)
        except Exception:
            pass


async def connect_with_key(
    url: Union[str, Sequence[str]],
    key: str,
    options: Optional[NamespaceOptions] = None,
    *,
    refresh_every: float = DEFAULT_REFRESH_EVERY,
    **overrides: Any,
) -> TenantNamespace:
    """Joins the tenant of an API key with nothing but the server URL(s) and
    the key, and returns a sealed :class:`~tenantbus.TenantNamespace`.

    ``url`` is a URL, a comma-separated list or a sequence of URLs. Keyword
    ``overrides`` set fields of :class:`~tenantbus.NamespaceOptions`, as for
    :func:`tenantbus.connect`. The tenant comes from the server
    (``ns.tenant``), the agent id is ``key-<key id in lowercase>``
    (``ns.agent``). The key set is refreshed every ``refresh_every`` seconds
    (sooner for a staged rotation) by ``ns.key_refresher`` until ``ns.close()``.

    For a moment the key holds two of the tenant's ``max_agents`` connection
    slots (the bootstrap connection's is freed asynchronously), so a refused
    namespace login is retried for up to 3 s.

    Raises :class:`~tenantbus.ConnectError` with kind ``invalid_key`` for a
    malformed key (checked offline, nothing is sent; its ``__cause__`` is the
    :class:`~tenantbus.ApiKeyError`), ``refused`` when the server or the key
    service refuses the key (unknown, revoked, expired, tenant suspended), and
    ``connection`` when a server or the control plane cannot be reached.
    """
    if not refresh_every > 0:
        raise ValueError("refresh_every must be positive")
    try:
        key_id = parse_api_key(key)
    except ApiKeyError as e:
        raise ConnectError(ConnectErrorKind.INVALID_KEY, e.detail) from e
    servers = _servers(url)
    # A copy: the caller's options never hold the key.
    opts = dataclasses.replace(_apply_overrides(options, overrides), auth_token=key)
    account, tenant, answer = await _bootstrap(servers, key, key_id, opts)
    refresh_at_ms = answer.refresh_at_ms
    try:
        # The answer's placement makes the namespace's streams and buckets
        # replicated and in the tenant's region, as a bundle's would.
        bundle = CredentialBundle(
            url=",".join(servers), tenant=tenant, agent=key_agent_id(key_id), keys=answer.keys,
            creds=None, placement=answer.placement,
        )
    except (BundleError, IdError) as e:  # pragma: no cover - ids were validated
        raise ConnectError(ConnectErrorKind.CREDENTIALS, str(e)) from e
    deadline = time.monotonic() + LOGIN_RETRY_FOR
    while True:
        try:
            ns = await _connect(bundle, opts, fail_fast_auth=True)
            break
        except ConnectError as e:
            if e.kind is not ConnectErrorKind.AUTHORIZATION:
                raise
            if time.monotonic() >= deadline:
                raise ConnectError(ConnectErrorKind.REFUSED, f"the server refused the key: {e.detail}") from e
            await asyncio.sleep(0.1)
    refresher = KeyRefresher(ns, account, refresh_every)
    first = refresh_every
    now_ms = int(time.time() * 1000)
    if refresh_at_ms > now_ms:
        first = min(first, (refresh_at_ms - now_ms) / 1000.0)
    ns.key_refresher = refresher.start(max(first, 0.05))
    return ns


__all__ = [
    "BOOTSTRAP_TIMEOUT",
    "CHECKSUM_LEN",
    "DEFAULT_REFRESH_EVERY",
    "ID_LEN",
    "KEYS_PREFIX",
    "KEY_LEN",
    "KeyRefresher",
    "KeysAnswer",
    "LOGIN_RETRY_FOR",
    "PREFIX",
    "SECRET_LEN",
    "USER_INFO_SUBJECT",
    "bootstrap_inbox",
    "connect_with_key",
    "fetch_key_set",
    "fetch_keys_answer",
    "is_api_key",
    "key_agent_id",
    "keys_subject",
    "parse_api_key",
    "parse_keys_answer",
    "parse_keys_reply",
]
