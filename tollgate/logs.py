"""Log lines: one JSON object per line (``TOLLGATE_LOG_FORMAT=json``, the default) or plain text.

A JSON line has ``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``, ``message``,
``request_id`` while an API request is being served (analytics_api/observe.py sets it),
``process`` (the role's process: ``ingest-worker-0``…), ``exc`` with the traceback of an
exception, and the ``extra=`` fields of the call.
"""

from __future__ import annotations

import contextvars
import logging
from datetime import UTC, datetime

import orjson

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# attributes every LogRecord has; anything else on a record came from ``extra=``
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName", "request_id", "process_name",
    "color_message",  # uvicorn's copy of the message with terminal colours
}


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str | None = None):
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id.get()
        if rid:
            line["request_id"] = rid
        if self.process:
            line["process"] = self.process
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self, process: str | None = None):
        prefix = f"{process} " if process else ""
        super().__init__(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rid = request_id.get()
        return f"{text} [request_id={rid}]" if rid else text


def formatter(fmt: str, process: str | None = None) -> logging.Formatter:
    return JsonFormatter(process) if fmt == "json" else TextFormatter(process)


def configure(level: int | str, fmt: str = "json", process: str | None = None) -> None:
    """The root logger writes to stderr in ``fmt``; every other logger (uvicorn's too) propagates to it."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(fmt, process))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
