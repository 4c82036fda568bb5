"""Load: many concurrent clients against one PM, directly and through the HUB.

    .venv/bin/python bench/bench_load.py [--clients 50] [--requests 200] [--json FILE]

One run on loopback: a resolver, one real PM (`b0-pm serve --backend
local`), a real HUB (`b0-pm hub`), and, as the baseline measured in the
same run, a raw pyzmq ROUTER process that answers every frame with a
canned reply of the same size as the PM's (no b0, no JSON, no policy).

Each client is a DEALER socket (a C++ REQ client looks the same to the
server, but a DEALER would also *see* a duplicated or late reply) with one
request in flight; a single poller drives all of them, so the server sees
`clients` truly concurrent peers. Every request is identifiable and every
reply is checked against it:

  * stop_process of a pid no process can have (> pid_max), unique per
    client and request: the reply must name exactly that pid;
  * query_process_status of a long-running sleeper: running:true;
  * list_active_processes: the sleeper's pid is listed;
  * start_process of a short program (10 % of requests): a pid never seen
    before, then the same client's next query of that pid must know it.

A reply that does not come within the timeout is *lost*; one that fails
its check is *mismatched*; any message left on a socket after its last
reply is *duplicated*. Prints p50/p99/throughput per path and the
ratio to the raw baseline, and the RSS of the PM before and after.

The engine (`run_clients`, `pm_plan`, `Rig`) is also used by
tests/test_stress_load.py with a small client count.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from b0_pm.b0 import envelope, jsoncodec  # noqa: E402
from tests.fixtures_b0 import resolver_request, start_resolver  # noqa: E402
from tests.test_pm_support import (PMProcess, pm_environment, python_executable, resolve,  # noqa: E402
                                   serve_argv)

HOST_ID = "127.0.0.1"
PM_SERVICE = f"process_manager@{HOST_ID}/control"
HUB_SERVICE = "process_manager_hub/control"
REQUEST_TYPE = "b0::process_manager::Request"
RESPONSE_TYPE = "b0::process_manager::Response"
IMPOSSIBLE_PID_BASE = 100_000_000   # above any pid_max (at most 2**22)
START_EVERY = 10                     # one request in ten starts a short program
STARTUP_S = 30.0


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB (from /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


# --- the driver ----------------------------------------------------------------

@dataclass
class LoadResult:
    clients: int
    requests: int
    latencies: list[float] = field(default_factory=list)   # seconds, answered requests
    lost: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def answered(self) -> int:
        return len(self.latencies)

    @property
    def problems(self) -> list[str]:
        return ([f"lost: {m}" for m in self.lost] + [f"mismatched: {m}" for m in self.mismatched]
                + [f"duplicated: {m}" for m in self.duplicated])

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")

    @property
    def throughput(self) -> float:
        return self.answered / self.wall_s if self.wall_s else 0.0


class _Client:
    __slots__ = ("index", "sock", "next", "sent_at", "check", "label", "state")

    def __init__(self, index: int, sock):
        self.index = index
        self.sock = sock
        self.next = 0
        self.sent_at = None
        self.check = None
        self.label = ""
        self.state: dict = {}


def run_clients(address: str, service: str, clients: int, requests: int, plan, *,
                timeout_s: float = 10.0, settle_s: float = 0.3) -> LoadResult:
    """`clients` DEALER sockets, each sending `requests` requests one at a time.

    plan(client_index, request_index, state) -> (frame: bytes, check(reply_frame) -> str | None, label).
    `state` is a dict per client kept across its requests. check returns None when the
    reply is the right one, else what is wrong."""
    context = zmq.Context.instance()
    result = LoadResult(clients, requests)
    poller = zmq.Poller()
    by_socket = {}
    all_clients = []
    try:
        for index in range(clients):
            sock = context.socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(address)
            client = _Client(index, sock)
            by_socket[sock] = client
            all_clients.append(client)
            poller.register(sock, zmq.POLLIN)

        def send_next(client: _Client) -> bool:
            if client.next >= requests:
                client.sent_at = None
                return False
            frame, client.check, client.label = plan(client.index, client.next, client.state)
            client.next += 1
            client.sent_at = time.perf_counter()
            client.sock.send_multipart([b"", frame])
            return True

        started = time.perf_counter()
        active = sum(send_next(client) for client in all_clients)
        while active:
            events = dict(poller.poll(100))
            now = time.perf_counter()
            for sock in events:
                client = by_socket[sock]
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if client.sent_at is None:
                        result.duplicated.append(f"client {client.index}: unexpected {frames[-1][:120]!r}")
                        continue
                    elapsed = time.perf_counter() - client.sent_at
                    problem = _check_frames(frames, service, client.check)
                    if problem is None:
                        result.latencies.append(elapsed)
                    else:
                        result.mismatched.append(f"client {client.index} {client.label}: {problem}")
                    if not send_next(client):
                        active -= 1
            for client in all_clients:
                if client.sent_at is not None and now - client.sent_at > timeout_s:
                    result.lost.append(f"client {client.index} {client.label}: no reply within {timeout_s} s")
                    if not send_next(client):
                        active -= 1
        result.wall_s = time.perf_counter() - started
        # anything still arriving is a reply nobody asked for
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:
            for sock in dict(poller.poll(50)):
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    result.duplicated.append(f"client {by_socket[sock].index}: after the last reply "
                                             f"{frames[-1][:120]!r}")
    finally:
        for client in all_clients:
            client.sock.close(0)
    return result


def _check_frames(frames: list[bytes], service: str, check) -> str | None:
    if len(frames) != 2 or frames[0] != b"":
        return f"expected an empty delimiter and one frame, got {len(frames)} frames"
    try:
        env = envelope.decode(frames[1])
    except Exception as exc:
        return f"undecodable reply: {exc}"
    if env.header0 != service:
        return f"reply header0 {env.header0!r}"
    if check is None:
        return None
    if env.content_type != RESPONSE_TYPE:
        return f"reply content type {env.content_type!r}"
    try:
        reply = jsoncodec.loads(env.payload)
    except Exception as exc:
        return f"reply is not JSON: {exc}"
    return check(reply)


# --- what the clients ask --------------------------------------------------------

def pm_plan(service: str, sleeper_pid: int, short_program: str, *, via_hub: bool, seen_pids: set,
            starts: bool = True):
    """The request mix (see the module docstring) for run_clients.

    via_hub: requests carry host_name and replies are the HUB's wrapping."""

    def frame_of(request: dict) -> bytes:
        if via_hub:
            request = {"host_name": HOST_ID, **request}
        return envelope.encode(service, jsoncodec.dumps(request), REQUEST_TYPE)

    def unwrap(reply: dict, op: str):
        if via_hub:
            if reply.get("success") is not True:
                return None, f"HUB refused: {reply}"
            reply = {key: value for key, value in reply.items() if key != "success"}
        if list(reply) != [op]:
            return None, f"expected only {op!r} in {reply}"
        return reply[op], None

    def plan(client: int, index: int, state: dict):
        kind = index % 10
        if starts and kind == 5:
            def check(reply, args=(str(client), str(index))):
                body, problem = unwrap(reply, "start_process")
                if problem:
                    return problem
                if body.get("success") is not True or not isinstance(body.get("pid"), int):
                    return f"start refused: {body}"
                if body["pid"] in seen_pids:
                    return f"pid {body['pid']} returned twice"
                seen_pids.add(body["pid"])
                state["last_started"] = body["pid"]
                return None
            return (frame_of({"start_process": {"path": short_program, "args": [str(client), str(index)]}}),
                    check, f"#{index} start")
        if kind == 8 and "last_started" in state:
            pid = state.pop("last_started")

            def check(reply, pid=pid):
                body, problem = unwrap(reply, "query_process_status")
                if problem:
                    return problem
                if body.get("success") is not True or body.get("running") not in (True, False):
                    return f"query of started pid {pid}: {body}"
                if body.get("running") is False and body.get("exit_code") != 0:
                    return f"started pid {pid} ended with {body}"
                return None
            return frame_of({"query_process_status": {"pid": pid}}), check, f"#{index} query {pid}"
        if kind in (1, 4, 8):
            def check(reply):
                body, problem = unwrap(reply, "query_process_status")
                if problem:
                    return problem
                return None if body == {"success": True, "running": True} else f"sleeper: {body}"
            return frame_of({"query_process_status": {"pid": sleeper_pid}}), check, f"#{index} query sleeper"
        if kind in (2, 7):
            def check(reply):
                body, problem = unwrap(reply, "list_active_processes")
                if problem:
                    return problem
                pids = body.get("pids")
                if not isinstance(pids, list) or sleeper_pid not in pids or pids != sorted(pids):
                    return f"list without the sleeper {sleeper_pid}: {body}"
                return None
            return frame_of({"list_active_processes": {}}), check, f"#{index} list"
        pid = IMPOSSIBLE_PID_BASE + client * 100_000 + index

        def check(reply, pid=pid):
            body, problem = unwrap(reply, "stop_process")
            if problem:
                return problem
            if body.get("success") is not False or f"PID {pid} is not managed" not in body.get("error_message", ""):
                return f"stop of {pid} answered {body}"
            return None
        return frame_of({"stop_process": {"pid": pid}}), check, f"#{index} stop {pid}"

    return plan


