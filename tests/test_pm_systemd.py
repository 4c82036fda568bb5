"""The process manager on the systemd backend, under a real systemd (the sandbox).

The PM itself runs inside the container as a Type=notify transient service
(systemd-run), with a watchdog and Restart=on-failure like b0-pm@.service;
the resolver and the test's sockets are on the host (loopback is shared).
Pids in replies are the container's. One PM serves the whole module."""

import signal
import subprocess
import time

import pytest

from tests.fixtures_b0 import REPO_ROOT, free_port, resolver_request, start_resolver
from tests.test_pm_support import (CRASH_REQUESTS, SANDBOX_VENV_PYTHON, Control, SandboxPM, TopicListener,
                                   assert_error_reply, resolve, write_test_programs)

pytestmark = pytest.mark.systemd

HOST_ID = "127.0.0.1"
NODE_NAME = f"process_manager@{HOST_ID}"
PM_UNIT = "b0pm-test-pm.service"
WORKDIR = "/var/lib/b0pm-test"      # inside the container (not /tmp: the container mounts its own)
LADDER_STEP_S = 0.3
BOOKWORM_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def resolver():
    resolver = start_resolver()
    yield resolver
    resolver.stop()


@pytest.fixture(scope="module")
def sandbox_pm(systemd_sandbox, resolver):
    # a watchdog and a restart policy like b0-pm@.service
    pm = SandboxPM(systemd_sandbox, resolver, host_id=HOST_ID, unit=PM_UNIT, workdir=WORKDIR,
                   write_programs=write_test_programs, ladder_step_s=LADDER_STEP_S,
                   properties=("WatchdogSec=3", "Restart=on-failure", "RestartSec=0.2"))
    try:
        pm.start_service()
        yield pm
    finally:
        print(pm.journal(PM_UNIT))
        pm.close()


@pytest.fixture(scope="module")
def listener(sandbox_pm, resolver):
    with TopicListener(resolver.address) as topics:
        topics.next("process_manager/beacon")  # the subscription is live
        yield topics


def test_ready_makes_the_notify_unit_active_with_status(sandbox_pm):
    shown = sandbox_pm.show(PM_UNIT, "ActiveState", "SubState", "Type", "StatusText", "WatchdogUSec")
    assert shown["ActiveState"] == "active" and shown["SubState"] == "running"
    assert shown["Type"] == "notify" and shown["WatchdogUSec"] == "3s"
    assert shown["StatusText"].endswith("processes running")


def test_beacon_and_start_stop_through_a_transient_unit(sandbox_pm, listener):
    control = sandbox_pm.control
    _, beacon = listener.next("process_manager/beacon")
    assert beacon == {"host_name": HOST_ID, "node_name": NODE_NAME, "service_name": f"{NODE_NAME}/control"}

    pid = control.start_pid(sandbox_pm.programs["sleeper"], "a b", "--x")
    unit = sandbox_pm.unit_of(pid)
    assert unit.startswith("b0pm-127.0.0.1-") and unit.endswith(".service")
    shown = sandbox_pm.show(unit, "MainPID", "ActiveState", "SubState", "Type", "KillMode", "Slice",
                            "Environment", "RemainAfterExit")
    assert int(shown["MainPID"]) == pid
    assert (shown["ActiveState"], shown["SubState"], shown["Type"]) == ("active", "running", "exec")
    assert shown["KillMode"] == "control-group" and shown["Slice"] == "b0pm-127.0.0.1.slice"
    assert f"B0_RESOLVER={sandbox_pm.resolver.address}" in shown["Environment"]
    assert f"B0_HOST_ID={HOST_ID}" in shown["Environment"]
    deadline = time.monotonic() + 5   # STATUS= follows within a second
    while sandbox_pm.show(PM_UNIT, "StatusText")["StatusText"] != "1 process running":
        assert time.monotonic() < deadline, sandbox_pm.show(PM_UNIT, "StatusText")
        time.sleep(0.1)

    assert pid in control.pids()
    assert control.query(pid) == {"success": True, "running": True}
    _, started = listener.next("process_manager/events", lambda m: m["pid"] == pid)
    assert started["event"] == "started" and started["args"] == ["a b", "--x"]

    assert control.stop(pid) == {"success": True}
    assert control.wait_exit(pid)["exit_code"] == -2
    assert pid not in control.pids()
    _, exited = listener.next("process_manager/events", lambda m: m["pid"] == pid and m["event"] == "exited")
    assert exited["exit_code"] == -2 and exited["signal_name"] == "SIGINT" and exited["stop_requested"]


