"""Service servers and clients, publishers and subscribers over one event loop.

Each class takes an *owner* that provides `context` (zmq.Context), `loop`
(EventLoop), `log` (logging.Logger), `max_message_size` and `bind_host`:
a Node, or the Resolver. The owner decides names and addresses; these
classes only move envelopes and turn malformed input into error replies
(services) or logged drops (topics).
"""

from __future__ import annotations

import os
from collections import deque

import zmq

from b0_pm.b0 import envelope, jsoncodec
from b0_pm.b0.errors import (
    ContentTypeError,
    HeaderMismatchError,
    MessageError,
    TooManyPartsError,
)

LINGER_MS = 5000

# libzmq drops the connection of a peer sending a frame above this multiple of
# the envelope limit; below it the server can still read the frame and answer.
HARD_LIMIT_FACTOR = 16

# Messages read per wake-up, so one flooding peer cannot starve the others.
DRAIN_BATCH = 64


def make_socket(context: zmq.Context, kind: int) -> zmq.Socket:
    sock = context.socket(kind)
    sock.linger = LINGER_MS
    return sock


def bound_port(sock: zmq.Socket) -> int:
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    return int(endpoint.rsplit(":", 1)[1])


def service_port_from_env(name: str) -> int | None:
    """B0_SERVICE_PORT_<name>, when set to a port number of at least 1."""
    text = os.environ.get(f"B0_SERVICE_PORT_{name}", "")
    return int(text) if text.isdecimal() and 0 < int(text) < 65536 else None


def default_error_reply(response_type: str):
    def error_reply(message: str) -> tuple[bytes, str]:
        return jsoncodec.dumps({"success": False, "error_message": message}), response_type
    return error_reply


def _recv_batch(sock: zmq.Socket):
    for _ in range(DRAIN_BATCH):
        try:
            yield sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        # Asking ZMQ_EVENTS is cheaper than provoking another zmq.Again.
        if sock.closed or not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            return


class Request:
    """One service request; reply() exactly once, now or later."""

    __slots__ = ("server", "envelope", "_route", "replied")

    def __init__(self, server: "ServiceServer", route: list[bytes], env: envelope.Envelope):
        self.server = server
        self.envelope = env
        self._route = route
        self.replied = False

    @property
    def payload(self) -> bytes:
        return self.envelope.payload

    @property
    def content_type(self) -> str:
        return self.envelope.content_type

    def reply(self, payload: bytes, content_type: str | None = None) -> None:
        if self.replied:
            raise RuntimeError(f"request to '{self.server.name}' was already answered")
        ctype = self.server.response_type if content_type is None else content_type
        try:
            frame = envelope.encode(self.server.name, payload, ctype)
        except (TypeError, ValueError) as exc:
            # The client still gets exactly one reply; the bug surfaces to the caller.
            self.error(f"internal error: unencodable reply: {exc}")
            raise
        self.replied = True
        self.server.send_frame(self._route, frame)

    def error(self, message: str) -> None:
        """Answer with the server's error reply (default JSON success:false)."""
        payload, ctype = self.server.error_reply(message)
        self.reply(payload, ctype)


