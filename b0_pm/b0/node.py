"""A b0 node: announce, sockets, heartbeats, graph notifications, log, shutdown.

Follows the C++ Node lifecycle (spec 3.5) on one event loop: requests are
handled as they arrive, heartbeats go out on their own REQ socket without
blocking anything, and a resolver that restarted and forgot the node is
answered by announcing again and re-registering everything.
"""

from __future__ import annotations

import logging
import os
import socket as _socket
import sys
import threading
import time

import zmq

from b0_pm.b0 import jsoncodec
from b0_pm.b0.envelope import DEFAULT_MAX_SIZE
from b0_pm.b0.errors import FieldError, MessageError
from b0_pm.b0.loop import EventLoop
from b0_pm.b0.sockets import LINGER_MS, Publisher, ServiceClient, ServiceServer, Subscriber

RESOLV_REQUEST = "b0.message.resolv.Request"
RESOLV_RESPONSE = "b0.message.resolv.Response"
LOG_ENTRY = "b0.message.log.LogEntry"
DEFAULT_RESOLVER = "tcp://localhost:22000"

TRACE = 5
logging.addLevelName(TRACE, "TRACE")
B0_LEVELS = {"trace": TRACE, "debug": logging.DEBUG, "info": logging.INFO,
             "warn": logging.WARNING, "error": logging.ERROR, "fatal": logging.CRITICAL}


class ResolverError(Exception):
    """The resolver refused a request or answered something unusable."""


class ServiceNotFound(ResolverError):
    """resolve_service: no service of that name is registered."""


def default_host_id() -> str:
    return os.environ.get("B0_HOST_ID") or _socket.gethostname()


def default_resolver_address() -> str:
    return os.environ.get("B0_RESOLVER") or DEFAULT_RESOLVER


def default_bind_host() -> str:
    # Not a C++ variable: lets tests and single-host setups keep services on loopback.
    return os.environ.get("B0PM_BIND_HOST") or "*"


def b0_level_name(levelno: int) -> str:
    for name, number in sorted(B0_LEVELS.items(), key=lambda item: -item[1]):
        if levelno >= number:
            return name
    return "trace"


def console_level(text: str | None) -> int:
    """B0_CONSOLE_LOGLEVEL value -> logging level; ValueError names the valid ones."""
    if not text:
        return logging.INFO
    try:
        return B0_LEVELS[text.lower()]
    except KeyError:
        raise ValueError(f"invalid log level {text!r}: use one of {', '.join(B0_LEVELS)}") from None


def substitute(name: str, host_id: str, node_name: str) -> str:
    return name.replace("%h", host_id).replace("%n", node_name)


class _ConsoleFormatter(logging.Formatter):
    def __init__(self, owner):
        super().__init__(datefmt="%Y-%m-%d %H:%M:%S")
        self.owner = owner

    def format(self, record: logging.LogRecord) -> str:
        text = f"{self.formatTime(record, self.datefmt)} [{self.owner.name}] {b0_level_name(record.levelno)}: " \
               f"{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _LogTopicHandler(logging.Handler):
    """Publishes every record, whatever its level, as a LogEntry on topic `log`."""

    def __init__(self, owner):
        super().__init__(level=logging.NOTSET)
        self.owner = owner
        self._busy = False

    def emit(self, record: logging.LogRecord) -> None:
        node = self.owner
        # Like C++: only the node's own thread publishes (zmq sockets are not thread-safe).
        if self._busy or node._log_publisher is None or threading.get_ident() != node._thread_id:
            return
        self._busy = True
        try:
            entry = {"node_name": node.name, "level": b0_level_name(record.levelno),
                     "message": record.getMessage(), "time_usec": int(record.created * 1_000_000)}
            node._log_publisher.publish(jsoncodec.dumps(entry), LOG_ENTRY)
        except Exception:
            self.handleError(record)
        finally:
            self._busy = False


