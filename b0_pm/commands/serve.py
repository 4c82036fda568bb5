"""`b0-pm serve`: this host's process manager node (what b0-pm@HOST.service runs)."""

import os
import signal
import sys

from b0_pm import config

EXIT_USAGE = 2
EXIT_FAILURE = 1


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="run this host's process manager node",
        description="Run the process manager of this host, a drop-in for b0_process_manager: "
                    "node process_manager@HOST with service process_manager@HOST/control, "
                    "beacons on process_manager/beacon, start/exit events on "
                    "process_manager/events. Programs run as transient systemd services when "
                    "systemd is reachable, else as plain child processes.")
    config.add_arguments(parser, "pm")
    parser.add_argument("--allow", dest="config_pm_allowed_directories", action="append",
                        metavar="DIR", help="same as --allowed-directory")
    daemon = parser.add_argument_group("without systemd")
    daemon.add_argument("--daemon", action="store_true",
                        help="detach into the background (python-daemon); refused under systemd, "
                             "whose units run the PM in the foreground")
    daemon.add_argument("--pidfile", metavar="FILE", help="with --daemon: write the pid here (locked)")
    daemon.add_argument("--log-file", metavar="FILE",
                        help="log to FILE instead of stderr (with --daemon: instead of syslog)")
    parser.set_defaults(func=run)


def run(args) -> int:
    try:
        cfg = config.load(args)
    except config.ConfigError as exc:
        print(f"b0-pm serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from b0_pm.notify import under_systemd

    if args.pidfile and not args.daemon:
        print("b0-pm serve: --pidfile needs --daemon", file=sys.stderr)
        return EXIT_USAGE
    if args.daemon and under_systemd():
        print("b0-pm serve: --daemon refused: this runs under systemd, which expects the service in "
              "the foreground (Type=notify); drop --daemon", file=sys.stderr)
        return EXIT_USAGE
    from b0_pm.b0.node import console_level

    # precedence: --log-level, then $B0_CONSOLE_LOGLEVEL (as for C++ nodes), then the file;
    # the node's console logger reads the variable, and launched nodes inherit it
    if args.config_log_level is not None:
        os.environ["B0_CONSOLE_LOGLEVEL"] = args.config_log_level
    os.environ.setdefault("B0_CONSOLE_LOGLEVEL", cfg.log_level)
    try:
        level = console_level(os.environ["B0_CONSOLE_LOGLEVEL"])
    except ValueError as exc:
        print(f"b0-pm serve: B0_CONSOLE_LOGLEVEL: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # the daemon changes directory to /, so relative paths are made absolute first
    log_file = os.path.abspath(args.log_file) if args.log_file else None
    if not args.daemon:
        return serve(cfg, level, log_file=log_file)
    from b0_pm.logsetup import SYSLOG_SOCKET

    if log_file is None and not os.path.exists(SYSLOG_SOCKET):
        print(f"b0-pm serve: --daemon logs to syslog, but {SYSLOG_SOCKET} does not exist here; "
              f"give --log-file FILE", file=sys.stderr)
        return EXIT_USAGE
    return serve_daemonized(cfg, level, log_file=log_file,
                            pidfile=os.path.abspath(args.pidfile) if args.pidfile else None)


def serve_daemonized(cfg, level: int, *, log_file: str | None, pidfile: str | None) -> int:
    import daemon
    import daemon.pidfile

    lock = None
    if pidfile:
        lock = daemon.pidfile.TimeoutPIDLockFile(pidfile, acquire_timeout=0)
        # checked here, while stderr is still the terminal: the daemon's own attempt is silent
        if lock.is_locked():
            owner = lock.read_pid()
            if owner and os.path.exists(f"/proc/{owner}"):
                print(f"b0-pm serve: already running as pid {owner} (pidfile {pidfile})", file=sys.stderr)
                return EXIT_FAILURE
            print(f"b0-pm serve: removing the stale pidfile {pidfile} (pid {owner} is gone)", file=sys.stderr)
            lock.break_lock()
    with daemon.DaemonContext(pidfile=lock, umask=0o022):
        # everything that owns a descriptor (zmq, D-Bus, syslog, sd_notify) is created after the fork
        return serve(cfg, level, log_file=log_file, use_syslog=log_file is None)


def serve(cfg, level: int, *, log_file: str | None = None, use_syslog: bool = False) -> int:
    import logging

    from b0_pm.b0.node import ResolverError
    from b0_pm.logsetup import setup_logging
    from b0_pm.manager import ProcessManager, resolve_host_id
    from b0_pm.notify import Notifier

    setup_logging(level, log_file=log_file, use_syslog=use_syslog, ident="b0-pm")
    notifier = Notifier()
    host_id = resolve_host_id(cfg)
    try:
        backend, read_log = make_backend(cfg, host_id)
    except BackendUnavailable as exc:
        logging.getLogger("b0_pm.serve").error("%s", exc)
        return EXIT_FAILURE
    manager = ProcessManager(cfg, backend, host_id=host_id, read_log=read_log, notifier=notifier)
    # until the loop takes SIGTERM over, it ends the start-up like Ctrl-C: cleanly, not abruptly
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        manager.run()
    except (TimeoutError, ResolverError, OSError) as exc:
        manager.log.error("cannot serve: %s", exc)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        manager.log.info("Interrupted while starting: shut down.")
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


class BackendUnavailable(Exception):
    """The configured backend cannot be used here; the message says why."""


# config's names -> select_backend's kinds (None: the best this host offers)
BACKEND_KINDS = {"auto": None, "systemd": "system", "user": "user", "local": "local"}


def make_backend(cfg, host_id: str):
    """The configured backend and its log reader (None when it keeps no journal)."""

    from b0_pm.backends import select_backend
    from b0_pm.backends.local import LocalBackend
    from b0_pm.protocol import JournalLogReader

    pm = cfg.pm
    ladder = ((signal.SIGINT, pm.stop_signal_grace_seconds), (signal.SIGTERM, pm.term_grace_seconds),
              (signal.SIGKILL, 0.0))
    try:
        backend = select_backend(host_id, BACKEND_KINDS[pm.backend], retention_s=pm.retention_seconds,
                                 stop_ladder=ladder)
    except RuntimeError as exc:
        raise BackendUnavailable(str(exc)) from exc
    if isinstance(backend, LocalBackend):
        return backend, None
    return backend, JournalLogReader(user_manager=backend.user_mode)
