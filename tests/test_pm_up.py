"""`b0-pm up`: one command gives a working network; Ctrl-C/SIGTERM takes all of it down."""

import os
import signal
import socket
import subprocess
import time

import pytest

from tests.fixtures_b0 import REPO_ROOT, free_port, resolver_request
from tests.test_pm_support import Control, python_executable, resolve

READY_LINE = "Ctrl-C stops everything."


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def up(tmp_path):
    """Runs `b0-pm up` on a free port; yields (process, resolver address, printed text)."""
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith(("B0_", "B0PM_"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    process = subprocess.Popen([python_executable(), "-m", "b0_pm", "up", "--port", str(port),
                                "--backend", "local", "--for", "60"],
                               env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=open(tmp_path / "up.err", "wb"), text=True, start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.strip() == READY_LINE:
                break
        assert lines and lines[-1].strip() == READY_LINE, "".join(lines) + (tmp_path / "up.err").read_text()
        yield process, f"tcp://127.0.0.1:{port}", "".join(lines)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: up and anything it left
            process.wait()


def test_up_runs_a_network_and_sigint_stops_all_of_it(up):
    process, resolver_address, printed = up
    assert 'allowed_directories = ["/usr/bin"]' in printed
    assert "export B0_RESOLVER=" in printed and "b0-pm start /usr/bin/sleep 30" in printed
    children = [int(word.rstrip(",)")) for word in printed.split("(", 1)[1].split(")", 1)[0].split()
                if word.rstrip(",)").isdigit()]
    assert len(children) == 3

    graph = resolver_request(resolver_address, "get_graph", {})["get_graph"]["graph"]
    names = {node["node_name"] for node in graph["nodes"]}
    assert {"process_manager@localhost", "process_manager_hub"} <= names

    service = "process_manager@localhost/control"
    control = Control(resolve(resolver_address, service).replace("localhost", "127.0.0.1"), service)
    try:
        pid = control.start_pid("/usr/bin/sleep", "30")
        assert control.pids() == [pid]
    finally:
        control.close()

    process.send_signal(signal.SIGINT)   # what Ctrl-C does
    assert process.wait(timeout=30) == 0
    assert not any(alive(child) for child in children)
    assert not alive(pid), "the quick-try config stops what the PM started"


def test_up_refuses_a_busy_port():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        done = subprocess.run([python_executable(), "-m", "b0_pm", "up", "--port", port, "--for", "1"],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "in use" in done.stderr
