"""Task dispatch: Python alone, and interoperating with the Rust dispatcher
(examples/interop_peer.rs) on the same stream, consumer and done bucket."""

import asyncio
import inspect

import nats.js.errors
import pytest

import tenantbus as tb
from tenantbus.dispatch import DispatchOptions, Dispatcher, Task, TaskOutcome

from conftest import RustPeer, make_bundle, unique_tenant, write_bundle


def opts(**kw) -> DispatchOptions:
    o = DispatchOptions(per_tenant_names=True, result_poll=0.2, backoff=[0.1])
    for k, v in kw.items():
        setattr(o, k, v)
    return o


async def test_python_dispatcher_and_worker(nats_server) -> None:
    t = unique_tenant("dp")
    ns = await tb.connect(make_bundle(nats_server.url, t, "py"))
    try:
        d = await Dispatcher.create(ns, opts(max_deliveries=2))
        assert (d.stream_name, d.done_bucket) == (f"TASKS_{t}", f"TASKS_DONE_{t}")
        attempts = {}

        async def handler(task: Task) -> bytes:
            attempts[task.payload] = attempts.get(task.payload, 0) + 1
            if task.payload == b"flaky" and task.delivery == 1:
                raise RuntimeError("first try fails")
            if task.payload == b"broken":
                raise RuntimeError("always fails")
            return b"ok:" + task.payload

        worker = await d.worker("summarize", handler, concurrency=2, fetch_expires=0.5)
        h1 = await d.dispatch("summarize", b"simple")
        h2 = await d.dispatch("summarize", b"flaky")
        h3 = await d.dispatch("summarize", b"broken")
        assert await h1.wait(20) == TaskOutcome(True, output=b"ok:simple")
        assert await h2.wait(20) == TaskOutcome(True, output=b"ok:flaky")
        dead = await h3.wait(20)
        assert (dead.completed, dead.reason, dead.deliveries) == (False, "always fails", 2)
        # A duplicate submission of a finished task is dropped by the stream's window.
        sealed = d.seal("summarize", b"once")
        first = await d.submit(sealed)
        again = await d.submit(sealed)
        assert not first.duplicate and again.duplicate and again.sequence == first.sequence
        assert (await (await d.handle(sealed.id)).wait(20)).output == b"ok:once"
        letters = await d.dead_letters(timeout=2)
        assert [(l.task_type, l.reason, l.payload, l.sender) for l in letters] == [
            ("summarize", "always fails", b"broken", "py")]
        await worker.shutdown(5)
        assert worker.stats.completed == 3 and worker.stats.dead_lettered == 1
        assert worker.stats.retried == 2
        with pytest.raises(tb.DispatchError) as e:
            await d.dispatch("Not A Type", b"")
        assert e.value.kind is tb.DispatchErrorKind.INVALID_TASK_TYPE
        with pytest.raises(tb.DispatchError) as e:
            await (await d.dispatch("nobody-works", b"x")).wait(0.5)
        assert e.value.kind is tb.DispatchErrorKind.TIMED_OUT
    finally:
        await ns.close()


async def test_long_handlers_outlive_ack_wait_and_the_time_limit_fails_the_attempt(nats_server) -> None:
    """A handler longer than ``ack_wait`` is kept alive by progress acks (run
    once, no copy redelivered meanwhile); one past ``handler_timeout`` fails
    its attempt with the limit as the reason (the Rust worker's test twin)."""
    t = unique_tenant("lh")
    ns = await tb.connect(make_bundle(nats_server.url, t, "py"))
    try:
        d = await Dispatcher.create(ns, opts(ack_wait=1.0, handler_timeout=3.5, max_deliveries=1))
        runs = []

        async def handler(task: Task) -> bytes:
            runs.append(task.payload)
            # "2000": two ack waits; "forever": past the limit.
            await asyncio.sleep(60 if task.payload == b"forever" else 2.0)
            return task.payload

        # Two slots, one task at a time: the free slot's pull is where the
        # server would redeliver a task whose ack timer ran out.
        worker = await d.worker("slow", handler, concurrency=2, fetch_expires=0.5)
        for _ in range(2):
            h = await d.dispatch("slow", b"2000")
            assert await h.wait(20) == TaskOutcome(True, output=b"2000")
        stuck = await (await d.dispatch("slow", b"forever")).wait(20)
        assert (stuck.completed, stuck.reason, stuck.deliveries) == (
            False, "handler timed out after 3500 ms", 1)
        await worker.shutdown(5)
        assert runs == [b"2000", b"2000", b"forever"]
        assert worker.stats.duplicates == 0 and worker.stats.running_copies == 0
    finally:
        await ns.close()


