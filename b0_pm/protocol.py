"""The process-manager protocol: read a request, dispatch it, shape the reply.

Pure: bytes in, bytes out, with the backend, the policy and the log reader
passed in, so all of it is tested without sockets. Wire format as the C++
codecs write it (spec 7.2); the original's crashes and lost exit codes are
fixed (spec 7.3, Appendix F). The JSON Schemas in b0_pm/schemas/ are the
contract; each validator is built once, on first use.

Also the helpers the HUB uses (parse_hub_request, hub_*_reply) and the
topic payloads (beacon, active_nodes, events).
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import subprocess
from dataclasses import dataclass
from importlib import resources

from b0_pm.b0 import jsoncodec
from b0_pm.b0.errors import ContentTypeError, FieldError, MessageError, PayloadDecodeError
from b0_pm.backends.base import NotManaged, ProcessRecord, StartError

REQUEST_TYPE = "b0::process_manager::Request"
RESPONSE_TYPE = "b0::process_manager::Response"
BEACON_TYPE = "b0::process_manager::Beacon"
ACTIVE_NODES_TYPE = "b0::process_manager::ActiveNodes"
EVENT_TYPE = "b0::process_manager::Event"

# Dispatch order: the original's four, then our extensions.
PM_OPERATIONS = ("start_process", "stop_process", "query_process_status",
                 "list_active_processes", "get_log")
HUB_ONLY_OPERATIONS = ("list_hosts",)
BROADCAST_HOST = "*"
DEFAULT_LOG_LINES = 100
MAX_NESTING = 32   # a real request nests 3 levels

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reply:
    payload: bytes
    content_type: str = RESPONSE_TYPE
    started: ProcessRecord | None = None   # for the PM's "started" event
    stopped: ProcessRecord | None = None   # a stop was begun for this process


class LogUnavailable(Exception):
    """The log of a process cannot be read; the message says why."""


def encode(obj) -> bytes:
    return jsoncodec.dumps(obj)


# --- reading and validating ------------------------------------------------

def decode_object(payload: bytes, content_type: str, expected_type: str, what: str = "request") -> dict:
    """The payload as a JSON object, or a MessageError naming what is wrong."""
    if content_type != expected_type:
        if not content_type:
            raise ContentTypeError(f"{what} has no content type: expected {expected_type}")
        raise ContentTypeError(f"{what} has content type {content_type!r}: expected {expected_type}")
    document = jsoncodec.loads(payload)
    if not isinstance(document, dict):
        raise FieldError(f"{what} must be a JSON object, got {_json_type(document)}")
    if _nesting_exceeds(document, MAX_NESTING):
        raise FieldError(f"{what} is nested more than {MAX_NESTING} levels deep")
    return document


def _nesting_exceeds(document, limit: int) -> bool:
    # jsonschema recurses (and reprs) into values: a deep one would overflow the stack.
    pending = [(document, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            pending.extend((value, depth + 1) for value in item.values())
        elif isinstance(item, list):
            pending.extend((value, depth + 1) for value in item)
    return False


def first_operation(request: dict, operations=PM_OPERATIONS) -> str | None:
    return next((op for op in operations if op in request), None)


def check_operation(operation: str, body) -> str | None:
    """None if body is valid for operation, else a sentence naming the field."""
    oversized = _oversized_collection(operation, body)
    if oversized:
        return oversized
    errors = list(_operation_validator(operation).iter_errors({operation: body}))
    if not errors:
        return None
    from jsonschema.exceptions import best_match
    return describe_validation_error(best_match(errors))


_INTEGER_FIELDS = {"stop_process": ("pid",), "query_process_status": ("pid",), "get_log": ("pid", "lines")}


def normalized_body(operation: str, body: dict) -> dict:
    """A checked body with 1e3 and 12.0 (which the schema accepts) turned into ints."""
    fixed = dict(body)
    for key in _INTEGER_FIELDS.get(operation, ()):
        if key in fixed:
            fixed[key] = int(fixed[key])
    return fixed


@functools.cache
def load_schema(name: str) -> dict:
    return json.loads((resources.files("b0_pm") / "schemas" / name).read_text("utf-8"))


LOCAL_REF_PREFIX = "#/$defs/"


def inline_local_refs(node, defs: dict, expanding: tuple = ()):
    """The schema with every local $ref replaced by its definition.

    jsonschema 4.18+ resolves each $ref through `referencing` on every
    validation, which was half the cost of checking a request.
    """
    if isinstance(node, list):
        return [inline_local_refs(item, defs, expanding) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith(LOCAL_REF_PREFIX) and ref not in expanding:
        target = inline_local_refs(defs[ref[len(LOCAL_REF_PREFIX):]], defs, expanding + (ref,))
        siblings = {key: inline_local_refs(value, defs, expanding)
                    for key, value in node.items() if key != "$ref"}
        return {**siblings, "allOf": [target]} if siblings else target
    return {key: inline_local_refs(value, defs, expanding) for key, value in node.items()}


def _built_validator(schema: dict):
    from jsonschema import Draft202012Validator
    return Draft202012Validator(inline_local_refs(schema, schema.get("$defs", {})))


@functools.cache
def validator(schema_name: str):
    """A validator for a whole schema file (built once)."""
    return _built_validator(load_schema(schema_name))


def _oversized_collection(operation: str, body) -> str | None:
    # jsonschema checks every item before maxItems refuses the array: a request of 150,000 args
    # held the PM's only thread for seconds, so the lengths are checked first, in plain Python.
    if not isinstance(body, dict):
        return None
    for name, limit in _collection_limits(operation).items():
        value = body.get(name)
        if isinstance(value, (list, dict)) and len(value) > limit:
            return f"{operation}.{name}: at most {limit} entries allowed, got {len(value)}"
    return None


def _operation_schema_file(operation: str) -> dict:
    return load_schema("hub-request.json" if operation in HUB_ONLY_OPERATIONS else "pm-request.json")


@functools.cache
def _collection_limits(operation: str) -> dict[str, int]:
    """The operation's array and object fields -> their maxItems / maxProperties."""
    full = _operation_schema_file(operation)
    body_schema = inline_local_refs(full["properties"][operation], full.get("$defs", {}))
    limits = {}
    for name, field_schema in body_schema.get("properties", {}).items():
        limit = field_schema.get("maxItems", field_schema.get("maxProperties"))
        if limit is not None:
            limits[name] = limit
    return limits


