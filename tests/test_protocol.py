"""The PM protocol layer: requests in, replies out, byte for byte (spec 7.2, 7.3, Appendix F).

TableBackend below only holds records so that dispatch and reply shaping
can be checked with exact pids; the last section drives real processes
through the real LocalBackend.
"""

import json
import shutil
import signal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from b0_pm import protocol
from b0_pm.b0.errors import MessageError
from b0_pm.backends.base import NotManaged, ProcessRecord, StartError
from b0_pm.policy import StartPolicy

REQ = protocol.REQUEST_TYPE
NODE = "process_manager@robot1"


class TableBackend:
    """Records in a dict; start hands out the pids queued in next_pids."""

    def __init__(self):
        self.records: dict[int, ProcessRecord] = {}
        self.next_pids = [4242, 4250]
        self.started = []
        self.stopped = []
        self.start_error = None

    def add(self, pid, **fields):
        record = ProcessRecord(pid=pid, path="/opt/b0/bin/node", args=[], unit=None,
                               started_at=1700000000.0, **fields)
        self.records[pid] = record
        return record

    def start(self, path, args, *, environment, user=None, group=None):
        if self.start_error:
            raise self.start_error
        self.started.append((path, args, environment, user, group))
        return self.add(self.next_pids.pop(0))

    def stop(self, pid):
        if pid not in self.records:
            raise NotManaged(f"PID {pid} is not managed")
        self.stopped.append(pid)
        self.records[pid].stop_requested = True
        return self.records[pid]

    def status(self, pid):
        return self.records.get(pid)

    def running_pids(self):
        return sorted(pid for pid, r in self.records.items() if r.running)


@pytest.fixture
def bin_dir(tmp_path):
    directory = tmp_path / "bin"
    directory.mkdir()
    program = directory / "node"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    return directory


@pytest.fixture
def backend():
    return TableBackend()


@pytest.fixture
def processor(backend, bin_dir):
    policy = StartPolicy([str(bin_dir)], base_environment={"B0_RESOLVER": "tcp://r:22000"})
    return protocol.RequestProcessor(backend, policy, NODE)


def call(processor, request, content_type=REQ) -> bytes:
    payload = request if isinstance(request, bytes) else json.dumps(request).encode()
    reply = processor.handle(payload, content_type)
    assert reply.content_type == "b0::process_manager::Response"
    return reply.payload


def error_of(payload: bytes, op=None) -> str:
    document = json.loads(payload)
    part = document[op] if op else document
    assert part["success"] is False
    return part["error_message"]


# --- golden replies (spec 7.2) ---------------------------------------------------

def test_start_reply_bytes(processor, bin_dir, backend):
    request = {"start_process": {"path": f"{bin_dir}/node", "args": ["--x", "y z"]}}
    assert call(processor, request) == b'{"start_process":{"success":true,"pid":4242}}'
    path, args, environment, user, group = backend.started[0]
    assert (path, args) == (f"{bin_dir}/node", ["--x", "y z"])
    assert environment == {"B0_RESOLVER": "tcp://r:22000"}


def test_start_reply_carries_the_record_for_the_started_event(processor, bin_dir):
    reply = processor.handle(json.dumps({"start_process": {"path": f"{bin_dir}/node", "args": []}})
                             .encode(), REQ)
    assert reply.started.pid == 4242 and reply.stopped is None


def test_start_refused_by_policy_says_permission_denied_and_why(processor, backend):
    message = error_of(call(processor, {"start_process": {"path": "/bin/sleep", "args": ["1"]}}),
                       "start_process")
    assert message.startswith("permission denied: /bin/sleep")
    assert "is not inside an allowed directory" in message
    assert backend.started == []


def test_relative_path_is_refused_by_policy_as_the_original_does(processor, backend):
    # The C++ PM answers "permission denied" here; clients may match that prefix.
    message = error_of(call(processor, {"start_process": {"path": "sleep", "args": []}}),
                       "start_process")
    assert message == "permission denied: the path must be absolute, got 'sleep'"
    assert backend.started == []


