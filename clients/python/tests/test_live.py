"""The namespace API on a real nats-server, Python to Python."""

import asyncio
import json

import nats
import pytest

import tenantbus as tb

from conftest import MASTER, make_bundle, unique_tenant


async def connect(server, tenant, agent, **kw):
    return await tb.connect(make_bundle(server.url, tenant, agent, **kw))


async def test_publish_subscribe_stamp_and_counters(nats_server) -> None:
    t = unique_tenant()
    a = await connect(nats_server, t, "alice")
    b = await connect(nats_server, t, "bob")
    try:
        sub = await b.subscribe("jobs.>")
        ids = [await a.publish("jobs.created", f"job {i}".encode()) for i in range(3)]
        await a.publish_json("jobs.updated", {"id": 7})
        for i in range(3):
            m = await sub.next_msg(timeout=5)
            assert (m.subject, m.tenant, m.sender, m.payload) == ("jobs.created", t, "alice", f"job {i}".encode())
            assert m.msg_id == ids[i] and m.key_version == 1 and m.reply is None
            assert abs(m.timestamp_ms - tb.now_ms()) < 10_000
            assert m.timestamp.year >= 2024
        m = await sub.next_msg(timeout=5)
        assert m.subject == "jobs.updated" and m.json() == {"id": 7}
        with pytest.raises(tb.SubscribeError) as e:
            await sub.next_msg(timeout=0.2)
        assert e.value.kind is tb.SubscribeErrorKind.TIMED_OUT
        snap = b.counters()
        assert snap.delivered == 4 and snap.dropped_total() == 0
        assert set(snap.dropped) == {r.value for r in tb.DropReason}
    finally:
        await a.close()
        await b.close()


async def test_a_subscription_is_live_when_subscribe_returns(nats_server) -> None:
    # A message published from another connection right after subscribe()
    # returns must arrive. With one nats-py flush as the barrier it did not in
    # about 1 of 100 rounds (nats-py writes the PING ahead of the queued SUB),
    # so 150 fresh subscriptions make a regression fail almost surely.
    t = unique_tenant()
    a = await connect(nats_server, t, "alice")
    b = await connect(nats_server, t, "bob")
    try:
        lost = []
        for i in range(150):
            sub = await b.subscribe(f"round.{i}")
            await a.publish(f"round.{i}", b"x")
            try:
                m = await sub.next_msg(timeout=2)
                assert m.subject == f"round.{i}"
            except tb.SubscribeError:
                lost.append(i)
            await sub.unsubscribe()
        assert lost == []
    finally:
        await a.close()
        await b.close()


async def test_async_for_ends_when_the_namespace_closes(nats_server) -> None:
    t = unique_tenant()
    ns = await connect(nats_server, t, "solo")
    sub = await ns.subscribe("x.*")
    await ns.publish("x.a", b"1")
    await ns.publish("x.b", b"2")
    await ns.flush()
    got = []

    async def read():
        async for m in sub:
            got.append(m.payload)
            if len(got) == 2:
                await ns.close()

    await asyncio.wait_for(read(), 10)
    assert got == [b"1", b"2"]


async def test_queue_groups_share_the_work(nats_server) -> None:
    t = unique_tenant()
    pub = await connect(nats_server, t, "pub")
    w1 = await connect(nats_server, t, "w1")
    w2 = await connect(nats_server, t, "w2")
    try:
        s1 = await w1.queue_subscribe("work.*", "workers")
        s2 = await w2.queue_subscribe("work.*", "workers")
        for i in range(40):
            await pub.publish("work.item", str(i).encode())
        await pub.flush()
        seen = []
        for s in (s1, s2):
            while True:
                try:
                    seen.append(int((await s.next_msg(timeout=0.5)).payload))
                except tb.SubscribeError:
                    break
        assert sorted(seen) == list(range(40))
        for bad in ["", "a.b", "a*", "x" * 65, "a b"]:
            with pytest.raises(tb.SubscribeError) as e:
                await w1.queue_subscribe("work.*", bad)
            assert e.value.kind is tb.SubscribeErrorKind.INVALID_QUEUE
    finally:
        for ns in (pub, w1, w2):
            await ns.close()