def make_logger(owner, level_name: str | None = None) -> logging.Logger:
    """Logger printing to stderr at B0_CONSOLE_LOGLEVEL (else level_name, else info)
    and publishing everything on `log`.

    owner provides .name, ._thread_id and ._log_publisher (None until connected).
    """
    logger = logging.Logger(f"b0.node.{owner.name}", TRACE)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(console_level(os.environ.get("B0_CONSOLE_LOGLEVEL") or level_name))
    console.setFormatter(_ConsoleFormatter(owner))
    logger.addHandler(console)
    logger.addHandler(_LogTopicHandler(owner))
    return logger


class Node:
    def __init__(self, name: str, *, resolver: str | None = None, host_id: str | None = None,
                 loop: EventLoop | None = None, announce_timeout: float | None = None,
                 resolver_timeout: float | None = 10.0, shutdown_timeout: float = 3.0,
                 max_message_size: int = DEFAULT_MAX_SIZE, bind_host: str | None = None):
        self.host_id = host_id or default_host_id()
        self.requested_name = substitute(name, self.host_id, name)
        self.name = self.requested_name
        self.resolver_address = resolver or default_resolver_address()
        self.announce_timeout = announce_timeout
        self.resolver_timeout = resolver_timeout
        self.shutdown_timeout = shutdown_timeout
        self.max_message_size = max_message_size
        self.bind_host = bind_host or default_bind_host()
        self.loop = loop or EventLoop()
        self._owns_loop = loop is None
        self.context = zmq.Context(io_threads=1)
        self._thread_id = threading.get_ident()
        self._log_publisher: Publisher | None = None
        self.log = make_logger(self)

        self.xsub_address: str | None = None
        self.xpub_address: str | None = None
        self.heartbeat_interval_us = 0
        self.started = False
        self.closed = False
        self._sockets: list = []  # declaration order, like the C++ managed sockets
        self._resolver = ServiceClient(self, "resolv", notify_graph=False)
        self._heartbeat_client: ServiceClient | None = None
        self._heartbeat_timer = None
        self._resolver_dead = False

    def __enter__(self) -> "Node":
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    # -- declaring sockets ----------------------------------------------------

    def service_server(self, name: str, handler, *, request_type: str | None = None,
                       response_type: str = "", error_reply=None, port: int | None = None) -> ServiceServer:
        """handler(request): request.payload/.content_type/.envelope, request.reply(...)."""
        return self._declare(ServiceServer(self, name, handler, request_type=request_type,
                                           response_type=response_type, error_reply=error_reply, port=port))

    def service_client(self, name: str) -> ServiceClient:
        return self._declare(ServiceClient(self, name))

    def publisher(self, topic: str, *, content_type: str = "") -> Publisher:
        return self._declare(Publisher(self, topic, content_type=content_type))

    def subscriber(self, topic: str, callback, *, content_type: str | None = None) -> Subscriber:
        """callback(envelope); messages with a bad envelope/header0/type are logged and dropped."""
        return self._declare(Subscriber(self, topic, callback, content_type=content_type))

    def remove(self, sock) -> None:
        """Close one declared socket and tell the graph (active:false)."""
        self._sockets.remove(sock)
        if self.started:
            self._close_socket(sock)

    def _declare(self, sock):
        self._sockets.append(sock)
        if self.started:
            try:
                self._open_socket(sock)
            except BaseException:
                self._sockets.remove(sock)  # never opened: nothing to close or notify later
                sock.close(0)
                raise
        return sock

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """announce_node, connect the log publisher, start heartbeats, open every socket."""
        if self.started:
            return
        self._resolver.open("resolv", self.resolver_address)
        self._announce(self.announce_timeout)
        self._log_publisher = Publisher(self, "log", content_type=LOG_ENTRY, notify_graph=False)
        self._log_publisher.open("log", self.xsub_address)
        self._start_heartbeats()
        self.started = True
        for sock in list(self._sockets):
            self._open_socket(sock)

    def spin(self) -> None:
        """Run the loop until stop() or SIGINT/SIGTERM; then call shutdown()."""
        if not self.started:
            self.start()
        self.loop.run()

    def stop(self) -> None:
        self.loop.stop()

    def shutdown(self) -> None:
        """Graph notifications active:false, then shutdown_node; bounded if the resolver is gone."""
        if self.closed:
            return
        self.closed = True
        self._shutdown_deadline = time.monotonic() + self.shutdown_timeout
        # Unsent data may linger (LINGER 5000 as in C++) but never past the shutdown budget.
        linger_ms = int(self.shutdown_timeout * 1000)
        if self.started:
            self._stop_heartbeats()
            for sock in list(self._sockets):
                self._close_socket(sock, min(linger_ms, LINGER_MS))
            try:
                reply = self._resolver_request("shutdown_node", {"node_name": self.name}, self._timeout())
                if not reply.get("ok"):
                    self.log.warning("resolver refused shutdown_node for '%s'", self.name)
            except (TimeoutError, ResolverError, MessageError) as exc:
                self.log.warning("shutdown_node failed: %s", exc)
        # Never announced (or resolver gone): a queued announce is not worth waiting for.
        linger = 0 if self._resolver_dead or not self.started else min(linger_ms, LINGER_MS)
        if self._log_publisher is not None:
            self._log_publisher.close(linger)
            self._log_publisher = None
        self._resolver.close(linger)
        self.context.term()
        if self._owns_loop:
            self.loop.close()

    # -- resolver conversation ------------------------------------------------

    def _timeout(self) -> float | None:
        """resolver_timeout, or what is left of the shutdown budget once closing."""
        if not self.closed:
            return self.resolver_timeout
        return max(0.0, self._shutdown_deadline - time.monotonic())

    def _resolver_request(self, key: str, body: dict, timeout: float | None) -> dict:
        if self._resolver_dead:
            raise TimeoutError(f"the resolver at {self.resolver_address} stopped answering")
        payload = jsoncodec.dumps({key: body})
        try:
            env = self._resolver.call(payload, RESOLV_REQUEST, timeout)
        except TimeoutError:
            if self.closed:
                self._resolver_dead = True  # skip the rest of the shutdown conversation
            raise TimeoutError(f"no reply from the resolver at {self.resolver_address} "
                               f"within {timeout:g} s ({key})") from None
        return _sub_response(env, key)

    def _announce(self, timeout: float | None) -> None:
        reply = self._resolver_request("announce_node", {
            "host_id": self.host_id, "process_id": os.getpid(), "node_name": self.requested_name,
        }, timeout)
        if not reply.get("ok"):
            raise ResolverError("announceNode failed")
        try:
            name = _field(reply, "node_name", str)
            xsub = _field(reply, "xsub_sock_addr", str)
            xpub = _field(reply, "xpub_sock_addr", str)
            interval = _field(reply, "minimum_heartbeat_interval", int)
        except MessageError as exc:
            raise ResolverError(f"malformed announce_node reply: {exc}") from exc
        if name != self.name:
            self.log.warning("Warning: resolver changed this node name to '%s'", name)
        self.name = name
        self.xsub_address, self.xpub_address = xsub, xpub
        self.heartbeat_interval_us = interval

    def _notify(self, key: str, other_key: str, sock, active: bool) -> None:
        reverse = isinstance(sock, (Subscriber, ServiceClient))
        self._resolver_request(key, {"node_name": self.name, other_key: sock.name,
                                     "reverse": reverse, "active": active}, self._timeout())

    def _notify_graph(self, sock, active: bool) -> None:
        if not sock.notify_graph:
            return
        if isinstance(sock, (Publisher, Subscriber)):
            self._notify("node_topic", "topic_name", sock, active)
        else:
            self._notify("node_service", "service_name", sock, active)

    def _open_socket(self, sock) -> None:
        name = substitute(sock.raw_name, self.host_id, self.name)
        if isinstance(sock, ServiceServer):
            sock.open(name, self.host_id)
            self._announce_service(sock)
        elif isinstance(sock, ServiceClient):
            sock.open(name, self.resolve_service(name))
        elif isinstance(sock, Publisher):
            sock.open(name, self.xsub_address)
        else:
            sock.open(name, self.xpub_address)
        self._notify_graph(sock, True)

    def _announce_service(self, server: ServiceServer) -> None:
        reply = self._resolver_request("announce_service", {
            "node_name": self.name, "service_name": server.name, "sock_addr": server.address,
        }, self._timeout())
        if not reply.get("ok"):
            raise ResolverError(f"announceService failed: the resolver refused service '{server.name}' "
                                f"(name taken?)")

    def _close_socket(self, sock, linger: int | None = None) -> None:
        sock.close(linger)
        try:
            self._notify_graph(sock, False)
        except (TimeoutError, ResolverError, MessageError) as exc:
            self.log.warning("graph notification for '%s' failed: %s", sock.name, exc)

    def resolve_service(self, name: str) -> str:
        reply = self._resolver_request("resolve_service", {"service_name": name}, self._timeout())
        address = reply.get("sock_addr")
        if not reply.get("ok") or not isinstance(address, str) or not address:
            raise ServiceNotFound(f"Failed to resolve '{name}'")
        return address

    # -- heartbeats -----------------------------------------------------------

    def _start_heartbeats(self) -> None:
        if self.heartbeat_interval_us <= 0:
            return
        period = self.heartbeat_interval_us / 3_000_000
        self._heartbeat_client = ServiceClient(self, "resolv", notify_graph=False)
        self._heartbeat_client.open("resolv", self.resolver_address)
        self._heartbeat_period = period
        self._send_heartbeat()
        self._heartbeat_timer = self.loop.call_every(period, self._send_heartbeat)

    def _stop_heartbeats(self) -> None:
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
            self._heartbeat_timer = None
        if self._heartbeat_client is not None:
            self._heartbeat_client.close(0)
            self._heartbeat_client = None

    def _send_heartbeat(self) -> None:
        client = self._heartbeat_client
        if client.busy:  # the previous one is still within its timeout
            return
        client.call_async(jsoncodec.dumps({"heartbeat": {"node_name": self.name}}), RESOLV_REQUEST,
                          self._heartbeat_period, self._on_heartbeat_reply)

    def _on_heartbeat_reply(self, result) -> None:
        if self.closed:  # shutdown closed the heartbeat socket under this call
            return
        if isinstance(result, Exception):
            self.log.warning("HB: %s", result)
            return
        try:
            reply = _sub_response(result, "heartbeat")
        except MessageError as exc:
            self.log.warning("HB: %s", exc)
            return
        if reply.get("ok") is False:
            self.log.warning("HB: the resolver does not know node '%s' (restarted?): announcing again",
                             self.name)
            self._reregister()

    def _reregister(self) -> None:
        """After a resolver restart: announce, follow the new proxy, register everything again."""
        old_interval = self.heartbeat_interval_us
        try:
            self._announce(self.resolver_timeout)
            self._log_publisher.reconnect(self.xsub_address)
            for sock in self._sockets:
                if isinstance(sock, Publisher):
                    sock.reconnect(self.xsub_address)
                elif isinstance(sock, Subscriber):
                    sock.reconnect(self.xpub_address)
                elif isinstance(sock, ServiceServer):
                    self._announce_service(sock)
                self._notify_graph(sock, True)
        except (TimeoutError, ResolverError, MessageError) as exc:
            self.log.error("re-announce failed (will retry on the next heartbeat): %s", exc)
            return
        if self.heartbeat_interval_us != old_interval:
            self._stop_heartbeats()
            self._start_heartbeats()
        self.log.info("registered again with the resolver as '%s'", self.name)


def _sub_response(env, key: str) -> dict:
    """The `key` object of a resolver Response envelope."""
    if env.content_type != RESOLV_RESPONSE:
        raise ResolverError(f"resolver replied with content type '{env.content_type}'")
    reply = jsoncodec.loads(env.payload)
    sub = reply.get(key) if isinstance(reply, dict) else None
    if not isinstance(sub, dict):
        detail = reply.get("error_message") if isinstance(reply, dict) else None
        raise ResolverError(f"resolver reply has no '{key}' object" + (f": {detail}" if detail else ""))
    return sub


def _field(obj: dict, key: str, kind: type):
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise FieldError(f"field '{key}' must be {kind.__name__}, got {value!r:.60}")
    return value