def test_start_failure_of_the_backend_is_a_reply(processor, bin_dir, backend):
    backend.start_error = StartError("exec of /x failed: Exec format error")
    assert call(processor, {"start_process": {"path": f"{bin_dir}/node", "args": []}}) == (
        b'{"start_process":{"success":false,"error_message":"exec of /x failed: Exec format error"}}')


def test_stop_reply_bytes(processor, backend):
    backend.add(4242)
    reply = processor.handle(b'{"stop_process":{"pid":4242}}', REQ)
    assert reply.payload == b'{"stop_process":{"success":true}}'
    assert backend.stopped == [4242] and reply.stopped.pid == 4242


def test_stop_unknown_pid_is_the_originals_not_managed_text(processor):
    assert call(processor, b'{"stop_process":{"pid":77}}') == (
        b'{"stop_process":{"success":false,"error_message":'
        b'"PID 77 is not managed by this process manager (process_manager@robot1)"}}')


def test_stop_error_names_the_current_node_name(processor):
    processor.node_name = "process_manager@robot1-1"
    assert b"(process_manager@robot1-1)" in call(processor, b'{"stop_process":{"pid":77}}')


def test_stop_of_an_exited_process_succeeds_without_signalling(processor, backend):
    backend.add(4242, running=False, exit_code=0)
    assert call(processor, b'{"stop_process":{"pid":4242}}') == b'{"stop_process":{"success":true}}'
    assert backend.stopped == []


def test_query_running(processor, backend):
    backend.add(4242)
    assert call(processor, b'{"query_process_status":{"pid":4242}}') == (
        b'{"query_process_status":{"success":true,"running":true}}')


def test_query_exited_sends_exit_code(processor, backend):
    backend.add(4242, running=False, exit_code=0)
    assert call(processor, b'{"query_process_status":{"pid":4242}}') == (
        b'{"query_process_status":{"success":true,"running":false,"exit_code":0}}')


def test_query_signal_death_adds_signal_fields_after_exit_code(processor, backend):
    backend.add(4242, running=False, exit_code=-signal.SIGINT, signal=signal.SIGINT)
    backend.add(4250, running=False, exit_code=-signal.SIGSEGV, signal=signal.SIGSEGV, core_dumped=True)
    assert call(processor, b'{"query_process_status":{"pid":4242}}') == (
        b'{"query_process_status":{"success":true,"running":false,"exit_code":-2,'
        b'"signal":2,"signal_name":"SIGINT"}}')
    assert call(processor, b'{"query_process_status":{"pid":4250}}') == (
        b'{"query_process_status":{"success":true,"running":false,"exit_code":-11,'
        b'"signal":11,"signal_name":"SIGSEGV","core_dumped":true}}')


def test_query_unknown_pid(processor):
    assert call(processor, b'{"query_process_status":{"pid":4242}}') == (
        b'{"query_process_status":{"success":false,"error_message":"no such pid"}}')


def test_list_sorted_running_pids_only(processor, backend):
    backend.add(4250)
    backend.add(4242)
    backend.add(4100, running=False, exit_code=1)
    assert call(processor, b'{"list_active_processes":{}}') == (
        b'{"list_active_processes":{"pids":[4242,4250]}}')


def test_list_empty(processor):
    assert call(processor, b'{"list_active_processes":{}}') == b'{"list_active_processes":{"pids":[]}}'


def test_list_ignores_its_content(processor):
    assert call(processor, b'{"list_active_processes":{"pids":[1],"x":null}}') == (
        b'{"list_active_processes":{"pids":[]}}')


@pytest.mark.parametrize("request_bytes", [b"{}", b'{"foo":{}}', b'{"list_hosts":{}}'])
def test_no_known_operation_gets_empty_object(processor, request_bytes):
    assert call(processor, request_bytes) == b"{}"


def test_pretty_printed_request_with_trailing_newline_is_accepted(processor):
    assert call(processor, b'{\n  "list_active_processes" : { }\n}\n') == (
        b'{"list_active_processes":{"pids":[]}}')


