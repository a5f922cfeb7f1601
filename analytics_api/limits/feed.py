"""The limits job's Kafka side: alert events and the compacted enforcement state.

``send`` returns only after Kafka acknowledged every record (acks=all) and raises
``KafkaError`` otherwise. ``alert_ids_since`` reads the alerts topic back from given
offsets: at start-up, for an alert whose publication was interrupted, it tells
whether the alert already reached the topic.
"""

from __future__ import annotations

import logging
import time

import orjson
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from ingest.producer import make_producer

log = logging.getLogger(__name__)


class Feed:
    def __init__(self, bootstrap: str | None, alerts_topic: str, state_topic: str, timeout: float = 10.0):
        self.bootstrap = bootstrap
        self.alerts_topic = alerts_topic
        self.state_topic = state_topic
        self.timeout = timeout
        self._producer = None
        self._consumer = None

    def _get_producer(self):
        if self._producer is None:
            if not self.bootstrap:
                raise KafkaError("no Kafka bootstrap configured")
            ms = int(self.timeout * 1000)
            self._producer = make_producer(self.bootstrap, max_block_ms=ms, bootstrap_timeout_ms=ms, linger_ms=2)
        return self._producer

    def _get_consumer(self) -> KafkaConsumer:
        if self._consumer is None:
            if not self.bootstrap:
                raise KafkaError("no Kafka bootstrap configured")
            self._consumer = KafkaConsumer(bootstrap_servers=self.bootstrap.split(","), group_id=None,
                                           enable_auto_commit=False, fetch_max_wait_ms=100,
                                           request_timeout_ms=int(self.timeout * 1000) + 5000,
                                           bootstrap_timeout_ms=int(self.timeout * 1000))
        return self._consumer

    def send(self, topic: str, records: list[tuple[bytes, bytes | None]]) -> None:
        """Produce ``(key, value)`` records (value None: a tombstone) and wait for every ack."""
        if not records:
            return
        producer = self._get_producer()
        futures = [producer.send(topic, key=k, value=v) for k, v in records]
        producer.flush(timeout=self.timeout)
        for f in futures:
            f.get(timeout=self.timeout)

    def end_offsets(self, topic: str) -> dict[int, int]:
        """Each partition's end offset (a lower bound: reading from it misses nothing published later)."""
        consumer = self._get_consumer()
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            return {}
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in parts])
        return {tp.partition: int(off) for tp, off in ends.items()}

    def alert_ids_since(self, offsets: dict[int, int], timeout: float | None = None) -> set[str]:
        """``alert_id`` of every alert on the alerts topic from ``offsets`` (partitions not named: from the start) to its end."""
        consumer = self._get_consumer()
        parts = sorted(consumer.partitions_for_topic(self.alerts_topic) or ())
        if not parts:
            return set()
        tps = [TopicPartition(self.alerts_topic, p) for p in parts]
        consumer.assign(tps)
        for tp in tps:
            if tp.partition in offsets:
                consumer.seek(tp, offsets[tp.partition])
            else:
                consumer.seek_to_beginning(tp)
        ends = consumer.end_offsets(tps)
        found: set[str] = set()
        deadline = time.monotonic() + (timeout or self.timeout * 3)
        quiet = 0
        while time.monotonic() < deadline:
            batches = consumer.poll(timeout_ms=300)
            for records in batches.values():
                for r in records:
                    try:
                        found.add(orjson.loads(r.value)["alert_id"])
                    except (orjson.JSONDecodeError, KeyError, TypeError):
                        continue
            # the reported end can be the base offset of the last batch: read past it, then one quiet poll
            caught_up = all(consumer.position(tp) >= ends[tp] for tp in tps)
            quiet = quiet + 1 if caught_up and not batches else 0
            if quiet >= 2:
                break
        else:
            raise KafkaError(f"could not read {self.alerts_topic} to its end in time")
        consumer.unsubscribe()
        return found

    def close(self) -> None:
        for client in (self._producer, self._consumer):
            if client is not None:
                try:
                    client.close(timeout=5) if client is self._producer else client.close()
                except KafkaError as exc:
                    log.warning("closing the limits feed: %s", exc)
        self._producer = self._consumer = None
