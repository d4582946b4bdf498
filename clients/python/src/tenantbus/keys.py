"""Per-tenant AES-256-GCM keys and key sets (``bus/src/keys.rs``).

``key(tenant, v) = HKDF-SHA256(salt = "agentbus/tenant-key/v1", ikm = master,
info = u8 len(tenant) || tenant || u32 v)``, 32 bytes. Agents hold only their
tenant's :class:`TenantKeySet` (the current version, used to seal, plus
previous versions still accepted during a rotation); the master secret stays
with the control plane (:func:`derive_key` is here for tests and tools).

JSON form (as in a credential bundle)::

    {"tenant": "acme", "current": 2,
     "keys": [{"version": 1, "key": "<base64>"}, {"version": 2, "key": "<base64>"}]}
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Tuple, Union

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import IdError, KeySetError, KeySetErrorKind
from .ids import validate_tenant_id

#: The HKDF salt of the tenant-key derivation.
TENANT_KEY_SALT = b"agentbus/tenant-key/v1"
#: Length of an AES-256 key.
KEY_LEN = 32
#: The shortest master secret accepted.
MIN_MASTER_LEN = 32
_U32_MAX = 0xFFFFFFFF


def _check_version(version: Any) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= _U32_MAX:
        raise KeySetError(KeySetErrorKind.INVALID_MATERIAL, f"key version {version!r} is not a u32")
    return version


def derive_key(master: bytes, tenant: str, version: int) -> bytes:
    """Derives version ``version`` of ``tenant``'s 32-byte key from the master secret."""
    if len(master) < MIN_MASTER_LEN:
        raise KeySetError(
            KeySetErrorKind.INVALID_MATERIAL,
            f"master secret must be at least {MIN_MASTER_LEN} bytes",
        )
    validate_tenant_id(tenant)
    version = _check_version(version)
    tid = tenant.encode("ascii")
    info = bytes([len(tid)]) + tid + version.to_bytes(4, "big")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=TENANT_KEY_SALT, info=info)
    return hkdf.derive(bytes(master))


class TenantKey:
    """One version of a tenant's key. ``repr`` never shows the key bytes."""

    __slots__ = ("version", "_bytes", "aead")

    def __init__(self, version: int, key: bytes) -> None:
        self.version = _check_version(version)
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_LEN:
            raise KeySetError(
                KeySetErrorKind.INVALID_MATERIAL,
                f"a key is {KEY_LEN} bytes, got {len(key) if hasattr(key, '__len__') else key!r}",
            )
        self._bytes = bytes(key)
        #: The AES-GCM cipher (built once).
        self.aead = AESGCM(self._bytes)

    @property
    def key_bytes(self) -> bytes:
        """The raw key (handle with care)."""
        return self._bytes

    def __repr__(self) -> str:
        return f"TenantKey(v{self.version}, <redacted>)"


class TenantKeySet:
    """The keys of one tenant: the current version (seals) and every version
    accepted on receive. Immutable; :meth:`without` and :meth:`with_key` return
    new sets."""

    __slots__ = ("tenant", "tenant_bytes", "current", "_keys")

    def __init__(self, tenant: str, current: int, keys: Iterable[TenantKey]) -> None:
        try:
            self.tenant: str = validate_tenant_id(tenant)
        except IdError as e:
            raise KeySetError(KeySetErrorKind.INVALID_KEY_SET, str(e)) from e
        #: The tenant id as bytes (as in an envelope).
        self.tenant_bytes: bytes = self.tenant.encode("ascii")
        self._keys: Dict[int, TenantKey] = {k.version: k for k in keys}
        current = _check_version(current)
        if current not in self._keys:
            raise KeySetError(
                KeySetErrorKind.INVALID_KEY_SET,
                f"current version {current} is not in the key set",
            )
        self.current: int = current

    @classmethod
    def from_master(
        cls, master: bytes, tenant: str, versions: Iterable[int], current: int
    ) -> "TenantKeySet":
        """The key set of ``versions`` derived from ``master`` (tests, tools)."""
        return cls(tenant, current, [TenantKey(v, derive_key(master, tenant, v)) for v in versions])

    @property
    def current_key(self) -> TenantKey:
        """The key that seals new messages."""
        return self._keys[self.current]

    def get(self, version: int) -> Optional[TenantKey]:
        """The key of ``version``, if the set holds it."""
        return self._keys.get(version)

    def versions(self) -> Tuple[int, ...]:
        """The versions held, ascending."""
        return tuple(sorted(self._keys))

    def __iter__(self) -> Iterator[TenantKey]:
        return iter(self._keys[v] for v in self.versions())

    def ensure_tenant(self, tenant: str) -> None:
        """Raises :class:`KeySetError` (``wrong_tenant``) unless the set is ``tenant``'s."""
        if self.tenant != tenant:
            raise KeySetError(
                KeySetErrorKind.WRONG_TENANT, f"key set of {self.tenant} used for {tenant}"
            )

    def without(self, version: int) -> "TenantKeySet":
        """A copy without ``version`` (ending acceptance of an old key)."""
        if version == self.current:
            raise KeySetError(
                KeySetErrorKind.INVALID_KEY_SET, "the current key version cannot be removed"
            )
        if version not in self._keys:
            raise KeySetError(
                KeySetErrorKind.UNKNOWN_VERSION, f"key version {version} is not in the set"
            )
        return TenantKeySet(self.tenant, self.current, [k for v, k in self._keys.items() if v != version])

    def with_key(self, key: TenantKey, make_current: bool = True) -> "TenantKeySet":
        """A copy holding ``key`` too (a rotation), current if ``make_current``."""
        keys = dict(self._keys)
        keys[key.version] = key
        return TenantKeySet(self.tenant, key.version if make_current else self.current, keys.values())

    # -- JSON ------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        """The JSON object form (holds secrets)."""
        return {
            "tenant": self.tenant,
            "current": self.current,
            "keys": [
                {"version": k.version, "key": base64.b64encode(k.key_bytes).decode("ascii")}
                for k in self
            ],
        }

    def to_json(self) -> str:
        """The JSON text form (holds secrets)."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> "TenantKeySet":
        """Parses the JSON object form."""
        if not isinstance(obj, Mapping):
            raise KeySetError(KeySetErrorKind.INVALID_KEY_SET, "a key set is a JSON object")
        try:
            tenant = obj["tenant"]
            current = obj["current"]
            entries = obj["keys"]
        except KeyError as e:
            raise KeySetError(KeySetErrorKind.INVALID_KEY_SET, f"missing field {e}") from None
        if not isinstance(tenant, str) or not isinstance(entries, list):
            raise KeySetError(KeySetErrorKind.INVALID_KEY_SET, "bad field types")
        keys = []
        for entry in entries:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("key"), str):
                raise KeySetError(KeySetErrorKind.INVALID_MATERIAL, "a key entry needs version and key")
            try:
                raw = base64.b64decode(entry["key"], validate=True)
            except (binascii.Error, ValueError) as e:
                raise KeySetError(KeySetErrorKind.INVALID_MATERIAL, f"key base64: {e}") from None
            keys.append(TenantKey(entry.get("version"), raw))
        return cls(tenant, current, keys)

    @classmethod
    def from_json(cls, text: Union[str, bytes]) -> "TenantKeySet":
        """Parses the JSON text form."""
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise KeySetError(KeySetErrorKind.INVALID_KEY_SET, f"JSON: {e}") from None
        return cls.from_dict(obj)

    def __repr__(self) -> str:
        return f"TenantKeySet(tenant={self.tenant!r}, current={self.current}, versions={list(self.versions())})"
