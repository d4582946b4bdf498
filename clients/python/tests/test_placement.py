"""The bundle's ``placement`` (``StorePlacement`` of ``bus/src/region.rs``):
parsing, validation and the JSON round trip, the API-key answer carrying it,
and task dispatch creating its stream and done bucket in the bundle's region
on a cluster whose servers are tagged ``region:eu``."""

import json

import nats
import pytest
from nats.js import api

import tenantbus as tb
from tenantbus import apikey
from tenantbus.dispatch import DispatchOptions, Dispatcher

from conftest import MASTER, make_bundle, unique_tenant


def bundle_dict(placement=None, **kw):
    d = make_bundle("nats://127.0.0.1:4222", "acme", "planner")
    if placement is not None:
        d["placement"] = placement
    d.update(kw)
    return d


# -- parsing -----------------------------------------------------------------


def test_placement_parses_and_round_trips_as_rust_writes_it() -> None:
    b = tb.CredentialBundle.from_json(json.dumps(bundle_dict({"replicas": 3, "region": "eu"})))
    assert b.placement == tb.Placement(replicas=3, region="eu")
    assert b.placement.tags == ["region:eu"]
    assert b.to_dict()["placement"] == {"replicas": 3, "region": "eu"}
    # Serialized exactly as serde does (key order, no nulls).
    assert json.dumps(b.to_dict()["placement"], separators=(",", ":")) == '{"replicas":3,"region":"eu"}'
    again = tb.CredentialBundle.from_json(b.to_json())
    assert again.placement == b.placement and again.to_dict() == b.to_dict()
    # Either key alone; only the set one is written back.
    only_r = tb.CredentialBundle.from_dict(bundle_dict({"replicas": 2}))
    assert only_r.placement == tb.Placement(2, None) and only_r.to_dict()["placement"] == {"replicas": 2}
    only_g = tb.CredentialBundle.from_dict(bundle_dict({"region": "us-east-1"}))
    assert only_g.to_dict()["placement"] == {"region": "us-east-1"}
    assert "placement" in repr(b) and "eu" in repr(b)


def test_absent_or_empty_placement_is_unset_and_not_written() -> None:
    for d in [bundle_dict(), bundle_dict({})]:
        b = tb.CredentialBundle.from_dict(d)
        assert b.placement.is_unset and b.placement == tb.Placement()
        assert b.placement.tags == []
        assert "placement" not in b.to_dict()
    # A bundle built in code gets an unset placement by default.
    keys = tb.TenantKeySet.from_master(MASTER, "acme", [1], 1)
    assert tb.CredentialBundle(url="nats://x", tenant="acme", agent="a", keys=keys).placement.is_unset


@pytest.mark.parametrize("placement,needle", [
    ({"replicas": 0}, "replicas must be 1 to 5"),
    ({"replicas": 6}, "replicas must be 1 to 5"),
    ({"replicas": -1}, "replicas must be 1 to 5"),
    ({"replicas": "3"}, "replicas must be 1 to 5"),
    ({"replicas": 2.0}, "replicas must be 1 to 5"),
    ({"replicas": True}, "replicas must be 1 to 5"),
    ({"region": "EU"}, "invalid region"),
    ({"region": "eu west"}, "invalid region"),
    ({"region": "eu--west"}, "invalid region"),
    ({"region": "-eu"}, "invalid region"),
    ({"region": ""}, "invalid region"),
    ({"region": "x" * 64}, "invalid region"),
    ({"region": 7}, "region is a string"),
    ([3, "eu"], "placement is a JSON object"),
    ("eu", "placement is a JSON object"),
])
def test_invalid_placement_is_refused(placement, needle) -> None:
    with pytest.raises(tb.BundleError) as e:
        tb.CredentialBundle.from_json(json.dumps(bundle_dict(placement)))
    assert e.value.kind is tb.BundleErrorKind.INVALID
    assert needle in str(e.value)
    # The dataclass refuses the same values when built in code.
    if isinstance(placement, dict):
        with pytest.raises(tb.BundleError):
            tb.Placement(**placement)


def test_replica_bounds_are_accepted() -> None:
    for r in (1, 5):
        assert tb.CredentialBundle.from_dict(bundle_dict({"replicas": r})).placement.replicas == r
    assert tb.Placement(region="x" * 63).region == "x" * 63


def test_key_answers_carry_placement_into_the_bundle() -> None:
    keys = tb.TenantKeySet.from_master(MASTER, "acme", [1], 1)
    ok = {"ok": {"keys": keys.to_dict(), "refresh_at_ms": 7, "placement": {"replicas": 3, "region": "eu"}}}
    answer = apikey.parse_keys_reply(json.dumps(ok), "acme")
    assert (answer.refresh_at_ms, answer.placement) == (7, tb.Placement(3, "eu"))
    # The older two-value form still works.
    got, at = apikey.parse_keys_answer(json.dumps(ok), "acme")
    assert at == 7 and got.tenant == "acme"
    del ok["ok"]["placement"]
    assert apikey.parse_keys_reply(json.dumps(ok), "acme").placement.is_unset
    ok["ok"]["placement"] = {"replicas": 9}
    with pytest.raises(tb.ConnectError) as e:
        apikey.parse_keys_reply(json.dumps(ok), "acme")
    assert e.value.kind is tb.ConnectErrorKind.CONNECTION and "replicas" in str(e.value)


# -- dispatch in a region (live, two servers tagged region:eu) ---------------


def opts(**kw) -> DispatchOptions:
    o = DispatchOptions(per_tenant_names=True, result_poll=0.2, backoff=[0.1])
    for k, v in kw.items():
        setattr(o, k, v)
    return o


def region_bundle(url: str, tenant: str, placement):
    d = make_bundle(url, tenant, "py")
    if placement is not None:
        d["placement"] = placement
    return d