async def test_request_reply_json_no_responders_and_timeouts(nats_server) -> None:
    t = unique_tenant()
    server_ns = await connect(nats_server, t, "server")
    client = await connect(nats_server, t, "client")
    try:
        svc = await server_ns.subscribe("svc.*")

        async def serve():
            async for m in svc:
                if m.subject == "svc.silent":
                    continue
                if m.subject == "svc.json":
                    await server_ns.respond_json(m, {"echo": m.json()})
                else:
                    assert m.reply and m.reply.startswith(f"tenant.{t}._INBOX.")
                    await server_ns.respond(m, b"re:" + m.payload)

        task = asyncio.ensure_future(serve())
        r = await client.request("svc.echo", b"hi", timeout=5)
        assert (r.subject, r.payload, r.sender, r.tenant) == ("svc.echo", b"re:hi", "server", t)
        assert await client.request_json("svc.json", {"a": 1}, timeout=5) == {"echo": {"a": 1}}
        many = await asyncio.gather(*[client.request("svc.echo", str(i), timeout=5) for i in range(20)])
        assert [m.payload for m in many] == [f"re:{i}".encode() for i in range(20)]
        with pytest.raises(tb.RequestError) as e:
            await client.request("nobody.home", b"?", timeout=5)
        assert e.value.kind is tb.RequestErrorKind.NO_RESPONDERS
        with pytest.raises(tb.RequestError) as e:
            await client.request("svc.silent", b"?", timeout=0.3)
        assert e.value.kind is tb.RequestErrorKind.TIMED_OUT
        with pytest.raises(tb.PublishError) as e:
            await server_ns.respond(r, b"no reply inbox")
        assert e.value.kind is tb.PublishErrorKind.NO_REPLY
        task.cancel()
    finally:
        await client.close()
        await server_ns.close()


async def test_invalid_subjects_are_refused_with_their_kind(nats_server) -> None:
    ns = await connect(nats_server, unique_tenant(), "a")
    try:
        for bad in ["", "a..b", "a.*", "$SYS.x", "_INBOX.x", "a b", "ü", "a.>"]:
            with pytest.raises(tb.PublishError) as e:
                await ns.publish(bad, b"")
            assert e.value.kind is tb.PublishErrorKind.INVALID_SUBJECT
            with pytest.raises(tb.RequestError) as r:
                await ns.request(bad, b"")
            assert r.value.kind is tb.RequestErrorKind.INVALID_SUBJECT
        for bad in ["", "a.>.b", "a*", "$JS.>", "_INBOX.>"]:
            with pytest.raises(tb.SubscribeError) as s:
                await ns.subscribe(bad)
            assert s.value.kind is tb.SubscribeErrorKind.INVALID_SUBJECT
    finally:
        await ns.close()


async def test_admission_hook_rejects_and_counts(nats_server) -> None:
    ns = await tb.connect(
        make_bundle(nats_server.url, unique_tenant(), "a"),
        admission=lambda n: "too big" if n > 10 else None,
    )
    try:
        await ns.publish("x", b"small")
        with pytest.raises(tb.PublishError) as e:
            await ns.publish("x", b"x" * 11)
        assert e.value.kind is tb.PublishErrorKind.REJECTED
        with pytest.raises(tb.RequestError) as r:
            await ns.request("x", b"x" * 11)
        assert r.value.kind is tb.RequestErrorKind.REJECTED
        assert ns.counters().rejected_by_admission == 2
    finally:
        await ns.close()