class ServiceServer:
    """ROUTER socket: REQ clients can't tell it from REP, and replies may wait."""

    def __init__(self, owner, name: str, handler, *, request_type: str | None = None,
                 response_type: str = "", error_reply=None, notify_graph: bool = True,
                 port: int | None = None):
        self.owner = owner
        self.fixed_port = port
        self.raw_name = name
        self.name = name
        self.handler = handler
        self.request_type = request_type
        self.response_type = response_type
        self.error_reply = error_reply or default_error_reply(response_type)
        self.notify_graph = notify_graph
        self.port: int | None = None
        self.address: str | None = None
        self._sock: zmq.Socket | None = None

    def open(self, name: str, host_id: str) -> None:
        """Bind tcp://<bind host>:<fixed port, else env, else OS-chosen>; address = tcp://<host id>:<port>."""
        self.name = name
        sock = make_socket(self.owner.context, zmq.ROUTER)
        sock.setsockopt(zmq.MAXMSGSIZE, self.owner.max_message_size * HARD_LIMIT_FACTOR)
        port = self.fixed_port or service_port_from_env(name)
        try:
            sock.bind(f"tcp://{self.owner.bind_host}:{port or '*'}")
        except zmq.ZMQError as exc:
            sock.close(0)
            raise OSError(f"service '{name}' cannot bind port {port or '(any)'}: {exc}") from exc
        self._sock = sock
        self.port = bound_port(sock)
        self.address = f"tcp://{host_id}:{self.port}"
        self.owner.loop.add_socket(sock, self._on_readable)

    def bind_also(self, port: int) -> None:
        """Serve on one more fixed port (the resolver's quirk, spec 3.1)."""
        try:
            self._sock.bind(f"tcp://{self.owner.bind_host}:{port}")
        except zmq.ZMQError as exc:
            raise OSError(f"service '{self.name}' cannot bind port {port}: {exc}") from exc

    def close(self, linger: int | None = None) -> None:
        if self._sock is not None:
            self.owner.loop.remove_socket(self._sock)
            self._sock.close(linger)
            self._sock = None

    def send_reply(self, route: list[bytes], payload: bytes, content_type: str) -> None:
        self.send_frame(route, envelope.encode(self.name, payload, content_type))

    def send_frame(self, route: list[bytes], frame: bytes) -> None:
        if self._sock is None:
            self.owner.log.warning("reply on closed service '%s' dropped", self.name)
            return
        self._sock.send_multipart(route + [frame])

    def _on_readable(self) -> None:
        sock = self._sock
        for frames in _recv_batch(sock):
            self._handle(frames)
            if self._sock is not sock:  # a handler closed the server
                return

    def _handle(self, frames: list[bytes]) -> None:
        route, body = _split_route(frames)
        try:
            env = self._unpack(body)
        except MessageError as exc:
            self.owner.log.warning("service '%s': bad request: %s", self.name, exc)
            payload, ctype = self.error_reply(str(exc))
            self.send_reply(route, payload, ctype)
            return
        request = Request(self, route, env)
        try:
            self.handler(request)
        except MessageError as exc:
            self.owner.log.warning("service '%s': bad request: %s", self.name, exc)
            if not request.replied:
                request.error(str(exc))
        except Exception as exc:
            self.owner.log.exception("service '%s': handler failed", self.name)
            if not request.replied:
                request.error(f"internal error: {type(exc).__name__}: {exc}")

    def _unpack(self, body: list[bytes]) -> envelope.Envelope:
        if len(body) != 1:
            raise TooManyPartsError(f"Too many message parts: got {len(body)} frames, a b0 message is one")
        env = envelope.decode(body[0], max_size=self.owner.max_message_size)
        if env.header0 != self.name:
            raise HeaderMismatchError(
                f"Message header (service) does not match (got '{env.header0[:200]}', expected '{self.name}')")
        if self.request_type is not None and env.content_type != self.request_type:
            raise ContentTypeError(
                f"bad content type: got '{env.content_type[:200]}', expected '{self.request_type}'")
        return env


