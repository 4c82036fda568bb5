"""`b0-pm start|stop|status|list|hosts|logs`: the client commands.

Each command sends one request (stop --wait and logs -f poll) through
b0_pm.client.PMClient and prints the answer for a human, or the reply
object as one JSON line with --json. Exit status: 0 success, 1 refused or
failed, 2 usage error, 3 no answer within --timeout.
"""

import argparse
import json
import os
import signal
import sys
import time

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_NO_ANSWER = 3
EXIT_INTERRUPTED = 130  # the shell's 128 + SIGINT

# How often stop --wait and logs -f ask again: quick enough to feel live, light on the PM.
POLL_INTERVAL_S = 0.2
LOG_FOLLOW_INTERVAL_S = 0.5
# The most lines logs -f takes per poll (get_log's limit); more wait for the next poll.
LOG_FOLLOW_BATCH = 10000

EXIT_HELP = """
exit status: 0 success, 1 refused or failed, 2 usage error,
             3 no answer within --timeout
"""

START_EPILOG = """\
Start PATH with ARGS on a process manager and print its pid. PATH must be
absolute and inside one of the PM's allowed directories. Options go before
PATH; everything after PATH is passed to the program unchanged (a "--"
right after PATH, or before it, is dropped).

examples:
  b0-pm start /opt/b0/bin/camera -Tout=cam
  pid=$(b0-pm start --host robot1 /opt/b0/bin/lidar -- --rate 10)
  b0-pm start --env ROS_DOMAIN_ID=3 --user robot /opt/b0/bin/planner
  b0-pm start --json /opt/b0/bin/camera
      {"start_process":{"success":true,"pid":4242}}
"""

STOP_EPILOG = """\
Stop a process: SIGINT to its whole process tree, then SIGTERM, then
SIGKILL if it does not end. Without --wait the command returns as soon as
the PM has begun; with --wait it returns when the process has ended and
says how ("exited with status 3", "killed by signal SIGINT"), or exits
with status 3 if it still runs after --wait-timeout.

examples:
  b0-pm stop 4242
  b0-pm stop --wait --host robot1 4242
      pid 4242 killed by signal SIGINT
"""

STATUS_EPILOG = """\
Show whether a process is running, or how it ended ("exited with status
3", "killed by signal SIGSEGV"). The PM keeps the exit status of an ended
process for retention_seconds (default 600), then answers "no such pid".

examples:
  b0-pm status 4242
      pid 4242 running
  b0-pm status --json --host robot1 4242
      {"success":true,"query_process_status":{"success":true,"running":true}}
"""

LIST_EPILOG = """\
List the pids of running processes, one per line. --host '*' asks every
host the HUB knows and prints "HOST PID" lines.

examples:
  b0-pm list
  b0-pm list --host robot1
  b0-pm list --host '*'
"""

HOSTS_EPILOG = """\
List the hosts whose process managers the HUB currently hears, one per
line. Always goes through the HUB; with --host H, only H, and exit status
1 if the HUB does not hear it.

examples:
  b0-pm hosts
  b0-pm hosts --host robot1 >/dev/null && echo "robot1 is up"
  b0-pm hosts --json
"""

LOGS_EPILOG = """\
Print the last lines a process wrote to stdout and stderr, read by its PM
from the systemd journal (get_log). -f keeps printing new lines until
Ctrl-C. A PM running with the local backend has no journal and refuses.

examples:
  b0-pm logs 4242
  b0-pm logs -n 100 --host robot1 4242
  b0-pm logs -f 4242
"""