async def test_the_done_bucket_republishes_outcomes_and_an_older_bucket_still_works(nats_server) -> None:
    """A bucket the dispatcher creates republishes each recorded outcome, so the
    worker does not publish it; on a bucket created without that (before it),
    the worker publishes it. One copy reaches the result subject either way."""
    from nats.js import api

    from tenantbus.namespace import server_barrier

    for by_bucket in (True, False):
        t = unique_tenant("rp")
        ns = await tb.connect(make_bundle(nats_server.url, t, "py"))
        try:
            js = ns.nats.jetstream()
            if not by_bucket:
                await js.create_key_value(
                    api.KeyValueConfig(bucket=f"TASKS_DONE_{t}", history=1, ttl=7 * 24 * 3600.0)
                )
            d = await Dispatcher.create(ns, opts())
            assert d.republishes is by_bucket
            config = (await js.stream_info(f"KV_TASKS_DONE_{t}")).config
            if by_bucket:
                assert (config.republish.src, config.republish.dest) == (
                    f"$KV.TASKS_DONE_{t}.>", f"tenant.{t}.tasks.results.>")
            else:
                assert config.republish is None
            seen = []

            async def collect(msg) -> None:
                seen.append(msg)

            await ns.nats.subscribe(f"tenant.{t}.tasks.results.>", cb=collect)
            await server_barrier(ns.nats)

            async def handler(task: Task) -> bytes:
                return b"ok:" + task.payload

            worker = await d.worker("resize", handler, concurrency=1, fetch_expires=0.5)
            h = await d.dispatch("resize", b"img")
            assert await h.wait(20) == TaskOutcome(True, output=b"ok:img")
            await asyncio.sleep(0.5)
            await worker.shutdown(5)
            assert [m.subject for m in seen] == [d.result_subject(h.id)]
            stream = (seen[0].headers or {}).get("Nats-Stream")
            assert stream == (f"KV_TASKS_DONE_{t}" if by_bucket else None)
        finally:
            await ns.close()


async def test_forged_done_records_and_crippled_streams_are_refused(nats_server) -> None:
    """Agents may write the done bucket and create (never change) the stream: a
    done record that is not the task's sealed outcome is ignored, and a stream
    or bucket set up to lose tasks is refused, as in the Rust dispatcher."""
    import nats
    from nats.js import api

    t = unique_tenant("fg")
    ns = await tb.connect(make_bundle(nats_server.url, t, "py"))
    raw = await nats.connect(nats_server.url)
    try:
        d = await Dispatcher.create(ns, opts())
        worker = await d.worker("resize", lambda task: b"ok:" + task.payload, fetch_expires=0.5)
        first = await d.dispatch("resize", b"first")
        assert (await first.wait(20)).output == b"ok:first"
        # Garbage, then the first task's genuine record copied under another id:
        # neither makes the task look done.
        for n, forged in enumerate([b"forged", await d._done_get(first.id.to_hex())]):
            sealed = d.seal("resize", f"next-{n}".encode())
            await d.done.put(sealed.id.to_hex(), forged)
            handle = await d.handle(sealed.id)
            await d.submit(sealed)
            assert (await handle.wait(20)).output == f"ok:next-{n}".encode()
        assert worker.stats.unverified_done == 2 and worker.stats.completed == 3
        await worker.shutdown(5)

        # A stream someone created with a message limit, and a done bucket that
        # forgets sooner than the task max age: refused, not used.
        js = raw.jetstream()
        t2 = unique_tenant("cr")
        await js.add_stream(api.StreamConfig(
            name=f"TASKS_{t2}", subjects=[f"tenant.{t2}.tasks.queue.>", f"tenant.{t2}.tasks.dead.>"],
            retention=api.RetentionPolicy.WORK_QUEUE, max_msgs=1))
        ns2 = await tb.connect(make_bundle(nats_server.url, t2, "py"))
        try:
            with pytest.raises(tb.DispatchError) as e:
                await Dispatcher.create(ns2, opts())
            assert e.value.kind is tb.DispatchErrorKind.STREAM_CONFLICT
            await js.delete_stream(f"TASKS_{t2}")
            await js.create_key_value(api.KeyValueConfig(bucket=f"TASKS_DONE_{t2}", ttl=60))
            with pytest.raises(tb.DispatchError) as e:
                await Dispatcher.create(ns2, opts())
            assert e.value.kind is tb.DispatchErrorKind.STREAM_CONFLICT
        finally:
            await ns2.close()
    finally:
        await raw.close()
        await ns.close()

