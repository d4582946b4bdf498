"""report_usage and budgets from Python, live against ``agentbus up`` (the Rust
CLI starts nats-server in operator mode with the controller): a key counts
once, a budget admits exactly what fits its hard cap when ten $0.50 charges
race against $1.00, a refusal is ``BUDGET_EXCEEDED``, each threshold alerts
once, sealed, on the tenant's own ``events.budget``, and bad input is refused
before anything is sent."""

from __future__ import annotations

import asyncio
import json
from typing import List

import pytest

import tenantbus as tb
from tenantbus import usage

# The module-scoped `agentbus up` fixture of test_keys (tenants acme and
# globex); imported, it gives this module its own installation.
from test_keys import Installation, install  # noqa: F401

COST = "llm.cost_usd_micros"


def test_answers_parse_to_counted_or_typed_errors() -> None:
    assert usage.parse_answer(b'{"ok":{"counted":true}}') is True
    assert usage.parse_answer(b'{"ok":{"counted":false}}') is False
    with pytest.raises(tb.UsageError) as e:
        usage.parse_answer(b'{"error":{"code":"budget_exceeded","message":"budget x"}}')
    assert e.value.kind == tb.UsageErrorKind.BUDGET_EXCEEDED
    with pytest.raises(tb.UsageError) as e:
        usage.parse_answer(b'{"error":{"code":"something_new","message":""}}')
    assert e.value.kind == tb.UsageErrorKind.INTERNAL
    with pytest.raises(tb.UsageError):
        usage.parse_answer(b"not json")
    for unit in ["llm.tokens", "a", "tool_calls-1"]:
        assert usage.valid_unit(unit)
    for unit in ["", "LLM", "a b", "x" * 65, "a*"]:
        assert not usage.valid_unit(unit)


async def test_budgets_hold_against_concurrent_charges_and_alert_once(install: Installation) -> None:
    install.cli(
        "budget", "set", "acme", "llm-cost", "--unit", COST, "--per", "day",
        "--hard", "1000000", "--soft", "600000", "--action", "block",
    )
    listed = json.loads(install.cli("budget", "list", "acme", "-o", "json"))
    assert [b["name"] for b in listed] == ["llm-cost"] and listed[0]["spent"] == 0

    ns = await tb.connect_with_key(install.url, install.key("acme", "py-usage")["key"])
    try:
        alerts = await ns.subscribe("events.budget")
        # Bad input never leaves the process.
        with pytest.raises(tb.UsageError) as e:
            await tb.report_usage(ns, "Not A Unit", 1, "k")
        assert e.value.kind == tb.UsageErrorKind.INVALID_INPUT
        with pytest.raises(tb.UsageError):
            await tb.report_usage(ns, COST, -1, "k")

        # The same key counts once.
        assert await tb.report_usage(ns, "llm.tokens", 1234, "call-1") is True
        assert await tb.report_usage(ns, "llm.tokens", 1234, "call-1") is False

        results = await asyncio.gather(
            *(tb.report_usage(ns, COST, 500_000, f"charge-{i}") for i in range(10)),
            return_exceptions=True,
        )
        admitted = [r for r in results if r is True]
        refused = [r for r in results if isinstance(r, tb.UsageError)]
        assert len(admitted) == 2, results
        assert len(refused) == 8, results
        assert all(r.kind == tb.UsageErrorKind.BUDGET_EXCEEDED for r in refused)
        assert "llm-cost" in refused[0].detail

        got: List[dict] = []
        while True:
            try:
                msg = await alerts.next_msg(timeout=2)
            except Exception:
                break
            assert msg.sender == "agentbus-controller"
            got.append(json.loads(msg.payload))
        assert sorted(a["threshold"] for a in got) == ["hard", "soft"], got
        assert all(a["tenant"] == "acme" and a["budget"] == "llm-cost" for a in got)
    finally:
        await ns.close()
    listed = json.loads(install.cli("budget", "list", "acme", "-o", "json"))
    assert listed[0]["spent"] == 1_000_000 and listed[0]["remaining"] == 0

    # globex has no budget: the same charges are all counted.
    g = await tb.connect_with_key(install.url, install.key("globex", "py-usage")["key"])
    try:
        for i in range(3):
            assert await tb.report_usage(g, COST, 500_000, f"g-{i}") is True
    finally:
        await g.close()
