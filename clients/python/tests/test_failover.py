"""An agent starting while a node of a three-node cluster is down.

The node leading the tenant's state bucket (``KV_STATE``) is killed
(SIGKILL: no graceful step-down). A stream without a leader answers nothing
until a new one is elected, and a lookup sent before that is never answered:
with one request the new agent's ``ns.kv`` failed as ``UNAVAILABLE`` after
nats-py's 5 s timeout. Lookups are now sent again while unanswered
(``tenantbus.settle.while_unanswered``), so the agent opens its store, its
task stream, its done bucket and its worker's consumer as soon as the
elections end, and reads what was written before the kill."""

import time

import nats
import pytest

import tenantbus as tb
from tenantbus.dispatch import DispatchOptions, Dispatcher

from conftest import NatsCluster, _server_binary, make_bundle, unique_tenant

#: How soon after the kill the new agent must be up (elections took 4-9 s).
UP_WITHIN = 15.0


@pytest.fixture
def cluster():
    c = NatsCluster(_server_binary(), 3)
    try:
        c.wait_ready()
        yield c
    finally:
        c.stop()


def bundle(urls, tenant):
    b = make_bundle(urls, tenant, "agent")
    b["placement"] = {"replicas": 3}
    return b


async def leader(js, stream: str) -> str:
    deadline = time.monotonic() + 10
    while True:
        info = await js.stream_info(stream)
        if info.cluster is not None and info.cluster.leader:
            return info.cluster.leader
        assert time.monotonic() < deadline, f"{stream} has no leader"


async def test_an_agent_starts_while_its_stores_elect_new_leaders(cluster) -> None:
    t = unique_tenant("fo")
    urls = ",".join(s.url for s in cluster.servers)
    ns = await tb.connect(bundle(urls, t))
    raw = await nats.connect(servers=[s.url for s in cluster.servers])
    try:
        kv = await ns.kv("sessions")
        await kv.put("user.1", b"before the kill")
        d = await Dispatcher.create(ns, DispatchOptions())
        worker = await d.worker("job", lambda task: b"ok", fetch_expires=0.5)
        await worker.shutdown(5)
        name = await leader(raw.jetstream(), "KV_STATE")
    finally:
        await raw.close()
        await ns.close()

    victim = cluster.servers[int(name[1:]) - 1]  # servers are named n1, n2, n3
    victim.proc.kill()
    victim.proc.wait(5)
    killed = time.monotonic()

    survivors = ",".join(s.url for s in cluster.servers if s is not victim)
    again = await tb.connect(bundle(survivors, t))
    try:
        kv = await again.kv("sessions")
        opened = time.monotonic() - killed
        assert (await kv.get("user.1")).value == b"before the kill"
        d = await Dispatcher.create(again, DispatchOptions())
        worker = await d.worker("job", lambda task: b"ok", fetch_expires=0.5)
        up = time.monotonic() - killed
        handle = await d.dispatch("job", b"after the kill")
        assert (await handle.wait(20)).output == b"ok"
        await worker.shutdown(5)
    finally:
        await again.close()
    print(f"state store open {opened:.1f} s, worker up {up:.1f} s after the kill of {name}")
    assert up < UP_WITHIN, f"the agent took {up:.1f} s"
