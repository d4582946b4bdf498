"""The Python drop reasons mirror the Rust ``DropReason`` names, in order."""

import pathlib
import re

import tenantbus as tb

RUST_VERIFY = pathlib.Path(__file__).resolve().parents[3] / "bus" / "src" / "verify.rs"


def rust_names() -> list:
    text = RUST_VERIFY.read_text()
    body = text[text.index("pub fn as_str(self)"):]
    body = body[: body.index("\n    }\n")]
    return re.findall(r'DropReason::\w+ => "([a-z_]+)"', body)


def test_names_match_the_rust_drop_reasons_in_order():
    assert [r.value for r in tb.DropReason] == rust_names()


def test_receive_budget_is_a_counted_reason():
    assert tb.DropReason("receive_budget") is tb.DropReason.RECEIVE_BUDGET
    snap = tb.Counters().snapshot()
    assert snap.dropped["receive_budget"] == 0
    assert snap.dropped_total() == 0
