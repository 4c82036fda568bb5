"""Programs as transient systemd services, through pystemd's low-level D-Bus calls.

Each start is one `b0pm-<instance>-<program>-<id>.service` in
`b0pm-<instance>.slice`. systemd owns the processes and keeps their exit
status (RemainAfterExit=yes), so a restarted PM adopts what the previous one
left. Two system-bus connections: one for method calls, one that only
receives signals and whose fd the PM's loop polls.

Works with pystemd 0.11 (Debian bookworm) to 0.15: only DBus.call_method,
get_property, process, get_fd, apply_signature, path_encode and
unit_signatures.signature_array are used, and only properties 0.11 knows.
"""

import json
import logging
import os
import re
import secrets
import select
import time

from pystemd.dbusexc import DBusBaseError as DBusError   # DBusError itself is a factory function
from pystemd.dbuslib import DBus, apply_signature, path_encode
from pystemd.systemd1.unit_signatures import signature_array

from b0_pm.backends.base import (Backend, BackendLost, ProcessRecord, StartError, TrackedProcess,
                                 describe_exec_failure)

log = logging.getLogger(__name__)

# systemd expands $VAR in ExecStart arguments when it execs; "$$" stands for a literal "$".
# (ExecStartEx with "no-env-expand" would say it directly, but systemd 252 cannot read that back
# from the transient unit file after a daemon-reload: the unit turns bad-setting, adopt() loses it.)
def _escape_env_expansion(argument: bytes) -> bytes:
    return argument.replace(b"$", b"$$")


def _unescape_env_expansion(argument: bytes) -> bytes:
    return argument.replace(b"$$", b"$")


def _describe_command(instance: str, path: str, args: list[str]) -> bytes:
    # ASCII JSON: printable (no newline can break the unit file) and read back unchanged after a
    # daemon-reload, unlike ExecStart, whose quoting systemd 252 does not round-trip.
    return f"b0-pm {instance}: {json.dumps([path, *args])}".encode()


def _command_from_description(instance: str, description: bytes) -> list[str] | None:
    prefix = f"b0-pm {instance}: "
    text = description.decode(errors="replace")
    if not text.startswith(prefix):
        return None
    try:
        command = json.loads(text[len(prefix):])
    except ValueError:
        return None
    valid = isinstance(command, list) and command and all(isinstance(word, str) for word in command)
    return command if valid else None

SYSTEMD = b"org.freedesktop.systemd1"
MANAGER_PATH = b"/org/freedesktop/systemd1"
MANAGER = b"org.freedesktop.systemd1.Manager"
UNIT = b"org.freedesktop.systemd1.Unit"
SERVICE = b"org.freedesktop.systemd1.Service"
PROPERTIES = b"org.freedesktop.DBus.Properties"
UNIT_PATH_PREFIX = b"/org/freedesktop/systemd1/unit"

# waitid si_code values as systemd reports them in ExecMainCode (0: not ended, 2: killed)
CLD_EXITED, CLD_DUMPED = 1, 3

# systemd's own exit statuses (200 CHDIR .. 245 BPF in systemd 252) for a child that failed
# before it could exec the program. A program that itself exits with one of these before
# systemd saw its exec is indistinguishable from such a failure (documented limitation).
EXIT_EXEC, EXIT_GROUP, EXIT_USER = 203, 216, 217
SETUP_FAILURE_RANGE = range(200, 246)

SIGNAL_MATCHES = (
    b"type='signal',sender='org.freedesktop.systemd1',interface='org.freedesktop.systemd1.Manager',"
    b"member='JobRemoved'",
    b"type='signal',sender='org.freedesktop.systemd1',interface='org.freedesktop.DBus.Properties',"
    b"member='PropertiesChanged',path_namespace='/org/freedesktop/systemd1/unit',"
    b"arg0='org.freedesktop.systemd1.Service'",
)


def unit_name_part(text: str) -> str:
    """Characters allowed in our unit names; '-' is kept out because it means hierarchy in slices."""
    return re.sub(r"[^A-Za-z0-9_.:]", "_", text)[:64] or "_"


def dbus_error_text(error: DBusError) -> str:
    """pystemd's str() of an error adds noise; keep systemd's message and the errno's name."""
    message = error.err_message.decode() if isinstance(error.err_message, bytes) else str(error.err_message)
    reason = os.strerror(abs(error.errno)) if error.errno else ""
    return f"{message.rstrip('.')} ({reason})" if message and reason else message or reason


