"""The HUB on loopback: a real resolver, real PMs (`b0-pm serve --backend
local`) and `b0-pm hub`, all as processes, driven through raw REQ sockets
exactly as a C++ client would.

The two PMs are two "hosts" on one machine: B0_HOST_ID 127.0.0.2 and
127.0.0.3, each bound on its own loopback address, so the addresses they
advertise are reachable and distinct.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from b0_pm import protocol
from b0_pm.b0 import envelope, jsoncodec
from tests.fixtures_b0 import NodeThread, REPO_ROOT, req_exchange, resolver_request, start_resolver
from tests.polling import wait_until

HUB_SERVICE = "process_manager_hub/control"
ACTIVE_NODES_TOPIC = "process_manager_hub/active_nodes"
REQUEST_TYPE = "b0::process_manager::Request"
RESPONSE_TYPE = "b0::process_manager::Response"
ALPHA, BETA = "127.0.0.2", "127.0.0.3"
STARTUP_S = 15.0
SLEEPER = "#!/bin/sh\nexec sleep 600\n"


def pm_service(host: str, suffix: str = "") -> str:
    return f"process_manager@{host}{suffix}/control"



class HubLab:
    """A resolver, PMs by host id, and a HUB; close() ends every process by pid."""

    def __init__(self, workdir: Path, resolver_heartbeat_us: int = 30_000_000):
        self.workdir = workdir
        self.bin_dir = workdir / "bin"
        self.bin_dir.mkdir()
        self.sleeper = self.bin_dir / "sleeper"
        self.sleeper.write_text(SLEEPER)
        self.sleeper.chmod(0o755)
        self.resolver = start_resolver(resolver_heartbeat_us)
        self.pms: dict[str, subprocess.Popen] = {}
        self.hub: subprocess.Popen | None = None
        self.hub_address: str | None = None
        self.started_pids: list[int] = []
        self._processes: list[subprocess.Popen] = []

    def _spawn(self, argv: list[str], env: dict, log_name: str) -> subprocess.Popen:
        log = open(self.workdir / log_name, "ab")
        process = subprocess.Popen(argv, env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._processes.append(process)
        return process

    def start_pm(self, host: str) -> subprocess.Popen:
        env = dict(self.resolver.env, B0_HOST_ID=host, B0PM_BIND_HOST=host)
        self.pms[host] = self._spawn(
            [sys.executable, "-m", "b0_pm", "serve", "--config", os.devnull, "--backend", "local",
             "--allow", str(self.bin_dir)], env, f"pm-{host}.log")
        return self.pms[host]

    def start_hub(self, args=(), **settings) -> None:
        """`b0-pm hub ARGS` with [hub] settings from a config file; waits for sd_notify READY."""
        config = self.workdir / "hub.toml"
        config.write_text("[hub]\n" + "".join(f"{key} = {value}\n" for key, value in settings.items()))
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_name = f"@b0pm-test-hub-{os.getpid()}-{id(self)}"
        notify.bind("\0" + notify_name[1:])
        notify.settimeout(STARTUP_S)
        try:
            env = dict(self.resolver.env, NOTIFY_SOCKET=notify_name)
            self.hub = self._spawn([sys.executable, "-m", "b0_pm", "hub", "--config", str(config), *args],
                                   env, "hub.log")
            while not notify.recv(4096).startswith(b"READY=1"):
                pass  # STATUS= lines while it waits
        finally:
            notify.close()
        reply = resolver_request(self.resolver.address, "resolve_service", {"service_name": HUB_SERVICE})
        self.hub_address = reply["resolve_service"]["sock_addr"]

    # -- talking to the HUB ---------------------------------------------------

    def exchange(self, frame: bytes | list[bytes], timeout: float = 10.0) -> tuple[str, bytes]:
        """One raw exchange with the HUB: (reply content type, reply payload)."""
        frames = req_exchange(self.hub_address, frame, timeout)
        assert frames is not None, f"the HUB did not answer within {timeout} s"
        reply = envelope.decode(frames[0])
        assert reply.header0 == HUB_SERVICE
        return reply.content_type, reply.payload

    def call_raw(self, payload: bytes, content_type: str = REQUEST_TYPE, timeout: float = 10.0) -> bytes:
        reply_type, reply = self.exchange(envelope.encode(HUB_SERVICE, payload, content_type), timeout)
        assert reply_type == RESPONSE_TYPE
        return reply

    def call(self, request: dict, timeout: float = 10.0) -> dict:
        return jsoncodec.loads(self.call_raw(jsoncodec.dumps(request), timeout=timeout))

    def hosts(self) -> dict[str, dict]:
        reply = self.call({"list_hosts": {}})
        assert reply["success"] is True, reply
        return {entry["host_name"]: entry for entry in reply["list_hosts"]["hosts"]}

    def wait_for_hosts(self, services: dict[str, str], timeout: float = STARTUP_S) -> dict[str, dict]:
        def known():
            hosts = self.hosts()
            matches = all(host in hosts and hosts[host]["service_name"] == service
                          for host, service in services.items())
            return [hosts] if matches else None
        return wait_until(known, timeout, f"the HUB to know {services}", interval=0.1)[0]

    def start_sleeper(self, host: str) -> int:
        reply = self.call({"host_name": host, "start_process": {"path": str(self.sleeper), "args": []}})
        assert reply["success"] is True and reply["start_process"]["success"] is True, reply
        pid = reply["start_process"]["pid"]
        self.started_pids.append(pid)
        return pid

    # -- teardown ---------------------------------------------------------------

    def kill_pm(self, host: str) -> None:
        process = self.pms.pop(host)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

    def close(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.terminate()
        for process in self._processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in self.started_pids:
            # Only our own test program: the pid may have been reused since.
            try:
                if str(self.sleeper) in Path(f"/proc/{pid}/cmdline").read_text():
                    os.kill(pid, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass
        self.resolver.stop()


def make_lab(tmp_path: Path, hosts=(ALPHA, BETA), hub_args=(), **hub_settings) -> HubLab:
    lab = HubLab(tmp_path)
    try:
        for host in hosts:
            lab.start_pm(host)
        lab.start_hub(hub_args, **hub_settings)
        lab.wait_for_hosts({host: pm_service(host) for host in hosts})
    except BaseException:
        lab.close()
        raise
    return lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Shared by the tests that leave every process running."""
    lab = make_lab(tmp_path_factory.mktemp("hub"), forward_timeout_seconds=3, host_expiry_seconds=30)
    yield lab
    lab.close()


