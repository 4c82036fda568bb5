"""`b0-pm resolver`: a b0 resolver that C++ nodes use unchanged.

Settings, strongest first: --port / --minimum-heartbeat-interval (the
b0_resolver options), then B0_RESOLVER_PORT and B0_CONSOLE_LOGLEVEL, then
the configuration file ([resolver], log_level, max_message_bytes), then
the defaults. The host id follows the PM's rule: the file's host_id, else
B0_HOST_ID, else the hostname.
"""

import os
import sys

EXIT_FAILURE = 1
EXIT_USAGE = 2


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "resolver", help="run a b0 resolver (name service, topic proxy, graph, liveness)",
        description="Run a b0 resolver, a drop-in for b0_resolver. Serves `resolv` on "
                    "tcp://*:PORT, forwards topics, publishes `graph` and drops nodes whose "
                    "heartbeats stop.")
    parser.add_argument("--port", type=int, default=None,
                        help="listen port (default: $B0_RESOLVER_PORT, else [resolver] port, else 22000)")
    parser.add_argument("-o", "--minimum-heartbeat-interval", type=int, metavar="USEC", default=None,
                        help="microseconds; nodes silent longer are dropped; 0 disables "
                             "(default: [resolver] minimum_heartbeat_interval_seconds, else 30000000)")
    parser.add_argument("--config", dest="config_file", metavar="FILE", default=None,
                        help="configuration file (default /etc/b0-pm/b0-pm.toml, if it exists)")
    parser.set_defaults(func=run, parser=parser)


def run(args) -> int:
    from b0_pm import config

    try:
        cfg = config.load_file(args.config_file or config.DEFAULT_CONFIG_FILE, must_exist=bool(args.config_file))
    except config.ConfigError as exc:
        print(f"b0-pm resolver: {exc}", file=sys.stderr)
        return EXIT_USAGE
    port = args.port
    if port is None:
        text = os.environ.get("B0_RESOLVER_PORT", "")
        if text and not text.isdecimal():
            args.parser.error(f"B0_RESOLVER_PORT is not a port number: {text!r}")
        port = int(text) if text else cfg.resolver.port
    if not 0 < port < 65536:
        args.parser.error(f"port must be 1..65535, got {port}")
    interval_us = args.minimum_heartbeat_interval
    if interval_us is None:
        interval_us = round(cfg.resolver.minimum_heartbeat_interval_seconds * 1_000_000)
    if interval_us < 0:
        args.parser.error("--minimum-heartbeat-interval must be >= 0")

    from b0_pm.b0.resolver import Resolver

    try:
        resolver = Resolver(port=port, minimum_heartbeat_interval_us=interval_us,
                            host_id=cfg.host_id or None,
                            max_message_size=cfg.max_message_bytes, log_level=cfg.log_level)
    except ValueError as exc:  # B0_CONSOLE_LOGLEVEL
        print(f"b0-pm resolver: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        resolver.start()
    except OSError as exc:
        print(f"b0-pm resolver: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        resolver.run()
    finally:
        resolver.close()
    return 0
