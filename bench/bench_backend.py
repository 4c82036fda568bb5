"""Start latency: SystemdBackend.start (exec confirmed) vs a raw pystemd
StartTransientUnit (introspected wrapper; job queued, nothing awaited) vs the
same call built low-level as the backend does vs `systemd-run -p Type=exec`
(a process per start, waits for the job), measured in one run inside a
throw-away systemd sandbox.

    sudo .venv/bin/python bench/bench_backend.py [--starts 200]

It boots the sandbox of tests/fixtures_sandbox.py, runs itself inside with
--inside, and prints p50/p99 per way and the ratios to SystemdBackend.start.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BOOKWORM_PYTHON = "/usr/bin/python3"
PROGRAM = ["/bin/sleep", "600"]


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def time_backend_start(starts: int) -> list[float]:
    from b0_pm.backends.systemd import SystemdBackend
    backend = SystemdBackend("bench")
    samples = []
    for _ in range(starts):
        began = time.perf_counter()
        backend.start(PROGRAM[0], PROGRAM[1:], environment={"B0_HOST_ID": "bench"})
        samples.append(time.perf_counter() - began)
        backend.process_events()
    backend.close(stop_all=True)
    return samples


def time_raw_pystemd(starts: int) -> list[float]:
    from pystemd.dbuslib import DBus
    from pystemd.systemd1 import Manager
    samples = []
    with DBus() as bus:
        manager = Manager(bus=bus)
        manager.load()
        for number in range(starts):
            argv = [arg.encode() for arg in PROGRAM]
            properties = {b"Description": b"bench", b"ExecStart": [(argv[0], argv, False)],
                          b"Type": b"exec", b"Slice": b"b0pm-benchraw.slice"}
            began = time.perf_counter()
            name = f"b0pm-benchraw-{number}.service".encode()
            manager.Manager.StartTransientUnit(name, b"fail", properties)
            samples.append(time.perf_counter() - began)
    return samples


def time_low_level_call(starts: int) -> list[float]:
    """The StartTransientUnit call alone, built as SystemdBackend builds it (no introspection)."""
    from pystemd.dbuslib import DBus, apply_signature
    from pystemd.systemd1.unit_signatures import signature_array
    samples = []
    with DBus() as bus:
        for number in range(starts):
            argv = [arg.encode() for arg in PROGRAM]
            properties = {b"Description": b"bench", b"ExecStart": [(argv[0], argv, False)],
                          b"Type": b"exec", b"Slice": b"b0pm-benchlow.slice"}
            name = f"b0pm-benchlow-{number}.service".encode()
            began = time.perf_counter()
            args = (apply_signature(b"ss", [name, b"fail"]) + signature_array(properties)
                    + [(ord(b"a"), b"(sa(sv))"), (-1, None)])
            bus.call_method(b"org.freedesktop.systemd1", b"/org/freedesktop/systemd1",
                            b"org.freedesktop.systemd1.Manager", b"StartTransientUnit", args)
            samples.append(time.perf_counter() - began)
    return samples


def time_systemd_run(starts: int) -> list[float]:
    samples = []
    for number in range(starts):
        began = time.perf_counter()
        subprocess.run(["systemd-run", "--quiet", "-p", "Type=exec", f"--unit=b0pm-benchrun-{number}",
                        "--slice=b0pm-benchrun.slice", *PROGRAM], check=True)
        samples.append(time.perf_counter() - began)
    return samples


def inside(args) -> None:
    sys.path.insert(0, str(REPO))
    ways = {"backend": time_backend_start, "raw_pystemd": time_raw_pystemd, "low_level": time_low_level_call,
            "systemd_run": time_systemd_run}
    results = {}
    for name in args.ways.split(","):
        results[name] = ways[name](args.starts)
        subprocess.run(["systemctl", "stop", "b0pm-bench*.slice"], check=False)   # end the sleeps
    json.dump(results, sys.stdout)


def outside(args) -> None:
    sys.path.insert(0, str(REPO))
    from tests.fixtures_sandbox import boot_sandbox, sandbox_unavailable_reason
    reason = sandbox_unavailable_reason()
    if reason:
        sys.exit(f"bench_backend: {reason}")
    venv_python = str(REPO / ".venv" / "bin" / "python")
    sandbox = boot_sandbox()
    try:
        runs = [("SystemdBackend.start (pystemd venv)", venv_python, "backend"),
                ("SystemdBackend.start (pystemd 0.11)", BOOKWORM_PYTHON, "backend"),
                ("raw pystemd StartTransientUnit", venv_python, "raw_pystemd"),
                ("low-level StartTransientUnit call", venv_python, "low_level"),
                ("systemd-run -p Type=exec", venv_python, "systemd_run")]
        rows = []
        for label, python, way in runs:
            if not os.path.exists(python):
                continue
            result = sandbox.exec([python, __file__, "--inside", "--ways", way, "--starts", str(args.starts)],
                                  timeout=600)
            samples = json.loads(result.stdout)[way]
            rows.append((label, statistics.median(samples), percentile(samples, 0.99)))
    finally:
        sandbox.close()
    reference = rows[0][1]
    print(f"{args.starts} starts each, inside a systemd {_systemd_version()} sandbox; times in ms")
    print(f"{'way':40} {'p50':>8} {'p99':>8} {'p50 / backend':>14}")
    for label, p50, p99 in rows:
        print(f"{label:40} {p50 * 1e3:8.2f} {p99 * 1e3:8.2f} {p50 / reference:14.2f}")


def _systemd_version() -> str:
    result = subprocess.run(["systemctl", "--version"], capture_output=True, text=True)
    return result.stdout.split()[1] if result.returncode == 0 else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=200)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ways", default="backend,raw_pystemd,low_level,systemd_run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    inside(args) if args.inside else outside(args)


if __name__ == "__main__":
    main()
