"""One zmq.Poller event loop per node: ZMQ sockets, plain fds and timers.

Idle costs nothing: the poll sleeps until the next timer deadline or until a
socket or fd is readable. A callback that raises is logged with its
traceback and the loop goes on. SIGINT/SIGTERM stop a loop that runs in the
main thread; the signal wakes the poll through a self-pipe.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import signal
import threading
import time

import zmq

log = logging.getLogger("b0_pm.b0.loop")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Timer:
    """Handle of a scheduled callback; cancel() stops it (and its repeats)."""

    __slots__ = ("deadline", "interval", "callback", "cancelled")

    def __init__(self, deadline: float, interval: float | None, callback):
        self.deadline = deadline
        self.interval = interval
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    def __init__(self):
        self._poller = zmq.Poller()
        self._socket_callbacks: dict[zmq.Socket, object] = {}
        self._fd_callbacks: dict[int, object] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._sequence = itertools.count()
        self._running = False
        self._stop_requested = False
        self.stop_signal: int | None = None
        # Self-pipe: stop() from a signal handler or another thread wakes the poll.
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._poller.register(self._wake_read, zmq.POLLIN)
        self._threadsafe_calls: collections.deque = collections.deque()

    # -- registration -------------------------------------------------------

    def add_socket(self, sock: zmq.Socket, callback) -> None:
        self._socket_callbacks[sock] = callback
        self._poller.register(sock, zmq.POLLIN)

    def remove_socket(self, sock: zmq.Socket) -> None:
        if self._socket_callbacks.pop(sock, None) is not None:
            self._poller.unregister(sock)

    def add_reader(self, fd: int, callback) -> None:
        self._fd_callbacks[fd] = callback
        self._poller.register(fd, zmq.POLLIN)

    def remove_reader(self, fd: int) -> None:
        if self._fd_callbacks.pop(fd, None) is not None:
            self._poller.unregister(fd)

    def call_later(self, delay_s: float, callback) -> Timer:
        timer = Timer(time.monotonic() + max(0.0, delay_s), None, callback)
        heapq.heappush(self._timers, (timer.deadline, next(self._sequence), timer))
        return timer

    def call_every(self, interval_s: float, callback) -> Timer:
        """First call after one interval, then every interval (no drift build-up)."""
        if interval_s <= 0:
            raise ValueError("call_every needs a positive interval")
        timer = Timer(time.monotonic() + interval_s, interval_s, callback)
        heapq.heappush(self._timers, (timer.deadline, next(self._sequence), timer))
        return timer

    def call_soon_threadsafe(self, callback) -> None:
        """From any thread: run callback in the loop's thread at its next turn."""
        self._threadsafe_calls.append(callback)  # deque.append is atomic
        self._wake()

    # -- running ------------------------------------------------------------

    def run(self) -> None:
        """Run until stop() (or SIGINT/SIGTERM when on the main thread)."""
        self._running = True
        self._stop_requested = False
        restore = self._install_signal_handlers()
        try:
            while not self._stop_requested:
                self.run_once(self._next_timeout())
        finally:
            restore()
            self._running = False

    def run_once(self, timeout_s: float | None = 0.0) -> None:
        """Wait up to timeout_s (None: forever) for one batch of events, then dispatch it."""
        timeout_ms = None if timeout_s is None else max(0, int(timeout_s * 1000 + 0.999))
        try:
            events = self._poller.poll(timeout_ms)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EINTR:
                raise
            events = []
        for item, _ in events:
            if item == self._wake_read:
                self._drain_wakeups()
                while self._threadsafe_calls:
                    self._invoke(self._threadsafe_calls.popleft())
                continue
            callback = (self._socket_callbacks.get(item) if isinstance(item, zmq.Socket)
                        else self._fd_callbacks.get(item))
            if callback is not None:  # may have been removed by an earlier callback
                self._invoke(callback)
        self._run_due_timers()

    def stop(self) -> None:
        self._stop_requested = True
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:
            pass  # the pipe is already full of wake-ups

    def close(self) -> None:
        self._poller.unregister(self._wake_read)
        os.close(self._wake_read)
        os.close(self._wake_write)

    # -- internals ----------------------------------------------------------

    def _next_timeout(self) -> float | None:
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if not self._timers:
            return None
        return max(0.0, self._timers[0][0] - time.monotonic())

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            if timer.interval is not None:
                # Next slot on the original grid, skipping slots already missed.
                missed = max(1, int((now - timer.deadline) // timer.interval) + 1)
                timer.deadline += missed * timer.interval
                heapq.heappush(self._timers, (timer.deadline, next(self._sequence), timer))
            self._invoke(timer.callback)

    def _invoke(self, callback) -> None:
        try:
            callback()
        except Exception:
            log.exception("callback %r raised; the loop goes on", callback)

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_signal(signum, _frame):
            self.stop_signal = signum
            self.stop()

        previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
        previous_wakeup = signal.set_wakeup_fd(self._wake_write, warn_on_full_buffer=False)

        def restore():
            signal.set_wakeup_fd(previous_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore
