"""The start policy against real files: the attacks the original's string prefix let through."""

import logging
import os
import pwd

import pytest

from b0_pm.policy import StartPolicy


@pytest.fixture
def tree(tmp_path):
    """tmp/bin (allowed) with node, a sibling tmp/bin_x sharing the prefix, and an outside dir."""
    allowed = tmp_path / "bin"
    allowed.mkdir()
    for name, mode in (("node", 0o755), ("data.txt", 0o644)):
        (allowed / name).write_text("#!/bin/sh\nexit 0\n")
        (allowed / name).chmod(mode)
    (allowed / "subdir").mkdir()
    sibling = tmp_path / "bin_x"
    sibling.mkdir()
    (sibling / "evil").write_text("#!/bin/sh\n")
    (sibling / "evil").chmod(0o755)
    (allowed / "link_out").symlink_to(sibling / "evil")
    (allowed / "link_in").symlink_to(allowed / "node")
    return tmp_path


@pytest.fixture
def policy(tree):
    return StartPolicy([str(tree / "bin")], user="runner", group="runners",
                       allowed_users=["nobody"], base_environment={"B0_RESOLVER": "tcp://r:22000"})


def test_program_inside_the_directory_is_allowed(policy, tree):
    decision = policy.check_start(f"{tree}/bin/node")
    assert decision.allowed and decision.reason == ""
    assert decision.path == f"{tree}/bin/node"
    assert (decision.user, decision.group) == ("runner", "runners")
    assert decision.environment == {"B0_RESOLVER": "tcp://r:22000"}


def test_symlink_staying_inside_runs_its_target(policy, tree):
    decision = policy.check_start(f"{tree}/bin/link_in")
    assert decision.allowed and decision.path == f"{tree}/bin/node"


@pytest.mark.parametrize("relative, shown", [
    ("bin_x/evil", "{t}/bin_x/evil"),                       # shares the prefix "bin"
    ("bin/../bin_x/evil", "{t}/bin/../bin_x/evil (it resolves to {t}/bin_x/evil)"),
    ("bin/link_out", "{t}/bin/link_out (it resolves to {t}/bin_x/evil)"),
])
def test_paths_outside_the_directory_are_refused(policy, tree, relative, shown):
    decision = policy.check_start(f"{tree}/{relative}")
    assert not decision.allowed
    assert decision.reason == (f"permission denied: {shown.format(t=tree)} is not inside an allowed"
                               f" directory ({tree}/bin)")


def test_system_program_is_refused(policy, tree):
    assert policy.check_start("/bin/sleep").reason == (
        f"permission denied: /bin/sleep is not inside an allowed directory ({tree}/bin)"
        if os.path.realpath("/bin/sleep") == "/bin/sleep" else
        f"permission denied: /bin/sleep (it resolves to {os.path.realpath('/bin/sleep')}) is not"
        f" inside an allowed directory ({tree}/bin)")


def test_dot_dot_that_stays_inside_is_allowed(policy, tree):
    decision = policy.check_start(f"{tree}/bin/subdir/../node")
    assert decision.allowed and decision.path == f"{tree}/bin/node"


@pytest.mark.parametrize("relative, reason", [
    ("bin/subdir", "permission denied: {t}/bin/subdir is not a regular file"),
    ("bin", "permission denied: {t}/bin is not a regular file"),
    ("bin/data.txt", "permission denied: {t}/bin/data.txt is not executable (mode 0644)"),
    ("bin/missing", "no such file: {t}/bin/missing"),
    ("bin/node/inside_a_file", "no such file: {t}/bin/node/inside_a_file"),
])
def test_what_is_not_an_executable_file_is_refused(policy, tree, relative, reason):
    decision = policy.check_start(f"{tree}/{relative}")
    assert not decision.allowed and decision.reason == reason.format(t=tree)


def test_missing_file_outside_says_outside_not_missing(policy, tree):
    # Existence outside the allowed directories is none of the client's business.
    assert "is not inside an allowed directory" in policy.check_start(f"{tree}/nowhere/x").reason


def test_relative_path_and_nul_are_refused(policy, tree):
    assert policy.check_start("bin/node").reason == "permission denied: the path must be absolute, got 'bin/node'"
    assert policy.check_start(f"{tree}/bin/node\0x").reason == (
        "permission denied: the path contains a NUL character")


def test_allowed_directory_reached_through_a_symlink(tree):
    (tree / "current").symlink_to(tree / "bin")
    policy = StartPolicy([str(tree / "current")])
    assert policy.check_start(f"{tree}/current/node").allowed
    assert policy.check_start(f"{tree}/bin/node").allowed


