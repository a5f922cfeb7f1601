"""The scheduler lease in ClickHouse (warehouse/lease.py): one holder at a time, takeover after expiry.

Two lease objects with different holder ids stand for two `tollgate scheduler` processes;
each test uses a lease name of its own on the session's warehouse.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from apscheduler.schedulers.background import BackgroundScheduler

from conftest import wait_until
from tollgate.stack import install_jobs
from warehouse.client import connect
from warehouse.lease import Lease

TTL = 1.5
GUARD = 0.1


@pytest.fixture
def name() -> str:
    return f"lease-{uuid.uuid4().hex[:8]}"


def test_one_holder_at_a_time_and_takeover_after_expiry(warehouse, name):
    a = Lease(warehouse, "holder-a", ttl=TTL, guard=GUARD, name=name)
    b = Lease(warehouse, "holder-b", ttl=TTL, guard=GUARD, name=name)
    assert a.current() is None and not a.held()

    assert a.acquire() and a.held()
    assert not b.acquire() and not b.held()
    assert a.current().holder == "holder-a" and a.current().live

    for _ in range(3):  # renewals keep it: b never gets in while a renews within the ttl
        time.sleep(TTL / 3)
        assert a.acquire()
        assert not b.acquire()
    renewed_at = time.monotonic()

    # a stops renewing (a crash): b takes over once the lease expired, not before
    assert not b.acquire()
    assert wait_until(b.acquire, timeout=3 * TTL, interval=0.1)
    assert time.monotonic() - renewed_at >= TTL - GUARD
    assert b.held() and b.current().holder == "holder-b"
    assert not a.acquire()  # the old holder comes back: it is b's now
    assert wait_until(lambda: not a.held(), timeout=TTL)  # and a's own trust in it runs out


def test_a_row_nobody_claimed_on_top_stops_the_holder_and_is_waited_out(warehouse, name):
    """What a contender's slow write leaves (it gave up at the guard, its row landed after the holder's
    check, with a higher version): the holder stops trusting at its next renewal, and the row's writer
    does not take it as its own before it expires."""
    a = Lease(warehouse, "holder-a", ttl=TTL, guard=GUARD, name=name)
    b = Lease(warehouse, "holder-b", ttl=TTL, guard=GUARD, name=name)
    assert a.acquire() and a.held()
    b._write(a.current().version + 1, int(TTL * 1000))  # the late row of b's abandoned attempt
    assert not a.acquire() and not a.held()  # a stops at once, not when its own trust would end
    assert not b.acquire() and not b.held()  # b never claimed that row: it waits for its expiry
    assert wait_until(b.acquire, timeout=3 * TTL, interval=0.1)
    assert b.held() and not a.acquire()


def test_a_released_lease_is_free_at_once(warehouse, name):
    a = Lease(warehouse, "holder-a", ttl=60, guard=GUARD, name=name)
    b = Lease(warehouse, "holder-b", ttl=60, guard=GUARD, name=name)
    assert a.acquire()
    assert not b.acquire()
    a.release()
    assert not a.held()
    assert b.acquire() and b.current().holder == "holder-b"
    a.release()  # not a's any more: changes nothing
    assert b.current().holder == "holder-b" and b.current().live


def test_contenders_racing_for_a_free_lease_never_both_win(base_settings, warehouse):
    """Both read the free lease, both write: the read-after-write check lets at most one claim it."""
    clients = [warehouse, connect(base_settings.warehouse_dsn)]
    rounds = 12
    winners: list[list[str]] = []
    for _ in range(rounds):
        name = f"race-{uuid.uuid4().hex[:8]}"
        leases = [Lease(c, f"holder-{i}", ttl=60, guard=0.3, name=name) for i, c in enumerate(clients)]
        barrier = threading.Barrier(2)
        won: list[str] = []

        def contend(lease: Lease) -> None:
            barrier.wait()
            if lease.acquire():
                won.append(lease.holder)

        threads = [threading.Thread(target=contend, args=(lease,)) for lease in leases]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        winners.append(won)
        if won:
            assert leases[0].current().holder == won[0]  # the winner is the row everyone reads
    assert all(len(w) <= 1 for w in winners), winners
    assert sum(len(w) for w in winners) >= rounds // 2, winners  # and the lease does get taken


def test_bad_lease_timings_are_refused(warehouse):
    with pytest.raises(ValueError):
        Lease(warehouse, ttl=0)
    with pytest.raises(ValueError):
        Lease(warehouse, ttl=3, guard=1.5)


def test_the_scheduler_runs_the_jobs_of_up(settings, warehouse):
    """`tollgate scheduler` and `tollgate up` install the same jobs: settle, limits, the export schedules' sync."""
    scheduler = BackgroundScheduler(timezone="UTC")
    job = install_jobs(settings, settings.kafka_bootstrap, scheduler)
    try:
        ids = {j.id for j in scheduler.get_jobs()}
        assert {"settle", "limits", "export-schedules-sync"} <= ids, ids
    finally:
        job.close()


def test_tollgate_scheduler_takes_the_lease_runs_the_jobs_and_releases_it_on_sigterm(tmp_path, broker):
    """The real role as a process (embedded warehouse of its own: one process opens it at a time)."""
    import json
    import os
    import signal
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env.update(TOLLGATE_DATA_DIR=str(tmp_path), TOLLGATE_KAFKA_BOOTSTRAP=broker.bootstrap,
               TOLLGATE_TOPIC_LIMIT_ALERTS=f"a{uuid.uuid4().hex[:6]}", TOLLGATE_TOPIC_LIMITS_STATE=f"s{uuid.uuid4().hex[:6]}")
    cli = [sys.executable, "-m", "tollgate.cli"]
    subprocess.run([*cli, "migrate"], env=env, check=True, capture_output=True, timeout=120)
    proc = subprocess.Popen([*cli, "scheduler"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line.strip())
            if "holds the lease" in line:
                break
        assert any("holds the lease" in line for line in lines), (lines, proc.stderr.read()[-2000:] if proc.poll() is not None else "")
        holder = lines[-1].split()[1].rstrip(":")
        time.sleep(2)  # the jobs start: the limits job's first refresh, the schedules' sync
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    # read the lease in another process (the session's engine is open here; one engine path per process)
    check = (
        "import json, sys; from warehouse.client import connect; from warehouse.lease import Lease\n"
        "lease = Lease(connect(sys.argv[1]), 'next', ttl=60, guard=1.0)  # a fresh engine: first queries are slow\n"
        "cur = lease.current()\n"
        "print(json.dumps({'holder': cur.holder, 'live': cur.live, 'next': lease.acquire()}))"
    )
    out = subprocess.run([sys.executable, "-c", check, f"chdb://{tmp_path / 'warehouse'}"], env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    # released on the way out, so the next scheduler takes it at once instead of after the ttl
    assert json.loads(out.strip().splitlines()[-1]) == {"holder": holder, "live": False, "next": True}


def test_tollgate_limits_is_an_alias_of_the_scheduler():
    from tollgate.cli import cmd_scheduler, parser

    assert parser().parse_args(["limits"]).func is cmd_scheduler
    assert parser().parse_args(["scheduler"]).func is cmd_scheduler