async def test_python_worker_runs_a_task_a_rust_dispatcher_submitted(nats_server, tmp_path, peers) -> None:
    t = unique_tenant("dp")
    ns = await tb.connect(make_bundle(nats_server.url, t, "py-worker"))
    try:
        # The Rust dispatcher creates the stream and bucket; the Python worker
        # creates the durable consumer work-<type> (or binds Rust's).
        rust = await RustPeer.start(write_bundle(tmp_path, make_bundle(nats_server.url, t, "rust-dispatcher")),
                                    "dispatch", "translate", "bonjour", "30000")
        peers.append(rust)
        dispatched = await rust.wait_for("dispatched")
        d = await Dispatcher.create(ns, opts())
        seen = []

        async def handler(task: Task) -> bytes:
            seen.append(task)
            return b"done:" + task.payload

        worker = await d.worker("translate", handler, fetch_expires=0.5)
        outcome = await rust.wait_for("outcome", timeout=40)
        assert await rust.finish() == 0
        await worker.shutdown(5)
        assert outcome == {"event": "outcome", "id": dispatched["id"], "completed": True, "output": "done:bonjour"}
        assert [(s.id.to_hex(), s.sender, s.payload, s.delivery) for s in seen] == [
            (dispatched["id"], "rust-dispatcher", b"bonjour", 1)]
        # The Python worker's sealed record in the done bucket opens for Python too.
        assert await d.outcome(tb.MessageId.from_hex(dispatched["id"])) == TaskOutcome(True, output=b"done:bonjour")
        assert (dispatched["stream"], dispatched["bucket"]) == (d.stream_name, d.done_bucket)
    finally:
        await ns.close()


async def test_rust_worker_runs_a_task_a_python_dispatcher_submitted(nats_server, tmp_path, peers) -> None:
    t = unique_tenant("dp")
    ns = await tb.connect(make_bundle(nats_server.url, t, "py-dispatcher"))
    try:
        d = await Dispatcher.create(ns, opts())
        rust = await RustPeer.start(write_bundle(tmp_path, make_bundle(nats_server.url, t, "rust-worker")),
                                    "work", "resize", "2", "30000")
        peers.append(rust)
        await rust.wait_for("ready")
        h1 = await d.dispatch("resize", b"cat.png")
        h2 = await d.dispatch("resize", "dog.png")
        o1, o2 = await asyncio.gather(h1.wait(30), h2.wait(30))
        assert o1 == TaskOutcome(True, output=b"done:cat.png")
        assert o2 == TaskOutcome(True, output=b"done:dog.png")
        done = await rust.wait_for("done")
        assert done["ok"] is True
        tasks = [e for e in rust.events if e.get("event") == "task"]
        assert sorted((e["id"], e["payload"], e["sender"], e["type"]) for e in tasks) == sorted(
            [(h1.id.to_hex(), "cat.png", "py-dispatcher", "resize"), (h2.id.to_hex(), "dog.png", "py-dispatcher", "resize")])
        assert await rust.finish() == 0
        # Re-submitting a finished task after the Rust worker recorded it: the
        # stream drops it as a duplicate; the done record (sealed by Rust) opens here.
        assert (await d.outcome(h1.id)).output == b"done:cat.png"
    finally:
        await ns.close()


async def _until(cond, limit: float = 5.0) -> None:
    """Polls ``cond()`` (plain or async) every 50 ms for up to ``limit``
    seconds (the caller asserts what it needs afterwards)."""
    for _ in range(int(limit / 0.05)):
        met = cond()
        if inspect.isawaitable(met):
            met = await met
        if met:
            return
        await asyncio.sleep(0.05)


async def test_one_copy_per_id_refuses_copies_while_one_is_queued_or_running(nats_server) -> None:
    t = unique_tenant("dp")
    ns = await tb.connect(make_bundle(nats_server.url, t, "py"))
    try:
        d = await Dispatcher.create(ns, opts(one_copy_per_id=True, duplicate_window=0.2, ack_wait=10.0))
        follower = await Dispatcher.create(ns, opts())
        assert d.one_copy_per_id and follower.one_copy_per_id, "the stream decides"
        started, release = [], asyncio.Event()

        async def handler(task: Task) -> bytes:
            started.append(task.id)
            await release.wait()
            return b"charged"

        workers = [await d.worker("charge", handler, concurrency=1, fetch_expires=0.5) for _ in range(2)]
        task = d.seal("charge", b"order-9")
        assert task.subject.endswith(f".charge.{task.id.to_hex()}")
        handle = await d.handle(task.id)
        assert not (await d.submit(task)).duplicate
        await _until(lambda: bool(started))
        assert len(started) == 1
        await asyncio.sleep(0.5)  # past the duplicate window
        again = await follower.submit(task)
        assert again.duplicate and again.sequence == 0
        # A raw copy with a fresh message id: refused by the server.
        with pytest.raises(nats.js.errors.APIError) as refused:
            await d.js.publish(task.subject, task.body, headers={"Nats-Msg-Id": "the-copy"})
        assert "maximum messages per subject" in str(refused.value.description)
        # Moved to another id's subject: stored, refused by the worker.
        other = d.seal("charge", b"other")
        await d.js.publish(other.subject, task.body)
        await _until(lambda: sum(w.stats.rejected for w in workers) == 1)
        assert sum(w.stats.rejected for w in workers) == 1
        release.set()
        assert await handle.wait(20) == TaskOutcome(True, output=b"charged")
        assert started == [task.id], "one copy ran"
        # Finished and acked: a later copy is stored, found done, not run.
        async def acked() -> bool:
            return (await d.js.stream_info(d.stream_name)).state.messages == 0

        await _until(acked)
        assert not (await d.submit(task)).duplicate
        await _until(lambda: sum(w.stats.duplicates for w in workers) == 1)
        assert sum(w.stats.duplicates for w in workers) == 1 and started == [task.id]
        for w in workers:
            await w.shutdown(5)
    finally:
        await ns.close()


