"""EventLoop: timers, sockets, fds, failing callbacks, signals, idle cost."""

import logging
import os
import resource
import signal
import time

import pytest
import zmq

from b0_pm.b0.loop import EventLoop


@pytest.fixture
def loop():
    event_loop = EventLoop()
    yield event_loop
    event_loop.close()


def test_timers_fire_in_deadline_order_and_cancel_works(loop):
    fired = []
    loop.call_later(0.05, lambda: fired.append("b"))
    loop.call_later(0.01, lambda: fired.append("a"))
    loop.call_later(0.03, lambda: fired.append("x")).cancel()
    loop.call_later(0.08, loop.stop)
    loop.run()
    assert fired == ["a", "b"]


def test_call_every_repeats_until_cancelled(loop):
    ticks = []
    timer = loop.call_every(0.01, lambda: ticks.append(time.monotonic()))
    loop.call_later(0.105, loop.stop)
    loop.run()
    timer.cancel()
    assert 5 <= len(ticks) <= 11  # slots missed under load are skipped, never bunched


def test_a_raising_callback_is_logged_and_the_loop_goes_on(loop, caplog):
    fired = []

    def boom():
        raise RuntimeError("boom")

    loop.call_later(0.0, boom)
    loop.call_later(0.01, lambda: fired.append(1))
    loop.call_later(0.02, loop.stop)
    with caplog.at_level(logging.ERROR, logger="b0_pm.b0.loop"):
        loop.run()
    assert fired == [1]
    assert "boom" in caplog.text and "Traceback" in caplog.text


def test_socket_and_fd_callbacks(loop):
    context = zmq.Context()
    pull, push = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    read_fd, write_fd = os.pipe()
    got = []

    def on_pull():
        got.append(pull.recv())
        loop.remove_socket(pull)

    def on_fd():
        got.append(os.read(read_fd, 10))
        loop.remove_reader(read_fd)

    try:
        loop.add_socket(pull, on_pull)
        loop.add_reader(read_fd, on_fd)
        push.send(b"zmq")
        os.write(write_fd, b"fd")
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            loop.run_once(0.1)
        assert sorted(got) == [b"fd", b"zmq"]
    finally:
        os.close(read_fd)
        os.close(write_fd)
        pull.close(0)
        push.close(0)
        context.term()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stop_signals_end_run_cleanly(loop, signum):
    previous = signal.getsignal(signum)
    loop.call_later(0.05, lambda: os.kill(os.getpid(), signum))
    loop.call_later(5.0, loop.stop)  # safety net: the test fails on time, not hangs
    started = time.monotonic()
    loop.run()
    assert time.monotonic() - started < 2
    assert loop.stop_signal == signum
    assert signal.getsignal(signum) is previous


def test_idle_loop_uses_no_cpu(loop):
    context = zmq.Context()
    sock = context.socket(zmq.PULL)
    sock.bind_to_random_port("tcp://127.0.0.1")
    loop.add_socket(sock, lambda: None)
    loop.call_every(0.25, lambda: None)
    loop.call_later(1.0, loop.stop)
    before = resource.getrusage(resource.RUSAGE_SELF)
    loop.run()
    after = resource.getrusage(resource.RUSAGE_SELF)
    sock.close(0)
    context.term()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 0.05, f"idle second cost {cpu:.3f} s of CPU"
