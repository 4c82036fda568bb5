"""Configuration: one TOML file, overridden by the command line, read once into Config.

File layout (packaging/b0-pm.toml is the commented reference):

    host_id = ""                  # top level: settings every node uses
    [pm]      ...                 # the process manager (b0-pm serve)
    [hub]     ...                 # the HUB (b0-pm hub)
    [resolver] ...                # the resolver (b0-pm resolver)

A missing default file means built-in defaults; a missing file named with
--config, an unknown key or a wrong type is a ConfigError naming the key
and the file. Commands use the same two calls:

    config.add_arguments(parser, "pm")     # --config plus the flags of these sections
    cfg = config.load(args)                # file, then flags given on the command line
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from dataclasses import dataclass, field

DEFAULT_CONFIG_FILE = "/etc/b0-pm/b0-pm.toml"
BACKENDS = ("auto", "systemd", "user", "local")
LOG_LEVELS = ("trace", "debug", "info", "warn", "error", "fatal")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the file."""


def _setting(default, help: str, *, minimum=None, above=None, maximum=None, choices=None,
             flag: str | None = None, absolute_paths: bool = False):
    return field(default=default, metadata={
        "help": help, "minimum": minimum, "above": above, "maximum": maximum,
        "choices": choices, "flag": flag, "absolute_paths": absolute_paths})


@dataclass(frozen=True)
class PMSettings:
    allowed_directories: tuple[str, ...] = _setting(
        (), "programs may start only from inside these directories (symlinks resolved);"
            " none: every start is refused", flag="--allowed-directory", absolute_paths=True)
    user: str = _setting("", "user the programs run as; empty: the PM's own user")
    group: str = _setting("", "group the programs run as; empty: the user's primary group")
    allowed_users: tuple[str, ...] = _setting(
        (), "users a start_process request may name in its \"user\" field", flag="--allowed-user")
    retention_seconds: float = _setting(
        600.0, "how long the exit status of a finished process stays queryable", minimum=0)
    stop_signal_grace_seconds: float = _setting(
        5.0, "stop: seconds between SIGINT and SIGTERM", minimum=0)
    term_grace_seconds: float = _setting(
        5.0, "stop: seconds between SIGTERM and SIGKILL", minimum=0)
    beacon_interval_seconds: float = _setting(
        0.1, "seconds between beacons (the original: 10 Hz); at most 0.5, because the"
             " original C++ HUB forgets a PM after 1 s without a beacon", above=0, maximum=0.5)
    stop_processes_on_exit: bool = _setting(
        False, "stop every managed process when the PM exits (else they keep running and are adopted)")
    backend: str = _setting("auto", "how programs are run", choices=BACKENDS)


@dataclass(frozen=True)
class HubSettings:
    forward_timeout_seconds: float = _setting(
        3.0, "seconds to wait for a PM's reply before answering the client with an error", above=0)
    host_expiry_seconds: float = _setting(
        5.0, "a PM is forgotten after this long without a beacon (the original: 1 s)", above=0)
    active_nodes_interval_seconds: float = _setting(
        0.5, "seconds between active_nodes messages (the original: 2 Hz)", above=0)


@dataclass(frozen=True)
class ResolverSettings:
    port: int = _setting(22000, "TCP port the resolver listens on", minimum=1, maximum=65535,
                         flag="--resolver-port")
    minimum_heartbeat_interval_seconds: float = _setting(
        30.0, "a node is dropped 1-1.33 times this long after its last heartbeat; 0 disables",
        minimum=0)


SECTIONS = {"pm": PMSettings, "hub": HubSettings, "resolver": ResolverSettings}


@dataclass(frozen=True)
class Config:
    host_id: str = _setting("", "host id in names and beacons; empty: $B0_HOST_ID or the hostname")
    resolver_address: str = _setting(
        "", "resolver the nodes use; empty: $B0_RESOLVER or tcp://localhost:22000", flag="--resolver")
    log_level: str = _setting("info", "console log level", choices=LOG_LEVELS)
    max_message_bytes: int = _setting(1048576, "largest message accepted from a peer", minimum=1024)
    pm: PMSettings = field(default_factory=PMSettings)
    hub: HubSettings = field(default_factory=HubSettings)
    resolver: ResolverSettings = field(default_factory=ResolverSettings)
    source: str = ""   # the file read, "" when none was


