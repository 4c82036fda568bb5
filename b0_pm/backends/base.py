"""What every process backend promises the PM node: records, errors, the stop
ladder and the retention of exit records.

Times: `started_at`/`ended_at` are epoch seconds (for people and replies);
deadlines (`tick(now)`) are `time.monotonic()` seconds.
"""

import errno
import logging
import os
import signal
import stat
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

DEFAULT_RETENTION_S = 600.0
# BlueZero's ladder (spec 7.4), with the SIGKILL step that the original never reached
DEFAULT_STOP_LADDER = ((signal.SIGINT, 5.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0))


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StartError(Exception):
    """The program could not be started; str() is a sentence for the reply."""


class BackendLost(Exception):
    """The backend can no longer see or control its programs (systemd's bus went away).

    Raised by process_events() and tick(). The PM should exit with an error:
    systemd restarts it, and adopt() takes the programs over again."""


class NotManaged(Exception):
    """The pid is not (or no longer) managed by this backend."""


def describe_exec_failure(path: str, error_number: int | None = None) -> str:
    """Why exec(path) failed, in words, from what the file looks like now (and the errno if known)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "no such file or directory"
    except OSError as error:
        return (error.strerror or "cannot be read").lower()
    if stat.S_ISDIR(info.st_mode):
        return "is a directory"
    if not os.access(path, os.X_OK):
        return "permission denied (not executable)"
    if error_number == errno.EACCES:
        # executable for the PM, refused for the user it runs programs as (a directory on the way)
        return "permission denied"
    # it exists and is executable: the kernel refused its format, or its #! interpreter is missing
    return "exec format error or missing interpreter"


@dataclass
class ProcessRecord:
    pid: int
    path: str
    args: list[str]
    unit: str | None          # systemd unit name, None on the local backend
    started_at: float         # epoch seconds
    running: bool = True
    exit_code: int | None = None   # exit status, or -N for death by signal N
    signal: int | None = None      # N when killed by a signal
    core_dumped: bool = False
    ended_at: float | None = None
    stop_requested: bool = False

    def mark_exited(self, *, status: int | None = None, killed_by: int | None = None,
                    core_dumped: bool = False, ended_at: float | None = None) -> None:
        """Record the end: a normal exit with `status`, or death by signal `killed_by`."""
        self.running = False
        self.ended_at = ended_at if ended_at else time.time()
        if killed_by is not None:
            self.exit_code, self.signal, self.core_dumped = -killed_by, killed_by, core_dumped
        else:
            self.exit_code, self.signal, self.core_dumped = status, None, False


@dataclass
class _Stopping:
    """Where a stop is on the ladder: the next step to take, and when."""
    next_step: int
    due: float


@dataclass
class TrackedProcess:
    record: ProcessRecord
    stopping: _Stopping | None = None
    forget_at: float | None = None   # monotonic; set once the program has ended
    handle: object = None   # backend specific: the unit (systemd), the Popen and pidfd (local)


class Backend:
    """Shared bookkeeping: the table of records, the stop ladder and retention.

    A subclass starts programs and detects their end, and provides
    _signal_tree(), _tree_alive(), _collect() and _reconcile()."""

    def __init__(self, *, retention_s: float = DEFAULT_RETENTION_S,
                 stop_ladder=DEFAULT_STOP_LADDER):
        if not stop_ladder:
            raise ValueError("the stop ladder needs at least one signal")
        self.retention_s = float(retention_s)
        self.stop_ladder = tuple((int(sig), float(wait_s)) for sig, wait_s in stop_ladder)
        self._table: dict[int, TrackedProcess] = {}
        self._ended: list[ProcessRecord] = []   # ended since the last process_events()

    # -- the contract ------------------------------------------------------

    def start(self, path: str, args: list[str], *, environment: dict[str, str],
              user: str | None = None, group: str | None = None) -> ProcessRecord:
        raise NotImplementedError

    def status(self, pid: int) -> ProcessRecord | None:
        tracked = self._table.get(pid)
        return tracked.record if tracked else None

    def running_pids(self) -> list[int]:
        return sorted(pid for pid, tracked in self._table.items() if tracked.record.running)

    def stop(self, pid: int) -> ProcessRecord:
        """Begin the ladder on the program's whole tree; returns at once.

        Stopping an ended program succeeds and does nothing. A repeated stop
        keeps the ladder where it is (BlueZero restarted it, so SIGKILL never came)."""
        tracked = self._table.get(pid)
        if tracked is None:
            raise NotManaged(f"PID {pid} is not managed by this process manager")
        record = tracked.record
        if not record.running or tracked.stopping is not None:
            return record
        record.stop_requested = True
        tracked.stopping = _Stopping(next_step=0, due=time.monotonic())
        self._advance_ladder(tracked, time.monotonic())
        return record

    def adopt(self) -> list[ProcessRecord]:
        return []

    def fileno(self) -> int | None:
        raise NotImplementedError

    def process_events(self) -> list[ProcessRecord]:
        """Records that ended since the last call (each reported once)."""
        self._poll_exits()
        ended, self._ended = self._ended, []
        return ended

    def tick(self, now: float) -> float | None:
        """Drive ladder steps and retention; returns the next monotonic deadline."""
        self._reconcile(now)
        deadlines = []
        for pid, tracked in list(self._table.items()):
            if tracked.stopping is not None and now >= tracked.stopping.due:
                self._advance_ladder(tracked, now)
            if tracked.forget_at is not None and now >= tracked.forget_at and tracked.stopping is None:
                self._collect(tracked)
                del self._table[pid]
                log.debug("forgot the exit record of pid %d", pid)
                continue
            if tracked.stopping is not None:
                deadlines.append(tracked.stopping.due)
            if tracked.forget_at is not None:
                deadlines.append(tracked.forget_at)
        reconcile_at = self._next_reconcile()
        if reconcile_at is not None:
            deadlines.append(reconcile_at)
        if self._ended:
            deadlines.append(now)   # exits read from the bus while starting await process_events()
        return min(deadlines) if deadlines else None

    def close(self, stop_all: bool) -> None:
        raise NotImplementedError

    # -- shared helpers for subclasses -------------------------------------

    def _track(self, record: ProcessRecord, handle) -> TrackedProcess:
        previous = self._table.get(record.pid)
        if previous is not None:
            # the pid was reused: the older run's exit record gives way (and its unit is released)
            self._collect(previous)
        tracked = TrackedProcess(record=record, handle=handle)
        self._table[record.pid] = tracked
        if not record.running:
            self._retain(tracked, time.monotonic())
        return tracked

    def _retain(self, tracked: TrackedProcess, now: float) -> None:
        ended_ago = max(0.0, time.time() - (tracked.record.ended_at or time.time()))
        tracked.forget_at = now + max(0.0, self.retention_s - ended_ago)

    def _ended_now(self, tracked: TrackedProcess) -> None:
        """Called by a subclass right after record.mark_exited()."""
        record = tracked.record
        self._retain(tracked, time.monotonic())
        self._ended.append(record)
        log.info("process %d (%s) ended with exit code %s", record.pid, record.path, record.exit_code)

    def _advance_ladder(self, tracked: TrackedProcess, now: float) -> None:
        stopping = tracked.stopping
        if stopping.next_step > 0 and not self._tree_alive(tracked):
            tracked.stopping = None
            return
        if stopping.next_step >= len(self.stop_ladder):
            tracked.stopping = None   # every step was taken; what SIGKILL leaves is not ours to fix
            return
        signum, wait_s = self.stop_ladder[stopping.next_step]
        log.info("sending %s to the tree of process %d", _signal_name(signum), tracked.record.pid)
        self._signal_tree(tracked, signum)
        stopping.next_step += 1
        stopping.due = now + wait_s

    def _stop_all_and_wait(self, wait_for_events) -> None:
        """close(stop_all=True): run every ladder to its end, bounded by its length."""
        for pid in self.running_pids():
            self.stop(pid)
        give_up = time.monotonic() + sum(wait_s for _, wait_s in self.stop_ladder) + 2.0
        while True:
            now = time.monotonic()
            deadline = self.tick(now)
            if now >= give_up or not any(t.stopping is not None for t in self._table.values()):
                return
            wait_for_events(max(0.0, min(deadline or give_up, give_up) - now))
            self.process_events()

    # -- what a subclass provides -----------------------------------------

    def _poll_exits(self) -> None:
        raise NotImplementedError

    def _signal_tree(self, tracked: TrackedProcess, signum: int) -> None:
        raise NotImplementedError

    def _tree_alive(self, tracked: TrackedProcess) -> bool:
        raise NotImplementedError

    def _collect(self, tracked: TrackedProcess) -> None:
        """Release what the backend keeps for an ended program (systemd: the unit)."""

    def _reconcile(self, now: float) -> None:
        """Cheap check that no exit was missed."""

    def _next_reconcile(self) -> float | None:
        return None