# --- dispatch order (spec 7.3) ---------------------------------------------------------

def test_only_the_first_operation_in_codec_order_is_served(processor, backend, bin_dir):
    backend.add(4250)
    request = {"list_active_processes": {}, "query_process_status": {"pid": 4250},
               "stop_process": {"pid": 4250}}
    assert call(processor, request) == b'{"stop_process":{"success":true}}'
    request = {"get_log": {"pid": 1}, "list_active_processes": {}, "query_process_status": {"pid": 4250}}
    assert call(processor, request) == b'{"query_process_status":{"success":true,"running":true}}'
    request = {"stop_process": {"pid": 4250}, "start_process": {"path": f"{bin_dir}/node", "args": []}}
    assert call(processor, request) == b'{"start_process":{"success":true,"pid":4242}}'


def test_a_bad_later_operation_is_ignored_like_any_later_operation(processor):
    request = {"list_active_processes": {}, "get_log": {"pid": "x"}, "zzz": None}
    assert call(processor, request) == b'{"list_active_processes":{"pids":[]}}'


def test_extra_fields_inside_an_operation_are_ignored(processor, backend):
    backend.add(4242)
    assert call(processor, b'{"query_process_status":{"pid":4242,"verbose":true}}') == (
        b'{"query_process_status":{"success":true,"running":true}}')


def test_whole_number_forms_are_accepted_as_the_original_did(processor, backend):
    backend.add(1000)
    expected = b'{"query_process_status":{"success":true,"running":true}}'
    assert call(processor, b'{"query_process_status":{"pid":1e3}}') == expected
    assert call(processor, b'{"query_process_status":{"pid":1000.0}}') == expected


# --- bad bodies name the field -------------------------------------------------------

@pytest.mark.parametrize("request_bytes, op, message", [
    (b'{"start_process":{"path":"/a"}}', "start_process", "start_process.args: required field missing"),
    (b'{"start_process":{"args":[]}}', "start_process", "start_process.path: required field missing"),
    (b'{"start_process":{"path":"/a\\u0000b","args":[]}}', "start_process",
     'start_process.path: must not contain NUL characters, got "/a\\u0000b"'),
    (b'{"start_process":{"path":"/a","args":"x"}}', "start_process",
     'start_process.args: must be an array, got string "x"'),
    (b'{"start_process":{"path":"/a","args":["ok",2]}}', "start_process",
     "start_process.args[1]: must be a string, got number 2"),
    (b'{"start_process":{"path":"/a","args":[],"environment":{"X":"a\\u0000"}}}', "start_process",
     'start_process.environment.X: environment values must not contain NUL or newline characters,'
     ' got "a\\u0000"'),
    (b'{"start_process":null}', "start_process", "start_process: must be an object, got null"),
    (b'{"stop_process":{}}', "stop_process", "stop_process.pid: required field missing"),
    (b'{"stop_process":{"pid":"1"}}', "stop_process", 'stop_process.pid: must be an integer, got string "1"'),
    (b'{"stop_process":{"pid":12.9}}', "stop_process", "stop_process.pid: must be a whole number, got 12.9"),
    (b'{"stop_process":{"pid":true}}', "stop_process", "stop_process.pid: must be an integer, got boolean true"),
    (b'{"query_process_status":{"pid":-1}}', "query_process_status",
     "query_process_status.pid: must be between 1 and 2147483647, got -1"),
    (b'{"query_process_status":{"pid":99999999999}}', "query_process_status",
     "query_process_status.pid: must be between 1 and 2147483647, got 99999999999"),
    (b'{"get_log":{"pid":1,"lines":0}}', "get_log", "get_log.lines: must be between 1 and 10000, got 0"),
])
def test_bad_body_reply_names_field_and_problem(processor, request_bytes, op, message):
    payload = call(processor, request_bytes)
    assert list(json.loads(payload)) == [op]
    assert error_of(payload, op) == message


