"""API keys: a client joins its tenant with nothing but the URL and a key.

Offline: the key format and its checksum (the rules of
``agent-runtime/control/src/identity/apikey.rs``). Live: a real installation
started with the Rust CLI (``agentbus up``: nats-server in operator mode, the
controller answering the auth callout and the key service), tenants acme and
globex, keys from ``agentbus key create``:

- a plain nats-py client connects with only a key and the URL, works inside
  its tenant and is refused outside it;
- a key with a bad checksum is refused offline by ``connect_with_key`` and by
  the server for plain nats-py;
- ``tenantbus.connect_with_key`` joins acme (the tenant comes from the server)
  and exchanges sealed messages with a Rust agent of acme both ways;
- a revoked key's live connections are closed within 2 s and it can no longer
  join.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import nats
import pytest

import tenantbus as tb
from tenantbus import apikey

from conftest import RustPeer, _free_port, _require_rust, nats_server_bin, rust_examples_dir


# -- offline ------------------------------------------------------------------


def make_key(key_id: Optional[str] = None) -> str:
    """A well-formed key (random id and secret, valid checksum)."""
    chars = apikey._BASE62
    key_id = key_id or "".join(secrets.choice(chars) for _ in range(apikey.ID_LEN))
    body = apikey.PREFIX + key_id + "".join(secrets.choice(chars) for _ in range(apikey.SECRET_LEN))
    return body + apikey._checksum(body)


def test_crc_is_zlibs_and_the_standard_check_value() -> None:
    import zlib

    assert zlib.crc32(b"123456789") == 0xCBF43926
    assert zlib.crc32(b"") == 0


def test_key_format_rules_as_rust() -> None:
    k = make_key("AbC123xyZ789")
    assert len(k) == apikey.KEY_LEN == 44
    assert tb.parse_api_key(k) == "AbC123xyZ789" and tb.is_api_key(k)
    assert apikey.key_agent_id("AbC123xyZ789") == "key-abc123xyz789"
    assert apikey.bootstrap_inbox("AbC123xyZ789") == "_INBOX.AbC123xyZ789"
    # Every single-character change is caught by the checksum.
    for i in range(len(apikey.PREFIX), apikey.KEY_LEN):
        t = k[:i] + ("b" if k[i] == "a" else "a") + k[i + 1 :]
        with pytest.raises(tb.ApiKeyError) as e:
            tb.parse_api_key(t)
        assert e.value.kind is tb.ApiKeyErrorKind.CHECKSUM, i
        assert e.value.kind.reason == "key_checksum"
    cases = {
        "": tb.ApiKeyErrorKind.PREFIX,
        "abc_" + k[4:]: tb.ApiKeyErrorKind.PREFIX,
        k[:-1]: tb.ApiKeyErrorKind.LENGTH,
        k + "0": tb.ApiKeyErrorKind.LENGTH,
        "abk_nope": tb.ApiKeyErrorKind.LENGTH,
        k[:10] + "-" + k[11:]: tb.ApiKeyErrorKind.CHARSET,
        # Not ASCII: 44 bytes but a character outside base62.
        k[:10] + "é" + k[12:]: tb.ApiKeyErrorKind.CHARSET,
    }
    for text, kind in cases.items():
        with pytest.raises(tb.ApiKeyError) as e:
            tb.parse_api_key(text)
        assert e.value.kind is kind, text
        assert not tb.is_api_key(text)
    with pytest.raises(tb.ApiKeyError):
        tb.parse_api_key(None)  # type: ignore[arg-type]


async def test_a_malformed_key_fails_before_any_connection() -> None:
    # Port 1 has no server: an error of kind invalid_key proves nothing was tried.
    for bad in ["abk_nope", make_key()[:-1] + "!", "nats-token"]:
        with pytest.raises(tb.ConnectError) as e:
            await tb.connect_with_key("nats://127.0.0.1:1", bad)
        assert e.value.kind is tb.ConnectErrorKind.INVALID_KEY
        assert isinstance(e.value.__cause__, tb.ApiKeyError)


async def test_no_server_is_a_connection_error_and_options_keep_no_key() -> None:
    opts = tb.NamespaceOptions(nats_options={"reconnect_time_wait": 0.05})
    with pytest.raises(tb.ConnectError) as e:
        await tb.connect_with_key("nats://127.0.0.1:1", make_key(), opts, connect_timeout=1)
    assert e.value.kind is tb.ConnectErrorKind.CONNECTION
    assert opts.auth_token is None
    with pytest.raises(ValueError):
        await tb.connect_with_key("nats://127.0.0.1:1", make_key(), refresh_every=0)


def test_keys_answer_parsing() -> None:
    keys = tb.TenantKeySet.from_master(bytes(range(32)), "acme", [1, 2], 2)
    ok = json.dumps({"ok": {"keys": keys.to_dict(), "refresh_at_ms": 123}})
    got, at = apikey.parse_keys_answer(ok, "acme")
    assert got.versions() == (1, 2) and got.current == 2 and at == 123
    with pytest.raises(tb.ConnectError) as e:
        apikey.parse_keys_answer(ok, "globex")
    assert e.value.kind is tb.ConnectErrorKind.KEYS
    for code, kind in [("forbidden", tb.ConnectErrorKind.REFUSED), ("unavailable", tb.ConnectErrorKind.CONNECTION)]:
        with pytest.raises(tb.ConnectError) as e:
            apikey.parse_keys_answer(json.dumps({"error": {"code": code, "message": "m"}}), "acme")
        assert e.value.kind is kind and code in e.value.detail
    for junk in [b"", b"[]", b'{"ok": {}}', b'{"ok": {"keys": {}, "refresh_at_ms": 1}}']:
        with pytest.raises(tb.ConnectError) as e:
            apikey.parse_keys_answer(junk, "acme")
        assert e.value.kind is tb.ConnectErrorKind.CONNECTION


def test_auth_token_is_not_shown() -> None:
    assert "abk_" not in repr(tb.NamespaceOptions(auth_token=make_key()))


# -- live: an installation run by the Rust CLI ---------------------------------


def agentbus_bin() -> str:
    """The Rust CLI (``cargo build -p agentbus-cli``): ``TENANTBUS_AGENTBUS``, or
    ``agentbus`` beside the examples directory (``target/debug``)."""
    env = os.environ.get("TENANTBUS_AGENTBUS")
    path = Path(env) if env else rust_examples_dir().parent / "agentbus"
    if not path.exists():
        msg = f"the agentbus CLI is not built at {path} (cargo build -p agentbus-cli)"
        if _require_rust():
            pytest.fail(msg)
        pytest.skip(msg)
    return str(path)


class Installation:
    """``agentbus up`` in a temporary state directory, on a free port."""

    def __init__(self, binary: str, server: str) -> None:
        self.bin = binary
        self.dir = tempfile.mkdtemp(prefix="tenantbus-keys-")
        self.state = os.path.join(self.dir, "state")
        self.port = _free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTBUS_")}
        self.env["NATS_SERVER_BIN"] = server
        self.env.setdefault("RUST_LOG", "warn")
        self.log = open(os.path.join(self.dir, "up.log"), "wb")
        self.proc: Optional[subprocess.Popen] = subprocess.Popen(
            [binary, "up", "--state", self.state, "--port", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        try:
            self._wait_ready(90)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"agentbus up exited {self.proc.returncode}: {self.log_tail()}")
            if os.path.exists(self.state):
                out = subprocess.run(
                    [self.bin, "status", "--state", self.state],
                    capture_output=True, env=self.env, timeout=30,
                )
                if out.returncode == 0:
                    return
                last = out.stderr.decode(errors="replace")
            time.sleep(0.3)
        raise RuntimeError(f"agentbus up not ready in {timeout} s: {last} {self.log_tail()}")

    def log_tail(self) -> str:
        self.log.flush()
        try:
            with open(os.path.join(self.dir, "up.log"), "rb") as f:
                return f.read().decode(errors="replace")[-3000:]
        except OSError:
            return ""

    def argv(self, *args: str) -> List[str]:
        return [self.bin, *args, "--state", self.state]

    def cli(self, *args: str) -> str:
        """Runs an admin command (``--state`` appended); returns stdout."""
        out = subprocess.run(self.argv(*args), capture_output=True, env=self.env, timeout=60)
        if out.returncode != 0:
            raise AssertionError(
                f"agentbus {' '.join(args)} exited {out.returncode}: {out.stderr.decode(errors='replace')}"
            )
        return out.stdout.decode()

    async def acli(self, *args: str) -> str:
        """:meth:`cli` without blocking the event loop."""
        proc = await asyncio.create_subprocess_exec(
            *self.argv(*args), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=self.env
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        if proc.returncode != 0:
            raise AssertionError(f"agentbus {' '.join(args)} exited {proc.returncode}: {err.decode(errors='replace')}")
        return out.decode()

    def key(self, tenant: str, name: str) -> Dict[str, Any]:
        """``agentbus key create TENANT --name NAME -o json``: ``{"id", "key", ...}``."""
        return json.loads(self.cli("key", "create", tenant, "--name", name, "-o", "json"))

    def stop(self) -> None:
        """Stops the ``agentbus up`` this fixture started (by its PID; it stops
        its nats-server itself), then removes the state."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def install() -> Iterator[Installation]:
    binary = agentbus_bin()
    server = nats_server_bin()
    if not server:
        msg = "no nats-server (set NATS_SERVER_BIN or run scripts/install-nats-server.sh)"
        if _require_rust():
            pytest.fail(msg)
        pytest.skip(msg)
    inst = Installation(binary, server)
    try:
        inst.cli("tenant", "create", "acme")
        inst.cli("tenant", "create", "globex")
        yield inst
    finally:
        inst.stop()


