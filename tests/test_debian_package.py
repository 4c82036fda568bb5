"""End to end: the .deb, built from this tree, installed and run the way an
administrator would, inside a throw-away systemd container.

    apt install ./b0-process-manager_*.deb
    systemctl enable --now b0-resolver b0-pm@$(hostname) b0-pm-hub
    b0-pm start|status|stop|list (directly and through the HUB with --host)
    journalctl -u b0-pm@$(hostname)
    systemctl restart b0-pm@$(hostname)   -> programs keep running, still managed
    apt install --reinstall (an upgrade)  -> the same
    apt remove                            -> the daemons stop

The package changes the container's /usr and /etc, so this module boots its
own container instead of the shared session sandbox. The container shares
the host's network namespace: the resolver listens on a free port of its
own (set in /etc/default/b0-pm), never on 22000, so it cannot meet another
test's resolver.

The tests run in file order and build on each other (install, then run,
then restart, upgrade, remove), like the steps above.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.fixtures_sandbox import REPO, boot_sandbox, sandbox_unavailable_reason

PACKAGE = "b0-process-manager"
UNITS_ALWAYS = ("b0-resolver.service", "b0-pm-hub.service")
TEST_DIR = "/opt/b0pm-test"          # allowed in the test's /etc/b0-pm/b0-pm.toml
TALKER = f"{TEST_DIR}/talker"
TALKER_SCRIPT = """#!/bin/sh
# Prints a marker (for the journal check) and runs until SIGINT.
echo "b0pm-e2e talker started: $*"
trap 'echo "b0pm-e2e talker got SIGINT"; exit 0' INT
while :; do sleep 1; done
"""
WAIT_S = 30
# Highest acceptable `systemd-analyze security` exposure of the loaded units
# (same ceilings as tests/test_packaging.py's offline check).
MAX_EXPOSURE = {"b0-pm@": 2.5, "b0-pm-hub": 1.5, "b0-resolver": 1.5}


def need(tools):
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        reason = f"needs {', '.join(missing)} (scripts/bootstrap --dev)"
        if os.environ.get("B0PM_REQUIRE_SANDBOX") == "1":
            pytest.fail(f"B0PM_REQUIRE_SANDBOX=1 but this test {reason}")
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- the package -------------------------------------------------------------------

@pytest.fixture(scope="module")
def deb_dir():
    """packaging/build-deb's output: the .deb, .changes, .buildinfo, build.log."""
    need(["dpkg-buildpackage", "dh", "fakeroot"])
    out = Path(tempfile.mkdtemp(prefix="b0pm-deb-", dir="/var/tmp"))
    try:
        result = subprocess.run([str(REPO / "packaging" / "build-deb"), str(out)],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"build-deb failed:\n{result.stdout}{result.stderr}"
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


def the_deb(deb_dir: Path) -> Path:
    (deb,) = deb_dir.glob(f"{PACKAGE}_*_all.deb")
    return deb


def test_package_is_lintian_clean(deb_dir):
    need(["lintian"])
    (changes,) = deb_dir.glob(f"{PACKAGE}_*.changes")
    result = subprocess.run(["lintian", "-I", "--pedantic", "--fail-on", "none", str(changes)],
                            capture_output=True, text=True, timeout=600)
    # Every tag of every level is a finding; justified exceptions live in
    # debian/b0-process-manager.lintian-overrides, each with its reason.
    tags = [line for line in result.stdout.splitlines() if re.match(r"^[EWIPX]: ", line)]
    assert not tags, "\n".join(tags)


def deb_paths(deb: Path) -> set[str]:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout
    return {line.split()[5].lstrip(".") for line in listing.splitlines()}


def test_package_contents(deb_dir):
    deb = the_deb(deb_dir)
    paths = deb_paths(deb)
    for path in ("/usr/bin/b0-pm",
                 "/lib/systemd/system/b0-pm@.service",
                 "/lib/systemd/system/b0-pm-hub.service",
                 "/lib/systemd/system/b0-resolver.service",
                 "/etc/b0-pm/b0-pm.toml",
                 "/etc/default/b0-pm",
                 "/usr/lib/sysusers.d/b0-pm.conf",
                 "/usr/share/bash-completion/completions/b0-pm",
                 "/usr/share/man/man1/b0-pm.1.gz",
                 "/usr/share/doc/b0-process-manager/README.md",
                 "/usr/lib/b0-process-manager/scripts/b0-pm-start-process",
                 "/usr/lib/python3/dist-packages/b0_pm/cli.py"):
        assert path in paths, f"{path} missing from {deb.name}"
    conffiles = subprocess.run(["sh", "-c", f"dpkg-deb --ctrl-tarfile {deb} | tar -xO ./conffiles"],
                               capture_output=True, text=True, check=True).stdout.split()
    assert sorted(conffiles) == ["/etc/b0-pm/b0-pm.toml", "/etc/default/b0-pm"]
    depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True,
                             text=True, check=True).stdout
    for package in ("python3-zmq", "python3-pystemd", "python3-sdnotify", "python3-daemon",
                    "python3-jsonschema", "systemd"):
        assert re.search(rf"(^|, ){package}( |,|$)", depends), f"{package} not in Depends: {depends}"


