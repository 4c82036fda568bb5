"""The start policy end to end: a real `b0-pm serve` (local backend, as root)
and a real resolver, attacked over its real control socket.

tests/test_policy.py covers StartPolicy alone; here every attempt goes
through the envelope, JSON, schema, policy and backend layers of a running
PM. Each attempt must be refused with a reason that names the problem, and
nothing may start: the program every attempt aims at would leave a marker
file if it ever ran, and the PM lists no new process. A positive control
for each family shows the test can fail (the same machinery does start the
allowed program, as the allowed user, with an allowed variable).
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.fixtures_b0 import start_resolver
from tests.test_pm_support import Control, PMProcess, pm_environment, python_executable, resolve, serve_argv

HOST_ID = "127.0.0.1"
SERVICE = f"process_manager@{HOST_ID}/control"
ALLOWED_USER = "nobody"

# writes "<name> uid=<uid> <environment>" to the marker directory, then exits
MARKING_PROGRAM = """#!/bin/sh
{{ echo "uid=$(id -u)"; env; }} > "{markers}/{name}.$$"
"""


@pytest.fixture(scope="module")
def site():
    """allowed/ is the PM's allowed directory; everything else is what an attacker aims at.

    Not under pytest's tmp_path: /tmp/pytest-of-root is 0700, and the allowed user must reach it."""
    root = Path(tempfile.mkdtemp(prefix="b0pm-security-"))
    try:
        yield make_site(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def make_site(root: Path) -> dict:
    root.chmod(0o755)
    markers = root / "markers"
    markers.mkdir()
    markers.chmod(0o777)   # the program may run as nobody
    allowed, sibling, outside = root / "allowed", root / "allowed_x", root / "outside"
    for directory in (allowed, sibling, outside, allowed / "sub"):
        directory.mkdir()
        directory.chmod(0o755)

    def program(path, name, mode=0o755):
        path.write_text(MARKING_PROGRAM.format(markers=markers, name=name))
        path.chmod(mode)

    program(allowed / "ok", "allowed")
    program(allowed / "plain", "plain", mode=0o644)
    program(sibling / "ok", "sibling")
    program(outside / "ok", "outside")
    (allowed / "link_out").symlink_to(outside / "ok")
    (allowed / "dir_link").symlink_to(outside)
    (allowed / "link_in").symlink_to(allowed / "ok")
    return {"root": root, "allowed": allowed, "markers": markers}


@pytest.fixture(scope="module")
def pm(site, tmp_path_factory):
    resolver = start_resolver()
    workdir = tmp_path_factory.mktemp("pm")
    config = workdir / "b0-pm.toml"
    config.write_text("")
    argv = serve_argv(python_executable(), str(config), "--backend", "local", "--host-id", HOST_ID,
                      "--allowed-directory", str(site["allowed"]), "--allowed-user", ALLOWED_USER)
    process = PMProcess(argv, pm_environment(resolver.env), workdir / "pm.log")
    control = None
    try:
        control = Control(resolve(resolver.address, SERVICE), SERVICE)
        yield control
    finally:
        if control is not None:
            control.close()
        process.kill()
        resolver.stop()
        print(process.log()[-4000:])


def markers(site) -> list[str]:
    return sorted(os.listdir(site["markers"]))


def wait_for_marker(site, prefix: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [name for name in markers(site) if name.startswith(prefix + ".")]
        if found and (site["markers"] / found[0]).read_text().strip():
            time.sleep(0.05)   # the program may still be writing
            return (site["markers"] / found[0]).read_text()
        time.sleep(0.02)
    raise AssertionError(f"no marker {prefix} within {timeout} s: {markers(site)}")


def clear_markers(site) -> None:
    for name in markers(site):
        (site["markers"] / name).unlink()


def assert_refused(pm, site, request_body: dict, *reason_parts: str) -> str:
    """The start is refused with a reason containing every part, and nothing runs."""
    clear_markers(site)
    before = pm.pids()
    reply = pm.call({"start_process": request_body})["start_process"]
    assert reply["success"] is False and "pid" not in reply, reply
    for part in reason_parts:
        assert part in reply["error_message"], reply["error_message"]
    time.sleep(0.2)   # long enough for a started shell script to leave its marker
    assert markers(site) == [], f"something ran: {markers(site)}"
    assert pm.pids() == before
    return reply["error_message"]


def start(path: str, **extra) -> dict:
    return {"path": path, "args": [], **extra}


# --- the path ------------------------------------------------------------------------

def test_positive_control_the_allowed_program_runs(pm, site):
    clear_markers(site)
    reply = pm.call({"start_process": start(str(site["allowed"] / "ok"))})["start_process"]
    assert reply["success"] is True, reply
    assert "uid=0" in wait_for_marker(site, "allowed")
    clear_markers(site)
    # a symlink that stays inside is fine, and runs its target
    assert pm.call({"start_process": start(str(site["allowed"] / "link_in"))})["start_process"]["success"]
    wait_for_marker(site, "allowed")
    clear_markers(site)


@pytest.mark.parametrize("relative, parts", [
    ("allowed_x/ok", ("is not inside an allowed directory",)),            # shares the prefix (Appendix F)
    ("allowed/../outside/ok", ("is not inside an allowed directory", "resolves to")),
    ("allowed/../allowed_x/ok", ("is not inside an allowed directory", "resolves to")),
    ("allowed/link_out", ("is not inside an allowed directory", "resolves to")),
    ("allowed/dir_link/ok", ("is not inside an allowed directory", "resolves to")),
    ("allowed/./../outside/ok", ("is not inside an allowed directory",)),
    ("allowed/sub", ("is not a regular file",)),
    ("allowed", ("is not a regular file",)),
    ("allowed/", ("is not a regular file",)),
    ("allowed/ok/..", ("is not a regular file",)),
    ("allowed/plain", ("is not executable",)),
    ("allowed/missing", ("no such file",)),
])
def test_paths_out_of_the_allowed_tree_are_refused(pm, site, relative, parts):
    assert_refused(pm, site, start(f"{site['root']}/{relative}"), *parts)


@pytest.mark.parametrize("path, parts", [
    ("ok", ("the path must be absolute",)),
    ("allowed/ok", ("the path must be absolute",)),
    ("./allowed/ok", ("the path must be absolute",)),
    ("~/ok", ("the path must be absolute",)),
    ("", ("start_process.path",)),
])
def test_relative_paths_are_refused(pm, site, path, parts):
    assert_refused(pm, site, start(path), *parts)


def test_nul_in_the_path_is_refused(pm, site):
    # the C string would end at the NUL: allowed/ok\0/../../outside/ok must not become allowed/ok, or worse
    assert_refused(pm, site, start(f"{site['allowed']}/ok\0/../../outside/ok"), "start_process.path", "NUL")
    assert_refused(pm, site, start(f"{site['root']}/outside/ok\0{site['allowed']}/ok"), "NUL")


def test_system_programs_are_refused(pm, site):
    for path in ("/bin/sh", "/usr/bin/env", "/proc/self/exe"):
        assert_refused(pm, site, start(path), "permission denied", "is not inside an allowed directory")


# --- the user ----------------------------------------------------------------------------

def test_positive_control_an_allowed_user(pm, site):
    clear_markers(site)
    reply = pm.call({"start_process": start(str(site["allowed"] / "ok"), user=ALLOWED_USER)})["start_process"]
    assert reply["success"] is True, reply
    assert f"uid={pwd.getpwnam(ALLOWED_USER).pw_uid}" in wait_for_marker(site, "allowed")
    clear_markers(site)


@pytest.mark.parametrize("user, parts", [
    ("root", ("user 'root' is not allowed",)),
    ("daemon", ("user 'daemon' is not allowed",)),
    ("0", ("user '0' is not allowed",)),
    ("no-such-user", ("is not allowed",)),
    (f"{ALLOWED_USER}\0root", ("start_process.user",)),
    ("", ("start_process.user",)),
])
def test_users_not_allowed_are_refused(pm, site, user, parts):
    assert_refused(pm, site, start(str(site["allowed"] / "ok"), user=user), *parts)


# --- the environment --------------------------------------------------------------------

def test_positive_control_an_ordinary_variable_reaches_the_program(pm, site):
    clear_markers(site)
    reply = pm.call({"start_process": start(str(site["allowed"] / "ok"),
                                            environment={"GREETING": "hello"})})["start_process"]
    assert reply["success"] is True, reply
    assert "GREETING=hello" in wait_for_marker(site, "allowed")
    clear_markers(site)


@pytest.mark.parametrize("name, value, parts", [
    ("LD_PRELOAD", "/tmp/evil.so", ("LD_PRELOAD is not allowed", "dynamic loader")),
    ("LD_LIBRARY_PATH", "/tmp", ("LD_LIBRARY_PATH is not allowed",)),
    ("LD_AUDIT", "/tmp/evil.so", ("LD_AUDIT is not allowed",)),
    ("GLIBC_TUNABLES", "glibc.malloc.check=3", ("GLIBC_TUNABLES is not allowed",)),
    ("BASH_ENV", "/tmp/evil.sh", ("BASH_ENV is not allowed",)),
    ("ENV", "/tmp/evil.sh", ("ENV is not allowed",)),
    ("PATH", "/tmp", ("PATH is not allowed",)),
    ("IFS", "/", ("IFS is not allowed",)),
    ("PYTHONPATH", "/tmp", ("PYTHONPATH is not allowed",)),
    ("GCONV_PATH", "/tmp", ("GCONV_PATH is not allowed",)),
    ("B0_RESOLVER", "tcp://evil:22000", ("B0_RESOLVER is set by the process manager",)),
    ("B0_HOST_ID", "other", ("B0_HOST_ID is set by the process manager",)),
    ("A=B", "x", ("start_process.environment",)),
    ("LD_PRELOAD ", "x", ("start_process.environment",)),
    ("X", "a\nLD_PRELOAD=/tmp/evil.so", ("start_process.environment",)),
    ("X", "a\0b", ("start_process.environment",)),
])
def test_environment_injection_is_refused(pm, site, name, value, parts):
    body = start(str(site["allowed"] / "ok"), environment={"GREETING": "hi", name: value})
    assert_refused(pm, site, body, *parts)


def test_the_refusals_are_logged_and_the_pm_still_serves(pm, site):
    assert_refused(pm, site, start(f"{site['root']}/allowed_x/ok"), "permission denied")
    assert isinstance(pm.pids(), list)
    test_positive_control_the_allowed_program_runs(pm, site)


def test_a_program_the_allowed_user_cannot_reach_is_refused_with_the_real_reason(pm, site, tmp_path):
    hidden = site["allowed"] / "private"
    hidden.mkdir(mode=0o700)
    try:
        program = hidden / "ok"
        program.write_text("#!/bin/sh\nexit 0\n")
        program.chmod(0o755)
        message = assert_refused(pm, site, start(str(program), user=ALLOWED_USER))
        assert "permission denied" in message.lower(), message
    finally:
        shutil.rmtree(hidden)
