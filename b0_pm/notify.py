"""sd_notify for the daemons: READY, STATUS, WATCHDOG and STOPPING.

Outside systemd (no NOTIFY_SOCKET) every call is a no-op, so the nodes
call it unconditionally. Create the Notifier after entering any
DaemonContext: that closes every file descriptor it was not told about.
"""

import os

NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def under_systemd() -> bool:
    """True when this process is a systemd service (or run by systemd-run)."""
    return bool(os.environ.get("INVOCATION_ID") or os.environ.get("NOTIFY_SOCKET"))


class Notifier:
    """One datagram socket to $NOTIFY_SOCKET; each message is sent at most when it changes."""

    def __init__(self):
        self._notifier = None
        self._last_status = None
        self.watchdog_interval_s = self._watchdog_interval(os.environ)
        if os.environ.get("NOTIFY_SOCKET"):
            import sdnotify  # only needed under systemd; it reads $NOTIFY_SOCKET itself
            self._notifier = sdnotify.SystemdNotifier()
            if self._notifier.socket is not None:
                # a receiver that stops reading must cost a lost ping, never a hung node
                self._notifier.socket.setblocking(False)
        # like sd_notify(unset_environment=1): programs we start must not talk to our socket
        for name in NOTIFY_VARIABLES:
            os.environ.pop(name, None)

    @property
    def enabled(self) -> bool:
        return self._notifier is not None

    @staticmethod
    def _watchdog_interval(environ) -> float | None:
        """Half of WATCHDOG_USEC (sd_watchdog_enabled's rule), None when no watchdog is asked for."""
        watchdog_pid = environ.get("WATCHDOG_PID")
        if watchdog_pid and watchdog_pid != str(os.getpid()):
            return None  # the watchdog is meant for another process of the unit
        try:
            usec = int(environ.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        return usec / 2e6 if usec > 0 else None

    def _send(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)

    def ready(self, status: str | None = None) -> None:
        self._send("READY=1" if status is None else f"READY=1\nSTATUS={status}")
        if status is not None:
            self._last_status = status

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self._send(f"STATUS={text}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")