def _split_route(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """ROUTER input = identity [+ more routing] + empty delimiter + body (REQ peers)."""
    for i in range(1, len(frames)):
        if not frames[i]:
            return frames[:i + 1], frames[i + 1:]
    return frames[:1], frames[1:]  # a DEALER that sent no delimiter


class ServiceClient:
    """REQ socket to one service; blocking call() or queued call_async()."""

    def __init__(self, owner, name: str, *, notify_graph: bool = True):
        self.owner = owner
        self.raw_name = name
        self.name = name
        self.notify_graph = notify_graph
        self.address: str | None = None
        self._sock: zmq.Socket | None = None
        self._queue: deque = deque()
        self._in_flight = None  # (callback, timer, timeout_s) of the call_async awaiting its reply

    def open(self, name: str, address: str) -> None:
        self.name = name
        self.address = address
        self._sock = make_socket(self.owner.context, zmq.REQ)
        self._sock.connect(address)

    def close(self, linger: int | None = None) -> None:
        if self._sock is None:
            return
        self.owner.loop.remove_socket(self._sock)
        self._sock.close(linger)
        self._sock = None
        pending = ([self._in_flight[0]] if self._in_flight else []) + [item[2] for item in self._queue]
        if self._in_flight:
            self._in_flight[1].cancel()
        self._in_flight = None
        self._queue.clear()
        for callback in pending:
            self._deliver(callback, ConnectionAbortedError(f"client of '{self.name}' was closed"))

    @property
    def busy(self) -> bool:
        return self._in_flight is not None or bool(self._queue)

    def call(self, payload: bytes, content_type: str = "", timeout_s: float | None = None) -> envelope.Envelope:
        """Send and wait; TimeoutError after timeout_s (the socket is then rebuilt)."""
        if self._sock is None:
            raise RuntimeError(f"client of '{self.name}' is not connected")
        if self.busy:
            raise RuntimeError(f"client of '{self.name}' has a call_async in flight")
        self._sock.send(envelope.encode(self.name, payload, content_type))
        if timeout_s is not None and not self._sock.poll(max(0, int(timeout_s * 1000)), zmq.POLLIN):
            self._rebuild()
            raise TimeoutError(f"no reply from service '{self.name}' within {timeout_s:g} s")
        return self._unpack(self._sock.recv_multipart())

    def call_async(self, payload: bytes, content_type: str = "", timeout_s: float | None = None,
                   callback=None) -> None:
        """Queue a call; callback(envelope or exception) runs in the loop."""
        if self._sock is None:
            raise RuntimeError(f"client of '{self.name}' is not connected")
        self._queue.append((payload, content_type, callback, timeout_s))
        if self._in_flight is None:
            self._send_next()

    def _send_next(self) -> None:
        if not self._queue or self._sock is None:
            return
        payload, content_type, callback, timeout_s = self._queue.popleft()
        self._sock.send(envelope.encode(self.name, payload, content_type))
        timer = (self.owner.loop.call_later(timeout_s, self._on_timeout)
                 if timeout_s is not None else _NoTimer)
        self._in_flight = (callback, timer, timeout_s)
        self.owner.loop.add_socket(self._sock, self._on_readable)

    def _on_readable(self) -> None:
        try:
            frames = self._sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        callback, timer, _ = self._in_flight
        timer.cancel()
        self._in_flight = None
        self.owner.loop.remove_socket(self._sock)
        try:
            result = self._unpack(frames)
        except MessageError as exc:
            result = exc
        self._deliver(callback, result)
        if self._in_flight is None:  # the callback may already have sent the next one
            self._send_next()

    def _on_timeout(self) -> None:
        callback, _, timeout_s = self._in_flight
        self._in_flight = None
        self._rebuild()
        self._deliver(callback, TimeoutError(f"no reply from service '{self.name}' within {timeout_s:g} s"))
        if self._in_flight is None:
            self._send_next()

    def _deliver(self, callback, result) -> None:
        if callback is None:
            return
        try:
            callback(result)
        except Exception:
            self.owner.log.exception("callback for service '%s' failed", self.name)

    def _rebuild(self) -> None:
        # A REQ socket that missed its reply is stuck; drop it (and its unsent request) at once.
        self.owner.loop.remove_socket(self._sock)
        self._sock.close(0)
        self._sock = make_socket(self.owner.context, zmq.REQ)
        self._sock.connect(self.address)

    def _unpack(self, frames: list[bytes]) -> envelope.Envelope:
        if len(frames) != 1:
            raise TooManyPartsError(f"Too many message parts: reply has {len(frames)} frames")
        env = envelope.decode(frames[0], max_size=self.owner.max_message_size)
        if env.header0 != self.name:
            raise HeaderMismatchError(
                f"Message header (service) does not match (got '{env.header0[:200]}', expected '{self.name}')")
        return env


class _NoTimer:
    @staticmethod
    def cancel() -> None:
        pass


class Publisher:
    """PUB socket connected to the resolver's XSUB proxy."""

    def __init__(self, owner, topic: str, *, content_type: str = "", notify_graph: bool = True):
        self.owner = owner
        self.raw_name = topic
        self.name = topic
        self.content_type = content_type
        self.notify_graph = notify_graph
        self.address: str | None = None
        self._sock: zmq.Socket | None = None

    def open(self, topic: str, xsub_address: str) -> None:
        self.name = topic
        self.address = xsub_address
        self._sock = make_socket(self.owner.context, zmq.PUB)
        self._sock.connect(xsub_address)

    def reconnect(self, xsub_address: str) -> None:
        # A fresh socket: disconnect() leaves queued data for the dead proxy lingering.
        if self._sock is not None and xsub_address != self.address:
            self.close(0)
            self.open(self.name, xsub_address)

    def publish(self, payload: bytes, content_type: str | None = None) -> None:
        if self._sock is None:
            raise RuntimeError(f"publisher of '{self.name}' is not connected (node not started?)")
        ctype = self.content_type if content_type is None else content_type
        self._sock.send(envelope.encode(self.name, payload, ctype))

    def close(self, linger: int | None = None) -> None:
        if self._sock is not None:
            self._sock.close(linger)
            self._sock = None


class Subscriber:
    """SUB socket on the XPUB proxy, subscribed to topic + "\\n" (no prefix trap)."""

    def __init__(self, owner, topic: str, callback, *, content_type: str | None = None,
                 notify_graph: bool = True):
        self.owner = owner
        self.raw_name = topic
        self.name = topic
        self.callback = callback
        self.content_type = content_type
        self.notify_graph = notify_graph
        self.address: str | None = None
        self._sock: zmq.Socket | None = None

    def open(self, topic: str, xpub_address: str) -> None:
        self.name = topic
        self.address = xpub_address
        self._sock = make_socket(self.owner.context, zmq.SUB)
        self._sock.setsockopt(zmq.MAXMSGSIZE, self.owner.max_message_size * HARD_LIMIT_FACTOR)
        self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode("utf-8") + b"\n")
        self._sock.connect(xpub_address)
        self.owner.loop.add_socket(self._sock, self._on_readable)

    def reconnect(self, xpub_address: str) -> None:
        # A fresh socket: disconnect() leaves the subscription for the dead proxy lingering.
        if self._sock is not None and xpub_address != self.address:
            self.close(0)
            self.open(self.name, xpub_address)

    def close(self, linger: int | None = None) -> None:
        if self._sock is not None:
            self.owner.loop.remove_socket(self._sock)
            self._sock.close(linger)
            self._sock = None

    def _on_readable(self) -> None:
        sock = self._sock
        for frames in _recv_batch(sock):
            try:
                env = self._unpack(frames)
            except MessageError as exc:
                self.owner.log.warning("topic '%s': message dropped: %s", self.name, exc)
                continue
            try:
                self.callback(env)
            except Exception:
                self.owner.log.exception("topic '%s': callback failed", self.name)
            if self._sock is not sock:  # the callback closed the subscriber
                return

    def _unpack(self, frames: list[bytes]) -> envelope.Envelope:
        if len(frames) != 1:
            raise TooManyPartsError(f"Too many message parts: got {len(frames)} frames")
        env = envelope.decode(frames[0], max_size=self.owner.max_message_size)
        if env.header0 != self.name:
            raise HeaderMismatchError(
                f"Message header (topic) does not match (got '{env.header0[:200]}', expected '{self.name}')")
        if self.content_type is not None and env.content_type != self.content_type:
            raise ContentTypeError(
                f"bad content type: got '{env.content_type[:200]}', expected '{self.content_type}'")
        return env