def test_no_directory_refuses_everything_and_logs_how_to_allow(tree, caplog):
    with caplog.at_level(logging.WARNING, logger="b0_pm.policy"):
        policy = StartPolicy([], config_source="/etc/b0-pm/b0-pm.toml")
    assert "allowed_directories under [pm] in /etc/b0-pm/b0-pm.toml" in caplog.text
    assert policy.check_start(f"{tree}/bin/node").reason == (
        "permission denied: no allowed directory is configured"
        " (set allowed_directories under [pm] in /etc/b0-pm/b0-pm.toml)")


def test_requested_user_must_be_allowed(policy, tree):
    assert policy.check_start(f"{tree}/bin/node", user="root").reason == (
        "permission denied: user 'root' is not allowed")
    decision = policy.check_start(f"{tree}/bin/node", user="nobody")
    assert decision.allowed and (decision.user, decision.group) == ("nobody", None)
    assert policy.check_start(f"{tree}/bin/node", user="runner").allowed   # the default itself


def test_allowed_user_that_does_not_exist(tree):
    policy = StartPolicy([str(tree / "bin")], allowed_users=["b0-no-such-user"])
    with pytest.raises(KeyError):
        pwd.getpwnam("b0-no-such-user")
    assert policy.check_start(f"{tree}/bin/node", user="b0-no-such-user").reason == (
        "permission denied: no such user 'b0-no-such-user'")


def test_empty_user_means_the_pms_own(tree):
    decision = StartPolicy([str(tree / "bin")], user="", group="").check_start(f"{tree}/bin/node")
    assert (decision.user, decision.group) == (None, None)


def test_environment_is_passed_with_the_pms_variables(policy, tree):
    decision = policy.check_start(f"{tree}/bin/node", environment={"ROS_DOMAIN_ID": "3", "B0_X": "1"})
    assert decision.environment == {"ROS_DOMAIN_ID": "3", "B0_X": "1", "B0_RESOLVER": "tcp://r:22000"}


@pytest.mark.parametrize("name, reason", [
    ("LD_PRELOAD", "it controls the dynamic loader"),
    ("LD_LIBRARY_PATH", "it controls the dynamic loader"),
    ("LD_AUDIT", "it controls the dynamic loader"),
    ("GLIBC_TUNABLES", "it tunes the dynamic loader"),
    ("PYTHONPATH", "it makes Python import chosen code"),
    ("BASH_ENV", "it makes bash run a chosen file first"),
    ("PATH", "it decides which programs an allowed script runs"),
    ("NODE_OPTIONS", "it passes options to Node.js"),
])
def test_injection_variables_are_refused(policy, tree, name, reason):
    decision = policy.check_start(f"{tree}/bin/node", environment={"OK": "1", name: "/tmp/x"})
    assert decision.reason == f"permission denied: environment variable {name} is not allowed ({reason})"


def test_pms_own_b0_variables_cannot_be_overridden(policy, tree):
    assert policy.check_start(f"{tree}/bin/node", environment={"B0_RESOLVER": "tcp://evil:1"}).reason == (
        "permission denied: environment variable B0_RESOLVER is set by the process manager"
        " and cannot be overridden")


@pytest.mark.parametrize("environment, reason", [
    ({"A B": "x"}, "permission denied: 'A B' is not a valid environment variable name"),
    ({"1A": "x"}, "permission denied: '1A' is not a valid environment variable name"),
    ({"A\n": "x"}, "permission denied: 'A\\n' is not a valid environment variable name"),
    ({"A": "x\ny"}, "permission denied: environment variable A holds a NUL or newline"),
    ({"A": "x\0"}, "permission denied: environment variable A holds a NUL or newline"),
])
def test_malformed_environment_is_refused(policy, tree, environment, reason):
    assert policy.check_start(f"{tree}/bin/node", environment=environment).reason == reason


def test_from_config_uses_the_pm_section(tree):
    from b0_pm.config import from_mapping
    config = from_mapping({"pm": {"allowed_directories": [str(tree / "bin")], "user": "u",
                                  "allowed_users": ["nobody"]}}, "test.toml")
    policy = StartPolicy.from_config(config, {"B0_HOST_ID": "h"})
    decision = policy.check_start(f"{tree}/bin/node")
    assert decision.allowed and decision.user == "u" and decision.environment == {"B0_HOST_ID": "h"}


def test_without_a_file_the_hint_names_the_default_file():
    from b0_pm.config import Config
    assert StartPolicy.from_config(Config()).check_start("/opt/b0/bin/node").reason == (
        "permission denied: no allowed directory is configured"
        " (set allowed_directories under [pm] in /etc/b0-pm/b0-pm.toml)")
