"""The resolver process over raw REQ sockets: every message of spec 3.4,
byte-exact replies, graph, liveness, and the `resolv` quirks."""

import time

import pytest
import zmq

from b0_pm.b0 import envelope, jsoncodec
from tests.fixtures_b0 import req_exchange, resolver_request

REQUEST = "b0.message.resolv.Request"
RESPONSE = "b0.message.resolv.Response"


def raw(resolver, obj) -> bytes:
    """The reply payload bytes, after checking header0 and content type."""
    reply = req_exchange(resolver.address, envelope.encode("resolv", jsoncodec.dumps(obj), REQUEST))
    assert reply is not None, "resolver did not answer"
    env = envelope.decode(reply[0])
    assert (env.header0, env.content_type) == ("resolv", RESPONSE)
    return env.payload


def announce(resolver, name, pid=4242, host="robot1"):
    return resolver_request(resolver.address, "announce_node",
                            {"host_id": host, "process_id": pid, "node_name": name})["announce_node"]


def test_announce_reply_is_byte_exact_and_in_codec_order(resolver):
    payload = raw(resolver, {"announce_node": {"host_id": "robot1", "process_id": 4242, "node_name": "my_node"}})
    reply = jsoncodec.loads(payload)["announce_node"]
    assert list(reply) == ["ok", "node_name", "xsub_sock_addr", "xpub_sock_addr", "minimum_heartbeat_interval"]
    assert payload == jsoncodec.dumps({"announce_node": reply})
    assert reply["ok"] is True and reply["node_name"] == "my_node"
    assert reply["xsub_sock_addr"].startswith("tcp://127.0.0.1:")
    assert reply["minimum_heartbeat_interval"] == 30_000_000


def test_unique_names_use_suffixes_of_the_original(resolver):
    assert [announce(resolver, "foo")["node_name"] for _ in range(3)] == ["foo", "foo-1", "foo-2"]
    assert announce(resolver, "node")["node_name"] == "node-1"
    assert announce(resolver, "")["node_name"] == "node-2"
    assert announce(resolver, "resolver")["node_name"] == "resolver-1"
    assert resolver_request(resolver.address, "shutdown_node", {"node_name": "foo-1"}) == \
        {"shutdown_node": {"ok": True}}
    assert announce(resolver, "foo")["node_name"] == "foo-1"


def test_service_registry(resolver):
    announce(resolver, "n")
    req = {"node_name": "n", "service_name": "n/svc", "sock_addr": "tcp://robot1:41234"}
    assert raw(resolver, {"announce_service": req}) == b'{"announce_service":{"ok":true}}'
    assert raw(resolver, {"announce_service": req}) == b'{"announce_service":{"ok":false}}'
    assert raw(resolver, {"announce_service": dict(req, node_name="ghost", service_name="x")}) == \
        b'{"announce_service":{"ok":false}}'
    assert raw(resolver, {"resolve_service": {"service_name": "n/svc"}}) == \
        b'{"resolve_service":{"ok":true,"sock_addr":"tcp://robot1:41234"}}'
    assert raw(resolver, {"resolve_service": {"service_name": "n/sv"}}) == \
        b'{"resolve_service":{"ok":false,"sock_addr":""}}'
    raw(resolver, {"shutdown_node": {"node_name": "n"}})
    assert raw(resolver, {"resolve_service": {"service_name": "n/svc"}}) == \
        b'{"resolve_service":{"ok":false,"sock_addr":""}}'


def test_resolv_is_also_served_on_its_registered_ephemeral_port(resolver):
    reply = resolver_request(resolver.address, "resolve_service", {"service_name": "resolv"})["resolve_service"]
    assert reply["ok"] and reply["sock_addr"] != resolver.address
    again = resolver_request(reply["sock_addr"], "resolve_service", {"service_name": "resolv"})
    assert again["resolve_service"] == reply


def test_heartbeat_replies(resolver):
    announce(resolver, "beating")
    reply = jsoncodec.loads(raw(resolver, {"heartbeat": {"node_name": "beating"}}))["heartbeat"]
    assert list(reply) == ["ok", "time_usec"] and reply["ok"] is True
    assert abs(reply["time_usec"] - time.time() * 1e6) < 5e6
    assert raw(resolver, {"heartbeat": {"node_name": "stranger"}}) == b'{"heartbeat":{"ok":false,"time_usec":0}}'


