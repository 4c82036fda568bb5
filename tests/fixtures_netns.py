"""Network namespaces as separate hosts for multi-host tests.

`netns_hosts(count)` makes `count` "machines": one network namespace each,
with `eth0` (one end of a veth pair) plugged into a bridge that lives in a
separate "switch" namespace. Each host gets 10.231.0.<i+1>/24 and its own
loopback. Nothing is added to the root namespace, so test traffic can
never leave these namespaces (see ../shared/design/systemd-sandbox.md,
"Multi-host tests").

Teardown (also when the test fails): every process a host started is
ended by pid (TERM, then KILL), then anything still inside the namespaces
(`ip netns pids`), then the namespaces are deleted, which deletes their
veths and the bridge. Namespace names carry the pytest pid, so leftovers
of a run that was itself killed are removed by the next run.

Without root or iproute2 the fixture skips, unless B0PM_REQUIRE_SANDBOX=1,
where it fails.
"""

import os
import re
import shutil
import signal
import subprocess
import time

import pytest

SUBNET_PREFIX = "10.231.0."
PREFIX_LENGTH = 24
NAME_PREFIX = "b0pmt"
STOP_GRACE_S = 3.0


class NetnsError(RuntimeError):
    pass


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "network namespaces need the ip tool (package iproute2)"
    return None


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def _kill_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _pids_inside(namespace: str) -> list[int]:
    try:
        return [int(pid) for pid in _ip("netns", "pids", namespace).split()]
    except NetnsError:
        return []


def _delete_namespace(namespace: str) -> None:
    for pid in _pids_inside(namespace):
        _kill_pid(pid, signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def remove_stale_namespaces() -> None:
    """Delete namespaces left by a test run whose pytest process is gone."""
    pattern = re.compile(rf"^{NAME_PREFIX}(\d+)-")
    for namespace in _namespaces():
        match = pattern.match(namespace)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            _delete_namespace(namespace)


class NetnsHost:
    """One namespace acting as a machine with address `ip`."""

    def __init__(self, namespace: str, ip: str):
        self.namespace = namespace
        self.ip = ip
        self.processes: list[subprocess.Popen] = []

    def __repr__(self) -> str:
        return f"NetnsHost({self.namespace}, {self.ip})"

    def argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *argv]

    def popen(self, argv: list[str], *, log=None, **kwargs) -> subprocess.Popen:
        """Start argv inside this host; it is ended at teardown. log: a path for stdout+stderr."""
        if log is not None:
            with open(log, "ab") as stream:
                return self.popen(argv, stdout=stream, stderr=subprocess.STDOUT, **kwargs)
        # `ip netns exec` execs argv, so the Popen pid is the program's own pid.
        process = subprocess.Popen(self.argv(argv), **kwargs)
        self.processes.append(process)
        return process

    def run(self, argv: list[str], timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(argv), capture_output=True, text=True, timeout=timeout, **kwargs)

    def stop(self, process: subprocess.Popen, sig: int = signal.SIGTERM) -> int | None:
        """Signal one process by pid; after STOP_GRACE_S, KILL it."""
        if process.poll() is None:
            _kill_pid(process.pid, sig)
            try:
                process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _kill_pid(process.pid, signal.SIGKILL)
                process.wait()
        return process.returncode

    def close(self) -> None:
        for process in self.processes:
            self.stop(process)


class NetnsLab:
    """A switch namespace with a bridge, and hosts plugged into it."""

    def __init__(self, tag: str):
        self.tag = tag
        self.switch = f"{NAME_PREFIX}{os.getpid()}-{tag}-sw"
        self.hosts: list[NetnsHost] = []
        self._namespaces: list[str] = []

    def _add_namespace(self, namespace: str) -> None:
        _ip("netns", "add", namespace)
        self._namespaces.append(namespace)
        _ip("-n", namespace, "link", "set", "lo", "up")

    def build(self, count: int) -> list[NetnsHost]:
        self._add_namespace(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for index in range(count):
            namespace = f"{NAME_PREFIX}{os.getpid()}-{self.tag}-h{index}"
            ip = f"{SUBNET_PREFIX}{index + 1}"
            port = f"h{index}"
            self._add_namespace(namespace)
            # Both ends are created directly inside their namespaces: nothing touches the root namespace.
            _ip("link", "add", "eth0", "netns", namespace, "type", "veth", "peer", "name", port, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", namespace, "addr", "add", f"{ip}/{PREFIX_LENGTH}", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            self.hosts.append(NetnsHost(namespace, ip))
        return self.hosts

    def close(self) -> None:
        for host in self.hosts:
            host.close()
        for namespace in reversed(self._namespaces):
            _delete_namespace(namespace)
        self._namespaces.clear()


@pytest.fixture
def netns_hosts(request):
    """Factory: `netns_hosts(count) -> [NetnsHost]`, all torn down after the test."""
    reason = netns_unavailable_reason()
    if reason:
        if os.environ.get("B0PM_REQUIRE_SANDBOX") == "1":
            pytest.fail(f"B0PM_REQUIRE_SANDBOX=1 but {reason}")
        pytest.skip(reason)
    remove_stale_namespaces()
    labs: list[NetnsLab] = []

    def make(count: int) -> list[NetnsHost]:
        lab = NetnsLab(str(len(labs)))
        labs.append(lab)
        try:
            return lab.build(count)
        except NetnsError as exc:
            lab.close()
            if os.environ.get("B0PM_REQUIRE_SANDBOX") == "1":
                pytest.fail(f"could not build network namespaces: {exc}")
            pytest.skip(f"could not build network namespaces: {exc}")

    yield make
    for lab in labs:
        lab.close()
