"""Shared helpers of the process-manager tests (test_pm_local.py, test_pm_systemd.py, the bench).

No tests here. The PM runs as a real `b0-pm serve` process; requests go
through a raw REQ socket with byte-exact envelopes (as a C++ client), and
topics are received by a real b0 node.
"""

import os
import queue
import signal
import subprocess
import sys
import time

import zmq

from b0_pm.b0 import envelope, jsoncodec
from tests.fixtures_b0 import REPO_ROOT, NodeThread, resolver_request

REQUEST_TYPE = "b0::process_manager::Request"
RESPONSE_TYPE = "b0::process_manager::Response"
STARTUP_TIMEOUT_S = 20.0

# Appendix F: each of these made the original PM abort without a reply.
CRASH_REQUESTS = [
    ("unparsable JSON", b'{"start_process":', REQUEST_TYPE),
    ("start without args", b'{"start_process":{"path":"/bin/true"}}', REQUEST_TYPE),
    ("no pid", b'{"stop_process":{}}', REQUEST_TYPE),
    ("pid as a string", b'{"query_process_status":{"pid":"1"}}', REQUEST_TYPE),
    ("wrong content type", b'{"list_active_processes":{}}', "b0.message.resolv.Request"),
    ("no content type", b'{"list_active_processes":{}}', None),
    ("not an object", b'[1,2]', REQUEST_TYPE),
    ("not UTF-8", b'{"start_process":{"path":"\xff","args":[]}}', REQUEST_TYPE),
    ("deep nesting", b'{"a":' * 200 + b'1' + b'}' * 200, REQUEST_TYPE),
]


def assert_error_reply(control: "Control", payload: bytes, content_type: str | None) -> None:
    """The request gets a Response that is {} or says success:false, and the PM goes on serving."""
    reply_type, reply = control.call_raw(payload, content_type)
    assert reply_type == RESPONSE_TYPE
    decoded = jsoncodec.loads(reply)
    assert decoded == {} or b'"success":false' in reply, decoded
    assert b"true" not in reply, decoded
    assert isinstance(control.pids(), list)