def test_shutdown_of_unknown_or_resolver_node_is_refused(resolver):
    assert raw(resolver, {"shutdown_node": {"node_name": "ghost"}}) == b'{"shutdown_node":{"ok":false}}'
    assert raw(resolver, {"shutdown_node": {"node_name": "resolver"}}) == b'{"shutdown_node":{"ok":false}}'


def test_empty_and_unknown_requests_get_empty_replies(resolver):
    assert raw(resolver, {}) == b"{}"
    assert raw(resolver, {"foo": {"bar": 1}}) == b"{}"


def test_every_key_is_handled_in_codec_order(resolver):
    request = {  # deliberately out of codec order
        "resolve_service": {"service_name": "multi/svc"},
        "announce_service": {"node_name": "multi", "service_name": "multi/svc", "sock_addr": "tcp://h:1"},
        "announce_node": {"host_id": "h", "process_id": 1, "node_name": "multi"},
        "node_topic": {"node_name": "multi", "topic_name": "t", "reverse": False, "active": True},
    }
    assert raw(resolver, request) == (
        b'{"announce_node":{"ok":true,"node_name":"multi","xsub_sock_addr":"%s","xpub_sock_addr":"%s",'
        b'"minimum_heartbeat_interval":30000000},"announce_service":{"ok":true},'
        b'"resolve_service":{"ok":true,"sock_addr":"tcp://h:1"},"node_topic":{}}'
        % tuple(announce(resolver, "probe")[k].encode() for k in ("xsub_sock_addr", "xpub_sock_addr")))


def test_graph_contents_and_order(resolver):
    for name, pid in (("zeta", 3), ("alpha", 1)):
        announce(resolver, name, pid, "h")
    edges = [
        ("node_topic", "zeta", "t1", True), ("node_topic", "alpha", "t2", False),
        ("node_topic", "zeta", "t0", False), ("node_service", "alpha", "s", True),
        ("node_service", "zeta", "s", False), ("node_topic", "ghost", "t9", False),
    ]
    for key, node, other, reverse in edges:
        other_key = "topic_name" if key == "node_topic" else "service_name"
        assert raw(resolver, {key: {"node_name": node, other_key: other, "reverse": reverse, "active": True}}) \
            == b'{"%s":{}}' % key.encode()
    raw(resolver, {"node_topic": {"node_name": "ghost", "topic_name": "t9", "reverse": False, "active": False}})
    graph = jsoncodec.loads(raw(resolver, {"get_graph": {}}))["get_graph"]["graph"]
    assert list(graph) == ["nodes", "node_topic", "node_service"]
    assert [n["node_name"] for n in graph["nodes"]] == ["alpha", "resolver", "zeta"]
    assert graph["nodes"][0] == {"host_id": "h", "process_id": 1, "node_name": "alpha"}
    link = lambda n, o, r: {"node_name": n, "other_name": o, "reversed": r}  # noqa: E731
    assert graph["node_topic"] == [link("alpha", "t2", False), link("resolver", "graph", False),
                                   link("zeta", "t0", False), link("zeta", "t1", True)]
    assert graph["node_service"] == [link("resolver", "resolv", False), link("zeta", "s", False),
                                     link("alpha", "s", True)]


def test_graph_is_published_on_changes(resolver):
    context = zmq.Context.instance()
    xpub = announce(resolver, "watcher")["xpub_sock_addr"]
    sub = context.socket(zmq.SUB)
    sub.linger = 0
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"graph\n")
        sub.connect(xpub)
        deadline = time.monotonic() + 5
        names = []
        while time.monotonic() < deadline and "newcomer" not in names:
            raw(resolver, {"node_topic": {"node_name": "newcomer", "topic_name": "x",
                                          "reverse": False, "active": True}})
            raw(resolver, {"node_topic": {"node_name": "newcomer", "topic_name": "x",
                                          "reverse": False, "active": False}})
            if sub.poll(100):
                env = envelope.decode(sub.recv())
                assert (env.header0, env.content_type) == ("graph", "b0.message.graph.Graph")
                announce(resolver, "newcomer")
                while sub.poll(200):
                    graph = jsoncodec.loads(envelope.decode(sub.recv()).payload)
                    names = [n["node_name"] for n in graph["nodes"]]
        assert "newcomer" in names
    finally:
        sub.close(0)


