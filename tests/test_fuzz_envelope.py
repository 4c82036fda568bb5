"""Property tests of the parsing layers with mutated *valid* input.

tests/test_b0_envelope.py and test_b0_malformed.py list known bad frames;
tests/test_protocol.py feeds RequestProcessor.handle random bytes and random
JSON. Here hypothesis starts from well-formed envelopes and requests and
mutates them (flipped, dropped and inserted bytes; header lines edited;
paths with NUL, `..`, prefixes of the allowed directory, non-UTF-8; huge
args; injected environment), which reaches the deeper branches:

  * envelope.decode raises only MessageError subclasses, honours max_size
    for the frame and every decompressed part, and round-trips what
    encode/encode_parts produce;
  * RequestProcessor.handle with the real StartPolicy and the real
    LocalBackend always answers a schema-valid reply, never "internal
    error", and starts a program only when the request names the one
    allowed program (after resolution) with an allowed environment.

Example counts are bounded for CI; --long multiplies them by 20.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from b0_pm import protocol
from b0_pm.b0 import envelope
from b0_pm.b0.errors import MessageError
from b0_pm.policy import StartPolicy

# hypothesis settings are fixed at import, before pytest's options are parsed: --long is read from argv
LONG = "--long" in sys.argv or os.environ.get("B0PM_FUZZ_LONG") == "1"


def examples(n: int) -> int:
    return n * 20 if LONG else n


# --- the envelope ----------------------------------------------------------------

header_text = st.text(st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=30)
payloads = st.binary(max_size=300)


@st.composite
def valid_frames(draw):
    header0 = draw(header_text)
    parts = [envelope.Part(draw(payloads), draw(header_text), draw(st.sampled_from(["", "zlib", "lz4"])),
                           draw(st.integers(-1, 9)))
             for _ in range(draw(st.integers(1, 3)))]
    return header0, parts, envelope.encode_parts(header0, parts)


@st.composite
def mutated(draw, frames):
    _, _, frame = draw(frames)
    data = bytearray(frame)
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "drop", "insert", "truncate", "edit_header", "dup_header"]))
        if not data:
            data += draw(st.binary(min_size=1, max_size=8))
            continue
        at = draw(st.integers(0, len(data) - 1))
        if action == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif action == "drop":
            del data[at:at + draw(st.integers(1, 16))]
        elif action == "insert":
            data[at:at] = draw(st.sampled_from([b"\n", b"\n\n", b": ", b"\0", b"\xff", b"-1", b"99999999999",
                                                b"Part-count: 7\n", b"Content-length-0: 5\n"]))
        elif action == "truncate":
            del data[at:]
        else:
            head_end = data.find(b"\n\n")
            lines = bytes(data[:head_end if head_end >= 0 else len(data)]).split(b"\n")
            index = draw(st.integers(0, len(lines) - 1))
            key = lines[index].split(b": ", 1)[0]
            if action == "edit_header":
                lines[index] = key + b": " + draw(st.sampled_from(
                    [b"", b"-5", b"0", b"1e3", b"18446744073709551617", b"zlib", b"lz4", b"\xff", b" 3"]))
            else:
                lines.insert(index, lines[index])
            rest = bytes(data[head_end:]) if head_end >= 0 else b""
            data = bytearray(b"\n".join(lines) + rest)
    return bytes(data)


@settings(max_examples=examples(200), deadline=None)
@given(case=valid_frames())
def test_what_encode_writes_decodes_to_the_same_parts(case):
    header0, parts, frame = case
    decoded = envelope.decode(frame, max_size=1 << 20)
    assert decoded.header0 == header0
    assert [(p.payload, p.content_type) for p in decoded.parts] == [(p.payload, p.content_type) for p in parts]


@settings(max_examples=examples(300), deadline=None)
@given(frame=mutated(valid_frames()), limit=st.sampled_from([64, 1024, 1 << 20]))
def test_mutated_frames_raise_only_message_errors_and_respect_the_limit(frame, limit):
    try:
        decoded = envelope.decode(frame, max_size=limit)
    except MessageError as exc:
        assert str(exc)
        return
    assert len(frame) <= limit
    for part in decoded.parts:
        assert len(part.payload) <= limit


@settings(max_examples=examples(200), deadline=None)
@given(size=st.integers(1, 1 << 16), declared=st.integers(0, 1 << 22), limit=st.sampled_from([1024, 1 << 16]),
       algorithm=st.sampled_from(["zlib", "lz4"]))
def test_compressed_parts_never_inflate_past_the_limit(size, declared, limit, algorithm):
    if algorithm == "zlib":
        body = zlib.compress(b"\0" * size)
    else:
        body = envelope.encode_parts("x", [envelope.Part(b"\0" * size, "", "lz4", -1)]).split(b"\n\n", 1)[1]
    frame = (b"x\nPart-count: 1\nContent-length-0: %d\nCompression-algorithm-0: %s\n"
             b"Uncompressed-content-length-0: %d\n\n" % (len(body), algorithm.encode(), declared) + body)
    try:
        decoded = envelope.decode(frame, max_size=limit)
    except MessageError:
        return
    assert len(decoded.payload) <= limit


# --- the request processor with the real policy and the real local backend --------------

REQ = protocol.REQUEST_TYPE


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """allowed/ holds the one program that may run; beside it, things that look like it."""
    from b0_pm.backends.local import LocalBackend
    root = tmp_path_factory.mktemp("fuzz")
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "ok").write_text("#!/bin/sh\nexit 0\n")
    (allowed / "ok").chmod(0o755)
    (allowed / "plain").write_text("#!/bin/sh\nexit 0\n")
    (allowed / "sub").mkdir()
    (root / "allowed_x").mkdir()
    (root / "allowed_x" / "ok").write_text("#!/bin/sh\nexit 0\n")
    (root / "allowed_x" / "ok").chmod(0o755)
    (allowed / "escape").symlink_to(root / "allowed_x" / "ok")
    (allowed / "inside").symlink_to(allowed / "ok")
    backend = LocalBackend(output="null", retention_s=1.0,
                           stop_ladder=((signal.SIGKILL, 0.0),))
    policy = StartPolicy([str(allowed)], base_environment={"B0_RESOLVER": "tcp://127.0.0.1:1"})
    processor = protocol.RequestProcessor(backend, policy, "process_manager@fuzz")
    yield processor, backend, root
    backend.close(stop_all=True)


def path_strings(root):
    a = f"{root}/allowed"
    return st.sampled_from([
        f"{a}/ok", f"{a}/inside", f"{a}/escape", f"{a}/plain", f"{a}/sub", f"{a}/missing", f"{a}",
        f"{a}/", f"{a}_x/ok", f"{a}/../allowed_x/ok", f"{a}/sub/../ok", f"{a}/./ok", f"{a}//ok",
        "ok", "allowed/ok", "./ok", "/bin/true", "/", f"{a}/ok\0", f"{a}\0/ok", f"{a}/ok/", f"{a}/ok/..",
        "/proc/self/exe", f"{a}/" + "x" * 5000, f"{a}/\udcff", f"{a}/ok\n",
    ]) | st.text(max_size=40).map(lambda t: f"{a}/{t}")


environment_names = st.sampled_from(["GREETING", "LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONPATH", "PATH", "BASH_ENV",
                                     "GLIBC_TUNABLES", "B0_RESOLVER", "1BAD", "A=B", "", "X\n", "ld_preload"])


@st.composite
def start_requests(draw, root):
    body = {"path": draw(path_strings(root)),
            "args": draw(st.one_of(st.lists(st.text(max_size=8), max_size=5),
                                   st.just(["a"] * 4097), st.just(["x" * 65537]), st.just(["a\0b"]),
                                   st.just("not a list"), st.just([1, 2])))}
    if draw(st.booleans()):
        body["environment"] = draw(st.dictionaries(environment_names, st.sampled_from(["1", "a\0b", "x\ny", ""]),
                                                   max_size=3))
    if draw(st.booleans()):
        body["user"] = draw(st.sampled_from(["root", "nobody", "", "no-such-user", "a\0b"]))
    for key in draw(st.lists(st.sampled_from(["path", "args"]), max_size=1)):
        body.pop(key)
    return {"start_process": body}


def allowed_start(request: dict, root) -> bool:
    """Whether this start may run a program (and then it must be allowed/ok)."""
    body = request["start_process"]
    path = body.get("path")
    args = body.get("args")
    if not isinstance(path, str) or not isinstance(args, list) or "\0" in path or not path.startswith("/"):
        return False
    if len(args) > 4096 or not all(isinstance(a, str) and "\0" not in a and len(a) <= 65536 for a in args):
        return False
    try:
        resolved = os.path.realpath(path)
    except ValueError:
        return False
    if resolved != f"{root}/allowed/ok":
        return False
    environment = body.get("environment", {})
    if any(n != "GREETING" or "\0" in v or "\n" in v for n, v in environment.items()):
        return False
    return body.get("user") in (None,)


@settings(max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_starts_run_only_the_allowed_program(world, data):
    processor, backend, root = world
    request = data.draw(start_requests(root))
    try:
        payload = json.dumps(request, ensure_ascii=data.draw(st.booleans())).encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        payload = json.dumps(request).encode()
    reply = processor.handle(payload, REQ)
    document = json.loads(reply.payload)
    assert protocol.validator("pm-response.json").is_valid(document), document
    body = document.get("start_process", document)
    assert not body.get("error_message", "").startswith("internal error"), document
    if body.get("success"):
        assert reply.started is not None and reply.started.path == f"{root}/allowed/ok", (request, document)
        assert allowed_start(request, root), (request, document)
    else:
        assert reply.started is None
        assert body["error_message"], document
        if allowed_start(request, root):
            pytest.fail(f"refused an allowed start {request}: {document}")
