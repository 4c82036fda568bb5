"""`b0-pm resolver`: a b0 resolver that C++ nodes use unchanged."""

import os
import sys

DEFAULT_PORT = 22000
DEFAULT_HEARTBEAT_INTERVAL_US = 30_000_000


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "resolver", help="run a b0 resolver (name service, topic proxy, graph, liveness)",
        description="Run a b0 resolver, a drop-in for b0_resolver. Serves `resolv` on "
                    "tcp://*:PORT, forwards topics, publishes `graph` and drops nodes whose "
                    "heartbeats stop.")
    parser.add_argument("--port", type=int, default=None,
                        help="listen port (default: $B0_RESOLVER_PORT or 22000)")
    parser.add_argument("-o", "--minimum-heartbeat-interval", type=int, metavar="USEC",
                        default=DEFAULT_HEARTBEAT_INTERVAL_US,
                        help="microseconds; nodes silent longer are dropped; 0 disables (default 30000000)")
    parser.set_defaults(func=run, parser=parser)


def run(args) -> int:
    port = args.port
    if port is None:
        text = os.environ.get("B0_RESOLVER_PORT", "")
        if text and not text.isdecimal():
            args.parser.error(f"B0_RESOLVER_PORT is not a port number: {text!r}")
        port = int(text) if text else DEFAULT_PORT
    if not 0 < port < 65536:
        args.parser.error(f"port must be 1..65535, got {port}")
    if args.minimum_heartbeat_interval < 0:
        args.parser.error("--minimum-heartbeat-interval must be >= 0")

    from b0_pm.b0.resolver import Resolver

    try:
        resolver = Resolver(port=port, minimum_heartbeat_interval_us=args.minimum_heartbeat_interval)
    except ValueError as exc:  # B0_CONSOLE_LOGLEVEL
        print(f"b0-pm resolver: {exc}", file=sys.stderr)
        return 2
    try:
        resolver.start()
    except OSError as exc:
        print(f"b0-pm resolver: {exc}", file=sys.stderr)
        return 1
    try:
        resolver.run()
    finally:
        resolver.close()
    return 0
