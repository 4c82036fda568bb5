"""Logging for the daemons (PM, HUB): journal, plain stderr, syslog or a file.

Under systemd (stderr is the stream named by JOURNAL_STREAM) every line
carries the sd-daemon `<N>` priority prefix, so `journalctl -p warning`
filters by level and journald adds the timestamp. Elsewhere the lines are
plain, with a timestamp. Daemonized hosts without systemd log to syslog
or to a file.
"""

import logging
import logging.handlers
import os
import sys

# logging level -> syslog priority (sd-daemon.h SD_CRIT .. SD_DEBUG)
SYSLOG_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
DEBUG_PRIORITY = 7
SYSLOG_SOCKET = "/dev/log"
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"


def syslog_priority(levelno: int) -> int:
    for threshold, priority in SYSLOG_PRIORITIES:
        if levelno >= threshold:
            return priority
    return DEBUG_PRIORITY


def stderr_is_journal(environ=os.environ) -> bool:
    """True when stderr is the journal stream systemd gave us (not one a child inherited and redirected)."""
    stream = environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    try:
        status = os.fstat(sys.stderr.fileno())
        return (status.st_dev, status.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):
        return False


class JournalFormatter(logging.Formatter):
    """Prefixes every line of another formatter's text (tracebacks too) with `<priority>`,
    which journald strips and keeps as the entry's priority."""

    def __init__(self, inner: logging.Formatter | None = None):
        super().__init__()
        self.inner = inner or logging.Formatter(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).splitlines())


def setup_logging(level: str | int = "INFO", *, log_file: str | None = None,
                  use_syslog: bool = False, ident: str = "b0-pm") -> logging.Handler:
    """Route the root logger to one destination; returns its handler.

    Call it after entering any DaemonContext (that closes descriptors)."""
    if log_file:
        handler = logging.handlers.WatchedFileHandler(log_file)
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    elif use_syslog:
        handler = logging.handlers.SysLogHandler(address=SYSLOG_SOCKET)
        handler.ident = f"{ident}[{os.getpid()}]: "
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    elif stderr_is_journal():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JournalFormatter())
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    level = level.upper() if isinstance(level, str) else level
    handler.setLevel(level)  # also filters node loggers routed here
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def route_node_logger(node_logger: logging.Logger) -> None:
    """A b0 node's logger prints to stderr itself (b0 format, B0_CONSOLE_LOGLEVEL): give
    those lines journal priorities, or send them where setup_logging() sends the rest."""
    destination = logging.getLogger().handlers
    if not destination:
        return   # setup_logging() was not called: the node keeps its own console
    console = [handler for handler in node_logger.handlers
               if type(handler) is logging.StreamHandler and handler.stream is sys.stderr]
    if getattr(destination[0], "stream", None) is sys.stderr:
        if isinstance(destination[0].formatter, JournalFormatter):
            for handler in console:
                handler.setFormatter(JournalFormatter(handler.formatter))
        return
    for handler in console:
        node_logger.removeHandler(handler)
        for target in destination:
            node_logger.addHandler(target)
