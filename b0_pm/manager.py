"""The Process Manager node: control service, beacon, events and sd_notify.

Wire names as the C++ PM (spec 7.1): node `process_manager@<host id>`,
service `%n/control`, beacon on `process_manager/beacon`. Extension: a
message on `process_manager/events` whenever a managed program starts or
exits. Everything runs on the node's one event loop: requests, the
backend's exit notifications (its fd), the backend's ladder and retention
deadlines (tick), the beacon and the watchdog.

Unlike the original, SIGINT/SIGTERM end the node cleanly (shutdown_node is
sent), and managed programs outlive the PM unless stop_processes_on_exit:
a restarted PM adopts them.
"""

import os
import time

from b0_pm import protocol
from b0_pm.b0.node import Node, default_host_id, default_resolver_address
from b0_pm.logsetup import route_node_logger
from b0_pm.notify import Notifier
from b0_pm.policy import StartPolicy

NODE_NAME = "process_manager@%h"
SERVICE_NAME = "%n/control"
BEACON_TOPIC = "process_manager/beacon"
EVENTS_TOPIC = "process_manager/events"
# replies are encoded in codec order, so a start_process reply begins with its key
START_REPLY_PREFIX = b'{"start_process":'
# variables that tell a b0 node where its network is; launched nodes get the PM's own
CHILD_ENVIRONMENT_PREFIXES = ("B0_", "B0PM_")
# STATUS= is for people (systemctl status): at most one update a second, off the request path
STATUS_DELAY_S = 1.0


def resolve_host_id(config) -> str:
    """--host-id / host_id in the file, else $B0_HOST_ID, else the hostname (spec 3.2)."""
    return config.host_id or default_host_id()


def child_environment(host_id: str, resolver_address: str) -> dict[str, str]:
    """The b0 environment the PM runs with, so launched nodes find the same network."""
    environment = {name: value for name, value in os.environ.items()
                   if name.startswith(CHILD_ENVIRONMENT_PREFIXES)}
    environment["B0_HOST_ID"] = host_id
    environment["B0_RESOLVER"] = resolver_address
    return environment


def running_status(count: int) -> str:
    return f"{count} process running" if count == 1 else f"{count} processes running"


