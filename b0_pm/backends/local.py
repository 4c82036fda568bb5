"""Programs as plain children of the PM, for hosts without systemd.

Each child leads its own session and process group, so the stop ladder
reaches its whole tree (killpg) and a Ctrl-C at the PM's terminal does not.
Exits are seen through one pidfd per child, gathered in an epoll fd that the
PM's loop polls. Output goes to the PM's stderr (output="stderr", the
default: under systemd that is the PM's journal) or to /dev/null
(output="null").

No adoption: children of a previous PM were re-parented when it died, and
only a parent can wait for a process, so their exit status cannot be learnt.
"""

import errno
import logging
import os
import select
import subprocess
import time

from b0_pm.backends.base import (Backend, ProcessRecord, StartError, TrackedProcess,
                                 describe_exec_failure)

log = logging.getLogger(__name__)


class _Child:
    def __init__(self, process: subprocess.Popen, pidfd: int):
        self.process = process
        self.pidfd = pidfd


class LocalBackend(Backend):
    def __init__(self, *, output: str = "stderr", **ladder_and_retention):
        super().__init__(**ladder_and_retention)
        if output not in ("stderr", "null"):
            raise ValueError(f"output must be 'stderr' or 'null', not {output!r}")
        self._output = 2 if output == "stderr" else subprocess.DEVNULL
        self._epoll = select.epoll()
        self._pid_by_pidfd: dict[int, int] = {}

    def fileno(self) -> int:
        return self._epoll.fileno()

    def start(self, path, args, *, environment, user=None, group=None) -> ProcessRecord:
        if not os.path.isabs(path):
            raise StartError(f"cannot execute {path}: the path must be absolute")
        try:
            process = subprocess.Popen(
                [path, *args], executable=path, env=dict(environment), stdin=subprocess.DEVNULL,
                stdout=self._output, stderr=self._output, start_new_session=True,
                user=user, group=group)
        except KeyError as error:   # pwd/grp lookups of unknown names
            raise StartError(f"cannot run {path} as {'user' if user else 'group'} "
                             f"{user or group!r}: no such {'user' if user else 'group'}") from error
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.EISDIR, errno.ENOTDIR):
                raise StartError(f"cannot execute {path}: {describe_exec_failure(path, error.errno)}") from error
            raise StartError(f"cannot start {path}: {error.strerror or error}") from error
        pidfd = os.pidfd_open(process.pid)
        self._epoll.register(pidfd, select.EPOLLIN)
        self._pid_by_pidfd[pidfd] = process.pid
        record = ProcessRecord(pid=process.pid, path=path, args=list(args), unit=None, started_at=time.time())
        self._track(record, _Child(process, pidfd))
        log.info("process %d (%s) started", process.pid, path)
        return record

    def _poll_exits(self) -> None:
        for pidfd, _events in self._epoll.poll(0):
            tracked = self._table[self._pid_by_pidfd[pidfd]]
            result = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
            if result is None:
                continue   # woken without an exit to collect
            self._epoll.unregister(pidfd)
            os.close(pidfd)
            del self._pid_by_pidfd[pidfd]
            if result.si_code == os.CLD_EXITED:
                tracked.record.mark_exited(status=result.si_status)
                tracked.handle.process.returncode = result.si_status
            else:
                tracked.record.mark_exited(killed_by=result.si_status,
                                           core_dumped=result.si_code == os.CLD_DUMPED)
                tracked.handle.process.returncode = -result.si_status
            # Popen must not reap this pid again later: it could be another child's by then
            self._ended_now(tracked)

    def _signal_tree(self, tracked: TrackedProcess, signum: int) -> None:
        # the group id is the child's pid; it is not reused while the group has members
        try:
            os.killpg(tracked.record.pid, signum)
        except ProcessLookupError:
            pass

    def _tree_alive(self, tracked: TrackedProcess) -> bool:
        self._poll_exits()   # a reaped leader leaves only the rest of its group
        try:
            os.killpg(tracked.record.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def close(self, stop_all: bool) -> None:
        if stop_all:
            self._stop_all_and_wait(lambda timeout: select.select([self._epoll.fileno()], [], [], timeout))
        for pidfd in self._pid_by_pidfd:
            os.close(pidfd)
        self._pid_by_pidfd.clear()
        self._epoll.close()