@pytest.mark.parametrize("program, expected", [
    ("exit0", {"exit_code": 0}),
    ("exit3", {"exit_code": 3}),
    ("kill_self", {"exit_code": -15, "signal": 15, "signal_name": "SIGTERM"}),
])
def test_exit_codes(sandbox_pm, program, expected):
    pid = sandbox_pm.control.start_pid(sandbox_pm.programs[program])
    assert sandbox_pm.control.wait_exit(pid) == {"success": True, "running": False, **expected}


def test_exec_failure_is_an_error_reply(sandbox_pm):
    for path in (sandbox_pm.programs["not_executable"], f"{WORKDIR}/bin/missing"):
        reply = sandbox_pm.control.start(path)
        assert reply["success"] is False and "pid" not in reply and reply["error_message"], reply


def test_a_child_ignoring_int_and_term_is_killed(sandbox_pm):
    control = sandbox_pm.control
    pid = control.start_pid(sandbox_pm.programs["stubborn"])
    time.sleep(0.2)  # let the shell install its traps
    control.stop(pid)
    status = control.wait_exit(pid, timeout=10)
    assert status["exit_code"] == -9 and status["signal_name"] == "SIGKILL"


def test_grandchildren_are_gone_after_a_stop(sandbox_pm):
    control = sandbox_pm.control
    pid = control.start_pid(sandbox_pm.programs["tree"], f"{WORKDIR}/out/grandchild.pid")
    pid_file = sandbox_pm.host_out / "grandchild.pid"
    deadline = time.monotonic() + 5
    while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    grandchild = int(pid_file.read_text())
    assert sandbox_pm.alive(grandchild)
    control.stop(pid)
    control.wait_exit(pid)
    deadline = time.monotonic() + 2 * LADDER_STEP_S + 3
    while sandbox_pm.alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sandbox_pm.alive(grandchild)


def test_the_journal_has_a_childs_output(sandbox_pm):
    control = sandbox_pm.control
    pid = control.start_pid(sandbox_pm.programs["talker"], "the sandbox")
    unit = sandbox_pm.unit_of(pid)
    deadline = time.monotonic() + 5
    while "hello from the sandbox" not in sandbox_pm.journal(unit) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "hello from the sandbox" in sandbox_pm.journal(unit)
    reply = control.call({"get_log": {"pid": pid, "lines": 10}})["get_log"]
    assert reply["success"] is True and "hello from the sandbox" in reply["lines"]
    control.stop(pid)
    control.wait_exit(pid)


@pytest.mark.parametrize("what, payload, content_type", CRASH_REQUESTS, ids=[r[0] for r in CRASH_REQUESTS])
def test_crash_requests_get_an_error_reply(sandbox_pm, what, payload, content_type):
    assert_error_reply(sandbox_pm.control, payload, content_type)


def test_kill_9_then_restart_adopts_running_processes_and_exit_records(sandbox_pm, listener):
    control = sandbox_pm.control
    running = control.start_pid(sandbox_pm.programs["sleeper"])
    ended = control.start_pid(sandbox_pm.programs["exit3"])
    control.wait_exit(ended)
    old_pid = int(sandbox_pm.show(PM_UNIT, "MainPID")["MainPID"])
    sandbox_pm.sandbox.exec(["systemctl", "kill", "--signal=SIGKILL", PM_UNIT])
    # Restart=on-failure brings it back; the resolver still holds the old name for 30 s, so the
    # new PM is process_manager@HOST-1 (spec 7.5), and its beacon says so
    _, beacon = listener.next("process_manager/beacon", lambda m: m["node_name"] != NODE_NAME, timeout=20)
    assert beacon["node_name"] == f"{NODE_NAME}-1" and beacon["host_name"] == HOST_ID
    assert int(sandbox_pm.show(PM_UNIT, "MainPID")["MainPID"]) != old_pid
    sandbox_pm.connect(beacon["node_name"])
    control = sandbox_pm.control
    assert running in control.pids()
    assert control.query(running) == {"success": True, "running": True}
    assert control.query(ended) == {"success": True, "running": False, "exit_code": 3}
    control.stop(running)
    assert control.wait_exit(running)["exit_code"] == -2


def test_journal_priorities_filter_the_pm_log(sandbox_pm):
    sandbox_pm.control.start("/bin/true")  # refused: a warning
    time.sleep(0.3)
    warnings = sandbox_pm.journal(PM_UNIT, "-p", "warning")
    everything = sandbox_pm.journal(PM_UNIT)
    assert "Failed to launch /bin/true" in warnings
    assert "ready on service" in everything and "ready on service" not in warnings


