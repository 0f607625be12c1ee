"""
Log output: one line per record, as text for people or JSON for log pipelines.

Records may carry structured `fields` (the access log's request lines do): text shows them
as `key=value` pairs after the message, JSON as keys of the line's object. Either way a
record is one line, so a stream of them can be parsed, grepped and shipped as is.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "JsonFormatter", "LoggingConfig", "TextFormatter", "configure_logging"]

LOG_FORMATS: Final = ("text", "json")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
QUIET_LIBRARIES: Final = ("httpx", "httpcore")
"""
Loggers held at warnings, whatever the level: httpx logs a line per upstream request at
INFO (which the access log says better), httpcore every read and write at DEBUG.
"""


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """
    `[logging]`: `format` text or json; `level`; `access_log` turns the per-request lines on
    or off; `include_prompts` adds the prompt's messages to them (off: prompts may be private).
    """

    format: str = "text"
    level: str = "info"
    access_log: bool = True
    include_prompts: bool = False


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields: dict[str, Any] | None = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{key}={_text_value(value)}" for key, value in fields.items() if value is not None)
        return line.replace("\n", "\\n") if record.exc_info is None else line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields: dict[str, Any] | None = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure_logging(config: LoggingConfig, *, level: str | None = None) -> None:
    """Send every log record to stderr in `config.format`; `level` (the command line) wins over the config's."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel((level or config.level).upper())
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def _text_value(value: Any) -> str:
    if isinstance(value, str) and value and not any(c in value for c in ' "=\n'):
        return value
    if isinstance(value, (int, float, bool)):
        return orjson.dumps(value).decode()
    return orjson.dumps(value, default=str).decode()
