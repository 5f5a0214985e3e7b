"""Log output: `text` (the default, for people) or `json` (one object per line, for machines)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

from services.log_context import ANSWER_IDS

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class AnswerContextFilter(logging.Filter):
    """Stamps each record with the ids of the answer whose task logs it, if any."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = ANSWER_IDS.get()
        if ids is not None:
            record.sessionId, record.messageId = ids
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (ISO 8601, UTC), level, logger, message, and
    sessionId/messageId, exception and stack when there are any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        session_id = getattr(record, "sessionId", None)
        if session_id is not None:
            entry["sessionId"] = session_id
            entry["messageId"] = getattr(record, "messageId", None)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # ensure_ascii: a control or odd character from anywhere stays one escaped line
        return json.dumps(entry, ensure_ascii=True, default=str)


def configure_logging(log_format: str = "text", level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """Send every log record to ``stream`` (stderr) in ``log_format`` ("text" or "json")."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
        handler.addFilter(AnswerContextFilter())
        logging.captureWarnings(True)  # a Python warning too becomes a JSON line, not raw text
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
