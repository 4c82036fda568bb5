"""Interoperability with the original C++ BlueZero v2 tools.

Runs only when B0PM_CPP_BIN names a directory that holds the original
binaries (b0_resolver, b0_service_call, b0_process_manager,
b0_process_manager_hub, b0_topic_echo, b0_node_list, b0_service_list,
b0_topic_list; libb0.so beside them or found through their rpath).
Otherwise every test here is skipped. Each test skips on its own if a
binary it needs is missing.

What is checked, everything on loopback with free ports:

- our resolver answers every well-formed resolv request byte for byte as
  b0_resolver does (both run side by side, same request sequence);
- the C++ PM, HUB, b0_service_call, b0_topic_echo and the list tools work
  unchanged through our resolver;
- `b0-pm call` sends the same request bytes and prints the same stdout as
  b0_service_call, for typed, untyped, binary, multi-part and compressed
  replies;
- our PM (`b0-pm serve --backend local`) driven by the C++ b0_service_call
  and the C++ HUB, and its beacon read by b0_topic_echo;
- our HUB (`b0-pm hub`) in front of the C++ PM;
- the same requests sent to the C++ PM and to ours get the same reply
  envelopes, except for deliberate, documented deviations (exit records
  are kept, exit_code is -N for a signal, start policy by path component,
  no command-line splitting of `path`). Known differences that are not
  documented as deliberate are marked xfail(strict=True), or checked for
  the part a C++ client relies on (the "permission denied" prefix).

The C++ PM only starts programs from the directory of its own executable,
so each test copies b0_process_manager (with `true` and `sleep`) into a
temporary directory and runs it from there (LD_LIBRARY_PATH gets
B0PM_CPP_BIN so libb0.so is still found). The C++ PM ignores SIGINT and
SIGTERM, and b0_resolver does not exit on SIGINT: both are ended with
SIGKILL, by pid. Programs the PMs started are killed by pid at teardown.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import zmq

from b0_pm.b0 import envelope as b0_envelope

from tests.fixtures_b0 import REPO_ROOT, free_port, req_exchange, resolver_request

CPP_BIN = os.environ.get("B0PM_CPP_BIN", "")

pytestmark = pytest.mark.skipif(
    not CPP_BIN or not os.path.isdir(CPP_BIN),
    reason="B0PM_CPP_BIN is not set to a directory holding the original BlueZero v2 binaries "
           "(b0_resolver, b0_service_call, b0_process_manager, ...)")

RESOLV_REQUEST = "b0.message.resolv.Request"
PM_REQUEST = "b0::process_manager::Request"
PM_RESPONSE = "b0::process_manager::Response"
HUB = "process_manager_hub/control"
WAIT_S = 15.0


def cpp(name: str) -> str:
    path = os.path.join(CPP_BIN, name)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.skip(f"{name} is not in B0PM_CPP_BIN ({CPP_BIN})")
    return path


def envelope(header0: str, payload: bytes, content_type: str = "", extra: str = "") -> bytes:
    head = f"{header0}\nPart-count: 1\nContent-length-0: {len(payload)}\n"
    if content_type:
        head += f"Content-type-0: {content_type}\n"
    return (head + f"Content-length: {len(payload)}\n{extra}\n").encode() + payload


def body_of(frame: bytes) -> bytes:
    return frame.split(b"\n\n", 1)[1]


class Network:
    """Processes on one resolver port; everything is stopped by pid at teardown."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.env = dict(os.environ)
        self.env.update({
            "B0_RESOLVER": self.address,
            "B0_RESOLVER_PORT": str(self.port),
            "B0_HOST_ID": "127.0.0.1",
            "B0PM_BIND_HOST": "127.0.0.1",
            "B0_CONSOLE_LOGLEVEL": "info",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [CPP_BIN, os.environ.get("LD_LIBRARY_PATH")])),
        })
        self.procs: list[tuple[subprocess.Popen, bool]] = []
        self.children: set[int] = set()
        self._count = 0

    def log(self, proc: subprocess.Popen) -> str:
        return Path(proc.args_log).read_text(errors="replace")

    def start(self, argv: list[str], *, polite: bool = True, **env) -> subprocess.Popen:
        """polite: stop with SIGINT first (nodes that clean up); else SIGKILL at once."""
        self._count += 1
        log = self.tmp / f"proc{self._count}-{Path(argv[0]).name}.log"
        proc = subprocess.Popen(argv, env=dict(self.env, **env), stdin=subprocess.DEVNULL,
                                stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        proc.args_log = str(log)
        self.procs.append((proc, polite))
        return proc

    def py(self, *args: str, polite: bool = True, **env) -> subprocess.Popen:
        return self.start([sys.executable, "-m", "b0_pm", *args], polite=polite, **env)

    def start_resolver(self, kind: str) -> subprocess.Popen:
        if kind == "cpp":
            proc = self.start([cpp("b0_resolver")], polite=False)
        else:
            proc = self.py("resolver", "--port", str(self.port))
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"{kind} resolver exited: {self.log(proc)}"
            if resolver_request(self.address, "get_graph", {}, timeout=0.3) is not None:
                return proc
        pytest.fail(f"{kind} resolver did not answer within {WAIT_S} s")

    def graph(self) -> dict:
        reply = resolver_request(self.address, "get_graph", {}, timeout=3.0)
        assert reply is not None, "resolver stopped answering"
        return reply["get_graph"]["graph"]

    def wait_nodes(self, *names: str) -> dict:
        deadline = time.monotonic() + WAIT_S
        while True:
            graph = self.graph()
            have = {node["node_name"] for node in graph["nodes"]}
            if set(names) <= have:
                return graph
            if time.monotonic() > deadline:
                pytest.fail(f"nodes {sorted(set(names) - have)} never appeared (have {sorted(have)})")
            time.sleep(0.1)

    def wait_for(self, predicate, what: str, timeout: float = WAIT_S):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}")

    def service_address(self, service: str) -> str:
        reply = resolver_request(self.address, "resolve_service", {"service_name": service}, timeout=3.0)
        assert reply and reply["resolve_service"]["ok"], f"cannot resolve {service}: {reply}"
        host_port = reply["resolve_service"]["sock_addr"].rsplit(":", 1)[1]
        return f"tcp://127.0.0.1:{host_port}"

    def request(self, service: str, payload: bytes, content_type: str = PM_REQUEST) -> bytes:
        """One raw REQ exchange with a service; returns the whole reply frame."""
        reply = req_exchange(self.service_address(service), envelope(service, payload, content_type), WAIT_S)
        assert reply is not None, f"no reply from {service} to {payload!r}"
        self.note_pids(reply[0])
        return reply[0]

    def service_call(self, service: str, payload: bytes, *, content_type: str = PM_REQUEST,
                     tool: str = "cpp") -> bytes:
        """stdout of b0_service_call (tool=cpp) or `b0-pm call` (tool=py) for this request."""
        if tool == "cpp":
            argv = [cpp("b0_service_call"), "-s", service]
        else:
            argv = [sys.executable, "-m", "b0_pm", "call", "-s", service, "--timeout", str(WAIT_S)]
        if content_type:
            argv += ["-c", content_type]
        proc = subprocess.Popen(argv, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(payload, timeout=WAIT_S + 5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"{tool} service call to {service} with {payload!r} hung")
        assert proc.returncode == 0, f"{argv} exited {proc.returncode}: {err.decode(errors='replace')}"
        self.note_pids(out)
        return out

    def note_pids(self, data: bytes) -> None:
        for match in re.finditer(rb'"start_process":\{"success":true,"pid":(\d+)', data):
            self.children.add(int(match.group(1)))

    def stop_all(self) -> None:
        for proc, polite in reversed(self.procs):
            if proc.poll() is not None:
                continue
            if polite:
                os.kill(proc.pid, signal.SIGINT)
                try:
                    proc.wait(5)
                    continue
                except subprocess.TimeoutExpired:
                    pass
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture
def net(tmp_path):
    network = Network(tmp_path)
    yield network
    network.stop_all()


def cpp_pm_dir(tmp_path: Path) -> Path:
    """A directory with a copy of the C++ PM and the programs it may start."""
    directory = tmp_path / "pmbin"
    directory.mkdir(exist_ok=True)
    shutil.copy2(cpp("b0_process_manager"), directory / "b0_process_manager")
    for program in ("true", "false", "sleep"):
        shutil.copy2(shutil.which(program), directory / program)
    return directory


def programs_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "progs"
    directory.mkdir(exist_ok=True)
    for program in ("true", "false", "sleep"):
        shutil.copy2(shutil.which(program), directory / program)
    return directory


def start_cpp_pm(net: Network, tmp_path: Path, host_id: str = "127.0.0.1") -> Path:
    directory = cpp_pm_dir(tmp_path)
    net.start([str(directory / "b0_process_manager")], polite=False, B0_HOST_ID=host_id)
    net.wait_nodes(f"process_manager@{host_id}")
    return directory


def start_our_pm(net: Network, allowed: Path, host_id: str = "127.0.0.1") -> None:
    net.py("serve", "--config", "/dev/null", "--backend", "local", "--host-id", host_id,
           "--allow", str(allowed))
    net.wait_nodes(f"process_manager@{host_id}")


def typed(payload: bytes) -> bytes:
    return b"Content-type: " + PM_RESPONSE.encode() + b"\n" + payload


# --- resolver ---------------------------------------------------------------------------

RESOLVER_REQUESTS = [
    {"announce_node": {"host_id": "h1", "process_id": 1, "node_name": "a"}},
    {"announce_node": {"host_id": "h1", "process_id": 2, "node_name": "a"}},
    {"announce_node": {"host_id": "h1", "process_id": 3, "node_name": ""}},
    {"announce_node": {"host_id": "h1", "process_id": 4, "node_name": "node"}},
    {"announce_node": {"host_id": "h1", "process_id": 5, "node_name": "resolver"}},
    {"announce_node": {"host_id": "h\u00fc\u0001", "process_id": 6, "node_name": "u\u00e9\u001f\"\\/x"}},
    '{"announce_node":{"host_id":"h1","process_id":7.9,"node_name":"frac"}}',
    '{"announce_node":{"host_id":"h1","process_id":1e1,"node_name":"exp"}}',
    {"announce_service": {"node_name": "a", "service_name": "svc", "sock_addr": "tcp://h1:1"}},
    {"announce_service": {"node_name": "a-1", "service_name": "svc", "sock_addr": "tcp://h1:2"}},
    {"announce_service": {"node_name": "a", "service_name": "svc", "sock_addr": "tcp://h1:2"}},
    {"announce_service": {"node_name": "ghost", "service_name": "x", "sock_addr": "tcp://h1:3"}},
    {"resolve_service": {"service_name": "svc"}},
    {"resolve_service": {"service_name": "nope"}},
    {"heartbeat": {"node_name": "a"}},
    {"heartbeat": {"node_name": "ghost"}},
    {"node_topic": {"node_name": "a", "topic_name": "t", "reverse": False, "active": True}},
    {"node_topic": {"node_name": "a", "topic_name": "t", "reverse": False, "active": True}},
    {"node_topic": {"node_name": "ghost", "topic_name": "t", "reverse": True, "active": True}},
    {"node_topic": {"node_name": "a-1", "topic_name": "b", "reverse": False, "active": True}},
    {"node_topic": {"node_name": "a", "topic_name": "t", "reverse": True, "active": True}},
    {"node_service": {"node_name": "a", "service_name": "svc", "reverse": False, "active": True}},
    {"node_service": {"node_name": "a-1", "service_name": "svc", "reverse": True, "active": True}},
    {"node_service": {"node_name": "a-1", "service_name": "zz", "reverse": True, "active": False}},
    {"get_graph": {}},
    '{"get_graph":{},"resolve_service":{"service_name":"svc"},"heartbeat":{"node_name":"a"}}',
    '{}',
    '{"foo":[1,{"x":null}],"resolve_service":{"service_name":"svc","extra":true}}',
    ' { "resolve_service" : { "service_name" : "svc" } } \n',
    {"node_topic": {"node_name": "a", "topic_name": "t", "reverse": False, "active": False}},
    {"shutdown_node": {"node_name": "ghost"}},
    {"shutdown_node": {"node_name": "a"}},
    {"resolve_service": {"service_name": "svc"}},
    {"heartbeat": {"node_name": "resolver"}},
    {"resolve_service": {"service_name": "resolv"}},
    {"get_graph": {}},
]


def _normalize_resolver_reply(frame: bytes, resolver_pid: int) -> str:
    text = frame.decode("utf-8")
    text = re.sub(r'"time_usec":\d+', '"time_usec":T', text)
    text = re.sub(r"tcp://127\.0\.0\.1:\d+", "tcp://127.0.0.1:PORT", text)
    text = text.replace(f'"process_id":{resolver_pid},', '"process_id":RESOLVER,')
    return re.sub(r"Content-length(-0)?: \d+", r"Content-length\1: N", text)


def _run_resolver_sequence(address: str, resolver_pid: int) -> list[str]:
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.linger = 0
    sock.connect(address)
    replies = []
    try:
        for request in RESOLVER_REQUESTS:
            payload = request.encode() if isinstance(request, str) else \
                json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode()
            sock.send(envelope("resolv", payload, RESOLV_REQUEST))
            assert sock.poll(int(WAIT_S * 1000)), f"no reply to {payload!r}"
            replies.append(_normalize_resolver_reply(sock.recv(), resolver_pid))
    finally:
        sock.close(0)
    return replies


def test_resolver_replies_match_b0_resolver(tmp_path):
    cpp_net, our_net = Network(tmp_path / "c"), Network(tmp_path / "p")
    (tmp_path / "c").mkdir()
    (tmp_path / "p").mkdir()
    try:
        cpp_resolver = cpp_net.start_resolver("cpp")
        our_resolver = our_net.start_resolver("py")
        theirs = _run_resolver_sequence(cpp_net.address, cpp_resolver.pid)
        ours = _run_resolver_sequence(our_net.address, our_resolver.pid)
    finally:
        cpp_net.stop_all()
        our_net.stop_all()
    for request, expected, got in zip(RESOLVER_REQUESTS, theirs, ours):
        assert got == expected, f"request {request!r}"


# --- C++ nodes on our resolver -----------------------------------------------------------

def test_cpp_pm_hub_and_tools_on_our_resolver(net, tmp_path):
    net.start_resolver("py")
    directory = start_cpp_pm(net, tmp_path)
    echo = net.start([cpp("b0_topic_echo"), "process_manager/beacon"])
    hub = net.start([cpp("b0_process_manager_hub")])
    pm = "process_manager@127.0.0.1/control"
    net.wait_nodes("b0_topic_echo", "process_manager_hub")

    assert net.service_call(pm, b'{"list_active_processes":{}}') == \
        typed(b'{"list_active_processes":{"pids":[]}}')
    out = net.service_call(pm, b'{"start_process":{"path":"%s/true","args":[]}}' % str(directory).encode())
    assert re.fullmatch(rb'Content-type: b0::process_manager::Response\n'
                        rb'\{"start_process":\{"success":true,"pid":\d+\}\}', out), out
    net.wait_for(lambda: b"added new entry: 127.0.0.1" in Path(hub.args_log).read_bytes(), "HUB sees the PM")
    assert net.service_call(HUB, b'{"host_name":"127.0.0.1","query_process_status":{"pid":1}}') == \
        typed(b'{"success":true,"query_process_status":{"success":false,"error_message":"no such pid"}}')
    assert net.service_call(HUB, b'{"host_name":"nowhere","list_active_processes":{}}') == \
        typed(b'{"success":false,"error_message":"unknown host"}')

    def tool_lines(name):
        result = subprocess.run([cpp(name)], env=net.env, capture_output=True, timeout=WAIT_S)
        assert result.returncode == 0, result
        return set(line for line in result.stdout.decode().splitlines() if "[" not in line)

    assert {"resolver", "process_manager@127.0.0.1", "process_manager_hub", "b0_topic_echo"} <= \
        tool_lines("b0_node_list")
    assert {"resolv", pm, HUB} <= tool_lines("b0_service_list")
    assert {"graph", "process_manager/beacon", "process_manager_hub/active_nodes"} <= tool_lines("b0_topic_list")

    beacon = (b'{"host_name":"127.0.0.1","node_name":"process_manager@127.0.0.1",'
              b'"service_name":"process_manager@127.0.0.1/control"}')
    net.wait_for(lambda: beacon in Path(echo.args_log).read_bytes(), "beacon through our proxy")

    graph = net.graph()
    assert {"node_name": "process_manager_hub", "other_name": pm, "reversed": True} in graph["node_service"]
    assert {"node_name": "b0_topic_echo", "other_name": "process_manager/beacon", "reversed": True} \
        in graph["node_topic"]

    os.kill(hub.pid, signal.SIGINT)
    assert hub.wait(WAIT_S) == 0
    names = {node["node_name"] for node in net.graph()["nodes"]}
    assert "process_manager_hub" not in names


# --- b0-pm call against b0_service_call ---------------------------------------------------

FAKE_SERVICE = "fake/control"
_ZIPPED = zlib.compress(b'{"zipped":true}', 9)
CALL_REPLIES = {
    "typed": envelope(FAKE_SERVICE, b'{"x":1}', PM_RESPONSE),
    "untyped": envelope(FAKE_SERVICE, b'{"x":1}'),
    "binary": envelope(FAKE_SERVICE, b"\x00\xff\n\n", "T"),
    "extra-header": envelope(FAKE_SERVICE, b"ok", "T", "X-Foo: bar\n"),
    "two-parts": (b"fake/control\nPart-count: 2\nContent-length-0: 2\nContent-type-0: A\n"
                  b"Content-length-1: 3\nContent-type-1: B\nContent-length: 5\n\nhiabc"),
    "zlib": (b"fake/control\nPart-count: 1\nContent-length-0: %d\nContent-type-0: Z\n"
             b"Compression-algorithm-0: zlib\nUncompressed-content-length-0: 15\nContent-length: %d\n\n"
             % (len(_ZIPPED), len(_ZIPPED)) + _ZIPPED),
}


@pytest.mark.parametrize("resolver_kind", ["cpp", "py"])
def test_call_matches_b0_service_call(net, resolver_kind):
    net.start_resolver(resolver_kind)
    context = zmq.Context.instance()
    fake = context.socket(zmq.REP)
    fake.linger = 0
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    try:
        for key, body in (("announce_node", {"host_id": "127.0.0.1", "process_id": os.getpid(), "node_name": "fake"}),
                          ("announce_service", {"node_name": "fake", "service_name": FAKE_SERVICE,
                                                "sock_addr": f"tcp://127.0.0.1:{port}"})):
            assert resolver_request(net.address, key, body, timeout=WAIT_S)[key]["ok"]
        for name, reply in CALL_REPLIES.items():
            for content_type in (PM_REQUEST, ""):
                seen = {}
                for tool in ("cpp", "py"):
                    argv = [cpp("b0_service_call"), "-s", FAKE_SERVICE] if tool == "cpp" else \
                        [sys.executable, "-m", "b0_pm", "call", "-s", FAKE_SERVICE, "--timeout", str(WAIT_S)]
                    if content_type:
                        argv += ["-c", content_type]
                    proc = subprocess.Popen(argv, env=net.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE)
                    proc.stdin.write(b'{"list_active_processes":{}}\n')
                    proc.stdin.close()
                    assert fake.poll(int(WAIT_S * 1000)), f"{tool} sent nothing"
                    request = fake.recv()
                    fake.send(reply)
                    out = proc.stdout.read()
                    proc.wait(WAIT_S)
                    proc.stderr.close()
                    proc.stdout.close()
                    seen[tool] = (request, out, proc.returncode)
                assert seen["py"] == seen["cpp"], f"reply {name}, -c {content_type!r}"
    finally:
        fake.close(0)


# --- our PM driven by the C++ tools -------------------------------------------------------

def test_cpp_service_call_and_hub_drive_our_pm(net, tmp_path):
    net.start_resolver("cpp")
    progs = programs_dir(tmp_path)
    start_our_pm(net, progs)
    echo = net.start([cpp("b0_topic_echo"), "process_manager/beacon"])
    hub = net.start([cpp("b0_process_manager_hub")])
    net.wait_nodes("b0_topic_echo", "process_manager_hub")
    pm = "process_manager@127.0.0.1/control"

    assert net.service_call(pm, b'{"list_active_processes":{}}') == typed(b'{"list_active_processes":{"pids":[]}}')
    assert net.service_call(pm, b'{"foo":{}}\n') == typed(b"{}")
    assert net.service_call(pm, b'{"stop_process":{"pid":1}}') == typed(
        b'{"stop_process":{"success":false,"error_message":'
        b'"PID 1 is not managed by this process manager (process_manager@127.0.0.1)"}}')
    out = net.service_call(pm, b'{"start_process":{"path":"%s/sleep","args":["30"]}}' % str(progs).encode())
    match = re.fullmatch(rb'Content-type: b0::process_manager::Response\n'
                         rb'\{"start_process":\{"success":true,"pid":(\d+)\}\}', out)
    assert match, out
    pid = match.group(1)
    assert net.service_call(pm, b'{"query_process_status":{"pid":%s}}' % pid) == \
        typed(b'{"query_process_status":{"success":true,"running":true}}')

    beacon = (b'{"host_name":"127.0.0.1","node_name":"process_manager@127.0.0.1",'
              b'"service_name":"process_manager@127.0.0.1/control"}')
    net.wait_for(lambda: beacon in Path(echo.args_log).read_bytes(), "our beacon at b0_topic_echo")
    net.wait_for(lambda: b"added new entry: 127.0.0.1" in Path(hub.args_log).read_bytes(), "C++ HUB sees our PM")

    assert net.service_call(HUB, b'{"host_name":"127.0.0.1","list_active_processes":{}}') == \
        typed(b'{"success":true,"list_active_processes":{"pids":[%s]}}' % pid)
    assert net.service_call(HUB, b'{"host_name":"127.0.0.1","stop_process":{"pid":%s}}' % pid) == \
        typed(b'{"success":true,"stop_process":{"success":true}}')
    assert net.service_call(HUB, b'{"host_name":"127.0.0.1"}') == typed(b'{"success":true}')


# --- our HUB in front of the C++ PM ------------------------------------------------------

def test_our_hub_with_cpp_pm(net, tmp_path):
    net.start_resolver("cpp")
    directory = start_cpp_pm(net, tmp_path)
    net.py("hub", "--config", "/dev/null")
    net.wait_nodes("process_manager_hub")
    request = b'{"host_name":"127.0.0.1","list_active_processes":{}}'
    net.wait_for(lambda: net.request(HUB, request) == envelope(
        HUB, b'{"success":true,"list_active_processes":{"pids":[]}}', PM_RESPONSE), "our HUB sees the C++ PM")

    assert net.service_call(HUB, b'{"host_name":"nowhere","list_active_processes":{}}') == \
        typed(b'{"success":false,"error_message":"unknown host"}')
    assert net.service_call(HUB, b'{"host_name":"127.0.0.1"}') == typed(b'{"success":true}')
    assert net.service_call(HUB, b'{"host_name":"127.0.0.1","stop_process":{"pid":1}}') == typed(
        b'{"success":true,"stop_process":{"success":false,"error_message":'
        b'"PID 1 is not managed by this process manager (process_manager@127.0.0.1)"}}')
    out = net.service_call(HUB, b'{"host_name":"127.0.0.1","start_process":{"path":"%s/sleep","args":["30"]}}'
                           % str(directory).encode())
    match = re.fullmatch(rb'Content-type: b0::process_manager::Response\n'
                         rb'\{"success":true,"start_process":\{"success":true,"pid":(\d+)\}\}', out)
    assert match, out
    assert net.request(HUB, b'{"host_name":"127.0.0.1","query_process_status":{"pid":%s}}' % match.group(1)) == \
        envelope(HUB, b'{"success":true,"query_process_status":{"success":true,"running":true}}', PM_RESPONSE)


# --- the same requests to both PMs -------------------------------------------------------

@pytest.fixture(scope="module")
def both_pms(tmp_path_factory):
    """Our resolver, the C++ PM as host 'localhost', ours as '127.0.0.1', same program directory."""
    cpp("b0_process_manager")
    tmp = tmp_path_factory.mktemp("both_pms")
    network = Network(tmp)
    try:
        network.start_resolver("py")
        directory = start_cpp_pm(network, tmp, host_id="localhost")
        start_our_pm(network, directory)
        yield network, directory
    finally:
        network.stop_all()


def _normalized(frame: bytes) -> bytes:
    frame = frame.replace(b"process_manager@localhost", b"PM").replace(b"process_manager@127.0.0.1", b"PM")
    frame = re.sub(rb'"pid":\d+', b'"pid":N', frame)
    frame = re.sub(rb"PID \d+", b"PID N", frame)
    return re.sub(rb"Content-length(-0)?: \d+", rb"Content-length\1: N", frame)


def _ask_both(network: Network, payload: bytes) -> tuple[bytes, bytes]:
    theirs = network.request("process_manager@localhost/control", payload)
    ours = network.request("process_manager@127.0.0.1/control", payload)
    return _normalized(theirs), _normalized(ours)


SAME_REPLY = [
    b'{"list_active_processes":{}}',
    b'{"list_active_processes":{}}\n',
    b"{}",
    b'{"foo":{}}',
    b'{"query_process_status":{"pid":1}}',
    b'{"stop_process":{"pid":1}}',
    b'{"list_active_processes":{},"stop_process":{"pid":1}}',
    b'  {\n "query_process_status" : { "pid" : 1, "x": [1] }\n}\n',
    b'{"query_process_status":{"pid":1e0}}',
    b'{"start_process":{"path":"$DIR/true","args":[]}}',
    b'{"start_process":{"path":"$DIR/true","args":["a b","\\u00e9"]}}',
]


@pytest.mark.parametrize("payload", SAME_REPLY, ids=lambda p: p.decode()[:60])
def test_pm_reply_matches_cpp_pm(both_pms, payload):
    network, directory = both_pms
    theirs, ours = _ask_both(network, payload.replace(b"$DIR", str(directory).encode()))
    assert ours == theirs


def test_pm_running_child_matches_cpp_pm(both_pms):
    network, directory = both_pms
    start = b'{"start_process":{"path":"%s/sleep","args":["30"]}}' % str(directory).encode()
    pids = {}
    for name, service in (("cpp", "process_manager@localhost/control"), ("py", "process_manager@127.0.0.1/control")):
        reply = network.request(service, start)
        pids[name] = re.search(rb'"pid":(\d+)', reply).group(1)
    for template in (b'{"query_process_status":{"pid":%s}}', b'{"stop_process":{"pid":%s}}'):
        theirs = network.request("process_manager@localhost/control", template % pids["cpp"])
        ours = network.request("process_manager@127.0.0.1/control", template % pids["py"])
        assert _normalized(ours) == _normalized(theirs)


# Differences that no document of this project declares deliberate (see docs/PROTOCOL.md).
@pytest.mark.parametrize("path", [b"/bin/true", b"true"])
def test_pm_permission_denied_keeps_the_cpp_prefix_and_says_why(both_pms, path):
    # Deliberate: the original sends exactly "permission denied"; ours adds ": <why>".
    network, _ = both_pms
    request = b'{"start_process":{"path":"%s","args":[]}}' % path
    theirs, ours = (b0_envelope.decode(network.request(service, request)).payload for service in
                    ("process_manager@localhost/control", "process_manager@127.0.0.1/control"))
    assert theirs == b'{"start_process":{"success":false,"error_message":"permission denied"}}'
    reply = json.loads(ours)["start_process"]
    assert reply["success"] is False
    assert reply["error_message"].startswith("permission denied: ")


@pytest.mark.xfail(strict=True, reason="the C++ integer codec truncates 1.9 to 1; pm-request.json "
                                       "refuses a fraction ('must be a whole number')")
def test_pm_fractional_pid_matches_cpp_pm(both_pms):
    network, _ = both_pms
    theirs, ours = _ask_both(network, b'{"query_process_status":{"pid":1.9}}')
    assert ours == theirs


@pytest.mark.xfail(strict=True, reason="protocol.py _stop answers success:true for a retained exit record; "
                                       "the C++ PM answers 'PID N is not managed ...' once the child is reaped")
def test_pm_stop_after_exit_matches_cpp_pm(both_pms):
    network, directory = both_pms
    start = b'{"start_process":{"path":"%s/true","args":[]}}' % str(directory).encode()
    pids = {name: re.search(rb'"pid":(\d+)', network.request(service, start)).group(1)
            for name, service in (("cpp", "process_manager@localhost/control"),
                                  ("py", "process_manager@127.0.0.1/control"))}
    time.sleep(1.0)
    theirs = network.request("process_manager@localhost/control", b'{"stop_process":{"pid":%s}}' % pids["cpp"])
    ours = network.request("process_manager@127.0.0.1/control", b'{"stop_process":{"pid":%s}}' % pids["py"])
    assert _normalized(ours) == _normalized(theirs)