@functools.cache
def _operation_validator(operation: str):
    # Checks only the dispatched operation; others in the request are ignored, as in the original.
    full = _operation_schema_file(operation)
    return _built_validator({
        "$schema": full["$schema"],
        "$defs": full["$defs"],
        "type": "object",
        "properties": {operation: full["properties"][operation]},
    })


def describe_validation_error(error) -> str:
    """A jsonschema ValidationError as 'field.path: what is wrong'."""
    where = _field_path(error.path)
    keyword = error.validator
    custom = error.schema.get("x-error") if isinstance(error.schema, dict) else None
    if keyword == "required":
        missing = next((k for k in error.validator_value if k not in error.instance), "")
        if custom:
            return f"{where}: {custom}" if where else custom
        return f"{_join(where, missing)}: required field missing"
    if custom and keyword in ("pattern", "not", "anyOf", "propertyNames"):
        return f"{where}: {custom}, got {_show(error.instance)}" if where else custom
    if keyword == "type":
        wanted = error.validator_value
        if wanted == "integer" and isinstance(error.instance, float):
            return f"{where}: must be a whole number, got {_show(error.instance)}"
        got = _json_type(error.instance)
        if error.instance is not None:
            got = f"{got} {_show(error.instance)}"
        return f"{where}: must be {_TYPE_WORDS.get(wanted, wanted)}, got {got}"
    if keyword in ("minimum", "maximum"):
        bounds = error.schema
        return (f"{where}: must be between {bounds.get('minimum')} and {bounds.get('maximum')},"
                f" got {_show(error.instance)}")
    if keyword == "maxLength":
        return f"{where}: longer than {error.validator_value} characters"
    if keyword == "minLength":
        return f"{where}: must not be empty"
    if keyword in ("maxItems", "maxProperties"):
        return f"{where}: at most {error.validator_value} entries allowed, got {len(error.instance)}"
    return f"{where}: {error.message}" if where else error.message


_TYPE_WORDS = {"object": "an object", "array": "an array", "string": "a string",
               "integer": "an integer", "boolean": "true or false", "number": "a number"}


