"""Benchmark: b0 service round trip vs raw pyzmq REQ/REP, and a whole `b0-pm call`.

    .venv/bin/python bench/bench_b0.py [--calls 5000] [--processes 10]

Starts this package's resolver on a free loopback port, an echo service
node in a thread, then times, in one run and with the same bytes:
  * ServiceClient.call -> ServiceServer echo (envelope encode/decode, ROUTER),
  * a raw pyzmq REQ -> REP echo of the same frame,
  * `python -m b0_pm call` processes (announce, resolve, call, shutdown).
Everything stays on 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import zmq

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from b0_pm.b0 import envelope  # noqa: E402
from b0_pm.b0.node import Node  # noqa: E402

PAYLOAD = b'{"query_process_status":{"pid":4242}}' + b" " * 60
SERVICE = "bench/echo"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def summary(name: str, latencies: list[float], wall: float) -> dict:
    ordered = sorted(latencies)
    stats = {"p50": ordered[len(ordered) // 2] * 1e6, "p99": ordered[int(len(ordered) * 0.99)] * 1e6,
             "rate": len(ordered) / wall}
    print(f"{name:<28} p50 {stats['p50']:8.1f} us   p99 {stats['p99']:8.1f} us   {stats['rate']:9.0f} calls/s")
    return stats


def start_resolver(env: dict) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "b0_pm", "resolver", "--port", env["B0_RESOLVER"].rsplit(":", 1)[1]],
                            env=dict(env, B0_CONSOLE_LOGLEVEL="error"), cwd=REPO_ROOT)
    context = zmq.Context.instance()
    deadline = time.monotonic() + 10
    probe = envelope.encode("resolv", b'{"get_graph":{}}', "b0.message.resolv.Request")
    while time.monotonic() < deadline:
        sock = context.socket(zmq.REQ)
        sock.linger = 0
        sock.connect(env["B0_RESOLVER"])
        sock.send(probe)
        ready = sock.poll(200)
        sock.close(0)
        if ready:
            return proc
    proc.kill()
    raise RuntimeError("resolver did not start")


class EchoNode(threading.Thread):
    """The echo service node, spinning in its own thread."""

    def __init__(self):
        super().__init__(daemon=True)
        self.ready = threading.Event()
        self.node = None

    def run(self) -> None:
        self.node = Node("bench_server")
        self.node.service_server(SERVICE, lambda request: request.reply(request.payload, "Echo"))
        self.node.start()
        self.ready.set()
        self.node.spin()
        self.node.shutdown()


def bench_b0(calls: int) -> dict:
    server = EchoNode()
    server.start()
    server.ready.wait(10)
    with Node("bench_client") as client:
        svc = client.service_client(SERVICE)
        client.start()
        for _ in range(200):  # warm-up
            svc.call(PAYLOAD, "Echo", 5)
        latencies = []
        wall = time.perf_counter()
        for _ in range(calls):
            t = time.perf_counter()
            svc.call(PAYLOAD, "Echo", 5)
            latencies.append(time.perf_counter() - t)
        wall = time.perf_counter() - wall
    server.node.stop()
    server.join(10)
    return summary("b0 ServiceClient.call", latencies, wall)


def bench_raw(calls: int) -> dict:
    frame = envelope.encode(SERVICE, PAYLOAD, "Echo")
    context = zmq.Context()
    rep = context.socket(zmq.REP)
    port = rep.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve():
        poller = zmq.Poller()
        poller.register(rep, zmq.POLLIN)
        while not stop.is_set():
            if poller.poll(100):
                rep.send(rep.recv())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    req = context.socket(zmq.REQ)
    req.connect(f"tcp://127.0.0.1:{port}")
    for _ in range(200):
        req.send(frame)
        req.recv()
    latencies = []
    wall = time.perf_counter()
    for _ in range(calls):
        t = time.perf_counter()
        req.send(frame)
        req.recv()
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - wall
    stop.set()
    thread.join(5)
    req.close(0)
    rep.close(0)
    context.term()
    return summary("raw pyzmq REQ/REP", latencies, wall)


def bench_process(runs: int, env: dict) -> float:
    server = EchoNode()
    server.start()
    server.ready.wait(10)
    durations = []
    try:
        for _ in range(runs):
            t = time.perf_counter()
            result = subprocess.run([sys.executable, "-m", "b0_pm", "call", SERVICE, "-c", "Echo"],
                                    input=PAYLOAD, env=env, capture_output=True, cwd=REPO_ROOT, timeout=30)
            durations.append(time.perf_counter() - t)
            if result.returncode != 0 or not result.stdout.endswith(PAYLOAD):
                raise RuntimeError(f"b0-pm call failed: {result.stderr.decode()}")
    finally:
        server.node.stop()
        server.join(10)
    median = statistics.median(durations) * 1000
    print(f"{'whole `b0-pm call` process':<28} median {median:.0f} ms over {runs} runs "
          f"(min {min(durations) * 1000:.0f}, max {max(durations) * 1000:.0f})")
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--processes", type=int, default=10)
    args = parser.parse_args()

    env = dict(os.environ, B0_RESOLVER=f"tcp://127.0.0.1:{free_port()}", B0_HOST_ID="127.0.0.1",
               B0PM_BIND_HOST="127.0.0.1", B0_CONSOLE_LOGLEVEL="error",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    os.environ.update({k: env[k] for k in ("B0_RESOLVER", "B0_HOST_ID", "B0PM_BIND_HOST", "B0_CONSOLE_LOGLEVEL")})
    resolver = start_resolver(env)
    try:
        print(f"payload {len(PAYLOAD)} bytes, frame {len(envelope.encode(SERVICE, PAYLOAD, 'Echo'))} bytes, "
              f"{args.calls} calls each")
        b0 = bench_b0(args.calls)
        raw = bench_raw(args.calls)
        print(f"{'ratio b0 / raw':<28} p50 {b0['p50'] / raw['p50']:.2f}x   p99 {b0['p99'] / raw['p99']:.2f}x   "
              f"throughput {raw['rate'] / b0['rate']:.2f}x lower")
        bench_process(args.processes, env)
    finally:
        resolver.send_signal(signal.SIGTERM)
        try:
            resolver.wait(5)
        except subprocess.TimeoutExpired:
            resolver.kill()


if __name__ == "__main__":
    main()
