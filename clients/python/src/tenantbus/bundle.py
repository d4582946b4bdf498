"""The credential bundle an agent connects with (``bus/src/bundle.rs``).

One JSON object per agent, written by ``agentbus agent create``::

    {"url": "nats://127.0.0.1:4222", "tenant": "acme", "agent": "planner",
     "creds": "-----BEGIN NATS USER JWT-----\\n...", "keys": {"tenant": "acme", ...}}

``creds`` (the text of a standard NATS ``.creds`` file) may be absent for a
server without auth. ``url`` may be a comma-separated list (a cluster).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Union

from .errors import BundleError, BundleErrorKind, IdError, KeySetError
from .ids import validate_agent_id, validate_tenant_id
from .keys import TenantKeySet

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class CredentialBundle:
    """Everything an agent needs to join its tenant's namespace. ``repr`` never
    shows the creds or keys."""

    url: str
    tenant: str
    agent: str
    keys: TenantKeySet
    creds: Optional[str] = None

    def __repr__(self) -> str:
        return (
            f"CredentialBundle(url={self.url!r}, tenant={self.tenant!r}, agent={self.agent!r}, "
            f"creds={'<redacted>' if self.creds else None}, keys={self.keys!r})"
        )

    @property
    def servers(self) -> List[str]:
        """The server URLs (``url`` split on commas)."""
        return [u.strip() for u in self.url.split(",") if u.strip()]

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> "CredentialBundle":
        """Parses the JSON object form and checks that the key set is the tenant's."""
        if not isinstance(obj, Mapping):
            raise BundleError(BundleErrorKind.INVALID, "a bundle is a JSON object")
        try:
            url, tenant, agent, keys = obj["url"], obj["tenant"], obj["agent"], obj["keys"]
        except KeyError as e:
            raise BundleError(BundleErrorKind.INVALID, f"missing field {e}") from None
        creds = obj.get("creds")
        if not isinstance(url, str) or (creds is not None and not isinstance(creds, str)):
            raise BundleError(BundleErrorKind.INVALID, "url and creds are strings")
        try:
            validate_tenant_id(tenant)
            validate_agent_id(agent)
            keyset = keys if isinstance(keys, TenantKeySet) else TenantKeySet.from_dict(keys)
        except (IdError, KeySetError) as e:
            raise BundleError(BundleErrorKind.INVALID, str(e)) from e
        if keyset.tenant != tenant:
            raise BundleError(
                BundleErrorKind.TENANT_MISMATCH, f"key set of {keyset.tenant} in a bundle of {tenant}"
            )
        return cls(url=url, tenant=tenant, agent=agent, keys=keyset, creds=creds)

    @classmethod
    def from_json(cls, text: Union[str, bytes]) -> "CredentialBundle":
        """Parses the JSON text form."""
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise BundleError(BundleErrorKind.INVALID, f"parsing JSON: {e}") from None
        return cls.from_dict(obj)

    @classmethod
    def from_file(cls, path: PathLike) -> "CredentialBundle":
        """Reads a bundle file."""
        try:
            with open(path, "rb") as f:
                text = f.read()
        except OSError as e:
            raise BundleError(BundleErrorKind.IO, f"reading {path}: {e}") from None
        try:
            return cls.from_json(text)
        except BundleError as e:
            raise BundleError(e.kind, f"{path}: {e.detail}") from None

    @classmethod
    def load(cls, source: Union["CredentialBundle", Mapping[str, Any], PathLike]) -> "CredentialBundle":
        """A bundle from a bundle, a dict, or a file path."""
        if isinstance(source, CredentialBundle):
            return source
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        return cls.from_file(source)

    def to_dict(self) -> Dict[str, Any]:
        """The JSON object form (holds secrets)."""
        d: Dict[str, Any] = {"url": self.url, "tenant": self.tenant, "agent": self.agent}
        if self.creds is not None:
            d["creds"] = self.creds
        d["keys"] = self.keys.to_dict()
        return d

    def to_json(self) -> str:
        """The JSON text form (holds secrets)."""
        return json.dumps(self.to_dict(), indent=2)

    def write_to_file(self, path: PathLike) -> None:
        """Writes the bundle, readable by the owner only (0600)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, self.to_json().encode())
        finally:
            os.close(fd)