class ProcessManager:
    """One PM node over one backend. run() blocks until SIGINT/SIGTERM."""

    def __init__(self, config, backend, *, host_id: str | None = None, read_log=None,
                 notifier: Notifier | None = None):
        self.config = config
        self.backend = backend
        self.host_id = host_id or resolve_host_id(config)
        self.resolver_address = config.resolver_address or default_resolver_address()
        self.notifier = notifier or Notifier()
        # no announce timeout: like the C++ PM, wait for the resolver as long as it takes
        self.node = Node(NODE_NAME, resolver=self.resolver_address, host_id=self.host_id,
                         max_message_size=config.max_message_bytes)
        self.log = self.node.log
        route_node_logger(self.log)   # before the policy's first warning
        self.environment = child_environment(self.host_id, self.resolver_address)
        self.policy = StartPolicy.from_config(config, base_environment=self.environment, log=self.log)
        self.processor = protocol.RequestProcessor(backend, self.policy, self.node.name,
                                                   read_log=read_log, log=self.log)
        self.control = self.node.service_server(SERVICE_NAME, self._on_request,
                                                response_type=protocol.RESPONSE_TYPE)
        self.beacons = self.node.publisher(BEACON_TOPIC, content_type=protocol.BEACON_TYPE)
        self.events = self.node.publisher(EVENTS_TOPIC, content_type=protocol.EVENT_TYPE)
        self._timers = []
        self._tick_timer = None
        self._status_timer = None
        self._backend_fd = None

    # -- lifecycle --------------------------------------------------------

    def start(self) -> None:
        """Adopt what a previous PM left, announce, bind, then tell systemd we are ready."""
        for record in self.backend.adopt():
            state = "running" if record.running else f"exited with code {record.exit_code}"
            self.log.info("Adopted process %d (%s), %s.", record.pid, record.path, state)
        # `systemctl status` says what a PM that is not ready yet is waiting for
        self.notifier.status(f"announcing {self.node.name} to the resolver at {self.resolver_address}")
        self.node.start()
        self.processor.node_name = self.node.name
        loop = self.node.loop
        self._backend_fd = self.backend.fileno()
        if self._backend_fd is not None:
            loop.add_reader(self._backend_fd, self._on_backend_ready)
        self._timers.append(loop.call_every(self.config.pm.beacon_interval_seconds, self._send_beacon))
        if self.notifier.watchdog_interval_s:
            self._timers.append(loop.call_every(self.notifier.watchdog_interval_s, self.notifier.watchdog))
        self._send_beacon()
        self._schedule_tick()
        self.log.info("Process manager %s ready on service %s (backend %s).",
                      self.node.name, self.control.name, type(self.backend).__name__)
        self.notifier.ready(status=running_status(len(self.backend.running_pids())))

    def run(self) -> None:
        try:
            self.start()
            self.node.loop.run()
            if self.node.loop.stop_signal is not None:
                self.log.info("Signal %d received: shutting down.", self.node.loop.stop_signal)
        finally:
            self.close()

    def close(self) -> None:
        """Leave the b0 network (shutdown_node), then release or stop the programs."""
        self.notifier.stopping()
        for timer in self._timers:
            timer.cancel()
        for timer in (self._tick_timer, self._status_timer):
            if timer is not None:
                timer.cancel()
        if self._backend_fd is not None:
            self.node.loop.remove_reader(self._backend_fd)
            self._backend_fd = None
        stop_all = self.config.pm.stop_processes_on_exit
        self.node.shutdown()
        if stop_all:
            self.log.info("Stopping %d managed process(es).", len(self.backend.running_pids()))
        self.backend.close(stop_all=stop_all)

    # -- control service --------------------------------------------------

    def _on_request(self, request) -> None:
        reply = self.processor.handle(request.payload, request.content_type)
        request.reply(reply.payload, reply.content_type)
        if reply.started is not None:
            self._publish_event("started", reply.started)
            self._status_changed()
        if reply.stopped is not None or reply.payload.startswith(START_REPLY_PREFIX):
            # a stop sets ladder deadlines; a start may have read other programs' exits from the bus
            self._schedule_tick()

    # -- backend events and deadlines ---------------------------------------

    def _on_backend_ready(self) -> None:
        # only exits move deadlines (retention, ladders ending); other bus traffic does not
        if self._publish_exits():
            self._schedule_tick()

    def _on_tick(self) -> None:
        self._tick_timer = None
        self._publish_exits()
        self._schedule_tick()

    def _schedule_tick(self) -> None:
        deadline = self.backend.tick(time.monotonic())
        if self._tick_timer is not None:
            self._tick_timer.cancel()
            self._tick_timer = None
        if deadline is not None:
            self._tick_timer = self.node.loop.call_later(deadline - time.monotonic(), self._on_tick)

    def _publish_exits(self) -> list:
        """Publish the exits the backend has seen since the last call; returns their records."""
        ended = self.backend.process_events()
        for record in ended:
            self.log.info("Process %d (%s) finished with exit code %s.", record.pid, record.path,
                          record.exit_code)
            self._publish_event("exited", record)
        if ended:
            self._status_changed()
        return ended

    # -- topics and systemd ----------------------------------------------

    def _publish_event(self, event: str, record) -> None:
        self.events.publish(protocol.encode_event(event, record, host_name=self.host_id,
                                                  node_name=self.node.name))

    def _send_beacon(self) -> None:
        # the node may have been renamed by a restarted resolver: always the current names
        self.processor.node_name = self.node.name
        self.beacons.publish(protocol.encode_beacon(
            protocol.Beacon(self.host_id, self.node.name, self.control.name)))

    def _status_changed(self) -> None:
        if self._status_timer is None:
            self._status_timer = self.node.loop.call_later(STATUS_DELAY_S, self._send_status)

    def _send_status(self) -> None:
        self._status_timer = None
        self.notifier.status(running_status(len(self.backend.running_pids())))
