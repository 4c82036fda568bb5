"""Which programs the PM may start, as which user, with which environment.

The original allowed any path that began, as a plain string, with the
directory of its own executable (spec 7.3): /opt/b0/bin_x passed for
/opt/b0/bin, and symlinks led anywhere. Here a path is allowed only if,
after resolving symlinks and "..", it lies inside a configured directory
by path component, and is a regular, executable file.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import stat
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from b0_pm.config import DEFAULT_CONFIG_FILE

ENVIRONMENT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Variables that make an allowed program load or run code the client chooses.
DENIED_ENVIRONMENT = {
    "GLIBC_TUNABLES": "it tunes the dynamic loader",
    "GCONV_PATH": "it makes the C library load modules from a chosen directory",
    "GETCONF_DIR": "it makes the C library read a chosen directory",
    "HOSTALIASES": "it makes the resolver read a chosen file",
    "LOCALDOMAIN": "it changes host name resolution",
    "RES_OPTIONS": "it changes host name resolution",
    "RESOLV_HOST_CONF": "it makes the resolver read a chosen file",
    "LOCPATH": "it makes the C library load locales from a chosen directory",
    "NLSPATH": "it makes the C library load message catalogs from a chosen directory",
    "NIS_PATH": "it changes name service lookups",
    "MALLOC_TRACE": "it makes the C library write a chosen file",
    "TZDIR": "it makes the C library read a chosen directory",
    "PATH": "it decides which programs an allowed script runs",
    "IFS": "it changes how shell scripts split words",
    "BASH_ENV": "it makes bash run a chosen file first",
    "ENV": "it makes sh run a chosen file first",
    "SHELLOPTS": "it changes shell behaviour",
    "BASHOPTS": "it changes shell behaviour",
    "PS4": "it can run commands in traced shell scripts",
    "PYTHONPATH": "it makes Python import chosen code",
    "PYTHONHOME": "it makes Python load a chosen standard library",
    "PYTHONSTARTUP": "it makes Python run a chosen file",
    "PYTHONUSERBASE": "it makes Python import chosen code",
    "PERL5LIB": "it makes Perl load chosen code",
    "PERLLIB": "it makes Perl load chosen code",
    "PERL5OPT": "it passes options to Perl",
    "RUBYLIB": "it makes Ruby load chosen code",
    "RUBYOPT": "it passes options to Ruby",
    "NODE_OPTIONS": "it passes options to Node.js",
    "NODE_PATH": "it makes Node.js load chosen code",
    "LUA_INIT": "it makes Lua run chosen code",
    "LUA_PATH": "it makes Lua load chosen code",
    "LUA_CPATH": "it makes Lua load chosen code",
    "JAVA_TOOL_OPTIONS": "it passes options to the JVM",
    "_JAVA_OPTIONS": "it passes options to the JVM",
    "JDK_JAVA_OPTIONS": "it passes options to the JVM",
}
DENIED_ENVIRONMENT_PREFIX = ("LD_", "it controls the dynamic loader")

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartDecision:
    allowed: bool
    reason: str = ""                 # the client's error_message when refused
    path: str = ""                   # the resolved executable to run
    user: str | None = None          # None: the PM's own user
    group: str | None = None         # None: the user's primary group
    environment: dict[str, str] = field(default_factory=dict)


def _refused(reason: str) -> StartDecision:
    return StartDecision(False, reason)


class StartPolicy:
    """check_start(path, user=, environment=) -> StartDecision.

    allowed_directories: programs must lie inside one of these (after realpath).
    user, group:         who programs run as by default ("" or None: the PM's own user).
    allowed_users:       users a request's "user" may name, besides the default.
    base_environment:    variables the PM gives every program (B0_RESOLVER, ...);
                         a request cannot override them.
    config_source:       where allowed_directories is set, for the hint when it is empty.
    """

    def __init__(self, allowed_directories, *, user: str | None = None, group: str | None = None,
                 allowed_users=(), base_environment: dict[str, str] | None = None,
                 config_source: str = "the configuration file", log: logging.Logger | None = None):
        self.directories = tuple(os.path.realpath(d) for d in allowed_directories)
        self.user = user or None
        self.group = group or None
        self.allowed_users = frozenset(allowed_users)
        self.base_environment = dict(base_environment or {})
        self._no_directory_reason = (
            "permission denied: no allowed directory is configured"
            f" (set allowed_directories under [pm] in {config_source})")
        if not self.directories:
            (log or _log).warning(
                "No allowed directory configured: every start_process will be refused. To allow"
                " programs, set allowed_directories under [pm] in %s, or pass --allowed-directory.",
                config_source)

    @classmethod
    def from_config(cls, config, base_environment: dict[str, str] | None = None, log=None):
        pm = config.pm
        return cls(pm.allowed_directories, user=pm.user, group=pm.group,
                   allowed_users=pm.allowed_users, base_environment=base_environment,
                   config_source=config.source or DEFAULT_CONFIG_FILE, log=log)

    def check_start(self, path: str, *, user: str | None = None,
                    environment: dict[str, str] | None = None) -> StartDecision:
        resolved = self._check_path(path)
        if isinstance(resolved, StartDecision):
            return resolved
        account = self._check_user(user)
        if isinstance(account, StartDecision):
            return account
        merged = self._check_environment(environment or {})
        if isinstance(merged, StartDecision):
            return merged
        run_user, run_group = account
        return StartDecision(True, path=resolved, user=run_user, group=run_group, environment=merged)

    def _check_path(self, path: str) -> str | StartDecision:
        if "\0" in path:
            return _refused("permission denied: the path contains a NUL character")
        if not path.startswith("/"):
            return _refused(f"permission denied: the path must be absolute, got {path!r}")
        if not self.directories:
            return _refused(self._no_directory_reason)
        resolved = os.path.realpath(path)
        if not any(PurePosixPath(resolved).is_relative_to(d) for d in self.directories):
            via = "" if resolved == path else f" (it resolves to {resolved})"
            return _refused(f"permission denied: {path}{via} is not inside an allowed directory"
                            f" ({', '.join(self.directories)})")
        try:
            info = os.stat(resolved)
        except (FileNotFoundError, NotADirectoryError):
            return _refused(f"no such file: {path}")
        except OSError as exc:
            return _refused(f"permission denied: cannot inspect {path}: {exc.strerror}")
        if not stat.S_ISREG(info.st_mode):
            return _refused(f"permission denied: {path} is not a regular file")
        if not info.st_mode & 0o111:
            return _refused(f"permission denied: {path} is not executable"
                            f" (mode {stat.S_IMODE(info.st_mode):04o})")
        return resolved

    def _check_user(self, requested: str | None) -> tuple[str | None, str | None] | StartDecision:
        if requested is None or requested == self.user:
            return self.user, self.group
        if requested not in self.allowed_users:
            return _refused(f"permission denied: user {requested!r} is not allowed")
        try:
            pwd.getpwnam(requested)
        except KeyError:
            return _refused(f"permission denied: no such user {requested!r}")
        return requested, None

    def _check_environment(self, requested: dict[str, str]) -> dict[str, str] | StartDecision:
        for name, value in requested.items():
            if not ENVIRONMENT_NAME.fullmatch(name):
                return _refused(f"permission denied: {name!r} is not a valid environment variable name")
            if "\0" in value or "\n" in value:
                return _refused(f"permission denied: environment variable {name} holds a NUL or newline")
            why = DENIED_ENVIRONMENT.get(name)
            if why is None and name.startswith(DENIED_ENVIRONMENT_PREFIX[0]):
                why = DENIED_ENVIRONMENT_PREFIX[1]
            if why:
                return _refused(f"permission denied: environment variable {name} is not allowed ({why})")
            if name in self.base_environment:
                return _refused(f"permission denied: environment variable {name}"
                                " is set by the process manager and cannot be overridden")
        return {**requested, **self.base_environment}
