"""The files that ship around the Python package: unit files, scripts,
bash completion, sysusers file, man page.

Most checks run on the host: `systemd-analyze verify` and `security
--offline` read unit files without a running systemd. The hardening tests
need the sandbox: they run a probe under exactly the [Service] settings of
the shipped units and check that what the daemons need (the system bus for
StartTransientUnit, ZeroMQ over TCP, sd_notify, the Debian Python modules
under MemoryDenyWriteExecute and the syscall filter) still works.
"""

import os
import re
import shutil
import subprocess
import textwrap
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SYSTEMD_DIR = REPO / "systemd"
UNITS = ("b0-pm@.service", "b0-pm-hub.service", "b0-resolver.service")
SCRIPTS = sorted((REPO / "packaging" / "scripts").iterdir())
COMPLETION = REPO / "packaging" / "completion" / "b0-pm"
BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")
SYSUSERS = REPO / "packaging" / "sysusers.d" / "b0-pm.conf"
MAN_PAGE = REPO / "packaging" / "man" / "b0-pm.1"

# Highest acceptable `systemd-analyze security` exposure (0 best, 10 worst).
# The PM must run as root with the network and D-Bus (see its unit file);
# the HUB and resolver are sandboxed down to the network alone.
MAX_EXPOSURE = {"b0-pm@.service": 2.5, "b0-pm-hub.service": 1.5, "b0-resolver.service": 1.5}

# The commands bash completion must offer (the CLI's subcommands).
SUBCOMMANDS = {"resolver", "serve", "hub", "up", "call", "start", "stop", "status", "list",
               "hosts", "logs"}


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def instance_name(unit: str, instance: str = "testhost") -> str:
    return unit.replace("@.", f"@{instance}.")


def copy_units(directory: Path, executable: str) -> list[Path]:
    """The shipped units with /usr/bin/b0-pm replaced by an existing program
    (verify insists the ExecStart binary exists), the template instantiated."""
    copies = []
    for unit in UNITS:
        text = (SYSTEMD_DIR / unit).read_text()
        assert "ExecStart=/usr/bin/b0-pm " in text, unit
        path = directory / instance_name(unit)
        path.write_text(text.replace("/usr/bin/b0-pm ", f"{executable} "))
        copies.append(path)
    return copies


# --- unit files ------------------------------------------------------------------

def test_units_pass_systemd_analyze_verify(tmp_path):
    require_tool("systemd-analyze")
    units = copy_units(tmp_path, "/bin/true")
    # --man=no: the man page is only installed by the package (the sandbox
    # test of the installed package verifies with man pages).
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, units)],
                            capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys or bad values; it only warns. Any output is a finding.
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        f"systemd-analyze verify:\n{result.stdout}{result.stderr}")


def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path):
    """The check above can fail: a typo in a key is reported."""
    require_tool("systemd-analyze")
    unit = copy_units(tmp_path, "/bin/true")[1]
    unit.write_text(unit.read_text().replace("ProtectClock=yes", "ProtectClok=yes"))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                            capture_output=True, text=True, timeout=60)
    assert "ProtectClok" in result.stdout + result.stderr


def exposure(unit_path: Path) -> tuple[float, str]:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit_path)],
        capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, f"no exposure level in:\n{result.stdout}{result.stderr}"
    return float(match.group(1)), result.stdout


@pytest.mark.parametrize("unit", UNITS)
def test_unit_exposure_score(unit, tmp_path, record_property):
    require_tool("systemd-analyze")
    copies = dict(zip(UNITS, copy_units(tmp_path, "/bin/true")))
    score, report = exposure(copies[unit])
    record_property("exposure", score)
    print(f"{unit}: systemd-analyze security exposure {score}")
    assert score <= MAX_EXPOSURE[unit], f"{unit} exposure {score}:\n{report}"


def unit_setting(unit: str, key: str) -> list[str]:
    return re.findall(rf"^{key}=(.*)$", (SYSTEMD_DIR / unit).read_text(), re.M)


