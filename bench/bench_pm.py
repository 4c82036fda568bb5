"""Benchmark: PM request latency vs a raw b0 echo service, with 0, 100 and 1000 managed processes.

    .venv/bin/python bench/bench_pm.py [--backend local|systemd|both] [--levels 0,100,1000]

For each backend, in one run: a resolver on a free loopback port, an echo
service node (same wire layer, its own process), and a real `b0-pm serve`.
A persistent REQ client (as a C++ client) times, with byte-exact envelopes:
  * the echo service (baseline),
  * start_process (/usr/bin/sleep; the reply comes after exec confirmation),
  * query_process_status, list_active_processes,
at each level of managed processes. The systemd PM runs inside a
throw-away sandbox (tests/fixtures_sandbox.py) as a Type=notify service;
there a raw pystemd StartTransientUnit (+ waiting for its job, i.e. the
same exec confirmation) is timed at each level as the floor for start. Also the PM's RSS
with the most processes. Targets: query p50 < 1 ms, start p50 < 10 ms,
list with 1000 < 10 ms.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from b0_pm.b0 import envelope, jsoncodec  # noqa: E402
from tests.fixtures_b0 import start_resolver  # noqa: E402
from tests.test_pm_support import (REQUEST_TYPE, Control, PMProcess, pm_environment,  # noqa: E402
                                   python_executable, resolve, serve_argv)

HOST_ID = "127.0.0.1"
PM_SERVICE = f"process_manager@{HOST_ID}/control"
ECHO_SERVICE = "bench_echo/control"
PROGRAM = "/usr/bin/sleep"
SANDBOX_PM_UNIT = "b0pm-bench-pm.service"
SANDBOX_UNITS = "b0pm-127.0.0.1-*"
VENV_PYTHON = str(REPO_ROOT / ".venv" / "bin" / "python")


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def timed(control: Control, frame: bytes, count: int) -> tuple[list[float], list[bytes]]:
    """count round trips of one prebuilt frame; latencies in ms and the reply payloads."""
    latencies, replies = [], []
    for _ in range(count):
        began = time.perf_counter()
        reply = control.exchange([frame])
        latencies.append((time.perf_counter() - began) * 1e3)
        replies.append(reply[0])
    return latencies, replies


def request_frame(service: str, request: dict) -> bytes:
    return envelope.encode(service, jsoncodec.dumps(request), REQUEST_TYPE)


def reply_of(frame: bytes, operation: str) -> dict:
    return jsoncodec.loads(envelope.decode(frame).payload)[operation]


# --- the echo baseline ----------------------------------------------------------

def run_echo_node() -> None:
    """`bench_pm.py --echo-node`: a b0 service answering every request with its payload."""
    from b0_pm.b0.node import Node

    node = Node("bench_echo")
    node.service_server(ECHO_SERVICE, lambda request: request.reply(request.payload, "echo"))
    node.spin()


# --- one backend's measurements -----------------------------------------------

class Measurement:
    def __init__(self, backend: str, pm: Control, echo: Control, iterations: int):
        self.backend = backend
        self.pm = pm
        self.echo = echo
        self.iterations = iterations
        self.rows = []
        self.started: list[int] = []    # the sleeps that make up the current level

    def _row(self, operation: str, level: int, latencies: list[float], baseline_p50: float, extra=None):
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        row = {"backend": self.backend, "operation": operation, "processes": level, "p50_ms": p50,
               "p99_ms": p99, "vs_echo": p50 / baseline_p50, **(extra or {})}
        self.rows.append(row)
        print(f"  {operation:<22} {level:>5} procs  p50 {p50:7.3f} ms  p99 {p99:7.3f} ms  "
              f"= {row['vs_echo']:5.1f} x echo" + "".join(f"  {k} {v}" for k, v in (extra or {}).items()),
              flush=True)

    def fill_to(self, level: int) -> None:
        frame = request_frame(PM_SERVICE, {"start_process": {"path": PROGRAM, "args": ["100000"]}})
        while len(self.started) < level:
            _, replies = timed(self.pm, frame, 1)
            reply = reply_of(replies[0], "start_process")
            assert reply["success"], reply
            self.started.append(reply["pid"])

    def level(self, level: int, start_floor=None) -> None:
        self.fill_to(level)
        echo_frame = request_frame(ECHO_SERVICE, {"query_process_status": {"pid": 4242}})
        echo, _ = timed(self.echo, echo_frame, self.iterations)
        echo_p50 = percentile(echo, 0.5)
        print(f"  {'echo (baseline)':<22} {level:>5} procs  p50 {echo_p50:7.3f} ms  "
              f"p99 {percentile(echo, 0.99):7.3f} ms", flush=True)
        self.rows.append({"backend": self.backend, "operation": "echo", "processes": level,
                          "p50_ms": echo_p50, "p99_ms": percentile(echo, 0.99)})

        pid = self.started[0] if self.started else None
        if pid is None:   # level 0: one short-lived sleep for query to look at, stopped below
            self.fill_to(1)
            pid = self.started[0]
        query, replies = timed(self.pm, request_frame(PM_SERVICE, {"query_process_status": {"pid": pid}}),
                               self.iterations)
        assert reply_of(replies[-1], "query_process_status")["running"] is True
        listing, replies = timed(self.pm, request_frame(PM_SERVICE, {"list_active_processes": {}}),
                                 max(20, self.iterations // 5))
        listed = len(reply_of(replies[-1], "list_active_processes")["pids"])

        start_count = max(20, self.iterations // 10)
        before = len(self.started)
        start, replies = timed(self.pm, request_frame(PM_SERVICE, {"start_process": {
            "path": PROGRAM, "args": ["100000"]}}), start_count)
        new = [reply_of(frame, "start_process") for frame in replies]
        assert all(reply["success"] for reply in new), new[:3]
        self._row("query_process_status", level, query, echo_p50)
        self._row("list_active_processes", level, listing, echo_p50, {"pids": listed})
        extra = {}
        if start_floor is not None:
            extra = {"vs_raw_pystemd": round(percentile(start, 0.5) / start_floor, 1)}
        self._row("start_process", level, start, echo_p50, extra)
        self.stop_all_but(level, [reply["pid"] for reply in new], before)

    def stop_all_but(self, level: int, extra_pids: list[int], before: int) -> None:
        """Back to `level` processes: stop the start samples (and the level-0 helper)."""
        victims = extra_pids + self.started[level:before]
        self.started = self.started[:level]
        for pid in victims:
            assert self.pm.stop(pid)["success"]
        deadline = time.monotonic() + 60
        while len(self.pm.pids()) > level:
            if time.monotonic() > deadline:
                raise TimeoutError("stopped processes did not end")
            time.sleep(0.05)

    def stop_everything(self) -> None:
        self.stop_all_but(0, [], len(self.started))


# --- local backend on this host ------------------------------------------------

def bench_local(levels, iterations, workdir: Path) -> list[dict]:
    print("local backend (this host)", flush=True)
    resolver = start_resolver()
    config = workdir / "empty.toml"
    config.write_text("")
    env = pm_environment(resolver.env)
    echo_node = subprocess.Popen([sys.executable, __file__, "--echo-node"], env=env, cwd=REPO_ROOT)
    pm = PMProcess(serve_argv(python_executable(), str(config), "--backend", "local", "--host-id", HOST_ID,
                              "--allowed-directory", os.path.dirname(PROGRAM), "--log-level", "warn"),
                   dict(env, B0_CONSOLE_LOGLEVEL="warn"), workdir / "pm-local.log")
    try:
        measurement = Measurement("local", Control(resolve(resolver.address, PM_SERVICE), PM_SERVICE),
                                  Control(resolve(resolver.address, ECHO_SERVICE), ECHO_SERVICE), iterations)
        for level in levels:
            measurement.level(level)
        measurement.fill_to(max(levels))
        rss = rss_mib(f"/proc/{pm.pid}/status")
        print(f"  PM RSS with {max(levels)} processes: {rss:.1f} MiB", flush=True)
        measurement.stop_everything()
        return measurement.rows + [{"backend": "local", "operation": "pm_rss", "processes": max(levels),
                                    "rss_mib": rss}]
    finally:
        pm.terminate()
        echo_node.send_signal(signal.SIGTERM)
        echo_node.wait(10)
        resolver.stop()


def rss_mib(status_text_or_path: str) -> float:
    text = status_text_or_path
    if status_text_or_path.startswith("/proc/"):
        text = Path(status_text_or_path).read_text()
    kib = next(int(line.split()[1]) for line in text.splitlines() if line.startswith("VmRSS:"))
    return kib / 1024


# --- systemd backend in the sandbox ---------------------------------------------

RAW_START = r"""
import select, sys, time, uuid
from pystemd.dbuslib import DBus, apply_signature
from pystemd.systemd1.unit_signatures import signature_array
calls, signals = DBus(), DBus()
calls.open(); signals.open()
M = (b"org.freedesktop.systemd1", b"/org/freedesktop/systemd1", b"org.freedesktop.systemd1.Manager")
signals.call_method(*M, b"Subscribe", [])
signals.call_method(b"org.freedesktop.DBus", b"/org/freedesktop/DBus", b"org.freedesktop.DBus", b"AddMatch",
    apply_signature(b"s", [b"type='signal',interface='org.freedesktop.systemd1.Manager',member='JobRemoved'"]))
