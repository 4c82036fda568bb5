"""`b0-pm call` as a subprocess against a real resolver and service."""

import subprocess
import sys
import time

import pytest

from b0_pm.b0 import jsoncodec
from tests.fixtures_b0 import REPO_ROOT, NodeThread, free_port, resolver_request

received = []


def echo(request):
    received.append((request.payload, request.content_type))
    request.reply(b'{"echo":' + jsoncodec.dumps(request.payload.decode()) + b"}", "Echo::Response")


def call(env, *args, stdin=b"", timeout=30):
    return subprocess.run([sys.executable, "-m", "b0_pm", "call", *args], input=stdin, env=env,
                          capture_output=True, timeout=timeout, cwd=REPO_ROOT)


@pytest.fixture
def echo_service(b0_env):
    received.clear()
    with NodeThread("srv", lambda n: n.service_server("srv/echo", echo)):
        yield b0_env


def test_output_with_content_type(echo_service, resolver):
    result = call(echo_service, "srv/echo", "-c", "Echo::Request", stdin=b'{"x":1}\n')
    assert result.returncode == 0, result.stderr
    assert result.stdout == b'Content-type: Echo::Response\n{"echo":"{\\"x\\":1}\\n"}'
    assert received == [(b'{"x":1}\n', "Echo::Request")]  # stdin verbatim, newline included


def test_output_without_content_type_is_the_bare_payload(echo_service):
    result = call(echo_service, "-s", "srv/echo", stdin=b"raw")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b'{"echo":"raw"}'
    assert received == [(b"raw", "")]


def test_node_lifecycle_leaves_the_graph_clean(echo_service, resolver):
    result = call(echo_service, "srv/echo", "-n", "my_caller", stdin=b"x")
    assert result.returncode == 0, result.stderr
    graph = resolver_request(resolver.address, "get_graph", {})["get_graph"]["graph"]
    assert [n["node_name"] for n in graph["nodes"]] == ["resolver", "srv"]
    assert all(link["node_name"] != "my_caller" for link in graph["node_service"])


def test_timeout_exits_3_naming_the_service(b0_env):
    with NodeThread("mute", lambda n: n.service_server("mute/svc", lambda request: None)):
        started = time.monotonic()
        result = call(b0_env, "mute/svc", "--timeout", "0.5", stdin=b"?")
    assert result.returncode == 3
    assert b"'mute/svc'" in result.stderr and b"0.5 s" in result.stderr
    assert result.stdout == b""
    assert time.monotonic() - started < 10


def test_no_resolver_with_timeout_is_a_clear_error(resolver):
    env = dict(resolver.env, B0_RESOLVER=f"tcp://127.0.0.1:{free_port()}")
    result = call(env, "any/svc", "--timeout", "0.5")
    assert result.returncode == 3
    assert b"resolver" in result.stderr and b"any/svc" in result.stderr


def test_unknown_service_fails(b0_env):
    result = call(b0_env, "nobody/svc", "--timeout", "5")
    assert result.returncode == 3
    assert b"service 'nobody/svc' is not registered" in result.stderr


@pytest.mark.parametrize("args", [[], ["a", "-s", "b"], ["svc", "--timeout", "0"], ["svc", "--bogus"]])
def test_usage_errors_exit_2(resolver, args):
    result = call(resolver.env, *args)
    assert result.returncode == 2
    assert b"usage" in result.stderr


def test_sigterm_while_waiting_shuts_the_node_down_cleanly(b0_env, resolver):
    import signal
    with NodeThread("mute", lambda n: n.service_server("mute/svc", lambda request: None)):
        proc = subprocess.Popen([sys.executable, "-m", "b0_pm", "call", "mute/svc", "-n", "waiter"],
                                stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=b0_env, cwd=REPO_ROOT)
        try:
            proc.stdin.close()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                graph = resolver_request(resolver.address, "get_graph", {})["get_graph"]["graph"]
                if {"node_name": "waiter", "other_name": "mute/svc", "reversed": True} in graph["node_service"]:
                    break
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 130
            assert b"interrupted" in proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    names = [n["node_name"] for n in resolver_request(resolver.address, "get_graph", {})["get_graph"]["graph"]["nodes"]]
    assert "waiter" not in names


def test_ctrl_c_while_no_resolver_answers_exits_promptly(resolver):
    import signal
    import socket
    silent = socket.socket()  # accepts TCP but never speaks ZMTP: the announce waits forever
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    silent.settimeout(20)
    env = dict(resolver.env, B0_RESOLVER=f"tcp://127.0.0.1:{silent.getsockname()[1]}")
    proc = subprocess.Popen([sys.executable, "-m", "b0_pm", "call", "any/svc"], stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, cwd=REPO_ROOT)
    try:
        silent.accept()[0].close()  # the node is now inside announce_node
        time.sleep(0.2)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        assert proc.wait(2) == 130
        assert b"interrupted" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        silent.close()