def test_process_manager_unit_keeps_what_the_daemon_needs():
    """The settings the design depends on, each of which a well-meant
    hardening edit could break (research notes section 6)."""
    unit = "b0-pm@.service"
    assert unit_setting(unit, "ExecStart") == ["/usr/bin/b0-pm serve --host-id %i"]
    assert unit_setting(unit, "Type") == ["notify"]
    # Children are transient units outside this cgroup: control-group kills only the daemon.
    assert unit_setting(unit, "KillMode") in ([], ["control-group"])
    assert not unit_setting(unit, "User") and not unit_setting(unit, "DynamicUser")
    families = " ".join(unit_setting(unit, "RestrictAddressFamilies")).split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)
    assert not unit_setting(unit, "PrivateNetwork") and not unit_setting(unit, "IPAddressDeny")
    # The resolver may be on another machine: ordered after it, never required.
    assert "b0-resolver.service" in " ".join(unit_setting(unit, "After"))
    assert not unit_setting(unit, "Requires") and not unit_setting(unit, "BindsTo")
    for name in UNITS:
        assert unit_setting(name, "EnvironmentFile") == ["-/etc/default/b0-pm"], name
        assert "man:b0-pm(1)" in unit_setting(name, "Documentation"), name
        assert unit_setting(name, "WantedBy") == ["multi-user.target"], name


