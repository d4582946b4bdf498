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

A stream or consumer whose leader was lost answers nothing until a new one is
elected (a few seconds on a cluster), and a request sent before that is never
answered, even after the election. :func:`while_unanswered` sends an
idempotent request (a lookup) again every :data:`ASK_AGAIN_AFTER` seconds
while no answer comes, for at most :data:`ASK_LIMIT`, as
``tenant_bus::settle::while_unanswered``: an agent starting during an election
opens its store as soon as the election ends instead of failing.
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


#: Seconds between the copies :func:`while_unanswered` sends while no answer
#: has come.
ASK_AGAIN_AFTER = 1.0

#: Seconds :func:`while_unanswered` waits for an answer in all: a stream's
#: followers elect a new leader 4 to 9 s after the old one stops.
ASK_LIMIT = 12.0


class Unanswered(nats.errors.TimeoutError):
    """No answer came to any request :func:`while_unanswered` sent (a stream
    or consumer without a leader, a server that does not answer). A nats-py
    ``TimeoutError``, so code that handles timeouts handles it."""

    def __init__(self, limit: float, again_after: float) -> None:
        super().__init__()
        self.limit = limit
        self.again_after = again_after

    def __str__(self) -> str:
        return f"no answer within {self.limit:g} s (asked every {self.again_after:g} s)"


async def while_unanswered(
    op: Callable[[], Awaitable[T]], limit: float = ASK_LIMIT, again_after: float = ASK_AGAIN_AFTER
) -> T:
    """Runs ``op()``, one idempotent JetStream API request (a lookup: asking
    twice changes nothing), until one copy of it is answered: while no answer
    has come, a new copy is sent every ``again_after`` seconds and the earlier
    ones stay in flight (a slow answer to the first still counts; a copy sent
    after an election ends is answered by the new leader), for at most
    ``limit`` seconds, then :class:`Unanswered` is raised. A copy that times
    out on its own is dropped; :func:`is_settling` errors send the next copy
    after :func:`while_settling`'s backoff. The first other answer, result or
    error, is returned or raised; the copies still in flight are cancelled.
    As ``tenant_bus::settle::while_unanswered``. Not for creates: one sent
    twice while the first is still being applied can be refused."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    copies = {asyncio.ensure_future(op())}
    next_copy = loop.time() + again_after
    pause = 0.05
    try:
        while True:
            now = loop.time()
            if now >= deadline:
                raise Unanswered(limit, again_after)
            wake = max(0.0, min(next_copy, deadline) - now)
            if copies:
                done, _ = await asyncio.wait(copies, timeout=wake, return_when=asyncio.FIRST_COMPLETED)
            else:  # every copy gave up or was told to wait: wait for the next
                await asyncio.sleep(wake)
                done = set()
            for copy in done:
                copies.discard(copy)
                error = copy.exception()
                if error is None:
                    return copy.result()
                if isinstance(error, asyncio.TimeoutError):
                    continue  # nats-py's own timeout (a subclass): that copy gave up
                if is_settling(error) and loop.time() + pause < deadline:
                    next_copy = min(next_copy, loop.time() + pause)
                    pause = min(pause * 2, 0.5)
                    continue
                raise error
            if loop.time() >= next_copy and loop.time() < deadline:
                copies.add(asyncio.ensure_future(op()))
                next_copy = loop.time() + again_after
    finally:
        for copy in copies:
            copy.cancel()