# --- the container ------------------------------------------------------------------

class Machine:
    """The package sandbox with the b0 settings the tests use."""

    def __init__(self, sandbox, port: int):
        self.sandbox = sandbox
        self.port = port
        self.host = sandbox.exec(["hostname"]).stdout.strip()
        self.pm_unit = f"b0-pm@{self.host}.service"
        self.units = ("b0-resolver.service", self.pm_unit, "b0-pm-hub.service")
        # what an administrator's shell would have after editing /etc/default/b0-pm
        self.env = {"B0_RESOLVER": f"tcp://localhost:{port}"}

    def run(self, argv, check=True, timeout=60, input=None):
        result = self.sandbox.exec(argv, env=self.env, check=False, timeout=timeout, input=input)
        if check and result.returncode != 0:
            self.fail(f"{' '.join(map(str, argv))} exited {result.returncode}:\n"
                      f"{result.stdout}{result.stderr}")
        return result

    def b0pm(self, *args, check=True, timeout=60):
        return self.run(["b0-pm", *args], check=check, timeout=timeout)

    def journal(self, *units, lines=80) -> str:
        units = units or self.units
        argv = ["journalctl", "--no-pager", "-n", str(lines)] + [f"-u{u}" for u in units]
        return self.sandbox.exec(argv, check=False).stdout

    def fail(self, message: str):
        status = self.sandbox.exec(["systemctl", "status", "--no-pager", "-n", "0", *self.units],
                                   check=False).stdout
        pytest.fail(f"{message}\n--- systemctl status ---\n{status}\n"
                    f"--- journal ---\n{self.journal(lines=400)}")

    def wait_for(self, what: str, predicate, timeout=WAIT_S):
        """Polls predicate() until it returns something true; fails with the journal."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.25)
        self.fail(f"timed out after {timeout} s waiting for {what}")

    def is_active(self, unit) -> bool:
        return self.run(["systemctl", "is-active", unit], check=False).stdout.strip() == "active"

    def program_running(self, unit) -> bool:
        # not is-active: the PM may keep a program's unit (RemainAfterExit) after
        # it ended, so that its exit status stays queryable
        return self.run(["systemctl", "show", "-P", "SubState", unit]).stdout.strip() == "running"

    def main_pid(self, unit) -> int:
        return int(self.run(["systemctl", "show", "-P", "MainPID", unit]).stdout.strip())

    def unit_of(self, pid: int) -> str:
        """The systemd unit a managed program runs in."""
        out = self.run(["systemctl", "status", "--no-pager", "-n", "0", str(pid)]).stdout
        match = re.search(r"^\S*\s*(\S+\.service)\b", out, re.M)
        assert match, out
        return match.group(1)

    def start_talker(self, *args, host=None) -> int:
        argv = ["start", *(["--host", host] if host else []), TALKER, *args]
        out = self.b0pm(*argv).stdout.strip()
        assert out.isdigit(), f"b0-pm start printed {out!r}"
        return int(out)

    def listed(self, pid: int, host=None) -> bool:
        out = self.b0pm("list", *(["--host", host] if host else []), check=False).stdout
        return str(pid) in out.split()


@pytest.fixture(scope="module")
def installed(deb_dir):
    """A container with the package installed by apt."""
    require_sandbox()
    sandbox = boot_sandbox(binds=())  # nothing of the checkout: only the .deb goes in
    try:
        machine = Machine(sandbox, free_port())
        install(machine, the_deb(deb_dir))
        yield machine
    finally:
        sandbox.close()


def require_sandbox():
    reason = sandbox_unavailable_reason()
    if reason is not None:
        if os.environ.get("B0PM_REQUIRE_SANDBOX") == "1":
            pytest.fail(f"B0PM_REQUIRE_SANDBOX=1 but {reason}")
        pytest.skip(reason)


def install(machine: "Machine", deb: Path):
    shutil.copy(deb, machine.sandbox.root / "var" / "tmp" / deb.name)
    # The VM image carries Docker's policy-rc.d ("exit 101": no service may
    # be started or stopped by maintainer scripts). A real system has none,
    # and with it the removal test could not see the package stop its units.
    machine.run(["rm", "-f", "/usr/sbin/policy-rc.d"])
    # apt, not dpkg -i: it resolves Depends (all present in the image, so offline).
    machine.run(["sh", "-c", f"cd /var/tmp && DEBIAN_FRONTEND=noninteractive "
                             f"apt-get install -y ./{deb.name}"], timeout=300)


@pytest.mark.systemd
def test_install_enables_and_starts_nothing(installed):
    m = installed
    for unit in (*UNITS_ALWAYS, m.pm_unit):
        assert not m.is_active(unit), f"{unit} was started by the installation"
        enabled = m.run(["systemctl", "is-enabled", unit], check=False).stdout.strip()
        assert enabled == "disabled", f"{unit} is {enabled} after installation"
    passwd = m.run(["getent", "passwd", "b0-pm-run"], check=False).stdout
    assert passwd.startswith("b0-pm-run:"), "the sysusers account was not created"
    assert m.b0pm("--version").stdout.startswith("b0-pm ")


@pytest.mark.systemd
def test_installed_units_verify_and_score(installed, record_property):
    m = installed
    # Installed, the man page exists, so verify also checks Documentation=man:.
    result = m.run(["systemd-analyze", "verify", *m.units], check=False)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr)
    for unit in m.units:
        out = m.run(["systemd-analyze", "security", "--no-pager", unit]).stdout
        score = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out).group(1))
        record_property(f"exposure {unit}", score)
        print(f"{unit}: systemd-analyze security exposure {score} (in the sandbox)")
        ceiling = next(v for k, v in MAX_EXPOSURE.items() if unit.startswith(k))
        assert score <= ceiling, out


def configure(m: Machine):
    """What the administrator edits: a private resolver port, an allowed directory."""
    default = m.sandbox.root / "etc" / "default" / "b0-pm"
    default.write_text(default.read_text() +
                       f"B0_RESOLVER=tcp://localhost:{m.port}\nB0_RESOLVER_PORT={m.port}\n")
    config = m.sandbox.root / "etc" / "b0-pm" / "b0-pm.toml"
    text, count = re.subn(r"^allowed_directories = \[\]$",
                          f'allowed_directories = ["/usr/bin", "{TEST_DIR}"]',
                          config.read_text(), flags=re.M)
    assert count == 1, "the shipped b0-pm.toml has no 'allowed_directories = []' line to edit"
    config.write_text(text)
    m.run(["mkdir", "-p", TEST_DIR])
    m.run(["sh", "-c", f"cat > {TALKER} && chmod 0755 {TALKER}"], input=TALKER_SCRIPT)


@pytest.fixture(scope="module")
def running(installed):
    m = installed
    configure(m)
    m.run(["systemctl", "enable", "--now", *m.units], check=False)  # failures show below
    for unit in m.units:
        m.wait_for(f"{unit} to become active", lambda: m.is_active(unit))
    # The PM is usable once it answers (READY=1 came after registering its service).
    m.wait_for("the process manager to answer", lambda: m.b0pm("list", check=False).returncode == 0)
    return m


@pytest.mark.systemd
def test_units_become_active_and_report_status(running):
    m = running
    status = m.run(["systemctl", "show", "-P", "StatusText", m.pm_unit]).stdout.strip()
    assert status, "the process manager sent no STATUS= text"


@pytest.mark.systemd
def test_start_status_stop_list_on_this_host(running):
    m = running
    pid = m.start_talker("direct")
    assert m.listed(pid)
    assert "running" in m.b0pm("status", str(pid)).stdout
    unit = m.unit_of(pid)
    assert unit != m.pm_unit, "the program runs inside the PM's own unit"
    # the program's own unit log has its output, and it runs as the sysusers account
    m.wait_for("the talker's output in its unit's journal",
               lambda: "b0pm-e2e talker started: direct" in m.journal(unit))
    user = m.run(["systemctl", "show", "-P", "User", unit]).stdout.strip()
    assert user == "b0-pm-run", f"the program runs as {user!r}"
    m.b0pm("stop", "--wait", str(pid))
    assert not m.listed(pid)
    assert "running" not in m.b0pm("status", str(pid), check=False).stdout
    m.wait_for("the talker's SIGINT handler in the journal",
               lambda: "b0pm-e2e talker got SIGINT" in m.journal(unit))
    # the PM logs the requests it served
    journal = m.journal(m.pm_unit, lines=500)
    assert TALKER in journal, f"no request for {TALKER} in the PM's journal:\n{journal}"


@pytest.mark.systemd
def test_refused_start_exits_1(running):
    m = running
    # /usr/sbin is not allowed (nor /bin: merged /usr makes it /usr/bin, which is)
    result = m.b0pm("start", "/usr/sbin/nologin", check=False)
    assert result.returncode == 1, result.stdout + result.stderr


@pytest.mark.systemd
def test_start_status_stop_list_through_the_hub(running):
    m = running
    m.wait_for("the HUB to hear this host's beacon",
               lambda: m.host in m.b0pm("hosts", check=False).stdout.split())
    pid = m.start_talker("via-hub", host=m.host)
    assert m.listed(pid, host=m.host)
    assert "running" in m.b0pm("status", "--host", m.host, str(pid)).stdout
    assert m.host in m.b0pm("list", "--host", "*").stdout
    m.b0pm("stop", "--host", m.host, "--wait", str(pid))
    assert not m.listed(pid, host=m.host)


SCRIPTS = "/usr/lib/b0-process-manager/scripts"


@pytest.mark.systemd
@pytest.mark.parametrize("via_hub", [False, True], ids=["direct", "hub"])
def test_bluezero_scripts_print_the_json_replies(running, via_hub):
    """The four scripts of the original, on top of `b0-pm call`."""
    m = running
    hub = ["--hub"] if via_hub else []
    if via_hub:
        m.wait_for("the HUB to hear this host's beacon",
                   lambda: m.host in m.b0pm("hosts", check=False).stdout.split())

    def script(name, *args):
        out = m.run([f"{SCRIPTS}/b0-pm-{name}", *hub, m.host, *map(str, args)]).stdout
        reply = json.loads(out)  # one JSON object, nothing else
        if via_hub:
            assert reply.pop("success") is True, out  # the HUB's wrapper
        return reply

    started = script("start-process", TALKER, "from a script")["start_process"]
    assert started["success"] is True and started["pid"] > 0, started
    pid = started["pid"]
    assert script("query-process", pid) == {"query_process_status": {"success": True, "running": True}}
    assert pid in script("list-processes")["list_active_processes"]["pids"]
    assert script("stop-process", pid) == {"stop_process": {"success": True}}
    m.wait_for("the program to end", lambda: pid not in script("list-processes")[
        "list_active_processes"]["pids"])


def restart_keeps_programs(m: Machine, restart):
    pid = m.start_talker("survivor")
    unit = m.unit_of(pid)
    old_main = m.main_pid(m.pm_unit)
    restart()
    load_state = m.run(["systemctl", "show", "-P", "LoadState", unit]).stdout.strip()
    if load_state != "loaded":
        # e.g. a property that systemd writes to /run/systemd/transient but cannot read back
        why = m.run(["sh", "-c", f"journalctl --no-pager -b -o cat | grep -F {unit}; "
                                 f"cat /run/systemd/transient/{unit}"], check=False).stdout
        pytest.fail(f"the program's unit {unit} is {load_state} after the PM's restart:\n{why}")
    m.wait_for("the PM to run again", lambda: m.is_active(m.pm_unit) and m.main_pid(m.pm_unit) != old_main)
    assert m.program_running(unit), f"{unit} did not survive the PM's restart"
    # still managed: the new PM adopted it, lists it and can stop it
    m.wait_for("the restarted PM to list the program", lambda: m.listed(pid))
    assert "running" in m.b0pm("status", str(pid)).stdout
    m.b0pm("stop", "--wait", str(pid))
    assert not m.program_running(unit)


@pytest.mark.systemd
def test_restart_leaves_programs_running_and_managed(running):
    restart_keeps_programs(running, lambda: running.run(["systemctl", "restart", running.pm_unit]))


@pytest.mark.systemd
def test_daemon_reload_then_restart_leaves_programs_managed(running):
    """Any package installation reloads systemd; the programs' transient
    units must survive that intact, or the next PM cannot adopt them."""
    m = running

    def reload_and_restart():
        m.run(["systemctl", "daemon-reload"])
        m.run(["systemctl", "restart", m.pm_unit])

    restart_keeps_programs(m, reload_and_restart)


@pytest.mark.systemd
def test_upgrade_restarts_the_pm_and_leaves_programs_running(running, deb_dir):
    m = running
    deb = the_deb(deb_dir).name
    # --reinstall runs the maintainer scripts as an upgrade does (postinst configure OLD-VERSION)
    restart_keeps_programs(m, lambda: m.run(
        ["sh", "-c", f"cd /var/tmp && DEBIAN_FRONTEND=noninteractive "
                     f"apt-get install -y --reinstall -o Dpkg::Options::=--force-confold ./{deb}"],
        timeout=300))
    for unit in UNITS_ALWAYS:
        assert m.is_active(unit), f"{unit} is not running after the upgrade"


@pytest.mark.systemd
def test_remove_stops_the_daemons(running):
    m = running
    pid = m.start_talker("left-behind")
    program_unit = m.unit_of(pid)
    m.run(["sh", "-c", "DEBIAN_FRONTEND=noninteractive apt-get remove -y " + PACKAGE], timeout=300)
    for unit in m.units:
        state = m.run(["systemctl", "show", "-P", "ActiveState", unit]).stdout.strip()
        assert state in ("inactive", "failed"), f"{unit} is {state} after apt remove"
    daemons = m.run(["pgrep", "-af", "b0-pm (serve|hub|resolver)"], check=False).stdout
    assert not daemons, f"daemons still running after apt remove:\n{daemons}"
    # The programs are the user's: removal does not kill them (they are
    # units of PID 1); the administrator stops them with systemctl.
    assert m.program_running(program_unit)
    m.run(["systemctl", "stop", program_unit])


@pytest.mark.systemd
def test_purge_forgets_enablement_and_state(running):
    m = running
    m.run(["sh", "-c", "DEBIAN_FRONTEND=noninteractive apt-get purge -y " + PACKAGE], timeout=300)
    links = m.run(["sh", "-c", "ls /etc/systemd/system/*.wants/ | grep -E '^b0-(pm|resolver)' || true"]).stdout
    assert not links.strip(), f"enablement links left after purge:\n{links}"
    assert not (m.sandbox.root / "etc" / "b0-pm").exists()
    assert not (m.sandbox.root / "var" / "lib" / "b0-pm").exists()


@pytest.mark.systemd
def test_autopkgtest_smoke_passes(deb_dir):
    """debian/tests/smoke, as autopkgtest runs it on a throw-away machine:
    as root, after installing the package, in a fresh container."""
    require_sandbox()
    sandbox = boot_sandbox(binds=())
    try:
        m = Machine(sandbox, free_port())
        install(m, the_deb(deb_dir))
        # the one deviation: a private resolver port, for the shared network namespace
        default = sandbox.root / "etc" / "default" / "b0-pm"
        default.write_text(default.read_text() + f"B0_RESOLVER_PORT={m.port}\n"
                                                 f"B0_RESOLVER=tcp://localhost:{m.port}\n")
        smoke = (REPO / "debian" / "tests" / "smoke").read_text()
        m.run(["sh", "-c", "cat > /var/tmp/smoke && chmod 0755 /var/tmp/smoke"], input=smoke)
        result = m.run(["/var/tmp/smoke"], check=False, timeout=400)
        if result.returncode != 0 or "smoke: ok" not in result.stdout:
            m.fail(f"debian/tests/smoke exited {result.returncode}:\n{result.stdout}{result.stderr}")
    finally:
        sandbox.close()
