"""The poll loop of one ingest consumer: fetch, hand to the pipeline, pause when it pushes back.

Offsets are never auto-committed. On a rebalance the pipeline is drained (insert +
commit) for a bounded time before the partitions go; whatever is still uncommitted
is abandoned and re-delivered to the next owner, which the tables collapse. Every
partition assigned starts at the group's committed offset, also one this consumer
keeps (kafka-python keeps a kept partition's fetch position, which is past what was
abandoned or left unprocessed).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import CommitFailedError, KafkaError

from ingest.dead_letter import DeadLetterQueue
from ingest.events import Codec
from ingest.pipeline import Batch, MessageRejected, build_pipeline
from tollgate import monitoring as m

log = logging.getLogger(__name__)

CONSUMER_DEFAULTS = dict(
    enable_auto_commit=False,
    auto_offset_reset="earliest",
    max_poll_records=5000,
    fetch_max_wait_ms=100,  # the embedded broker answers a fetch only after this wait
    fetch_min_bytes=1 << 20,
    fetch_max_bytes=64 << 20,
    max_partition_fetch_bytes=16 << 20,
    # Kafka's minimum session timeout; Tansu answers a JoinGroup after about half of
    # it, so a longer one only delays every start (10 s → 5 s join, 6 s → 3 s).
    session_timeout_ms=6_000,
    heartbeat_interval_ms=1_000,
    max_poll_interval_ms=300_000,
)


class IngestConsumer:
    """Consumes one topic into one table until :meth:`stop`."""

    def __init__(
        self,
        *,
        bootstrap: str,
        topic: str,
        group_id: str,
        codec: Codec,
        write: Callable,
        dead_letters: DeadLetterQueue,
        batch_size: int,
        batch_seconds: float,
        max_event_bytes: int,
        retry_max_seconds: float = 30.0,
        rebalance_drain_seconds: float = 5.0,
        name: str = "",
        consumer_overrides: dict | None = None,
    ):
        self.topic = topic
        self.name = name or f"{topic}-consumer"
        self.rebalance_drain_seconds = rebalance_drain_seconds
        self._stop = threading.Event()
        self._pending: deque = deque()  # ConsumerRecords not yet accepted by the pipeline
        self._paused = False
        self._blocked_since: float | None = None
        self._rewind: set[TopicPartition] = set()  # assigned partitions to start at the committed offset
        self.pause_after_seconds = 5.0
        self.stats = {"consumed": 0, "inserted": 0, "dead_lettered": 0, "batches": 0, "commits": 0}
        self._committed: dict[TopicPartition, int] = {}  # next offset, per partition, as last committed (or found)
        self._lag_at = 0.0
        config = {**CONSUMER_DEFAULTS, **(consumer_overrides or {})}
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap.split(","), group_id=group_id, client_id=self.name, **config
        )
        self.pipeline = build_pipeline(
            codec,
            self._timed(write),
            dead_letters,
            self._commit,
            batch_size=batch_size,
            batch_seconds=batch_seconds,
            max_event_bytes=max_event_bytes,
            retry_max_seconds=retry_max_seconds,
            on_insert=self._on_insert,
        )
        self._batcher = self.pipeline.next

    # -- pipeline callbacks (consumer thread) --------------------------------
    def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        assigned = self.consumer.assignment()
        owned = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items() if TopicPartition(t, p) in assigned}
        if not owned:
            return
        try:
            self.consumer.commit(owned)
            self.stats["commits"] += 1
            self._committed.update({tp: meta.offset for tp, meta in owned.items()})
        except (CommitFailedError, KafkaError) as exc:  # lost the partitions meanwhile: re-delivered, collapsed
            log.warning("%s: commit failed, the batch will be re-delivered: %s", self.name, exc)

    def _on_insert(self, batch: Batch, seconds: float) -> None:
        self.stats["inserted"] += len(batch.rows)
        self.stats["dead_lettered"] += len(batch.dead_letters)
        self.stats["batches"] += 1
        m.INGEST_EVENTS.labels(self.topic).inc(len(batch.rows))
        m.INGEST_DEAD_LETTERS.labels(self.topic).inc(len(batch.dead_letters))
        m.INGEST_BATCH_SIZE.labels(self.topic).observe(len(batch))

    def _timed(self, write: Callable) -> Callable:
        """``write`` (one insert attempt, on the insert thread), timed and its failures counted."""
        seconds, errors = m.INGEST_INSERT_SECONDS.labels(self.topic), m.INGEST_INSERT_ERRORS.labels(self.topic)

        def timed(codec, rows, metadata_values, traces=None) -> None:
            started = time.monotonic()
            try:
                write(codec, rows, metadata_values, traces)
            except Exception:
                errors.inc()
                raise
            finally:
                seconds.observe(time.monotonic() - started)

        return timed

    def _update_lag(self) -> None:
        """Consumer lag per partition: high watermark of the last fetch − committed offset (once a second)."""
        now = time.monotonic()
        if now - self._lag_at < 1.0:
            return
        self._lag_at = now
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            if tp not in self._committed:  # nothing committed by us yet: the group's offset, else the log's start
                try:
                    start = self.consumer.committed(tp, timeout_ms=1000)
                    if start is None:
                        start = self.consumer.beginning_offsets([tp], timeout_ms=1000)[tp]
                except KafkaError:  # the broker did not answer; the next measurement tries again
                    continue
                self._committed[tp] = start
            m.INGEST_CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, high - self._committed[tp]))

    def _forget_lag(self, partitions) -> None:
        for tp in partitions:
            self._committed.pop(tp, None)
            try:
                m.INGEST_CONSUMER_LAG.remove(tp.topic, str(tp.partition))
            except KeyError:
                pass

    # -- rebalance ---------------------------------------------------------------
    def _on_revoked(self, revoked) -> None:
        if not revoked:
            return
        log.info("%s: partitions revoked %s, draining", self.name, sorted((tp.topic, tp.partition) for tp in revoked))
        self.pipeline.join(self.rebalance_drain_seconds)
        self._batcher.abandon()  # anything not yet committed is re-delivered to the next owner
        gone = {(tp.topic, tp.partition) for tp in revoked}
        self._forget_lag(revoked)
        self._pending = deque(m for m in self._pending if (m.topic, m.partition) not in gone)

    def _on_assigned(self, assigned) -> None:
        log.info("%s: partitions assigned %s", self.name, sorted((tp.topic, tp.partition) for tp in assigned))
        self._rewind = set(assigned)  # seek in the poll loop: the listener must not block the client's event loop

    def _poll(self, timeout_ms: int) -> dict:
        """``consumer.poll``; after a rebalance, each assigned partition restarts at its committed offset
        (whatever this poll fetched from the kept position is dropped) and nothing stays paused."""
        records = self.consumer.poll(timeout_ms=timeout_ms)
        if self._rewind:
            rewind, self._rewind = self._rewind, set()
            committed = {tp: self.consumer.committed(tp) for tp in rewind}
            for tp, offset in committed.items():
                if offset is None:
                    self.consumer.seek_to_beginning(tp)
                else:
                    self.consumer.seek(tp, offset)
            self.consumer.resume(*self.consumer.paused())
            self._paused = False
            records = {tp: batch for tp, batch in records.items() if tp not in rewind}
        return records

    # -- loop ------------------------------------------------------------------
    def run(self) -> None:
        owner = self

        class Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked):
                owner._on_revoked(revoked)

            def on_partitions_assigned(self, assigned):
                owner._on_assigned(assigned)

        self.consumer.subscribe([self.topic], listener=Listener())
        try:
            while not self._stop.is_set():
                self._step()
            self.pipeline.join(None)  # drain: flush the open batch, insert, commit
        finally:
            self._forget_lag(list(self._committed))
            self.pipeline.close()
            self.consumer.close(autocommit=False)
            log.info("%s: stopped after %s", self.name, self.stats)

    def _step(self) -> None:
        self._drain_pending()
        if self._pending:
            # Pushed back: wait for the insert in flight rather than fetch more. Keep the
            # fetched records (pausing would discard them); only a long stall (warehouse
            # down) pauses the partitions, so that polling keeps us in the group.
            self.pipeline.poll(wait=0.05)
            self._drain_pending()
            if self._pending:
                self._blocked_since = self._blocked_since or time.monotonic()
                if time.monotonic() - self._blocked_since > self.pause_after_seconds:
                    if not self._paused:
                        self.consumer.pause(*self.consumer.assignment())
                        self._paused = True
                    self._take(self._poll(timeout_ms=0))  # stays in the group; paused partitions return nothing
                return
        self._blocked_since = None
        if self._paused:
            self.consumer.resume(*self.consumer.paused())
            self._paused = False
        self._take(self._poll(timeout_ms=100))
        self._drain_pending()
        self.pipeline.poll()
        self._update_lag()

    def _take(self, records: dict) -> None:
        for batch in records.values():
            self._pending.extend(batch)  # ConsumerRecords have what a Message has: topic, partition, offset, value, key
            self.stats["consumed"] += len(batch)

    def _drain_pending(self) -> None:
        pending = self._pending
        submit = self.pipeline.submit
        try:
            while pending:
                submit(pending[0])
                pending.popleft()
        except MessageRejected:
            pass

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

