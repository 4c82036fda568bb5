"""`b0-pm call`: a drop-in for b0_service_call.

Reads stdin to EOF, sends it verbatim to the service, prints
`Content-type: <reply type>` (only with -c) and the raw reply payload.
"""

import sys

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3  # also: service not registered (as the other client commands)
EXIT_INTERRUPTED = 130


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "call", help="call a b0 service with stdin as the request (like b0_service_call)",
        description="Send standard input verbatim to a b0 service and print the raw reply.")
    parser.add_argument("service", nargs="?", help="service name")
    parser.add_argument("-s", "--service-name", dest="service_option", metavar="SERVICE",
                        help="service name (like b0_service_call)")
    parser.add_argument("-c", "--content-type", default="",
                        help="request content type; also prints the reply's type first")
    parser.add_argument("-n", "--node-name", default="b0_service_call", help="node name (default b0_service_call)")
    parser.add_argument("--timeout", type=float, metavar="S",
                        help="give up after S seconds (exit 3); default: wait forever")
    parser.set_defaults(func=run, parser=parser)


def run(args) -> int:
    if args.service and args.service_option and args.service != args.service_option:
        args.parser.error("give the service name once (positional or -s)")
    service = args.service or args.service_option
    if not service:
        args.parser.error("a service name is required")
    if args.timeout is not None and args.timeout <= 0:
        args.parser.error("--timeout must be positive")

    from b0_pm.b0.errors import MessageError
    from b0_pm.b0.node import Node, ResolverError, ServiceNotFound

    payload = sys.stdin.buffer.read()
    try:
        node = Node(args.node_name, announce_timeout=args.timeout,
                    resolver_timeout=args.timeout, shutdown_timeout=min(args.timeout or 3.0, 3.0))
    except ValueError as exc:  # B0_CONSOLE_LOGLEVEL
        print(f"b0-pm call: {exc}", file=sys.stderr)
        return EXIT_USAGE
    with node:
        try:
            client = node.service_client(service)
            node.start()
            reply = _call_while_spinning(node, client, payload, args.content_type, args.timeout)
            if reply is None:
                print(f"b0-pm call: interrupted while waiting for service '{service}'", file=sys.stderr)
                return EXIT_INTERRUPTED
        except KeyboardInterrupt:
            print(f"b0-pm call: interrupted while calling service '{service}'", file=sys.stderr)
            return EXIT_INTERRUPTED
        except TimeoutError as exc:
            print(f"b0-pm call: {_timeout_message(exc, service, args.timeout)}", file=sys.stderr)
            return EXIT_TIMEOUT
        except ServiceNotFound:
            print(f"b0-pm call: service '{service}' is not registered with the resolver at "
                  f"{node.resolver_address}", file=sys.stderr)
            return EXIT_TIMEOUT
        except ResolverError as exc:
            print(f"b0-pm call: {exc} (resolver {node.resolver_address})", file=sys.stderr)
            return EXIT_FAILURE
        except MessageError as exc:
            print(f"b0-pm call: bad reply from service '{service}': {exc}", file=sys.stderr)
            return EXIT_FAILURE
    out = sys.stdout.buffer
    if args.content_type:
        out.write(f"Content-type: {reply.content_type}\n".encode("utf-8"))
    out.write(reply.payload)
    out.flush()
    return 0


def _call_while_spinning(node, client, payload: bytes, content_type: str, timeout: float | None):
    """The reply envelope, or None if SIGINT/SIGTERM came first; raises what the call raised.

    The loop keeps running meanwhile, so heartbeats go on during a long wait.
    """
    outcome = []

    def done(result) -> None:
        outcome.append(result)
        node.loop.stop()

    client.call_async(payload, content_type, timeout, done)
    node.loop.run()
    if not outcome:
        return None
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def _timeout_message(exc: TimeoutError, service: str, timeout: float) -> str:
    if "resolver" in str(exc):
        return f"cannot call service '{service}': {exc}"
    return f"service '{service}' did not reply within {timeout:g} s"