done = set()
def drain():
    while True:
        message = signals.process()
        if message.is_empty():
            return
        message.process_reply(False)
        if message.body:
            done.add(message.body[1])
call_ms, confirmed_ms = [], []
for i in range(int(sys.argv[1])):
    name = f"b0pm-rawbench-{uuid.uuid4().hex[:8]}.service".encode()
    props = {b"ExecStart": [(b"/usr/bin/sleep", [b"/usr/bin/sleep", b"100000"], False)], b"Type": b"exec",
             b"RemainAfterExit": True}
    args = apply_signature(b"ss", [name, b"fail"]) + signature_array(props) + [(ord(b"a"), b"(sa(sv))"), (-1, None)]
    began = time.perf_counter()
    job = calls.call_method(*M, b"StartTransientUnit", args).body
    call_ms.append((time.perf_counter() - began) * 1e3)
    while job not in done:
        drain()
        if job not in done:
            select.select([signals.get_fd()], [], [], 1)
    confirmed_ms.append((time.perf_counter() - began) * 1e3)
    calls.call_method(*M, b"StopUnit", apply_signature(b"ss", [name, b"replace"]))
print(" ".join(f"{c:.4f},{d:.4f}" for c, d in zip(call_ms, confirmed_ms)))
"""


def bench_systemd(levels, iterations) -> list[dict]:
    from tests.fixtures_sandbox import boot_sandbox, sandbox_unavailable_reason

    reason = sandbox_unavailable_reason()
    if reason:
        print(f"systemd backend skipped: {reason}")
        return []
    print("systemd backend (PM inside a throw-away systemd sandbox)", flush=True)
    sandbox = boot_sandbox()
    resolver = start_resolver()
    env = pm_environment(resolver.env)
    echo_node = subprocess.Popen([sys.executable, __file__, "--echo-node"], env=env, cwd=REPO_ROOT)
    try:
        (sandbox.root / "var/lib/b0pm-bench").mkdir(parents=True, exist_ok=True)
        (sandbox.root / "var/lib/b0pm-bench/empty.toml").write_text("")
        rows = []

        def raw_start_floor(level: int) -> float:
            """Raw StartTransientUnit + its job, with `level` units of the PM alive beside it."""
            raw = sandbox.exec([VENV_PYTHON, "-c", RAW_START, str(max(20, iterations // 10))], timeout=300)
            sandbox.exec(["systemctl", "stop", "b0pm-rawbench-*"], check=False)
            pairs = [tuple(map(float, item.split(","))) for item in raw.stdout.split()]
            call, confirmed = [c for c, _ in pairs], [d for _, d in pairs]
            floor = percentile(confirmed, 0.5)
            print(f"  {'raw pystemd start':<22} {level:>5} procs  p50 {floor:7.3f} ms  "
                  f"p99 {percentile(confirmed, 0.99):7.3f} ms  (the D-Bus call alone: p50 "
                  f"{percentile(call, 0.5):.3f} ms)", flush=True)
            rows.append({"backend": "systemd", "operation": "raw_start_transient_unit", "processes": level,
                         "p50_ms": floor, "p99_ms": percentile(confirmed, 0.99),
                         "call_only_p50_ms": percentile(call, 0.5)})
            return floor

        sandbox.exec(["systemd-run", f"--unit={SANDBOX_PM_UNIT}", "--property=Type=notify",
                      *(f"--setenv={k}={v}" for k, v in env.items() if k.startswith(("B0_", "B0PM_"))),
                      "--setenv=B0_CONSOLE_LOGLEVEL=warn",
                      VENV_PYTHON, "-m", "b0_pm", "serve", "--config", "/var/lib/b0pm-bench/empty.toml",
                      "--backend", "systemd", "--host-id", HOST_ID, "--allowed-directory", "/usr/bin",
                      "--retention-seconds", "5"], timeout=60)
        measurement = Measurement("systemd", Control(resolve(resolver.address, PM_SERVICE), PM_SERVICE),
                                  Control(resolve(resolver.address, ECHO_SERVICE), ECHO_SERVICE), iterations)
        for level in levels:
            measurement.fill_to(level)
            measurement.level(level, start_floor=raw_start_floor(level))
        measurement.fill_to(max(levels))
        main_pid = sandbox.exec(["systemctl", "show", "-p", "MainPID", "--value", SANDBOX_PM_UNIT]).stdout.strip()
        rss = rss_mib(sandbox.exec(["cat", f"/proc/{main_pid}/status"]).stdout)
        print(f"  PM RSS with {max(levels)} processes: {rss:.1f} MiB", flush=True)
        rows += measurement.rows + [{"backend": "systemd", "operation": "pm_rss", "processes": max(levels),
                                     "rss_mib": rss}]
        return rows
    finally:
        sandbox.exec(["systemctl", "stop", SANDBOX_PM_UNIT], check=False)
        sandbox.exec(["systemctl", "kill", "--signal=SIGKILL", SANDBOX_UNITS], check=False)
        echo_node.send_signal(signal.SIGTERM)
        echo_node.wait(10)
        resolver.stop()
        sandbox.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("local", "systemd", "both"), default="both")
    parser.add_argument("--levels", default="0,100,1000", help="managed-process counts (comma separated)")
    parser.add_argument("--iterations", type=int, default=1000, help="query and echo calls per level")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--echo-node", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_node:
        run_echo_node()
        return 0
    levels = sorted(int(level) for level in args.levels.split(","))
    print(f"load average before: {' '.join(f'{value:.2f}' for value in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs", flush=True)
    workdir = Path(f"/var/tmp/b0pm-bench-{os.getpid()}")
    workdir.mkdir(parents=True)
    rows = []
    try:
        if args.backend in ("local", "both"):
            rows += bench_local(levels, args.iterations, workdir)
        if args.backend in ("systemd", "both"):
            rows += bench_systemd(levels, args.iterations)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
