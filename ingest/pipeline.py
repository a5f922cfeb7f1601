"""The processing steps of an ingest consumer, after Sentry's arroyo.

A consumer is a chain ``Validate → Batch → Insert → Commit``. Each step has
``submit`` (take one item; raise :class:`MessageRejected` to push back),
``poll`` (do time-based work, pass finished work on; ``poll(wait)`` may block up to
``wait`` seconds for the work in flight, which a pushed-back consumer uses), ``join`` (finish what is in
flight) and ``close``. The order gives the guarantee: an offset reaches
``Commit`` only after the batch holding it was acknowledged by ClickHouse and
every dead-letter record of that batch was acknowledged by Kafka. A crash at any
point therefore re-delivers, never loses; the tables collapse re-deliveries (see
docs/ingest.md).

Everything except the insert itself runs on the consumer thread, because a
kafka-python consumer is not thread-safe.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import Callable, Protocol

from ingest.dead_letter import DeadLetter, DeadLetterQueue
from ingest.events import BatchTraces, Codec, InvalidEvent, MetadataValues

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]


class MessageRejected(Exception):
    """A step is full; the caller keeps the item and retries later (backpressure)."""


@dataclass(slots=True)
class Message:
    """What the steps read of a message; kafka-python's ConsumerRecord has the same fields."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None


@dataclass
class Batch:
    """Rows to insert together, the offsets they cover, and their dead letters."""

    rows: list[bytes] = field(default_factory=list)  # encoded rows (Codec.encode)
    metadata_values: MetadataValues = field(default_factory=dict)  # the rows' metadata pairs (gateway logs)
    traces: BatchTraces = field(default_factory=BatchTraces)  # the rows' traces (gateway logs)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)  # next offset to consume
    opened_at: float = field(default_factory=time.monotonic)
    generation: int = 0

    def __len__(self) -> int:
        return len(self.rows) + len(self.dead_letters)


class Step(Protocol):
    def submit(self, item) -> None: ...
    def poll(self, wait: float = 0.0) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...
    def close(self) -> None: ...


# --------------------------------------------------------------------------- steps


class Validate:
    """Decode each message; an invalid one becomes a dead letter, the rest rows."""

    def __init__(self, codec: Codec, dead_letters: DeadLetterQueue, max_event_bytes: int, next_step: "BatchStep"):
        self.codec = codec
        self.dlq = dead_letters
        self.max_event_bytes = max_event_bytes
        self.next = next_step

    def submit(self, message: Message) -> None:
        self.next.ensure_room()  # push back before producing a dead letter we could not hand on
        value = message.value
        try:
            if value is None:
                raise InvalidEvent("empty message (null value)")
            if len(value) > self.max_event_bytes:
                raise InvalidEvent(f"oversized event: {len(value)} bytes > {self.max_event_bytes}")
            batch = self.next.open()
            row = self.codec.encode(value, batch.metadata_values, batch.traces)
        except InvalidEvent as exc:
            self.next.add(message, dead_letter=self.dlq.send(message, exc.reason))
        except MemoryError:  # the process's trouble, not the event's: never dead-letter (and commit) a good event
            raise
        except Exception as exc:  # a decoder bug that one input sets off
            # Raised again, it would crash the consumer at this message after every restart and
            # hold back the partition; dead-lettered, the event can be replayed once fixed.
            log.exception("could not decode %s[%d]@%d; dead-lettering it", message.topic, message.partition, message.offset)
            self.next.add(message, dead_letter=self.dlq.send(message, f"could not decode the event ({type(exc).__name__}: {exc})"))
        else:
            self.next.add(message, row=row)

    def poll(self, wait: float = 0.0) -> None:
        self.next.poll(wait)

    def join(self, timeout: float | None = None) -> None:
        self.next.join(timeout)

    def close(self) -> None:
        self.next.close()


class BatchStep:
    """Collect rows until ``max_count`` items or ``max_seconds`` since the first one."""

    def __init__(self, max_count: int, max_seconds: float, next_step: "Insert"):
        self.max_count = max_count
        self.max_seconds = max_seconds
        self.next = next_step
        self.generation = 0
        self.batch: Batch | None = None
        self.ready: Batch | None = None  # a full batch the next step did not accept yet

    def ensure_room(self) -> None:
        if self.ready is not None:
            self._hand_on()
            if self.ready is not None:
                raise MessageRejected()

    def open(self) -> Batch:
        """The batch being filled (a new one if none is)."""
        if self.batch is None:
            self.batch = Batch(generation=self.generation)
        return self.batch

    def add(self, message: Message, row: bytes | None = None, dead_letter: DeadLetter | None = None) -> None:
        self.open()
        if dead_letter is not None:
            self.batch.dead_letters.append(dead_letter)
        else:
            self.batch.rows.append(row)
        self.batch.offsets[(message.topic, message.partition)] = message.offset + 1
        if len(self.batch) >= self.max_count:
            self._close_batch()

    def _close_batch(self) -> None:
        self.ready, self.batch = self.batch, None
        self._hand_on()

    def _hand_on(self) -> None:
        try:
            self.next.submit(self.ready)
            self.ready = None
        except MessageRejected:
            pass

    def poll(self, wait: float = 0.0) -> None:
        self.next.poll(wait if self.ready is not None else 0.0)
        if self.ready is not None:
            self._hand_on()
        if self.ready is None and self.batch is not None and time.monotonic() - self.batch.opened_at >= self.max_seconds:
            self._close_batch()

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.batch is not None and self.ready is None:
            self._close_batch()
        while self.ready is not None or self.batch is not None:
            if deadline is not None and time.monotonic() > deadline:
                break
            self.next.join(0.05)
            self.poll()
            if self.ready is None and self.batch is not None:
                self._close_batch()
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        self.next.join(remaining)

    def abandon(self) -> None:
        """Forget uncommitted work (after a rebalance took our partitions away)."""
        self.generation += 1
        self.batch = None
        self.ready = None
        self.next.abandon(self.generation)

    def close(self) -> None:
        self.next.close()


