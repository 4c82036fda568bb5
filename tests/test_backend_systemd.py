"""SystemdBackend against a real systemd: the backend runs inside the sandbox
(tests/backend_driver.py), so pids in these tests are the container's."""

import json
import os
import shutil
import signal
import subprocess
import textwrap
import time

import pytest

from tests.backend_driver import DriverClient, DriverError
from tests.fixtures_sandbox import REPO

pytestmark = pytest.mark.systemd

VENV_PYTHON = str(REPO / ".venv" / "bin" / "python")
BOOKWORM_PYTHON = "/usr/bin/python3"   # Debian's python3-pystemd 0.11, what the .deb runs on
DRIVER = str(REPO / "tests" / "backend_driver.py")
USER_CODE_DIR = "/opt/b0pm-usermode"   # inside the container
SHORT_LADDER = [[signal.SIGINT, 0.5], [signal.SIGTERM, 0.5], [signal.SIGKILL, 0.0]]


class SandboxDrivers:
    """Backend drivers inside the sandbox for one test; everything they left is removed after it."""

    def __init__(self, sandbox, instance: str):
        self.sandbox = sandbox
        self.instance = instance
        self.processes = []

    def start(self, python=VENV_PYTHON, **config) -> DriverClient:
        config = {"kind": "systemd", "instance": self.instance, "stop_ladder": SHORT_LADDER, **config}
        process = self.sandbox.popen([python, DRIVER, json.dumps(config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.processes.append(process)
        return DriverClient(process)

    def kill(self, client: DriverClient) -> None:
        """What `kill -9` does to a PM: no close(), no cleanup."""
        self.sandbox.signal_daemon(client.process, signal.SIGKILL)
        client.process.wait(timeout=10)

    def sub_states(self) -> dict[str, str]:
        """Unit name -> SubState (running, exited, failed, ...) of this test's units."""
        result = self.sandbox.exec(["systemctl", "list-units", "--all", "--plain", "--no-legend",
                                    f"b0pm-{self.instance}-*"], check=False)
        return {line.split()[0]: line.split()[3] for line in result.stdout.splitlines() if line.strip()}

    def units(self) -> list[str]:
        return sorted(self.sub_states())

    def show(self, unit: str, *properties) -> dict[str, str]:
        result = self.sandbox.exec(["systemctl", "show", unit, *(f"--property={p}" for p in properties)])
        return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)

    def close(self) -> None:
        for process in self.processes:
            self.sandbox.signal_daemon(process, signal.SIGKILL)
            process.wait(timeout=10)
        pattern = f"b0pm-{self.instance}-*"
        self.sandbox.exec(["systemctl", "kill", "--signal=SIGKILL", pattern], check=False)
        self.sandbox.exec(["systemctl", "stop", pattern], check=False)
        self.sandbox.exec(["systemctl", "reset-failed", pattern], check=False)


@pytest.fixture
def drivers(systemd_sandbox, request):
    instance = "t" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")[:40]
    sandbox_drivers = SandboxDrivers(systemd_sandbox, instance)
    yield sandbox_drivers
    sandbox_drivers.close()


both_pystemds = pytest.mark.parametrize("python", [VENV_PYTHON, BOOKWORM_PYTHON],
                                        ids=["pystemd-venv", "pystemd-0.11"])


def test_start_creates_a_unit_with_the_expected_properties(drivers):
    backend = drivers.start()
    record = backend.call("start", path="/bin/sleep", args=["30"],
                          environment={"B0_HOST_ID": "arm1", "B0_RESOLVER": "tcp://127.0.0.1:22000"})
    assert record["running"] and record["exit_code"] is None
    unit = record["unit"]
    assert unit.startswith(f"b0pm-{drivers.instance}-sleep-") and unit.endswith(".service")
    shown = drivers.show(unit, "Slice", "Type", "ExecStart", "KillMode", "SyslogIdentifier",
                         "Environment", "RemainAfterExit", "MainPID", "ActiveState", "Description")
    assert shown["Slice"] == f"b0pm-{drivers.instance}.slice"
    assert shown["Type"] == "exec"
    assert "path=/bin/sleep ; argv[]=/bin/sleep 30 ;" in shown["ExecStart"]
    assert shown["KillMode"] == "control-group"
    assert shown["SyslogIdentifier"] == "sleep"
    assert shown["Environment"].split() == ["B0_HOST_ID=arm1", "B0_RESOLVER=tcp://127.0.0.1:22000"]
    assert shown["RemainAfterExit"] == "yes"
    assert int(shown["MainPID"]) == record["pid"]
    assert shown["ActiveState"] == "active"
    assert shown["Description"] == f'b0-pm {drivers.instance}: ["/bin/sleep", "30"]'
    assert backend.call("running") == [record["pid"]]
    assert backend.call("status", pid=record["pid"])["running"]


@both_pystemds
def test_exit_codes_and_death_by_signal(drivers, python):
    backend = drivers.start(python)
    # (running, exit_code, signal, core_dumped) expected for each sh -c script
    cases = {("-c", "exit 0"): (False, 0, None, False), ("-c", "exit 3"): (False, 3, None, False),
             ("-c", "sleep 0.2; exit 4"): (False, 4, None, False), ("-c", "exit 255"): (False, 255, None, False),
             ("-c", "kill -USR1 $$"): (False, -signal.SIGUSR1, signal.SIGUSR1, False),
             ("-c", "ulimit -c unlimited; kill -SEGV $$"): (False, -signal.SIGSEGV, signal.SIGSEGV, True)}
    pids = {args: backend.call("start", path="/bin/sh", args=list(args))["pid"] for args in cases}
    for args, expected in cases.items():
        record = backend.call("wait_exit", pid=pids[args], seconds=10)
        outcome = (record["running"], record["exit_code"], record["signal"], record["core_dumped"])
        assert outcome == expected, args
        assert record["ended_at"] >= record["started_at"] > 0
    assert backend.call("running") == []
    assert sorted(r["pid"] for r in backend.call("ended")) == sorted(pids.values())


@both_pystemds
def test_exec_failures_raise_start_error_and_leave_no_unit(drivers, python, systemd_sandbox):
    make_files = """
        printf 'echo\\n' > /var/tmp/not-executable; chmod 644 /var/tmp/not-executable
        printf '#!/nonexistent/interpreter\\n' > /var/tmp/bad-interpreter; chmod 755 /var/tmp/bad-interpreter
    """
    systemd_sandbox.exec(["sh", "-c", make_files])
    backend = drivers.start(python)
    failures = {"/nonexistent/program": "cannot execute /nonexistent/program: no such file or directory",
                "/var/tmp/not-executable":
                    "cannot execute /var/tmp/not-executable: permission denied (not executable)",
                "/var/tmp/bad-interpreter":
                    "cannot execute /var/tmp/bad-interpreter: exec format error or missing interpreter",
                "/etc": "cannot execute /etc: is a directory",
                "bin/sleep": "cannot execute bin/sleep: the path must be absolute"}
    for path, sentence in failures.items():
        with pytest.raises(DriverError) as raised:
            backend.call("start", path=path, args=[])
        assert (raised.value.error, raised.value.message) == ("StartError", sentence)
    with pytest.raises(DriverError, match="cannot run /bin/true as user 'no-such-user'"):
        backend.call("start", path="/bin/true", args=[], user="no-such-user")
    assert drivers.units() == []
    assert backend.call("running") == []


def test_arguments_reach_the_program_verbatim_and_output_is_in_the_journal(drivers, systemd_sandbox):
    backend = drivers.start()
    script = 'echo "out:$1"; echo "err:$2" >&2'
    record = backend.call("start", path="/bin/sh", args=["-c", script, "sh", "$HOME %n", "a  b"])
    assert backend.call("wait_exit", pid=record["pid"], seconds=10)["exit_code"] == 0
    deadline = time.monotonic() + 5
    while True:
        journal = systemd_sandbox.exec(["journalctl", "-u", record["unit"], "-o", "cat", "--no-pager"]).stdout
        if "err:a  b" in journal or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert "out:$HOME %n" in journal and "err:a  b" in journal
    tagged = systemd_sandbox.exec(["journalctl", "-t", "sh", "-o", "cat", "--no-pager"]).stdout
    assert "out:$HOME %n" in tagged


@both_pystemds
def test_the_ladder_kills_a_program_that_ignores_sigint_and_sigterm(drivers, python, systemd_sandbox):
    backend = drivers.start(python)
    marker = "1009" if python == VENV_PYTHON else "1010"
    script = f"trap '' INT TERM; sleep {marker} & while :; do sleep 0.05; done"
    record = backend.call("start", path="/bin/sh", args=["-c", script])
    _wait_until(lambda: marker in _sleepers(systemd_sandbox))   # the traps are set before the `&` job starts
    stopped_at = time.monotonic()
    assert backend.call("stop", pid=record["pid"])["stop_requested"]
    ended = backend.call("wait_exit", pid=record["pid"], seconds=10)
    assert (ended["exit_code"], ended["signal"]) == (-signal.SIGKILL, signal.SIGKILL)
    assert time.monotonic() - stopped_at >= 1.0   # SIGINT, 0.5 s, SIGTERM, 0.5 s, SIGKILL


def test_stop_ends_grandchildren_that_outlive_a_clean_exit(drivers, systemd_sandbox):
    backend = drivers.start(stop_ladder=[[signal.SIGINT, 2.0], [signal.SIGTERM, 0.5], [signal.SIGKILL, 0.0]])
    # the shell exits 0 on SIGINT, which leaves its unit "active (exited)" with the `&` job still
    # in its cgroup; a non-interactive shell starts that job with SIGINT ignored, so only the
    # ladder's next step (SIGTERM to the whole cgroup) ends it, not systemd
    script = "trap 'exit 0' INT; sleep 1001 & while :; do sleep 0.05; done"
    record = backend.call("start", path="/bin/sh", args=["-c", script])
    _wait_until(lambda: "1001" in _sleepers(systemd_sandbox))
    backend.call("stop", pid=record["pid"])
    assert backend.call("wait_exit", pid=record["pid"], seconds=10)["exit_code"] == 0
    assert drivers.sub_states()[record["unit"]] == "exited"
    assert "1001" in _sleepers(systemd_sandbox)   # until the SIGTERM step, 2 s after SIGINT
    backend.call("run", seconds=2.5)
    assert "1001" not in _sleepers(systemd_sandbox)
    assert backend.call("stop", pid=record["pid"])["running"] is False   # stopping an ended pid is fine
    with pytest.raises(DriverError, match="NotManaged"):
        backend.call("stop", pid=999999)


def _wait_until(condition, seconds=5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _sleepers(sandbox) -> list[str]:
    result = sandbox.exec(["pgrep", "-a", "-x", "sleep"], check=False)
    return [line.split()[-1] for line in result.stdout.splitlines()]


def test_a_new_backend_adopts_running_units_and_exit_records_after_a_kill_9(drivers):
    first = drivers.start()
    running = first.call("start", path="/bin/sleep", args=["1003"])
    exited = first.call("start", path="/bin/sh", args=["-c", "exit 7"])
    assert first.call("wait_exit", pid=exited["pid"], seconds=10)["exit_code"] == 7
    drivers.kill(first)

    second = drivers.start()
    adopted = {record["pid"]: record for record in second.call("adopt")}
    assert set(adopted) == {running["pid"], exited["pid"]}
    assert adopted[running["pid"]]["running"] and adopted[running["pid"]]["args"] == ["1003"]
    assert adopted[running["pid"]]["path"] == "/bin/sleep"
    assert (adopted[exited["pid"]]["running"], adopted[exited["pid"]]["exit_code"]) == (False, 7)
    assert second.call("running") == [running["pid"]]
    assert second.call("adopt") == []   # adopting twice finds nothing new
    second.call("stop", pid=running["pid"])
    ended = second.call("wait_exit", pid=running["pid"], seconds=10)
    assert (ended["exit_code"], ended["signal"]) == (-signal.SIGINT, signal.SIGINT)


def test_units_survive_a_daemon_reload_and_are_adopted_with_their_arguments(drivers, systemd_sandbox):
    # Every apt install or upgrade reloads systemd, which re-reads the transient unit files.
    first = drivers.start()
    args = ["-c", "sleep 1021", "sh", "$HOME", "cost: $$5", 'q"x', "b\\s", "new\nline", "%n", "é"]
    running = first.call("start", path="/bin/sh", args=args)
    drivers.kill(first)
    systemd_sandbox.exec(["systemctl", "daemon-reload"])

    assert drivers.sub_states() == {running["unit"]: "running"}
    [adopted] = drivers.start().call("adopt")
    assert (adopted["pid"], adopted["running"]) == (running["pid"], True)
    assert adopted["args"] == args
    shown = drivers.show(running["unit"], "LoadState", "MainPID")
    assert shown == {"LoadState": "loaded", "MainPID": str(running["pid"])}
    cmdline = systemd_sandbox.exec(["cat", f"/proc/{running['pid']}/cmdline"]).stdout
    assert cmdline.split("\0")[1:-1] == args   # and the program got them verbatim


def test_reconciliation_finds_an_exit_whose_signal_never_came(drivers, systemd_sandbox):
    backend = drivers.start(reconcile_interval_s=0.5)
    record = backend.call("start", path="/bin/sleep", args=["1011"])
    backend.call("lose_signals")
    systemd_sandbox.exec(["systemctl", "kill", "--signal=SIGUSR2", record["unit"]])
    ended = backend.call("wait_exit", pid=record["pid"], seconds=3)
    assert (ended["running"], ended["exit_code"]) == (False, -signal.SIGUSR2)
    assert [r["pid"] for r in backend.call("ended")] == [record["pid"]]


def test_an_exit_while_no_pm_runs_is_found_by_adopt(drivers, systemd_sandbox):
    backend = drivers.start()
    record = backend.call("start", path="/bin/sleep", args=["1004"])
    drivers.kill(backend)   # nobody listens while it ends
    systemd_sandbox.exec(["systemctl", "kill", "--signal=SIGTERM", record["unit"]])
    _wait_until(lambda: drivers.sub_states()[record["unit"]] == "exited")   # SIGTERM counts as clean
    successor = drivers.start()
    [adopted] = successor.call("adopt")
    assert (adopted["running"], adopted["exit_code"]) == (False, -signal.SIGTERM)


def test_retention_collects_ended_units(drivers):
    backend = drivers.start(retention_s=1.0)
    failed = backend.call("start", path="/bin/sh", args=["-c", "exit 5"])      # unit ends "failed"
    succeeded = backend.call("start", path="/bin/true", args=[])             # unit stays "active (exited)"
    for record in (failed, succeeded):
        backend.call("wait_exit", pid=record["pid"], seconds=10)
    assert sorted(drivers.units()) == sorted([failed["unit"], succeeded["unit"]])
    backend.call("run", seconds=1.5)
    assert backend.call("status", pid=failed["pid"]) is None
    assert backend.call("status", pid=succeeded["pid"]) is None
    deadline = time.monotonic() + 5
    while drivers.units() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert drivers.units() == []


def test_close_with_stop_all_ends_every_program(drivers):
    backend = drivers.start()
    for seconds in ("1005", "1006"):
        backend.call("start", path="/bin/sleep", args=[seconds])
    backend.call("close", stop_all=True)
    # SIGINT is a clean exit for systemd: the units stay "active (exited)"
    assert sorted(drivers.sub_states().values()) == ["exited", "exited"]


def test_a_start_systemd_refuses_raises_start_error(drivers):
    backend = drivers.start()
    with pytest.raises(DriverError) as raised:
        backend.call("start", path="/bin/true", args=[], environment={"NOT A NAME": "1"})
    assert (raised.value.error, raised.value.message) == (
        "StartError", "systemd refused to start /bin/true: Invalid environment block (Invalid argument)")
    assert drivers.units() == []


def test_a_unit_stopped_by_an_administrator_is_reported_and_later_forgotten(drivers, systemd_sandbox):
    backend = drivers.start(retention_s=1.0)
    record = backend.call("start", path="/bin/sleep", args=["1007"])
    systemd_sandbox.exec(["systemctl", "stop", record["unit"]])   # SIGTERM is clean: the unit is unloaded
    ended = backend.call("wait_exit", pid=record["pid"], seconds=10)
    assert (ended["exit_code"], ended["signal"]) == (-signal.SIGTERM, signal.SIGTERM)
    backend.call("run", seconds=1.5)
    assert backend.call("status", pid=record["pid"]) is None
    assert drivers.units() == []


def test_select_backend_picks_the_system_manager_as_root(systemd_sandbox):
    script = textwrap.dedent("""
        import logging, sys
        sys.path.insert(0, sys.argv[1])
        from b0_pm.backends import select_backend
        logging.basicConfig(level=logging.INFO)
        for prefer in (None, "local"):
            backend = select_backend("sel", prefer)
            print(type(backend).__name__)
            backend.close(False)
    """)
    result = systemd_sandbox.exec([VENV_PYTHON, "-c", script, str(REPO)])
    assert result.stdout.split() == ["SystemdBackend", "LocalBackend"]
    assert "process backend: the systemd system manager\n" in result.stderr


@pytest.fixture(scope="module")
def user_manager(systemd_sandbox):
    """A lingering user with its own systemd --user manager in the sandbox, and a copy of the
    code that user can read (the checkout may sit in a directory only root may enter):
    (uid, gid, code directory inside the container)."""
    code = systemd_sandbox.root / USER_CODE_DIR.lstrip("/")
    shutil.rmtree(code, ignore_errors=True)
    shutil.copytree(REPO / "b0_pm", code / "b0_pm", ignore=shutil.ignore_patterns("__pycache__"))
    (code / "tests").mkdir()
    shutil.copy(DRIVER, code / "tests")
    for directory, _, files in os.walk(code):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)
    systemd_sandbox.exec(["sh", "-c", "id b0pmuser >/dev/null 2>&1 || useradd --create-home b0pmuser"])
    uid, gid = (int(systemd_sandbox.exec(["id", flag, "b0pmuser"]).stdout) for flag in ("-u", "-g"))
    systemd_sandbox.exec(["systemctl", "start", "systemd-logind.service"])
    systemd_sandbox.exec(["loginctl", "enable-linger", "b0pmuser"])
    deadline = time.monotonic() + 20
    while not systemd_sandbox.exec(["test", "-S", f"/run/user/{uid}/bus"], check=False).returncode == 0:
        assert time.monotonic() < deadline, "the user manager of b0pmuser did not start"
        time.sleep(0.1)
    yield uid, gid, USER_CODE_DIR
    systemd_sandbox.exec(["loginctl", "disable-linger", "b0pmuser"], check=False)
    systemd_sandbox.exec(["systemctl", "stop", f"user@{uid}.service"], check=False)   # ends its units too


def test_user_mode_runs_programs_in_the_user_manager(drivers, systemd_sandbox, user_manager):
    uid, gid, code = user_manager
    # Debian's python3 (pystemd 0.11): the venv's interpreter lives under /root, out of a user's reach
    config = {"kind": "systemd-user", "instance": "usermode", "stop_ladder": SHORT_LADDER}
    process = systemd_sandbox.popen(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups",
         BOOKWORM_PYTHON, f"{code}/tests/backend_driver.py", json.dumps(config)],
        env={"XDG_RUNTIME_DIR": f"/run/user/{uid}"}, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    drivers.processes.append(process)
    backend = DriverClient(process)
    quick = backend.call("start", path="/bin/sh", args=["-c", "exit 3"])
    sleeper = backend.call("start", path="/bin/sleep", args=["1008"])
    assert backend.call("wait_exit", pid=quick["pid"], seconds=10)["exit_code"] == 3
    listed = systemd_sandbox.exec(["systemctl", "--user", "-M", "b0pmuser@", "list-units", "--all", "--plain",
                                   "--no-legend", "b0pm-usermode-*"]).stdout
    assert sleeper["unit"] in listed and quick["unit"] in listed
    backend.call("stop", pid=sleeper["pid"])
    assert backend.call("wait_exit", pid=sleeper["pid"], seconds=10)["exit_code"] == -signal.SIGINT


def test_select_backend_picks_the_user_manager_when_not_root(systemd_sandbox, user_manager):
    uid, gid, code = user_manager
    script = textwrap.dedent("""
        import logging, sys
        sys.path.insert(0, sys.argv[1])
        from b0_pm.backends import select_backend
        logging.basicConfig(level=logging.INFO)
        backend = select_backend("sel")
        print(type(backend).__name__, backend.user_mode)
        backend.close(False)
    """)
    result = systemd_sandbox.exec(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups",
                                   BOOKWORM_PYTHON, "-c", script, code],
                                  env={"XDG_RUNTIME_DIR": f"/run/user/{uid}"})
    assert result.stdout.split() == ["SystemdBackend", "True"]
    assert "process backend: the systemd user manager (skipped system: not running as root" in result.stderr


def test_losing_the_bus_raises_backend_lost_and_a_new_backend_takes_over(drivers, systemd_sandbox):
    # last in this module: it restarts the sandbox's D-Bus broker
    first = drivers.start()
    record = first.call("start", path="/bin/sleep", args=["1012"])
    systemd_sandbox.exec(["systemctl", "restart", "dbus.service"])
    with pytest.raises(DriverError) as raised:
        first.call("run", seconds=2)
    assert raised.value.error == "BackendLost"
    second = drivers.start()
    assert [(r["pid"], r["running"]) for r in second.call("adopt")] == [(record["pid"], True)]
    second.call("stop", pid=record["pid"])
    assert second.call("wait_exit", pid=record["pid"], seconds=10)["exit_code"] == -signal.SIGINT
