"""Hostile input against a running HUB (with a real PM behind it) over real sockets.

tests/test_hub.py sends the HUB one of each known bad input. Here:
hypothesis-mutated HUB requests (one reply each, the HUB keeps forwarding
correctly), 10,000 bad messages with the HUB's RSS compared after 1,000
and after 10,000 (a leak check with a generous bound), and one request
that must not stall the HUB for every host.
"""

from __future__ import annotations

import sys
import time

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from b0_pm.b0 import envelope, jsoncodec
from bench.bench_load import HOST_ID, HUB_SERVICE, REQUEST_TYPE, RESPONSE_TYPE, Rig, rss_kib
from tests.test_pm_support import Control

LONG = "--long" in sys.argv
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    rig = Rig(tmp_path_factory.mktemp("fuzz-hub"), hub=True)
    hub = Control(rig.hub_address, HUB_SERVICE)
    try:
        yield rig, hub
    finally:
        hub.close()
        rig.close()
        print((rig.workdir / "hub.log").read_text(errors="replace")[-3000:])


def frame(payload: bytes, content_type: str = REQUEST_TYPE) -> bytes:
    return envelope.encode(HUB_SERVICE, payload, content_type)


def assert_forwarding(rig, hub) -> None:
    hub_process = rig.processes[0]
    assert hub_process.poll() is None
    reply = hub.call({"host_name": HOST_ID, "query_process_status": {"pid": rig.sleeper_pid}})
    assert reply == {"success": True, "query_process_status": {"success": True, "running": True}}


hub_requests = st.fixed_dictionaries({}, optional={
    "host_name": st.sampled_from([HOST_ID, "*", "", "nope", 7]) | st.text(max_size=4),
    "list_hosts": st.just({}) | st.integers(),
    "list_active_processes": st.just({}) | st.text(max_size=3),
    "query_process_status": st.fixed_dictionaries({"pid": st.integers(-3, 2**32) | st.none()}),
    "stop_process": st.fixed_dictionaries({"pid": st.integers(10**8, 2**31 - 1)}),
    "start_process": st.fixed_dictionaries({"path": st.sampled_from(["/bin/true", "x"]), "args": st.just([])}),
})


@st.composite
def hub_frames(draw):
    data = bytearray(frame(jsoncodec.dumps(draw(hub_requests)), draw(st.sampled_from([REQUEST_TYPE, "", "x"]))))
    for _ in range(draw(st.integers(0, 3))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if draw(st.booleans()):
            data[at] ^= draw(st.integers(1, 255))
        else:
            data[at:at] = draw(st.sampled_from([b"\n\n", b"\0", b"\xff", b'{"a":[[', b"Part-count: 3\n"]))
    return [bytes(data)]


@settings(max_examples=1500 if LONG else 200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(frames=hub_frames())
def test_mutated_hub_requests_get_one_reply_each(rig, frames):
    _, hub = rig
    reply = hub.exchange(frames, timeout=15)
    assert len(reply) == 1
    env = envelope.decode(reply[0])
    assert env.header0 == HUB_SERVICE and env.content_type == RESPONSE_TYPE
    assert isinstance(jsoncodec.loads(env.payload), dict)


def test_still_forwarding_after_the_mutated_requests(rig):
    assert_forwarding(*rig)


BAD = [
    [frame(b'{"host_name":')],
    [frame(b'{"host_name":"%s","list_active_processes":{}}' % HOST_ID.encode(), "text/plain")],
    [frame(b'{"host_name":"\xff"}')],
    [frame(b'{"a":' * 200 + b"1" + b"}" * 200)],
    [frame(b'{"host_name":7}')],
    [frame(b'{"host_name":"nope","list_active_processes":{}}')],
    [frame(b'{"host_name":"%s","query_process_status":{"pid":"1"}}' % HOST_ID.encode())],
    [envelope.encode("someone_else", b"{}", REQUEST_TYPE)],
    [b"garbage"],
    [frame(b"{}"), frame(b"{}")],
]


def blast(address: str, count: int, window: int = 100) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(address)
    sent = received = 0
    try:
        while received < count:
            while sent < count and sent - received < window:
                sock.send_multipart([b"", *BAD[sent % len(BAD)]])
                sent += 1
            assert sock.poll(10_000), f"no reply for 10 s after {received} of {count}"
            sock.recv_multipart()
            received += 1
    finally:
        sock.close(0)


def test_hub_memory_stays_bounded_after_ten_thousand_bad_messages(rig):
    r, hub = rig
    total = 100_000 if LONG else 10_000
    pid = r.processes[0].pid
    blast(r.hub_address, 1000)
    after_1k = rss_kib(pid)
    blast(r.hub_address, total - 1000)
    after_all = rss_kib(pid)
    print(f"HUB RSS after 1,000 bad messages {after_1k} KiB, after {total:,} {after_all} KiB")
    assert after_all - after_1k < 4 * 1024, (after_1k, after_all)
    assert_forwarding(r, hub)


def test_one_oversized_array_does_not_stall_the_hub(rig):
    r, hub = rig
    payload = jsoncodec.dumps({"host_name": HOST_ID,
                               "start_process": {"path": "/bin/true", "args": [""] * 150_000}})
    assert len(frame(payload)) < MiB
    attacker = zmq.Context.instance().socket(zmq.DEALER)
    attacker.linger = 0
    bystander = Control(r.hub_address, HUB_SERVICE)
    try:
        attacker.connect(r.hub_address)
        attacker.send_multipart([b"", frame(payload)])
        time.sleep(0.2)
        try:
            answered = bystander.call({"host_name": HOST_ID, "list_active_processes": {}}, timeout=1.5)
        except TimeoutError:
            answered = None
        assert attacker.poll(120_000), "the oversized request was never answered"
        attacker.recv_multipart()
        assert answered is not None, "the HUB forwarded nothing for 1.5 s"
    finally:
        attacker.close(0)
        bystander.close()
    assert_forwarding(r, hub)