async def test_dispatch_creates_stream_and_done_bucket_in_the_region(eu_cluster) -> None:
    t = unique_tenant("eu")
    ns = await tb.connect(region_bundle(eu_cluster.url, t, {"replicas": 2, "region": "eu"}))
    raw = await nats.connect(eu_cluster.url)
    try:
        assert ns.placement == tb.Placement(2, "eu")
        d = await Dispatcher.create(ns, opts())
        js = raw.jetstream()
        for name in (f"TASKS_{t}", f"KV_TASKS_DONE_{t}"):
            cfg = (await js.stream_info(name)).config
            assert cfg.placement is not None and cfg.placement.tags == ["region:eu"], name
            assert cfg.num_replicas == 2, name
        # The done bucket works as one: a task runs and its outcome is recorded.
        worker = await d.worker("echo", lambda task: b"ok:" + task.payload, fetch_expires=0.5)
        h = await d.dispatch("echo", b"x")
        assert (await h.wait(20)).output == b"ok:x"
        await worker.shutdown(5)
        kv_cfg = (await js.stream_info(f"KV_TASKS_DONE_{t}")).config
        assert kv_cfg.max_msgs_per_subject == 1 and kv_cfg.allow_rollup_hdrs and kv_cfg.deny_delete
        # Opening again finds both in the region and uses them.
        again = await Dispatcher.create(ns, opts())
        assert again.stream_name == d.stream_name
        # DispatchOptions.replicas wins over the bundle's.
        t2 = unique_tenant("eu")
        ns2 = await tb.connect(region_bundle(eu_cluster.url, t2, {"replicas": 2, "region": "eu"}))
        try:
            await Dispatcher.create(ns2, opts(replicas=1))
            for name in (f"TASKS_{t2}", f"KV_TASKS_DONE_{t2}"):
                cfg = (await js.stream_info(name)).config
                assert (cfg.num_replicas, cfg.placement.tags) == (1, ["region:eu"]), name
        finally:
            await ns2.close()
    finally:
        await raw.close()
        await ns.close()


async def test_a_region_without_servers_creates_nothing(eu_cluster) -> None:
    t = unique_tenant("us")
    ns = await tb.connect(region_bundle(eu_cluster.url, t, {"region": "us"}))
    raw = await nats.connect(eu_cluster.url)
    try:
        with pytest.raises(tb.DispatchError) as e:
            await Dispatcher.create(ns, opts())
        assert e.value.kind is tb.DispatchErrorKind.UNAVAILABLE
        assert "region us" in str(e.value) and "region:us" in str(e.value)
        js = raw.jetstream()
        names = [s.config.name for s in await js.streams_info()]
        assert f"TASKS_{t}" not in names and f"KV_TASKS_DONE_{t}" not in names
        # Too many replicas for the region: also refused, not placed elsewhere.
        t3 = unique_tenant("eu")
        ns3 = await tb.connect(region_bundle(eu_cluster.url, t3, {"replicas": 3, "region": "eu"}))
        try:
            with pytest.raises(tb.DispatchError) as e:
                await Dispatcher.create(ns3, opts())
            assert e.value.kind is tb.DispatchErrorKind.UNAVAILABLE and "region eu" in str(e.value)
            assert f"TASKS_{t3}" not in [s.config.name for s in await js.streams_info()]
        finally:
            await ns3.close()
    finally:
        await raw.close()
        await ns.close()


async def test_existing_stream_or_bucket_outside_the_region_is_refused(eu_cluster) -> None:
    t = unique_tenant("out")
    raw = await nats.connect(eu_cluster.url)
    js = raw.jetstream()
    subjects = [tb.scope(t, "tasks.queue.>"), tb.scope(t, "tasks.dead.>")]
    # Someone created the task stream without placement (e.g. an old client).
    await js.add_stream(api.StreamConfig(
        name=f"TASKS_{t}", subjects=subjects, retention=api.RetentionPolicy.WORK_QUEUE,
        storage=api.StorageType.FILE,
    ))
    ns = await tb.connect(region_bundle(eu_cluster.url, t, {"region": "eu"}))
    try:
        with pytest.raises(tb.DispatchError) as e:
            await Dispatcher.create(ns, opts())
        assert e.value.kind is tb.DispatchErrorKind.STREAM_CONFLICT
        assert "not placed in region eu" in str(e.value) and f"TASKS_{t}" in str(e.value)
        # The same stream is fine for a bundle without a region.
        plain = await tb.connect(region_bundle(eu_cluster.url, t, None))
        try:
            await Dispatcher.create(plain, opts())
        finally:
            await plain.close()
        # Tags compare case-insensitively, as the servers match them.
        t2 = unique_tenant("out")
        await js.add_stream(api.StreamConfig(
            name=f"TASKS_{t2}", subjects=[tb.scope(t2, "tasks.queue.>"), tb.scope(t2, "tasks.dead.>")],
            retention=api.RetentionPolicy.WORK_QUEUE, storage=api.StorageType.FILE,
            placement=api.Placement(tags=["REGION:EU"]),
        ))
        # ... and a done bucket without placement is refused as well.
        await js.create_key_value(api.KeyValueConfig(bucket=f"TASKS_DONE_{t2}", history=1))
        ns2 = await tb.connect(region_bundle(eu_cluster.url, t2, {"region": "eu"}))
        try:
            with pytest.raises(tb.DispatchError) as e:
                await Dispatcher.create(ns2, opts())
            assert e.value.kind is tb.DispatchErrorKind.STREAM_CONFLICT
            assert f"bucket TASKS_DONE_{t2}" in str(e.value) and "not placed in region eu" in str(e.value)
        finally:
            await ns2.close()
    finally:
        await ns.close()
        await raw.close()
