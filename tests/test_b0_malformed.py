"""Every kind of bad input, sent to the resolver (both ports) and to a node's
service server: each gets a clear error reply, and the next good request is
answered correctly (nothing wedges, nothing crashes)."""

import zlib

import pytest
import zmq

from b0_pm.b0 import envelope, jsoncodec
from b0_pm.b0.errors import FieldError
from tests.fixtures_b0 import NodeThread, req_exchange, resolver_request

RESOLV_REQUEST = "b0.message.resolv.Request"
PM_REQUEST = "b0::process_manager::Request"
PM_RESPONSE = "b0::process_manager::Response"


def frame(header0: str, payload: bytes, content_type: str) -> bytes:
    return envelope.encode(header0, payload, content_type)


def envelope_garbage(name: str, content_type: str) -> dict:
    """Bad frames whatever the service; name is the correct header0."""
    n = name.encode()
    ct = content_type.encode()
    bomb = zlib.compress(b"\0" * (4 * 1024 * 1024), 9)
    return {
        "empty frame": [b""],
        "no blank line": [n + b"\nPart-count: 1\nContent-length-0: 2\n"],
        "missing Part-count": [n + b"\nContent-length-0: 2\n\n{}"],
        "Part-count 0": [n + b"\nPart-count: 0\nContent-length: 0\n\n"],
        "Part-count not a number": [n + b"\nPart-count: x\nContent-length-0: 2\n\n{}"],
        "missing Content-length-0": [n + b"\nPart-count: 1\nContent-type-0: " + ct + b"\n\n{}"],
        "non-numeric Content-length-0": [n + b"\nPart-count: 1\nContent-length-0: two\n\n{}"],
        "part runs past the end": [n + b"\nPart-count: 1\nContent-length-0: 99\n\n{}"],
        "line without separator": [n + b"\nPart-count: 1\nContent-length-0 2\n\n{}"],
        "unknown compression": [n + b"\nPart-count: 1\nContent-length-0: 2\nCompression-algorithm-0: rar\n"
                                    b"Uncompressed-content-length-0: 2\n\n{}"],
        "compressed without size": [n + b"\nPart-count: 1\nContent-length-0: 2\n"
                                        b"Compression-algorithm-0: zlib\n\n{}"],
        "corrupt zlib": [n + b"\nPart-count: 1\nContent-length-0: 2\nCompression-algorithm-0: zlib\n"
                             b"Uncompressed-content-length-0: 2\n\n{}"],
        "zip bomb": [n + b"\nPart-count: 1\nContent-length-0: %d\nCompression-algorithm-0: zlib\n"
                         b"Uncompressed-content-length-0: %d\n\n" % (len(bomb), 4 * 1024 * 1024) + bomb],
        "huge frame": [frame(name, b" " * (2 * 1024 * 1024) + b"{}", content_type)],
        "multipart message": [frame(name, b"{}", content_type), frame(name, b"{}", content_type)],
        "header0 not UTF-8": [b"\xff\xfe\nPart-count: 1\nContent-length-0: 2\n\n{}"],
        "wrong header0": [frame("someone_else", b"{}", content_type)],
        "header0 with CR": [frame(name + "\r", b"{}", content_type)],
        "wrong content type": [frame(name, b"{}", "text/plain")],
        "no content type": [frame(name, b"{}", "")],
        "payload not UTF-8": [frame(name, b'{"a":"\xff"}', content_type)],
        "bad JSON": [frame(name, b'{"a":', content_type)],
        "trailing garbage": [frame(name, b'{} {}', content_type)],
        "NaN": [frame(name, b'{"a":NaN}', content_type)],
        "deep nesting": [frame(name, b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}", content_type)],
        "lone surrogate": [frame(name, b'{"a":"\\udc00"}', content_type)],
        "JSON array": [frame(name, b"[1,2]", content_type)],
        "JSON string": [frame(name, b'"hello"', content_type)],
    }


RESOLVER_FIELD_GARBAGE = {
    "null required field": {"announce_node": {"host_id": None, "process_id": 1, "node_name": "x"}},
    "missing required field": {"announce_node": {"host_id": "h", "node_name": "x"}},
    "int as string": {"announce_node": {"host_id": "h", "process_id": "1", "node_name": "x"}},
    "int as bool": {"announce_node": {"host_id": "h", "process_id": True, "node_name": "x"}},
    "int out of range": {"announce_node": {"host_id": "h", "process_id": 2**40, "node_name": "x"}},
    "bool as int": {"node_topic": {"node_name": "n", "topic_name": "t", "reverse": 0, "active": True}},
    "bool as string": {"node_service": {"node_name": "n", "service_name": "s", "reverse": "true",
                                        "active": True}},
    "string as number": {"resolve_service": {"service_name": 5}},
    "string as object": {"heartbeat": {"node_name": {"x": 1}}},
    "sub-request not an object": {"get_graph": []},
    "sub-request null": {"shutdown_node": None},
    "one bad key spoils all": {"announce_node": {"host_id": "h", "process_id": 1, "node_name": "x"},
                               "heartbeat": {}},
}


def assert_error_reply(reply, header0: str, content_type: str) -> str:
    assert reply is not None, "no reply: the server is stuck or dropped the request"
    assert len(reply) == 1
    env = envelope.decode(reply[0])
    assert (env.header0, env.content_type) == (header0, content_type)
    body = jsoncodec.loads(env.payload)
    assert isinstance(body["error_message"], str) and body["error_message"]
    return body["error_message"]


# -- resolver -----------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_resolver():
    from tests.fixtures_b0 import start_resolver
    proc = start_resolver()
    yield proc
    proc.stop()


def resolver_addresses(resolver):
    ephemeral = resolver_request(resolver.address, "resolve_service", {"service_name": "resolv"})
    return [resolver.address, ephemeral["resolve_service"]["sock_addr"]]


def assert_resolver_still_answers(resolver, address):
    reply = resolver_request(address, "heartbeat", {"node_name": "resolver"})
    assert reply["heartbeat"]["ok"] is True


@pytest.mark.parametrize("case", sorted(envelope_garbage("resolv", RESOLV_REQUEST)))
def test_resolver_answers_bad_envelopes_and_keeps_going(shared_resolver, case):
    frames = envelope_garbage("resolv", RESOLV_REQUEST)[case]
    for address in resolver_addresses(shared_resolver):
        message = assert_error_reply(req_exchange(address, frames, timeout=5), "resolv",
                                     "b0.message.resolv.Response")
        assert len(message) < 400
        assert_resolver_still_answers(shared_resolver, address)


@pytest.mark.parametrize("case", sorted(RESOLVER_FIELD_GARBAGE))
def test_resolver_answers_bad_fields_and_keeps_going(shared_resolver, case):
    payload = jsoncodec.dumps(RESOLVER_FIELD_GARBAGE[case])
    reply = req_exchange(shared_resolver.address, frame("resolv", payload, RESOLV_REQUEST))
    message = assert_error_reply(reply, "resolv", "b0.message.resolv.Response")
    assert "'" in message  # names the offending key or field
    # The request was refused as a whole: no node named x was registered.
    graph = resolver_request(shared_resolver.address, "get_graph", {})["get_graph"]["graph"]
    assert "x" not in [n["node_name"] for n in graph["nodes"]]
    assert_resolver_still_answers(shared_resolver, shared_resolver.address)


def test_resolver_error_messages_are_specific(shared_resolver):
    cases = {
        "missing Part-count": "Part-count",
        "wrong header0": "does not match",
        "wrong content type": "bad content type",
        "huge frame": "exceeds the limit",
        "multipart message": "Too many message parts",
        "bad JSON": "json parse error",
        "payload not UTF-8": "UTF-8",
    }
    garbage = envelope_garbage("resolv", RESOLV_REQUEST)
    for case, expected in cases.items():
        reply = req_exchange(shared_resolver.address, garbage[case])
        assert expected in assert_error_reply(reply, "resolv", "b0.message.resolv.Response"), case


def test_dealer_without_delimiter_still_gets_a_reply(shared_resolver):
    context = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    try:
        dealer.connect(shared_resolver.address)
        dealer.send(b"garbage")
        assert dealer.poll(5000)
        reply = dealer.recv_multipart()
        assert_error_reply(reply[-1:], "resolv", "b0.message.resolv.Response")
    finally:
        dealer.close(0)
    assert_resolver_still_answers(shared_resolver, shared_resolver.address)


def test_interleaved_garbage_from_many_clients(shared_resolver):
    context = zmq.Context.instance()
    garbage = list(envelope_garbage("resolv", RESOLV_REQUEST).values())
    good = frame("resolv", b'{"heartbeat":{"node_name":"resolver"}}', RESOLV_REQUEST)
    sockets = []
    try:
        for i in range(20):
            sock = context.socket(zmq.REQ)
            sock.linger = 0
            sock.connect(shared_resolver.address)
            sock.send_multipart(garbage[i % len(garbage)] if i % 2 else [good])
            sockets.append(sock)
        for i, sock in enumerate(sockets):
            assert sock.poll(5000), f"client {i} got no reply"
            env = envelope.decode(sock.recv())
            body = jsoncodec.loads(env.payload)
            assert ("error_message" in body) == bool(i % 2)
    finally:
        for sock in sockets:
            sock.close(0)


# -- a node's service server --------------------------------------------------

def pid_handler(request):
    """Like a PM operation: JSON object with an integer pid."""
    body = jsoncodec.loads(request.payload)
    if not isinstance(body, dict) or not isinstance(body.get("pid"), int) or isinstance(body["pid"], bool):
        raise FieldError("'pid' must be an integer")
    request.reply(jsoncodec.dumps({"success": True, "pid": body["pid"]}))


@pytest.fixture(scope="module")
def pid_service(shared_resolver):
    import os
    saved = {k: os.environ.get(k) for k in ("B0_RESOLVER", "B0_HOST_ID", "B0PM_BIND_HOST")}
    os.environ.update({k: shared_resolver.env[k] for k in saved})
    try:
        build = lambda node: node.service_server(  # noqa: E731
            "%n/control", pid_handler, request_type=PM_REQUEST, response_type=PM_RESPONSE)
        with NodeThread("pm", build) as nt:
            yield nt.node.resolve_service("pm/control")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def assert_service_still_answers(address):
    reply = req_exchange(address, frame("pm/control", b'{"pid":7}', PM_REQUEST))
    env = envelope.decode(reply[0])
    assert (env.header0, env.content_type, env.payload) == ("pm/control", PM_RESPONSE,
                                                            b'{"success":true,"pid":7}')


NODE_FIELD_GARBAGE = {
    "null pid": b'{"pid":null}',
    "string pid": b'{"pid":"1"}',
    "missing pid": b'{}',
}


@pytest.mark.parametrize("case", sorted(envelope_garbage("pm/control", PM_REQUEST)) + sorted(NODE_FIELD_GARBAGE))
def test_service_server_answers_bad_input_and_keeps_going(pid_service, case):
    if case in NODE_FIELD_GARBAGE:
        frames = [frame("pm/control", NODE_FIELD_GARBAGE[case], PM_REQUEST)]
    else:
        frames = envelope_garbage("pm/control", PM_REQUEST)[case]
    reply = req_exchange(pid_service, frames, timeout=5)
    assert_error_reply(reply, "pm/control", PM_RESPONSE)
    body = jsoncodec.loads(envelope.decode(reply[0]).payload)
    assert list(body) == ["success", "error_message"] and body["success"] is False
    assert_service_still_answers(pid_service)


def mutated_frames(count: int, seed: int):
    import random
    rng = random.Random(seed)
    base = [frame("resolv", jsoncodec.dumps(body), RESOLV_REQUEST) for body in (
        {"announce_node": {"host_id": "h", "process_id": 1, "node_name": "fuzz"}},
        {"resolve_service": {"service_name": "resolv"}},
        {"node_topic": {"node_name": "fuzz", "topic_name": "t", "reverse": False, "active": True}},
        {"get_graph": {}},
    )]
    for _ in range(count):
        data = bytearray(rng.choice(base))
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.choice(b'\n:0 9-{}[]"\\\xff\x00a')
        yield bytes(data)


def fuzz_resolver(resolver, count: int, seed: int):
    for i, data in enumerate(mutated_frames(count, seed)):
        reply = req_exchange(resolver.address, data, timeout=5)
        assert reply is not None and len(reply) == 1, f"frame {i} of seed {seed} got no reply: {data!r}"
        env = envelope.decode(reply[0])
        assert (env.header0, env.content_type) == ("resolv", "b0.message.resolv.Response")
        assert isinstance(jsoncodec.loads(env.payload), dict)
    assert_resolver_still_answers(resolver, resolver.address)


def test_resolver_fuzz_short(shared_resolver):
    fuzz_resolver(shared_resolver, 300, seed=1)


@pytest.mark.long
def test_resolver_fuzz_long(shared_resolver):
    fuzz_resolver(shared_resolver, 20000, seed=2)