class Insert:
    """Insert one batch at a time on a worker thread, retrying until ClickHouse acknowledges.

    Back-off is exponential with full jitter, capped at ``retry_max_seconds``. While a
    batch is in flight the next one is rejected, which pauses the consumer.
    """

    def __init__(
        self,
        codec: Codec,
        write: Callable[[Codec, list[bytes], MetadataValues, BatchTraces], None],
        dead_letters: DeadLetterQueue,
        next_step: "Commit",
        retry_max_seconds: float = 30.0,
        on_insert: Callable[[Batch, float], None] | None = None,
    ):
        self.codec = codec
        self.write = write
        self.dlq = dead_letters
        self.next = next_step
        self.retry_max_seconds = retry_max_seconds
        self.on_insert = on_insert
        self.min_generation = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"insert-{codec.table}")
        self._inflight: tuple[Batch, Future] | None = None
        self._stopping = threading.Event()
        self.failures = 0

    def submit(self, batch: Batch) -> None:
        self.poll()
        if self._inflight is not None:
            raise MessageRejected()
        self._inflight = (batch, self._pool.submit(self._run, batch))

    def _run(self, batch: Batch) -> None:
        attempt = 0
        started = time.monotonic()
        pending_rows = bool(batch.rows)
        while True:
            try:
                if pending_rows:
                    self.write(self.codec, batch.rows, batch.metadata_values, batch.traces)
                    pending_rows = False  # acknowledged: never insert this batch again, even if DLQ retries below
                self.dlq.confirm(batch.dead_letters)
                break
            except Exception as exc:  # warehouse or broker trouble: keep the batch (uncommitted), back off, retry
                if self._stopping.is_set():
                    raise
                self.failures += 1
                attempt += 1
                delay = random.uniform(0, min(self.retry_max_seconds, 0.1 * 2**attempt))
                log.warning("insert into %s failed (attempt %d), retrying in %.2fs: %s", self.codec.table, attempt, delay, exc)
                if self._stopping.wait(delay):
                    raise
        if self.on_insert:
            self.on_insert(batch, time.monotonic() - started)

    def poll(self, wait: float = 0.0) -> None:
        if self._inflight is None:
            return
        batch, future = self._inflight
        if wait > 0:
            futures_wait([future], timeout=wait)
        if not future.done():
            return
        self._inflight = None
        # _run only gives up when the consumer is stopping: then nothing is committed
        # and the batch is re-delivered to whoever consumes these partitions next.
        if future.exception() is None and batch.generation >= self.min_generation:
            self.next.submit(batch)

    def join(self, timeout: float | None = None) -> None:
        if self._inflight is None:
            return
        _, future = self._inflight
        try:
            future.result(timeout)
        except TimeoutError:
            return
        except Exception:
            pass
        self.poll()

    def abandon(self, generation: int) -> None:
        self.min_generation = generation

    def close(self) -> None:
        self._stopping.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.next.close()


class Commit:
    """Commit the offsets of a durable batch (on the consumer thread)."""

    def __init__(self, commit: Callable[[dict[TopicPartition, int]], None]):
        self.commit = commit

    def submit(self, batch: Batch) -> None:
        if batch.offsets:
            self.commit(batch.offsets)

    def poll(self, wait: float = 0.0) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def build_pipeline(
    codec: Codec,
    write: Callable[[Codec, list[bytes], MetadataValues], None],
    dead_letters: DeadLetterQueue,
    commit: Callable[[dict[TopicPartition, int]], None],
    *,
    batch_size: int,
    batch_seconds: float,
    max_event_bytes: int,
    retry_max_seconds: float = 30.0,
    on_insert: Callable[[Batch, float], None] | None = None,
) -> Validate:
    insert = Insert(codec, write, dead_letters, Commit(commit), retry_max_seconds, on_insert)
    return Validate(codec, dead_letters, max_event_bytes, BatchStep(batch_size, batch_seconds, insert))
