"""The tenant state store (tenantbus.kv) against a real nats-server, and
shared with Rust agents (examples/interop_peer.rs kv-put / kv-get)."""

import asyncio

import pytest

import tenantbus as tb
from tenantbus.kv import KvErrorKind, KvOptions, VALUE_PREFIX_LEN

from conftest import RustPeer, make_bundle, unique_tenant, write_bundle


async def test_get_put_create_update_delete_keys_and_watch(nats_server) -> None:
    t = unique_tenant("kv")
    ns = await tb.connect(make_bundle(nats_server.url, t, "py"))
    try:
        store = await ns.kv(f"s-{t}")
        assert await store.keys() == []  # nothing ever written: answered at once
        watch = await store.watch()
        r1 = await store.put("user.42", b"v1")
        e = await store.get("user.42")
        assert (e.value, e.revision, e.writer, e.key_version, e.expires_at_ms) == (b"v1", r1, "py", 1, None)
        with pytest.raises(tb.KvError) as x:
            await store.create("user.42", b"again")
        assert x.value.kind is KvErrorKind.EXISTS
        with pytest.raises(tb.KvError) as x:
            await store.update("user.42", b"v2", r1 + 1000)
        assert x.value.kind is KvErrorKind.WRONG_REVISION
        r2 = await store.update("user.42", b"v2", r1)
        assert (await store.get("user.42")).value == b"v2"
        await store.create("user.7", b"seven")
        assert sorted(await store.keys()) == ["user.42", "user.7"]
        with pytest.raises(tb.KvError) as x:
            await store.delete_if("user.7", r2 + 1000)
        assert x.value.kind is KvErrorKind.WRONG_REVISION
        await store.delete("user.7")
        with pytest.raises(tb.KvError) as x:
            await store.get("user.7")
        assert x.value.kind is KvErrorKind.NOT_FOUND
        assert await store.keys() == ["user.42"]
        await store.create("user.7", b"back")  # a deleted key may be created again
        # The watch saw every change since it started, in order.
        seen = []
        for _ in range(5):
            c = await watch.next(timeout=5)
            seen.append((c.key, None if c.entry is None else c.entry.value))
        assert seen == [("user.42", b"v1"), ("user.42", b"v2"), ("user.7", b"seven"),
                        ("user.7", None), ("user.7", b"back")]
        await watch.stop()
        # Bad input changes nothing.
        for bad in ["", "a..b", "a.*", "a b", "ä", "$sys"]:
            with pytest.raises(tb.KvError) as x:
                await store.put(bad, b"x")
            assert x.value.kind is KvErrorKind.INVALID_KEY, bad
        with pytest.raises(tb.KvError) as x:
            await ns.kv("a.b")
        assert x.value.kind is KvErrorKind.INVALID_STORE
        small = await ns.kv(f"s-{t}", KvOptions(max_value_len=4))
        with pytest.raises(tb.KvError) as x:
            await small.put("big", b"12345")
        assert x.value.kind is KvErrorKind.TOO_LARGE
    finally:
        await ns.close()


async def test_an_expired_value_is_absent_and_may_be_created_again(nats_server) -> None:
    t = unique_tenant("kvt")
    ns = await tb.connect(make_bundle(nats_server.url, t, "py"))
    try:
        short = await ns.kv(f"s-{t}", KvOptions(ttl=0.3))
        await short.put("session", b"soon gone")
        assert (await short.get("session")).expires_at_ms is not None
        await asyncio.sleep(0.5)
        with pytest.raises(tb.KvError) as x:
            await short.get("session")
        assert x.value.kind is KvErrorKind.NOT_FOUND
        assert await short.keys() == []
        await short.create("session", b"fresh")
        assert (await short.get("session")).value == b"fresh"
    finally:
        await ns.close()


async def test_values_are_bound_to_their_key_store_bucket_and_tenant(nats_server) -> None:
    """On a server where tenants share an account (so the bucket is shared,
    which operator mode prevents), only the sealing keeps them apart: a value
    copied to another key, another store, or read by another tenant fails to
    open, and so does one whose stored expiry was changed."""
    t, u = unique_tenant("kva"), unique_tenant("kvb")
    a = await tb.connect(make_bundle(nats_server.url, t, "a"))
    b = await tb.connect(make_bundle(nats_server.url, u, "b"))
    try:
        store = f"s-{t}"
        sa = await a.kv(store)
        await sa.put("k", b"secret of a")
        raw = a.nats.jetstream()
        kv = await raw.key_value("STATE")
        stored = (await kv.get(f"{store}.k")).value
        # Moved to another key, to another store.
        await kv.put(f"{store}.other", stored)
        await kv.put(f"{store}-x.k", stored)
        for s, k in [(store, "other"), (f"{store}-x", "k")]:
            with pytest.raises(tb.KvError) as x:
                await (await a.kv(s)).get(k)
            assert x.value.kind is KvErrorKind.TAMPERED, (s, k)
        # Another tenant's agent reading the same bucket key.
        with pytest.raises(tb.KvError) as x:
            await (await b.kv(store)).get("k")
        assert x.value.kind is KvErrorKind.TAMPERED
        # The expiry rewritten (to make a value live longer).
        forged = stored[:1] + (2**62).to_bytes(8, "big") + stored[VALUE_PREFIX_LEN:]
        await kv.put(f"{store}.k", forged)
        with pytest.raises(tb.KvError) as x:
            await sa.get("k")
        assert x.value.kind is KvErrorKind.TAMPERED
        for junk in [b"", b"\x01", b"\x02" + stored[1:]]:
            await kv.put(f"{store}.k", junk)
            with pytest.raises(tb.KvError) as x:
                await sa.get("k")
            assert x.value.kind is KvErrorKind.TAMPERED
    finally:
        await a.close()
        await b.close()


async def test_rust_and_python_agents_share_the_store(nats_server, tmp_path, peers) -> None:
    t = unique_tenant("kvi")
    store = f"s-{t}"
    bundle = write_bundle(tmp_path, make_bundle(nats_server.url, t, "rusty"))
    ns = await tb.connect(make_bundle(nats_server.url, t, "py"))
    try:
        # Rust writes, Python reads.
        put = await RustPeer.start(bundle, "kv-put", store, "from.rust", "hello from rust")
        peers.append(put)
        await put.wait_for("kv")
        assert await put.finish() == 0
        e = await (await ns.kv(store)).get("from.rust")
        assert (e.value, e.writer) == (b"hello from rust", "rusty")
        # Python writes, Rust reads.
        await (await ns.kv(store)).put("from.py", b"hello from python")
        get = await RustPeer.start(bundle, "kv-get", store, "from.py")
        peers.append(get)
        ev = await get.wait_for("kv")
        assert (ev["value"], ev["writer"]) == ("hello from python", "py")
        assert await get.finish() == 0
    finally:
        await ns.close()