def _settings(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


# --- the file ------------------------------------------------------------------

def load_file(path: str = DEFAULT_CONFIG_FILE, *, must_exist: bool = False) -> Config:
    """Config from a TOML file; a missing file gives the defaults unless must_exist."""
    try:
        with open(path, "rb") as stream:
            document = tomllib.load(stream)
    except FileNotFoundError:
        if must_exist:
            raise ConfigError(f"configuration file {path} does not exist") from None
        return Config()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cannot parse configuration file {path}: {exc}") from exc
    return from_mapping(document, path)


def from_mapping(document: dict, source: str) -> Config:
    top_keys = {f.name for f in _settings(Config)}
    values: dict = {}
    for key, value in document.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{key} in {source} must be a table ([{key}])")
            values[key] = _section(SECTIONS[key], value, key, source)
        elif key in top_keys:
            values[key] = _checked(_field(Config, key), value, key, source)
        else:
            home = next((name for name, cls in SECTIONS.items()
                         if key in {f.name for f in _settings(cls)}), None)
            hint = f" (it belongs under [{home}])" if home else ""
            raise ConfigError(f"unknown key {key!r} at the top level of {source}{hint}")
    return Config(**values, source=source)


def _section(cls, table: dict, section: str, source: str):
    known = {f.name: f for f in _settings(cls)}
    values = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"unknown key {key!r} in [{section}] of {source}")
        values[key] = _checked(known[key], value, f"{section}.{key}", source)
    return cls(**values)


def _field(cls, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _checked(setting: dataclasses.Field, value, name: str, source: str):
    """value converted to the setting's type, or a ConfigError saying what is wrong."""
    given = value

    def fail(problem: str):
        return ConfigError(f"{name} in {source}: {problem}, got {given!r}")

    kind = setting.type
    meta = setting.metadata
    if kind == "bool":
        if not isinstance(value, bool):
            raise fail("must be true or false")
    elif kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, int if kind == "int" else (int, float)):
            raise fail("must be a whole number" if kind == "int" else "must be a number")
        value = int(value) if kind == "int" else float(value)
        if meta["minimum"] is not None and value < meta["minimum"]:
            raise fail(f"must be at least {meta['minimum']}")
        if meta["above"] is not None and value <= meta["above"]:
            raise fail(f"must be more than {meta['above']}")
        if meta["maximum"] is not None and value > meta["maximum"]:
            raise fail(f"must be at most {meta['maximum']}")
    elif kind == "str":
        if not isinstance(value, str):
            raise fail("must be a string")
        if meta["choices"] and value not in meta["choices"]:
            raise fail(f"must be one of {', '.join(meta['choices'])}")
    else:  # tuple[str, ...]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise fail("must be a list of strings")
        if meta["absolute_paths"] and not all(v.startswith("/") for v in value):
            raise fail("must hold absolute paths")
        value = tuple(value)
    return value


# --- the command line --------------------------------------------------------------

def _flag(setting: dataclasses.Field) -> str:
    return setting.metadata["flag"] or "--" + setting.name.replace("_", "-")


def _dest(section: str | None, name: str) -> str:
    return f"config_{section}_{name}" if section else f"config_{name}"


def add_arguments(parser: argparse.ArgumentParser, *sections: str) -> None:
    """--config, the top-level settings, and the settings of each named section."""
    group = parser.add_argument_group("configuration (command line wins over the file)")
    group.add_argument("--config", dest="config_file", metavar="FILE", default=None,
                       help=f"configuration file (default {DEFAULT_CONFIG_FILE}, if it exists)")
    for section in (None, *sections):
        cls = Config if section is None else SECTIONS[section]
        for setting in _settings(cls):
            _add_flag(group, setting, _dest(section, setting.name))


def _add_flag(group, setting: dataclasses.Field, dest: str) -> None:
    kind = setting.type
    text = setting.metadata["help"]
    if kind == "bool":
        group.add_argument(_flag(setting), dest=dest, action=argparse.BooleanOptionalAction,
                           default=None, help=text)
    elif kind.startswith("tuple"):
        metavar = "DIR" if setting.metadata["absolute_paths"] else "USER"
        group.add_argument(_flag(setting), dest=dest, action="append", metavar=metavar,
                           default=None, help=text + " (repeat for several; replaces the file's list)")
    else:
        converter = {"int": int, "float": float, "str": str}[kind]
        metavar = None if setting.metadata["choices"] else setting.name.rsplit("_", 1)[-1].upper()
        group.add_argument(_flag(setting), dest=dest, type=converter, default=None,
                           choices=setting.metadata["choices"], metavar=metavar, help=text)


def load(args: argparse.Namespace) -> Config:
    """The file named by --config (or the default one), then every flag given."""
    explicit = getattr(args, "config_file", None)
    config = load_file(explicit or DEFAULT_CONFIG_FILE, must_exist=bool(explicit))
    overrides = _overrides(args, None, Config)
    for section, cls in SECTIONS.items():
        changes = _overrides(args, section, cls)
        if changes:
            overrides[section] = dataclasses.replace(getattr(config, section), **changes)
    return dataclasses.replace(config, **overrides)


def _overrides(args: argparse.Namespace, section: str | None, cls) -> dict:
    changes = {}
    for setting in _settings(cls):
        value = getattr(args, _dest(section, setting.name), None)
        if value is not None:
            changes[setting.name] = _checked(setting, value, _flag(setting), "the command line")
    return changes
