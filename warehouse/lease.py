"""A lease in ClickHouse: which `tollgate scheduler` process runs the scheduled jobs (docs/deploy.md).

ClickHouse has no compare-and-set, so the lease is a version race that every contender
resolves the same way. ``scheduler_lease`` (migration 0017) is a ReplacingMergeTree(version):
the current lease is its row of the highest version. :meth:`Lease.acquire` (also the
renewal):

1. reads the current row (``FINAL``) and whether it has expired, by the server's clock;
2. if it has not expired and is not the lease this holder holds (someone else's, or a row of
   its own it never claimed), gives up — and, when someone else's row is on top, stops
   trusting the lease at once;
3. otherwise writes a row ``(holder = me, expires_at = server now + ttl)`` whose version is
   one higher in its upper 32 bits than the row read, with 32 random lower bits (so two
   contenders that read the same row never write the same version);
4. gives up when steps 1–3 took longer than ``guard`` (a contender must write within
   ``guard`` of reading);
5. waits ``guard``, reads again, and holds the lease only if the current row is its own.

Any contender that read the same row as we did wrote within ``guard`` of that read, so
before our second read: both see both rows, the highest version wins, and exactly one of
them (at most) concludes it holds the lease. A contender that read after our write sees
our unexpired row and gives up.

The holder renews every ``ttl / 3`` and trusts the lease for ``ttl - guard`` from the start
of its last successful acquire (its own monotonic clock; the server's expiry is later than
that). If it cannot renew before then (ClickHouse unreachable, a newer holder), it must stop
starting jobs: :meth:`Lease.held` turns false. Failure mode: a job already running when the
lease ends runs to completion, so a process frozen for longer than the ttl in the middle of
a job (a long GC or VM pause) can overlap with the next holder's first jobs. The jobs are
written to survive that (docs/deploy.md).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from clickhouse_connect.driver.client import Client

from warehouse.cluster import CLUSTER_READ, CLUSTER_WRITE, layout

log = logging.getLogger(__name__)

SCHEDULER = "scheduler"

# Cluster mode: the lease's shard is replicated; a write must be on a majority of its replicas
# before it returns, and a read must see every quorum write (else the read-after-write
# check could read a replica that has not fetched the row yet).


def holder_id() -> str:
    """host:pid:random — unique per process start."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Current:
    holder: str
    version: int
    live: bool  # not expired, by the server's clock


class Lease:
    def __init__(self, client: Client, holder: str | None = None, ttl: float = 30.0, guard: float | None = None,
                 name: str = SCHEDULER):
        if ttl <= 0:
            raise ValueError("ttl must be > 0")
        self.client = client
        self.holder = holder or holder_id()
        self.ttl = ttl
        self.guard = guard if guard is not None else ttl / 10
        if not 0 < self.guard < ttl / 3:
            raise ValueError("guard must be > 0 and < ttl / 3")
        self.name = name
        self._valid_until = 0.0  # monotonic
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ state

    def current(self) -> Current | None:
        settings = CLUSTER_READ if layout(self.client).cluster else None
        rows = self.client.query(
            "SELECT holder, version, expires_at > now64(3) FROM scheduler_lease FINAL WHERE name = {n:String}",
            parameters={"n": self.name}, settings=settings).result_rows
        if not rows:
            return None
        holder, version, live = rows[0]
        return Current(holder, int(version), bool(live))

    def held(self) -> bool:
        """Whether this process may start a job now."""
        return time.monotonic() < self._valid_until

    def remaining(self) -> float:
        """Seconds this holder may still trust the lease (0 when it does not hold it)."""
        return max(0.0, self._valid_until - time.monotonic())

    # ------------------------------------------------------------------ acquire / renew / release

    def acquire(self) -> bool:
        """Take or renew the lease; True when this holder holds it afterwards. Never raises for
        ClickHouse errors (the lease is then not held: ``held()`` runs out)."""
        with self._lock:
            try:
                return self._acquire()
            except Exception as exc:
                log.warning("scheduler lease: could not acquire or renew (%s)", exc)
                return False

    def _acquire(self) -> bool:
        started = time.monotonic()
        cur = self.current()
        if cur is not None and cur.live and not (cur.holder == self.holder and self.held()):
            # Someone else's row is on top: stop trusting our lease now. Our own live row that we do
            # not hold (an attempt that gave up at the guard, yet won; a renewal too late) is waited
            # out like anyone's: taking it back at once could overlap a holder that claimed meanwhile.
            if cur.holder != self.holder:
                self._valid_until = 0.0
            return False
        version = (((cur.version >> 32) + 1 if cur else 1) << 32) | random.getrandbits(32)
        self._write(version, int(self.ttl * 1000))
        if time.monotonic() - started > self.guard:
            log.warning("scheduler lease: the write took longer than %.1f s; not claiming the lease", self.guard)
            return False
        time.sleep(self.guard)
        after = self.current()
        if after is None or after.holder != self.holder or after.version != version:
            return False
        self._valid_until = started + self.ttl - self.guard
        return True

    def release(self) -> None:
        """Give the lease up now (a clean stop): an expired row in our name, so others need not wait."""
        with self._lock:
            self._valid_until = 0.0
            try:
                cur = self.current()
                if cur is None or cur.holder != self.holder:
                    return
                self._write(cur.version + 1, -1)
            except Exception as exc:
                log.warning("scheduler lease: could not release (%s); it expires by itself", exc)

    def _write(self, version: int, ttl_ms: int) -> None:
        """A lease row in our name, expiring ``ttl_ms`` after the server's now (negative: already expired)."""
        self.client.command(
            "INSERT INTO scheduler_lease (name, holder, expires_at, version) "
            "SELECT {n:String}, {h:String}, now64(3) + toIntervalMillisecond({ttl:Int64}), {v:UInt64}",
            parameters={"n": self.name, "h": self.holder, "ttl": ttl_ms, "v": version},
            settings=CLUSTER_WRITE if layout(self.client).cluster else None)
