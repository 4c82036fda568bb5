"""`b0-pm hub`: the HUB that forwards requests to each host's process manager."""

import os
import sys
import time

from b0_pm import config

RESOLVER_TIMEOUT_S = 2.0
START_RETRY_S = 2.0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "hub", help="run the HUB (what the b0 GUI process manager talks to)",
        description="Run the process-manager HUB, a drop-in for b0_process_manager_hub: learns "
                    "every PM from its beacons, forwards {\"host_name\":H, ...} requests on "
                    "process_manager_hub/control to H's PM, and publishes "
                    "process_manager_hub/active_nodes.")
    config.add_arguments(parser, "hub")
    # Short spellings; same destinations, so they are checked like the long flags.
    parser.add_argument("--forward-timeout", dest="config_hub_forward_timeout_seconds", type=float,
                        metavar="S", help="same as --forward-timeout-seconds")
    parser.add_argument("--host-expiry", dest="config_hub_host_expiry_seconds", type=float,
                        metavar="S", help="same as --host-expiry-seconds")
    parser.set_defaults(func=run)


def run(args) -> int:
    try:
        cfg = config.load(args)
    except config.ConfigError as exc:
        print(f"b0-pm hub: {exc}", file=sys.stderr)
        return 2
    # The node's console logger reads the b0 variable; the environment wins over the file, as for C++ nodes.
    os.environ.setdefault("B0_CONSOLE_LOGLEVEL", cfg.log_level)

    from b0_pm.b0.node import Node, ResolverError
    from b0_pm.hub import HUB_NODE_NAME, HubNode
    from b0_pm.logsetup import route_node_logger, setup_logging
    from b0_pm.notify import Notifier

    setup_logging(cfg.log_level)
    notifier = Notifier()
    while True:
        # The HUB asks the resolver from its loop (new PMs, restarts): a stalled resolver must not stall it long.
        node = Node(HUB_NODE_NAME, resolver=cfg.resolver_address or None, host_id=cfg.host_id or None,
                    max_message_size=cfg.max_message_bytes, resolver_timeout=RESOLVER_TIMEOUT_S)
        route_node_logger(node.log)
        hub = HubNode(node, forward_timeout_s=cfg.hub.forward_timeout_seconds,
                      host_expiry_s=cfg.hub.host_expiry_seconds,
                      active_nodes_interval_s=cfg.hub.active_nodes_interval_seconds,
                      notifier=notifier)
        try:
            hub.start()
            break
        except ResolverError as exc:
            # A HUB killed without shutting down holds the service name until the resolver drops it (30-40 s).
            node.shutdown()
            message = f"{exc}; trying again in {START_RETRY_S:g} s"
            print(f"b0-pm hub: {message}", file=sys.stderr)
            notifier.status(message)
            time.sleep(START_RETRY_S)
        except (TimeoutError, OSError) as exc:
            print(f"b0-pm hub: cannot start: {exc}", file=sys.stderr)
            node.shutdown()
            return 1
    try:
        hub.spin()
    finally:
        hub.shutdown()
    return 0
