"""PMClient: ask a process manager for something, directly or through the HUB.

Without a host the client calls this machine's PM directly, on service
`process_manager@<host id>/control` (host id from $B0_HOST_ID or the
hostname, as the PM computes it). With a host it calls the HUB's
`process_manager_hub/control` with `host_name` set, so any machine of the
b0 network can be reached; host "*" asks the HUB about every host.

Every operation returns a `Reply`: the whole reply object as it arrived
(`raw`, printed by `--json`) and the operation's own sub-response
(`result`). A refusal (`success:false`, at the HUB or at the PM) raises
`Refused`; no answer within the timeout raises `NoAnswer`.

    with PMClient(host="robot1", timeout=5) as pm:
        pid = pm.start("/opt/b0/bin/camera", ["-Tout=cam"]).result["pid"]
"""

from dataclasses import dataclass

from b0_pm.b0 import jsoncodec
from b0_pm.b0.errors import MessageError
from b0_pm.b0.node import Node, ResolverError

REQUEST_TYPE = "b0::process_manager::Request"
HUB_SERVICE = "process_manager_hub/control"
ALL_HOSTS = "*"
# A client that cannot say goodbye to the resolver should not hang the shell for long.
SHUTDOWN_TIMEOUT_S = 1.0


class ClientError(Exception):
    """Base of the errors a PMClient raises."""


class NoAnswer(ClientError):
    """Nothing answered within the timeout (the service or the resolver)."""

    def __init__(self, service: str, timeout: float):
        self.service = service
        self.timeout = timeout
        super().__init__(f"no answer from {service} within {timeout:g} s")


class NotRegistered(NoAnswer):
    """The resolver knows no such service: nothing there to answer."""

    def __init__(self, service: str, resolver: str):
        self.service = service
        self.timeout = 0.0
        ClientError.__init__(self, f"no service {service} is registered with the resolver at {resolver}")


class Refused(ClientError):
    """The HUB or the PM answered success:false, or did not serve the request."""

    def __init__(self, message: str, raw: dict):
        self.raw = raw
        super().__init__(message)


@dataclass
class Reply:
    raw: dict      # the reply object exactly as decoded, HUB wrapper included
    result: dict   # the operation's sub-response, e.g. {"success":true,"pid":4242}


class PMClient:
    def __init__(self, host: str | None = None, *, resolver: str | None = None,
                 timeout: float = 5.0, node_name: str = "b0-pm-client"):
        self.host = host
        self.resolver = resolver
        self.timeout = timeout
        self.node_name = node_name
        self._node = None
        self._clients = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def service(self) -> str:
        """The service this client's requests go to."""
        if self.host is not None:
            return HUB_SERVICE
        return f"process_manager@{self._started_node().host_id}/control"

    def start(self, path: str, args=(), *, environment: dict | None = None,
              user: str | None = None) -> Reply:
        body = {"path": path, "args": list(args)}
        # Extensions are left out when unused, so the original C++ PM accepts the request.
        if user is not None:
            body["user"] = user
        if environment:
            body["environment"] = dict(environment)
        return self.request("start_process", body)

    def stop(self, pid: int) -> Reply:
        return self.request("stop_process", {"pid": pid})

    def status(self, pid: int) -> Reply:
        return self.request("query_process_status", {"pid": pid})

    def list(self) -> Reply:
        return self.request("list_active_processes", {})

    def get_log(self, pid: int, lines: int, *, after: str | None = None) -> Reply:
        """The last lines (extension get_log); with after, only those since that cursor."""
        body = {"pid": pid, "lines": lines}
        if after is not None:
            body["after"] = after
        return self.request("get_log", body)

    def hosts(self) -> Reply:
        """The hosts the HUB knows (extension list_hosts): all, or only this client's host."""
        raw = self._call(HUB_SERVICE, {"host_name": self.host or ALL_HOSTS, "list_hosts": {}})
        return Reply(raw, self._result(raw, "list_hosts"))

    def request(self, operation: str, body: dict) -> Reply:
        if self.host is None:
            raw = self._call(self.service, {operation: body})
        else:
            # host_name goes first: the HUB's codec order (spec 7.2).
            raw = self._call(HUB_SERVICE, {"host_name": self.host, operation: body})
        return Reply(raw, self._result(raw, operation))

    def close(self):
        if self._node is not None:
            self._node.shutdown()
            self._node = None
            self._clients.clear()

    def _started_node(self) -> Node:
        if self._node is None:
            node = Node(self.node_name, resolver=self.resolver, announce_timeout=self.timeout,
                        resolver_timeout=self.timeout,
                        shutdown_timeout=min(self.timeout, SHUTDOWN_TIMEOUT_S))
            try:
                node.start()
            except TimeoutError:
                node.shutdown()
                raise NoAnswer(f"the resolver at {node.resolver_address}", self.timeout) from None
            except ResolverError as exc:
                node.shutdown()
                raise Refused(f"the resolver at {node.resolver_address} refused: {exc}", {}) from None
            self._node = node
        return self._node

    def _call(self, service: str, request: dict) -> dict:
        node = self._started_node()
        client = self._clients.get(service)
        if client is None:
            try:
                client = node.service_client(service)
            except TimeoutError:
                raise NoAnswer(f"the resolver at {node.resolver_address}", self.timeout) from None
            except ResolverError:
                raise NotRegistered(service, node.resolver_address) from None
            self._clients[service] = client
        try:
            envelope = client.call(jsoncodec.dumps(request), REQUEST_TYPE, self.timeout)
        except TimeoutError:
            raise NoAnswer(service, self.timeout) from None
        except MessageError as exc:
            raise Refused(f"{service} sent a reply that cannot be read: {exc}", {}) from None
        try:
            raw = jsoncodec.loads(envelope.payload)
        except MessageError as exc:
            raise Refused(f"{service} sent a reply that is not JSON: {exc}", {}) from None
        if not isinstance(raw, dict):
            raise Refused(f"{service} sent a reply that is not a JSON object", {})
        return raw

    def _result(self, raw: dict, operation: str) -> dict:
        if raw.get("success") is False:
            # The HUB's refusal, or a PM's for a request it could not read at all (extension).
            raise Refused(raw.get("error_message") or "the request was refused", raw)
        if (self.host is not None or operation == "list_hosts") and raw.get("success") is not True:
            raise Refused("the HUB's reply has no success field", raw)
        if self.host == ALL_HOSTS and operation != "list_hosts":
            # Extension: host "*" answers per host, in a list under "hosts".
            if not isinstance(raw.get("hosts"), list):
                raise Refused("the HUB did not answer per host (a HUB without the host \"*\" extension?)", raw)
            return {"hosts": raw["hosts"]}
        result = raw.get(operation)
        if not isinstance(result, dict):
            # A PM answers {} to an operation it does not know (an original C++ PM asked for an extension).
            raise Refused(f"the process manager did not serve {operation} (not supported there?)", raw)
        if result.get("success") is False:
            raise Refused(result.get("error_message") or f"{operation} failed", raw)
        return result