# --- scripts, completion, sysusers, man page ------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_posix_sh(script):
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    assert script.read_text().startswith("#!/bin/sh\n")
    result = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if shutil.which("checkbashisms"):
        result = subprocess.run(["checkbashisms", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


# Per script: argument lists that are usage errors, found before any b0 traffic.
BAD_USAGE = {
    "b0-pm-start-process": [[], ["host-only"], ["--hub"]],
    "b0-pm-stop-process": [[], ["host-only"], ["host", "not-a-pid"], ["host", "1", "2"]],
    "b0-pm-query-process": [[], ["host-only"], ["host", "-5"], ["--hub", "host"]],
    "b0-pm-list-processes": [[], ["host", "extra"]],
}


def test_every_script_has_usage_cases():
    assert set(BAD_USAGE) == {script.name for script in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_rejects_bad_usage_with_status_2(script):
    for argv in BAD_USAGE[script.name]:
        result = subprocess.run([str(script), *argv], capture_output=True, text=True, timeout=10)
        assert result.returncode == 2, (argv, result.stdout, result.stderr)
        assert "usage:" in result.stderr


def complete(words: list[str]) -> set[str]:
    """What bash completion offers for the last word of `words`."""
    if not BASH_COMPLETION.exists():
        pytest.skip("bash-completion is not installed")
    script = textwrap.dedent(f"""\
        source {BASH_COMPLETION}
        source {COMPLETION}
        COMP_WORDS=({' '.join(map(repr, words))})
        COMP_CWORD={len(words) - 1}
        COMP_LINE="${{COMP_WORDS[*]}}"
        COMP_POINT=${{#COMP_LINE}}
        _b0_pm b0-pm "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
        printf '%s\\n' "${{COMPREPLY[@]}}"
        """)
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0 and not result.stderr, result.stderr
    return set(result.stdout.split())


def test_completion_file_sources_cleanly():
    result = subprocess.run(["bash", "-n", str(COMPLETION)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if BASH_COMPLETION.exists():
        result = subprocess.run(
            ["bash", "-c", f"source {BASH_COMPLETION}; source {COMPLETION}; complete -p b0-pm"],
            capture_output=True, text=True, timeout=10)
        assert result.returncode == 0 and not result.stderr, result.stderr
        assert "_b0_pm" in result.stdout


def test_completion_offers_subcommands_and_options():
    assert complete(["b0-pm", ""]) == SUBCOMMANDS
    assert complete(["b0-pm", "st"]) == {"start", "stop", "status"}
    assert complete(["b0-pm", "serve", "--"]) >= {"--config", "--host-id", "--daemon", "--pidfile"}
    assert complete(["b0-pm", "stop", "--"]) >= {"--host", "--wait"}
    # After the program path of `start`, words belong to the program: no b0-pm options.
    assert "--json" not in complete(["b0-pm", "start", "/usr/bin/sleep", "--"])


def test_completion_offers_every_option_of_every_command():
    import argparse
    from b0_pm.cli import build_parser
    subparsers = next(action for action in build_parser()._actions
                      if isinstance(action, argparse._SubParsersAction))
    for name, parser in subparsers.choices.items():
        options = {option for action in parser._actions for option in action.option_strings
                   if option.startswith("--")}
        assert complete(["b0-pm", name, "--"]) == options, name


def test_completion_skips_option_values_when_finding_starts_path():
    # --user's value is not the program, so options are still b0-pm's own
    assert "--json" in complete(["b0-pm", "start", "--env", "A=1", "--user", "robot", "--"])
    assert "--json" not in complete(["b0-pm", "start", "--user", "robot", "/usr/bin/sleep", "--"])


def test_sysusers_file_creates_the_program_account(tmp_path):
    require_tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    result = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    entry = next(line for line in passwd.splitlines() if line.startswith("b0-pm-run:"))
    uid, home, shell = entry.split(":")[2], entry.split(":")[5], entry.split(":")[6]
    assert int(uid) < 1000, "a system account"
    assert (home, shell) == ("/nonexistent", "/usr/sbin/nologin")
    assert "b0-pm-run:" in (tmp_path / "etc" / "group").read_text()


def test_man_page_formats_without_warnings():
    require_tool("groff")
    result = subprocess.run(["groff", "-man", "-ww", "-z", str(MAN_PAGE)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and not result.stderr, result.stderr
    text = MAN_PAGE.read_text()
    for command in SUBCOMMANDS:
        assert f"b0-pm {command}" in text.replace("\\-", "-"), command


# --- hardening, under a real systemd -----------------------------------------------

PROBE = r'''
import os, sys, time
import zmq, jsonschema, sdnotify, daemon  # every runtime dependency imports in the sandbox
mode = sys.argv[1]

# ZeroMQ over TCP on loopback, both address families the unit allows.
context = zmq.Context()
for family, address in (("inet", "tcp://127.0.0.1"), ("inet6", "tcp://[::1]")):
    if family == "inet6" and not os.path.exists("/proc/net/if_inet6"):
        continue
    server, client = context.socket(zmq.REP), context.socket(zmq.REQ)
    for s in (server, client):
        s.setsockopt(zmq.IPV6, 1)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 5000)
    port = server.bind_to_random_port(address)
    client.connect(f"{address}:{port}")
    client.send(b"ping"); assert server.recv() == b"ping"
    server.send(b"pong"); assert client.recv() == b"pong"
    server.close(); client.close()
    print(f"probe: zeromq {family} ok", flush=True)

if mode == "pm":
    # What the PM does on the system bus: a transient service, then its state.
    from pystemd.systemd1 import Manager, Unit
    name = f"b0pm-probe-child-{os.getpid()}.service".encode()
    with Manager() as manager:
        manager.Manager.StartTransientUnit(name, b"fail", {
            b"ExecStart": [(b"/bin/true", [b"/bin/true"], False)],
            b"Type": b"exec", b"RemainAfterExit": True})
        deadline = time.monotonic() + 10
        with Unit(name) as unit:
            while unit.Unit.ActiveState != b"active" and time.monotonic() < deadline:
                time.sleep(0.05)
            state, status = unit.Unit.ActiveState, unit.Service.ExecMainStatus
        manager.Manager.StopUnit(name, b"replace")
    assert (state, status) == (b"active", 0), (state, status)
    print("probe: StartTransientUnit ok", flush=True)
    # get_log: the PM reads its programs' output back from the journal.
    import subprocess
    journal = subprocess.run(["journalctl", "--no-pager", "-o", "cat", "-u", name.decode()],
                             capture_output=True, text=True, timeout=30)
    assert journal.returncode == 0 and "Started" in journal.stdout, journal
    print("probe: journal readable", flush=True)

sdnotify.SystemdNotifier().notify("READY=1")
print("probe: ok", flush=True)
'''


def probe_unit(source_unit: str, probe_path: str, mode: str) -> str:
    """source_unit with the daemon replaced by the probe; everything else as shipped."""
    text = (SYSTEMD_DIR / source_unit).read_text()
    text = re.sub(r"^ExecStart=.*$", f"ExecStart=/usr/bin/python3 {probe_path} {mode}", text, flags=re.M)
    text = re.sub(r"^(Restart|WatchdogSec)=.*$", "", text, flags=re.M)  # one clean run
    return text.split("[Install]")[0]


def run_probe(sandbox, unit_text_of, source_unit: str, mode: str):
    """Starts the probe under source_unit's settings (after unit_text_of edits
    them); returns (systemctl start result, Result=, journal)."""
    tag = uuid.uuid4().hex[:8]
    probe_dir = f"/var/lib/b0pm-probe-{tag}"
    probe_path = f"{probe_dir}/probe.py"
    unit = f"b0pm-probe-{tag}@probehost.service" if "@" in source_unit else f"b0pm-probe-{tag}.service"
    unit_file = f"/run/systemd/system/{unit.replace('@probehost', '@')}"
    try:
        sandbox.exec(["mkdir", "-p", probe_dir])
        sandbox.exec(["sh", "-c", f"cat > {probe_path}"], input=PROBE)
        # world-readable: the HUB/resolver probes run as a DynamicUser
        sandbox.exec(["chmod", "0755", probe_dir])
        sandbox.exec(["chmod", "0644", probe_path])
        sandbox.exec(["sh", "-c", f"cat > {unit_file}"],
                     input=unit_text_of(probe_unit(source_unit, probe_path, mode)))
        sandbox.exec(["systemctl", "daemon-reload"])
        # --wait: until the probe has run to its end, whatever the unit's Type=
        start = sandbox.exec(["systemctl", "start", "--wait", unit], check=False, timeout=60)
        result = sandbox.exec(["systemctl", "show", "-P", "Result", unit]).stdout.strip()
        journal = sandbox.exec(["journalctl", "--no-pager", "-o", "cat", "-u", unit],
                               check=False).stdout
        return start, result, journal
    finally:
        sandbox.exec(["systemctl", "stop", unit], check=False)
        sandbox.exec(["rm", "-rf", unit_file, probe_dir], check=False)
        sandbox.exec(["systemctl", "daemon-reload"], check=False)
        sandbox.exec(["systemctl", "reset-failed"], check=False)


@pytest.mark.systemd
@pytest.mark.parametrize("source_unit,mode", [("b0-pm@.service", "pm"),
                                              ("b0-pm-hub.service", "net"),
                                              ("b0-resolver.service", "net")])
def test_hardening_keeps_dbus_and_zeromq_working(systemd_sandbox, source_unit, mode):
    start, result, journal = run_probe(systemd_sandbox, lambda text: text, source_unit, mode)
    assert start.returncode == 0, f"{start.stderr}\n{journal}"
    assert result == "success", journal
    assert "probe: ok" in journal and "probe: zeromq inet ok" in journal, journal
    if mode == "pm":
        assert "probe: StartTransientUnit ok" in journal, journal
        assert "probe: journal readable" in journal, journal


@pytest.mark.systemd
def test_hardening_probe_notices_a_unit_without_dbus(systemd_sandbox):
    """The probe can fail: without AF_UNIX the PM's D-Bus call is refused."""
    def without_af_unix(text):
        return text.replace("RestrictAddressFamilies=AF_UNIX ", "RestrictAddressFamilies=")
    start, result, journal = run_probe(systemd_sandbox, without_af_unix, "b0-pm@.service", "pm")
    assert start.returncode != 0 and result != "success", journal
    assert "probe: StartTransientUnit ok" not in journal
