"""Ingest consumers on threads: one per (topic, worker), each with its own sink.

Each thread is supervised: if its consumer ever raises (broker gone, a bug), the
error is logged, and after a back-off a fresh consumer resumes from the committed
offsets. Nothing uncommitted is lost by that: it is re-delivered.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Callable

from kafka.errors import KafkaError

from ingest.consumer import IngestConsumer
from ingest.dead_letter import DeadLetterQueue
from ingest.events import AUDIT, FEEDBACK, GENERATIONS, Codec
from ingest.producer import make_producer
from tollgate.settings import Settings
from ingest.sink import DirectSink, Sink

log = logging.getLogger(__name__)


def codecs_by_topic(settings: Settings) -> dict[str, Codec]:
    return {settings.topic_gateway_logs: GENERATIONS, settings.topic_feedback: FEEDBACK, settings.topic_audit: AUDIT}


class _Supervised:
    """Runs consumers made by ``factory`` until stopped, replacing one that crashed."""

    def __init__(self, name: str, factory: Callable[[], IngestConsumer]):
        self.name = name
        self.factory = factory
        self.current: IngestConsumer | None = None
        self.restarts = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def _loop(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            try:
                self.current = self.factory()
                if self._stop.is_set():
                    self.current.stop()
                self.current.run()
                return
            except Exception:
                log.exception("%s crashed; restarting from the committed offsets in %.1fs", self.name, delay)
                self.restarts += 1
                if self._stop.wait(delay + random.uniform(0, delay)):
                    return
                delay = min(delay * 2, 30.0)

    def stop(self) -> None:
        self._stop.set()
        if self.current is not None:
            self.current.stop()


class IngestWorkers:
    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        workers: int = 1,
        topics: list[str] | None = None,
        sink: Callable[[], Sink] | None = None,
    ):
        self.settings = settings
        self.bootstrap = bootstrap
        self.make_sink = sink or (lambda: DirectSink(settings.warehouse_dsn, settings.ingest_fault_file))
        self.producer = make_producer(bootstrap)
        self.dead_letters = DeadLetterQueue(self.producer, settings.topic_dead_letter)
        codecs = codecs_by_topic(settings)
        self.units = [
            _Supervised(f"{topic}-{i}", self._factory(topic, codecs[topic], f"{topic}-{i}"))
            for topic in (topics or list(codecs))
            for i in range(workers)
        ]

    def _factory(self, topic: str, codec: Codec, name: str) -> Callable[[], IngestConsumer]:
        s = self.settings

        def make() -> IngestConsumer:
            return IngestConsumer(
                bootstrap=self.bootstrap,
                topic=topic,
                group_id=f"{s.ingest_consumer_group}.{topic}",  # one group per topic: members of a group share subscriptions
                codec=codec,
                write=self.make_sink(),
                dead_letters=self.dead_letters,
                batch_size=s.ingest_batch_size,
                batch_seconds=s.ingest_batch_seconds,
                max_event_bytes=s.ingest_max_event_bytes,
                retry_max_seconds=s.ingest_retry_max_seconds,
                name=name,
            )

        return make

    @property
    def consumers(self) -> list[IngestConsumer]:
        return [u.current for u in self.units if u.current is not None]

    def start(self) -> None:
        for unit in self.units:
            unit.thread.start()

    def stop(self, timeout: float = 30.0) -> bool:
        """Drain every consumer (insert, commit) for up to ``timeout`` seconds in all; False if one did not finish
        (its uncommitted events are re-delivered to whoever consumes its partitions next)."""
        deadline = time.monotonic() + timeout
        for unit in self.units:
            unit.stop()
        for unit in self.units:
            unit.thread.join(max(0.0, deadline - time.monotonic()))
        try:  # dead letters were flushed with their batches; this only bounds the close
            self.producer.flush(max(0.0, deadline - time.monotonic()))
            self.producer.close(max(0.0, deadline - time.monotonic()))
        except KafkaError as exc:
            log.warning("closing the dead-letter producer: %s", exc)
        return not any(unit.thread.is_alive() for unit in self.units)

    def stats(self) -> dict[str, dict[str, int]]:
        return {c.name: dict(c.stats) for c in self.consumers}
