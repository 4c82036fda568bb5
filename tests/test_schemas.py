"""The JSON Schemas: valid, self-contained, and saying what spec 7.2 says."""

from importlib import resources

import pytest
from jsonschema import Draft202012Validator

from b0_pm import protocol

SCHEMA_FILES = sorted(p.name for p in (resources.files("b0_pm") / "schemas").iterdir()
                      if p.name.endswith(".json"))


def test_every_expected_schema_is_shipped():
    assert SCHEMA_FILES == ["active-nodes.json", "beacon.json", "event.json", "hub-request.json",
                            "hub-response.json", "pm-request.json", "pm-response.json"]


@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_schema_is_valid_draft_2020_12(name):
    schema = protocol.load_schema(name)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_schema_refers_only_to_itself(name):
    # bookworm's jsonschema 4.10 cannot follow a $ref into another file.
    schema = protocol.load_schema(name)
    for ref in _refs(schema):
        assert ref.startswith("#/$defs/"), ref
        assert ref.removeprefix("#/$defs/") in schema["$defs"]


def test_hub_request_repeats_the_pm_operations_unchanged():
    pm = protocol.load_schema("pm-request.json")
    hub = protocol.load_schema("hub-request.json")
    assert hub["$defs"] == pm["$defs"]
    for op in protocol.PM_OPERATIONS:
        assert hub["properties"][op] == pm["properties"][op]


def test_hub_response_repeats_the_pm_sub_responses_unchanged():
    pm = protocol.load_schema("pm-response.json")
    hub = protocol.load_schema("hub-response.json")
    for op in protocol.PM_OPERATIONS:
        assert hub["properties"][op] == pm["properties"][op]


def test_response_schemas_list_keys_in_codec_order():
    pm = protocol.load_schema("pm-response.json")["properties"]
    assert list(pm)[2:] == list(protocol.PM_OPERATIONS)
    assert list(pm["start_process"]["properties"]) == ["success", "error_message", "pid"]
    assert list(pm["query_process_status"]["properties"])[:4] == [
        "success", "error_message", "running", "exit_code"]
    assert list(protocol.load_schema("beacon.json")["properties"]) == [
        "host_name", "node_name", "service_name"]


def pm_request_valid(document) -> bool:
    return protocol.validator("pm-request.json").is_valid(document)


@pytest.mark.parametrize("document", [
    {},
    {"foo": {}},
    {"start_process": {"path": "/opt/b0/bin/node", "args": []}},
    {"start_process": {"path": "/opt/b0/bin/node", "args": ["-x"], "unknown": 1}},
    {"start_process": {"path": "/a", "args": [], "user": "robot", "environment": {"ROS_DOMAIN_ID": "3"}}},
    {"stop_process": {"pid": 1}},
    {"stop_process": {"pid": 2147483647}},
    {"stop_process": {"pid": 1000.0}},
    {"list_active_processes": {"anything": [1, 2]}},
    {"get_log": {"pid": 5, "lines": 10000}},
])
def test_pm_request_accepts(document):
    assert pm_request_valid(document)


@pytest.mark.parametrize("document", [
    [],
    {"start_process": {"path": "/a"}},
    {"start_process": {"path": "", "args": []}},
    {"start_process": {"path": "/a\u0000b", "args": []}},
    {"start_process": {"path": "/a", "args": ["x\u0000"]}},
    {"start_process": {"path": "/a", "args": [1]}},
    {"start_process": {"path": "/a", "args": ["x"] * 4097}},
    {"start_process": {"path": "/a", "args": [], "environment": {"A-B": "x"}}},
    {"start_process": {"path": "/a", "args": [], "environment": {"A\n": "x"}}},
    {"start_process": {"path": "/a", "args": [], "environment": {"A": "x\n"}}},
    {"start_process": {"path": "/a", "args": [], "environment": {"A": 1}}},
    {"start_process": None},
    {"stop_process": {}},
    {"stop_process": {"pid": "1"}},
    {"stop_process": {"pid": 12.9}},
    {"stop_process": {"pid": 0}},
    {"stop_process": {"pid": 2147483648}},
    {"stop_process": {"pid": True}},
    {"list_active_processes": []},
    {"get_log": {"pid": 5, "lines": 0}},
    {"get_log": {"pid": 5, "lines": 10001}},
])
def test_pm_request_refuses(document):
    assert not pm_request_valid(document)


@pytest.mark.parametrize("document", [
    {"host_name": "robot1", "start_process": {"path": "/a", "args": []}},
    {"host_name": "vm"},
    {"list_hosts": {}},
    {"host_name": "*", "list_active_processes": {}},
    {"host_name": "*", "list_hosts": {}},
    {"host_name": "robot1", "list_hosts": {}},
])
def test_hub_request_accepts(document):
    assert protocol.validator("hub-request.json").is_valid(document)


@pytest.mark.parametrize("document", [
    {},
    {"stop_process": {"pid": 1}},
    {"host_name": ""},
    {"host_name": "*"},
    {"host_name": "*", "list_active_processes": {}, "stop_process": {"pid": 1}},
    {"host_name": "*", "list_hosts": {}, "get_log": {"pid": 1}},
])
def test_hub_request_refuses(document):
    assert not protocol.validator("hub-request.json").is_valid(document)


def test_event_schema_requires_exit_fields_only_on_exit():
    event = protocol.validator("event.json")
    started = {"event": "started", "host_name": "h", "node_name": "n", "pid": 3, "path": "/a",
               "args": [], "timestamp_usec": 1}
    assert event.is_valid(started)
    assert not event.is_valid({**started, "exit_code": 0})
    assert not event.is_valid({**started, "event": "exited"})
    assert event.is_valid({**started, "event": "exited", "exit_code": -2, "signal": 2,
                           "signal_name": "SIGINT"})
