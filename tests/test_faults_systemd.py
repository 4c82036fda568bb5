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

import threading
import time

import pytest

from tests.fixtures_b0 import start_resolver
from tests.polling import wait_until
from tests.test_pm_support import Control, SandboxPM, write_program

pytestmark = pytest.mark.systemd

HOST_ID = "127.0.0.6"                  # own host id: own node name and program-unit prefix
NODE_NAME = f"process_manager@{HOST_ID}"
SERVICE = f"{NODE_NAME}/control"
PM_UNIT = "b0pm-faults-pm.service"
WORKDIR = "/var/lib/b0pm-faults"       # inside the container

DAEMONIZER = """#!/bin/sh
( setsid sh -c 'sleep 300 & echo $! > "$1"' sh "$1" & )
exec sleep 300
"""


def write_fault_programs(directory) -> dict[str, str]:
    return {name: write_program(directory, name, text)
            for name, text in (("sleeper", "#!/bin/sh\nexec sleep 300\n"), ("daemonizer", DAEMONIZER),
                               ("short", "#!/bin/sh\nsleep 0.5\nexit 7\n"))}


@pytest.fixture(scope="module")
def faults_pm(systemd_sandbox):
    # short heartbeats: the resolver forgets a killed PM within about a second
    resolver = start_resolver(heartbeat_interval_us=600_000)
    pm = SandboxPM(systemd_sandbox, resolver, host_id=HOST_ID, unit=PM_UNIT, workdir=WORKDIR,
                   write_programs=write_fault_programs)
    try:
        pm.start_service()
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

    faults_pm.start_service()
    control = faults_pm.control
    assert control.query(running) == {"success": True, "running": True}
    assert control.query(exits_alone) == {"success": True, "running": False, "exit_code": 7}
    status = control.query(stopped_by_admin)
    assert status == {"success": False, "error_message": "no such pid"} or status["running"] is False, status
    assert control.pids() == [running]
    assert control.stop(running) == {"success": True}
    assert control.wait_exit(running)["exit_code"] == -2
