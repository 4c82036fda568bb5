"""`b0-pm call` against stand-ins that replay the C++ replies of the captured
session (spec wire-dump.txt): every request our node sends must equal, byte
for byte, what C++ b0_service_call sent (only the process id differs)."""

import os
import subprocess
import sys
import threading

import zmq

from b0_pm.b0 import envelope, jsoncodec
from tests.fixtures_b0 import REPO_ROOT, free_port
from tests.test_b0_envelope import WIRE_DUMP_FRAMES

CAPTURED_PID = b"13950"


def captured(predicate) -> bytes:
    return next(f for f in WIRE_DUMP_FRAMES if predicate(f))


def with_pid(frame: bytes, pid: int) -> bytes:
    """The captured frame with our process id, lengths adjusted."""
    head, payload = frame.split(b"\n\n", 1)
    new_payload = payload.replace(CAPTURED_PID, str(pid).encode())
    old_len, new_len = b"%d" % len(payload), b"%d" % len(new_payload)
    head = head.replace(b"Content-length-0: " + old_len, b"Content-length-0: " + new_len)
    head = head.replace(b"Content-length: " + old_len, b"Content-length: " + new_len)
    return head + b"\n\n" + new_payload


class StandIns(threading.Thread):
    """A ROUTER playing the resolver and one playing the PM; they record every request."""

    def __init__(self, replies: dict[bytes, bytes]):
        super().__init__(daemon=True)
        self.replies = replies
        self.context = zmq.Context()
        self.resolver = self.context.socket(zmq.ROUTER)
        self.pm = self.context.socket(zmq.ROUTER)
        self.resolver_port = self.resolver.bind_to_random_port("tcp://127.0.0.1")
        self.pm_port = self.pm.bind_to_random_port("tcp://127.0.0.1")
        self.received: list[tuple[str, bytes, bytes]] = []  # (which, peer identity, frame)
        self.stopping = threading.Event()

    def run(self) -> None:
        poller = zmq.Poller()
        for sock in (self.resolver, self.pm):
            poller.register(sock, zmq.POLLIN)
        while not self.stopping.is_set():
            for sock, _ in poller.poll(50):
                identity, delimiter, frame = sock.recv_multipart()
                self.received.append(("pm" if sock is self.pm else "resolver", identity, frame))
                key = next(k for k in self.replies if k in frame)
                sock.send_multipart([identity, delimiter, self.replies[key]])

    def close(self) -> None:
        self.stopping.set()
        self.join(5)
        self.resolver.close(0)
        self.pm.close(0)
        self.context.term()


def resolver_reply(payload: bytes) -> bytes:
    return envelope.encode("resolv", payload, "b0.message.resolv.Response")


def test_b0_pm_call_sends_what_b0_service_call_sent():
    announce_reply = envelope.decode(captured(lambda f: b'"xsub_sock_addr":"tcp://vm:56161"' in f
                                              and b"b0_service_call" in f))
    dead_port = free_port()
    replies = {
        b'{"announce_node"': resolver_reply(announce_reply.payload.replace(
            b"tcp://vm:56161", b"tcp://127.0.0.1:%d" % dead_port).replace(
            b"tcp://vm:42431", b"tcp://127.0.0.1:%d" % dead_port)),
        b'{"heartbeat"': captured(lambda f: f.endswith(b'{"heartbeat":{"ok":true,"time_usec":1795809786520025}}')),
        b'{"node_service"': captured(lambda f: f.endswith(b'{"node_service":{}}')),
        b'{"shutdown_node"': captured(lambda f: f.endswith(b'{"shutdown_node":{"ok":true}}')),
        b'{"start_process"': captured(lambda f: f.endswith(b'{"start_process":{"success":true,"pid":13954}}')),
    }
    stand_ins = StandIns(replies)
    replies[b'{"resolve_service"'] = resolver_reply(jsoncodec.dumps(
        {"resolve_service": {"ok": True, "sock_addr": f"tcp://127.0.0.1:{stand_ins.pm_port}"}}))
    stand_ins.start()
    try:
        env = dict(os.environ, B0_RESOLVER=f"tcp://127.0.0.1:{stand_ins.resolver_port}", B0_HOST_ID="vm",
                   B0PM_BIND_HOST="127.0.0.1", PYTHONPATH=str(REPO_ROOT))
        proc = subprocess.Popen(
            [sys.executable, "-m", "b0_pm", "call", "-s", "process_manager@vm/control",
             "-c", "b0::process_manager::Request"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO_ROOT)
        out, err = proc.communicate(b'{"start_process":{"path":"/opt/b0nodes/bin/sleep","args":["2"]}}\n',
                                    timeout=30)
        assert proc.returncode == 0, err
        assert out == b'Content-type: b0::process_manager::Response\n{"start_process":{"success":true,"pid":13954}}'
    finally:
        stand_ins.close()

    main_peer = stand_ins.received[0][1]
    main = [frame for which, peer, frame in stand_ins.received if which == "resolver" and peer == main_peer]
    heartbeats = [frame for which, peer, frame in stand_ins.received if which == "resolver" and peer != main_peer]
    to_pm = [frame for which, _, frame in stand_ins.received if which == "pm"]

    service_call = lambda *parts: captured(lambda f: all(p in f for p in parts))  # noqa: E731
    assert main == [
        with_pid(service_call(b'"process_id":13950'), proc.pid),
        service_call(b'{"resolve_service":{"service_name":"process_manager@vm/control"}}'),
        service_call(b'"node_name":"b0_service_call"', b'"active":true'),
        service_call(b'"node_name":"b0_service_call"', b'"active":false'),
        service_call(b'{"shutdown_node":{"node_name":"b0_service_call"}}'),
    ]
    assert heartbeats == [service_call(b'{"heartbeat":{"node_name":"b0_service_call"}}')]
    assert to_pm == [service_call(b'{"start_process":{"path":"/opt/b0nodes/bin/sleep","args":["2"]}}\n')]