def _field_path(parts) -> str:
    text = ""
    for part in parts:
        text = f"{text}[{part}]" if isinstance(part, int) else _join(text, part)
    return text


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _show(value, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= limit else text[:limit] + "..."


# --- the PM's request processor ----------------------------------------------

class RequestProcessor:
    """Serves one PM control request at a time: handle(payload, content_type) -> Reply.

    backend:    the Backend contract (ARCHITECTURE.md).
    policy:     b0_pm.policy.StartPolicy, asked before every start.
    node_name:  the PM's node name, quoted in the "not managed" error; the PM
                updates the attribute if the resolver renames it.
    read_log:   callable(record, lines[, after]) -> list[str] raising LogUnavailable,
                e.g. JournalLogReader (whose LogLines also carry the cursor for
                get_log's "after"); None when the backend keeps no journal.
    """

    def __init__(self, backend, policy, node_name: str, *, read_log=None,
                 log: logging.Logger | None = None):
        self.backend = backend
        self.policy = policy
        self.node_name = node_name
        self.read_log = read_log
        self.log = log or _log
        self._handlers = {
            "start_process": self._start,
            "stop_process": self._stop,
            "query_process_status": self._query,
            "list_active_processes": self._list,
            "get_log": self._get_log,
        }

    def handle(self, payload: bytes, content_type: str) -> Reply:
        try:
            request = decode_object(payload, content_type, REQUEST_TYPE)
        except MessageError as exc:
            self.log.warning("bad request: %s", exc)
            return Reply(encode({"success": False, "error_message": str(exc)}))
        operation = first_operation(request)
        if operation is None:
            self.log.warning("bad request")
            return Reply(b"{}")
        try:
            problem = check_operation(operation, request[operation])
            if problem:
                self.log.warning("bad request: %s", problem)
                return self._refuse(operation, problem)
            return self._handlers[operation](normalized_body(operation, request[operation]))
        except Exception as exc:  # a bug here or in the backend must still give the client its one reply
            self.log.exception("%s failed", operation)
            return self._refuse(operation, f"internal error: {exc}")

    def _refuse(self, operation: str, message: str) -> Reply:
        if operation == "list_active_processes":
            # pids stays first and required, so C++ clients decode an empty list.
            return Reply(encode({operation: {"pids": [], "success": False, "error_message": message}}))
        return Reply(encode({operation: {"success": False, "error_message": message}}))

    def _start(self, body: dict) -> Reply:
        path = body["path"]
        decision = self.policy.check_start(path, user=body.get("user"),
                                           environment=body.get("environment"))
        if not decision.allowed:
            self.log.warning("Failed to launch %s: %s", path, decision.reason)
            return self._refuse("start_process", decision.reason)
        try:
            record = self.backend.start(decision.path, list(body["args"]),
                                       environment=decision.environment,
                                       user=decision.user, group=decision.group)
        except StartError as exc:
            self.log.warning("Failed to launch %s: %s", path, exc)
            return self._refuse("start_process", str(exc))
        self.log.info("Process %d (%s) started.", record.pid, record.path)
        return Reply(encode({"start_process": {"success": True, "pid": record.pid}}), started=record)

    def _not_managed(self, pid: int) -> str:
        return f"PID {pid} is not managed by this process manager ({self.node_name})"

    def _stop(self, body: dict) -> Reply:
        pid = body["pid"]
        record = self.backend.status(pid)
        if record is None:
            self.log.warning("Failed to stop PID %d which is not managed by this process manager.", pid)
            return self._refuse("stop_process", self._not_managed(pid))
        if not record.running:
            return Reply(encode({"stop_process": {"success": True}}))
        try:
            record = self.backend.stop(pid)
        except NotManaged:
            return self._refuse("stop_process", self._not_managed(pid))
        self.log.info("Stopping process %d...", pid)
        return Reply(encode({"stop_process": {"success": True}}), stopped=record)

    def _query(self, body: dict) -> Reply:
        record = self.backend.status(body["pid"])
        if record is None:
            return self._refuse("query_process_status", "no such pid")
        status = {"success": True, "running": record.running}
        if not record.running:
            status.update(exit_fields(record))
        return Reply(encode({"query_process_status": status}))

    def _list(self, body: dict) -> Reply:
        return Reply(encode({"list_active_processes": {"pids": sorted(self.backend.running_pids())}}))

    def _get_log(self, body: dict) -> Reply:
        pid = body["pid"]
        record = self.backend.status(pid)
        if record is None:
            return self._refuse("get_log", "no such pid")
        if self.read_log is None or record.unit is None:
            return self._refuse("get_log", f"logs are not available on the local backend"
                                           f" (PID {pid} writes to the process manager's own output)")
        count, after = body.get("lines", DEFAULT_LOG_LINES), body.get("after")
        try:
            # the cursor goes only to readers asked to follow, so plain readers need not take it
            lines = self.read_log(record, count, after) if after else self.read_log(record, count)
        except LogUnavailable as exc:
            return self._refuse("get_log", str(exc))
        reply = {"success": True, "lines": list(lines)}
        if isinstance(lines, LogLines) and lines.cursor:
            reply["cursor"] = lines.cursor
        return Reply(encode({"get_log": reply}))


def exit_fields(record: ProcessRecord) -> dict:
    """exit_code, then signal, signal_name and core_dumped when they apply (codec order)."""
    fields = {"exit_code": record.exit_code}
    if record.signal:
        fields["signal"] = record.signal
        fields["signal_name"] = signal_name(record.signal)
    if record.core_dumped:
        fields["core_dumped"] = True
    return fields


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


class LogLines(list):
    """Lines read from the journal; cursor marks the last entry read (None: nothing read)."""

    def __init__(self, lines=(), cursor: str | None = None):
        super().__init__(lines)
        self.cursor = cursor


def _journal_message(entry: dict) -> str:
    message = entry.get("MESSAGE")
    if isinstance(message, list):  # journalctl's JSON gives messages that are not UTF-8 as byte arrays
        return bytes(message).decode("utf-8", "replace")
    return message if isinstance(message, str) else ""


class JournalLogReader:
    """The last lines a process wrote, from the journal of its systemd unit.

    JSON output, so each entry comes with its cursor: a follower passes the
    last one back as `after` and gets exactly the entries written since,
    however repetitive the output is.
    """

    def __init__(self, *, user_manager: bool = False, timeout_s: float = 2.0,
                 max_reply_bytes: int = 512 * 1024):
        self.unit_option = "--user-unit" if user_manager else "--unit"
        self.timeout_s = timeout_s
        self.max_reply_bytes = max_reply_bytes

    def __call__(self, record: ProcessRecord, lines: int, after: str | None = None) -> LogLines:
        argv = ["journalctl", self.unit_option, record.unit, "--lines", str(lines),
                "--output", "json", "--output-fields", "MESSAGE", "--quiet", "--no-pager"]
        if after:
            argv += ["--after-cursor", after]
        try:
            done = subprocess.run(argv, capture_output=True, timeout=self.timeout_s,
                                  stdin=subprocess.DEVNULL, check=False)
        except FileNotFoundError as exc:
            raise LogUnavailable("logs are not available: journalctl is not installed") from exc
        except subprocess.TimeoutExpired as exc:
            raise LogUnavailable(f"reading the journal took longer than {self.timeout_s:g} s") from exc
        if done.returncode != 0:
            reason = done.stderr.decode("utf-8", "replace").strip() or f"exit status {done.returncode}"
            raise LogUnavailable(f"reading the journal failed: {reason}")
        try:
            entries = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        except ValueError as exc:
            raise LogUnavailable(f"reading the journal failed: journalctl wrote something that is not JSON: {exc}") from exc
        text = [line for entry in entries for line in _journal_message(entry).splitlines()]
        return LogLines(self._fit(text), entries[-1].get("__CURSOR") if entries else after)

    def _fit(self, lines: list[str]) -> list[str]:
        # Keep the newest lines that fit, so a reply stays under the message size limit.
        size = 0
        for kept, line in enumerate(reversed(lines)):
            size += len(line.encode("utf-8")) + 8
            if size > self.max_reply_bytes:
                omitted = len(lines) - kept
                return [f"[{omitted} earlier lines omitted: reply size limit]"] + lines[len(lines) - kept:]
        return lines


# --- topic payloads ----------------------------------------------------------

@dataclass(frozen=True)
class Beacon:
    host_name: str
    node_name: str
    service_name: str


@dataclass(frozen=True)
class HostEntry:
    host_name: str
    node_name: str
    service_name: str
    last_active: int   # microseconds since the epoch

    def as_dict(self) -> dict:
        return {"host_name": self.host_name, "node_name": self.node_name,
                "service_name": self.service_name, "last_active": self.last_active}


def encode_beacon(beacon: Beacon) -> bytes:
    return encode({"host_name": beacon.host_name, "node_name": beacon.node_name,
                   "service_name": beacon.service_name})


def parse_beacon(payload: bytes, content_type: str) -> Beacon:
    """A beacon from process_manager/beacon, or a MessageError saying what is wrong."""
    document = decode_object(payload, content_type, BEACON_TYPE, "beacon")
    errors = list(validator("beacon.json").iter_errors(document))
    if errors:
        from jsonschema.exceptions import best_match
        raise FieldError(f"beacon: {describe_validation_error(best_match(errors))}")
    return Beacon(document["host_name"], document["node_name"], document["service_name"])


def encode_active_nodes(entries) -> bytes:
    return encode({"nodes": [e.as_dict() for e in sorted(entries, key=lambda e: e.host_name)]})


def encode_event(event: str, record: ProcessRecord, *, host_name: str, node_name: str) -> bytes:
    """The process_manager/events payload for "started" or "exited" (event.json)."""
    when = record.started_at if event == "started" else (record.ended_at or record.started_at)
    message = {"event": event, "host_name": host_name, "node_name": node_name,
               "pid": record.pid, "path": record.path, "args": list(record.args),
               "timestamp_usec": int(when * 1_000_000)}
    if event == "exited":
        message.update(exit_fields(record))
        if record.stop_requested:
            message["stop_requested"] = True
    return encode(message)


# --- the HUB's side ------------------------------------------------------------

@dataclass(frozen=True)
class HubRequest:
    host_name: str | None       # None only with list_hosts
    operation: str | None       # the first known operation, None if there is none
    body: dict | None

    @property
    def is_broadcast(self) -> bool:
        return self.host_name == BROADCAST_HOST

    def pm_payload(self) -> bytes:
        """The request to forward to the PM: the operation alone, host_name dropped."""
        return encode({self.operation: self.body}) if self.operation else b"{}"


def parse_hub_request(payload: bytes, content_type: str) -> HubRequest:
    """A valid HUB request, or a MessageError whose text is the reply's error_message."""
    request = decode_object(payload, content_type, REQUEST_TYPE)
    errors = list(_hub_envelope_validator().iter_errors(request))
    if errors:
        from jsonschema.exceptions import best_match
        raise FieldError(describe_validation_error(best_match(errors)))
    operation = first_operation(request, PM_OPERATIONS + HUB_ONLY_OPERATIONS)
    body = None
    if operation is not None:
        problem = check_operation(operation, request[operation])
        if problem:
            raise FieldError(problem)
        body = normalized_body(operation, request[operation])
    return HubRequest(request.get("host_name"), operation, body)


@functools.cache
def _hub_envelope_validator():
    # The top level only (host_name and its rules); operation bodies go through check_operation.
    full = load_schema("hub-request.json")
    top = {key: value for key, value in full.items() if key != "properties"}
    top["properties"] = {"host_name": full["properties"]["host_name"]}
    return _built_validator(top)


def hub_error_reply(message: str) -> bytes:
    return encode({"success": False, "error_message": message})


def hub_success_reply(pm_payload: bytes) -> bytes:
    """The HUB's reply to a forwarded request: success first, then the PM's sub-responses."""
    response = jsoncodec.loads(pm_payload)
    if not isinstance(response, dict):
        raise FieldError(f"process manager reply must be a JSON object, got {_json_type(response)}")
    if response.get("success") is False:
        return hub_error_reply(str(response.get("error_message", "the process manager refused the request")))
    reply = {"success": True}
    reply.update((op, response[op]) for op in PM_OPERATIONS if op in response)
    return encode(reply)


def hub_broadcast_reply(results) -> bytes:
    """Answer to host_name "*": results is [(host_name, pm_reply_bytes or error str)]."""
    hosts = []
    for host_name, outcome in sorted(results, key=lambda item: item[0]):
        entry = {"host_name": host_name}
        if isinstance(outcome, str):
            entry.update(success=False, error_message=outcome)
        else:
            entry.update(_broadcast_entry(outcome))
        hosts.append(entry)
    return encode({"success": True, "hosts": hosts})


def _broadcast_entry(pm_payload: bytes) -> dict:
    try:
        response = jsoncodec.loads(pm_payload)
    except PayloadDecodeError as exc:
        return {"success": False, "error_message": f"unreadable reply: {exc}"}
    listing = response.get("list_active_processes") if isinstance(response, dict) else None
    if not isinstance(listing, dict) or "pids" not in listing:
        return {"success": False, "error_message": "reply has no list_active_processes"}
    return {"success": True, "list_active_processes": listing}


def hub_list_hosts_reply(entries) -> bytes:
    hosts = [e.as_dict() for e in sorted(entries, key=lambda e: e.host_name)]
    return encode({"success": True, "list_hosts": {"hosts": hosts}})