async def test_key_rotation_with_update_keys(nats_server) -> None:
    t = unique_tenant()
    sender = await connect(nats_server, t, "sender")
    receiver = await connect(nats_server, t, "receiver")
    try:
        sub = await receiver.subscribe("k.>")
        v12 = tb.TenantKeySet.from_master(MASTER, t, [1, 2], 2)
        # The receiver rotates first (accepts 1 and 2), then the sender.
        receiver.update_keys(v12)
        await sender.publish("k.a", b"v1")
        sender.update_keys(v12)
        await sender.publish("k.a", b"v2")
        assert [(m.payload, m.key_version) for m in [await sub.next_msg(5), await sub.next_msg(5)]] == [
            (b"v1", 1), (b"v2", 2)]
        # Version 1 retired: its messages are dropped as unknown_key.
        receiver.update_keys(v12.without(1))
        old = tb.Sealer(tb.TenantKeySet.from_master(MASTER, t, [1], 1), "old")
        raw = await nats.connect(nats_server.url)
        _, body = old.seal(f"tenant.{t}.k.a", None, b"old")
        await raw.publish(f"tenant.{t}.k.a", body)
        await sender.publish("k.a", b"v2 again")
        await raw.flush()
        await sender.flush()
        m = await sub.next_msg(5)
        assert m.payload == b"v2 again"
        assert receiver.counters()["unknown_key"] == 1
        await raw.close()
        with pytest.raises(tb.KeySetError):
            receiver.update_keys(tb.TenantKeySet.from_master(MASTER, "other", [1], 1))
    finally:
        await sender.close()
        await receiver.close()


async def test_url_list_and_bundle_file(nats_server, tmp_path) -> None:
    t = unique_tenant()
    bundle = make_bundle(f"nats://127.0.0.1:1,{nats_server.url}", t, "listed")
    path = tmp_path / "b.json"
    tb.CredentialBundle.from_dict(bundle).write_to_file(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    ns = await tb.connect(str(path))
    try:
        sub = await ns.subscribe("u")
        await ns.publish("u", b"ok")
        assert (await sub.next_msg(5)).payload == b"ok"
    finally:
        await ns.close()


async def test_connect_errors_have_kinds(tmp_path) -> None:
    with pytest.raises(tb.ConnectError) as e:
        await tb.connect(make_bundle("nats://127.0.0.1:1", "t", "a"), connect_timeout=1)
    assert e.value.kind is tb.ConnectErrorKind.CONNECTION
    bad = make_bundle("nats://127.0.0.1:1", "t", "a")
    bad["creds"] = "not a creds file"
    with pytest.raises(tb.ConnectError) as e:
        await tb.connect(bad)
    assert e.value.kind is tb.ConnectErrorKind.CREDENTIALS
    with pytest.raises(tb.BundleError) as b:
        await tb.connect(str(tmp_path / "missing.json"))
    assert b.value.kind is tb.BundleErrorKind.IO
    mismatch = make_bundle("nats://127.0.0.1:1", "t", "a")
    mismatch["keys"] = tb.TenantKeySet.from_master(MASTER, "u", [1], 1).to_dict()
    with pytest.raises(tb.BundleError) as b:
        await tb.connect(mismatch)
    assert b.value.kind is tb.BundleErrorKind.TENANT_MISMATCH


async def test_raw_client_with_the_tenant_inbox_prefix_reaches_no_other_tenant(nats_server) -> None:
    # What nats-py needs for requests inside a tenant: inbox_prefix; messages of
    # another tenant's subjects never reach this namespace's subscriptions.
    t, other = unique_tenant(), unique_tenant()
    ns = await connect(nats_server, t, "a")
    foreign = await connect(nats_server, other, "a")
    try:
        sub = await ns.subscribe(">")
        await foreign.publish("x", b"foreign")
        await foreign.flush()
        with pytest.raises(tb.SubscribeError):
            await sub.next_msg(timeout=0.3)
        assert ns.counters().dropped_total() == 0
        assert json.loads(json.dumps(ns.counters().dropped))["wrong_tenant"] == 0
    finally:
        await ns.close()
        await foreign.close()
