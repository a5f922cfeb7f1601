"""The API's write path: events go to Kafka, acknowledged by every in-sync replica
(acks=all) before the API answers. Ingest workers write them to ClickHouse.

``publish`` either returns after every event of the call was acknowledged, or
raises a 503: the caller answers with an error and the client retries. A retry may
re-send events that did reach Kafka; that is harmless because every event carries
its own id and the event tables collapse duplicates (docs/ingest.md).
"""

from __future__ import annotations

import logging
import threading

from fastapi import HTTPException
from kafka.errors import KafkaError

from ingest.producer import make_producer

log = logging.getLogger(__name__)


class Publisher:
    """One lazily created producer per API process, shared by request threads."""

    def __init__(self, bootstrap: str | None, timeout: float = 10.0):
        self.bootstrap = bootstrap
        self.timeout = timeout
        self._producer = None
        self._lock = threading.Lock()

    def _get(self):
        if self._producer is None:
            with self._lock:
                if self._producer is None:
                    if not self.bootstrap:
                        raise KafkaError("no Kafka bootstrap configured")
                    ms = int(self.timeout * 1000)  # bootstrap too: kafka-python's own default is 30 s
                    self._producer = make_producer(self.bootstrap, max_block_ms=ms, bootstrap_timeout_ms=ms)
        return self._producer

    def publish(self, topic: str, values: list[bytes], keys: list[bytes | None] | None = None) -> None:
        """Send ``values`` and wait for all acks; HTTP 503 when Kafka cannot take them."""
        try:
            producer = self._get()
            futures = [producer.send(topic, value=v, key=None if keys is None else keys[i]) for i, v in enumerate(values)]
            producer.flush(timeout=self.timeout)
            for f in futures:
                f.get(timeout=self.timeout)
        except (KafkaError, TimeoutError) as exc:
            log.warning("publishing to %s failed: %s", topic, exc)
            raise HTTPException(503, f"the event log (Kafka) is unavailable, nothing was accepted; retry later ({type(exc).__name__})") from exc

    def metadata_error(self, topic: str) -> str | None:
        """None when the producer has (or gets, within its timeout) the partitions of ``topic``; else why not."""
        try:
            if not self._get().partitions_for(topic):
                return f"no partitions known for {topic}"
            return None
        except (KafkaError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        """Flush and close; at shutdown a broker that is gone is not an error worth raising.

        kafka-python's ``close`` flushes first and, when that times out, raises before it stops
        its sender thread, which then reconnects to the gone broker for the life of the process.
        So after a failed flush the sender is stopped without sending: what it still held was
        never acknowledged, and its callers were answered 503."""
        if self._producer is None:
            return
        try:
            self._producer.close(timeout=5)
        except KafkaError as exc:
            log.warning("closing the producer: %s; dropping what it could not send", exc)
            sender = getattr(self._producer, "_sender", None)  # no public way to abort pending sends
            if sender is not None:
                sender.force_close()  # fails the pending batches, then the thread ends
            try:
                self._producer.close(timeout=2)
            except KafkaError as again:
                log.warning("closing the producer after dropping its sends: %s", again)