@pytest.fixture
def fresh_lab(tmp_path_factory):
    """For tests that kill PMs: make_lab(**hub settings), closed after the test."""
    labs = []

    def make(hosts=(ALPHA, BETA), hub_args=(), **hub_settings) -> HubLab:
        labs.append(make_lab(tmp_path_factory.mktemp("hub"), hosts, hub_args, **hub_settings))
        return labs[-1]

    yield make
    for lab in labs:
        lab.close()


# --- forwarding ---------------------------------------------------------------

@pytest.mark.parametrize("host", [ALPHA, BETA])
def test_start_query_stop_list_on_each_host(lab, host):
    pid = lab.start_sleeper(host)

    status = lab.call({"host_name": host, "query_process_status": {"pid": pid}})
    assert status == {"success": True, "query_process_status": {"success": True, "running": True}}
    listing = lab.call({"host_name": host, "list_active_processes": {}})
    assert listing["success"] is True and pid in listing["list_active_processes"]["pids"]
    other = ALPHA if host == BETA else BETA
    assert pid not in lab.call({"host_name": other, "list_active_processes": {}})["list_active_processes"]["pids"]

    assert lab.call_raw(jsoncodec.dumps({"host_name": host, "stop_process": {"pid": pid}})) == \
        b'{"success":true,"stop_process":{"success":true}}'

    def stopped():
        reply = lab.call({"host_name": host, "query_process_status": {"pid": pid}})
        return reply["query_process_status"].get("running") is False and reply
    final = wait_until(stopped, 10, f"pid {pid} to stop")
    assert final["success"] is True
    listing = lab.call({"host_name": host, "list_active_processes": {}})
    assert pid not in listing["list_active_processes"]["pids"]


