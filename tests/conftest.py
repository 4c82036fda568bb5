"""Shared pytest setup. Fixtures live in one module per concern."""

import pytest

pytest_plugins = [
    "tests.fixtures_b0",       # resolver processes, free ports, b0 environments
    "tests.fixtures_sandbox",  # the throw-away systemd container
    "tests.fixtures_netns",    # network namespaces as separate hosts
]


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", help="also run the long fuzz and load tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--long"):
        return
    skip_long = pytest.mark.skip(reason="long run: pass --long")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip_long)
