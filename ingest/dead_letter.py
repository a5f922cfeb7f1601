"""The dead-letter topic: where events that can never be stored go, with the reason.

A dead-letter record is the original message bytes (and key) with headers:

- ``tollgate.reason``            why it was rejected (names the field),
- ``tollgate.source.topic``      topic it came from,
- ``tollgate.source.partition``  partition it came from,
- ``tollgate.source.offset``     offset it came from,
- ``tollgate.truncated``         ``true`` when the original was too big to re-produce whole.

Sending is asynchronous; :meth:`DeadLetterQueue.confirm` blocks until every record
of a batch is acknowledged (re-sending failures), and the batch's offsets are
committed only after that, so a dead letter is never lost either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kafka.errors import MessageSizeTooLargeError

if TYPE_CHECKING:
    from kafka import KafkaProducer
    from kafka.producer.future import FutureRecordMetadata

    from ingest.pipeline import Message

log = logging.getLogger(__name__)

TRUNCATE_TO = 64 * 1024
REASON_MAX = 2000


@dataclass
class DeadLetter:
    message: "Message"
    reason: str
    future: "FutureRecordMetadata | None" = None
    truncated: bool = False


class DeadLetterQueue:
    def __init__(self, producer: "KafkaProducer", topic: str, confirm_timeout: float = 30.0):
        self.producer = producer
        self.topic = topic
        self.confirm_timeout = confirm_timeout
        self.sent = 0

    def headers(self, letter: DeadLetter) -> list[tuple[str, bytes]]:
        m = letter.message
        headers = [
            ("tollgate.reason", letter.reason[:REASON_MAX].encode()),
            ("tollgate.source.topic", m.topic.encode()),
            ("tollgate.source.partition", str(m.partition).encode()),
            ("tollgate.source.offset", str(m.offset).encode()),
        ]
        if letter.truncated:
            headers.append(("tollgate.truncated", b"true"))
        return headers

    def _produce(self, letter: DeadLetter) -> None:
        value = letter.message.value
        if letter.truncated and value is not None:
            value = value[:TRUNCATE_TO]
        letter.future = self.producer.send(self.topic, value=value, key=letter.message.key, headers=self.headers(letter))

    def send(self, message: "Message", reason: str) -> DeadLetter:
        letter = DeadLetter(message, reason)
        try:
            try:
                self._produce(letter)
            except MessageSizeTooLargeError:
                letter.truncated = True
                self._produce(letter)
        except Exception as exc:  # broker unreachable, or refused even truncated: confirm() re-sends
            log.warning("dead-letter send failed, will retry: %s", exc)
            letter.future = None
        self.sent += 1
        return letter

    def confirm(self, letters: list[DeadLetter]) -> None:
        """Block until each record is acknowledged; re-send the ones that failed.

        Raises when a record cannot be delivered within the timeout, so the caller
        keeps the batch uncommitted and retries.
        """
        for letter in letters:
            if letter.future is not None:
                try:
                    letter.future.get(timeout=self.confirm_timeout)
                    continue
                except MessageSizeTooLargeError:
                    letter.truncated = True
                except Exception:
                    pass
            self._produce(letter)
            letter.future.get(timeout=self.confirm_timeout)