async def _delivered(sub: Any, timeout: float) -> List[bytes]:
    got = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return got
        try:
            m = await sub.next_msg(timeout=left)
        except nats.errors.TimeoutError:
            return got
        got.append(m.data)


async def test_plain_nats_py_client_with_only_a_key(install: Installation) -> None:
    """A nats-py client connects with only a key and the URL, works inside its
    tenant and is refused outside it."""
    k = install.key("acme", "plain")
    assert tb.parse_api_key(k["key"]) == k["id"]  # a Rust key passes the Python check
    violations: List[str] = []

    async def error_cb(e: Exception) -> None:
        violations.append(str(e).lower())

    nc = await nats.connect(install.url, token=k["key"], error_cb=error_cb, allow_reconnect=False)
    # A globex agent's own connection (issued credentials, globex's account).
    creds = os.path.join(install.dir, "globex-watcher.creds")
    install.cli("agent", "create", "globex", "watcher", "--format", "creds", "--out", creds)
    watcher = await nats.connect(install.url, user_credentials=creds, inbox_prefix="tenant.globex._INBOX")
    try:
        # Inside acme: a round trip.
        sub = await nc.subscribe("tenant.acme.x")
        await nc.flush()
        await nc.publish("tenant.acme.x", b"inside")
        m = await sub.next_msg(timeout=5)
        assert m.data == b"inside"
        assert not violations

        # Outside: globex's subjects are refused, both ways.
        seen = await watcher.subscribe("tenant.globex.x")
        await watcher.flush()
        probe = await nc.subscribe("tenant.globex.x")
        await nc.flush()
        await nc.publish("tenant.globex.x", b"outside")
        await nc.flush()
        await watcher.publish("tenant.globex.x", b"globex's own")
        await watcher.flush()
        assert await _delivered(probe, 1.0) == [], "the key read globex's subject"
        # The watcher gets globex's own message and nothing from the key.
        assert await _delivered(seen, 1.0) == [b"globex's own"]
        deadline = time.monotonic() + 3
        while len(violations) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert any("permissions violation for subscription" in v and "tenant.globex.x" in v for v in violations), violations
        assert any("permissions violation for publish" in v and "tenant.globex.x" in v for v in violations), violations
        # The connection stays usable inside its tenant.
        assert nc.is_connected
        await nc.publish("tenant.acme.x", b"still")
        assert (await sub.next_msg(timeout=5)).data == b"still"
    finally:
        await nc.close()
        await watcher.close()


