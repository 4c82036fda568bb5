"""Drives one backend object like the PM does, for tests that must run it in
another process (inside the systemd sandbox, or to be killed with SIGKILL).

Run:  python backend_driver.py '{"kind": "systemd"|"systemd-user"|"local",
                                 "instance": "...", "retention_s": 600,
                                 "stop_ladder": [[2, 5.0], [15, 5.0], [9, 0.0]],
                                 "reconcile_interval_s": 2.0}'
Then one JSON request per line on stdin, one JSON answer per line on stdout:
  {"op": "start", "path": ..., "args": [...], "environment": {...}, "user": null}
  {"op": "stop"|"status", "pid": N}     {"op": "running"}     {"op": "adopt"}
  {"op": "wait_exit", "pid": N, "seconds": S}   run the loop until N has ended (at most S)
  {"op": "run", "seconds": S}                    run the loop (ladders, retention)
  {"op": "ended"}                                records ended so far (and forget them)
  {"op": "lose_signals"}                         systemd: drop the signal matches (tests reconciliation)
  {"op": "close", "stop_all": bool}
Answers: {"ok": true, "result": ...} or {"ok": false, "error": "<class>", "message": "..."}.
Between requests the loop keeps serving the backend (fileno, process_events, tick).
`DriverClient` is the test side.
"""

import dataclasses
import json
import os
import select
import subprocess
import sys
import time

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _as_json(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_as_json(item) for item in value]
    return value


class Driver:
    def __init__(self, config: dict):
        options = {key: config[key] for key in ("retention_s", "stop_ladder") if key in config}
        if config["kind"] == "local":
            from b0_pm.backends.local import LocalBackend
            self.backend = LocalBackend(**options)
        else:
            from b0_pm.backends.systemd import SystemdBackend
            if "reconcile_interval_s" in config:
                options["reconcile_interval_s"] = config["reconcile_interval_s"]
            self.backend = SystemdBackend(config["instance"], user_mode=config["kind"] == "systemd-user",
                                          **options)
        self.ended = []

    def serve(self, seconds: float, until=lambda: False, also_wake_on=()) -> None:
        """The PM's loop in miniature: wait on the backend fd and its next deadline."""
        give_up = time.monotonic() + seconds
        while not until():
            now = time.monotonic()
            if now >= give_up:
                return
            deadline = self.backend.tick(now)
            timeout = max(0.0, min(deadline if deadline is not None else give_up, give_up) - now)
            fd = self.backend.fileno()
            select.select([*([fd] if fd is not None else []), *also_wake_on], [], [], timeout)
            self.ended.extend(self.backend.process_events())

    def handle(self, request: dict):
        op = request["op"]
        backend = self.backend
        if op == "start":
            record = backend.start(request["path"], request["args"],
                                   environment=request.get("environment", {}),
                                   user=request.get("user"), group=request.get("group"))
            self.ended.extend(backend.process_events())   # start() may have read other exits
            return record
        if op == "stop":
            return backend.stop(request["pid"])
        if op == "status":
            return backend.status(request["pid"])
        if op == "running":
            return backend.running_pids()
        if op == "adopt":
            return backend.adopt()
        if op == "wait_exit":
            self.serve(request["seconds"], until=lambda: not backend.status(request["pid"]).running)
            return backend.status(request["pid"])
        if op == "run":
            self.serve(request["seconds"])
            return None
        if op == "ended":
            ended, self.ended = self.ended, []
            return ended
        if op == "lose_signals":
            # what a broker that dropped our match rules would do: only reconciliation sees exits now
            from b0_pm.backends.systemd import SIGNAL_MATCHES
            for rule in SIGNAL_MATCHES:
                backend._signals.call_method(b"org.freedesktop.DBus", b"/org/freedesktop/DBus",
                                             b"org.freedesktop.DBus", b"RemoveMatch", [(ord("s"), rule)])
            return None
        if op == "close":
            backend.close(request["stop_all"])
            return None
        raise ValueError(f"unknown op {op}")

    def main(self) -> None:
        stdin = sys.stdin.fileno()
        buffered = b""
        idle_failure = None   # what the loop raised between requests: the answer to the next one
        while True:
            while b"\n" not in buffered:
                if idle_failure is None:
                    try:
                        self.serve(3600.0, until=lambda: select.select([stdin], [], [], 0)[0],
                                   also_wake_on=[stdin])
                    except Exception as error:
                        idle_failure = error
                chunk = os.read(stdin, 65536)
                if not chunk:
                    return
                buffered += chunk
            line, buffered = buffered.split(b"\n", 1)
            request = json.loads(line)
            try:
                if idle_failure is not None:
                    raise idle_failure
                answer = {"ok": True, "result": _as_json(self.handle(request))}
            except Exception as error:   # every request gets exactly one answer
                answer = {"ok": False, "error": type(error).__name__, "message": str(error)}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
            if request["op"] == "close":
                return


class DriverError(Exception):
    def __init__(self, error: str, message: str):
        super().__init__(f"{error}: {message}")
        self.error, self.message = error, message


class DriverClient:
    """The test side: sends requests to a driver process started with stdin/stdout pipes."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self._buffered = b""

    def call(self, op: str, **fields):
        self.process.stdin.write((json.dumps({"op": op, **fields}) + "\n").encode())
        self.process.stdin.flush()
        answer = json.loads(self._read_line(30.0 + fields.get("seconds", 0)))
        if not answer["ok"]:
            raise DriverError(answer["error"], answer["message"])
        return answer["result"]

    def _read_line(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffered:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError(f"the backend driver did not answer within {timeout} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError(f"the backend driver exited ({self.process.poll()})")
            self._buffered += chunk
        line, self._buffered = self._buffered.split(b"\n", 1)
        return line


if __name__ == "__main__":
    Driver(json.loads(sys.argv[1])).main()