def test_bad_list_body_keeps_pids_first_for_cpp_clients(processor):
    assert call(processor, b'{"list_active_processes":[]}') == (
        b'{"list_active_processes":{"pids":[],"success":false,'
        b'"error_message":"list_active_processes: must be an object, got array []"}}')


# --- every request that crashed the original (Appendix F, 7.5) gets a reply -------------

@pytest.mark.parametrize("request_bytes, content_type, message", [
    (b'{"start_process":', REQ, "json parse error"),
    (b"\xff\xfe", REQ, "payload is not valid UTF-8"),
    (b"[1,2]", REQ, "request must be a JSON object, got array"),
    (b'"x"', REQ, "request must be a JSON object, got string"),
    (b'{"list_active_processes":{}}', "b0::process_manager::Beacon",
     "request has content type 'b0::process_manager::Beacon': expected b0::process_manager::Request"),
    (b'{"list_active_processes":{}}', "", "request has no content type: expected b0::process_manager::Request"),
    (b'{"stop_process":{"pid":NaN}}', REQ, "NaN is not valid JSON"),
    (b"[" * 100000, REQ, "nested too deeply"),
    (b'{"stop_process":{"pid":' + b"[" * 500 + b"]" * 500 + b"}}", REQ,
     "request is nested more than 32 levels deep"),
])
def test_unreadable_request_gets_a_top_level_error(processor, request_bytes, content_type, message):
    payload = call(processor, request_bytes, content_type)
    assert list(json.loads(payload)) == ["success", "error_message"]
    assert message in error_of(payload)


def test_start_without_args_is_refused_not_fatal(processor):
    assert error_of(call(processor, b'{"start_process":{"path":"/a"}}'), "start_process") == (
        "start_process.args: required field missing")


def test_start_of_a_missing_file_inside_the_allowed_directory(processor, bin_dir, backend):
    payload = call(processor, {"start_process": {"path": f"{bin_dir}/missing", "args": []}})
    assert error_of(payload, "start_process") == f"no such file: {bin_dir}/missing"
    assert backend.started == []


def test_an_unexpected_backend_failure_still_gets_one_reply(processor, backend):
    backend.status = None  # calling it raises TypeError, as a backend bug would
    assert error_of(call(processor, b'{"query_process_status":{"pid":1}}'), "query_process_status") == (
        "internal error: 'NoneType' object is not callable")


# --- get_log (extension) -------------------------------------------------------------

def test_get_log_without_a_journal(processor, backend):
    backend.add(4242)
    assert error_of(call(processor, b'{"get_log":{"pid":4242}}'), "get_log").startswith(
        "logs are not available on the local backend")


def test_get_log_reads_the_units_lines(backend, bin_dir):
    asked = []

    def read_log(record, lines):
        asked.append((record.unit, lines))
        return ["first", "second \u00e9"]

    processor = protocol.RequestProcessor(backend, StartPolicy([str(bin_dir)]), NODE, read_log=read_log)
    backend.add(4242).unit = "b0pm-1.service"
    assert call(processor, b'{"get_log":{"pid":4242}}') == (
        '{"get_log":{"success":true,"lines":["first","second \u00e9"]}}'.encode())
    call(processor, b'{"get_log":{"pid":4242,"lines":7}}')
    assert asked == [("b0pm-1.service", 100), ("b0pm-1.service", 7)]
    assert error_of(call(processor, b'{"get_log":{"pid":9}}'), "get_log") == "no such pid"


@pytest.mark.skipif(shutil.which("journalctl") is None, reason="needs journalctl")
def test_journal_reader_runs_journalctl_for_the_unit():
    record = ProcessRecord(pid=1, path="/x", args=[], unit="b0pm-test-no-such-unit.service",
                           started_at=0.0)
    assert protocol.JournalLogReader()(record, 5) == []


def test_journal_reader_keeps_the_newest_lines_that_fit():
    reader = protocol.JournalLogReader(max_reply_bytes=40)
    lines = [f"line {i}" for i in range(10)]   # 6 bytes + 8 overhead each
    assert reader._fit(lines) == ["[8 earlier lines omitted: reply size limit]", "line 8", "line 9"]
    assert reader._fit(lines[:2]) == lines[:2]


