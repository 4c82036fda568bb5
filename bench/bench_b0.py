"""Benchmark: b0 service round trip vs raw pyzmq REQ/REP, and a whole `b0-pm call`.

    .venv/bin/python bench/bench_b0.py [--calls 5000] [--processes 10]

Starts this package's resolver on a free loopback port and echo servers
in child processes (as deployed), then times, in one run, the same bytes:
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
    proc = subprocess.Popen([sys.executable, "-m", "b0_pm", "resolver", "--config", os.devnull,
                             "--port", env["B0_RESOLVER"].rsplit(":", 1)[1]],
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


def serve_b0() -> None:
    """--serve-b0: the echo service node, in its own process like a real deployment."""
    node = Node("bench_server")
    node.service_server(SERVICE, lambda request: request.reply(request.payload, "Echo"))
    node.start()
    print("ready", flush=True)
    node.spin()
    node.shutdown()


def serve_raw() -> None:
    """--serve-raw: a plain REP echo on an OS-chosen port, printed on stdout."""
    context = zmq.Context()
    rep = context.socket(zmq.REP)
    print(rep.bind_to_random_port("tcp://127.0.0.1"), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        rep.send(rep.recv())


class Server:
    """This script in a server mode, as a child process; stopped by pid."""

    def __init__(self, mode: str, env: dict):
        self.proc = subprocess.Popen([sys.executable, __file__, mode], env=env, stdout=subprocess.PIPE,
                                     cwd=REPO_ROOT)
        self.first_line = self.proc.stdout.readline().decode().strip()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def bench_b0(calls: int, env: dict) -> dict:
    server = Server("--serve-b0", env)
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
    server.stop()
    return summary("b0 ServiceClient.call", latencies, wall)


def bench_raw(calls: int, env: dict) -> dict:
    frame = envelope.encode(SERVICE, PAYLOAD, "Echo")
    server = Server("--serve-raw", env)
    context = zmq.Context()
    req = context.socket(zmq.REQ)
    req.connect(f"tcp://127.0.0.1:{server.first_line}")
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
    req.close(0)
    context.term()
    server.stop()
    return summary("raw pyzmq REQ/REP", latencies, wall)


def bench_process(runs: int, env: dict) -> float:
    server = Server("--serve-b0", env)
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
        server.stop()
    median = statistics.median(durations) * 1000
    print(f"{'whole `b0-pm call` process':<28} median {median:.0f} ms over {runs} runs "
          f"(min {min(durations) * 1000:.0f}, max {max(durations) * 1000:.0f})")
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--processes", type=int, default=10)
    parser.add_argument("--serve-b0", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-raw", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_b0:
        return serve_b0()
    if args.serve_raw:
        return serve_raw()

    env = dict(os.environ, B0_RESOLVER=f"tcp://127.0.0.1:{free_port()}", B0_HOST_ID="127.0.0.1",
               B0PM_BIND_HOST="127.0.0.1", B0_CONSOLE_LOGLEVEL="error",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    os.environ.update({k: env[k] for k in ("B0_RESOLVER", "B0_HOST_ID", "B0PM_BIND_HOST", "B0_CONSOLE_LOGLEVEL")})
    resolver = start_resolver(env)
    try:
        print(f"payload {len(PAYLOAD)} bytes, frame {len(envelope.encode(SERVICE, PAYLOAD, 'Echo'))} bytes, "
              f"{args.calls} calls each")
        b0 = bench_b0(args.calls, env)
        raw = bench_raw(args.calls, env)
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