def _apply_exit(record: ProcessRecord, service: dict | None) -> None:
    if service is None:
        # someone else stopped and collected the unit before we read its status
        record.mark_exited(status=None)
        return
    code, status = service.get(b"ExecMainCode", 0), service.get(b"ExecMainStatus", 0)
    ended_at = service.get(b"ExecMainExitTimestamp", 0) / 1e6 or None
    if code == CLD_EXITED:
        record.mark_exited(status=status, ended_at=ended_at)
    else:
        record.mark_exited(killed_by=status, core_dumped=code == CLD_DUMPED, ended_at=ended_at)


class _UnitHandle:
    def __init__(self, name: str, invocation_id: bytes):
        self.name = name
        self.bname = name.encode()
        self.path = path_encode(UNIT_PATH_PREFIX, self.bname)
        self.invocation_id = invocation_id


class SystemdBackend(Backend):
    def __init__(self, instance: str, *, user_mode: bool = False, start_timeout_s: float = 5.0,
                 reconcile_interval_s: float = 2.0, **ladder_and_retention):
        super().__init__(**ladder_and_retention)
        self.instance = unit_name_part(instance)
        self.user_mode = user_mode
        self.slice = f"b0pm-{self.instance}.slice"
        self.unit_prefix = f"b0pm-{self.instance}-"
        self.start_timeout_s = start_timeout_s
        self.reconcile_interval_s = reconcile_interval_s
        self._reconcile_due = time.monotonic() + reconcile_interval_s
        self._pid_by_path: dict[bytes, int] = {}           # unit object path -> pid, while it runs
        self._starting: dict[bytes, dict] = {}             # unit object path -> Service properties seen
        self._awaited_job: bytes | None = None
        self._job_result: bytes | None = None
        self._calls = DBus(user_mode=user_mode)
        self._calls.open()
        self._signals = DBus(user_mode=user_mode)
        self._signals.open()
        self._signals.call_method(SYSTEMD, MANAGER_PATH, MANAGER, b"Subscribe", [])
        for rule in SIGNAL_MATCHES:
            self._signals.call_method(b"org.freedesktop.DBus", b"/org/freedesktop/DBus",
                                      b"org.freedesktop.DBus", b"AddMatch", apply_signature(b"s", [rule]))
        self._drain_signals()   # replies to these calls may have queued signals behind them
        self._signal_fd = self._signals.get_fd()   # kept: after a disconnect get_fd() is negative

    # -- D-Bus helpers (blocking, each a short round trip) -----------------

    def _manager(self, method: bytes, signature: bytes, *values):
        return self._calls.call_method(SYSTEMD, MANAGER_PATH, MANAGER, method,
                                       apply_signature(signature, list(values))).body

    def _service_properties(self, unit_path: bytes) -> dict:
        return self._calls.call_method(SYSTEMD, unit_path, PROPERTIES, b"GetAll",
                                       apply_signature(b"s", [SERVICE])).body

    def _invocation_id(self, unit_path: bytes) -> bytes:
        return bytes(self._calls.get_property(SYSTEMD, unit_path, UNIT, b"InvocationID", b"ay"))

    # -- signals -------------------------------------------------------------

    def fileno(self) -> int:
        return self._signal_fd

    def _drain_signals(self) -> None:
        # process() hides sd_bus_process()'s return code; an empty message can also mean
        # "handled something internally", so stop only after two empty answers in a row
        empty_answers = 0
        while empty_answers < 2:
            try:
                message = self._signals.process()
            except DBusError as error:
                raise BackendLost(f"lost the connection to systemd's bus ({dbus_error_text(error)}); "
                                  f"restart to adopt the programs again") from error
            if message.is_empty():
                empty_answers += 1
                continue
            empty_answers = 0
            message.process_reply(True)
            member = message.headers.get("Member")
            if member == b"JobRemoved":
                _job_id, job, _unit, result = message.body
                if job == self._awaited_job:
                    self._job_result = result
            elif member == b"PropertiesChanged":
                self._service_changed(message.headers.get("Path"), message.body[1])
        if self._signals.get_fd() < 0:
            # sd-bus handled a disconnect (the broker restarted): no more exits would be seen
            raise BackendLost("lost the connection to systemd's bus; restart to adopt the programs again")

    def _service_changed(self, unit_path: bytes, changed: dict) -> None:
        if unit_path in self._starting:
            self._starting[unit_path].update(changed)
            return
        pid = self._pid_by_path.get(unit_path)
        if pid is None:
            return
        if b"ExecMainCode" not in changed or b"ExecMainPID" not in changed:
            changed = self._read_service_or_none(unit_path) or {}
        if changed.get(b"ExecMainPID") == pid and changed.get(b"ExecMainCode", 0) != 0:
            self._record_exit(self._table[pid], changed)

    def _read_service_or_none(self, unit_path: bytes) -> dict | None:
        try:
            return self._service_properties(unit_path)
        except DBusError:
            return None   # the unit is gone

    def _record_exit(self, tracked: TrackedProcess, service: dict | None) -> None:
        if not tracked.record.running:
            return
        self._pid_by_path.pop(tracked.handle.path, None)
        _apply_exit(tracked.record, service)
        self._ended_now(tracked)

    def _poll_exits(self) -> None:
        self._drain_signals()

    # -- start ---------------------------------------------------------------

    def start(self, path, args, *, environment, user=None, group=None) -> ProcessRecord:
        if not os.path.isabs(path):
            raise StartError(f"cannot execute {path}: the path must be absolute")
        program = os.path.basename(path)
        name = f"{self.unit_prefix}{unit_name_part(program)}-{secrets.token_hex(4)}.service"
        argv = [os.fsencode(path), *map(os.fsencode, args)]
        properties = {
            b"Description": _describe_command(self.instance, path, args),
            b"Slice": self.slice.encode(),
            b"ExecStart": [(argv[0], [_escape_env_expansion(arg) for arg in argv], False)],
            b"Type": b"exec",                   # the job ends once the program is exec'd
            b"RemainAfterExit": True,           # the exit status stays in systemd, also across a PM crash
            b"KillMode": b"control-group",
            # systemd's own stops (unit failed, collection) give the tree as long as our ladder
            b"TimeoutStopUSec": int(max(1.0, sum(w for _, w in self.stop_ladder)) * 1e6),
            b"Environment": [f"{key}={value}".encode() for key, value in environment.items()],
            b"StandardOutput": b"journal",
            b"StandardError": b"journal",
            b"SyslogIdentifier": program.encode(),
        }
        if user:
            properties[b"User"] = user.encode()
        if group:
            properties[b"Group"] = group.encode()
        unit = _UnitHandle(name, b"")
        self._starting[unit.path] = {}
        try:
            job = self._start_transient_unit(unit, properties, path)
            result = self._wait_for_job(job)
            service = self._starting[unit.path]
            if b"ExecMainPID" not in service or b"ExecMainCode" not in service:
                service = self._read_service_or_none(unit.path) or {}
        finally:
            self._starting.pop(unit.path, None)
        pid, code, status = (service.get(key, 0)
                             for key in (b"ExecMainPID", b"ExecMainCode", b"ExecMainStatus"))
        if result != b"done" and (pid == 0 or (code == CLD_EXITED and status in SETUP_FAILURE_RANGE)):
            self._discard_failed_unit(unit)
            raise StartError(self._start_failure_sentence(path, user, group, result, status))
        try:
            unit.invocation_id = self._invocation_id(unit.path)
        except DBusError:
            pass   # the unit ended and was collected already; nothing will be signalled
        record = ProcessRecord(pid=pid, path=path, args=list(args), unit=name,
                               started_at=service.get(b"ExecMainStartTimestamp", 0) / 1e6 or time.time())
        tracked = self._track(record, unit)
        self._pid_by_path[unit.path] = pid
        if code != 0:   # it already ended (a quick program)
            self._record_exit(tracked, service)
        log.info("process %d (%s) started as %s", pid, path, name)
        return record

    def _start_transient_unit(self, unit: _UnitHandle, properties: dict, path: str) -> bytes:
        args = (apply_signature(b"ss", [unit.bname, b"fail"]) + signature_array(properties)
                + [(ord(b"a"), b"(sa(sv))"), (-1, None)])
        try:
            return self._calls.call_method(SYSTEMD, MANAGER_PATH, MANAGER, b"StartTransientUnit", args).body
        except DBusError as error:
            raise StartError(f"systemd refused to start {path}: {dbus_error_text(error)}") from error

    def _wait_for_job(self, job: bytes) -> bytes:
        self._awaited_job, self._job_result = job, None
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while True:
                self._drain_signals()
                if self._job_result is not None:
                    return self._job_result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return b"timeout"
                select.select([self._signal_fd], [], [], remaining)
        finally:
            self._awaited_job = None

    @staticmethod
    def _start_failure_sentence(path, user, group, result: bytes, status: int) -> str:
        if status == EXIT_EXEC:
            return f"cannot execute {path}: {describe_exec_failure(path)}"
        if status == EXIT_USER:
            return f"cannot run {path} as user {user!r}: the user cannot be used"
        if status == EXIT_GROUP:
            return f"cannot run {path} as group {group!r}: the group cannot be used"
        if status in SETUP_FAILURE_RANGE:
            return f"cannot start {path}: systemd failed to set up the process (status {status})"
        return f"cannot start {path}: the systemd job ended with '{result.decode()}'"

    def _discard_failed_unit(self, unit: _UnitHandle) -> None:
        for method, signature, values in ((b"StopUnit", b"ss", (unit.bname, b"replace")),
                                          (b"ResetFailedUnit", b"s", (unit.bname,))):
            try:
                self._manager(method, signature, *values)
            except DBusError as error:
                log.debug("discarding %s: %s", unit.name, dbus_error_text(error))   # already stopped or gone

    # -- stop ladder hooks ---------------------------------------------------

    def _signal_tree(self, tracked: TrackedProcess, signum: int) -> None:
        unit = tracked.handle
        try:
            # a unit name is never reused by us; the InvocationID proves it is still the same run
            if self._invocation_id(unit.path) != unit.invocation_id:
                log.warning("%s is a different run now; not signalling it", unit.name)
                return
            self._manager(b"KillUnit", b"ssi", unit.bname, b"all", signum)
        except DBusError as error:
            # no process left, or the unit is gone
            log.debug("KillUnit %s: %s", unit.name, dbus_error_text(error))

    def _tree_alive(self, tracked: TrackedProcess) -> bool:
        try:
            return bool(self._manager(b"GetUnitProcesses", b"s", tracked.handle.bname))
        except DBusError:
            return False

    def _collect(self, tracked: TrackedProcess) -> None:
        unit = tracked.handle
        try:
            state = self._calls.get_property(SYSTEMD, unit.path, UNIT, b"ActiveState", b"s")
            if state == b"failed":
                self._manager(b"ResetFailedUnit", b"s", unit.bname)
            elif state != b"inactive":
                self._manager(b"StopUnit", b"ss", unit.bname, b"replace")
        except DBusError as error:
            log.debug("collecting %s: %s", unit.name, dbus_error_text(error))

    # -- reconciliation and adoption -----------------------------------------

    def _our_units(self) -> list:
        """(name, description, load, active, sub, following, path, ...) of this instance's services."""
        pattern = f"{self.unit_prefix}*.service".encode()
        return self._manager(b"ListUnitsByPatterns", b"asas", [], [pattern]) or []

    def _next_reconcile(self) -> float | None:
        return self._reconcile_due if self._pid_by_path else None

    def _reconcile(self, now: float) -> None:
        self._drain_signals()
        if now < self._reconcile_due or not self._pid_by_path:
            return
        self._reconcile_due = now + self.reconcile_interval_s
        sub_states = {entry[6]: entry[4] for entry in self._our_units()}
        for unit_path, pid in list(self._pid_by_path.items()):
            if sub_states.get(unit_path) != b"running":
                log.debug("reconcile: pid %d has sub-state %s", pid, sub_states.get(unit_path))
                service = self._read_service_or_none(unit_path)
                if service is None or service.get(b"ExecMainCode", 0) != 0:
                    self._record_exit(self._table[pid], service)

    def adopt(self) -> list[ProcessRecord]:
        adopted = []
        known = {tracked.handle.path for tracked in self._table.values()}
        # ended runs first: should a running program have reused a pid, its record wins
        for entry in sorted(self._our_units(), key=lambda entry: entry[4] == b"running"):
            name, unit_path = entry[0].decode(), entry[6]
            if unit_path in known:
                continue
            try:
                service = self._service_properties(unit_path)
                invocation_id = self._invocation_id(unit_path)
            except DBusError:
                continue   # collected since it was listed
            if not service.get(b"ExecMainPID") or not service.get(b"ExecStart"):
                continue   # never forked: nothing to serve
            command = _command_from_description(self.instance, entry[1])
            if command is None:   # not written by this backend: ExecStart is the best we have
                exec_path, argv = service[b"ExecStart"][0][0], service[b"ExecStart"][0][1]
                command = [os.fsdecode(exec_path),
                           *(os.fsdecode(_unescape_env_expansion(arg)) for arg in argv[1:])]
            record = ProcessRecord(pid=service[b"ExecMainPID"], path=command[0], args=command[1:],
                                   unit=name,
                                   started_at=service.get(b"ExecMainStartTimestamp", 0) / 1e6)
            if service[b"ExecMainCode"] != 0:
                _apply_exit(record, service)   # history, not news: not reported by process_events()
            self._track(record, _UnitHandle(name, invocation_id))
            if record.running:
                self._pid_by_path[unit_path] = record.pid
            adopted.append(record)
        log.info("adopted %d unit(s) of instance %s", len(adopted), self.instance)
        return adopted

    def close(self, stop_all: bool) -> None:
        if stop_all:
            self._stop_all_and_wait(lambda timeout: select.select([self._signal_fd], [], [], timeout))
        self._signals.close()
        self._calls.close()