# --- topics ----------------------------------------------------------------------

def test_beacon_round_trip():
    beacon = protocol.Beacon("robot1", NODE, f"{NODE}/control")
    payload = protocol.encode_beacon(beacon)
    assert payload == (b'{"host_name":"robot1","node_name":"process_manager@robot1",'
                       b'"service_name":"process_manager@robot1/control"}')
    assert protocol.parse_beacon(payload, protocol.BEACON_TYPE) == beacon


@pytest.mark.parametrize("payload, content_type, message", [
    (b'{"host_name":"h","node_name":"n"}', protocol.BEACON_TYPE, "beacon: service_name: required field missing"),
    (b'{"host_name":1,"node_name":"n","service_name":"s"}', protocol.BEACON_TYPE,
     "beacon: host_name: must be a string, got number 1"),
    (b"nope", protocol.BEACON_TYPE, "json parse error"),
    (b"{}", "b0::process_manager::Request", "beacon has content type"),
])
def test_bad_beacon_is_a_message_error(payload, content_type, message):
    with pytest.raises(MessageError, match=message):
        protocol.parse_beacon(payload, content_type)


def test_active_nodes_sorted_by_host():
    entries = [protocol.HostEntry("b", "pm@b", "pm@b/control", 2),
               protocol.HostEntry("a", "pm@a", "pm@a/control", 1)]
    payload = protocol.encode_active_nodes(entries)
    assert payload == (b'{"nodes":[{"host_name":"a","node_name":"pm@a","service_name":"pm@a/control",'
                       b'"last_active":1},{"host_name":"b","node_name":"pm@b",'
                       b'"service_name":"pm@b/control","last_active":2}]}')
    assert protocol.validator("active-nodes.json").is_valid(json.loads(payload))


def test_events_for_start_and_signal_exit():
    record = ProcessRecord(pid=7, path="/opt/b0/bin/node", args=["-v"], unit=None, started_at=1.5)
    started = protocol.encode_event("started", record, host_name="robot1", node_name=NODE)
    assert started == (b'{"event":"started","host_name":"robot1","node_name":"process_manager@robot1",'
                       b'"pid":7,"path":"/opt/b0/bin/node","args":["-v"],"timestamp_usec":1500000}')
    record.mark_exited(killed_by=signal.SIGTERM, ended_at=3.0)
    record.stop_requested = True
    exited = protocol.encode_event("exited", record, host_name="robot1", node_name=NODE)
    assert exited.endswith(b'"timestamp_usec":3000000,"exit_code":-15,"signal":15,'
                           b'"signal_name":"SIGTERM","stop_requested":true}')
    for payload in (started, exited):
        assert protocol.validator("event.json").is_valid(json.loads(payload))


# --- the HUB's helpers -----------------------------------------------------------------

def test_hub_request_forwards_the_first_operation_without_host_name():
    request = protocol.parse_hub_request(
        b'{"host_name":"robot1","stop_process":{"pid":1e2},"list_active_processes":{}}', REQ)
    assert (request.host_name, request.operation, request.is_broadcast) == ("robot1", "stop_process", False)
    assert request.pm_payload() == b'{"stop_process":{"pid":100}}'


def test_hub_request_without_operation_forwards_an_empty_request():
    request = protocol.parse_hub_request(b'{"host_name":"vm"}', REQ)
    assert request.operation is None and request.pm_payload() == b"{}"


def test_hub_list_hosts_and_broadcast():
    assert protocol.parse_hub_request(b'{"list_hosts":{}}', REQ).operation == "list_hosts"
    everywhere = protocol.parse_hub_request(b'{"host_name":"*","list_hosts":{}}', REQ)
    assert everywhere.operation == "list_hosts" and everywhere.is_broadcast
    request = protocol.parse_hub_request(b'{"host_name":"*","list_active_processes":{}}', REQ)
    assert request.is_broadcast and request.operation == "list_active_processes"


