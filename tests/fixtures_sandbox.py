"""The throw-away systemd container (overlay + systemd-nspawn) for tests.

Recipe: ../shared/design/systemd-sandbox.md. The host root is mounted
copy-on-write (overlay, upper layer on tmpfs) under /var/tmp, booted with
systemd-nspawn, and the checkout is bound at its own absolute path so its
.venv works inside. The container shares the host's network namespace but
has its own PID namespace: pids printed inside are not host pids.

`boot_sandbox()` is also used as a library by bench/bench_backend.py.
"""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_TIMEOUT_S = 60
BOOT_TARGET = "basic.target"


class SandboxError(RuntimeError):
    pass


def sandbox_unavailable_reason() -> str | None:
    """Why a sandbox cannot be booted here, or None if it can."""
    if os.geteuid() != 0:
        return "the systemd sandbox needs root (overlay mounts, systemd-nspawn)"
    for tool in ("systemd-nspawn", "nsenter", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"the systemd sandbox needs {tool} (package systemd-container / util-linux)"
    return None


# PID 1 here is not systemd, so systemd-nspawn --keep-unit puts the container's
# payload in "payload" beside the cgroup it was started from. Containers started
# from one cgroup would share that tree, and same-named units of two containers
# (dbus.service, b0-pm@vm.service) one cgroup: one container's systemd killed
# the other's (a restart failed with 219/CGROUP). Each nspawn therefore starts
# from a cgroup of its own, in each hierarchy systemd uses.
CGROUP_MOUNTS = {"0": "/sys/fs/cgroup/unified", "name=systemd": "/sys/fs/cgroup/systemd"}


def systemd_cgroup_mounts() -> list[Path]:
    """Mount points of the cgroup hierarchies systemd uses on this machine."""
    mounts = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        number, controllers, _ = line.split(":", 2)
        key = "0" if number == "0" else controllers
        if key not in CGROUP_MOUNTS:
            continue
        mount = Path(CGROUP_MOUNTS[key])
        if key == "0" and not (mount / "cgroup.procs").exists():
            mount = Path("/sys/fs/cgroup")   # pure cgroup v2
        if (mount / "cgroup.procs").exists():
            mounts.append(mount)
    return mounts


def remove_cgroup_tree(directory: Path) -> None:
    """rmdir bottom-up (cgroup directories hold only kernel files: never rm -r them)."""
    if not directory.is_dir():
        return
    for sub in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        try:
            sub.rmdir()
        except OSError:
            pass
    try:
        directory.rmdir()
    except OSError:
        pass


class Sandbox:
    """A booted container; every process it starts is ended by close()."""

    def __init__(self, workdir: Path, machine: str):
        self.workdir = workdir
        self.machine = machine
        self.root = workdir / "root"
        self.cgroups = [mount / workdir.name for mount in systemd_cgroup_mounts()]
        self.nspawn: subprocess.Popen | None = None
        self.leader_pid: int | None = None
        self._daemons: list[subprocess.Popen] = []
        self._mounted: list[Path] = []

    @property
    def log_path(self) -> Path:
        return self.workdir / "nspawn.log"

    def nspawn_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no nspawn log)"

    def _inside(self, argv, env) -> list[str]:
        # env -i: the host's environment (pytest's, the venv's) must not leak inside
        variables = {"PATH": SANDBOX_PATH, "LANG": "C.UTF-8", **(env or {})}
        return ["nsenter", "-t", str(self.leader_pid), "-a", "env", "-i",
                *(f"{k}={v}" for k, v in variables.items()), *map(str, argv)]

    def exec(self, argv, env=None, check=True, timeout=60, input=None) -> subprocess.CompletedProcess:
        """Run argv inside the container and wait for it (text output captured)."""
        result = subprocess.run(self._inside(argv, env), capture_output=True, text=True,
                                timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise SandboxError(f"{argv} exited {result.returncode} in the sandbox:\n"
                               f"{result.stdout}{result.stderr}")
        return result

    def popen(self, argv, env=None, **popen_kwargs) -> subprocess.Popen:
        """Start argv inside the container (through nsenter); killed at teardown at the latest."""
        process = subprocess.Popen(self._inside(argv, env), start_new_session=True, **popen_kwargs)
        self._daemons.append(process)
        return process

    @staticmethod
    def signal_daemon(process: subprocess.Popen, signum: int) -> None:
        """Signal the program a popen()ed nsenter runs; nsenter then reaps it and exits.

        Killing nsenter first would orphan the program to the host's init, and
        until that reaps it, the zombie holds up the container's shutdown for 10 s."""
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
        try:
            pids = [int(pid) for pid in children.read_text().split()]
        except OSError:
            return   # nsenter has exited
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _mount(self, argv, target: Path) -> None:
        subprocess.run(argv, check=True, capture_output=True, text=True)
        self._mounted.append(target)

    def boot(self, binds=(), timeout=BOOT_TIMEOUT_S) -> None:
        overlay_dir = self.workdir / "ovl"
        overlay_dir.mkdir(parents=True)
        self.root.mkdir()
        self._mount(["mount", "-t", "tmpfs", "tmpfs", str(overlay_dir)], overlay_dir)
        (overlay_dir / "upper").mkdir()
        (overlay_dir / "work").mkdir()
        self._mount(["mount", "-t", "overlay", "overlay", "-o",
                     f"lowerdir=/,upperdir={overlay_dir}/upper,workdir={overlay_dir}/work",
                     str(self.root)], self.root)
        for cgroup in self.cgroups:
            cgroup.mkdir(exist_ok=True)
        bind_options = [f"--bind={path}:{path}" for path in binds]
        with open(self.log_path, "wb") as log:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "-D", str(self.root), "--register=no", "--keep-unit",
                 "-M", self.machine, "--boot", "--console=passive", *bind_options,
                 # only basic.target: the host's enabled services (databases, web servers) would start
                 # inside too and fight the host for its ports, as the network namespace is shared
                 f"systemd.unit={BOOT_TARGET}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=self._enter_own_cgroups)
        self._wait_until_running(timeout)

    def _enter_own_cgroups(self) -> None:
        # runs in the child between fork and exec: "0" moves the writing process
        for cgroup in self.cgroups:
            (cgroup / "cgroup.procs").write_text("0")

    def _find_leader(self) -> int | None:
        children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
        try:
            pids = children.read_text().split()
        except OSError:
            return None
        return int(pids[0]) if pids else None

    def _wait_until_running(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = "(no answer)"
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise SandboxError(f"systemd-nspawn exited {self.nspawn.returncode} during boot:\n"
                                   f"{self.nspawn_log()}")
            self.leader_pid = self.leader_pid or self._find_leader()
            if self.leader_pid:
                result = self.exec(["systemctl", "is-system-running"], check=False, timeout=10)
                state = result.stdout.strip() or result.stderr.strip()
                if state in ("running", "degraded"):
                    self._check_dbus()
                    return
            time.sleep(0.2)
        raise SandboxError(f"the sandbox did not boot within {timeout} s "
                           f"(is-system-running: {state}):\n{self.nspawn_log()}")

    def _check_dbus(self) -> None:
        # pystemd talks to systemd through the system bus; basic.target leaves the broker socket-activated
        self.exec(["systemctl", "start", "dbus.service"], check=False)
        result = self.exec(["systemctl", "is-active", "dbus.service"], check=False)
        if result.stdout.strip() != "active":
            raise SandboxError(f"dbus.service is {result.stdout.strip() or result.stderr.strip()} "
                               f"in the sandbox; pystemd needs the system bus")

    def close(self) -> None:
        for process in self._daemons:
            self.signal_daemon(process, signal.SIGKILL)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.nspawn is not None and self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)  # nspawn asks the container to power off
            try:
                self.nspawn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(timeout=10)
        for target in reversed(self._mounted):
            subprocess.run(["umount", str(target)], check=False, capture_output=True)
            if subprocess.run(["mountpoint", "-q", str(target)]).returncode == 0:
                subprocess.run(["umount", "-l", str(target)], check=False)  # last resort
        self._mounted.clear()
        for cgroup in self.cgroups:
            remove_cgroup_tree(cgroup)
        shutil.rmtree(self.workdir, ignore_errors=True)


_machine_counter = 0
SANDBOX_PARENT = Path("/var/tmp")
SANDBOX_PREFIX = "b0pm-sandbox-"


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _nspawn_pids_for(root: Path) -> list[int]:
    """Host pids of the systemd-nspawn processes booting `root`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"systemd-nspawn") and str(root).encode() in argv:
            pids.append(int(entry.name))
    return pids


def reap_orphaned_sandboxes() -> None:
    """Tear down sandboxes whose owning process died without closing them.

    A test run killed from outside (a timeout, SIGKILL) never reaches its
    finalisers; its container would run on and keep its overlay mounted.
    """
    for workdir in SANDBOX_PARENT.glob(SANDBOX_PREFIX + "*-*"):
        owner = workdir.name[len(SANDBOX_PREFIX):].split("-")[0]
        if not owner.isdigit() or _pid_alive(int(owner)):
            continue
        orphan = Sandbox(workdir, machine="")
        for pid in _nspawn_pids_for(orphan.root):
            os.kill(pid, signal.SIGTERM)  # nspawn asks the container to power off
            deadline = time.monotonic() + 30
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        orphan._mounted = [workdir / "ovl", orphan.root]
        orphan.close()


def boot_sandbox(binds=(REPO,), timeout=BOOT_TIMEOUT_S) -> Sandbox:
    """Boot a fresh container; the caller must close() it (also on errors)."""
    global _machine_counter
    _machine_counter += 1
    reap_orphaned_sandboxes()
    workdir = SANDBOX_PARENT / f"{SANDBOX_PREFIX}{os.getpid()}-{_machine_counter}"
    sandbox = Sandbox(workdir, machine=f"b0pm-{os.getpid()}-{_machine_counter}")
    try:
        sandbox.boot(binds=binds, timeout=timeout)
    except BaseException:
        sandbox.close()
        raise
    return sandbox


@pytest.fixture(scope="session")
def systemd_sandbox():
    reason = sandbox_unavailable_reason()
    if reason is not None:
        if os.environ.get("B0PM_REQUIRE_SANDBOX") == "1":
            pytest.fail(f"B0PM_REQUIRE_SANDBOX=1 but {reason}")
        pytest.skip(reason)
    sandbox = boot_sandbox()
    try:
        yield sandbox
    finally:
        sandbox.close()