async def test_a_bad_checksum_is_refused_offline_and_by_the_server(install: Installation) -> None:
    k = install.key("acme", "typo")["key"]
    bad = k[:-1] + ("A" if k[-1] != "A" else "B")
    # The library refuses it without connecting.
    with pytest.raises(tb.ConnectError) as e:
        await tb.connect_with_key(install.url, bad)
    assert e.value.kind is tb.ConnectErrorKind.INVALID_KEY
    assert e.value.__cause__.kind is tb.ApiKeyErrorKind.CHECKSUM  # type: ignore[union-attr]
    # The server refuses it for a plain client too.
    with pytest.raises(Exception) as raw:
        await nats.connect(install.url, token=bad, allow_reconnect=False, connect_timeout=5)
    assert "authorization violation" in str(raw.value).lower()
    # A well-formed key the control plane never issued is refused by the server.
    with pytest.raises(tb.ConnectError) as e:
        await tb.connect_with_key(install.url, make_key())
    assert e.value.kind is tb.ConnectErrorKind.REFUSED
    # The genuine key still works.
    nc = await nats.connect(install.url, token=k, allow_reconnect=False)
    await nc.close()


async def test_connect_with_key_exchanges_sealed_messages_with_a_rust_agent(
    install: Installation, peers: List[RustPeer]
) -> None:
    k = install.key("acme", "py")
    bundle = os.path.join(install.dir, "acme-planner.json")
    install.cli("agent", "create", "acme", "planner", "--out", bundle)

    ns = await tb.connect_with_key(install.url, k["key"])
    try:
        # The tenant came from the server; the agent id from the key id.
        assert ns.tenant == "acme"
        assert ns.agent == f"key-{k['id'].lower()}"
        assert ns.keys.tenant == "acme"
        assert ns.key_refresher is not None and ns.key_refresher.running

        # Python (key) -> Rust (bundle).
        rust_sub = await RustPeer.start(bundle, "sub", "jobs.>", "2", "30000")
        peers.append(rust_sub)
        await rust_sub.wait_for("ready")
        ids = [await ns.publish("jobs.created", f"from the key {i}".encode()) for i in range(2)]
        await ns.flush()
        for i in range(2):
            m = await rust_sub.wait_for("message")
            assert (m["tenant"], m["subject"], m["sender"]) == ("acme", "jobs.created", ns.agent)
            assert m["payload"] == f"from the key {i}" and m["msg_id"] == ids[i].to_hex()
        assert await rust_sub.finish() == 0

        # Rust -> Python.
        sub = await ns.subscribe("results.>")
        rust_pub = await RustPeer.start(bundle, "pub", "results.done", "2", "from-rust")
        peers.append(rust_pub)
        for i in range(2):
            m = await sub.next_msg(timeout=30)
            assert (m.tenant, m.subject, m.sender, m.payload) == ("acme", "results.done", "planner", f"from-rust-{i}".encode())
        assert await rust_pub.finish() == 0

        # A sealed request answered by the Rust agent.
        svc = await RustPeer.start(bundle, "respond", "svc.echo", "1", "30000")
        peers.append(svc)
        await svc.wait_for("ready")
        r = await ns.request("svc.echo", b"hi", timeout=10)
        assert (r.payload, r.sender) == (b"echo:hi", "planner")
        assert await svc.finish() == 0

        # And a Python agent with the bundle sees the key's messages, verified.
        other = await tb.connect(bundle)
        try:
            inbox = await other.subscribe("chat")
            # Once: subscribe() returns with the subscription live at the
            # server (namespace.server_barrier; a single nats-py flush was not
            # a barrier and this step lost its message in CI).
            await ns.publish("chat", b"hello bundle")
            m = await inbox.next_msg(timeout=10)
            assert (m.sender, m.payload) == (ns.agent, b"hello bundle")
            assert other.counters().dropped_total() == 0, repr(other.counters())
        finally:
            await other.close()
        assert ns.counters().dropped_total() == 0

        # The key set refreshes over the namespace's own connection.
        wait = await ns.key_refresher.refresh_once()
        assert ns.key_refresher.refreshes == 1 and ns.key_refresher.last_error is None
        assert 0.05 <= wait <= apikey.DEFAULT_REFRESH_EVERY
    finally:
        await ns.close()
    assert not ns.key_refresher.running  # close() stopped it