def test_reply_bytes_are_in_codec_order(lab):
    payload = jsoncodec.dumps({"host_name": ALPHA, "start_process": {"path": str(lab.sleeper), "args": []}})
    reply = lab.call_raw(payload)
    pid = jsoncodec.loads(reply)["start_process"]["pid"]
    lab.started_pids.append(pid)
    assert reply == b'{"success":true,"start_process":{"success":true,"pid":%d}}' % pid
    lab.call({"host_name": ALPHA, "stop_process": {"pid": pid}})


def test_refusal_by_the_pm_is_passed_through(lab):
    reply = lab.call({"host_name": ALPHA, "start_process": {"path": "/bin/true", "args": []}})
    assert reply["success"] is True  # the HUB served it; the PM refused
    assert reply["start_process"]["success"] is False
    assert reply["start_process"]["error_message"]
    reply = lab.call({"host_name": BETA, "query_process_status": {"pid": 999999}})
    assert reply == {"success": True, "query_process_status": {"success": False, "error_message": "no such pid"}}


def test_first_operation_wins_as_in_the_original(lab):
    # list comes after query in codec order, whatever the order of the client's keys.
    payload = b'{"list_active_processes":{},"host_name":"%s","query_process_status":{"pid":999999}}' % BETA.encode()
    reply = jsoncodec.loads(lab.call_raw(payload))
    assert list(reply) == ["success", "query_process_status"]


def test_unknown_host_is_the_originals_reply(lab):
    assert lab.call_raw(b'{"host_name":"nowhere","list_active_processes":{}}') == \
        b'{"success":false,"error_message":"unknown host"}'


def test_request_without_operation_gets_bare_success(lab):
    assert lab.call_raw(b'{"host_name":"%s"}' % ALPHA.encode()) == b'{"success":true}'


# --- bad input ----------------------------------------------------------------

def _frame(payload: bytes, content_type: str | None = REQUEST_TYPE, header0: str = HUB_SERVICE) -> bytes:
    return envelope.encode(header0, payload, content_type or "")


