"""The process manager on the local backend, on this host: a real `b0-pm serve`
process, a real resolver, requests through raw REQ sockets, topics through a
real b0 node. One PM serves the whole module (short stop ladder)."""

import os
import signal
import socket
import subprocess
import time

import pytest

from b0_pm import protocol
from b0_pm.b0 import envelope
from tests.fixtures_b0 import resolver_request, start_resolver
from tests.test_pm_support import (CRASH_REQUESTS, Control, PMProcess, TopicListener, assert_error_reply,
                                   pm_environment, python_executable, resolve, serve_argv,
                                   write_test_programs)

BOOKWORM_PYTHON = "/usr/bin/python3"   # Debian's python3-zmq 24, -sdnotify 0.3.1, -daemon 2.3.2, -jsonschema 4.10
HOST_ID = "127.0.0.1"
NODE_NAME = f"process_manager@{HOST_ID}"
SERVICE = f"{NODE_NAME}/control"
LADDER_STEP_S = 0.3
WATCHDOG_USEC = 400_000


@pytest.fixture(scope="module")
def resolver():
    resolver = start_resolver()
    yield resolver
    resolver.stop()


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("programs")
    return write_test_programs(str(directory))


@pytest.fixture(scope="module")
def empty_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "b0-pm.toml"
    path.write_text("")
    return str(path)


