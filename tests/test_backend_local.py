"""LocalBackend on this host: the backend runs in a driver process
(tests/backend_driver.py) so that its children are not pytest's."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.backend_driver import DriverClient, DriverError
from tests.fixtures_sandbox import REPO

DRIVER = str(REPO / "tests" / "backend_driver.py")
SHORT_LADDER = [[signal.SIGINT, 0.5], [signal.SIGTERM, 0.5], [signal.SIGKILL, 0.0]]


@pytest.fixture
def start_driver():
    processes = []

    def start(**config) -> DriverClient:
        config = {"kind": "local", "stop_ladder": SHORT_LADDER, **config}
        process = subprocess.Popen([sys.executable, DRIVER, json.dumps(config)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, start_new_session=True)
        processes.append(process)
        return DriverClient(process)

    yield start
    for process in processes:
        if process.poll() is None:
            process.stdin.close()   # the driver exits at end of input
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def marker():
    """A number no other process has on its command line, to find our sleeps with pgrep."""
    return str(random.randrange(10**8, 10**9))


def _alive_with(marker: str) -> list[str]:
    """Pids of the `sleep <marker>` processes."""
    result = subprocess.run(["pgrep", "-a", "-x", "sleep"], capture_output=True, text=True)
    return [line.split()[0] for line in result.stdout.splitlines() if line.split()[-1] == marker]


def _wait_until(condition, seconds=5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _stop_leftovers(marker: str) -> None:
    for pid in _alive_with(marker):
        os.kill(int(pid), signal.SIGKILL)


def test_exit_codes_and_death_by_signal(start_driver, tmp_path):   # tmp_path: where the core goes
    backend = start_driver()
    # (running, exit_code, signal, core_dumped) expected for each sh -c script
    cases = {("-c", "exit 0"): (False, 0, None, False), ("-c", "exit 3"): (False, 3, None, False),
             ("-c", "sleep 0.2; exit 4"): (False, 4, None, False), ("-c", "exit 255"): (False, 255, None, False),
             ("-c", "kill -USR1 $$"): (False, -signal.SIGUSR1, signal.SIGUSR1, False),
             ("-c", f"cd {tmp_path}; ulimit -c unlimited; kill -SEGV $$"):
                 (False, -signal.SIGSEGV, signal.SIGSEGV, True)}
    pids = {args: backend.call("start", path="/bin/sh", args=list(args))["pid"] for args in cases}
    for args, expected in cases.items():
        record = backend.call("wait_exit", pid=pids[args], seconds=10)
        outcome = (record["running"], record["exit_code"], record["signal"], record["core_dumped"])
        assert outcome == expected, args
        assert record["unit"] is None and record["ended_at"] >= record["started_at"] > 0
    assert backend.call("running") == []
    assert sorted(r["pid"] for r in backend.call("ended")) == sorted(pids.values())


def test_start_failures_raise_start_error(start_driver, tmp_path):
    not_executable = tmp_path / "not-executable"
    not_executable.write_text("echo\n")
    not_executable.chmod(0o644)
    bad_interpreter = tmp_path / "bad-interpreter"
    bad_interpreter.write_text("#!/nonexistent/interpreter\n")
    bad_interpreter.chmod(0o755)
    backend = start_driver()
    failures = {"/nonexistent/program": "cannot execute /nonexistent/program: no such file or directory",
                str(not_executable): f"cannot execute {not_executable}: permission denied (not executable)",
                str(bad_interpreter):
                    f"cannot execute {bad_interpreter}: exec format error or missing interpreter",
                str(tmp_path): f"cannot execute {tmp_path}: is a directory",
                "bin/sleep": "cannot execute bin/sleep: the path must be absolute"}
    for path, sentence in failures.items():
        with pytest.raises(DriverError) as raised:
            backend.call("start", path=path, args=[])
        assert (raised.value.error, raised.value.message) == ("StartError", sentence)
    with pytest.raises(DriverError, match="cannot run /bin/true as user 'no-such-user'"):
        backend.call("start", path="/bin/true", args=[], user="no-such-user")
    assert backend.call("running") == []


def test_the_environment_is_exactly_the_one_given(start_driver, tmp_path):
    backend = start_driver()
    out = tmp_path / "env"
    script = f'env > {out}; printf "%s" "$1" >> {out}'
    record = backend.call("start", path="/bin/sh", args=["-c", script, "sh", "$HOME"],
                          environment={"B0_HOST_ID": "arm1"})
    assert backend.call("wait_exit", pid=record["pid"], seconds=10)["exit_code"] == 0
    lines = out.read_text().splitlines()
    assert "B0_HOST_ID=arm1" in lines and lines[-1] == "$HOME"
    assert not any(line.startswith("PYTEST_") for line in lines)


def test_the_ladder_kills_a_program_that_ignores_sigint_and_sigterm(start_driver, marker):
    backend = start_driver()
    record = backend.call("start", path="/bin/sh",
                          args=["-c", f"trap '' INT TERM; sleep {marker} & while :; do sleep 0.05; done"])
    try:
        _wait_until(lambda: len(_alive_with(marker)) == 1)   # the traps are set before the `&` job starts
        stopped_at = time.monotonic()
        assert backend.call("stop", pid=record["pid"])["stop_requested"]
        ended = backend.call("wait_exit", pid=record["pid"], seconds=10)
        assert (ended["exit_code"], ended["signal"]) == (-signal.SIGKILL, signal.SIGKILL)
        assert time.monotonic() - stopped_at >= 1.0   # SIGINT, 0.5 s, SIGTERM, 0.5 s, SIGKILL
        backend.call("run", seconds=0.3)
        assert _alive_with(marker) == []   # the grandchild ignored both as well, and is gone
    finally:
        _stop_leftovers(marker)


def test_stop_ends_grandchildren_that_outlive_a_clean_exit(start_driver, marker):
    backend = start_driver()
    # the shell exits 0 on SIGINT; its `&` job was started with SIGINT ignored (non-interactive
    # shell), so only the ladder's next step (SIGTERM to the process group) ends it
    script = f"sleep {marker} & trap 'exit 0' INT; while :; do sleep 0.05; done"
    record = backend.call("start", path="/bin/sh", args=["-c", script])
    try:
        _wait_until(lambda: len(_alive_with(marker)) == 1)
        backend.call("stop", pid=record["pid"])
        assert backend.call("wait_exit", pid=record["pid"], seconds=10)["exit_code"] == 0
        backend.call("run", seconds=1.0)
        assert _alive_with(marker) == []
    finally:
        _stop_leftovers(marker)
    assert backend.call("stop", pid=record["pid"])["running"] is False   # stopping an ended pid is fine
    with pytest.raises(DriverError, match="NotManaged"):
        backend.call("stop", pid=999999999)


def test_retention_forgets_exit_records(start_driver):
    backend = start_driver(retention_s=1.0)
    record = backend.call("start", path="/bin/sh", args=["-c", "exit 5"])
    assert backend.call("wait_exit", pid=record["pid"], seconds=10)["exit_code"] == 5
    assert backend.call("status", pid=record["pid"])["exit_code"] == 5
    backend.call("run", seconds=1.5)
    assert backend.call("status", pid=record["pid"]) is None


def test_adopt_finds_nothing_and_close_with_stop_all_ends_every_program(start_driver, marker):
    backend = start_driver()
    assert backend.call("adopt") == []
    pids = [backend.call("start", path="/bin/sleep", args=[marker])["pid"] for _ in range(2)]
    try:
        assert backend.call("running") == sorted(pids)
        backend.call("close", stop_all=True)
        assert _alive_with(marker) == []
    finally:
        _stop_leftovers(marker)
