"""Node against a real resolver process: announce, services, topics, log,
heartbeats, shutdown and recovery after a resolver restart."""

import threading
import time

import pytest

from b0_pm.b0 import jsoncodec
from b0_pm.b0.errors import HeaderMismatchError
from b0_pm.b0.node import Node, ResolverError, console_level
from tests.fixtures_b0 import NodeThread, free_port, resolver_request


def wait_for(predicate, timeout=5.0, step=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def spin_until(node, predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        node.loop.run_once(0.05)
    return predicate()


def graph(resolver):
    return resolver_request(resolver.address, "get_graph", {})["get_graph"]["graph"]


def node_names(resolver):
    return [n["node_name"] for n in graph(resolver)["nodes"]]


def echo(request):
    request.reply(b"echo:" + request.payload, "Echo")


def test_unique_names_and_placeholders(b0_env, resolver):
    names = ["dup", "dup", "dup", "node", "", "resolver", "pm@%h"]
    nodes = [Node(name) for name in names]
    try:
        for node in nodes:
            node.start()
        assert [n.name for n in nodes] == ["dup", "dup-1", "dup-2", "node-1", "node-2", "resolver-1",
                                           "pm@127.0.0.1"]
        assert nodes[6].host_id == "127.0.0.1"
        nodes[1].shutdown()
        again = Node("dup")
        again.start()
        assert again.name == "dup-1"  # freed names are reused
        nodes.append(again)
    finally:
        for node in nodes:
            node.shutdown()
    assert node_names(resolver) == ["resolver"]


def test_service_call_through_the_resolver(b0_env, resolver):
    with NodeThread("server", lambda n: n.service_server("%n/echo", echo)):
        with Node("client") as client:
            svc = client.service_client("server/echo")
            client.start()
            reply = svc.call(b"hi\n", "Req", timeout_s=5)
            assert (reply.header0, reply.payload, reply.content_type) == ("server/echo", b"echo:hi\n", "Echo")
            g = graph(resolver)
            assert {"node_name": "server", "other_name": "server/echo", "reversed": False} in g["node_service"]
            assert {"node_name": "client", "other_name": "server/echo", "reversed": True} in g["node_service"]
        g = graph(resolver)
        assert {"node_name": "client", "other_name": "server/echo", "reversed": True} not in g["node_service"]


def test_deferred_replies_do_not_block_other_clients(b0_env, resolver):
    held = []

    def slow_or_fast(request):
        if request.payload == b"slow":
            held.append(request)
            request.server.owner.loop.call_later(2.0, lambda: request.reply(b"late"))
        else:
            request.reply(b"fast")

    with NodeThread("server", lambda n: n.service_server("svc", slow_or_fast)):
        with Node("a") as a, Node("b") as b:
            slow, fast = a.service_client("svc"), b.service_client("svc")
            a.start()
            b.start()
            results = {}
            thread = threading.Thread(target=lambda: results.update(slow=slow.call(b"slow", "", 5)))
            thread.start()
            assert wait_for(lambda: held)
            assert fast.call(b"quick", "", 5).payload == b"fast"
            assert "slow" not in results  # answered while the first request still waits
            thread.join(5)
            assert results["slow"].payload == b"late"


def test_call_timeout_rebuilds_the_socket(b0_env, resolver):
    def answer_only_second(request):
        if request.payload != b"ignore me":
            request.reply(b"ok:" + request.payload)

    with NodeThread("server", lambda n: n.service_server("svc", answer_only_second)):
        with Node("client") as client:
            svc = client.service_client("svc")
            client.start()
            started = time.monotonic()
            with pytest.raises(TimeoutError, match="'svc'"):
                svc.call(b"ignore me", "", timeout_s=0.3)
            assert 0.25 < time.monotonic() - started < 1.0
            assert svc.call(b"next", "", timeout_s=5).payload == b"ok:next"


def test_call_async_delivers_replies_and_timeouts_in_the_loop(b0_env, resolver):
    def handler(request):
        if request.payload != b"never":
            request.reply(request.payload[::-1])

    with NodeThread("server", lambda n: n.service_server("svc", handler)):
        with Node("client") as client:
            svc = client.service_client("svc")
            client.start()
            results = []
            svc.call_async(b"abc", "", 5, results.append)
            svc.call_async(b"never", "", 0.2, results.append)
            svc.call_async(b"xyz", "", 5, results.append)
            assert spin_until(client, lambda: len(results) == 3)
            assert results[0].payload == b"cba"
            assert isinstance(results[1], TimeoutError)
            assert results[2].payload == b"zyx"


def test_handler_errors_become_error_replies(b0_env, resolver):
    from b0_pm.b0.errors import FieldError

    def handler(request):
        if request.payload == b"field":
            raise FieldError("'pid' must be an integer")
        raise ZeroDivisionError("oops")

    with NodeThread("server", lambda n: n.service_server("svc", handler, response_type="R")):
        with Node("client") as client:
            svc = client.service_client("svc")
            client.start()
            reply = svc.call(b"field", "", 5)
            assert reply.content_type == "R"
            assert reply.payload == b'{"success":false,"error_message":"\'pid\' must be an integer"}'
            reply = jsoncodec.loads(svc.call(b"other", "", 5).payload)
            assert reply == {"success": False, "error_message": "internal error: ZeroDivisionError: oops"}


def test_an_unencodable_reply_still_answers_the_client(b0_env, resolver):
    def handler(request):
        if request.payload == b"now":
            request.reply("a str, not bytes")
        else:  # deferred: the bug surfaces in a timer, the client must still get its answer
            request.server.owner.loop.call_later(0.01, lambda: request.reply(b"x", "bad\ntype"))

    with NodeThread("server", lambda n: n.service_server("svc", handler)):
        with Node("client") as client:
            svc = client.service_client("svc")
            client.start()
            for payload in (b"now", b"later"):
                reply = jsoncodec.loads(svc.call(payload, "", 5).payload)
                assert reply["success"] is False
                assert reply["error_message"].startswith("internal error: unencodable reply")


def test_reply_with_a_wrong_header0_raises_and_the_client_stays_usable(b0_env, resolver):
    import zmq
    from b0_pm.b0 import envelope
    from b0_pm.b0.sockets import ServiceClient

    rep = zmq.Context.instance().socket(zmq.REP)
    rep.linger = 0
    port = rep.bind_to_random_port("tcp://127.0.0.1")

    def impostor():
        rep.recv()
        rep.send(envelope.encode("someone_else", b"x"))
        rep.recv()
        rep.send(envelope.encode("svc", b"fine"))

    thread = threading.Thread(target=impostor)
    thread.start()
    try:
        with Node("client") as client:
            client.start()
            svc = ServiceClient(client, "svc")
            svc.open("svc", f"tcp://127.0.0.1:{port}")
            with pytest.raises(HeaderMismatchError, match="someone_else"):
                svc.call(b"q", "", 5)
            assert svc.call(b"q", "", 5).payload == b"fine"
            svc.close(0)
    finally:
        thread.join(5)
        rep.close(0)


def test_service_port_from_environment(b0_env, resolver, monkeypatch):
    port = free_port()
    monkeypatch.setenv("B0_SERVICE_PORT_fixed/svc", str(port))
    with Node("fixed") as node:
        server = node.service_server("%n/svc", echo)
        node.start()
        assert server.port == port
        assert node.resolve_service("fixed/svc") == f"tcp://127.0.0.1:{port}"


def test_duplicate_service_is_refused(b0_env, resolver):
    with Node("one") as one, Node("two") as two:
        one.service_server("shared", echo)
        one.start()
        two.service_server("shared", echo)
        with pytest.raises(ResolverError, match="shared"):
            two.start()


def test_unknown_service_fails_to_resolve(b0_env, resolver):
    from b0_pm.b0.node import ServiceNotFound
    with Node("client") as client:
        client.service_client("nobody/here")
        with pytest.raises(ServiceNotFound, match="Failed to resolve 'nobody/here'"):
            client.start()
    with Node("late") as late:
        late.start()
        with pytest.raises(ServiceNotFound):
            late.service_client("nobody/here")  # after start: resolved at once
        assert late._sockets == []  # nothing half-declared is left for shutdown to notify


def test_pub_sub_through_the_proxy_without_the_prefix_trap(b0_env, resolver):
    got = []
    with Node("sub") as sub, Node("pub") as pub:
        sub.subscriber("foo", lambda env: got.append((env.header0, env.payload, env.content_type)))
        sub.start()
        foo, foobar = pub.publisher("foo"), pub.publisher("foobar", content_type="T")
        pub.start()
        # Slow joiner: publish until the subscription has crossed the proxy.
        assert spin_until(sub, lambda: got or foo.publish(b"probe"), timeout=5)
        foobar.publish(b"not for foo")
        foo.publish(b"for foo", "T")
        assert spin_until(sub, lambda: got[-1][1] == b"for foo")
        sub.loop.run_once(0.2)
        assert [g for g in got if g[1] != b"probe"] == [("foo", b"for foo", "T")]
        g = graph(resolver)
        assert {"node_name": "sub", "other_name": "foo", "reversed": True} in g["node_topic"]
        assert {"node_name": "pub", "other_name": "foobar", "reversed": False} in g["node_topic"]


def test_subscriber_content_type_filter_drops_and_logs(b0_env, resolver):
    got, logged = [], []
    with Node("sub") as sub, Node("pub") as pub:
        sub.subscriber("t", got.append, content_type="Good")
        sub.log.addHandler(_ListHandler(logged))
        sub.start()
        publisher = pub.publisher("t")
        pub.start()
        assert spin_until(sub, lambda: logged or publisher.publish(b"x", "Bad"), timeout=5)
        assert "bad content type" in logged[0]
        publisher.publish(b"y", "Good")
        assert spin_until(sub, lambda: got)
        assert got[0].payload == b"y"


class _ListHandler:
    level = 0

    def __init__(self, sink):
        self.sink = sink

    def handle(self, record):
        self.sink.append(record.getMessage())


def test_log_records_are_published_on_the_log_topic(b0_env, resolver):
    entries = []
    with Node("listener") as listener, Node("talker") as talker:
        listener.subscriber("log", lambda env: entries.append((env.content_type, jsoncodec.loads(env.payload))),
                            content_type="b0.message.log.LogEntry")
        listener.start()
        talker.start()
        assert spin_until(listener, lambda: any(e[1]["node_name"] == "talker" for e in entries)
                          or talker.log.debug("hello %s", "world"), timeout=5)
        entry = next(e[1] for e in entries if e[1]["node_name"] == "talker")
        assert list(entry) == ["node_name", "level", "message", "time_usec"]
        assert entry["level"] == "debug" and entry["message"] == "hello world"
        assert abs(entry["time_usec"] - time.time() * 1e6) < 10e6


def test_graph_topic_announces_changes(b0_env, resolver):
    graphs = []
    with Node("watcher") as watcher:
        watcher.subscriber("graph", lambda env: graphs.append(jsoncodec.loads(env.payload)),
                           content_type="b0.message.graph.Graph")
        watcher.start()
        newcomer = None
        try:
            def arrived():
                nonlocal newcomer
                if any("newcomer" in [n["node_name"] for n in g["nodes"]] for g in graphs):
                    return True
                if newcomer is not None:
                    newcomer.shutdown()
                newcomer = Node("newcomer")
                newcomer.start()
                return False
            assert spin_until(watcher, arrived, timeout=5)
        finally:
            newcomer.shutdown()


def test_console_level_parsing():
    assert console_level("trace") == 5 and console_level("WARN") == 30 and console_level(None) == 20
    with pytest.raises(ValueError, match="trace, debug"):
        console_level("loud")


def test_heartbeats_keep_a_node_alive_and_a_silent_node_is_swept(resolver_factory, monkeypatch):
    resolver = resolver_factory(heartbeat_interval_us=600_000)
    for key in ("B0_RESOLVER", "B0_HOST_ID", "B0PM_BIND_HOST"):
        monkeypatch.setenv(key, resolver.env[key])
    reply = resolver_request(resolver.address, "announce_node",
                             {"host_id": "h", "process_id": 1, "node_name": "silent"})
    assert reply["announce_node"]["minimum_heartbeat_interval"] == 600_000
    with NodeThread("alive") as alive:
        assert alive.node.heartbeat_interval_us == 600_000
        assert wait_for(lambda: "silent" not in node_names(resolver), timeout=3)
        time.sleep(1.0)
        assert "alive" in node_names(resolver)


def test_shutdown_is_bounded_when_the_resolver_is_gone(resolver, monkeypatch):
    for key in ("B0_RESOLVER", "B0_HOST_ID", "B0PM_BIND_HOST"):
        monkeypatch.setenv(key, resolver.env[key])
    node = Node("orphan", shutdown_timeout=0.5)
    node.service_server("orphan/svc", echo)
    node.publisher("topic")
    node.start()
    resolver.kill()
    started = time.monotonic()
    node.shutdown()
    assert time.monotonic() - started < 2.0


def test_announce_timeout_without_a_resolver(monkeypatch):
    monkeypatch.setenv("B0_RESOLVER", f"tcp://127.0.0.1:{free_port()}")
    node = Node("lonely", announce_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="resolver"):
        node.start()
    node.shutdown()
    assert time.monotonic() - started < 2.0


def test_resolver_restart_recovery(resolver_factory, monkeypatch):
    resolver = resolver_factory(heartbeat_interval_us=600_000)
    for key in ("B0_RESOLVER", "B0_HOST_ID", "B0PM_BIND_HOST"):
        monkeypatch.setenv(key, resolver.env[key])
    received = []

    def build(node):
        node.service_server("phoenix/svc", echo)
        node.subscriber("news", lambda env: received.append(env.payload))

    with NodeThread("phoenix", build):
        resolver.restart()
        assert wait_for(lambda: "phoenix" in node_names(resolver), timeout=5)
        with Node("client") as client:
            svc = client.service_client("phoenix/svc")
            news = client.publisher("news")
            client.start()
            assert svc.call(b"again", "", 5).payload == b"echo:again"
            # The subscriber followed the new proxy address.
            assert wait_for(lambda: received or news.publish(b"fresh"), timeout=5)
        g = graph(resolver)
        assert {"node_name": "phoenix", "other_name": "news", "reversed": True} in g["node_topic"]


def test_console_log_format_and_level(resolver):
    import re
    import subprocess
    import sys
    from tests.fixtures_b0 import REPO_ROOT
    code = ("from b0_pm.b0.node import Node\n"
            "node = Node('talker')\n"
            "node.log.info('quiet line')\n"
            "node.log.warning('loud %s', 'line')\n"
            "node.shutdown()\n")
    env = dict(resolver.env, B0_CONSOLE_LOGLEVEL="warn")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=20, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[talker\] warn: loud line\n", result.stderr)
    bad = subprocess.run([sys.executable, "-m", "b0_pm", "call", "x"], env=dict(env, B0_CONSOLE_LOGLEVEL="loud"),
                         capture_output=True, text=True, timeout=20, cwd=REPO_ROOT)
    assert bad.returncode == 2 and "invalid log level 'loud'" in bad.stderr


def test_shutdown_does_not_linger_past_its_budget_on_unsent_requests(b0_env, resolver):
    resolver_request(resolver.address, "announce_node", {"host_id": "h", "process_id": 1, "node_name": "ghost"})
    resolver_request(resolver.address, "announce_service", {  # nothing listens there: requests stay queued
        "node_name": "ghost", "service_name": "ghost/svc", "sock_addr": f"tcp://127.0.0.1:{free_port()}"})
    node = Node("impatient", shutdown_timeout=0.5)
    nobody = node.service_client("ghost/svc")
    node.start()
    nobody.call_async(b"hello?", "", None, lambda result: None)
    started = time.monotonic()
    node.shutdown()
    assert time.monotonic() - started < 1.5


def test_call_async_from_inside_a_callback_keeps_one_request_in_flight(b0_env, resolver):
    def handler(request):
        if request.payload != b"never":
            request.reply(request.payload)

    with NodeThread("server", lambda n: n.service_server("svc", handler)):
        with Node("client") as client:
            svc = client.service_client("svc")
            client.start()
            results = []

            def chain(result):
                results.append(result)
                if len(results) < 4:  # queue the next call from inside the callback
                    svc.call_async(b"never" if len(results) == 1 else b"last", "", 0.3, chain)

            svc.call_async(b"first", "", 5, chain)
            svc.call_async(b"queued", "", 5, results.append)
            assert spin_until(client, lambda: len(results) == 4)
            client.loop.run_once(0.2)  # nothing else may arrive
            described = [type(r).__name__ if isinstance(r, Exception) else r.payload for r in results]
            assert described == [b"first", b"queued", "TimeoutError", b"last"]
