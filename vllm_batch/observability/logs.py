"""Logging: JSON lines or console lines, context fields from contextvars, secrets redacted.

Every stdlib ``logging`` call goes through one root handler. ``bound(batch_id=...)`` sets
fields for the code inside it (tasks created inside inherit them), and every log line
there carries them. Secrets (bearer tokens, ``api_key=`` values, ``whsec_`` secrets, DSN
passwords and the configured keys themselves) are replaced before anything is written.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import IO, Any, Literal

LogFormat = Literal["auto", "json", "console"]
LEVELS = ("debug", "info", "warning", "error", "critical")
CONTEXT_FIELDS = ("batch_id", "chunk_id", "worker", "request_id", "delivery_id")
# Chatty third-party loggers: WARNING unless the level is debug.
NOISY_LOGGERS = ("vllm", "httpx", "httpcore", "alembic", "urllib3", "filelock")
REDACTED = "[REDACTED]"
MIN_SECRET_LENGTH = 8  # shorter literal "secrets" would shred ordinary text

_EMPTY: Mapping[str, str] = MappingProxyType({})
_context: ContextVar[Mapping[str, str]] = ContextVar("vllm_batch_log_context", default=_EMPTY)
_secrets: set[str] = set()
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's coloured copy of the message
    "vllm_process_name",  # vLLM's record factory, when vLLM configured logging itself
}
_VALUE = r"[^\s\"',;&}\]]+"
_KEEP = r"(?![\[$<])"  # already [REDACTED], a $VARIABLE or a <placeholder>: not a secret
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(rf"(?i)\b(bearer|basic)\s+{_KEEP}{_VALUE}"), rf"\1 {REDACTED}"),
    (
        re.compile(
            r"(?i)((?:api[_-]?key|authorization|secret|password|passwd|access[_-]?token)"
            rf"[\"']?\s*[:=]\s*[\"']?)(?:(?:bearer|basic)\s+)?+{_KEEP}{_VALUE}"
        ),
        rf"\1{REDACTED}",
    ),
    (re.compile(r"whsec_[A-Za-z0-9+/=_-]+"), f"whsec_{REDACTED}"),
    (re.compile(r"(://[^:/@\s]+:)[^@\s/]+@"), rf"\1{REDACTED}@"),
]


# ------------------------------------------------------------------ context


@contextlib.contextmanager
def bound(**fields: str | None) -> Iterator[None]:
    """Add ``fields`` (None values skipped) to every log line written inside the block."""
    given = {key: str(value) for key, value in fields.items() if value is not None}
    token = _context.set({**_context.get(), **given})
    try:
        yield
    finally:
        _context.reset(token)


def context() -> dict[str, str]:
    """The fields bound here."""
    return dict(_context.get())


# ------------------------------------------------------------------ redaction


def add_secrets(values: Iterable[str | None]) -> None:
    """Literal values that must never be written (API keys, passwords, tokens)."""
    _secrets.update(v for v in values if v and len(v) >= MIN_SECRET_LENGTH)


def redact(text: str) -> str:
    """``text`` with bearer tokens, key/secret/password values and known secrets replaced."""
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


# ------------------------------------------------------------------ formatters


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """Context fields, then ``extra=`` fields of ``record``, secrets redacted."""
    fields: dict[str, Any] = dict(getattr(record, "log_context", None) or _context.get())
    for key, value in record.__dict__.items():
        if key not in _RESERVED and key != "log_context" and not key.startswith("_"):
            fields[key] = value
    return {
        key: redact(value) if isinstance(value, str) else value for key, value in fields.items()
    }


class ContextFilter(logging.Filter):
    """Captures the bound fields when the record is made (before any thread hand-off).

    Drops vLLM's warning about our own ``VLLM_BATCH_*`` variables (it sees the prefix).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.name.startswith("vllm.")
            and str(record.msg).startswith("Unknown vLLM environment variable")
            and "VLLM_BATCH_" in record.getMessage()
        ):
            return False
        if not hasattr(record, "log_context"):
            record.log_context = dict(_context.get())
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, message, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = dt.datetime.fromtimestamp(record.created, dt.UTC)
        data: dict[str, Any] = {
            "timestamp": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key, value in record_fields(record).items():
            data.setdefault(key, value)
        if record.exc_info:
            data["exception"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            data["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(data, default=str, ensure_ascii=False)


class ConsoleFormatter(logging.Formatter):
    """``2026-01-01 12:00:00 INFO    logger: message  batch_id=… chunk_id=…`` (ids only)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = dt.datetime.fromtimestamp(record.created).strftime("%Y-%m-%d %H:%M:%S")
        line = f"{stamp} {record.levelname:<7} {record.name}: {redact(record.getMessage())}"
        fields = record_fields(record)  # only the ids here: extras are in the message
        ids = [f"{key}={fields[key]}" for key in CONTEXT_FIELDS if key in fields]
        if ids:
            line += "  " + " ".join(ids)
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        if record.stack_info:
            line += "\n" + redact(self.formatStack(record.stack_info))
        return line


# ------------------------------------------------------------------ setup


class CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to ``sys.stderr`` as it is at each line (tools and test runners swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # StreamHandler.__init__ assigns it
        return None


def resolve_format(fmt: str | None, stream: IO[str] | None = None) -> Literal["json", "console"]:
    """``auto`` (the default): console on a terminal, JSON otherwise."""
    fmt = (fmt or os.environ.get("VLLM_BATCH_LOG_FORMAT") or "auto").lower()
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"log format must be auto, json or console, not {fmt!r}")
    if fmt == "auto":
        target = stream or sys.stderr
        return "console" if hasattr(target, "isatty") and target.isatty() else "json"
    return "json" if fmt == "json" else "console"


def level_number(level: str | None) -> int:
    """``"info"`` → ``logging.INFO``; None reads ``VLLM_BATCH_LOG_LEVEL`` (default info)."""
    name = (level or os.environ.get("VLLM_BATCH_LOG_LEVEL") or "info").lower()
    if name not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {name!r}")
    return int(logging.getLevelName(name.upper()))


def quiet_level(level: int) -> int:
    """Level for vLLM and other chatty libraries: WARNING (or stricter) unless debugging."""
    return level if level <= logging.DEBUG else max(level, logging.WARNING)


def configure_logging(
    level: str | None = None, fmt: str | None = None, stream: IO[str] | None = None
) -> Literal["json", "console"]:
    """Route all stdlib logging through one handler; returns the format chosen.

    Also sets ``VLLM_CONFIGURE_LOGGING=0`` (vLLM logs through this handler, in forked
    engine processes too) and ``VLLM_LOGGING_LEVEL`` unless they are set already.
    """
    number = level_number(level)
    chosen = resolve_format(fmt, stream)
    handler: logging.Handler = (
        logging.StreamHandler(stream) if stream is not None else CurrentStderrHandler()
    )
    handler.setFormatter(JsonFormatter() if chosen == "json" else ConsoleFormatter())
    handler.addFilter(ContextFilter())
    handler._vllm_batch = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_vllm_batch", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(number)
    logging.captureWarnings(True)  # Python warnings become log lines (logger py.warnings)
    quiet = quiet_level(number)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", logging.getLevelName(quiet))
    vllm_logger = logging.getLogger("vllm")
    vllm_logger.setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())
    if os.environ["VLLM_CONFIGURE_LOGGING"] == "0":  # vLLM already imported: take over
        vllm_logger.handlers.clear()
        vllm_logger.propagate = True
    return chosen