def resolve(resolver_address: str, service: str, timeout: float = STARTUP_TIMEOUT_S) -> str:
    """The service's address, polling the resolver until it is registered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = resolver_request(resolver_address, "resolve_service", {"service_name": service})
        if reply and reply["resolve_service"]["ok"]:
            return reply["resolve_service"]["sock_addr"]
        time.sleep(0.05)
    raise TimeoutError(f"service {service} was not registered within {timeout} s")


class Control:
    """A C++-style client of a PM control service: one REQ socket, byte-exact envelopes."""

    def __init__(self, address: str, service: str):
        self.address = address
        self.service = service
        self._context = zmq.Context.instance()
        self._socket = None
        self._connect()

    def _connect(self):
        if self._socket is not None:
            self._socket.close(0)
        self._socket = self._context.socket(zmq.REQ)
        self._socket.linger = 0
        self._socket.connect(self.address)

    def exchange(self, frames, timeout: float = 10.0) -> list[bytes]:
        """Send raw frames, return the reply frames; a missing reply fails the test."""
        self._socket.send_multipart(frames)
        if not self._socket.poll(int(timeout * 1000)):
            self._connect()  # a REQ socket without its reply is stuck
            raise TimeoutError(f"no reply from {self.service} within {timeout} s")
        return self._socket.recv_multipart()

    def call_raw(self, payload: bytes, content_type: str | None = REQUEST_TYPE,
                 header0: str | None = None, timeout: float = 10.0) -> tuple[str, bytes]:
        frame = envelope.encode(header0 or self.service, payload, content_type or "")
        reply = envelope.decode(self.exchange([frame], timeout)[0])
        return reply.content_type, reply.payload

    def call(self, request: dict, timeout: float = 10.0) -> dict:
        content_type, payload = self.call_raw(jsoncodec.dumps(request), timeout=timeout)
        assert content_type == RESPONSE_TYPE
        return jsoncodec.loads(payload)

    def start(self, path: str, *args: str) -> dict:
        return self.call({"start_process": {"path": path, "args": list(args)}})["start_process"]

    def start_pid(self, path: str, *args: str) -> int:
        reply = self.start(path, *args)
        assert reply["success"] is True, reply
        return reply["pid"]

    def stop(self, pid: int) -> dict:
        return self.call({"stop_process": {"pid": pid}})["stop_process"]

    def query(self, pid: int) -> dict:
        return self.call({"query_process_status": {"pid": pid}})["query_process_status"]

    def pids(self) -> list[int]:
        return self.call({"list_active_processes": {}})["list_active_processes"]["pids"]

    def wait_exit(self, pid: int, timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.query(pid)
            if status.get("running") is False:
                return status
            time.sleep(0.05)
        raise TimeoutError(f"pid {pid} still running after {timeout} s: {status}")

    def close(self):
        self._socket.close(0)


class TopicListener:
    """A b0 node subscribed to the PM's topics; messages are queued per topic as (content type, JSON)."""

    def __init__(self, resolver_address: str, topics=("process_manager/beacon", "process_manager/events")):
        self.queues = {topic: queue.Queue() for topic in topics}

        def build(node):
            for topic in topics:
                node.subscriber(topic, lambda env, t=topic: self.queues[t].put(
                    (env.content_type, jsoncodec.loads(env.payload))))

        self._thread = NodeThread("pm-test-listener", build, resolver=resolver_address)

    def __enter__(self):
        self._thread.__enter__()
        return self

    def __exit__(self, *exc_info):
        self._thread.__exit__(*exc_info)

    def next(self, topic: str, match=lambda message: True, timeout: float = 10.0) -> tuple[str, dict]:
        """The next message on topic for which match(message) holds."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching message on {topic} within {timeout} s")
            try:
                content_type, message = self.queues[topic].get(timeout=remaining)
            except queue.Empty:
                continue
            if match(message):
                return content_type, message


def serve_argv(python: str, config_file: str, *options: str) -> list[str]:
    return [python, "-m", "b0_pm", "serve", "--config", config_file, *options]


def pm_environment(resolver_env: dict, **extra: str) -> dict:
    env = {name: value for name, value in resolver_env.items()
           if name.startswith(("B0_", "B0PM_")) or name in ("PATH", "PYTHONPATH", "LANG")}
    env.setdefault("PYTHONPATH", str(REPO_ROOT))
    env.update(extra)
    return env


class PMProcess:
    """`b0-pm serve` as a subprocess of the test (its own session), stopped by pid."""

    def __init__(self, argv: list[str], env: dict, log_path):
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(argv, env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=log, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return open(self.log_path, errors="replace").read()

    def terminate(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()


def write_program(directory, name: str, text: str, mode: int = 0o755) -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as stream:
        stream.write(text)
    os.chmod(path, mode)
    return path


def write_test_programs(directory) -> dict[str, str]:
    """Small programs the tests start: exits, signals, a stubborn one, a tree."""
    return {
        "exit0": write_program(directory, "exit0", "#!/bin/sh\nexit 0\n"),
        "exit3": write_program(directory, "exit3", "#!/bin/sh\nexit 3\n"),
        "sleeper": write_program(directory, "sleeper", "#!/bin/sh\nexec sleep 1000\n"),
        "kill_self": write_program(directory, "kill_self", "#!/bin/sh\nkill -TERM $$\nsleep 5\n"),
        # dispositions set to ignore survive exec, so the sleep ignores them too
        "stubborn": write_program(directory, "stubborn", "#!/bin/sh\ntrap '' INT TERM\nsleep 1000\n"),
        # sh runs a background job with SIGINT ignored, so only the ladder's later steps reach it
        "tree": write_program(directory, "tree", "#!/bin/sh\nsleep 1000 &\necho $! > \"$1\"\nwait\n"),
        "talker": write_program(directory, "talker", "#!/bin/sh\necho \"hello from $1\"\nexec sleep 1000\n"),
        "not_executable": write_program(directory, "not_executable", "#!/bin/sh\nexit 0\n", mode=0o644),
        "env_dump": write_program(directory, "env_dump", "#!/bin/sh\nenv > \"$1\"\n"),
    }


def python_executable() -> str:
    """The venv's python (the repo is at the same path inside the sandbox)."""
    return str(REPO_ROOT / ".venv" / "bin" / "python") if (REPO_ROOT / ".venv").exists() else sys.executable