def test_silent_nodes_are_swept_and_logged(resolver_factory):
    resolver = resolver_factory(heartbeat_interval_us=600_000)
    announce(resolver, "quiet")
    announce(resolver, "chatty")
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert raw(resolver, {"heartbeat": {"node_name": "chatty"}}).startswith(b'{"heartbeat":{"ok":true')
        time.sleep(0.05)
    graph = jsoncodec.loads(raw(resolver, {"get_graph": {}}))["get_graph"]["graph"]
    assert [n["node_name"] for n in graph["nodes"]] == ["chatty", "resolver"]
    assert raw(resolver, {"heartbeat": {"node_name": "quiet"}}) == b'{"heartbeat":{"ok":false,"time_usec":0}}'


def test_heartbeat_interval_zero_disables_sweeping(resolver_factory):
    resolver = resolver_factory(heartbeat_interval_us=0)
    assert announce(resolver, "forever")["minimum_heartbeat_interval"] == 0
    time.sleep(0.3)
    assert raw(resolver, {"heartbeat": {"node_name": "forever"}}).startswith(b'{"heartbeat":{"ok":true')


def test_resolver_exits_cleanly_on_sigterm(resolver):
    assert resolver.stop() == 0


@pytest.mark.parametrize("env_port, args, message", [
    ("notaport", [], "B0_RESOLVER_PORT"),
    (None, ["--port", "0"], "port must be"),
    (None, ["-o", "-1"], "minimum-heartbeat-interval"),
])
def test_resolver_usage_errors(env_port, args, message, resolver):
    import subprocess
    import sys
    env = dict(resolver.env)
    env.pop("B0_RESOLVER_PORT", None)
    if env_port:
        env["B0_RESOLVER_PORT"] = env_port
    result = subprocess.run([sys.executable, "-m", "b0_pm", "resolver", *args], env=env,
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 2 and message in result.stderr


def test_port_in_use_is_a_clear_error(resolver):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "b0_pm", "resolver", "--port", str(resolver.port)],
                            env=resolver.env, capture_output=True, text=True, timeout=20)
    assert result.returncode == 1 and f"cannot bind port {resolver.port}" in result.stderr


def test_configuration_file_and_precedence(tmp_path, resolver):
    import subprocess
    import sys
    from tests.fixtures_b0 import REPO_ROOT, free_port, ResolverProcess
    file_port, flag_port = free_port(), free_port()
    conf = tmp_path / "b0-pm.toml"
    conf.write_text(f'host_id = "from-file"\n[resolver]\nport = {file_port}\n'
                    f"minimum_heartbeat_interval_seconds = 1.5\n")
    env = {k: v for k, v in resolver.env.items() if k not in ("B0_RESOLVER_PORT", "B0_HOST_ID")}

    def reply_from(port, *args):
        proc = subprocess.Popen([sys.executable, "-m", "b0_pm", "resolver", "--config", str(conf), *args],
                                env=env, cwd=REPO_ROOT, stderr=subprocess.DEVNULL)
        probe = ResolverProcess(port, 0)
        probe.process = proc
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                reply = resolver_request(probe.address, "announce_node",
                                         {"host_id": "h", "process_id": 1, "node_name": "n"}, timeout=0.2)
                if reply is not None:
                    return reply["announce_node"]
                assert proc.poll() is None, "resolver exited"
            raise AssertionError("resolver did not answer")
        finally:
            probe.stop()

    from_file = reply_from(file_port)
    assert from_file["minimum_heartbeat_interval"] == 1_500_000
    assert from_file["xsub_sock_addr"].startswith("tcp://from-file:")
    from_flags = reply_from(flag_port, "--port", str(flag_port), "-o", "2000000")
    assert from_flags["minimum_heartbeat_interval"] == 2_000_000

    conf.write_text("[resolver]\nport = 0\n")
    bad = subprocess.run([sys.executable, "-m", "b0_pm", "resolver", "--config", str(conf)], env=env,
                         capture_output=True, text=True, timeout=20, cwd=REPO_ROOT)
    assert bad.returncode == 2 and "resolver.port" in bad.stderr
