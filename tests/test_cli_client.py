"""b0-pm start|stop|status|list|hosts|logs, run as a user runs them.

One resolver, one PM (`b0-pm serve --backend local`, programs from a
temporary allowed directory) and one HUB run for the whole module; every
test runs the command as a subprocess and checks its output and exit
status: 0 success, 1 refused, 2 usage error, 3 no answer.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures_b0 import REPO_ROOT, NodeThread, free_port, start_resolver

B0PM_SCRIPT = Path(sys.executable).with_name("b0-pm")
B0PM = [str(B0PM_SCRIPT)] if B0PM_SCRIPT.exists() else [sys.executable, "-m", "b0_pm"]
HOST = "127.0.0.1"  # the host id the resolver fixture gives every node
PM_SERVICE = f"process_manager@{HOST}/control"
READY_TIMEOUT_S = 15.0

PROGRAMS = {
    # Ends by SIGINT's default action: "killed by signal SIGINT".
    "forever": "#!/bin/sh\nexec sleep 600\n",
    # Exits with status $1 on SIGINT; touches $2 once the trap is set.
    "exit_on_int": "#!/bin/sh\ntrap 'exit $1' INT\n: > \"$2\"\nwhile :; do sleep 0.05; done\n",
    # Writes its arguments and $GREETING to the file $1.
    "record": "#!/bin/sh\nout=$1; shift\n"
              "{ for a in \"$@\"; do printf '[%s]\\n' \"$a\"; done; printf 'GREETING=%s\\n' \"$GREETING\"; }"
              " > \"$out.tmp\"\nmv \"$out.tmp\" \"$out\"\n",
    "exit3": "#!/bin/sh\nexit 3\n",
    # Ignores SIGINT (sleep inherits that), so only the ladder's SIGTERM ends it; touches $1 first.
    "ignore_int": "#!/bin/sh\ntrap '' INT\n: > \"$1\"\nexec sleep 600\n",
}


def run(env, *argv, timeout=30):
    return subprocess.run([*B0PM, *argv], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def stop_process(process):
    """SIGTERM by pid, then SIGKILL; for the daemons this module started."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for(predicate, what, timeout=READY_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout} s")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A resolver, a local-backend PM and a HUB; yields the clients' environment."""
    base = tmp_path_factory.mktemp("cli")
    allowed = base / "bin"
    allowed.mkdir()
    for name, text in PROGRAMS.items():
        (allowed / name).write_text(text)
        (allowed / name).chmod(0o755)
    config_file = base / "empty.toml"  # keeps a machine's /etc/b0-pm/b0-pm.toml out of the test
    config_file.write_text("")
    daemons = []
    resolver = start_resolver()
    try:
        env = resolver.env
        daemons.append(subprocess.Popen(
            [*B0PM, "serve", "--config", str(config_file), "--backend", "local", "--allow", str(allowed),
             "--stop-signal-grace-seconds", "2", "--term-grace-seconds", "2"],
            env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL))
        daemons.append(subprocess.Popen(
            [*B0PM, "hub", "--config", str(config_file)],
            env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL))
        wait_for(lambda: run(env, "list", "--timeout", "1").returncode == 0, "the PM did not answer")
        wait_for(lambda: HOST in run(env, "hosts", "--timeout", "1").stdout.split(),
                 "the HUB did not hear the PM")
        yield {"env": env, "bin": allowed, "dir": base, "resolver": resolver}
    finally:
        for process in reversed(daemons):
            stop_process(process)
        resolver.stop()


def start(stack, *argv):
    """`b0-pm start`; returns the pid it printed."""
    done = run(stack["env"], "start", *argv)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().isdigit(), done.stdout
    return int(done.stdout)


def start_exit_on_int(stack, status):
    ready = stack["dir"] / f"ready-{time.monotonic_ns()}"
    pid = start(stack, str(stack["bin"] / "exit_on_int"), str(status), str(ready))
    wait_for(ready.exists, "the program did not set its trap")
    return pid


def start_ignoring_int(stack):
    ready = stack["dir"] / f"ready-{time.monotonic_ns()}"
    pid = start(stack, str(stack["bin"] / "ignore_int"), str(ready))
    wait_for(ready.exists, "the program did not set its trap")
    return pid


# --- start ---------------------------------------------------------------------

