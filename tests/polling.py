"""Waiting for a state in tests: poll a predicate with a deadline."""

import time


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """predicate()'s first truthy value; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
