"""The HUB across machines: three network namespaces on a private bridge.

    hub host (10.231.0.1)   resolver, `b0-pm hub`, the test's clients
    pm host 1 (10.231.0.2)  `b0-pm serve --backend local`, B0_HOST_ID=10.231.0.2
    pm host 2 (10.231.0.3)  the same with 10.231.0.3

B0_HOST_ID is each namespace's address, so every advertised address is
reachable from the others and from nowhere else. The test process has no
address on that network: it talks through small client processes inside
the hub host (see CLIENT below), one per concurrent conversation.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.fixtures_b0 import REPO_ROOT
from tests.polling import wait_until

pytestmark = pytest.mark.netns

RESOLVER_PORT = 22000
HUB_SERVICE = "process_manager_hub/control"
FORWARD_TIMEOUT_S = 1.5
STARTUP_S = 20.0

# A client inside a namespace: one JSON request per stdin line -> one JSON result per stdout line.
CLIENT = r"""
import json, sys, time
import zmq
from b0_pm.b0 import envelope, jsoncodec

context = zmq.Context()

def exchange(address, header0, payload, content_type, timeout):
    sock = context.socket(zmq.REQ)
    sock.linger = 0
    try:
        sock.connect(address)
        sock.send(envelope.encode(header0, payload, content_type))
        if not sock.poll(int(timeout * 1000)):
            return None
        return envelope.decode(sock.recv())
    finally:
        sock.close(0)

def resolve(service, timeout):
    reply = exchange(sys.argv[1], "resolv", jsoncodec.dumps({"resolve_service": {"service_name": service}}),
                     "b0.message.resolv.Request", timeout)
    answer = reply and jsoncodec.loads(reply.payload)["resolve_service"]
    return answer["sock_addr"] if answer and answer["ok"] else None

for line in sys.stdin:
    command = json.loads(line)
    started = time.monotonic()
    address = resolve(command["service"], command["timeout"])
    if address is None:
        result = {"error": "not resolved"}
    elif "request" not in command:
        result = {"address": address}
    else:
        reply = exchange(address, command["service"], jsoncodec.dumps(command["request"]),
                         "b0::process_manager::Request", command["timeout"])
        result = {"error": "no reply"} if reply is None else {
            "content_type": reply.content_type, "reply": jsoncodec.loads(reply.payload)}
    result["elapsed"] = time.monotonic() - started
    print(json.dumps(result), flush=True)