def test_start_prints_the_pid_and_the_process_runs(stack):
    pid = start(stack, str(stack["bin"] / "forever"))
    try:
        done = run(stack["env"], "status", str(pid))
        assert (done.returncode, done.stdout, done.stderr) == (0, f"pid {pid} running\n", "")
        done = run(stack["env"], "list")
        assert done.returncode == 0
        assert str(pid) in done.stdout.split("\n")
    finally:
        run(stack["env"], "stop", str(pid))


def test_start_json_is_the_pm_reply_on_one_line(stack):
    done = run(stack["env"], "start", "--json", str(stack["bin"] / "exit3"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1
    reply = json.loads(done.stdout)
    assert list(reply) == ["start_process"]
    assert reply["start_process"]["success"] is True
    assert isinstance(reply["start_process"]["pid"], int)


@pytest.mark.parametrize("separator", [[], ["--"]])
def test_start_passes_arguments_and_environment(stack, separator):
    out = stack["dir"] / f"record-{len(separator)}"
    program = str(stack["bin"] / "record")
    start(stack, "--env", "GREETING=hello world", program, *separator, str(out), "--flag", "-x", "a b", "--")
    wait_for(out.exists, "the program did not write its arguments")
    assert out.read_text() == "[--flag]\n[-x]\n[a b]\n[--]\nGREETING=hello world\n"


def test_start_double_dash_before_the_path(stack):
    out = stack["dir"] / "record-before"
    start(stack, "--", str(stack["bin"] / "record"), str(out), "--json")
    wait_for(out.exists, "the program did not write its arguments")
    assert out.read_text() == "[--json]\nGREETING=\n"


def test_start_outside_the_allowed_directory_is_refused(stack):
    done = run(stack["env"], "start", "/bin/true")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("b0-pm start: permission denied: /bin/true ")
    assert "is not inside an allowed directory" in done.stderr


def test_start_refused_json_prints_the_reply_too(stack):
    done = run(stack["env"], "start", "--json", "/bin/true")
    assert done.returncode == 1
    reply = json.loads(done.stdout)
    assert reply["start_process"]["success"] is False
    assert reply["start_process"]["error_message"] in done.stderr


def test_start_refused_environment_variable(stack):
    done = run(stack["env"], "start", "--env", "LD_PRELOAD=/x.so", str(stack["bin"] / "exit3"))
    assert done.returncode == 1
    assert "LD_PRELOAD" in done.stderr


def test_start_user_not_allowed_is_refused(stack):
    done = run(stack["env"], "start", "--user", "nobody", str(stack["bin"] / "exit3"))
    assert done.returncode == 1
    assert "nobody" in done.stderr


# --- stop ----------------------------------------------------------------------

def test_stop_without_wait_returns_at_once(stack):
    pid = start(stack, str(stack["bin"] / "forever"))
    done = run(stack["env"], "stop", str(pid))
    assert (done.returncode, done.stdout, done.stderr) == (0, f"pid {pid} stopping\n", "")


def test_stop_wait_reports_a_death_by_signal(stack):
    pid = start(stack, str(stack["bin"] / "forever"))
    done = run(stack["env"], "stop", "--wait", str(pid))
    assert (done.returncode, done.stdout, done.stderr) == (0, f"pid {pid} killed by signal SIGINT\n", "")


@pytest.mark.parametrize("status", [0, 3])
def test_stop_wait_reports_the_exit_status(stack, status):
    pid = start_exit_on_int(stack, status)
    done = run(stack["env"], "stop", "--wait", str(pid))
    assert (done.returncode, done.stdout, done.stderr) == (0, f"pid {pid} exited with status {status}\n", "")


def test_stop_wait_json_is_the_final_status_reply(stack):
    pid = start_exit_on_int(stack, 3)
    done = run(stack["env"], "stop", "--wait", "--json", str(pid))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"query_process_status": {"success": True, "running": False,
                                                                "exit_code": 3}}


def test_stop_wait_follows_the_ladder_to_sigterm(stack):
    pid = start_ignoring_int(stack)
    done = run(stack["env"], "stop", "--wait", str(pid))
    assert (done.returncode, done.stdout, done.stderr) == (0, f"pid {pid} killed by signal SIGTERM\n", "")


def test_stop_wait_gives_up_after_wait_timeout(stack):
    pid = start_ignoring_int(stack)
    try:
        done = run(stack["env"], "stop", "--wait", "--wait-timeout", "0.5", str(pid))
        assert (done.returncode, done.stdout) == (3, "")
        assert done.stderr == f"b0-pm stop: pid {pid} still running after 0.5 s\n"
    finally:
        run(stack["env"], "stop", "--wait", str(pid))


def test_stop_unknown_pid_is_refused(stack):
    done = run(stack["env"], "stop", "999999")
    assert done.returncode == 1
    assert done.stdout == ""
    assert "999999" in done.stderr and "not managed" in done.stderr


# --- status --------------------------------------------------------------------

def test_status_after_exit_reports_the_exit_status(stack):
    pid = start(stack, str(stack["bin"] / "exit3"))
    wait_for(lambda: "exited" in run(stack["env"], "status", str(pid)).stdout, "exit3 did not end")
    done = run(stack["env"], "status", str(pid))
    assert (done.returncode, done.stdout) == (0, f"pid {pid} exited with status 3\n")
    done = run(stack["env"], "status", "--json", str(pid))
    assert json.loads(done.stdout) == {"query_process_status": {"success": True, "running": False,
                                                                "exit_code": 3}}


def test_status_json_of_a_running_process(stack):
    pid = start(stack, str(stack["bin"] / "forever"))
    try:
        done = run(stack["env"], "status", "--json", str(pid))
        assert (done.returncode, done.stdout) == (
            0, '{"query_process_status":{"success":true,"running":true}}\n')
    finally:
        run(stack["env"], "stop", str(pid))


def test_status_unknown_pid_is_refused(stack):
    done = run(stack["env"], "status", "999999")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "b0-pm status: no such pid\n"


def test_output_stays_clean_beside_another_client(stack):
    # The resolver renames a second "b0-pm-client" node; that must not show in a command's output.
    with NodeThread("b0-pm-client", resolver=stack["env"]["B0_RESOLVER"], host_id=HOST):
        done = run(stack["env"], "status", "999999")
    assert (done.returncode, done.stdout, done.stderr) == (1, "", "b0-pm status: no such pid\n")


def test_status_unknown_pid_json(stack):
    done = run(stack["env"], "status", "--json", "999999")
    assert done.returncode == 1
    assert done.stdout == '{"query_process_status":{"success":false,"error_message":"no such pid"}}\n'


# --- list ----------------------------------------------------------------------

def test_list_json_is_the_pm_reply(stack):
    pid = start(stack, str(stack["bin"] / "forever"))
    try:
        done = run(stack["env"], "list", "--json")
        assert done.returncode == 0
        reply = json.loads(done.stdout)
        assert list(reply) == ["list_active_processes"]
        assert pid in reply["list_active_processes"]["pids"]
    finally:
        run(stack["env"], "stop", str(pid))


def test_list_through_the_hub(stack):
    pid = start(stack, "--host", HOST, str(stack["bin"] / "forever"))
    try:
        done = run(stack["env"], "list", "--host", HOST)
        assert done.returncode == 0
        assert str(pid) in done.stdout.split("\n")
        done = run(stack["env"], "list", "--host", HOST, "--json")
        reply = json.loads(done.stdout)
        assert list(reply) == ["success", "list_active_processes"]
        assert reply["success"] is True and pid in reply["list_active_processes"]["pids"]
    finally:
        run(stack["env"], "stop", "--host", HOST, str(pid))


def test_list_every_host(stack):
    pid = start(stack, str(stack["bin"] / "forever"))
    try:
        done = run(stack["env"], "list", "--host", "*")
        assert done.returncode == 0, done.stderr
        assert f"{HOST} {pid}" in done.stdout.split("\n")
        reply = json.loads(run(stack["env"], "list", "--host", "*", "--json").stdout)
        assert reply["success"] is True
        entry = next(e for e in reply["hosts"] if e["host_name"] == HOST)
        assert entry["success"] is True and pid in entry["list_active_processes"]["pids"]
    finally:
        run(stack["env"], "stop", str(pid))


def test_unknown_host_through_the_hub_is_refused(stack):
    done = run(stack["env"], "list", "--host", "nowhere")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "b0-pm list: unknown host\n"
    done = run(stack["env"], "status", "--json", "--host", "nowhere", "1")
    assert (done.returncode, done.stdout) == (1, '{"success":false,"error_message":"unknown host"}\n')


# --- hosts ---------------------------------------------------------------------

def test_hosts(stack):
    done = run(stack["env"], "hosts")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{HOST}\n", "")
    reply = json.loads(run(stack["env"], "hosts", "--json").stdout)
    assert reply["success"] is True
    [entry] = reply["list_hosts"]["hosts"]
    assert entry["host_name"] == HOST
    assert entry["service_name"] == PM_SERVICE


def test_hosts_of_one_host(stack):
    done = run(stack["env"], "hosts", "--host", HOST)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{HOST}\n", "")
    done = run(stack["env"], "hosts", "--host", "nowhere")
    assert (done.returncode, done.stdout, done.stderr) == (1, "", "b0-pm hosts: unknown host\n")


# --- logs ----------------------------------------------------------------------

def test_logs_on_the_local_backend_is_a_clear_refusal(stack):
    pid = start(stack, str(stack["bin"] / "forever"))
    try:
        done = run(stack["env"], "logs", "-n", "5", str(pid))
        assert (done.returncode, done.stdout) == (1, "")
        assert "logs are not available on the local backend" in done.stderr
        done = run(stack["env"], "logs", "-f", "--host", HOST, str(pid))
        assert done.returncode == 1
        assert "local backend" in done.stderr
    finally:
        run(stack["env"], "stop", str(pid))


def test_logs_unknown_pid(stack):
    done = run(stack["env"], "logs", "999999")
    assert (done.returncode, done.stderr) == (1, "b0-pm logs: no such pid\n")


# --- no answer -----------------------------------------------------------------

def test_no_pm_on_this_host_exits_3(resolver):
    env = dict(resolver.env, B0_HOST_ID="ghost")
    done = run(env, "list", "--timeout", "2")
    assert (done.returncode, done.stdout) == (3, "")
    assert "process_manager@ghost/control" in done.stderr


def test_no_hub_exits_3(resolver):
    for argv in (["list", "--host", HOST], ["hosts"]):
        done = run(resolver.env, *argv, "--timeout", "2")
        assert (done.returncode, done.stdout) == (3, ""), argv
        assert "process_manager_hub/control" in done.stderr


def test_no_resolver_exits_3_within_the_timeout():
    env = dict(os.environ, B0_RESOLVER=f"tcp://127.0.0.1:{free_port()}")
    started = time.monotonic()
    done = run(env, "status", "--timeout", "1", "1")
    elapsed = time.monotonic() - started
    assert (done.returncode, done.stdout) == (3, "")
    assert "resolver" in done.stderr and env["B0_RESOLVER"] in done.stderr
    assert elapsed < 1 + 4  # the timeout, plus interpreter start and a bounded goodbye on a busy machine


def test_a_pm_that_never_answers_exits_3_naming_the_service(b0_env):
    # A service under a PM's name that takes requests and never replies: a hung PM.
    build = lambda node: node.service_server("process_manager@hung/control", lambda request: None)
    with NodeThread("hung-pm", build=build):
        env = dict(b0_env, B0_HOST_ID="hung")
        started = time.monotonic()
        done = run(env, "status", "--timeout", "1", "1")
        elapsed = time.monotonic() - started
    assert (done.returncode, done.stdout) == (3, "")
    assert done.stderr.startswith("b0-pm status: no answer from process_manager@hung/control within 1 s")
    assert 1 <= elapsed < 1 + 4


# --- usage errors --------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["start"],
    ["stop"],
    ["stop", "abc"],
    ["stop", "0"],
    ["status", "-5"],
    ["status", "1", "2"],
    ["list", "--timeout", "0"],
    ["list", "--timeout", "soon"],
    ["logs", "-n", "0", "1"],
    ["hosts", "extra"],
    ["start", "--env", "NOEQUALS", "/bin/true"],
    ["start", "--env", "=x", "/bin/true"],
    ["list", "--host", ""],
    ["frobnicate"],
])
def test_usage_errors_exit_2(argv):
    done = run(os.environ, *argv)
    assert (done.returncode, done.stdout) == (2, "")
    assert "error" in done.stderr


@pytest.mark.parametrize("command", ["start", "stop", "status", "list", "hosts", "logs"])
def test_help_has_examples(command):
    done = subprocess.run([*B0PM, command, "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert "examples:" in done.stdout and f"b0-pm {command}" in done.stdout
    assert "exit status:" in done.stdout
