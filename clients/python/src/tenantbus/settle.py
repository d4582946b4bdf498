"""Waiting out a new account's JetStream settling across a cluster.

The control plane answers ``tenant create`` only after every server's resolver
holds the new account's JWT, but each server enables JetStream for the account
a moment later, on its own. Until the JetStream meta leader has done so,
creating a stream or bucket for the account is refused with "account not
found" (10035) or "JetStream not enabled for account" (10039), though nothing
is wrong. A stream placed on a server that has not yet made the account's
JetStream directory fails there, and the client only hears "error creating
store for stream" (10049, with that exact description; the server then drops
the assignment). :func:`while_settling` retries exactly those errors for at
most :data:`SETTLE_LIMIT` seconds, as the Rust ``tenant_bus::settle`` does;
every other error, and these after the limit, is raised at once.

A new stream has a second, shorter race: its subjects reach the other servers
of a cluster over the routes, so the first publish through another server may
find no responder. :func:`while_unrouted` retries exactly that (nothing was
stored) for at most :data:`ROUTE_LIMIT` seconds, as ``tenant_bus::settle``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, TypeVar

import nats.errors
import nats.js.errors

#: Seconds a new account's JetStream may take to settle.
SETTLE_LIMIT = 10.0

#: "account not found", "JetStream not enabled for account".
SETTLING_CODES = frozenset({10035, 10039})

T = TypeVar("T")


#: What a server answers for any failure to create a stream's store on the
#: server it placed the stream on (code 10049, "stream create failed").
STORE_FAILED = (10049, "error creating store for stream")


def is_settling(error: BaseException) -> bool:
    """Whether ``error`` is a JetStream API error saying the account is not
    (yet) known to JetStream, or that the stream's store could not be created
    yet."""
    if not isinstance(error, nats.js.errors.APIError):
        return False
    return error.err_code in SETTLING_CODES or (error.err_code, error.description) == STORE_FAILED


async def while_settling(op: Callable[[], Awaitable[T]], limit: float = SETTLE_LIMIT) -> T:
    """Runs ``op()`` until it succeeds, raises an error that is not
    :func:`is_settling`, or ``limit`` seconds have passed."""
    return await _retry_while(is_settling, op, limit, first=0.05, most=0.5)


async def _retry_while(
    retryable: Callable[[BaseException], bool],
    op: Callable[[], Awaitable[T]],
    limit: float,
    first: float,
    most: float,
) -> T:
    """Runs ``op()`` until it succeeds or raises an error ``retryable`` does not
    accept; doubling pauses from ``first`` to ``most``, no retry that would
    end past ``limit`` seconds."""
    deadline = time.monotonic() + limit
    pause = first
    while True:
        try:
            return await op()
        except Exception as e:
            if not retryable(e) or time.monotonic() + pause >= deadline:
                raise
        await asyncio.sleep(pause)
        pause = min(pause * 2, most)


#: Seconds a new stream's subjects may take to reach the server a client is on.
ROUTE_LIMIT = 3.0


def is_unrouted(error: BaseException) -> bool:
    """Whether ``error`` is a JetStream publish that no stream answered."""
    return isinstance(error, (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError))


async def while_unrouted(op: Callable[[], Awaitable[T]], limit: float = ROUTE_LIMIT) -> T:
    """Runs ``op()`` until it succeeds, raises an error that is not
    :func:`is_unrouted`, or ``limit`` seconds have passed."""
    return await _retry_while(is_unrouted, op, limit, first=0.02, most=0.25)
