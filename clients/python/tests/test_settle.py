"""tenantbus.settle: only the "account not settled yet" codes and a store the
server could not create yet are retried, and only for a bounded time."""

import asyncio
import time

import nats.errors
import nats.js.errors
import pytest

from tenantbus.settle import is_settling, while_settling


def api_error(err_code: int, description: str = "x") -> nats.js.errors.APIError:
    return nats.js.errors.ServiceUnavailableError(
        code=503, err_code=err_code, description=description
    )


def test_only_the_account_codes_and_a_store_failure_are_settling():
    assert is_settling(api_error(10035))
    assert is_settling(api_error(10039))
    assert is_settling(
        nats.js.errors.ServerError(
            code=500, err_code=10049, description="error creating store for stream"
        )
    )
    # Any other "stream create failed" carries its cause and is final.
    assert not is_settling(api_error(10049, "subjects overlap"))
    # Insufficient resources, no suitable peers (a region that is down),
    # JetStream disabled on the server; not an API error at all.
    for code in (10023, 10005, 10076):
        assert not is_settling(api_error(code)), code
    assert not is_settling(asyncio.TimeoutError())


def test_settling_errors_are_retried_until_success():
    calls = []

    async def op():
        calls.append(1)
        if len(calls) < 3:
            raise api_error(10039)
        return "created"

    assert asyncio.run(while_settling(op)) == "created"
    assert len(calls) == 3


def test_a_final_error_is_raised_at_once_and_a_settling_one_after_the_limit():
    calls = []

    async def final():
        calls.append(1)
        raise api_error(10023)

    with pytest.raises(nats.js.errors.APIError):
        asyncio.run(while_settling(final))
    assert len(calls) == 1

    async def never():
        raise api_error(10035)

    start = time.monotonic()
    with pytest.raises(nats.js.errors.APIError) as raised:
        asyncio.run(while_settling(never, limit=0.4))
    assert raised.value.err_code == 10035
    assert 0.2 <= time.monotonic() - start < 2.0


def test_an_unanswered_publish_is_retried_then_raised_after_the_limit():
    from tenantbus.settle import is_unrouted, while_unrouted

    assert is_unrouted(nats.js.errors.NoStreamResponseError())
    assert not is_unrouted(api_error(10059))
    assert not is_unrouted(asyncio.TimeoutError())
    calls = []

    async def op():
        calls.append(1)
        if len(calls) < 3:
            raise nats.js.errors.NoStreamResponseError()
        return 7

    assert asyncio.run(while_unrouted(op)) == 7
    assert len(calls) == 3

    async def other():
        calls.append(1)
        raise api_error(10059)

    calls.clear()
    with pytest.raises(nats.js.errors.APIError):
        asyncio.run(while_unrouted(other))
    assert len(calls) == 1, "another error is raised at once"

    async def never():
        raise nats.js.errors.NoStreamResponseError()

    start = time.monotonic()
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        asyncio.run(while_unrouted(never, limit=0.3))
    assert 0.1 <= time.monotonic() - start < 2.0


def test_an_unanswered_request_is_sent_again_until_answered():
    from tenantbus.settle import while_unanswered

    calls = []

    async def op():
        calls.append(1)
        if len(calls) < 3:
            await asyncio.sleep(3600)  # a leaderless stream: never answered
        return 7

    start = time.monotonic()
    assert asyncio.run(while_unanswered(op, limit=5.0, again_after=0.1)) == 7
    assert len(calls) == 3
    assert 0.15 <= time.monotonic() - start < 2.0

    # A slow answer to the first copy still counts: it stays in flight when
    # the second is sent.
    calls.clear()

    async def slow_first():
        calls.append(1)
        if len(calls) == 1:
            await asyncio.sleep(0.15)
            return "first"
        await asyncio.sleep(3600)

    assert asyncio.run(while_unanswered(slow_first, limit=5.0, again_after=0.1)) == "first"
    assert len(calls) == 2

    # The request's own timeout (nats-py's TimeoutError) is sent again too.
    calls.clear()

    async def times_out():
        calls.append(1)
        if len(calls) < 2:
            raise nats.errors.TimeoutError
        return 8

    assert asyncio.run(while_unanswered(times_out, limit=5.0, again_after=0.1)) == 8
    assert len(calls) == 2

    # An answer saying no is raised at once.
    calls.clear()

    async def gone():
        calls.append(1)
        raise nats.js.errors.NotFoundError(code=404, err_code=10059, description="stream not found")

    with pytest.raises(nats.js.errors.NotFoundError):
        asyncio.run(while_unanswered(gone, limit=5.0, again_after=0.1))
    assert len(calls) == 1


def test_a_request_never_answered_raises_unanswered_at_the_limit():
    from tenantbus.settle import Unanswered, while_unanswered

    calls = []

    async def never():
        calls.append(1)
        await asyncio.sleep(3600)

    start = time.monotonic()
    with pytest.raises(Unanswered) as raised:
        asyncio.run(while_unanswered(never, limit=0.5, again_after=0.1))
    assert 0.45 <= time.monotonic() - start < 2.0
    assert 4 <= len(calls) <= 6
    # A nats-py timeout, so code that handles timeouts handles it.
    assert isinstance(raised.value, nats.errors.TimeoutError)
    assert "no answer within 0.5 s" in str(raised.value)