def register(subparsers):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", metavar="H",
                        help="go through the HUB to host H's process manager")
    common.add_argument("--json", action="store_true",
                        help="print the reply object as one JSON line")
    common.add_argument("--timeout", type=positive_float, default=5.0, metavar="S",
                        help="seconds to wait for an answer (default 5)")
    common.add_argument("--resolver", metavar="ADDR",
                        help="resolver address (default $B0_RESOLVER, else tcp://localhost:22000)")

    def add(name, summary, epilog, run):
        parser = subparsers.add_parser(
            name, parents=[common], help=summary, description=summary,
            epilog=epilog + EXIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.set_defaults(func=run)
        return parser

    start = add("start", "start a program on a process manager", START_EPILOG, run_start)
    start.add_argument("--env", action="append", default=[], metavar="K=V",
                       help="set an environment variable for the program (repeatable)")
    start.add_argument("--user", metavar="U", help="run the program as user U")
    start.add_argument("path", metavar="PATH", help="absolute path of the program")
    start.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                       help="arguments for the program")

    stop = add("stop", "stop a process", STOP_EPILOG, run_stop)
    stop.add_argument("--wait", action="store_true",
                      help="wait until the process has ended and say how")
    stop.add_argument("--wait-timeout", type=positive_float, default=30.0, metavar="S",
                      help="give up waiting after S seconds (default 30; exit 3)")
    stop.add_argument("pid", type=positive_int, metavar="PID")

    status = add("status", "show a process's state", STATUS_EPILOG, run_status)
    status.add_argument("pid", type=positive_int, metavar="PID")

    add("list", "list running processes", LIST_EPILOG, run_list)
    add("hosts", "list the hosts the HUB knows", HOSTS_EPILOG, run_hosts)

    logs = add("logs", "print a process's output", LOGS_EPILOG, run_logs)
    logs.add_argument("-n", "--lines", type=positive_int, default=10, metavar="N",
                      help="how many of the last lines (default 10)")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="keep printing new lines until interrupted")
    logs.add_argument("pid", type=positive_int, metavar="PID")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return int(text)


def run_start(args) -> int:
    environment = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            return usage_error(args, f"--env wants NAME=VALUE, got {item!r}")
        environment[name] = value
    program_args = list(args.args)
    # argparse keeps a "--" typed right after PATH in some Python versions and drops it in others.
    if program_args[:1] == ["--"]:
        program_args.pop(0)
    return run_one(args, lambda pm: pm.start(args.path, program_args,
                                             environment=environment, user=args.user),
                   lambda reply: str(reply.result["pid"]))


def run_stop(args) -> int:
    def stop(pm):
        reply = pm.stop(args.pid)
        if not args.wait:
            return reply
        return wait_until_ended(pm, args.pid, args.wait_timeout)

    def describe_stop(reply):
        if not args.wait:
            return f"pid {args.pid} stopping"
        return f"pid {args.pid} {describe(reply.result)}"
    return run_one(args, stop, describe_stop)


def run_status(args) -> int:
    return run_one(args, lambda pm: pm.status(args.pid),
                   lambda reply: f"pid {args.pid} {describe(reply.result)}")


def run_list(args) -> int:
    from b0_pm.client import ALL_HOSTS
    if args.host != ALL_HOSTS:
        return run_one(args, lambda pm: pm.list(),
                       lambda reply: "\n".join(str(pid) for pid in reply.result["pids"]))
    return run_one(args, lambda pm: pm.list(), describe_all_hosts, failures=failed_hosts)


def run_hosts(args) -> int:
    return run_one(args, lambda pm: pm.hosts(), describe_hosts)


def run_logs(args) -> int:
    if not args.follow:
        return run_one(args, lambda pm: pm.get_log(args.pid, args.lines),
                       lambda reply: "\n".join(reply.result["lines"]))
    return run_one(args, lambda pm: follow_log(pm, args), None)


