"""tenantbus.settle: only the "account not settled yet" codes and a store the
server could not create yet are retried, and only for a bounded time."""

import asyncio
import time

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
