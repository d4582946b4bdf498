"""A Python agent on the agentbus bus, talking to Rust agents of its tenant.

Usage: python agent.py BUNDLE [--peer AGENT] [--timeout SECONDS]

BUNDLE is a credential bundle from `agentbus agent create TENANT AGENT --out
BUNDLE`. The agent joins the tenant and, with every message sealed and verified:

- answers requests on ``py.summarize`` and runs ``summarize`` tasks;
- publishes ``events.python``, sends a request to ``rust.echo`` and dispatches a
  ``translate`` task, which a Rust agent answers and runs;
- prints ``READY`` once it serves, one line per step, and stops when it receives
  ``demo.stop`` (exit 0 if every step held, 1 otherwise).

`scripts/demo` runs it against the Rust agent of ``examples/python_demo.rs``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import tenantbus
from tenantbus.dispatch import Dispatcher, DispatchOptions, Task


def say(line: str) -> None:
    print(line, flush=True)


async def run(bundle: str, peer: str, timeout: float) -> bool:
    ns = await tenantbus.connect(bundle, request_timeout=timeout)
    ok = True

    def check(cond: bool, what: str) -> None:
        nonlocal ok
        ok &= cond
        say(f"[{'ok' if cond else 'FAIL'}] {what}")

    try:
        say(f"joined tenant {ns.tenant} as {ns.agent}")

        # Serve: sealed requests and tasks from the Rust agent.
        svc = await ns.subscribe("py.summarize")

        async def serve() -> None:
            async for req in svc:
                say(f"request from {req.sender}: {req.payload.decode()!r}")
                await ns.respond(req, b"summary by python of '" + req.payload + b"'")

        serving = asyncio.create_task(serve())

        async def summarize(task: Task) -> bytes:
            say(f"task {task.task_type} from {task.sender}: {task.payload.decode()!r}")
            return b"python summarized: " + task.payload

        d = await Dispatcher.create(ns, DispatchOptions())
        worker = await d.worker("summarize", summarize, concurrency=2)
        stop = await ns.subscribe("demo.stop")
        say("READY")

        # Act: a sealed event, a sealed request and a task for the Rust agent.
        await ns.publish("events.python", b"hello from python")
        reply = await ns.request("rust.echo", b"ping from python", timeout=timeout)
        check(reply.sender == peer and reply.payload == b"rust echo: ping from python",
              f"sealed reply from {reply.sender}: {reply.payload.decode()!r}")
        handle = await d.dispatch("translate", b"bonjour")
        outcome = await handle.wait(timeout=timeout)
        check(outcome.completed and outcome.output == b"translated: bonjour",
              f"task translate run by the Rust worker: {outcome.output.decode(errors='replace')!r}")

        # Wait for the Rust agent to finish its side.
        msg = await stop.next_msg(timeout=timeout * 2)
        check(msg.sender == peer, f"stop from {msg.sender}")
        await worker.shutdown()
        serving.cancel()
        dropped = {k: v for k, v in ns.counters().dropped.items() if v}
        check(not dropped, f"nothing dropped by verification ({dropped or 'no drops'})")
    finally:
        await ns.close()
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", help="credential bundle (JSON) from `agentbus agent create`")
    p.add_argument("--peer", default="rust-agent", help="the Rust agent's id (checked as sender)")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds per step")
    a = p.parse_args()
    try:
        ok = asyncio.run(run(a.bundle, a.peer, a.timeout))
    except tenantbus.TenantBusError as e:
        say(f"[FAIL] {type(e).__name__} {e.kind}: {e}")
        ok = False
    except asyncio.TimeoutError:
        say("[FAIL] timed out")
        ok = False
    say("PYTHON AGENT DONE" if ok else "PYTHON AGENT FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
