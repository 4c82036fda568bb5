"""A b0 resolver that C++ nodes use unchanged (spec 3), answering at once.

One event loop serves `resolv` (ROUTER: no input can wedge it), forwards the
XSUB/XPUB proxy, publishes `graph` on every change and sweeps silent nodes
on a monotonic timer.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass

import zmq

from b0_pm.b0 import envelope, jsoncodec
from b0_pm.b0.envelope import DEFAULT_MAX_SIZE
from b0_pm.b0.errors import FieldError
from b0_pm.b0.loop import EventLoop
from b0_pm.b0.node import (
    RESOLV_REQUEST,
    RESOLV_RESPONSE,
    default_bind_host,
    default_host_id,
    make_logger,
)
from b0_pm.b0.sockets import DRAIN_BATCH, ServiceServer, bound_port, make_socket

GRAPH_TYPE = "b0.message.graph.Graph"
DEFAULT_PORT = 22000
DEFAULT_HEARTBEAT_INTERVAL_US = 30_000_000
RESOLVER_NAME = "resolver"
RESERVED_NAME = "node"
INT32 = (-2**31, 2**31 - 1)
INT64 = (-2**63, 2**63 - 1)

# Request fields per key, in codec order (spec 3.4); the keys too are in codec order.
REQUEST_FIELDS = {
    "announce_node": {"host_id": str, "process_id": INT32, "node_name": str},
    "shutdown_node": {"node_name": str},
    "announce_service": {"node_name": str, "service_name": str, "sock_addr": str},
    "resolve_service": {"service_name": str},
    "heartbeat": {"node_name": str},
    "node_topic": {"node_name": str, "topic_name": str, "reverse": bool, "active": bool},
    "node_service": {"node_name": str, "service_name": str, "reverse": bool, "active": bool},
    "get_graph": {},
}


@dataclass
class NodeEntry:
    host_id: str
    process_id: int
    last_seen: float  # time.monotonic() of the last announce or heartbeat


def resolver_error_reply(message: str) -> tuple[bytes, str]:
    # C++ decoders skip unknown keys, so this is a valid (empty) Response to them.
    return jsoncodec.dumps({"error_message": message}), RESOLV_RESPONSE


def parse_request(obj) -> list[tuple[str, dict]]:
    """Validate a whole request before acting on any key (C++ decodes all or nothing)."""
    if not isinstance(obj, dict):
        raise FieldError(f"request must be a JSON object, got {type(obj).__name__}")
    parsed = []
    for key, fields in REQUEST_FIELDS.items():
        if key not in obj:
            continue
        body = obj[key]
        if not isinstance(body, dict):
            raise FieldError(f"'{key}' must be an object, got {_json_type(body)}")
        parsed.append((key, {name: _checked(key, name, kind, body) for name, kind in fields.items()}))
    return parsed


def _checked(key: str, name: str, kind, body: dict):
    if name not in body:
        raise FieldError(f"'{key}' lacks the required field '{name}'")
    value = body[name]
    if isinstance(kind, tuple):  # an integer range; C++ truncates a fraction (12.9 -> 12)
        if isinstance(value, float) and math.isfinite(value):
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise FieldError(f"'{key}.{name}' must be an integer, got {_json_type(value)}")
        if not kind[0] <= value <= kind[1]:
            raise FieldError(f"'{key}.{name}' is out of range: {value}")
        return value
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise FieldError(f"'{key}.{name}' must be {_JSON_NAMES[kind]}, got {_json_type(value)}")
    return value


_JSON_NAMES = {str: "a string", bool: "a boolean", dict: "an object", list: "an array",
               int: "an integer", float: "a number", type(None): "null"}


def _json_type(value) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


class _XpubLogPublisher:
    """The resolver's own `log` topic: sent straight out of its XPUB socket."""

    def __init__(self, sock: zmq.Socket):
        self.sock = sock

    def publish(self, payload: bytes, content_type: str) -> None:
        self.sock.send(envelope.encode("log", payload, content_type))