async def test_a_rust_worker_follows_a_one_copy_per_id_stream_python_created(nats_server, tmp_path, peers) -> None:
    t = unique_tenant("dp")
    ns = await tb.connect(make_bundle(nats_server.url, t, "py-dispatcher"))
    try:
        d = await Dispatcher.create(ns, opts(one_copy_per_id=True))
        rust = await RustPeer.start(write_bundle(tmp_path, make_bundle(nats_server.url, t, "rust-worker")),
                                    "work", "resize", "1", "30000")
        peers.append(rust)
        await rust.wait_for("ready")
        h = await d.dispatch("resize", b"cat.png")
        assert await h.wait(30) == TaskOutcome(True, output=b"done:cat.png")
        assert (await rust.wait_for("done"))["ok"] is True
        tasks = [e for e in rust.events if e.get("event") == "task"]
        assert [(e["id"], e["payload"]) for e in tasks] == [(h.id.to_hex(), "cat.png")]
        assert await rust.finish() == 0
    finally:
        await ns.close()


async def test_a_worker_the_server_refuses_its_consumer_says_so_at_once(tmp_path) -> None:
    """Credentials that may not create the worker's consumer: PERMISSION_DENIED
    naming the subject at once (the server answers the denied request with
    nothing, so this was an outage after the request's timeout), and no
    consumer is created. As the Rust dispatch test of the same name."""
    import time

    from conftest import NatsServer, nats_server_bin

    conf = tmp_path / "users.conf"
    conf.write_text(
        'authorization { users = [ { user: "agent", password: "pw", permissions: {\n'
        '  publish: { allow: [">"], deny: ["$JS.API.CONSUMER.CREATE.>", "$JS.API.CONSUMER.DURABLE.CREATE.>"] }\n'
        '  subscribe: { allow: [">"] } } } ] }\n'
    )
    server = NatsServer(nats_server_bin() or "nats-server", config=str(conf))
    try:
        t = unique_tenant("deny")
        url = server.url.replace("nats://", "nats://agent:pw@", 1)
        ns = await tb.connect(make_bundle(url, t, "runner"))
        try:
            d = await Dispatcher.create(ns, opts())
            started = time.monotonic()

            async def handler(task: Task) -> bytes:
                return b""

            with pytest.raises(tb.DispatchError) as refused:
                await d.worker("resize", handler)
            assert refused.value.kind == tb.DispatchErrorKind.PERMISSION_DENIED, refused.value
            # nats-py lowercases the server's text.
            text = str(refused.value).lower()
            assert "$js.api.consumer.create" in text and "work-resize" in text, text
            assert time.monotonic() - started < 4, "waited out the request timeout"
            with pytest.raises(nats.js.errors.NotFoundError):
                await d.js.consumer_info(d.stream_name, "work-resize")
        finally:
            await ns.close()
    finally:
        server.stop()


def test_a_refusal_names_a_step_only_by_whole_tokens_of_a_jetstream_subject() -> None:
    from tenantbus.dispatch import _refuses

    info = 'nats: permissions violation for publish to "$js.api.stream.info.tasks_a"'
    assert _refuses(info, "TASKS_a")
    assert not _refuses('nats: permissions violation for publish to "$js.api.stream.info.kv_tasks_done_a"', "TASKS_a")
    create = 'nats: permissions violation for publish to "$js.api.consumer.create.tasks_a.work-x.tenant.a.tasks.queue.x"'
    assert _refuses(create, "TASKS_a.work-x")
    assert not _refuses(create, "TASKS_a.work-xy")
    assert not _refuses('nats: permissions violation for publish to "tenant.a.tasks_a"', "TASKS_a")
    assert not _refuses("nats: permissions violation", "TASKS_a")
