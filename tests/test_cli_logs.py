"""b0-pm logs against a PM on the systemd backend, whose programs log to the journal.

The PM runs inside the throw-away systemd container (tests/fixtures_sandbox.py),
which shares the host's network namespace, so the resolver and the b0-pm
commands run on the host, as a user's would.
"""

import json
import os
import select
import signal
import subprocess
import time

import pytest

from tests.fixtures_b0 import REPO_ROOT, start_resolver
from tests.test_cli_client import B0PM, run, wait_for

pytestmark = pytest.mark.systemd

SHELL = "/usr/bin/sh"  # inside the allowed /usr/bin; the PM runs it as a transient unit


@pytest.fixture(scope="module")
def journal_pm(systemd_sandbox):
    """A resolver on the host and a systemd-backend PM in the container; yields the clients' env."""
    resolver = start_resolver()
    try:
        env = resolver.env
        inside = {key: env[key] for key in ("B0_RESOLVER", "B0_HOST_ID", "B0PM_BIND_HOST", "PYTHONPATH")}
        pm = systemd_sandbox.popen(
            [*B0PM, "serve", "--config", "/dev/null", "--backend", "systemd", "--allow", "/usr/bin",
             "--stop-signal-grace-seconds", "1", "--term-grace-seconds", "1"],
            env=inside, cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
        wait_for(lambda: run(env, "list", "--timeout", "1").returncode == 0, "the PM did not answer")
        yield env
        systemd_sandbox.signal_daemon(pm, signal.SIGTERM)
        pm.wait(10)
    finally:
        resolver.stop()


def start_shell(env, script):
    done = run(env, "start", SHELL, "-c", script)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_logs_prints_the_last_lines(journal_pm, systemd_sandbox):
    # The program writes once told to, so systemd's own "Started <unit>" line is already in the journal.
    go = f"/run/b0pm-test-go-{time.monotonic_ns()}"
    pid = start_shell(journal_pm, f"while [ ! -e {go} ]; do sleep 0.05; done;"
                                  " for i in 1 2 3 4 5; do echo line $i; done; echo oops >&2; exec sleep 600")
    try:
        systemd_sandbox.exec(["touch", go])
        wait_for(lambda: "oops" in run(journal_pm, "logs", str(pid)).stdout, "the lines did not reach the journal")
        done = run(journal_pm, "logs", "-n", "100", str(pid))
        assert (done.returncode, done.stderr) == (0, "")
        assert done.stdout.endswith("\nline 1\nline 2\nline 3\nline 4\nline 5\noops\n")
        last_two = ["line 5", "oops"]
        done = run(journal_pm, "logs", "-n", "2", str(pid))
        assert (done.returncode, done.stdout.splitlines()) == (0, last_two)
        done = run(journal_pm, "logs", "-n", "1", "--json", str(pid))
        assert done.returncode == 0
        reply = json.loads(done.stdout)["get_log"]
        assert list(reply) == ["success", "lines", "cursor"]
        assert (reply["success"], reply["lines"]) == (True, last_two[-1:])
        assert reply["cursor"]
    finally:
        run(journal_pm, "stop", str(pid))


def follow(env, pid, count, timeout=20):
    """Run logs -f until it has printed count lines or timeout passed, then Ctrl-C it.

    Returns (lines, exit status).
    """
    wait_for(lambda: run(env, "logs", "-n", "1", str(pid)).stdout.startswith(("n ", "tick")),
             "the program's first line did not reach the journal")
    process = subprocess.Popen([*B0PM, "logs", "-f", "-n", "1", str(pid)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        output = b""
        deadline = time.monotonic() + timeout
        while output.count(b"\n") < count and time.monotonic() < deadline:
            if select.select([process.stdout], [], [], 0.1)[0]:
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    break
                output += chunk
        process.send_signal(signal.SIGINT)
        process.wait(10)
        return output.decode().splitlines()[:count], process.returncode
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_logs_follow_prints_each_new_line_once(journal_pm):
    pid = start_shell(journal_pm, "i=0; while :; do i=$((i+1)); echo n $i; sleep 0.1; done")
    try:
        lines, status = follow(journal_pm, pid, 30)
        assert status == 0
        numbers = [int(line.split()[1]) for line in lines]
        assert len(numbers) == 30
        assert numbers == list(range(numbers[0], numbers[0] + 30))
    finally:
        run(journal_pm, "stop", str(pid))


def test_logs_follow_keeps_identical_lines(journal_pm):
    # A program that repeats itself must not look silent: every "tick" is a new line.
    pid = start_shell(journal_pm, "while :; do echo tick; sleep 0.1; done")
    try:
        lines, status = follow(journal_pm, pid, 20)
        assert status == 0
        assert lines == ["tick"] * 20
    finally:
        run(journal_pm, "stop", str(pid))


def test_logs_follow_keeps_up_with_a_long_repetitive_log(journal_pm):
    # More identical lines than any window the client could compare: only a position in the journal tells new from old.
    pid = start_shell(journal_pm, "i=0; while [ $i -lt 1500 ]; do echo tick; i=$((i+1)); done;"
                                  " while :; do echo tick; sleep 0.1; done")
    try:
        wait_for(lambda: len(run(journal_pm, "logs", "-n", "1500", str(pid)).stdout.splitlines()) >= 1500,
                 "the first 1500 lines did not reach the journal")
        lines, status = follow(journal_pm, pid, 20)
        assert status == 0
        assert lines == ["tick"] * 20
    finally:
        run(journal_pm, "stop", str(pid))


def test_logs_follow_into_a_reader_that_stops(journal_pm):
    # `b0-pm logs -f PID | head -n 3`: once head has its lines, logs ends quietly with status 0.
    pid = start_shell(journal_pm, "while :; do echo tick; sleep 0.1; done")
    try:
        process = subprocess.Popen([*B0PM, "logs", "-f", str(pid)], env=journal_pm,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            for _ in range(3):
                assert process.stdout.readline()
            process.stdout.close()
            assert process.wait(10) == 0
            assert process.stderr.read() == b""
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    finally:
        run(journal_pm, "stop", str(pid))
