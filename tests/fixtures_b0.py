"""Fixtures for b0 tests: resolver processes, free ports, node environments."""
