"""An ingest process: one consumer thread per (topic, worker) with its own warehouse client."""

from __future__ import annotations

import logging
import threading

import pyarrow as pa

from ingest.consumer import IngestConsumer
from ingest.dead_letter import DeadLetterQueue
from ingest.events import FEEDBACK, GENERATIONS, Codec
from ingest.producer import make_producer
from tollgate.settings import Settings
from warehouse.client import connect

log = logging.getLogger(__name__)


def codecs_by_topic(settings: Settings) -> dict[str, Codec]:
    return {settings.topic_gateway_logs: GENERATIONS, settings.topic_feedback: FEEDBACK}


def arrow_writer(dsn: str):
    client = connect(dsn)

    def write(table: str, data: pa.Table) -> None:
        client.insert_arrow(table, data, settings={"insert_deduplicate": 1})

    return write


class IngestWorkers:
    def __init__(self, settings: Settings, bootstrap: str, workers: int | None = None, topics: list[str] | None = None):
        self.settings = settings
        self.bootstrap = bootstrap
        self.producer = make_producer(bootstrap)
        self.dead_letters = DeadLetterQueue(self.producer, settings.topic_dead_letter)
        codecs = codecs_by_topic(settings)
        n = workers or settings.ingest_workers
        self.consumers: list[IngestConsumer] = []
        for topic in topics or list(codecs):
            for i in range(n):
                self.consumers.append(
                    IngestConsumer(
                        bootstrap=bootstrap,
                        topic=topic,
                        group_id=f"{settings.ingest_consumer_group}.{topic}",  # one group per topic: members of a group must share subscriptions
                        codec=codecs[topic],
                        write=arrow_writer(settings.warehouse_dsn),
                        dead_letters=self.dead_letters,
                        batch_size=settings.ingest_batch_size,
                        batch_seconds=settings.ingest_batch_seconds,
                        max_event_bytes=settings.ingest_max_event_bytes,
                        retry_max_seconds=settings.ingest_retry_max_seconds,
                        name=f"{topic}-{i}",
                    )
                )
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for c in self.consumers:
            t = threading.Thread(target=self._run, args=(c,), name=c.name, daemon=True)
            t.start()
            self.threads.append(t)

    @staticmethod
    def _run(consumer: IngestConsumer) -> None:
        try:
            consumer.run()
        except Exception:
            log.exception("%s stopped with an error", consumer.name)

    def stop(self, timeout: float = 30.0) -> None:
        for c in self.consumers:
            c.stop()
        for t in self.threads:
            t.join(timeout)
        self.producer.flush(timeout)
        self.producer.close(timeout)

    def stats(self) -> dict[str, dict[str, int]]:
        return {c.name: dict(c.stats) for c in self.consumers}
