"""Live interoperability with the Rust bus (examples/interop_peer.rs) on one
nats-server: both directions of publish/subscribe and request/reply."""

import asyncio

import pytest

import tenantbus as tb

from conftest import RustPeer, make_bundle, unique_tenant, write_bundle


async def test_rust_publishes_python_receives(nats_server, tmp_path, peers) -> None:
    t = unique_tenant("ir")
    ns = await tb.connect(make_bundle(nats_server.url, t, "py-sub"))
    try:
        sub = await ns.subscribe("events.>")
        rust = await RustPeer.start(write_bundle(tmp_path, make_bundle(nats_server.url, t, "rust-pub")),
                                    "pub", "events.created", "5", "from-rust")
        peers.append(rust)
        published = await rust.wait_for("published")
        assert await rust.finish() == 0
        for i in range(5):
            m = await sub.next_msg(timeout=10)
            assert (m.subject, m.tenant, m.sender, m.payload) == ("events.created", t, "rust-pub", f"from-rust-{i}".encode())
            assert m.msg_id.to_hex() == published["ids"][i]
            assert m.key_version == 1
        assert ns.counters().dropped_total() == 0
    finally:
        await ns.close()


async def test_python_publishes_rust_receives(nats_server, tmp_path, peers) -> None:
    t = unique_tenant("ir")
    rust = await RustPeer.start(write_bundle(tmp_path, make_bundle(nats_server.url, t, "rust-sub")),
                                "sub", "events.>", "4", "20000")
    peers.append(rust)
    await rust.wait_for("ready")
    ns = await tb.connect(make_bundle(nats_server.url, t, "py-pub"))
    try:
        ids = [await ns.publish("events.py", f"from-python-{i}".encode()) for i in range(3)]
        ids.append(await ns.publish_json("events.json", {"n": 3}))
        await ns.flush()
        got = [await rust.wait_for("message") for _ in range(4)]
        done = await rust.wait_for("done")
        assert await rust.finish() == 0
    finally:
        await ns.close()
    assert [g["msg_id"] for g in got] == [i.to_hex() for i in ids]
    assert [g["payload"] for g in got[:3]] == [f"from-python-{i}" for i in range(3)]
    assert got[3]["payload"] == '{"n":3}' and got[3]["subject"] == "events.json"
    assert all(g["sender"] == "py-pub" and g["tenant"] == t and g["key_version"] == 1 for g in got)
    assert done["counters"]["delivered"] == 4
    assert sum(done["counters"]["dropped"].values()) == 0


async def test_python_requests_rust_responds(nats_server, tmp_path, peers) -> None:
    t = unique_tenant("ir")
    rust = await RustPeer.start(write_bundle(tmp_path, make_bundle(nats_server.url, t, "rust-svc")),
                                "respond", "svc.echo", "3", "20000")
    peers.append(rust)
    await rust.wait_for("ready")
    ns = await tb.connect(make_bundle(nats_server.url, t, "py-client"))
    try:
        for i in range(2):
            r = await ns.request("svc.echo", f"q{i}".encode(), timeout=10)
            assert (r.subject, r.payload, r.sender, r.tenant) == ("svc.echo", f"echo:q{i}".encode(), "rust-svc", t)
        # The responder answers 'echo:{"x":1}', not JSON: decoding fails with its kind.
        with pytest.raises(tb.RequestError) as e:
            await ns.request_json("svc.echo", {"x": 1}, timeout=10)
        assert e.value.kind is tb.RequestErrorKind.SERIALIZE
    finally:
        await ns.close()
    await rust.wait_for("done")
    reqs = [e for e in rust.events if e.get("event") == "request"]
    assert reqs[0]["reply"].startswith(f"tenant.{t}._INBOX.")
    assert reqs[0]["sender"] == "py-client"
    assert await rust.finish() == 0


async def test_rust_requests_python_responds(nats_server, tmp_path, peers) -> None:
    t = unique_tenant("ir")
    ns = await tb.connect(make_bundle(nats_server.url, t, "py-svc"))
    try:
        svc = await ns.subscribe("svc.*")

        async def serve():
            async for m in svc:
                await ns.respond(m, b"py:" + m.payload)

        task = asyncio.ensure_future(serve())
        rust = await RustPeer.start(write_bundle(tmp_path, make_bundle(nats_server.url, t, "rust-client")),
                                    "request", "svc.ask", "hello", "10000")
        peers.append(rust)
        r = await rust.wait_for("response")
        assert await rust.finish() == 0
        assert (r["payload"], r["sender"], r["subject"], r["tenant"]) == ("py:hello", "py-svc", "svc.ask", t)
        task.cancel()
    finally:
        await ns.close()


async def test_no_responders_seen_from_rust(nats_server, tmp_path, peers) -> None:
    t = unique_tenant("ir")
    rust = await RustPeer.start(write_bundle(tmp_path, make_bundle(nats_server.url, t, "rust-client")),
                                "request", "svc.none", "x", "5000")
    peers.append(rust)
    err = await rust.wait_for("request_error")
    assert err["kind"] == "NoResponders"
    assert await rust.finish() == 1


async def test_rotated_python_sender_is_read_by_rust_with_both_versions(nats_server, tmp_path, peers) -> None:
    t = unique_tenant("ir")
    rust_bundle = make_bundle(nats_server.url, t, "rust-sub", versions=[1, 2], current=2)
    rust = await RustPeer.start(write_bundle(tmp_path, rust_bundle), "sub", "rot", "2", "20000")
    peers.append(rust)
    await rust.wait_for("ready")
    ns = await tb.connect(make_bundle(nats_server.url, t, "py-pub"))
    try:
        await ns.publish("rot", b"v1")
        ns.update_keys(tb.TenantKeySet.from_dict(rust_bundle["keys"]))
        await ns.publish("rot", b"v2")
        await ns.flush()
        got = [await rust.wait_for("message") for _ in range(2)]
    finally:
        await ns.close()
    assert [(g["payload"], g["key_version"]) for g in got] == [("v1", 1), ("v2", 2)]
    assert await rust.finish() == 0