class Resolver:
    def __init__(self, *, port: int = DEFAULT_PORT,
                 minimum_heartbeat_interval_us: int = DEFAULT_HEARTBEAT_INTERVAL_US,
                 host_id: str | None = None, bind_host: str | None = None,
                 loop: EventLoop | None = None, max_message_size: int = DEFAULT_MAX_SIZE,
                 log_level: str | None = None):
        self.name = RESOLVER_NAME
        self.port = port
        self.heartbeat_interval_us = minimum_heartbeat_interval_us
        self.host_id = host_id or default_host_id()
        self.bind_host = bind_host or default_bind_host()
        self.max_message_size = max_message_size
        self.loop = loop or EventLoop()
        self._owns_loop = loop is None
        self.context = zmq.Context(io_threads=1)
        self._thread_id = threading.get_ident()
        self._log_publisher = None
        self.log = make_logger(self, log_level)

        self.nodes: dict[str, NodeEntry] = {}
        self.services: dict[str, tuple[str, str]] = {}  # service -> (node, sock_addr)
        self.node_topic: set[tuple[str, str, bool]] = set()  # (node, topic, reversed)
        self.node_service: set[tuple[str, str, bool]] = set()
        self.xsub_address = self.xpub_address = ""
        self._xsub = self._xpub = None
        self._server: ServiceServer | None = None
        self._sweep_timer = None

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Bind everything; OSError (and nothing left open) when a port cannot be had."""
        try:
            self._open_sockets()
        except (OSError, zmq.ZMQError) as exc:
            self.close()
            raise OSError(str(exc)) from exc
        self.nodes[RESOLVER_NAME] = NodeEntry(self.host_id, os.getpid(), time.monotonic())
        self.services["resolv"] = (RESOLVER_NAME, self._server.address)
        self.node_topic.add((RESOLVER_NAME, "graph", False))
        self.node_service.add((RESOLVER_NAME, "resolv", False))

        if self.heartbeat_interval_us > 0:
            self._sweep_timer = self.loop.call_every(self.heartbeat_interval_us / 3_000_000, self.sweep)
        else:
            self.log.warning("Online monitoring is disabled")
        self.log.info("Resolver listening on tcp://%s:%d (resolv also at %s), proxy XSUB %s XPUB %s",
                      self.bind_host, self.port, self._server.address, self.xsub_address, self.xpub_address)

    def _open_sockets(self) -> None:
        self._xsub = make_socket(self.context, zmq.XSUB)
        self._xpub = make_socket(self.context, zmq.XPUB)
        self._xsub.bind(f"tcp://{self.bind_host}:*")
        self._xpub.bind(f"tcp://{self.bind_host}:*")
        self.xsub_address = f"tcp://{self.host_id}:{bound_port(self._xsub)}"
        self.xpub_address = f"tcp://{self.host_id}:{bound_port(self._xpub)}"
        self.loop.add_socket(self._xsub, self._forward_publications)
        self.loop.add_socket(self._xpub, self._forward_subscriptions)
        self._log_publisher = _XpubLogPublisher(self._xpub)

        # The C++ quirk (3.1): `resolv` is a normal service on an ephemeral port,
        # registered under that address, and the fixed port is bound as well.
        self._server = ServiceServer(self, "resolv", self._handle, request_type=RESOLV_REQUEST,
                                     response_type=RESOLV_RESPONSE, error_reply=resolver_error_reply,
                                     notify_graph=False)
        self._server.open("resolv", self.host_id)
        self._server.bind_also(self.port)

    def run(self) -> None:
        """Serve until stop() or SIGINT/SIGTERM."""
        self.loop.run()

    def stop(self) -> None:
        self.loop.stop()

    def close(self) -> None:
        if self.context.closed:
            return
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
        self._log_publisher = None
        if self._server is not None:
            self._server.close()
        for sock in (self._xsub, self._xpub):
            if sock is not None:
                self.loop.remove_socket(sock)
                sock.close(0)
        self.context.term()
        if self._owns_loop:
            self.loop.close()

    # -- proxy ----------------------------------------------------------------

    def _forward_publications(self) -> None:
        for _ in range(DRAIN_BATCH):
            try:
                frames = self._xsub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._xpub.send_multipart(frames)

    def _forward_subscriptions(self) -> None:
        for _ in range(DRAIN_BATCH):
            try:
                frames = self._xpub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._xsub.send_multipart(frames)

    # -- requests -------------------------------------------------------------

    def _handle(self, request) -> None:
        parsed = parse_request(jsoncodec.loads(request.payload))
        response = {}
        for key, args in parsed:
            response[key] = getattr(self, f"_{key}")(**args)
        request.reply(jsoncodec.dumps(response), RESOLV_RESPONSE)

    def _announce_node(self, host_id: str, process_id: int, node_name: str) -> dict:
        name = self._unique_name(node_name)
        self.nodes[name] = NodeEntry(host_id, process_id, time.monotonic())
        self.log.info("New node has joined: '%s'", name)
        self._publish_graph()
        return {"ok": True, "node_name": name, "xsub_sock_addr": self.xsub_address,
                "xpub_sock_addr": self.xpub_address,
                "minimum_heartbeat_interval": self.heartbeat_interval_us}

    def _unique_name(self, requested: str) -> str:
        base = requested or RESERVED_NAME
        candidate, suffix = base, 0
        while candidate in self.nodes or candidate == RESERVED_NAME:
            suffix += 1
            candidate = f"{base}-{suffix}"
        return candidate

    def _shutdown_node(self, node_name: str) -> dict:
        if node_name not in self.nodes or node_name == RESOLVER_NAME:
            self.log.error("Invalid node name: %s", node_name)
            return {"ok": False}
        self._remove_node(node_name)
        self.log.info("Node '%s' has left", node_name)
        self._publish_graph()
        return {"ok": True}

    def _remove_node(self, name: str) -> None:
        del self.nodes[name]
        for service in [s for s, (owner, _) in self.services.items() if owner == name]:
            del self.services[service]
        self.node_topic = {edge for edge in self.node_topic if edge[0] != name}
        self.node_service = {edge for edge in self.node_service if edge[0] != name}

    def _announce_service(self, node_name: str, service_name: str, sock_addr: str) -> dict:
        if node_name not in self.nodes:
            self.log.error("Invalid node name: %s", node_name)
            return {"ok": False}
        if service_name in self.services:
            self.log.error("A service with name '%s' already exists", service_name)
            return {"ok": False}
        self.services[service_name] = (node_name, sock_addr)
        self.log.info("Node '%s' announced service '%s' (%s)", node_name, service_name, sock_addr)
        return {"ok": True}

    def _resolve_service(self, service_name: str) -> dict:
        entry = self.services.get(service_name)
        if entry is None:
            self.log.error("Failed to resolve service '%s'", service_name)
            return {"ok": False, "sock_addr": ""}
        return {"ok": True, "sock_addr": entry[1]}

    def _heartbeat(self, node_name: str) -> dict:
        entry = self.nodes.get(node_name)
        if entry is None:
            self.log.error("Received a heartbeat from an invalid node name: %s", node_name)
            return {"ok": False, "time_usec": 0}
        if node_name == RESOLVER_NAME:
            self.sweep()  # the C++ sweeper's magic name still works
        entry.last_seen = time.monotonic()
        return {"ok": True, "time_usec": time.time_ns() // 1000}

    def _node_topic(self, node_name: str, topic_name: str, reverse: bool, active: bool) -> dict:
        self._update_edge(self.node_topic, (node_name, topic_name, reverse), active)
        return {}

    def _node_service(self, node_name: str, service_name: str, reverse: bool, active: bool) -> dict:
        self._update_edge(self.node_service, (node_name, service_name, reverse), active)
        return {}

    def _update_edge(self, edges: set, edge: tuple, active: bool) -> None:
        if active == (edge in edges):
            return
        (edges.add if active else edges.discard)(edge)
        self._publish_graph()

    def _get_graph(self) -> dict:
        return {"graph": self.graph()}

    # -- graph and liveness ---------------------------------------------------

    def graph(self) -> dict:
        def links(edges):
            ordered = sorted(e for e in edges if not e[2]) + sorted(e for e in edges if e[2])
            return [{"node_name": n, "other_name": o, "reversed": r} for n, o, r in ordered]

        return {
            "nodes": [{"host_id": e.host_id, "process_id": e.process_id, "node_name": name}
                      for name, e in sorted(self.nodes.items())],
            "node_topic": links(self.node_topic),
            "node_service": links(self.node_service),
        }

    def _publish_graph(self) -> None:
        self._xpub.send(envelope.encode("graph", jsoncodec.dumps(self.graph()), GRAPH_TYPE))

    def sweep(self) -> None:
        """Purge every node silent for longer than the heartbeat interval."""
        if self.heartbeat_interval_us <= 0:
            return
        deadline = time.monotonic() - self.heartbeat_interval_us / 1_000_000
        silent = [name for name, e in self.nodes.items() if name != RESOLVER_NAME and e.last_seen < deadline]
        for name in silent:
            self.log.warning("Node '%s' disconnected due to timeout.", name)
            self._remove_node(name)
        if silent:
            self._publish_graph()