@pytest.mark.parametrize("payload, content_type, message", [
    (b'{"stop_process":{"pid":1}}', REQ, "host_name: required field missing"),
    (b'{"host_name":"vm","start_process":{"path":"/a"}}', REQ, "start_process.args: required field missing"),
    (b'{"host_name":"*","stop_process":{"pid":1}}', REQ,
     'host_name "*" is only allowed with list_active_processes or list_hosts alone'),
    (b'{"host_name":"*"}', REQ, 'host_name "*" is only allowed with list_active_processes or list_hosts alone'),
    (b'{"host_name":', REQ, "json parse error"),
    (b'{"host_name":"vm"}', "", "request has no content type"),
])
def test_bad_hub_request_is_a_message_error_for_the_error_reply(payload, content_type, message):
    with pytest.raises(MessageError) as caught:
        protocol.parse_hub_request(payload, content_type)
    assert message in str(caught.value)
    reply = protocol.hub_error_reply(str(caught.value))
    assert json.loads(reply) == {"success": False, "error_message": str(caught.value)}


def test_hub_replies_match_the_originals_bytes():
    assert protocol.hub_error_reply("unknown host") == b'{"success":false,"error_message":"unknown host"}'
    assert protocol.hub_success_reply(b'{"start_process":{"success":true,"pid":4242}}') == (
        b'{"success":true,"start_process":{"success":true,"pid":4242}}')
    assert protocol.hub_success_reply(b'{"list_active_processes":{"pids":[]}}') == (
        b'{"success":true,"list_active_processes":{"pids":[]}}')
    assert protocol.hub_success_reply(b"{}") == b'{"success":true}'
    assert protocol.hub_success_reply(b'{"success":false,"error_message":"json parse error: x"}') == (
        b'{"success":false,"error_message":"json parse error: x"}')


def test_hub_broadcast_and_list_hosts_replies_follow_the_schema():
    broadcast = protocol.hub_broadcast_reply([
        ("robot2", "no reply from process_manager@robot2 within 3 s"),
        ("robot1", b'{"list_active_processes":{"pids":[5,9]}}'),
    ])
    assert broadcast == (b'{"success":true,"hosts":[{"host_name":"robot1","success":true,'
                         b'"list_active_processes":{"pids":[5,9]}},{"host_name":"robot2","success":false,'
                         b'"error_message":"no reply from process_manager@robot2 within 3 s"}]}')
    listing = protocol.hub_list_hosts_reply([protocol.HostEntry("r", "pm@r", "pm@r/control", 5)])
    for payload in (broadcast, listing):
        assert protocol.validator("hub-response.json").is_valid(json.loads(payload))


# --- nothing a client sends can crash the PM -----------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
operation_bodies = st.dictionaries(
    st.sampled_from(["path", "args", "pid", "lines", "user", "environment", "x"]),
    json_values | st.sampled_from(["/", "/bin/true", "/tmp", 4242, 12.5, -1, ["a"], {"A": "b"}]),
    max_size=5)
requests = st.dictionaries(
    st.sampled_from(list(protocol.PM_OPERATIONS) + ["list_hosts", "host_name", "foo"]),
    operation_bodies | json_values, max_size=3)


def _check_reply(processor, payload, content_type=REQ):
    reply = processor.handle(payload, content_type)
    document = json.loads(reply.payload)
    assert protocol.validator("pm-response.json").is_valid(document), document
    for part in [document, *document.values()]:
        assert not str(part.get("error_message", "") if isinstance(part, dict) else "").startswith(
            "internal error"), document


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=200), content_type=st.sampled_from([REQ, "", "x"]))
def test_any_bytes_get_a_valid_reply(processor, payload, content_type):
    _check_reply(processor, payload, content_type)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests | json_values)
def test_any_json_gets_a_valid_reply(processor, backend, request):
    backend.next_pids = [4242]  # a start may succeed once per example
    backend.records = {4242: backend.records.get(4242) or backend.add(4242)}
    _check_reply(processor, json.dumps(request).encode())


