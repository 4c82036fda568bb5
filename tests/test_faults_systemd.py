"""Faults around a PM on the systemd backend, under a real systemd (the sandbox).

Not repeated here: kill -9 of the PM with running children and adoption
after Restart= (test_pm_systemd.py, test_backend_systemd.py).

Here:
  * kill -9 of the PM, then a child exits and another is stopped by the
    administrator while no PM runs; the next PM (same name, once the
    resolver swept the dead one) still manages the running one and knows the
    exit status of the one that ended by itself (RemainAfterExit keeps it).
    Limit, pinned down: a unit stopped cleanly by `systemctl stop` is
    unloaded by systemd at once, so its end is unknown to a PM that was not
    running then ("no such pid"; never reported as running);
  * a child that daemonizes (double fork + setsid) is gone after the stop,
    because the whole cgroup of the transient unit goes (compare the local
    backend in test_faults_local.py, where it survives);
  * `systemctl daemon-reload` while the PM serves: the PM keeps answering
    (same process, no restart), running units are still managed (stop, exit
    status), exits during the reload are not lost, and new starts work.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from tests.fixtures_b0 import REPO_ROOT, start_resolver
from tests.polling import wait_until
from tests.test_pm_support import Control, resolve, write_program

pytestmark = pytest.mark.systemd

HOST_ID = "127.0.0.6"                  # own host id: own node name and program-unit prefix
NODE_NAME = f"process_manager@{HOST_ID}"
SERVICE = f"{NODE_NAME}/control"
PM_UNIT = "b0pm-faults-pm.service"
PROGRAM_UNITS = f"b0pm-{HOST_ID}-*"
WORKDIR = "/var/lib/b0pm-faults"       # inside the container
VENV_PYTHON = str(REPO_ROOT / ".venv" / "bin" / "python")

DAEMONIZER = """#!/bin/sh
( setsid sh -c 'sleep 300 & echo $! > "$1"' sh "$1" & )
exec sleep 300
"""


class FaultsPM:
    def __init__(self, sandbox, resolver):
        self.sandbox = sandbox
        self.resolver = resolver
        host_dir = sandbox.root / WORKDIR.lstrip("/")
        (host_dir / "bin").mkdir(parents=True, exist_ok=True)
        (host_dir / "out").mkdir(exist_ok=True)
        (host_dir / "empty.toml").write_text("")
        self.host_out = host_dir / "out"
        self.programs = {}
        for name, text in (("sleeper", "#!/bin/sh\nexec sleep 300\n"), ("daemonizer", DAEMONIZER),
                           ("short", "#!/bin/sh\nsleep 0.5\nexit 7\n")):
            write_program(str(host_dir / "bin"), name, text)
            self.programs[name] = f"{WORKDIR}/bin/{name}"
        self.control = None

    def start(self) -> None:
        self.sandbox.exec(["systemctl", "reset-failed", PM_UNIT], check=False)
        argv = ["systemd-run", f"--unit={PM_UNIT}", "--property=Type=notify", "--property=NotifyAccess=main",
                f"--setenv=B0_RESOLVER={self.resolver.address}", f"--setenv=B0_HOST_ID={HOST_ID}",
                f"--setenv=B0PM_BIND_HOST={HOST_ID}",
                VENV_PYTHON, "-m", "b0_pm", "serve", "--config", f"{WORKDIR}/empty.toml",
                "--backend", "systemd", "--host-id", HOST_ID, "--allowed-directory", f"{WORKDIR}/bin",
                "--stop-signal-grace-seconds", "0.3", "--term-grace-seconds", "0.3"]
        result = self.sandbox.exec(argv, check=False, timeout=60)
        assert result.returncode == 0, result.stderr + self.journal()
        if self.control is not None:
            self.control.close()
        self.control = Control(resolve(self.resolver.address, SERVICE), SERVICE)

    def main_pid(self) -> int:
        out = self.sandbox.exec(["systemctl", "show", PM_UNIT, "--property=MainPID"]).stdout
        return int(out.strip().split("=", 1)[1])

    def alive(self, pid: int) -> bool:
        return self.sandbox.exec(["test", "-d", f"/proc/{pid}"], check=False).returncode == 0

    def journal(self) -> str:
        return self.sandbox.exec(["journalctl", "--no-pager", "-o", "cat", "-u", PM_UNIT], check=False).stdout

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
        for argv in (["systemctl", "kill", "--signal=SIGKILL", PM_UNIT, PROGRAM_UNITS],
                     ["systemctl", "stop", PM_UNIT, PROGRAM_UNITS],
                     ["systemctl", "reset-failed", PM_UNIT, PROGRAM_UNITS]):
            self.sandbox.exec(argv, check=False)


@pytest.fixture(scope="module")
def faults_pm(systemd_sandbox):
    # short heartbeats: the resolver forgets a killed PM within about a second
    resolver = start_resolver(heartbeat_interval_us=600_000)
    pm = FaultsPM(systemd_sandbox, resolver)
    try:
        pm.start()
        yield pm
    finally:
        print(pm.journal()[-4000:])
        pm.close()
        resolver.stop()



def test_a_daemonized_grandchild_is_gone_after_the_stop(faults_pm):
    control = faults_pm.control
    pid_file = faults_pm.host_out / "daemon.pid"
    pid = control.start_pid(faults_pm.programs["daemonizer"], f"{WORKDIR}/out/daemon.pid")
    daemon = int(wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 10, "the daemon's pid"))
    assert faults_pm.alive(daemon)
    sessions = faults_pm.sandbox.exec(["ps", "-o", "sid=", "-p", f"{pid},{daemon}"]).stdout.split()
    assert len(set(sessions)) == 2, f"the daemon did not leave the session: {sessions}"
    assert control.stop(pid) == {"success": True}
    assert control.wait_exit(pid)["exit_code"] == -2
    wait_until(lambda: not faults_pm.alive(daemon), 5, "the daemon to be gone with the cgroup")


def test_daemon_reload_while_serving(faults_pm):
    control = faults_pm.control
    main_pid = faults_pm.main_pid()
    running = control.start_pid(faults_pm.programs["sleeper"])
    short = control.start_pid(faults_pm.programs["short"])   # exits with 7 during the reloads

    # a second client keeps querying while systemd reloads, twice
    errors, answered = [], []
    stop = threading.Event()

    def ask():
        client = Control(control.address, SERVICE)
        try:
            while not stop.is_set():
                reply = client.query(running)
                (answered if reply == {"success": True, "running": True} else errors).append(reply)
        except Exception as exc:   # a timeout is a failure of the test, reported below
            errors.append(repr(exc))
        finally:
            client.close()

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        for _ in range(2):
            faults_pm.sandbox.exec(["systemctl", "daemon-reload"], timeout=60)
    finally:
        stop.set()
        asker.join(30)
    assert errors == [] and answered, (errors[:3], len(answered))

    assert faults_pm.main_pid() == main_pid, "the PM was restarted by the reload"
    # the exit that happened around the reloads is known, with its status
    assert control.wait_exit(short) == {"success": True, "running": False, "exit_code": 7}
    # the running unit is still managed: listed, stopped through the ladder, exit status recorded
    assert running in control.pids()
    assert control.stop(running) == {"success": True}
    assert control.wait_exit(running)["exit_code"] == -2
    # and new starts work
    fresh = control.start_pid(faults_pm.programs["sleeper"])
    assert control.query(fresh) == {"success": True, "running": True}
    control.stop(fresh)
    control.wait_exit(fresh)


def test_kill_9_then_exits_while_no_pm_runs_are_known_to_the_next_pm(faults_pm):
    from tests.fixtures_b0 import resolver_request
    control = faults_pm.control
    running = control.start_pid(faults_pm.programs["sleeper"])
    stopped_by_admin = control.start_pid(faults_pm.programs["sleeper"])
    exits_alone = control.start_pid(faults_pm.programs["short"])      # exit 7 after 0.5 s
    admin_unit = faults_pm.sandbox.exec(["ps", "-o", "unit=", "-p", str(stopped_by_admin)]).stdout.strip()

    faults_pm.sandbox.exec(["systemctl", "kill", "--signal=SIGKILL", PM_UNIT])
    faults_pm.sandbox.exec(["systemctl", "stop", admin_unit])
    def swept():
        graph = resolver_request(faults_pm.resolver.address, "get_graph", {})["get_graph"]["graph"]
        return NODE_NAME not in [node["node_name"] for node in graph["nodes"]]
    wait_until(swept, 10, "the resolver to forget the killed PM")
    time.sleep(0.5)   # the short program has certainly ended by now

    faults_pm.start()
    control = faults_pm.control
    assert control.query(running) == {"success": True, "running": True}
    assert control.query(exits_alone) == {"success": True, "running": False, "exit_code": 7}
    status = control.query(stopped_by_admin)
    assert status == {"success": False, "error_message": "no such pid"} or status["running"] is False, status
    assert control.pids() == [running]
    assert control.stop(running) == {"success": True}
    assert control.wait_exit(running)["exit_code"] == -2