BAD_REQUESTS = {
    "invalid JSON": _frame(b'{"host_name":'),
    "JSON array": _frame(b'[]'),
    "not UTF-8": _frame(b'{"host_name":"\xff"}'),
    "wrong content type": _frame(b'{"host_name":"x"}', "b0::process_manager::Beacon"),
    "no content type": _frame(b'{"host_name":"x"}', None),
    "missing host_name": _frame(b'{"list_active_processes":{}}'),
    "host_name not a string": _frame(b'{"host_name":7,"list_active_processes":{}}'),
    "host_name null": _frame(b'{"host_name":null}'),
    "pid as string": _frame(b'{"host_name":"127.0.0.2","stop_process":{"pid":"1"}}'),
    "start without args": _frame(b'{"host_name":"127.0.0.2","start_process":{"path":"/bin/true"}}'),
    "operation not an object": _frame(b'{"host_name":"127.0.0.2","list_active_processes":[]}'),
    "* with start_process": _frame(b'{"host_name":"*","start_process":{"path":"/bin/true","args":[]}}'),
    "no blank line": HUB_SERVICE.encode() + b"\nPart-count: 1\n",
    "no Part-count": HUB_SERVICE.encode() + b"\nContent-length-0: 2\n\n{}",
    "wrong header0": _frame(b'{"host_name":"x"}', header0="somebody_else/control"),
    "two frames": [_frame(b'{}'), b"extra"],
    "empty frame": b"",
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_gets_an_error_reply(lab, name):
    reply_type, payload = lab.exchange(BAD_REQUESTS[name])
    assert reply_type == RESPONSE_TYPE
    reply = jsoncodec.loads(payload)
    assert list(reply) == ["success", "error_message"]
    assert reply["success"] is False
    assert reply["error_message"].startswith("bad request: "), reply


def test_hub_still_serves_after_bad_input(lab):
    for frame in BAD_REQUESTS.values():
        lab.exchange(frame)
    assert lab.hub.poll() is None
    assert lab.call({"host_name": ALPHA, "list_active_processes": {}})["success"] is True


def test_mutated_requests_never_break_the_hub(lab):
    rng = random.Random(4242)
    seeds = [jsoncodec.dumps(request) for request in (
        {"host_name": ALPHA, "query_process_status": {"pid": 1}},
        {"host_name": BETA, "stop_process": {"pid": 999999}},
        {"host_name": "*", "list_active_processes": {}},
        {"list_hosts": {}},
    )]
    for _ in range(300):
        payload = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(len(payload))
            if rng.random() < 0.7:
                payload[position] = rng.randrange(256)
            else:
                del payload[position:]
                break
        reply = jsoncodec.loads(lab.call_raw(bytes(payload)))
        assert isinstance(reply.get("success"), bool), (payload, reply)
    assert lab.hub.poll() is None
    assert lab.call({"host_name": ALPHA, "list_active_processes": {}})["success"] is True


def test_bad_beacons_are_dropped_and_change_nothing(lab):
    bad_beacons = [
        (b"{not json", "b0::process_manager::Beacon"),
        (b"[]", "b0::process_manager::Beacon"),
        (b'{"host_name":"x","node_name":"n"}', "b0::process_manager::Beacon"),
        (b'{"host_name":7,"node_name":"n","service_name":"s"}', "b0::process_manager::Beacon"),
        (b'{"host_name":"x","node_name":"n","service_name":"nobody/control"}', "wrong::Type"),
        (b'{"host_name":"x","node_name":"n","service_name":"nobody/control"}', "b0::process_manager::Beacon"),
        (b'{"host_name":"*","node_name":"n","service_name":"process_manager_hub/control"}',
         "b0::process_manager::Beacon"),
        (b'{"host_name":"%s","node_name":"n","service_name":"nobody/control"}' % ALPHA.encode(),
         "b0::process_manager::Beacon"),
    ]

    def build(node):
        publisher = node.publisher("process_manager/beacon")
        node.loop.call_every(0.05, lambda: [publisher.publish(payload, ctype) for payload, ctype in bad_beacons])

    before = lab.hosts()
    with NodeThread("hub_test_bad_beacons", build, resolver=lab.resolver.address,
                    host_id="127.0.0.1", bind_host="127.0.0.1"):
        time.sleep(1.5)
        after = lab.hosts()
    assert lab.hub.poll() is None
    assert list(after) == list(before) == [ALPHA, BETA]
    assert after[ALPHA]["service_name"] == pm_service(ALPHA)  # the live PM keeps its host
    assert lab.call({"host_name": ALPHA, "list_active_processes": {}})["success"] is True


# --- topics -------------------------------------------------------------------

def test_active_nodes_names_every_pm(lab):
    messages = []
    received = threading.Event()

    def on_message(env):
        messages.append(env)
        received.set()

    node_kwargs = dict(resolver=lab.resolver.address, host_id="127.0.0.1", bind_host="127.0.0.1")
    with NodeThread("hub_test_listener", lambda node: node.subscriber(ACTIVE_NODES_TOPIC, on_message),
                    **node_kwargs):
        assert received.wait(5), "no active_nodes message within 5 s"
    env = messages[-1]
    assert env.content_type == "b0::process_manager::ActiveNodes"
    document = jsoncodec.loads(env.payload)
    protocol.validator("active-nodes.json").validate(document)
    assert [entry["host_name"] for entry in document["nodes"]] == [ALPHA, BETA]
    for entry in document["nodes"]:
        assert entry["node_name"] == f"process_manager@{entry['host_name']}"
        assert entry["service_name"] == pm_service(entry["host_name"])
        assert abs(entry["last_active"] / 1e6 - time.time()) < 5
    assert list(document["nodes"][0]) == ["host_name", "node_name", "service_name", "last_active"]


# --- extensions -----------------------------------------------------------------

@pytest.mark.parametrize("request_object", [{"list_hosts": {}}, {"host_name": "*", "list_hosts": {}}])
def test_list_hosts(lab, request_object):
    reply = lab.call(request_object)
    assert reply["success"] is True
    hosts = reply["list_hosts"]["hosts"]
    assert [entry["host_name"] for entry in hosts] == [ALPHA, BETA]
    assert hosts[1]["node_name"] == f"process_manager@{BETA}"
    assert hosts[1]["service_name"] == pm_service(BETA)
    assert abs(hosts[1]["last_active"] / 1e6 - time.time()) < 5


def test_list_hosts_of_one_host(lab):
    reply = lab.call({"host_name": BETA, "list_hosts": {}})
    assert [entry["host_name"] for entry in reply["list_hosts"]["hosts"]] == [BETA]
    assert lab.call({"host_name": "nowhere", "list_hosts": {}}) == {"success": False, "error_message": "unknown host"}


def test_list_active_processes_everywhere(lab):
    pid = lab.start_sleeper(BETA)
    try:
        reply = lab.call({"host_name": "*", "list_active_processes": {}})
        protocol.validator("hub-response.json").validate(reply)
        assert reply["success"] is True
        assert [entry["host_name"] for entry in reply["hosts"]] == [ALPHA, BETA]
        assert all(entry["success"] for entry in reply["hosts"])
        assert pid in reply["hosts"][1]["list_active_processes"]["pids"]
        assert pid not in reply["hosts"][0]["list_active_processes"]["pids"]
    finally:
        lab.call({"host_name": BETA, "stop_process": {"pid": pid}})


# --- a PM dies, comes back, goes silent ---------------------------------------------

FORWARD_TIMEOUT_S = 1.5


def test_dead_pm_times_out_while_the_other_host_keeps_working(fresh_lab):
    # The command-line flag wins over the file.
    lab = fresh_lab(hub_args=("--forward-timeout", str(FORWARD_TIMEOUT_S)), forward_timeout_seconds=9,
                    host_expiry_seconds=30)
    lab.kill_pm(BETA)
    expected = (f"host {BETA} (service {pm_service(BETA)}) did not answer within "
                f"{FORWARD_TIMEOUT_S:g} s")

    results = {}

    def ask_beta(index):
        started = time.monotonic()
        results[index] = (lab.call({"host_name": BETA, "list_active_processes": {}}),
                          time.monotonic() - started)

    # Three at once: queued behind each other, yet each is answered within its own deadline.
    askers = [threading.Thread(target=ask_beta, args=(i,)) for i in range(3)]
    for asker in askers:
        asker.start()
    alpha_latencies = []
    while any(asker.is_alive() for asker in askers):
        started = time.monotonic()
        reply = lab.call({"host_name": ALPHA, "list_active_processes": {}})
        alpha_latencies.append(time.monotonic() - started)
        assert reply["success"] is True, reply
    for asker in askers:
        asker.join()

    for reply, elapsed in results.values():
        assert reply == {"success": False, "error_message": expected}
        assert FORWARD_TIMEOUT_S - 0.1 <= elapsed <= FORWARD_TIMEOUT_S + 1.0, elapsed
    assert len(alpha_latencies) >= 5
    assert max(alpha_latencies) < 0.5, alpha_latencies

    # The HUB rebuilt its socket and still serves; the dead host still times out.
    started = time.monotonic()
    assert lab.call({"host_name": BETA, "list_active_processes": {}})["error_message"] == expected
    assert time.monotonic() - started <= FORWARD_TIMEOUT_S + 1.0

    # Restarted before the resolver forgets the old one: a suffixed name and a new port, followed.
    old_address = resolver_request(lab.resolver.address, "resolve_service",
                                   {"service_name": pm_service(BETA)})["resolve_service"]["sock_addr"]
    lab.start_pm(BETA)
    hosts = lab.wait_for_hosts({BETA: pm_service(BETA, "-1")})
    assert hosts[BETA]["node_name"] == f"process_manager@{BETA}-1"
    new_address = resolver_request(lab.resolver.address, "resolve_service",
                                   {"service_name": pm_service(BETA, "-1")})["resolve_service"]["sock_addr"]
    assert new_address != old_address
    pid = lab.start_sleeper(BETA)
    listing = lab.call({"host_name": BETA, "list_active_processes": {}})
    assert listing["success"] is True and pid in listing["list_active_processes"]["pids"]
    lab.call({"host_name": BETA, "stop_process": {"pid": pid}})


def test_silent_host_expires(fresh_lab):
    expiry_s = 1.0
    lab = fresh_lab(hub_args=("--host-expiry", str(expiry_s)), forward_timeout_seconds=10)
    lab.kill_pm(BETA)
    killed = time.monotonic()
    # A request in flight when the host expires is answered then, not after the 10 s timeout.
    reply = lab.call({"host_name": BETA, "list_active_processes": {}})
    assert reply == {"success": False, "error_message":
                     f"host {BETA} (service {pm_service(BETA)}) stopped beaconing and was dropped before answering"}
    wait_until(lambda: BETA not in lab.hosts(), 3, "beta to expire")
    assert time.monotonic() - killed <= expiry_s * 1.25 + 0.5
    assert lab.call_raw(b'{"host_name":"%s"}' % BETA.encode()) == b'{"success":false,"error_message":"unknown host"}'
    assert list(lab.hosts()) == [ALPHA]
    # It comes back as a new entry when it beacons again.
    lab.start_pm(BETA)
    lab.wait_for_hosts({BETA: pm_service(BETA, "-1")})


def test_pm_restarted_under_the_same_name_is_followed_to_its_new_port(fresh_lab):
    # A clean stop frees the name at the resolver: the new PM has the old name and a new port.
    lab = fresh_lab(hosts=(ALPHA,), forward_timeout_seconds=FORWARD_TIMEOUT_S, host_expiry_seconds=30)
    def address():
        return resolver_request(lab.resolver.address, "resolve_service",
                                {"service_name": pm_service(ALPHA)})["resolve_service"]["sock_addr"]
    old_address = address()
    process = lab.pms.pop(ALPHA)
    process.terminate()
    assert process.wait(10) == 0
    lab.start_pm(ALPHA)
    wait_until(lambda: resolver_request(lab.resolver.address, "resolve_service",
                                        {"service_name": pm_service(ALPHA)})["resolve_service"]["ok"],
               STARTUP_S, "the restarted PM to register")
    assert address() != old_address
    time.sleep(0.5)  # the graph message naming the new process reaches the HUB
    reply = lab.call({"host_name": ALPHA, "list_active_processes": {}})
    assert reply == {"success": True, "list_active_processes": {"pids": []}}


# --- misbehaving PMs: real b0 nodes that answer wrongly on purpose --------------------

class StandInPM:
    """A b0 node beaconing for `host` and serving `<node>/control` with answer(request)."""

    def __init__(self, lab: HubLab, host: str, node_name: str, answer):
        self.host = host
        self.beaconing = True

        def build(node):
            node.service_server("%n/control", answer)
            beacons = node.publisher("process_manager/beacon")

            def beacon():
                if self.beaconing:
                    beacons.publish(jsoncodec.dumps({"host_name": host, "node_name": node.name,
                                                     "service_name": f"{node.name}/control"}),
                                    "b0::process_manager::Beacon")
            node.loop.call_every(0.1, beacon)

        self.thread = NodeThread(node_name, build, resolver=lab.resolver.address,
                                 host_id="127.0.0.1", bind_host="127.0.0.1")

    @property
    def service(self) -> str:
        return f"{self.thread.node.name}/control"

    def __enter__(self) -> "StandInPM":
        self.thread.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self.thread.__exit__(*exc_info)


def test_unusable_pm_replies_become_clear_errors(fresh_lab):
    lab = fresh_lab(hosts=(), forward_timeout_seconds=3, host_expiry_seconds=30)

    def wrong_type(request):
        request.reply(b'{"list_active_processes":{"pids":[]}}', "wrong::Type")

    def not_json(request):
        request.reply(b"{oops", RESPONSE_TYPE)

    with StandInPM(lab, "gamma", "standin_gamma", wrong_type) as gamma, \
            StandInPM(lab, "delta", "standin_delta", not_json) as delta:
        lab.wait_for_hosts({"gamma": gamma.service, "delta": delta.service})
        reply = lab.call({"host_name": "gamma", "list_active_processes": {}})
        assert reply == {"success": False, "error_message":
                         f"host gamma (service {gamma.service}) answered with content type 'wrong::Type', "
                         f"expected '{RESPONSE_TYPE}'"}
        reply = lab.call({"host_name": "delta", "list_active_processes": {}})
        assert reply["success"] is False
        assert reply["error_message"].startswith("the process manager sent an unusable reply: ")


def test_request_in_flight_when_the_host_moves_is_answered_at_once(fresh_lab):
    lab = fresh_lab(hosts=(), forward_timeout_seconds=20, host_expiry_seconds=30)
    held = []

    def answer_later(request):
        held.append(request)  # never answered: the PM hangs

    def answer_now(request):
        request.reply(b'{"list_active_processes":{"pids":[]}}', RESPONSE_TYPE)

    with StandInPM(lab, "gamma", "standin_old", answer_later) as old:
        lab.wait_for_hosts({"gamma": old.service})
        in_flight = {}
        asker = threading.Thread(target=lambda: in_flight.update(
            reply=lab.call({"host_name": "gamma", "list_active_processes": {}}, timeout=30)))
        asker.start()
        wait_until(lambda: held, 5, "the request to reach the old PM")
        with StandInPM(lab, "gamma", "standin_new", answer_now) as new:
            # Both beacon: the first one keeps the host.
            time.sleep(1.5)
            assert lab.hosts()["gamma"]["service_name"] == old.service
            old.beaconing = False
            started = time.monotonic()
            asker.join(10)
            assert time.monotonic() - started < 3
            assert in_flight["reply"] == {"success": False, "error_message":
                                          f"host gamma moved from {old.service} to {new.service} before "
                                          f"answering; the request may or may not have been carried out"}
            assert lab.hosts()["gamma"]["service_name"] == new.service
            assert lab.call({"host_name": "gamma", "list_active_processes": {}}) == \
                {"success": True, "list_active_processes": {"pids": []}}


@pytest.mark.parametrize("argv, problem", [
    (["--forward-timeout", "0"], "--forward-timeout-seconds in the command line: must be more than 0"),
    (["--config", "/nonexistent/hub.toml"], "configuration file /nonexistent/hub.toml does not exist"),
])
def test_bad_configuration_is_refused_before_starting(argv, problem):
    done = subprocess.run([sys.executable, "-m", "b0_pm", "hub", *argv], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=30, env=dict(os.environ, B0_RESOLVER="tcp://127.0.0.1:9"))
    assert done.returncode == 2
    assert problem in done.stderr


def test_hub_killed_without_shutdown_waits_for_its_service_name(tmp_path):
    # The dead HUB's service stays registered until the resolver's heartbeat sweep drops it.
    lab = HubLab(tmp_path, resolver_heartbeat_us=1_500_000)
    try:
        lab.start_pm(ALPHA)
        lab.start_hub()
        lab.wait_for_hosts({ALPHA: pm_service(ALPHA)})
        os.kill(lab.hub.pid, signal.SIGKILL)
        lab.hub.wait()
        lab.start_hub()
        assert "process_manager_hub/control" in (tmp_path / "hub.log").read_text().split("trying again")[0]
        lab.wait_for_hosts({ALPHA: pm_service(ALPHA)})
        assert lab.call({"host_name": ALPHA, "list_active_processes": {}})["success"] is True
    finally:
        lab.close()
