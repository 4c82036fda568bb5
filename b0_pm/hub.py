"""The HUB node: learns every PM from its beacons and forwards requests by host.

Wire-compatible with `b0_process_manager_hub` (spec 7.6) and the GUI that
drives PMs only through it (spec 7.7). What it fixes, keeping every reply
the original defines:

- A beacon with a new node/service name for a known host is followed (the
  original kept the stale address forever), unless the PM it replaces is
  still beaconing (two PMs claiming one host id): then the first stays.
  A PM restarted under its old name (new port) is seen in the resolver's
  graph as a new process id, and followed too.
- Each forwarded request has a deadline (forward_timeout_s from its
  arrival). A PM that does not answer in time gets the client a clear
  error, its REQ socket is rebuilt, and the HUB goes on; the original
  blocked forever.
- Replies are deferred (`request.reply` later), and each host has its own
  queue with one request in flight, so a slow or dead PM never delays
  requests for other hosts. One in flight per host keeps a single REQ
  socket per PM (the original's model) and the PM's own order; a queued
  request whose deadline passes is answered at once.
- Bad input of any kind gets an error reply instead of aborting the HUB.
- active_nodes carries node_name and service_name (the original left them empty).

Extensions (requests the original rejected or could not express):
- `{"host_name":"*","list_active_processes":{}}` asks every known PM at
  once; reply `{"success":true,"hosts":[{"host_name":H,"success":true,
  "list_active_processes":{"pids":[...]}}, {"host_name":H2,"success":false,
  "error_message":"..."}]}`, sorted by host.
- `{"list_hosts":{}}` (host_name omitted or "*", or one host to see only
  that one) answers `{"success":true,"list_hosts":{"hosts":[{"host_name",
  "node_name","service_name","last_active"}]}}`, the active_nodes entries.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from b0_pm import protocol
from b0_pm.b0 import jsoncodec
from b0_pm.b0.errors import MessageError
from b0_pm.b0.node import ResolverError

HUB_NODE_NAME = "process_manager_hub"
HUB_SERVICE = "process_manager_hub/control"
BEACON_TOPIC = "process_manager/beacon"
ACTIVE_NODES_TOPIC = "process_manager_hub/active_nodes"
GRAPH_TOPIC = "graph"
GRAPH_TYPE = "b0.message.graph.Graph"
UNKNOWN_HOST = "unknown host"  # the original's exact text
# A PM silent this long is taken to be gone when another PM beacons for its host (the original's liveness window).
SILENCE_S = 1.0
WARNED_LIMIT = 1000


def now_usec() -> int:
    """Wall-clock µs since the epoch, the unit of last_active."""
    return time.time_ns() // 1000


def format_seconds(seconds: float) -> str:
    return f"{seconds:g} s"


@dataclass
class Forward:
    """One PM request waiting for its answer; done(pm_payload, error) is called exactly once."""

    payload: bytes
    deadline: float               # monotonic: arrival + forward timeout
    done: object
    expiry_timer: object = None   # only while queued


@dataclass
class HostEntry:
    host_name: str
    node_name: str
    service_name: str
    client: object
    last_beacon: float            # monotonic, for expiry
    last_active: int              # µs since the epoch, published
    process_id: int | None = None  # the PM's, from the resolver's graph
    in_flight: Forward | None = None
    queue: deque = field(default_factory=deque)

    def describe(self) -> str:
        return f"host {self.host_name} (service {self.service_name})"

    def public(self) -> protocol.HostEntry:
        return protocol.HostEntry(self.host_name, self.node_name, self.service_name, self.last_active)


class Responder:
    """Sends the HUB reply to one request exactly once."""

    def __init__(self, request, log):
        self._request = request
        self._log = log
        self.sent = False

    def send(self, payload: bytes) -> None:
        if self.sent:
            self._log.error("second reply for one request dropped: %r", payload)
            return
        self.sent = True
        self._request.reply(payload, protocol.RESPONSE_TYPE)

    def error(self, message: str) -> None:
        self.send(protocol.hub_error_reply(message))


class HubNode:
    """The HUB on a b0 Node; the caller owns the Node's construction (resolver, host id)."""

    def __init__(self, node, *, forward_timeout_s: float, host_expiry_s: float,
                 active_nodes_interval_s: float, notifier=None):
        self.node = node
        self.loop = node.loop
        self.log = node.log  # published on topic `log`, like the original's messages
        self.forward_timeout_s = forward_timeout_s
        self.host_expiry_s = host_expiry_s
        self.active_nodes_interval_s = active_nodes_interval_s
        self.notifier = notifier
        self.hosts: dict[str, HostEntry] = {}
        self._warned: set[str] = set()
        self._unresolvable: dict[str, float] = {}  # service name -> when to ask the resolver again
        # Malformed envelopes never reach handle_request; the server answers them in the HUB's error shape.
        node.service_server(HUB_SERVICE, self.handle_request, response_type=protocol.RESPONSE_TYPE,
                            error_reply=lambda message: (protocol.hub_error_reply(f"bad request: {message}"),
                                                         protocol.RESPONSE_TYPE))
        node.subscriber(BEACON_TOPIC, self.handle_beacon)
        node.subscriber(GRAPH_TOPIC, self.handle_graph, content_type=GRAPH_TYPE)
        self._active_nodes = node.publisher(ACTIVE_NODES_TOPIC)

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self.node.start()
        self.loop.call_every(self.active_nodes_interval_s, self.publish_active_nodes)
        # Checked four times per expiry period, so a silent host goes at most 25 % late.
        self.loop.call_every(self.host_expiry_s / 4, self.expire_silent_hosts)
        self.log.info("HUB %s serving %s (forward timeout %s, host expiry %s)", self.node.name,
                      HUB_SERVICE, format_seconds(self.forward_timeout_s),
                      format_seconds(self.host_expiry_s))
        if self.notifier is not None:
            self.notifier.ready(f"serving {HUB_SERVICE}")

    def spin(self) -> None:
        self.node.spin()

    def shutdown(self) -> None:
        if self.notifier is not None:
            self.notifier.stopping()
        for entry in list(self.hosts.values()):
            # node.shutdown() closes the clients within its own time budget.
            self._drop(entry, "the HUB is shutting down", close_client=False)
        self.node.shutdown()

    # -- beacons --------------------------------------------------------------

    def handle_beacon(self, envelope) -> None:
        try:
            beacon = protocol.parse_beacon(envelope.payload, envelope.content_type)
        except MessageError as exc:
            self._warn_once(f"beacon dropped: {exc}")
            return
        if beacon.host_name == protocol.BROADCAST_HOST:
            self._warn_once(f"beacon from {beacon.node_name} ignored: host name \"*\" means every host here")
            return
        now = time.monotonic()
        entry = self.hosts.get(beacon.host_name)
        if entry is None:
            client = self._client_for(beacon.host_name, beacon.service_name)
            if client is not None:
                self.hosts[beacon.host_name] = HostEntry(beacon.host_name, beacon.node_name,
                                                         beacon.service_name, client, now, now_usec())
                self.log.info("added new entry: %s -> %s", beacon.host_name, beacon.service_name)
            return
        if beacon.service_name == entry.service_name:
            entry.last_beacon, entry.last_active, entry.node_name = now, now_usec(), beacon.node_name
        elif now - entry.last_beacon > min(SILENCE_S, self.host_expiry_s):
            self._switch(entry, beacon.node_name, beacon.service_name,
                         f"host {entry.host_name} moved from {entry.service_name} to {beacon.service_name}")
            entry.last_beacon, entry.last_active = now, now_usec()
        else:
            # Two live PMs claim one host id: keep the first rather than flap between them.
            self._warn_once(f"{entry.describe()} is still beaconing; ignoring {beacon.service_name}, "
                            f"which claims the same host")

    def _warn_once(self, message: str) -> None:
        """Beacons repeat 10 times a second: say each problem once (bounded memory)."""
        if message in self._warned:
            return
        if len(self._warned) >= WARNED_LIMIT:
            self._warned.clear()
        self._warned.add(message)
        self.log.warning("%s", message)

    def _client_for(self, host: str, service: str):
        now = time.monotonic()
        if now < self._unresolvable.get(service, 0.0):
            return None  # asked the resolver less than a second ago: don't ask again at the beacon rate
        try:
            client = self.node.service_client(service)
        except (ResolverError, TimeoutError, MessageError) as exc:  # a later beacon tries again
            self._warn_once(f"cannot reach {service} of host {host}: {exc}")
            if len(self._unresolvable) >= WARNED_LIMIT:
                self._unresolvable.clear()
            self._unresolvable[service] = now + SILENCE_S
            return None
        self._unresolvable.pop(service, None)
        return client

    def handle_graph(self, envelope) -> None:
        """A PM restarted under its old name (the old one left cleanly) is a new process on a new
        port: seen here as a new process_id for its node name, once it offers its service again."""
        try:
            graph = jsoncodec.loads(envelope.payload)
            process_ids = {node["node_name"]: node["process_id"] for node in graph["nodes"]}
            offers = {(link["node_name"], link["other_name"])
                      for link in graph["node_service"] if link["reversed"] is False}
        except (MessageError, TypeError, KeyError) as exc:
            self._warn_once(f"graph message dropped: {exc!r}")
            return
        for entry in list(self.hosts.values()):
            process_id = process_ids.get(entry.node_name)
            if process_id is None or (entry.node_name, entry.service_name) not in offers:
                continue  # gone, or back but not serving yet
            if entry.process_id is not None and process_id != entry.process_id:
                self._switch(entry, entry.node_name, entry.service_name,
                             f"{entry.describe()} restarted (process {entry.process_id} -> {process_id})")
            entry.process_id = process_id

    def _check_address(self, entry: HostEntry) -> None:
        """After a timeout: a PM restarted under its old name has a new port (missed graph message)."""
        try:
            address = self.node.resolve_service(entry.service_name)
        except (ResolverError, TimeoutError, MessageError) as exc:
            self._warn_once(f"cannot resolve {entry.service_name} of host {entry.host_name}: {exc}")
            return
        if address != entry.client.address:
            self._switch(entry, entry.node_name, entry.service_name,
                         f"{entry.describe()} restarted (now at {address})")

    def _switch(self, entry: HostEntry, node_name: str, service: str, what_happened: str) -> None:
        """Point the host at a new PM client; a request in flight on the old one is answered now."""
        self.log.info("%s", what_happened)
        if entry.in_flight is not None:
            forward, entry.in_flight = entry.in_flight, None
            forward.done(None, f"{what_happened} before answering; the request may or may not "
                               f"have been carried out")
        # Closed first: with an unchanged name the new client's graph edge must outlive the old one's removal.
        self._close_client(entry.client)
        client = self._client_for(entry.host_name, service)
        if client is None:
            self._drop(entry, f"host {entry.host_name}: {service} cannot be reached", close_client=False)
            return
        entry.client, entry.node_name, entry.service_name = client, node_name, service
        entry.process_id = None  # known again from the next graph message
        self._dispatch(entry)

    def expire_silent_hosts(self) -> None:
        now = time.monotonic()
        for entry in [e for e in self.hosts.values() if now - e.last_beacon > self.host_expiry_s]:
            self.log.info("removed entry: %s (no beacon for %s)", entry.host_name,
                          format_seconds(self.host_expiry_s))
            self._drop(entry, f"{entry.describe()} stopped beaconing and was dropped before answering")

    def _drop(self, entry: HostEntry, reason: str, *, close_client: bool = True) -> None:
        del self.hosts[entry.host_name]
        pending = ([entry.in_flight] if entry.in_flight else []) + list(entry.queue)
        entry.in_flight = None
        entry.queue.clear()
        for forward in pending:
            self._cancel_expiry(forward)
            forward.done(None, reason)
        if close_client:
            self._close_client(entry.client)

    def _close_client(self, client) -> None:
        client.close(0)  # drop a request a dead PM never took, rather than linger on it
        try:
            self.node.remove(client)  # graph: this HUB no longer uses that service
        except Exception:
            self.log.exception("removing the client of %s failed", client.name)

    # -- active_nodes ---------------------------------------------------------

    def host_entries(self) -> list[protocol.HostEntry]:
        return [self.hosts[host].public() for host in sorted(self.hosts)]

    def publish_active_nodes(self) -> None:
        self._active_nodes.publish(protocol.encode_active_nodes(self.host_entries()),
                                   protocol.ACTIVE_NODES_TYPE)

    # -- control service ------------------------------------------------------

    def handle_request(self, request) -> None:
        responder = Responder(request, self.log)
        try:
            self._serve(request, responder)
        except Exception as exc:  # a bug here must not leave the client without its answer
            self.log.exception("request failed")
            if not responder.sent:
                responder.error(f"internal HUB error: {exc}")

    def _serve(self, request, responder: Responder) -> None:
        try:
            hub_request = protocol.parse_hub_request(request.payload, request.content_type)
        except MessageError as exc:
            self.log.warning("bad request: %s", exc)
            responder.error(f"bad request: {exc}")
            return
        host = hub_request.host_name
        if hub_request.operation == "list_hosts":
            self._list_hosts(host, responder)
        elif host is None:
            responder.error("bad request: host_name: required field missing")
        elif hub_request.is_broadcast:
            self._list_everywhere(hub_request.pm_payload(), responder)
        elif host not in self.hosts:
            self.log.info("bad request: unknown host %r", host)
            responder.error(UNKNOWN_HOST)
        else:
            self._forward(self.hosts[host], hub_request.pm_payload(),
                          lambda pm_payload, error: self._answer(responder, pm_payload, error))

    @staticmethod
    def _answer(responder: Responder, pm_payload: bytes | None, error: str | None) -> None:
        if error is not None:
            responder.error(error)
            return
        try:
            responder.send(protocol.hub_success_reply(pm_payload))
        except MessageError as exc:
            responder.error(f"the process manager sent an unusable reply: {exc}")

    def _list_hosts(self, host: str | None, responder: Responder) -> None:
        if host in (None, protocol.BROADCAST_HOST):
            entries = self.host_entries()
        elif host in self.hosts:
            entries = [self.hosts[host].public()]
        else:
            responder.error(UNKNOWN_HOST)
            return
        responder.send(protocol.hub_list_hosts_reply(entries))

    def _list_everywhere(self, pm_payload: bytes, responder: Responder) -> None:
        names = sorted(self.hosts)
        results: list[tuple[str, bytes | str]] = []

        def collect(host: str, reply: bytes | None, error: str | None) -> None:
            results.append((host, error if error is not None else reply))
            if len(results) == len(names):
                responder.send(protocol.hub_broadcast_reply(results))

        if not names:
            responder.send(protocol.hub_broadcast_reply([]))
        for name in names:
            self._forward(self.hosts[name], pm_payload,
                          lambda reply, error, host=name: collect(host, reply, error))

    # -- forwarding -----------------------------------------------------------

    def _forward(self, entry: HostEntry, payload: bytes, done) -> None:
        forward = Forward(payload, time.monotonic() + self.forward_timeout_s, done)
        forward.expiry_timer = self.loop.call_later(self.forward_timeout_s,
                                                    lambda: self._expire_queued(entry, forward))
        entry.queue.append(forward)
        self._dispatch(entry)

    def _timeout_message(self, entry: HostEntry) -> str:
        return f"{entry.describe()} did not answer within {format_seconds(self.forward_timeout_s)}"

    def _expire_queued(self, entry: HostEntry, forward: Forward) -> None:
        if forward in entry.queue:
            entry.queue.remove(forward)
            forward.done(None, self._timeout_message(entry))

    @staticmethod
    def _cancel_expiry(forward: Forward) -> None:
        if forward.expiry_timer is not None:
            forward.expiry_timer.cancel()
            forward.expiry_timer = None

    def _dispatch(self, entry: HostEntry) -> None:
        """Send the next queued request to the PM unless one is in flight."""
        while entry.in_flight is None and entry.queue:
            forward = entry.queue.popleft()
            self._cancel_expiry(forward)
            remaining = forward.deadline - time.monotonic()
            if remaining <= 0:
                forward.done(None, self._timeout_message(entry))
                continue
            entry.in_flight = forward
            client = entry.client
            try:
                client.call_async(forward.payload, protocol.REQUEST_TYPE, remaining,
                                  lambda result: self._on_pm_answer(entry, client, forward, result))
            except Exception as exc:  # the socket refused the send: answer now, try the next one
                self.log.exception("sending to %s failed", entry.describe())
                entry.in_flight = None
                forward.done(None, f"{entry.describe()} could not be asked: {exc}")

    def _on_pm_answer(self, entry: HostEntry, client, forward: Forward, result) -> None:
        if entry.in_flight is not forward or entry.client is not client:
            return  # already answered: the host moved or was dropped meanwhile
        entry.in_flight = None
        try:
            if isinstance(result, TimeoutError):
                forward.done(None, self._timeout_message(entry))
                if self.hosts.get(entry.host_name) is entry:
                    self._check_address(entry)  # restarted within a beacon period? then reconnect
            elif isinstance(result, BaseException):
                forward.done(None, f"{entry.describe()} could not be asked: {result}")
            elif result.content_type != protocol.RESPONSE_TYPE:
                forward.done(None, f"{entry.describe()} answered with content type "
                                   f"'{result.content_type}', expected '{protocol.RESPONSE_TYPE}'")
            else:
                forward.done(result.payload, None)
        finally:
            self._dispatch(entry)