def raw_plan(service: str, size: int):
    """The baseline's requests: frames of the PM requests' size, checked only for arrival."""
    frame = envelope.encode(service, b'{"query_process_status":{"pid":%d}}' % IMPOSSIBLE_PID_BASE
                            + b" " * max(0, size - 40), REQUEST_TYPE)

    def plan(client, index, state):
        return frame, None, f"#{index}"
    return plan


# --- the processes ---------------------------------------------------------------

RAW_SERVER = r"""
import sys, zmq
ctx = zmq.Context()
sock = ctx.socket(zmq.ROUTER)
port = sock.bind_to_random_port("tcp://127.0.0.1")
reply = sys.stdin.buffer.read()
print(port, flush=True)
while True:
    frames = sock.recv_multipart()
    sock.send_multipart(frames[:-1] + [reply])
"""


class Rig:
    """A resolver, one local-backend PM (and optionally a HUB), each a process stopped by pid."""

    def __init__(self, workdir: Path, *, hub: bool = False, log_level: str = "warn",
                 resolver_heartbeat_us: int = 30_000_000):
        self.workdir = Path(workdir)
        self.processes: list[subprocess.Popen] = []
        self.pm = None
        self.raw = None
        self.resolver = start_resolver(heartbeat_interval_us=resolver_heartbeat_us)
        try:
            bin_dir = self.workdir / "bin"
            bin_dir.mkdir(exist_ok=True)
            self.sleeper = self._program(bin_dir / "sleeper", "#!/bin/sh\nexec sleep 600\n")
            self.short = self._program(bin_dir / "short", "#!/bin/sh\nexit 0\n")
            config = self.workdir / "empty.toml"
            config.write_text("")
            self._pm_env = pm_environment(self.resolver.env, B0_CONSOLE_LOGLEVEL=log_level)
            self._pm_argv = serve_argv(python_executable(), str(config), "--backend", "local",
                                       "--host-id", HOST_ID, "--allowed-directory", str(bin_dir))
            self.pm = PMProcess(self._pm_argv, self._pm_env, self.workdir / "pm.log")
            self.pm_address = resolve(self.resolver.address, PM_SERVICE)
            self.sleeper_pid = self.call(self.pm_address, PM_SERVICE, {
                "start_process": {"path": self.sleeper, "args": []}})["start_process"]["pid"]
            self.hub_address = None
            if hub:
                hub_config = self.workdir / "hub.toml"
                hub_config.write_text("[hub]\nforward_timeout_seconds = 20\nhost_expiry_seconds = 60\n")
                with open(self.workdir / "hub.log", "ab") as log:
                    self.processes.append(subprocess.Popen(
                        [python_executable(), "-m", "b0_pm", "hub", "--config", str(hub_config)],
                        env=dict(self.resolver.env, B0_CONSOLE_LOGLEVEL=log_level), cwd=REPO_ROOT,
                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
                self.hub_address = resolve(self.resolver.address, HUB_SERVICE)
                deadline = time.monotonic() + STARTUP_S
                while HOST_ID not in [h["host_name"] for h in self.call(
                        self.hub_address, HUB_SERVICE, {"list_hosts": {}})["list_hosts"]["hosts"]]:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the HUB did not see the PM")
                    time.sleep(0.1)
        except BaseException:
            self.close()
            raise

    def kill_and_restart_pm(self) -> None:
        """kill -9 the PM and start a new one at once (it may get a suffixed name: spec 7.5)."""
        self.pm.kill()
        self.pm = PMProcess(self._pm_argv, self._pm_env, self.workdir / "pm.log")

    @staticmethod
    def _program(path: Path, text: str) -> str:
        path.write_text(text)
        path.chmod(0o755)
        return str(path)

    @staticmethod
    def call(address: str, service: str, request: dict, timeout: float = 10.0) -> dict:
        from tests.fixtures_b0 import req_exchange
        frames = req_exchange(address, envelope.encode(service, jsoncodec.dumps(request), REQUEST_TYPE), timeout)
        if frames is None:
            raise TimeoutError(f"{service} did not answer {request}")
        return jsoncodec.loads(envelope.decode(frames[0]).payload)

    def start_raw_server(self, reply_size: int) -> str:
        """The baseline: a raw pyzmq ROUTER process answering a canned reply of reply_size bytes."""
        reply = envelope.encode(PM_SERVICE, b'{"stop_process":{"success":false}}'.ljust(reply_size), RESPONSE_TYPE)
        self.raw = subprocess.Popen([sys.executable, "-c", RAW_SERVER], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, cwd=REPO_ROOT)
        self.processes.append(self.raw)
        self.raw.stdin.write(reply)
        self.raw.stdin.close()
        port = int(self.raw.stdout.readline())
        return f"tcp://127.0.0.1:{port}"

    def pm_plan(self, *, via_hub: bool, seen_pids: set, starts: bool = True):
        return pm_plan(HUB_SERVICE if via_hub else PM_SERVICE, self.sleeper_pid, self.short,
                       via_hub=via_hub, seen_pids=seen_pids, starts=starts)

    def close(self) -> None:
        if self.pm is not None and self.pm.process.poll() is None:
            try:
                self.call(self.pm_address, PM_SERVICE, {"stop_process": {"pid": self.sleeper_pid}}, 2)
            except Exception:
                pass
        for process in self.processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
        if self.pm is not None:
            try:
                self.pm.terminate(10)
            except Exception:
                self.pm.kill()
        self.resolver.stop()
        # a PM killed by a test leaves its sleeper behind (the local backend cannot adopt): ours, by cmdline
        try:
            if self.sleeper in Path(f"/proc/{self.sleeper_pid}/cmdline").read_text():
                os.kill(self.sleeper_pid, signal.SIGKILL)
        except (AttributeError, OSError):
            pass


# --- the benchmark -------------------------------------------------------------

def summarize(name: str, result: LoadResult, baseline: LoadResult | None = None) -> dict:
    row = {"name": name, "clients": result.clients, "requests": result.requests,
           "answered": result.answered, "lost": len(result.lost), "mismatched": len(result.mismatched),
           "duplicated": len(result.duplicated),
           "p50_ms": result.percentile(0.5) * 1e3, "p99_ms": result.percentile(0.99) * 1e3,
           "throughput": result.throughput}
    line = (f"{name:<34} p50 {row['p50_ms']:7.3f} ms  p99 {row['p99_ms']:7.3f} ms  "
            f"{row['throughput']:8.0f} req/s  lost {row['lost']} mismatched {row['mismatched']} "
            f"duplicated {row['duplicated']}")
    if baseline is not None:
        line += (f"  (x{row['p50_ms'] / (baseline.percentile(0.5) * 1e3):.1f} p50, "
                 f"x{row['p99_ms'] / (baseline.percentile(0.99) * 1e3):.1f} p99 of raw)")
    print(line, flush=True)
    for problem in result.problems[:5]:
        print(f"    {problem}")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=200, help="requests per client")
    parser.add_argument("--json", metavar="FILE", help="also write the figures and latencies here")
    args = parser.parse_args()

    out = {"rows": [], "latencies_ms": {}, "memory_kib": {}}
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        rig = Rig(Path(tmp), hub=True)
        try:
            print(f"cpus {os.cpu_count()}, {args.clients} clients x {args.requests} requests, "
                  f"1 in {START_EVERY} a start_process", flush=True)
            raw_address = rig.start_raw_server(80)
            # warm-up of every path
            run_clients(raw_address, PM_SERVICE, 5, 20, raw_plan(PM_SERVICE, 60))
            run_clients(rig.pm_address, PM_SERVICE, 5, 20, rig.pm_plan(via_hub=False, seen_pids=set(), starts=False))
            run_clients(rig.hub_address, HUB_SERVICE, 5, 20,
                        rig.pm_plan(via_hub=True, seen_pids=set(), starts=False))
            pm_rss_before = rss_kib(rig.pm.pid)
            raw = run_clients(raw_address, PM_SERVICE, args.clients, args.requests, raw_plan(PM_SERVICE, 60))
            seen: set = set()
            direct = run_clients(rig.pm_address, PM_SERVICE, args.clients, args.requests,
                                 rig.pm_plan(via_hub=False, seen_pids=seen))
            via_hub = run_clients(rig.hub_address, HUB_SERVICE, args.clients, args.requests,
                                  rig.pm_plan(via_hub=True, seen_pids=seen))
            pm_rss_after = rss_kib(rig.pm.pid)
            raw_rss = rss_kib(rig.raw.pid)
            hub_rss = rss_kib(rig.processes[0].pid)
            for name, result, base in (("raw pyzmq ROUTER (baseline)", raw, None),
                                       ("PM direct (b0 + JSON + policy)", direct, raw),
                                       ("PM through the HUB", via_hub, raw)):
                out["rows"].append(summarize(name, result, base))
                out["latencies_ms"][name] = [x * 1e3 for x in result.latencies]
            out["memory_kib"] = {"pm_before": pm_rss_before, "pm_after": pm_rss_after,
                                 "hub": hub_rss, "raw_server": raw_rss}
            print(f"RSS: PM {pm_rss_before} KiB before, {pm_rss_after} KiB after "
                  f"({len(seen)} programs started), HUB {hub_rss} KiB, raw server {raw_rss} KiB "
                  f"(PM x{pm_rss_after / raw_rss:.1f} of raw)")
            failed = sum(len(r.problems) for r in (direct, via_hub))
        finally:
            rig.close()
    if args.json:
        Path(args.json).write_text(json.dumps(out))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