def notification_socket(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    return sock


def notifications_until(sock, wanted: bytes, timeout: float = 10.0) -> list[bytes]:
    """Every datagram received up to and including one that contains `wanted`."""
    received = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        received.append(sock.recv(4096))
        if wanted in received[-1]:
            return received
    raise TimeoutError(f"{wanted!r} not received; got {received}")


@pytest.fixture(scope="module")
def pm(resolver, programs, empty_config, tmp_path_factory):
    """The module's PM, with its sd_notify socket, control client and topic listener."""
    workdir = tmp_path_factory.mktemp("pm")
    notify = notification_socket(workdir / "notify")
    argv = serve_argv(python_executable(), empty_config, "--backend", "local", "--host-id", HOST_ID,
                      "--allow", os.path.dirname(programs["exit0"]),
                      "--stop-signal-grace-seconds", str(LADDER_STEP_S),
                      "--term-grace-seconds", str(LADDER_STEP_S), "--log-level", "info",
                      "--stop-processes-on-exit")   # children of a failed test end with the PM
    env = pm_environment(resolver.env, NOTIFY_SOCKET=str(workdir / "notify"),
                         WATCHDOG_USEC=str(WATCHDOG_USEC), B0_CONSOLE_LOGLEVEL="warn")
    process = PMProcess(argv, env, workdir / "pm.log")
    control = listener = None
    try:
        control = Control(resolve(resolver.address, SERVICE), SERVICE)
        listener = TopicListener(resolver.address).__enter__()
        listener.next("process_manager/beacon")  # the subscription is live
        yield process, control, listener, notify
    finally:
        if listener is not None:
            listener.__exit__(None, None, None)
        if control is not None:
            control.close()
        process.terminate()
        notify.close()
        print(process.log())


def test_ready_status_and_watchdog(pm):
    process, control, _, notify = pm
    first = notifications_until(notify, b"READY=1")
    assert b"READY=1\nSTATUS=0 processes running" in first
    before = time.monotonic()
    notifications_until(notify, b"WATCHDOG=1")
    notifications_until(notify, b"WATCHDOG=1")
    assert time.monotonic() - before < 2 * WATCHDOG_USEC / 1e6 + 0.5


def test_beacon_has_the_exact_payload(pm):
    _, _, listener, _ = pm
    content_type, beacon = listener.next("process_manager/beacon")
    assert content_type == "b0::process_manager::Beacon"
    assert list(beacon.items()) == [("host_name", HOST_ID), ("node_name", NODE_NAME),
                                    ("service_name", SERVICE)]


def test_start_query_list_stop_with_events(pm, programs):
    _, control, listener, _ = pm
    pid = control.start_pid(programs["sleeper"], "--flag", "two words")
    assert pid in control.pids()
    assert control.query(pid) == {"success": True, "running": True}
    content_type, started = listener.next("process_manager/events", lambda m: m["pid"] == pid)
    assert content_type == "b0::process_manager::Event"
    assert started["event"] == "started"
    assert (started["host_name"], started["node_name"]) == (HOST_ID, NODE_NAME)
    assert (started["path"], started["args"]) == (programs["sleeper"], ["--flag", "two words"])

    assert control.stop(pid) == {"success": True}
    status = control.wait_exit(pid)
    assert status == {"success": True, "running": False, "exit_code": -2, "signal": 2, "signal_name": "SIGINT"}
    assert pid not in control.pids()
    _, exited = listener.next("process_manager/events", lambda m: m["pid"] == pid and m["event"] == "exited")
    assert exited["exit_code"] == -2 and exited["stop_requested"] is True
    for event in (started, exited):
        protocol.validator("event.json").validate(event)


@pytest.mark.parametrize("program, expected", [
    ("exit0", {"exit_code": 0}),
    ("exit3", {"exit_code": 3}),
    ("kill_self", {"exit_code": -15, "signal": 15, "signal_name": "SIGTERM"}),
])
def test_exit_codes(pm, programs, program, expected):
    _, control, listener, _ = pm
    pid = control.start_pid(programs[program])
    assert control.wait_exit(pid) == {"success": True, "running": False, **expected}
    _, exited = listener.next("process_manager/events", lambda m: m["pid"] == pid and m["event"] == "exited")
    assert exited["exit_code"] == expected["exit_code"]
    assert "stop_requested" not in exited


def test_exec_failures_are_errors_not_pids(pm, programs):
    _, control, _, _ = pm
    directory = os.path.dirname(programs["exit0"])
    for path in (programs["not_executable"], os.path.join(directory, "missing")):
        reply = control.start(path)
        assert reply["success"] is False and "pid" not in reply, reply
        assert reply["error_message"]
    refused = control.start("/bin/true")
    assert refused["success"] is False and "permission denied" in refused["error_message"]


def test_a_child_ignoring_int_and_term_is_killed(pm, programs):
    _, control, _, _ = pm
    pid = control.start_pid(programs["stubborn"])
    time.sleep(0.2)  # let the shell install its traps
    began = time.monotonic()
    assert control.stop(pid) == {"success": True}
    status = control.wait_exit(pid, timeout=10)
    assert status["exit_code"] == -9 and status["signal_name"] == "SIGKILL"
    assert time.monotonic() - began < 2 * LADDER_STEP_S + 2


def test_grandchildren_are_gone_after_a_stop(pm, programs, tmp_path):
    _, control, _, _ = pm
    pid_file = tmp_path / "grandchild.pid"
    pid = control.start_pid(programs["tree"], str(pid_file))
    deadline = time.monotonic() + 5
    while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    grandchild = int(pid_file.read_text())
    assert process_alive(grandchild)
    control.stop(pid)
    control.wait_exit(pid)
    deadline = time.monotonic() + 2 * LADDER_STEP_S + 3
    while process_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(grandchild)


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_children_get_the_b0_environment(pm, programs, tmp_path, resolver):
    process, control, _, _ = pm
    dump = tmp_path / "env"
    pid = control.start_pid(programs["env_dump"], str(dump))
    assert control.wait_exit(pid)["exit_code"] == 0
    environment = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    assert environment["B0_RESOLVER"] == resolver.address
    assert environment["B0_HOST_ID"] == HOST_ID
    assert "NOTIFY_SOCKET" not in environment and "WATCHDOG_USEC" not in environment
    assert environment["B0_CONSOLE_LOGLEVEL"] == "info", "--log-level wins over the environment"
    assert f"Process {pid} ({programs['env_dump']}) started." in process.log()


@pytest.mark.parametrize("what, payload, content_type", CRASH_REQUESTS, ids=[r[0] for r in CRASH_REQUESTS])
def test_crash_requests_get_an_error_reply(pm, what, payload, content_type):
    process, control, _, _ = pm
    assert_error_reply(control, payload, content_type)
    assert process.process.poll() is None


def test_missing_program_in_allowed_directory_is_an_error(pm, programs):
    _, control, _, _ = pm
    reply = control.start(os.path.join(os.path.dirname(programs["exit0"]), "no-such-program"))
    assert reply["success"] is False and "pid" not in reply


def test_malformed_envelopes_get_an_error_reply(pm):
    process, control, _, _ = pm
    wrong_header = envelope.encode("someone_else/control", b'{"list_active_processes":{}}',
                                   "b0::process_manager::Request")
    for frames in ([b"garbage"], [wrong_header], [wrong_header, wrong_header]):
        reply = control.exchange(frames)
        assert b'"success":false' in envelope.decode(reply[0]).payload
    assert process.process.poll() is None and isinstance(control.pids(), list)


def test_dispatch_is_first_known_key(pm, programs):
    _, control, _, _ = pm
    assert control.call({}) == {}
    assert control.call({"foo": {}}) == {}
    both = control.call({"list_active_processes": {}, "query_process_status": {"pid": 1}})
    assert list(both) == ["query_process_status"]


bookworm_python = pytest.mark.skipif(
    subprocess.run([BOOKWORM_PYTHON, "-c", "import zmq, sdnotify, daemon, jsonschema"],
                   capture_output=True).returncode != 0,
    reason="Debian's python3-zmq, -sdnotify, -daemon and -jsonschema are not installed")


@bookworm_python
def test_sigterm_ends_cleanly_and_tells_the_resolver(resolver, empty_config, tmp_path):
    """A second PM (host id localhost, Debian's Python stack) without allowed directories:
    refuses, then SIGTERM."""
    notify = notification_socket(tmp_path / "notify")
    argv = serve_argv(BOOKWORM_PYTHON, empty_config, "--backend", "local", "--host-id", "localhost")
    log_path = tmp_path / "pm.log"
    log_path.touch()
    journal_stream = f"{log_path.stat().st_dev}:{log_path.stat().st_ino}"   # its stderr, as under systemd
    process = PMProcess(argv, pm_environment(resolver.env, NOTIFY_SOCKET=str(tmp_path / "notify"),
                                             JOURNAL_STREAM=journal_stream), log_path)
    try:
        notifications_until(notify, b"READY=1")
        control = Control(resolve(resolver.address, "process_manager@localhost/control"),
                          "process_manager@localhost/control")
        refused = control.start("/bin/true")
        control.close()
        assert refused["success"] is False and "no allowed directory" in refused["error_message"]
        # the policy's warning says how to allow programs, at warning priority for journalctl -p
        hint = next(line for line in process.log().splitlines() if "--allowed-directory" in line)
        assert hint.startswith("<4>"), hint
        assert process.terminate() == 0
        notifications_until(notify, b"STOPPING=1", timeout=1)
        graph = resolver_request(resolver.address, "get_graph", {})["get_graph"]["graph"]
        assert "process_manager@localhost" not in [node["node_name"] for node in graph["nodes"]]
    finally:
        process.kill()
        notify.close()


def test_daemon_refused_under_systemd(empty_config, tmp_path):
    env = pm_environment({}, INVOCATION_ID="0123456789abcdef0123456789abcdef")
    done = subprocess.run(serve_argv(python_executable(), empty_config, "--daemon"), env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--daemon refused" in done.stderr


@bookworm_python
def test_daemon_mode_detaches_writes_the_pidfile_and_stops_on_sigterm(resolver, empty_config, tmp_path):
    """With Debian's python-daemon 2.3.2."""
    pidfile, log_file = tmp_path / "pm.pid", tmp_path / "pm.log"
    argv = serve_argv(BOOKWORM_PYTHON, empty_config, "--backend", "local", "--host-id", "localhost",
                      "--daemon", "--pidfile", str(pidfile), "--log-file", str(log_file))
    done = subprocess.run(argv, env=pm_environment(resolver.env), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    daemon_pid = int(pidfile.read_text())
    try:
        while not (log_file.exists() and "ready on service" in log_file.read_text()):
            assert time.monotonic() < deadline + 10, "the daemon did not get ready"
            time.sleep(0.05)
        assert os.getsid(daemon_pid) != os.getsid(0), "the daemon left the session it was started in"
        os.kill(daemon_pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{daemon_pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{daemon_pid}")
        assert not pidfile.exists(), "the pidfile is removed on exit"
        assert "Signal 15 received: shutting down." in log_file.read_text()
    finally:
        if os.path.exists(f"/proc/{daemon_pid}"):
            os.kill(daemon_pid, signal.SIGKILL)


def test_sigterm_while_waiting_for_the_resolver_ends_cleanly(empty_config, tmp_path):
    from tests.fixtures_b0 import free_port
    nobody = f"tcp://127.0.0.1:{free_port()}"   # no resolver: the announce waits, as in C++
    argv = serve_argv(python_executable(), empty_config, "--backend", "local", "--host-id", "localhost")
    notify = notification_socket(tmp_path / "notify")
    process = PMProcess(argv, pm_environment({"B0_RESOLVER": nobody}, NOTIFY_SOCKET=str(tmp_path / "notify")),
                        tmp_path / "pm.log")
    try:
        waiting = notifications_until(notify, b"STATUS=announcing")[-1]
        assert waiting == f"STATUS=announcing process_manager@localhost to the resolver at {nobody}".encode()
        time.sleep(0.5)
        assert process.process.poll() is None, process.log()
        assert process.terminate(timeout=10) == 0
        assert "Interrupted while starting" in process.log()
        notifications_until(notify, b"STOPPING=1", timeout=1)
    finally:
        process.kill()
        notify.close()


@pytest.mark.skipif(os.path.exists("/dev/log"), reason="this host has a syslog socket")
def test_daemon_without_syslog_needs_a_log_file(empty_config):
    done = subprocess.run(serve_argv(python_executable(), empty_config, "--daemon"), env=pm_environment({}),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--log-file" in done.stderr


@bookworm_python
def test_daemon_refuses_a_pidfile_held_by_a_live_process(empty_config, tmp_path):
    pidfile = tmp_path / "pm.pid"
    pidfile.write_text(f"{os.getpid()}\n")   # this test process stands in for a running PM
    argv = serve_argv(BOOKWORM_PYTHON, empty_config, "--daemon", "--pidfile", str(pidfile),
                      "--log-file", str(tmp_path / "pm.log"))
    done = subprocess.run(argv, env=pm_environment({}), capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and f"already running as pid {os.getpid()}" in done.stderr


def test_pm_registers_again_after_the_resolver_restarts(resolver_factory, empty_config, programs, tmp_path):
    fresh = resolver_factory(heartbeat_interval_us=900_000)   # heartbeats every 0.3 s
    service = "process_manager@localhost/control"
    argv = serve_argv(python_executable(), empty_config, "--backend", "local", "--host-id", "localhost",
                      "--allow", os.path.dirname(programs["exit0"]), "--stop-processes-on-exit")
    process = PMProcess(argv, pm_environment(fresh.env), tmp_path / "pm.log")
    try:
        control = Control(resolve(fresh.address, service), service)
        pid = control.start_pid(programs["sleeper"])
        control.close()
        fresh.restart()   # same port, empty tables: the PM's heartbeat gets ok:false
        with TopicListener(fresh.address) as listener:
            _, beacon = listener.next("process_manager/beacon")
            assert beacon["node_name"] == "process_manager@localhost"
        control = Control(resolve(fresh.address, service), service)
        assert control.pids() == [pid]
        control.close()
        assert process.terminate() == 0
        assert not process_alive(pid), "--stop-processes-on-exit stops the children with the PM"
    finally:
        process.terminate()
