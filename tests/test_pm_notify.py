"""sd_notify messages and journal-priority logging, against a real datagram socket and real stderr files."""

import os
import socket
import subprocess
import sys
import time

import pytest

from b0_pm.notify import Notifier


@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()


def set_environment(monkeypatch, **variables):
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def test_notifier_sends_ready_status_watchdog_stopping(notify_socket, monkeypatch):
    sock, path = notify_socket
    set_environment(monkeypatch, NOTIFY_SOCKET=path, WATCHDOG_USEC="4000000", WATCHDOG_PID=str(os.getpid()))
    notifier = Notifier()
    assert notifier.enabled
    assert notifier.watchdog_interval_s == 2.0
    assert "NOTIFY_SOCKET" not in os.environ, "children must not inherit the notify socket"
    notifier.ready(status="0 processes running")
    assert sock.recv(4096) == b"READY=1\nSTATUS=0 processes running"
    notifier.status("0 processes running")  # unchanged: not resent
    notifier.status("1 process running")
    assert sock.recv(4096) == b"STATUS=1 process running"
    notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"


def test_notifier_never_blocks_on_a_full_socket(notify_socket, monkeypatch):
    sock, path = notify_socket
    set_environment(monkeypatch, NOTIFY_SOCKET=path)
    notifier = Notifier()
    began = time.monotonic()
    for _ in range(10_000):  # far more than the receive queue holds
        notifier.watchdog()
    assert time.monotonic() - began < 5
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_notifier_is_silent_outside_systemd(monkeypatch):
    set_environment(monkeypatch)
    notifier = Notifier()
    assert not notifier.enabled and notifier.watchdog_interval_s is None
    notifier.ready()
    notifier.watchdog()


def test_watchdog_meant_for_another_pid_is_ignored(monkeypatch):
    set_environment(monkeypatch, WATCHDOG_USEC="1000000", WATCHDOG_PID="1")
    assert Notifier().watchdog_interval_s is None


LOG_PROGRAM = """
import logging
from b0_pm.logsetup import setup_logging
setup_logging("DEBUG")
log = logging.getLogger("b0_pm.test")
log.warning("careful")
log.info("fyi")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("failed")
"""


def run_logging_program(tmp_path, journal: bool) -> str:
    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "wb") as stderr:
        status = os.fstat(stderr.fileno())
        env = dict(os.environ)
        env.pop("JOURNAL_STREAM", None)
        if journal:
            env["JOURNAL_STREAM"] = f"{status.st_dev}:{status.st_ino}"
        subprocess.run([sys.executable, "-c", LOG_PROGRAM], stderr=stderr, env=env, check=True)
    return stderr_path.read_text()


def test_journal_stream_lines_carry_priority_prefix(tmp_path):
    lines = run_logging_program(tmp_path, journal=True).splitlines()
    assert lines[0] == "<4>b0_pm.test: careful"
    assert lines[1] == "<6>b0_pm.test: fyi"
    assert lines[2] == "<3>b0_pm.test: failed"
    assert all(line.startswith("<3>") for line in lines[3:]), "traceback lines keep the priority"
    assert any("ZeroDivisionError" in line for line in lines[3:])


def test_plain_stderr_has_no_prefix(tmp_path):
    text = run_logging_program(tmp_path, journal=False)
    assert "WARNING b0_pm.test: careful" in text
    assert "<4>" not in text


NODE_LOG_PROGRAM = """
import logging, sys
from b0_pm.logsetup import route_node_logger, setup_logging
setup_logging("INFO")
node_logger = logging.Logger("b0.node.x")
console = logging.StreamHandler(sys.stderr)
console.setFormatter(logging.Formatter("[x] %(levelname)s: %(message)s"))
node_logger.addHandler(console)
route_node_logger(node_logger)
node_logger.error("node trouble")
"""


def test_node_logger_lines_get_journal_priorities(tmp_path):
    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "wb") as stderr:
        status = os.fstat(stderr.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{status.st_dev}:{status.st_ino}")
        subprocess.run([sys.executable, "-c", NODE_LOG_PROGRAM], stderr=stderr, env=env, check=True)
    assert stderr_path.read_text() == "<3>[x] ERROR: node trouble\n"


SYSLOG_PROGRAM = """
import logging, sys
from b0_pm import logsetup
logsetup.SYSLOG_SOCKET = sys.argv[1]   # a socket of the test's instead of /dev/log
logsetup.setup_logging("INFO", use_syslog=True, ident="b0-pm")
logging.getLogger("b0_pm.test").warning("to syslog")
"""


def test_daemon_logging_goes_to_syslog_with_priority(tmp_path):
    path = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(path)
        syslog.settimeout(10)
        done = subprocess.run([sys.executable, "-c", SYSLOG_PROGRAM, path], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        datagram = syslog.recv(4096).decode()
    # facility user (1) * 8 + warning (4) = 12
    assert datagram.startswith("<12>b0-pm[") and datagram.rstrip("\x00").endswith("]: b0_pm.test: to syslog")