SANDBOX_VENV_PYTHON = str(REPO_ROOT / ".venv" / "bin" / "python")


class SandboxPM:
    """A PM inside the systemd sandbox as a Type=notify transient service (systemd-run), like
    b0-pm@.service, and a control client on the host that follows it across restarts.

    `write_programs(directory)` writes the programs it may start and returns {name: path};
    `properties` are extra systemd-run --property values (a watchdog, a restart policy)."""

    def __init__(self, sandbox, resolver, *, host_id: str, unit: str, workdir: str, write_programs,
                 properties=(), ladder_step_s: float = 0.3):
        self.sandbox = sandbox
        self.resolver = resolver
        self.host_id = host_id
        self.unit = unit
        self.workdir = workdir            # inside the container (not /tmp: the container mounts its own)
        self.node_name = f"process_manager@{host_id}"
        self.program_units = f"b0pm-{host_id}-*"
        self.properties = properties
        self.ladder_step_s = ladder_step_s
        self.control = None
        host_dir = sandbox.root / workdir.lstrip("/")
        (host_dir / "bin").mkdir(parents=True, exist_ok=True)
        (host_dir / "out").mkdir(exist_ok=True)
        (host_dir / "empty.toml").write_text("")
        self.host_out = host_dir / "out"
        self.programs = {name: f"{workdir}/bin/{os.path.basename(path)}"
                         for name, path in write_programs(str(host_dir / "bin")).items()}

    def start_service(self) -> None:
        self.sandbox.exec(["systemctl", "reset-failed", self.unit], check=False)
        environment = {"B0_RESOLVER": self.resolver.address, "B0_HOST_ID": self.host_id,
                       "B0PM_BIND_HOST": self.host_id}
        argv = ["systemd-run", f"--unit={self.unit}", "--property=Type=notify", "--property=NotifyAccess=main",
                *(f"--property={value}" for value in self.properties),
                *(f"--setenv={name}={value}" for name, value in environment.items()),
                SANDBOX_VENV_PYTHON, "-m", "b0_pm", "serve", "--config", f"{self.workdir}/empty.toml",
                "--backend", "systemd", "--host-id", self.host_id,
                "--allowed-directory", f"{self.workdir}/bin",
                "--stop-signal-grace-seconds", str(self.ladder_step_s),
                "--term-grace-seconds", str(self.ladder_step_s)]
        result = self.sandbox.exec(argv, check=False, timeout=60)
        # Type=notify: systemd-run returns once the start job is done, i.e. after READY=1
        assert result.returncode == 0, result.stderr + self.journal()
        self.connect(self.node_name)

    def connect(self, node_name: str) -> None:
        service = f"{node_name}/control"
        if self.control is not None:
            self.control.close()
        self.control = Control(resolve(self.resolver.address, service), service)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        result = self.sandbox.exec(["systemctl", "show", unit, *(f"--property={p}" for p in properties)])
        return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)

    def main_pid(self) -> int:
        return int(self.show(self.unit, "MainPID")["MainPID"])

    def unit_of(self, pid: int) -> str:
        return self.sandbox.exec(["ps", "-o", "unit=", "-p", str(pid)]).stdout.strip()

    def journal(self, unit: str | None = None, *options: str) -> str:
        return self.sandbox.exec(["journalctl", "--no-pager", "-o", "cat", "-u", unit or self.unit, *options],
                                 check=False).stdout

    def alive(self, pid: int) -> bool:
        return self.sandbox.exec(["test", "-d", f"/proc/{pid}"], check=False).returncode == 0

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
        for argv in (["systemctl", "kill", "--signal=SIGKILL", self.unit, self.program_units],
                     ["systemctl", "stop", self.unit, self.program_units],
                     ["systemctl", "reset-failed", self.unit, self.program_units]):
            self.sandbox.exec(argv, check=False)
