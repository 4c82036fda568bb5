"""A test run killed from outside must not leave its container behind."""

import os
import signal
import subprocess
import sys

import pytest

from tests.fixtures_sandbox import (REPO, SANDBOX_PARENT, SANDBOX_PREFIX, _nspawn_pids_for,
                                    reap_orphaned_sandboxes, sandbox_unavailable_reason)

BOOT_AND_WAIT = """
import time
from tests.fixtures_sandbox import boot_sandbox
sandbox = boot_sandbox(binds=())
print(sandbox.workdir, flush=True)
time.sleep(600)
"""


def _is_mountpoint(path) -> bool:
    return subprocess.run(["mountpoint", "-q", str(path)]).returncode == 0


@pytest.mark.systemd
def test_a_sandbox_whose_owner_was_killed_is_torn_down():
    reason = sandbox_unavailable_reason()
    if reason is not None:
        if os.environ.get("B0PM_REQUIRE_SANDBOX") == "1":
            pytest.fail(f"B0PM_REQUIRE_SANDBOX=1 but {reason}")
        pytest.skip(reason)
    owner = subprocess.Popen([sys.executable, "-c", BOOT_AND_WAIT], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    try:
        workdir = owner.stdout.readline().strip()
        assert workdir.startswith(f"{SANDBOX_PARENT}/{SANDBOX_PREFIX}{owner.pid}-"), workdir
        root = f"{workdir}/root"
        assert _nspawn_pids_for(root) and _is_mountpoint(root)
    finally:
        owner.send_signal(signal.SIGKILL)  # no finaliser runs: the container is orphaned
        owner.wait()

    reap_orphaned_sandboxes()

    assert _nspawn_pids_for(root) == []
    assert not _is_mountpoint(root) and not _is_mountpoint(f"{workdir}/ovl")
    assert not os.path.exists(workdir)
