"""Process backends (see the "Contract: backends" section of docs/ARCHITECTURE.md).

select_backend() picks the best one this host offers: the systemd system
manager, else the user manager, else plain children. pystemd is imported
only when a systemd backend is probed or used.
"""

import logging
import os

log = logging.getLogger(__name__)

BACKEND_KINDS = ("system", "user", "local")
BACKEND_DESCRIPTIONS = {"system": "the systemd system manager", "user": "the systemd user manager",
                        "local": "children of the PM (no systemd)"}


def _systemd_unavailable(user_mode: bool) -> str | None:
    """Why the (system or user) manager cannot be used, or None if it can."""
    try:
        from pystemd.dbusexc import DBusBaseError as DBusError   # DBusError itself is a factory function
        from pystemd.dbuslib import DBus

        from b0_pm.backends.systemd import dbus_error_text
    except ImportError:
        return "pystemd is not installed"
    bus = DBus(user_mode=user_mode)
    try:
        bus.open()
    except DBusError as error:
        return f"its bus cannot be opened: {dbus_error_text(error)}"
    try:
        version = bus.get_property(b"org.freedesktop.systemd1", b"/org/freedesktop/systemd1",
                                   b"org.freedesktop.systemd1.Manager", b"Version", b"s")
    except DBusError as error:
        return f"systemd does not answer on its bus: {dbus_error_text(error)}"
    finally:
        bus.close()
    log.debug("the %s manager answers: systemd %s", "user" if user_mode else "system", version.decode())
    return None


def _unavailable(kind: str, explicitly_asked: bool) -> str | None:
    if kind == "system":
        reason = _systemd_unavailable(user_mode=False)
        if reason is None and os.geteuid() != 0 and not explicitly_asked:
            # without a polkit rule the system manager takes units from root only
            return "not running as root (ask for it explicitly if a polkit rule allows us)"
        return reason
    if kind == "user":
        return _systemd_unavailable(user_mode=True)
    if kind == "local":
        if hasattr(os, "pidfd_open") and hasattr(os, "P_PIDFD"):
            return None
        return "pidfds are missing (needs Linux 5.4+ and Python 3.9+)"
    raise ValueError(f"unknown backend {kind!r}; choose one of {', '.join(BACKEND_KINDS)}")


def select_backend(instance: str, prefer: str | None = None, *, local_output: str = "stderr",
                   **ladder_and_retention):
    """The backend to run programs with: `prefer` if given (or fail), else the best available.

    ladder_and_retention: retention_s, stop_ladder (see base.Backend);
    local_output: where children of the local backend write ("stderr" or "null")."""
    kinds = [prefer] if prefer else list(BACKEND_KINDS)
    skipped = []
    for kind in kinds:
        reason = _unavailable(kind, explicitly_asked=prefer is not None)
        if reason is not None:
            skipped.append(f"{kind}: {reason}")
            continue
        if kind == "local":
            from b0_pm.backends.local import LocalBackend
            backend = LocalBackend(output=local_output, **ladder_and_retention)
        else:
            from b0_pm.backends.systemd import SystemdBackend
            backend = SystemdBackend(instance, user_mode=kind == "user", **ladder_and_retention)
        log.info("process backend: %s%s", BACKEND_DESCRIPTIONS[kind],
                 f" (skipped {'; '.join(skipped)})" if skipped else "")
        return backend
    raise RuntimeError("no process backend can be used: " + "; ".join(skipped))
