"""The credential bundle an agent connects with (``bus/src/bundle.rs``).

One JSON object per agent, written by ``agentbus agent create``::

    {"url": "nats://127.0.0.1:4222", "tenant": "acme", "agent": "planner",
     "creds": "-----BEGIN NATS USER JWT-----\\n...", "keys": {"tenant": "acme", ...},
     "placement": {"replicas": 3, "region": "eu"}}

``creds`` (the text of a standard NATS ``.creds`` file) may be absent for a
server without auth. ``url`` may be a comma-separated list (a cluster).
``placement`` (optional, as are both its keys) is written by the control plane:
the deployment's replica count and the tenant's region, which the streams and
buckets the agent creates get (:class:`Placement`, ``StorePlacement`` in
``bus/src/region.rs``). A bundle without it means one replica, no region.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

from .errors import BundleError, BundleErrorKind, IdError, KeySetError
from .ids import validate_agent_id, validate_id, validate_tenant_id
from .keys import TenantKeySet

PathLike = Union[str, "os.PathLike[str]"]

#: The prefix of a region's JetStream server tag: ``region:<name>``.
REGION_TAG_PREFIX = "region:"
#: The replica counts JetStream allows for a stream.
MIN_REPLICAS, MAX_REPLICAS = 1, 5


def validate_region(name: str) -> str:
    """Returns ``name`` if it is a valid region name (the slug rule of tenant
    ids: lowercase letters, digits, single inner hyphens), else raises
    :class:`~tenantbus.IdError` naming the rule."""
    return validate_id(name, "region")


def region_tag(region: str) -> str:
    """The server tag of ``region``: ``region:<name>``."""
    return f"{REGION_TAG_PREFIX}{region}"


def region_holds(region: str, placement: Any) -> bool:
    """Whether a stream whose configured placement is ``placement`` (a nats-py
    ``api.Placement``, a dict, or ``None``) is kept in ``region``: its tags
    carry the region's tag (compared case-insensitively, as the Rust
    ``Region::holds``; servers match tags case-insensitively too)."""
    if placement is None:
        return False
    tags = placement.get("tags") if isinstance(placement, Mapping) else getattr(placement, "tags", None)
    want = region_tag(region).lower()
    return any(isinstance(t, str) and t.lower() == want for t in (tags or []))


@dataclass(frozen=True)
class Placement:
    """Where the streams and buckets an agent creates go (``StorePlacement`` of
    ``bus/src/region.rs``): ``replicas`` (1 to 5) is the deployment's replica
    count and ``region`` the tenant's region, if it is bound to one. ``None``
    means unset: one replica, no region. Options of a layer (e.g.
    ``DispatchOptions.replicas``) still win over the bundle's value.

    The control plane writes it so an agent's streams are replicated and kept
    in its tenant's region without the agent knowing the deployment; a bundle
    carrying a value the Rust library would refuse is refused here too, so
    both languages place the same streams the same way."""

    replicas: Optional[int] = None
    region: Optional[str] = None

    def __post_init__(self) -> None:
        r = self.replicas
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or not MIN_REPLICAS <= r <= MAX_REPLICAS):
            raise BundleError(
                BundleErrorKind.INVALID,
                f"placement.replicas must be {MIN_REPLICAS} to {MAX_REPLICAS}, not {r!r}",
            )
        if self.region is not None:
            try:
                validate_region(self.region)
            except IdError as e:
                raise BundleError(BundleErrorKind.INVALID, f"placement: {e}") from e

    @property
    def is_unset(self) -> bool:
        """Nothing set (a bundle without ``placement``)."""
        return self.replicas is None and self.region is None

    @property
    def tags(self) -> List[str]:
        """The JetStream placement tags that keep a stream in the region
        (``["region:<r>"]``), or ``[]`` without a region."""
        return [region_tag(self.region)] if self.region is not None else []

    @classmethod
    def from_dict(cls, obj: Any) -> "Placement":
        """Parses the JSON object form (``None`` is unset); raises
        :class:`~tenantbus.BundleError` (``invalid``) for anything else or
        an invalid value. Unknown keys are ignored, as serde does."""
        if obj is None:
            return cls()
        if not isinstance(obj, Mapping):
            raise BundleError(BundleErrorKind.INVALID, "placement is a JSON object")
        replicas, region = obj.get("replicas"), obj.get("region")
        if region is not None and not isinstance(region, str):
            raise BundleError(BundleErrorKind.INVALID, "placement.region is a string")
        return cls(replicas=replicas, region=region)

    def to_dict(self) -> Dict[str, Any]:
        """The JSON object form: only the keys that are set (as the Rust
        serializer writes it)."""
        d: Dict[str, Any] = {}
        if self.replicas is not None:
            d["replicas"] = self.replicas
        if self.region is not None:
            d["region"] = self.region
        return d


@dataclass
class CredentialBundle:
    """Everything an agent needs to join its tenant's namespace. ``repr`` never
    shows the creds or keys."""

    url: str
    tenant: str
    agent: str
    keys: TenantKeySet
    creds: Optional[str] = None
    #: Replicas and region of the streams and buckets this agent creates
    #: (written by the control plane; unset: one replica, no region).
    placement: Placement = field(default_factory=Placement)

    def __post_init__(self) -> None:
        # A dict (the JSON form) or None is accepted for convenience.
        if not isinstance(self.placement, Placement):
            self.placement = Placement.from_dict(self.placement)

    def __repr__(self) -> str:
        return (
            f"CredentialBundle(url={self.url!r}, tenant={self.tenant!r}, agent={self.agent!r}, "
            f"creds={'<redacted>' if self.creds else None}, keys={self.keys!r}, "
            f"placement={self.placement!r})"
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
        placement = obj.get("placement")
        if not isinstance(placement, Placement):
            placement = Placement.from_dict(placement)
        if keyset.tenant != tenant:
            raise BundleError(
                BundleErrorKind.TENANT_MISMATCH, f"key set of {keyset.tenant} in a bundle of {tenant}"
            )
        return cls(url=url, tenant=tenant, agent=agent, keys=keyset, creds=creds, placement=placement)

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
        if not self.placement.is_unset:
            d["placement"] = self.placement.to_dict()
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
