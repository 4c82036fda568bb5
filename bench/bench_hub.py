"""The HUB's forwarding overhead: query_process_status through the HUB vs directly to the PM.

One run on loopback: a resolver, real PMs (`b0-pm serve --backend local`,
host ids 127.0.0.2, 127.0.0.3, ... each bound on its own loopback address)
and `b0-pm hub`, all as processes. A persistent REQ socket asks the first
PM directly, another asks the HUB for the same PM; the two alternate
request by request, so drift hits both alike. Then the same with 20 PMs
registered (all beaconing at 10 Hz to the HUB).

    .venv/bin/python bench/bench_hub.py [--requests 2000] [--pms 20]

Prints p50/p99 per path and the HUB/direct ratio.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from b0_pm.b0 import envelope, jsoncodec  # noqa: E402
from tests.fixtures_b0 import REPO_ROOT, resolver_request, start_resolver  # noqa: E402

HUB_SERVICE = "process_manager_hub/control"
REQUEST_TYPE = "b0::process_manager::Request"
STARTUP_S = 30.0


def host_id(index: int) -> str:
    return f"127.0.0.{index + 2}"


class Rig:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.resolver = start_resolver()
        self.processes: list[subprocess.Popen] = []
        self.sleeper = workdir / "bin" / "sleeper"
        self.sleeper.parent.mkdir()
        self.sleeper.write_text("#!/bin/sh\nexec sleep 600\n")
        self.sleeper.chmod(0o755)
        self.context = zmq.Context()

    def spawn(self, argv: list[str], env: dict, log: str) -> None:
        with open(self.workdir / log, "ab") as stream:
            self.processes.append(subprocess.Popen(argv, env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                                   stdout=stream, stderr=subprocess.STDOUT))

    def start_pms(self, first: int, count: int) -> None:
        for index in range(first, first + count):
            env = dict(self.resolver.env, B0_HOST_ID=host_id(index), B0PM_BIND_HOST=host_id(index))
            self.spawn([sys.executable, "-m", "b0_pm", "serve", "--backend", "local",
                        "--allow", str(self.sleeper.parent)], env, f"pm-{index}.log")

    def start_hub(self) -> None:
        config = self.workdir / "hub.toml"
        config.write_text("[hub]\nhost_expiry_seconds = 30\n")
        self.spawn([sys.executable, "-m", "b0_pm", "hub", "--config", str(config)], self.resolver.env, "hub.log")

    def resolve(self, service: str) -> str:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            reply = resolver_request(self.resolver.address, "resolve_service", {"service_name": service})
            if reply and reply["resolve_service"]["ok"]:
                return reply["resolve_service"]["sock_addr"]
            time.sleep(0.1)
        raise RuntimeError(f"{service} was not registered within {STARTUP_S} s")

    def client(self, service: str) -> "Client":
        return Client(self.context, service, self.resolve(service))

    def close(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.context.destroy(0)
        self.resolver.stop()


class Client:
    def __init__(self, context, service: str, address: str):
        self.service = service
        self.sock = context.socket(zmq.REQ)
        self.sock.linger = 0
        self.sock.connect(address)

    def call(self, request: dict) -> tuple[float, dict]:
        frame = envelope.encode(self.service, jsoncodec.dumps(request), REQUEST_TYPE)
        started = time.perf_counter()
        self.sock.send(frame)
        if not self.sock.poll(10_000):
            raise RuntimeError(f"{self.service} did not answer within 10 s")
        reply = self.sock.recv()
        elapsed = time.perf_counter() - started
        return elapsed, jsoncodec.loads(envelope.decode(reply).payload)


def wait_for_hosts(hub: Client, count: int) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        _, reply = hub.call({"list_hosts": {}})
        if len(reply["list_hosts"]["hosts"]) == count:
            return
        time.sleep(0.2)
    raise RuntimeError(f"the HUB did not see {count} PMs within {STARTUP_S} s")


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def measure(direct: Client, hub: Client, pid: int, requests: int) -> dict:
    direct_query = {"query_process_status": {"pid": pid}}
    hub_query = {"host_name": host_id(0), "query_process_status": {"pid": pid}}
    for _ in range(50):  # warm up both paths (connections, caches)
        direct.call(direct_query)
        hub.call(hub_query)
    times = {"direct": [], "hub": []}
    for _ in range(requests):
        elapsed, reply = direct.call(direct_query)
        assert reply["query_process_status"]["running"] is True, reply
        times["direct"].append(elapsed)
        elapsed, reply = hub.call(hub_query)
        assert reply["success"] is True and reply["query_process_status"]["running"] is True, reply
        times["hub"].append(elapsed)
    return times


def report(label: str, times: dict) -> None:
    row = {path: (percentile(values, 0.5) * 1e3, percentile(values, 0.99) * 1e3, statistics.mean(values) * 1e3)
           for path, values in times.items()}
    print(f"\n{label} ({len(times['hub'])} requests per path)")
    print(f"  {'path':8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for path, (p50, p99, mean) in row.items():
        print(f"  {path:8} {p50:8.3f} {p99:8.3f} {mean:8.3f}")
    print(f"  ratio hub/direct: p50 {row['hub'][0] / row['direct'][0]:.2f}x, "
          f"p99 {row['hub'][1] / row['direct'][1]:.2f}x, "
          f"added p50 {row['hub'][0] - row['direct'][0]:.3f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per path and phase")
    parser.add_argument("--pms", type=int, default=20, help="PMs registered in the second phase")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-hub-") as tmp:
        rig = Rig(Path(tmp))
        try:
            rig.start_pms(0, 1)
            rig.start_hub()
            hub = rig.client(HUB_SERVICE)
            direct = rig.client(f"process_manager@{host_id(0)}/control")
            wait_for_hosts(hub, 1)
            _, reply = hub.call({"host_name": host_id(0),
                                 "start_process": {"path": str(rig.sleeper), "args": []}})
            pid = reply["start_process"]["pid"]
            print(f"cpus {os.cpu_count()}, python {sys.version.split()[0]}, pyzmq {zmq.__version__}")
            report("1 PM registered", measure(direct, hub, pid, args.requests))

            rig.start_pms(1, args.pms - 1)
            wait_for_hosts(hub, args.pms)
            report(f"{args.pms} PMs registered (real PMs, local backend, 10 Hz beacons each)",
                   measure(direct, hub, pid, args.requests))
            hub.call({"host_name": host_id(0), "stop_process": {"pid": pid}})
        finally:
            rig.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