def run_one(args, operation, describe_reply, failures=None) -> int:
    """Run operation(pm), print its reply, map failures to exit statuses.

    failures(reply), when given, lists what failed inside a successful reply
    (hosts that did not answer a host "*" request): printed, and exit 1.
    """
    from b0_pm.client import NoAnswer, PMClient, Refused
    command = f"b0-pm {args.command}"
    if args.host == "":
        return usage_error(args, "--host wants a host name (or '*')")
    # The client node's own log lines (a rename by the resolver, ...) are noise in a command's output.
    os.environ.setdefault("B0_CONSOLE_LOGLEVEL", "error")
    try:
        with PMClient(args.host, resolver=args.resolver, timeout=args.timeout) as pm:
            reply = operation(pm)
    except NoAnswer as exc:
        print(f"{command}: {exc}; {no_answer_hint(exc.service)}", file=sys.stderr)
        return EXIT_NO_ANSWER
    except WaitTimeout as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return EXIT_NO_ANSWER
    except Refused as exc:
        if args.json and exc.raw:
            print_json(exc.raw)
        print(f"{command}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return reader_went_away()
    if reply is None:
        return EXIT_OK
    try:
        if args.json:
            print_json(reply.raw)
        else:
            text = describe_reply(reply)
            if text:
                print(text, flush=True)
    except BrokenPipeError:
        return reader_went_away()
    problems = failures(reply) if failures else []
    for problem in problems:
        print(f"{command}: {problem}", file=sys.stderr)
    return EXIT_REFUSED if problems else EXIT_OK


def reader_went_away() -> int:
    """`b0-pm logs -f | head`: the reader has all it wanted; end quietly, as cat does."""
    # Python would otherwise complain again when it flushes stdout at exit.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def no_answer_hint(service: str) -> str:
    from b0_pm.client import HUB_SERVICE
    if service.startswith("the resolver"):
        return "is the resolver running (b0-resolver.service), and is --resolver or $B0_RESOLVER right?"
    if service == HUB_SERVICE:
        # A HUB waiting on a dead PM answers only after its forward timeout (default 3 s).
        return "is the HUB running (b0-pm-hub.service), and does the host's process manager answer it?"
    return "is the process manager running (b0-pm@HOST.service), and is the host id ($B0_HOST_ID) right?"


def usage_error(args, message: str) -> int:
    print(f"b0-pm {args.command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def print_json(obj):
    print(json.dumps(obj, separators=(",", ":"), ensure_ascii=False), flush=True)


class WaitTimeout(Exception):
    pass


def wait_until_ended(pm, pid: int, wait_timeout: float):
    """Poll query_process_status until the process has ended; return that reply."""
    from b0_pm.client import Refused, Reply
    deadline = time.monotonic() + wait_timeout
    while True:
        try:
            reply = pm.status(pid)
        except Refused as exc:
            # A PM without exit records (the original) forgets the pid once it has ended.
            if str(exc) != "no such pid":
                raise
            return Reply(exc.raw, {"success": True, "running": False})
        if not reply.result.get("running", False):
            return reply
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"pid {pid} still running after {wait_timeout:g} s")
        time.sleep(POLL_INTERVAL_S)


def describe(result: dict) -> str:
    """How a query_process_status result reads to a human."""
    if result.get("running"):
        return "running"
    signal_number = result.get("signal")
    exit_code = result.get("exit_code")
    if signal_number is None and isinstance(exit_code, int) and exit_code < 0:
        signal_number = -exit_code
    if signal_number is not None:
        name = result.get("signal_name") or signal_name(signal_number)
        text = f"killed by signal {name}"
        if result.get("core_dumped"):
            text += " (core dumped)"
        return text
    if exit_code is not None:
        return f"exited with status {exit_code}"
    return "ended (the process manager did not report how)"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def describe_hosts(reply) -> str:
    return "\n".join(host["host_name"] for host in reply.result["hosts"])


def describe_all_hosts(reply) -> str:
    """ "HOST PID" lines, from the HUB's per-host answers to host "*"."""
    lines = []
    for entry in reply.result["hosts"]:
        pids = entry.get("list_active_processes", {}).get("pids", []) if entry.get("success") else []
        lines.extend(f"{entry['host_name']} {pid}" for pid in pids)
    return "\n".join(lines)


def failed_hosts(reply) -> list[str]:
    return [f"{entry['host_name']}: {entry.get('error_message') or 'failed'}"
            for entry in reply.result["hosts"] if not entry.get("success")]


def follow_log(pm, args):
    """Print the last lines, then new ones as they come, until interrupted.

    Each reply carries the journal cursor of its last line; asking for the
    lines after it gives exactly the new ones, however repetitive they are.
    """
    from b0_pm.client import Refused
    result = pm.get_log(args.pid, args.lines).result
    emit(args, result["lines"])
    cursor = result.get("cursor")
    if cursor is None and result["lines"]:
        raise Refused("this process manager cannot follow a log (its get_log replies have no cursor)", {})
    try:
        while True:
            time.sleep(LOG_FOLLOW_INTERVAL_S)
            # Until the journal holds a line there is no cursor, and everything is new.
            result = pm.get_log(args.pid, LOG_FOLLOW_BATCH, after=cursor).result
            emit(args, result["lines"])
            cursor = result.get("cursor", cursor)
    except KeyboardInterrupt:
        # Ctrl-C is how the user ends -f, not a failure.
        return None


def emit(args, lines):
    for line in lines:
        print(json.dumps(line, ensure_ascii=False) if args.json else line, flush=True)