async def test_a_revoked_key_is_disconnected_within_2s_and_refused(install: Installation) -> None:
    k = install.key("acme", "revoke-me")
    ns = await tb.connect_with_key(install.url, k["key"])
    disconnected = asyncio.Event()

    async def on_disconnect() -> None:
        disconnected.set()

    async def quiet(e: Exception) -> None:
        pass

    nc = await nats.connect(install.url, token=k["key"], disconnected_cb=on_disconnect, error_cb=quiet)
    try:
        await nc.flush()
        assert ns.nats.is_connected
        # Let the controller's slot index see both connections.
        await asyncio.sleep(0.3)
        await install.acli("key", "revoke", "acme", k["id"])
        revoked = time.monotonic()
        await asyncio.wait_for(disconnected.wait(), 2.0)
        while ns.nats.is_connected:
            assert time.monotonic() - revoked < 2.0, "the key namespace is still connected 2 s after the revocation"
            await asyncio.sleep(0.02)
        # Their reconnects are refused: they stay disconnected.
        await asyncio.sleep(1.0)
        assert not nc.is_connected and not ns.nats.is_connected
        with pytest.raises(tb.ConnectError) as e:
            await tb.connect_with_key(install.url, k["key"])
        assert e.value.kind is tb.ConnectErrorKind.REFUSED
    finally:
        await nc.close()
        await ns.close()
