"""Configuration: the shipped file, the defaults, errors that name the key, command-line overrides."""

import argparse
import dataclasses
from pathlib import Path

import pytest

from b0_pm import config
from b0_pm.config import Config, ConfigError

SHIPPED = Path(__file__).resolve().parent.parent / "packaging" / "b0-pm.toml"


def parser_for(*sections):
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, *sections)
    return parser


def write(tmp_path, text):
    path = tmp_path / "b0-pm.toml"
    path.write_text(text)
    return str(path)


def test_defaults():
    cfg = Config()
    assert cfg.pm.allowed_directories == () and cfg.pm.retention_seconds == 600
    assert (cfg.pm.stop_signal_grace_seconds, cfg.pm.term_grace_seconds) == (5, 5)
    assert cfg.pm.beacon_interval_seconds == 0.1 and cfg.pm.stop_processes_on_exit is False
    assert cfg.pm.backend == "auto" and cfg.max_message_bytes == 1048576
    assert (cfg.hub.forward_timeout_seconds, cfg.hub.host_expiry_seconds,
            cfg.hub.active_nodes_interval_seconds) == (3, 5, 0.5)


def test_shipped_file_sets_every_key_and_only_differs_in_the_run_as_account():
    cfg = config.load_file(str(SHIPPED), must_exist=True)
    text = SHIPPED.read_text()
    for section in (None, *config.SECTIONS):
        cls = Config if section is None else config.SECTIONS[section]
        for setting in config._settings(cls):
            assert f"\n{setting.name} = " in text, f"{setting.name} missing from {SHIPPED.name}"
    expected = dataclasses.replace(Config(), source=str(SHIPPED),
                                   pm=dataclasses.replace(Config().pm, user="b0-pm-run", group="b0-pm-run"))
    assert cfg == expected


def test_missing_default_file_gives_defaults(tmp_path):
    assert config.load_file(str(tmp_path / "absent.toml")) == Config()


def test_missing_named_file_is_an_error(tmp_path):
    args = parser_for("pm").parse_args(["--config", str(tmp_path / "absent.toml")])
    with pytest.raises(ConfigError, match="absent.toml does not exist"):
        config.load(args)


def test_file_values_are_read(tmp_path):
    path = write(tmp_path, 'host_id = "robot1"\n[pm]\nallowed_directories = ["/opt/b0/bin"]\n'
                           'retention_seconds = 30\nstop_processes_on_exit = true\nbackend = "local"\n'
                           '[hub]\nhost_expiry_seconds = 2.5\n[resolver]\nport = 23000\n')
    cfg = config.load_file(path)
    assert cfg.host_id == "robot1" and cfg.source == path
    assert cfg.pm.allowed_directories == ("/opt/b0/bin",)
    assert cfg.pm.retention_seconds == 30.0 and isinstance(cfg.pm.retention_seconds, float)
    assert cfg.pm.stop_processes_on_exit is True and cfg.pm.backend == "local"
    assert cfg.hub.host_expiry_seconds == 2.5 and cfg.resolver.port == 23000


@pytest.mark.parametrize("text, message", [
    ("[pm]\nallowed_dirs = []\n", "unknown key 'allowed_dirs' in [pm] of {path}"),
    ("retention_seconds = 5\n", "unknown key 'retention_seconds' at the top level of {path}"
                                " (it belongs under [pm])"),
    ("colour = 1\n", "unknown key 'colour' at the top level of {path}"),
    ("[gui]\n", "unknown key 'gui' at the top level of {path}"),
    ("pm = 1\n", "pm in {path} must be a table ([pm])"),
    ('[pm]\nretention_seconds = "10"\n', "pm.retention_seconds in {path}: must be a number, got '10'"),
    ("[pm]\nretention_seconds = -1\n", "pm.retention_seconds in {path}: must be at least 0, got -1"),
    ("[pm]\nbeacon_interval_seconds = 0\n",
     "pm.beacon_interval_seconds in {path}: must be more than 0, got 0"),
    # The original C++ HUB drops a PM after 1 s without a beacon.
    ("[pm]\nbeacon_interval_seconds = 1.5\n",
     "pm.beacon_interval_seconds in {path}: must be at most 0.5, got 1.5"),
    ("[pm]\nstop_processes_on_exit = 1\n",
     "pm.stop_processes_on_exit in {path}: must be true or false, got 1"),
    ('[pm]\nbackend = "docker"\n',
     "pm.backend in {path}: must be one of auto, systemd, user, local, got 'docker'"),
    ('[pm]\nallowed_directories = "/opt"\n',
     "pm.allowed_directories in {path}: must be a list of strings, got '/opt'"),
    ('[pm]\nallowed_directories = ["opt/bin"]\n',
     "pm.allowed_directories in {path}: must hold absolute paths, got ['opt/bin']"),
    ("max_message_bytes = 1.5\n", "max_message_bytes in {path}: must be a whole number, got 1.5"),
    ("[resolver]\nport = 70000\n", "resolver.port in {path}: must be at most 65535, got 70000"),
    ('log_level = "verbose"\n', "log_level in {path}: must be one of trace, debug, info, warn, error,"
                                " fatal, got 'verbose'"),
])
def test_errors_name_the_key_and_the_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        config.load_file(path)
    assert str(caught.value) == message.format(path=path)


def test_toml_syntax_error_names_the_file(tmp_path):
    path = write(tmp_path, "[pm\n")
    with pytest.raises(ConfigError, match=f"cannot parse configuration file {path}: "):
        config.load_file(path)


def test_command_line_wins_over_the_file(tmp_path):
    path = write(tmp_path, '[pm]\nallowed_directories = ["/a"]\nretention_seconds = 30\n'
                           'stop_processes_on_exit = true\n[hub]\nforward_timeout_seconds = 9\n')
    args = parser_for("pm", "hub").parse_args([
        "--config", path, "--allowed-directory", "/b", "--allowed-directory", "/c",
        "--no-stop-processes-on-exit", "--host-id", "vm", "--backend", "local",
        "--host-expiry-seconds", "2"])
    cfg = config.load(args)
    assert cfg.pm.allowed_directories == ("/b", "/c")
    assert cfg.pm.retention_seconds == 30 and cfg.pm.stop_processes_on_exit is False
    assert cfg.host_id == "vm" and cfg.pm.backend == "local"
    assert (cfg.hub.forward_timeout_seconds, cfg.hub.host_expiry_seconds) == (9, 2)


def test_only_the_named_sections_get_flags():
    parser = parser_for("hub")
    assert parser.parse_args(["--forward-timeout-seconds", "1"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--retention-seconds", "1"])


def test_flag_values_are_checked_like_file_values(tmp_path):
    args = parser_for("pm").parse_args(["--config", write(tmp_path, ""), "--retention-seconds", "-5"])
    with pytest.raises(ConfigError, match="--retention-seconds in the command line: must be at least 0"):
        config.load(args)


def test_load_without_flags_is_the_file(tmp_path):
    path = write(tmp_path, "[resolver]\nport = 23001\n")
    assert config.load(parser_for("resolver").parse_args(["--config", path])) == config.load_file(path)
