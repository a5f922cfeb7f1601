"""Producing events (the API, `tollgate seed`, the dead-letter queue) and creating topics."""

from __future__ import annotations

import logging
import time

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

log = logging.getLogger(__name__)


def make_producer(bootstrap: str, **overrides) -> KafkaProducer:
    """An idempotence-free, acks=all producer with settings that keep throughput high."""
    config = dict(
        bootstrap_servers=bootstrap.split(","),
        # kafka-python 3 makes producers idempotent by default; after a broker restart such a
        # producer asks for its producer id again, which Tansu refuses, and it stays failed for
        # good (every publish a 503, every dead letter unconfirmable). Re-sent events are
        # harmless anyway: they carry their ids and the tables collapse them (docs/ingest.md).
        enable_idempotence=False,
        acks="all",
        linger_ms=5,
        batch_size=512 * 1024,
        max_request_size=16 * 1024 * 1024,
        retries=5,
        request_timeout_ms=15_000,
        max_block_ms=10_000,
    )
    config.update(overrides)
    return KafkaProducer(**config)


def ensure_topics(bootstrap: str, topics: list[str], partitions: int, timeout: float = 30.0,
                  configs: dict[str, dict[str, str]] | None = None) -> None:
    """Create the topics that do not exist yet (idempotent); ``configs``: topic configs by name
    (e.g. ``{"cleanup.policy": "compact"}``), applied when a topic is created."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), request_timeout_ms=10_000)
            break
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise
            log.info("waiting for Kafka at %s: %s", bootstrap, exc)
            time.sleep(0.5)
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            try:
                admin.create_topics([NewTopic(t, partitions, 1, topic_configs=(configs or {}).get(t, {})) for t in missing])
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
