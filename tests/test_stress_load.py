"""Concurrent clients against one real PM, directly and through a real HUB.

The engine is bench/bench_load.py (DEALER clients, one request in flight
each, every reply checked against its request: a stop of a pid unique to
the client and request must name that pid, a start must give a pid never
seen before which the same client then queries, ...). Here: no reply
lost, duplicated or mismatched, and the PM still answers afterwards.
Timing is not asserted (that is the benchmark's job).

CI: 10 clients x 20 requests per path. --long: 50 x 200 (issue #7).
"""

from __future__ import annotations

import pytest

from bench.bench_load import HUB_SERVICE, PM_SERVICE, Rig, run_clients

SMALL = (10, 20)
FULL = (50, 200)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    rig = Rig(tmp_path_factory.mktemp("load"), hub=True)
    try:
        yield rig
    finally:
        rig.close()
        print(open(rig.workdir / "pm.log", errors="replace").read()[-3000:])


def run_and_check(rig, clients: int, requests: int, *, via_hub: bool):
    seen: set[int] = set()
    address, service = (rig.hub_address, HUB_SERVICE) if via_hub else (rig.pm_address, PM_SERVICE)
    result = run_clients(address, service, clients, requests, rig.pm_plan(via_hub=via_hub, seen_pids=seen),
                         timeout_s=30.0)
    assert result.problems == [], result.problems[:10]
    assert result.answered == clients * requests
    assert len(seen) == clients * requests // 10   # every start gave its own pid
    # every started program is known to the PM and ended as it should (exit 0)
    for pid in sorted(seen):
        status = rig.call(rig.pm_address, PM_SERVICE, {"query_process_status": {"pid": pid}})
        body = status["query_process_status"]
        assert body["success"] is True and (body["running"] is True or body["exit_code"] == 0), (pid, body)
    listing = rig.call(rig.pm_address, PM_SERVICE, {"list_active_processes": {}})
    assert rig.sleeper_pid in listing["list_active_processes"]["pids"]
    assert rig.pm.process.poll() is None
    return result


@pytest.mark.parametrize("via_hub", [False, True], ids=["direct", "hub"])
def test_concurrent_clients_get_exactly_their_own_replies(rig, via_hub):
    run_and_check(rig, *SMALL, via_hub=via_hub)


def test_direct_and_hub_clients_at_once(rig):
    """Clients of the PM and of the HUB interleave at the PM: neither sees the other's replies."""
    import threading
    results = {}
    hub_thread = threading.Thread(target=lambda: results.update(hub=run_and_check(rig, 5, 20, via_hub=True)))
    hub_thread.start()
    results["direct"] = run_and_check(rig, 5, 20, via_hub=False)
    hub_thread.join(120)
    assert not hub_thread.is_alive()
    assert results["hub"].answered == 100 and results["direct"].answered == 100


@pytest.mark.long
@pytest.mark.parametrize("via_hub", [False, True], ids=["direct", "hub"])
def test_fifty_clients_two_hundred_requests_each(rig, via_hub):
    result = run_and_check(rig, *FULL, via_hub=via_hub)
    print(f"{'hub' if via_hub else 'direct'}: p50 {result.percentile(0.5) * 1e3:.2f} ms, "
          f"p99 {result.percentile(0.99) * 1e3:.2f} ms, {result.throughput:.0f} req/s")