def test_systemctl_stop_ends_the_pm_cleanly_and_leaves_programs_running(sandbox_pm, resolver):
    pid = sandbox_pm.control.start_pid(sandbox_pm.programs["sleeper"])
    unit = sandbox_pm.unit_of(pid)
    sandbox_pm.sandbox.exec(["systemctl", "stop", PM_UNIT])
    shown = sandbox_pm.show(PM_UNIT, "ActiveState", "Result")
    # a clean exit on SIGTERM, and the watchdog never fired
    assert (shown["ActiveState"], shown["Result"]) == ("inactive", "success"), shown
    assert sandbox_pm.show(unit, "SubState")["SubState"] == "running"
    graph = resolver_request(resolver.address, "get_graph", {})["get_graph"]["graph"]
    assert f"{NODE_NAME}-1" not in [node["node_name"] for node in graph["nodes"]], "no shutdown_node"


def test_pm_on_debians_python_stack_under_systemd(sandbox_pm, resolver):
    """pystemd 0.11, pyzmq 24, sdnotify 0.3.1, jsonschema 4.10: what the .deb runs on."""
    sandbox = sandbox_pm.sandbox
    if sandbox.exec([BOOKWORM_PYTHON, "-c", "import pystemd, zmq, sdnotify, jsonschema"],
                    check=False).returncode != 0:
        pytest.skip("Debian's python3-pystemd, -zmq, -sdnotify and -jsonschema are not installed")
    unit = "b0pm-test-bookworm-pm.service"
    service = "process_manager@localhost/control"
    result = sandbox.exec(["systemd-run", f"--unit={unit}", "--property=Type=notify", "--property=WatchdogSec=3",
                           f"--setenv=B0_RESOLVER={resolver.address}", "--setenv=B0PM_BIND_HOST=127.0.0.1",
                           f"--setenv=PYTHONPATH={REPO_ROOT}", BOOKWORM_PYTHON, "-m", "b0_pm", "serve",
                           "--config", f"{WORKDIR}/empty.toml", "--backend", "systemd", "--host-id", "localhost",
                           "--allowed-directory", f"{WORKDIR}/bin"], check=False, timeout=60)
    control = None
    try:
        assert result.returncode == 0, result.stderr + sandbox_pm.journal(unit)
        control = Control(resolve(resolver.address, service), service)
        pid = control.start_pid(sandbox_pm.programs["exit3"])
        assert control.wait_exit(pid) == {"success": True, "running": False, "exit_code": 3}
        sandbox.exec(["systemctl", "stop", unit])
        assert sandbox_pm.show(unit, "Result")["Result"] == "success"
    finally:
        if control is not None:
            control.close()
        for argv in (["systemctl", "kill", "--signal=SIGKILL", unit, "b0pm-localhost-*"],
                     ["systemctl", "stop", unit, "b0pm-localhost-*"],
                     ["systemctl", "reset-failed", unit, "b0pm-localhost-*"]):
            sandbox.exec(argv, check=False)


def test_up_uses_the_system_manager_and_takes_its_units_down(systemd_sandbox):
    """`b0-pm up` inside the container picks the systemd system manager by itself."""
    port = free_port()
    up = systemd_sandbox.popen([SANDBOX_VENV_PYTHON, "-m", "b0_pm", "up", "--port", str(port), "--for", "30"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    control = None
    try:
        printed = []
        for line in up.stdout:
            printed.append(line)
            if line.strip() == "Ctrl-C stops everything.":
                break
        assert printed and printed[-1].strip() == "Ctrl-C stops everything.", "".join(printed)
        assert "process backend: the systemd system manager" in "".join(printed)
        service = "process_manager@localhost/control"
        address = resolve(f"tcp://127.0.0.1:{port}", service).replace("localhost", "127.0.0.1")
        control = Control(address, service)
        pid = control.start_pid("/usr/bin/sleep", "300")
        unit = systemd_sandbox.exec(["ps", "-o", "unit=", "-p", str(pid)]).stdout.strip()
        assert unit.startswith("b0pm-localhost-")
        systemd_sandbox.signal_daemon(up, signal.SIGTERM)
        assert up.wait(timeout=30) == 0
        state = systemd_sandbox.exec(["systemctl", "show", "-p", "SubState", "--value", unit]).stdout.strip()
        assert state != "running", state
    finally:
        if control is not None:
            control.close()
        systemd_sandbox.signal_daemon(up, signal.SIGKILL)
        up.wait(timeout=10)
        for argv in (["systemctl", "kill", "--signal=SIGKILL", "b0pm-localhost-*"],
                     ["systemctl", "stop", "b0pm-localhost-*"],
                     ["systemctl", "reset-failed", "b0pm-localhost-*"]):
            systemd_sandbox.exec(argv, check=False)
