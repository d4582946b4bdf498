"""Verified messages as the application sees them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

from .envelope import MessageId


@dataclass
class TenantMessage:
    """A message that passed verification."""

    #: The subject, relative to the namespace (for a response: the request's).
    subject: str
    #: The tenant it was sealed for (always the receiver's own).
    tenant: str
    #: The 128-bit message id.
    msg_id: MessageId
    #: When the sender sealed it, ms since the Unix epoch (sender's clock).
    timestamp_ms: int
    #: The sending agent, if it identified itself.
    sender: Optional[str]
    #: The key version that sealed it.
    key_version: int
    #: The decrypted payload.
    payload: bytes
    #: Where a response goes (a full inbox subject inside the tenant), for requests.
    reply: Optional[str] = None

    @property
    def timestamp(self) -> datetime:
        """When the sender sealed it, as an aware UTC datetime."""
        return datetime.fromtimestamp(self.timestamp_ms / 1000, tz=timezone.utc)

    def json(self) -> Any:
        """Decodes the payload as JSON."""
        return json.loads(self.payload)
