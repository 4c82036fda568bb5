"""`b0-pm up`: a working b0 network on this machine with one command, for a quick try.

Runs a resolver, this machine's process manager and the HUB as child
processes, on loopback only (host id `localhost`), with a built-in
configuration that allows programs from /usr/bin and stops them when `up`
ends. Ctrl-C or SIGTERM stops everything, the nodes before the resolver so
that each can say goodbye to it.
"""

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HOST_ID = "localhost"   # loopback only: a quick try must not open the machine to the network
BIND_HOST = "127.0.0.1"
DEFAULT_PORT = 22000
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
QUICK_TRY_CONFIG = """\
# b0-pm up: quick-try configuration (for production see /etc/b0-pm/b0-pm.toml)
[pm]
# programs a start_process request may run
allowed_directories = ["/usr/bin"]
# when `b0-pm up` ends, so does everything it started
stop_processes_on_exit = true
stop_signal_grace_seconds = 2
term_grace_seconds = 2
"""
EXIT_FAILURE = 1
PR_SET_PDEATHSIG = 1


class Stop(Exception):
    """SIGINT or SIGTERM: take everything down."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "up", help="run a resolver, a process manager and the HUB here, for a quick try",
        description="Bring up a b0 network on this machine (loopback only): a resolver, the "
                    "process manager process_manager@localhost and the HUB, with a built-in "
                    "configuration that allows programs from /usr/bin. Ctrl-C stops everything.")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"resolver port (default {DEFAULT_PORT})")
    parser.add_argument("--config", metavar="FILE",
                        help="use this configuration instead of the built-in quick-try one")
    parser.add_argument("--backend", choices=("auto", "systemd", "user", "local"),
                        help="how programs are run (default: auto)")
    parser.add_argument("--allowed-directory", action="append", metavar="DIR",
                        help="allow programs from DIR instead of /usr/bin (repeatable)")
    parser.add_argument("--for", dest="duration", type=float, metavar="SECONDS",
                        help="stop by itself after SECONDS")
    parser.set_defaults(func=run, parser=parser)


def run(args) -> int:
    if not 0 < args.port < 65536:
        args.parser.error(f"--port must be 1..65535, got {args.port}")
    if port_in_use(args.port):
        print(f"b0-pm up: port {args.port} is in use (a resolver already running, e.g. "
              f"b0-resolver.service?); choose another with --port", file=sys.stderr)
        return EXIT_FAILURE
    network = Network(args)
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        network.start()
        network.print_instructions()
        return network.wait(args.duration)
    except Stop:
        return 0
    except (RuntimeError, OSError) as exc:
        print(f"b0-pm up: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        # a second Ctrl-C must not cut the orderly shutdown short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        network.stop()


def _raise_stop(signum, frame):
    raise Stop()


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex((BIND_HOST, port)) == 0


def _die_with_parent_hook():
    """A preexec_fn: if `up` is killed outright, its children get SIGTERM instead of running on.

    libc is loaded here, in the parent, so the forked child only makes the call."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    return lambda: libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Network:
    def __init__(self, args):
        self.args = args
        self.resolver_address = f"tcp://{HOST_ID}:{args.port}"
        self.workdir = tempfile.mkdtemp(prefix="b0-pm-up-")
        self.config_file = args.config or os.path.join(self.workdir, "b0-pm.toml")
        if not args.config:
            with open(self.config_file, "w") as stream:
                stream.write(QUICK_TRY_CONFIG)
        self.environment = dict(os.environ, B0_RESOLVER=self.resolver_address, B0_HOST_ID=HOST_ID,
                                B0PM_BIND_HOST=BIND_HOST)
        self.children: list[tuple[str, subprocess.Popen]] = []   # in start order
        self.pm_service = f"process_manager@{HOST_ID}/control"
        self.services = [self.pm_service]

    def _spawn(self, name: str, arguments: list[str], preexec_fn) -> None:
        # own process group: Ctrl-C reaches only `up`, which stops the children in order
        process = subprocess.Popen([sys.executable, "-m", "b0_pm", *arguments], env=self.environment,
                                   stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=preexec_fn)
        self.children.append((name, process))

    def start(self) -> None:
        """All three at once (nodes wait for the resolver by themselves), before any thread exists
        (zmq starts some), as preexec_fn requires; then wait until each has registered."""
        serve = ["serve", "--config", self.config_file, "--host-id", HOST_ID]
        if self.args.backend:
            serve += ["--backend", self.args.backend]
        for directory in self.args.allowed_directory or ():
            serve += ["--allowed-directory", os.path.abspath(directory)]
        die_with_parent = _die_with_parent_hook()
        self._spawn("resolver", ["resolver", "--port", str(self.args.port)], die_with_parent)
        self._spawn("process manager", serve, die_with_parent)
        if self.hub_available():
            self._spawn("HUB", ["hub", "--config", self.config_file], die_with_parent)
            self.services.append("process_manager_hub/control")
        self._wait_for(lambda: self._resolver_request("get_graph", {}) is not None, "the resolver")
        for service in self.services:
            self._wait_for(lambda: self._resolves(service), service)

    @staticmethod
    def hub_available() -> bool:
        import importlib.util
        return importlib.util.find_spec("b0_pm.commands.hub") is not None

    def _wait_for(self, ready, what: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not ready():
            for name, process in self.children:
                if process.poll() is not None:
                    raise RuntimeError(f"the {name} exited with status {process.returncode} at startup")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not come up within {STARTUP_TIMEOUT_S:g} s")
            time.sleep(0.1)

    def _resolves(self, service: str) -> bool:
        reply = self._resolver_request("resolve_service", {"service_name": service})
        return bool(reply and reply.get("resolve_service", {}).get("ok"))

    def _resolver_request(self, key: str, body: dict) -> dict | None:
        """One resolver request on a throw-away REQ socket; None if it does not answer yet."""
        import zmq

        from b0_pm.b0 import envelope, jsoncodec
        from b0_pm.b0.errors import MessageError

        with zmq.Context.instance().socket(zmq.REQ) as sock:
            sock.linger = 0
            sock.connect(f"tcp://{BIND_HOST}:{self.args.port}")
            sock.send(envelope.encode("resolv", jsoncodec.dumps({key: body}), "b0.message.resolv.Request"))
            if not sock.poll(200):
                return None
            try:
                return jsoncodec.loads(envelope.decode(sock.recv()).payload)
            except MessageError:
                return None

    def print_instructions(self) -> None:
        if self.args.config:
            configuration = f"Configuration: {self.config_file}"
        else:
            configuration = "Configuration (built in, for a quick try):\n" + "".join(
                f"  {line}\n" for line in QUICK_TRY_CONFIG.splitlines()).rstrip()
        if self.args.allowed_directory:
            configuration += f"\n  allowed directories replaced by: {' '.join(self.args.allowed_directory)}"
        pids = ", ".join(f"{name} {process.pid}" for name, process in self.children)
        hub = "process_manager_hub/control" if len(self.services) > 1 else "(not installed)"
        print(f"""
b0 network up on this machine, loopback only ({pids}).
  resolver          {self.resolver_address}
  process manager   {self.pm_service}
  HUB               {hub}
{configuration}

In another terminal:
  export B0_RESOLVER={self.resolver_address} B0_HOST_ID={HOST_ID}
  b0-pm list
  b0-pm start /usr/bin/sleep 30
  echo '{{"list_active_processes":{{}}}}' | b0-pm call {self.pm_service} -c b0::process_manager::Request

Ctrl-C stops everything.
""", flush=True)

    def wait(self, duration: float | None) -> int:
        """Until a signal, the end of `duration`, or the death of a child (an error)."""
        deadline = None if duration is None else time.monotonic() + duration
        pidfds = {os.pidfd_open(process.pid): name for name, process in self.children}
        try:
            while True:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                exited, _, _ = select.select(list(pidfds), [], [], timeout)
                if exited:
                    name = pidfds[exited[0]]
                    print(f"b0-pm up: the {name} exited unexpectedly; stopping", file=sys.stderr)
                    return EXIT_FAILURE
                if deadline is not None and time.monotonic() >= deadline:
                    return 0
        finally:
            for fd in pidfds:
                os.close(fd)

    def stop(self) -> None:
        """The nodes first (each tells the resolver it leaves), the resolver last."""
        for name, process in reversed(self.children):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    print(f"b0-pm up: the {name} did not stop within {STOP_TIMEOUT_S:g} s; killing it",
                          file=sys.stderr)
                    process.kill()
                    process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self.children:
            print("b0-pm up: stopped.", file=sys.stderr)