"""


class Client:
    """A CLIENT process inside one namespace; send() and receive() may be split to overlap calls."""

    def __init__(self, host, env: dict):
        self.process = host.popen([sys.executable, "-c", CLIENT, f"tcp://{host.ip}:{RESOLVER_PORT}"],
                                  env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def send(self, request: dict | None, service: str = HUB_SERVICE, timeout: float = 10.0) -> None:
        command = {"service": service, "timeout": timeout}
        if request is not None:
            command["request"] = request
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def receive(self) -> dict:
        line = self.process.stdout.readline()
        assert line, "the client process died"
        return json.loads(line)

    def call(self, request: dict, timeout: float = 10.0) -> dict:
        self.send(request, timeout=timeout)
        result = self.receive()
        assert "reply" in result, result
        assert result["content_type"] == "b0::process_manager::Response"
        return result["reply"]

    def resolve(self, service: str) -> str | None:
        self.send(None, service=service, timeout=2.0)
        return self.receive().get("address")



@pytest.fixture
def workdir():
    # Short path: it holds the sd_notify socket (unix socket paths are limited to 108 bytes).
    path = Path(tempfile.mkdtemp(prefix="b0pm-netns-"))
    yield path
    for child in sorted(path.rglob("*"), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    path.rmdir()


def test_hub_forwards_across_hosts_and_survives_a_dead_pm(netns_hosts, workdir):
    hub_host, pm_host1, pm_host2 = netns_hosts(3)
    bin_dir = workdir / "bin"
    bin_dir.mkdir()
    sleeper = bin_dir / "sleeper"
    sleeper.write_text("#!/bin/sh\nexec sleep 600\n")
    sleeper.chmod(0o755)
    resolver_address = f"tcp://{hub_host.ip}:{RESOLVER_PORT}"
    base_env = {key: value for key, value in os.environ.items()
                if not key.startswith(("B0", "NOTIFY_SOCKET"))}
    base_env.update(PYTHONPATH=str(REPO_ROOT), B0_RESOLVER=resolver_address)

    def env_for(host, **extra) -> dict:
        return dict(base_env, B0_HOST_ID=host.ip, **extra)

    def start_pm(host):
        return host.popen([sys.executable, "-m", "b0_pm", "serve", "--backend", "local",
                           "--allow", str(bin_dir)], env=env_for(host), log=workdir / f"pm-{host.ip}.log",
                          stdin=subprocess.DEVNULL)

    def pm_service(host, suffix=""):
        return f"process_manager@{host.ip}{suffix}/control"

    hub_host.popen([sys.executable, "-m", "b0_pm", "resolver", "--port", str(RESOLVER_PORT)],
                   env=env_for(hub_host), log=workdir / "resolver.log", stdin=subprocess.DEVNULL)
    pms = {host.ip: start_pm(host) for host in (pm_host1, pm_host2)}

    config = workdir / "hub.toml"
    config.write_text(f"[hub]\nforward_timeout_seconds = {FORWARD_TIMEOUT_S}\nhost_expiry_seconds = 30\n")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(workdir / "notify"))
    notify.settimeout(STARTUP_S)
    with notify:
        hub_host.popen([sys.executable, "-m", "b0_pm", "hub", "--config", str(config)],
                       env=env_for(hub_host, NOTIFY_SOCKET=str(workdir / "notify")),
                       log=workdir / "hub.log", stdin=subprocess.DEVNULL)
        assert notify.recv(4096).startswith(b"READY=1")

    client = Client(hub_host, env_for(hub_host))
    slow_client = Client(hub_host, env_for(hub_host))

    def hosts() -> dict:
        reply = client.call({"list_hosts": {}})
        return {entry["host_name"]: entry for entry in reply["list_hosts"]["hosts"]}

    def hosts_served_by(services: dict):
        current = hosts()
        return all(current.get(ip, {}).get("service_name") == s for ip, s in services.items()) and current

    wait_until(lambda: hosts_served_by({pm_host1.ip: pm_service(pm_host1), pm_host2.ip: pm_service(pm_host2)}),
               STARTUP_S, "both PMs at the HUB")
    # Each PM advertises its own namespace's address.
    for host in (pm_host1, pm_host2):
        assert client.resolve(pm_service(host)).startswith(f"tcp://{host.ip}:")

    # start / query / list / stop on each host, through the HUB.
    for host in (pm_host1, pm_host2):
        reply = client.call({"host_name": host.ip, "start_process": {"path": str(sleeper), "args": []}})
        assert reply["success"] is True and reply["start_process"]["success"] is True, reply
        pid = reply["start_process"]["pid"]
        assert client.call({"host_name": host.ip, "query_process_status": {"pid": pid}}) == \
            {"success": True, "query_process_status": {"success": True, "running": True}}
        assert pid in client.call({"host_name": host.ip, "list_active_processes": {}})["list_active_processes"]["pids"]
        assert client.call({"host_name": host.ip, "stop_process": {"pid": pid}}) == \
            {"success": True, "stop_process": {"success": True}}
        wait_until(lambda: client.call({"host_name": host.ip, "query_process_status": {"pid": pid}})
                   ["query_process_status"].get("running") is False, 10, f"pid {pid} to stop")
        assert pid not in client.call({"host_name": host.ip, "list_active_processes": {}})["list_active_processes"]["pids"]

    everywhere = client.call({"host_name": "*", "list_active_processes": {}})
    assert [entry["host_name"] for entry in everywhere["hosts"]] == [pm_host1.ip, pm_host2.ip]
    assert client.call({"host_name": "10.231.0.99"}) == {"success": False, "error_message": "unknown host"}

    # Kill the PM of host 2: its request times out while host 1 keeps answering at once.
    pm_host2.stop(pms[pm_host2.ip], signal.SIGKILL)
    slow_client.send({"host_name": pm_host2.ip, "list_active_processes": {}})
    fast_latencies = []
    deadline = time.monotonic() + FORWARD_TIMEOUT_S - 0.3
    while time.monotonic() < deadline:
        client.send({"host_name": pm_host1.ip, "list_active_processes": {}})
        result = client.receive()
        assert result["reply"]["success"] is True, result
        fast_latencies.append(result["elapsed"])
    slow = slow_client.receive()
    assert slow["reply"] == {"success": False, "error_message":
                             f"host {pm_host2.ip} (service {pm_service(pm_host2)}) did not answer "
                             f"within {FORWARD_TIMEOUT_S:g} s"}
    assert FORWARD_TIMEOUT_S - 0.1 <= slow["elapsed"] <= FORWARD_TIMEOUT_S + 1.0
    assert len(fast_latencies) >= 3 and max(fast_latencies) < 0.5, fast_latencies

    # Restarted while the resolver still holds the old name: the HUB follows the -1 name.
    pms[pm_host2.ip] = start_pm(pm_host2)
    wait_until(lambda: hosts_served_by({pm_host2.ip: pm_service(pm_host2, "-1")}), STARTUP_S,
               "the HUB to follow the restarted PM")
    reply = client.call({"host_name": pm_host2.ip, "start_process": {"path": str(sleeper), "args": []}})
    assert reply["start_process"]["success"] is True, reply
    pid = reply["start_process"]["pid"]
    assert client.call({"host_name": pm_host2.ip, "stop_process": {"pid": pid}})["stop_process"]["success"] is True
