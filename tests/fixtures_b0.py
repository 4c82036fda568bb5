"""Fixtures for b0 tests: resolver processes, free ports, node environments.

Loaded as a pytest plugin by tests/conftest.py; import the helpers directly
(`from tests.fixtures_b0 import free_port, req_exchange, ...`) where needed.

free_port() -> int
    A TCP port on 127.0.0.1 that nothing listens on right now.

start_resolver(heartbeat_interval_us=30_000_000, port=None) -> ResolverProcess
    Starts `python -m b0_pm resolver` as a subprocess (B0_HOST_ID=127.0.0.1,
    bound on loopback only, no configuration file) and waits until it
    answers get_graph.
    ResolverProcess: .address ("tcp://127.0.0.1:PORT"), .port, .process,
    .env (a copy of os.environ for child processes with B0_RESOLVER,
    B0_HOST_ID=127.0.0.1 and B0PM_BIND_HOST=127.0.0.1), .stop() (by pid;
    SIGTERM, then SIGKILL), .kill(), .restart() (same port).

fixture `resolver`
    A started ResolverProcess (30 s heartbeat interval), stopped at teardown.

fixture `resolver_factory`
    resolver_factory(heartbeat_interval_us=..., port=...) -> ResolverProcess;
    every resolver it started is stopped at teardown, also when the test fails.

fixture `b0_env`
    monkeypatches os.environ of the test process with resolver.env, so a
    Node created in the test talks to the `resolver` fixture.

req_exchange(address, frames, timeout=2.0) -> list[bytes] | None
    One raw REQ exchange: sends `frames` (bytes, or a list of bytes for a
    multipart message), returns the reply frames, or None on timeout. The
    socket is closed with LINGER 0 either way.

resolver_request(address, key, body, timeout=2.0) -> dict | None
    A well-formed b0.message.resolv.Request {key: body}; returns the decoded
    JSON reply (the whole Response object), or None on timeout.

NodeThread(name, build=None, **node_kwargs)  (a context manager)
    Runs a b0_pm.b0.node.Node in its own thread, so a test can make blocking
    calls to it: in that thread it creates the node, calls build(node) to
    declare sockets, start()s it and spins. `with NodeThread(...) as nt:`
    gives nt.node once started (start errors are re-raised); leaving the
    block stops the loop, shuts the node down and joins the thread.
    nt.call_in_loop(fn) runs fn() in the node's thread and returns its result.
"""

from __future__ import annotations

import os
import signal
import socket
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

REPO_ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def req_exchange(address: str, frames, timeout: float = 2.0) -> list[bytes] | None:
    context = zmq.Context.instance()
    sock = context.socket(zmq.REQ)
    sock.linger = 0
    try:
        sock.connect(address)
        sock.send_multipart([frames] if isinstance(frames, bytes) else list(frames))
        if not sock.poll(int(timeout * 1000)):
            return None
        return sock.recv_multipart()
    finally:
        sock.close(0)


def resolver_request(address: str, key: str, body: dict, timeout: float = 2.0):
    from b0_pm.b0 import envelope, jsoncodec

    frame = envelope.encode("resolv", jsoncodec.dumps({key: body}), "b0.message.resolv.Request")
    reply = req_exchange(address, frame, timeout)
    if reply is None:
        return None
    return jsoncodec.loads(envelope.decode(reply[0]).payload)


class ResolverProcess:
    def __init__(self, port: int, heartbeat_interval_us: int):
        self.port = port
        self.heartbeat_interval_us = heartbeat_interval_us
        self.address = f"tcp://127.0.0.1:{port}"
        self.env = dict(os.environ)
        self.env.update({
            "B0_RESOLVER": self.address,
            "B0_HOST_ID": "127.0.0.1",
            "B0PM_BIND_HOST": "127.0.0.1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        })
        self.process: subprocess.Popen | None = None

    def start(self) -> "ResolverProcess":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "b0_pm", "resolver", "--port", str(self.port),
             "--minimum-heartbeat-interval", str(self.heartbeat_interval_us),
             "--config", os.devnull],  # defaults, whatever this host's /etc/b0-pm holds
            env=self.env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"resolver exited with status {self.process.returncode} at startup")
            if resolver_request(self.address, "get_graph", {}, timeout=0.2) is not None:
                return self
        self.kill()
        raise RuntimeError(f"resolver on port {self.port} did not answer within {STARTUP_TIMEOUT_S} s")

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def restart(self) -> "ResolverProcess":
        self.stop()
        return self.start()


def start_resolver(heartbeat_interval_us: int = 30_000_000, port: int | None = None) -> ResolverProcess:
    return ResolverProcess(port or free_port(), heartbeat_interval_us).start()


@pytest.fixture
def resolver_factory():
    started: list[ResolverProcess] = []

    def factory(heartbeat_interval_us: int = 30_000_000, port: int | None = None) -> ResolverProcess:
        proc = ResolverProcess(port or free_port(), heartbeat_interval_us)
        started.append(proc)
        return proc.start()

    yield factory
    for proc in started:
        proc.stop()


@pytest.fixture
def resolver(resolver_factory):
    return resolver_factory()


@pytest.fixture
def b0_env(resolver, monkeypatch):
    for key in ("B0_RESOLVER", "B0_HOST_ID", "B0PM_BIND_HOST"):
        monkeypatch.setenv(key, resolver.env[key])
    return resolver.env


class NodeThread:
    def __init__(self, name: str, build=None, **node_kwargs):
        self.name = name
        self.build = build
        self.node_kwargs = node_kwargs
        self.node = None
        self._ready: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._main, name=f"node-{name}", daemon=True)

    def _main(self) -> None:
        from b0_pm.b0.node import Node

        try:
            node = Node(self.name, **self.node_kwargs)
        except BaseException as exc:
            self._ready.put(exc)
            return
        try:
            if self.build is not None:
                self.build(node)
            node.start()
        except BaseException as exc:
            node.shutdown()
            self._ready.put(exc)
            return
        self.node = node
        self._ready.put(None)
        try:
            node.spin()
        finally:
            node.shutdown()

    def __enter__(self) -> "NodeThread":
        self._thread.start()
        error = self._ready.get(timeout=STARTUP_TIMEOUT_S)
        if error is not None:
            self._thread.join(STARTUP_TIMEOUT_S)
            raise error
        return self

    def __exit__(self, *exc_info) -> None:
        self.node.stop()
        self._thread.join(STARTUP_TIMEOUT_S)
        assert not self._thread.is_alive(), f"node thread {self.name} did not stop"

    def call_in_loop(self, fn, timeout: float = 5.0):
        result: queue.Queue = queue.Queue()

        def run():
            try:
                result.put((True, fn()))
            except BaseException as exc:
                result.put((False, exc))

        self.node.loop.call_soon_threadsafe(run)
        ok, value = result.get(timeout=timeout)
        if not ok:
            raise value
        return value