@settings(max_examples=200, deadline=None)
@given(request=requests | json_values)
def test_any_json_gives_the_hub_a_request_or_a_message_error(request):
    try:
        parsed = protocol.parse_hub_request(json.dumps(request).encode(), REQ)
    except MessageError as exc:
        assert str(exc)
        return
    assert isinstance(json.loads(parsed.pm_payload()), dict)


# --- with the real local backend: what a client sees of real processes --------------

@pytest.fixture
def local(tmp_path):
    from b0_pm.backends.local import LocalBackend
    programs = tmp_path / "programs"
    programs.mkdir()
    for name, body in (("sleeper", "exec sleep 30"), ("exit3", "exit 3"),
                       ("env", 'printf %s "$GREETING" > "$1"')):
        script = programs / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    (programs / "broken").write_text("#!/nonexistent/interpreter\n")
    (programs / "broken").chmod(0o755)
    backend = LocalBackend(output="null", stop_ladder=((signal.SIGINT, 0.5), (signal.SIGKILL, 0.0)))
    processor = protocol.RequestProcessor(backend, StartPolicy([str(programs)]), NODE)
    yield processor, backend, programs
    backend.close(stop_all=True)


def ask(processor, request) -> dict:
    return json.loads(call(processor, request))


def wait_for_exit(backend, pid, timeout_s=10.0):
    import select
    import time
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        select.select([backend.fileno()], [], [], 0.2)
        backend.tick(time.monotonic())
        if any(record.pid == pid for record in backend.process_events()):
            return
    raise AssertionError(f"pid {pid} did not exit within {timeout_s} s")


def test_local_start_query_stop_and_exit_status(local):
    processor, backend, programs = local
    pid = ask(processor, {"start_process": {"path": f"{programs}/sleeper", "args": []}})["start_process"]["pid"]
    assert ask(processor, {"query_process_status": {"pid": pid}}) == {
        "query_process_status": {"success": True, "running": True}}
    assert ask(processor, {"list_active_processes": {}}) == {"list_active_processes": {"pids": [pid]}}
    assert ask(processor, {"stop_process": {"pid": pid}}) == {"stop_process": {"success": True}}
    wait_for_exit(backend, pid)
    assert call(processor, {"query_process_status": {"pid": pid}}) == (
        b'{"query_process_status":{"success":true,"running":false,"exit_code":-2,'
        b'"signal":2,"signal_name":"SIGINT"}}')
    assert ask(processor, {"stop_process": {"pid": pid}}) == {"stop_process": {"success": True}}
    assert ask(processor, {"list_active_processes": {}}) == {"list_active_processes": {"pids": []}}


def test_local_exit_code_and_environment_reach_the_client(local, tmp_path):
    processor, backend, programs = local
    pid = ask(processor, {"start_process": {"path": f"{programs}/exit3", "args": []}})["start_process"]["pid"]
    wait_for_exit(backend, pid)
    assert call(processor, {"query_process_status": {"pid": pid}}) == (
        b'{"query_process_status":{"success":true,"running":false,"exit_code":3}}')
    out = tmp_path / "greeting"
    request = {"start_process": {"path": f"{programs}/env", "args": [str(out)],
                                 "environment": {"GREETING": "hello robot"}}}
    pid = ask(processor, request)["start_process"]["pid"]
    wait_for_exit(backend, pid)
    assert out.read_text() == "hello robot"


def test_local_exec_failure_is_a_reply_not_a_crash(local):
    processor, backend, programs = local
    reply = ask(processor, {"start_process": {"path": f"{programs}/broken", "args": []}})
    assert reply["start_process"]["success"] is False
    assert reply["start_process"]["error_message"].startswith(f"cannot execute {programs}/broken")
    assert backend.running_pids() == []


def test_local_get_log_is_refused_clearly(local):
    processor, backend, programs = local
    pid = ask(processor, {"start_process": {"path": f"{programs}/sleeper", "args": []}})["start_process"]["pid"]
    assert ask(processor, {"get_log": {"pid": pid}})["get_log"]["error_message"].startswith(
        "logs are not available on the local backend")
