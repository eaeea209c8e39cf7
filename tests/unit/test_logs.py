"""Structured logs: JSON/console formats, context fields, levels, redaction, banner."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest

from vllm_batch.api.banner import Banner, emit, make_banner
from vllm_batch.config import Settings
from vllm_batch.observability import logs
from vllm_batch.observability.logs import bound, configure_logging, redact

KEY = "sk-live-0123456789abcdef"


@pytest.fixture
def capture(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """configure_logging into a buffer; root logger and env restored afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    vllm_logger = logging.getLogger("vllm")
    vllm_saved = (list(vllm_logger.handlers), vllm_logger.propagate)
    noisy = {name: logging.getLogger(name).level for name in logs.NOISY_LOGGERS}
    for name in ("VLLM_CONFIGURE_LOGGING", "VLLM_LOGGING_LEVEL", "VLLM_BATCH_LOG_FORMAT"):
        monkeypatch.setenv(name, "")  # restored (or removed again) afterwards
        monkeypatch.delenv(name)
    stream = io.StringIO()
    yield stream
    root.handlers[:] = saved[0]
    vllm_logger.handlers[:], vllm_logger.propagate = vllm_saved
    logging.captureWarnings(False)
    root.setLevel(saved[1])
    for name, level in noisy.items():
        logging.getLogger(name).setLevel(level)
    logs._secrets.clear()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_bound_fields_and_extras(capture: io.StringIO) -> None:
    assert configure_logging("info", "json", capture) == "json"
    log = logging.getLogger("vllm_batch.test")
    with bound(worker="host/ns/1/ab", batch_id="batch_1"):
        with bound(chunk_id="chunk_2", request_id=None):
            log.info("took chunk %s", "chunk_2", extra={"lines": 16})
        log.warning("after the chunk")
    log.info("outside")
    first, second, third = lines(capture)
    assert first["level"] == "info" and first["logger"] == "vllm_batch.test"
    assert first["message"] == "took chunk chunk_2" and first["timestamp"].endswith("Z")
    assert first["worker"] == "host/ns/1/ab" and first["batch_id"] == "batch_1"
    assert first["chunk_id"] == "chunk_2" and first["lines"] == 16
    assert "request_id" not in first
    assert second["level"] == "warning" and "chunk_id" not in second
    assert second["batch_id"] == "batch_1"
    assert not {"worker", "batch_id", "chunk_id"} & set(third)


def test_tasks_inherit_fields(capture: io.StringIO) -> None:
    configure_logging("info", "json", capture)

    async def main() -> None:
        with bound(request_id="req_abc"):
            await asyncio.create_task(asyncio.to_thread(logging.getLogger("t").info, "in thread"))

    asyncio.run(main())
    assert lines(capture)[0]["request_id"] == "req_abc"


def test_console_format_is_readable(capture: io.StringIO) -> None:
    assert configure_logging("info", "console", capture) == "console"
    with bound(batch_id="batch_9"):
        logging.getLogger("vllm_batch.x").info("hello %d", 3)
    (line,) = capture.getvalue().splitlines()
    assert " INFO    vllm_batch.x: hello 3  batch_id=batch_9" in line


def test_auto_is_json_unless_a_tty(capture: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    assert configure_logging("info", "auto", capture) == "json"
    monkeypatch.setattr(capture, "isatty", lambda: True, raising=False)
    assert configure_logging("info", None, capture) == "console"
    monkeypatch.setenv("VLLM_BATCH_LOG_FORMAT", "json")
    assert configure_logging("info", None, capture) == "json"
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml", capture)


def test_level_filters_and_env(capture: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    configure_logging("warning", "json", capture)
    logging.getLogger("vllm_batch.a").info("hidden")
    logging.getLogger("vllm_batch.a").warning("shown")
    assert [line["message"] for line in lines(capture)] == ["shown"]
    monkeypatch.setenv("VLLM_BATCH_LOG_LEVEL", "DEBUG")
    configure_logging(None, "json", capture)
    assert logging.getLogger().level == logging.DEBUG
    with pytest.raises(ValueError, match="log level"):
        configure_logging("loud", "json", capture)


def test_vllm_is_quiet_unless_debug(capture: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    configure_logging("info", "json", capture)
    assert os.environ["VLLM_CONFIGURE_LOGGING"] == "0"  # vLLM logs through our handler
    assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"  # for engine subprocesses
    vllm_log = logging.getLogger("vllm.engine.x")
    vllm_log.info("Initializing a V1 LLM engine with config: ...")
    vllm_log.error("EngineCore failed to start.")
    vllm_log.warning("Unknown vLLM environment variable detected: %s", "VLLM_BATCH_API_KEY")
    assert [(line["logger"], line["message"]) for line in lines(capture)] == [
        ("vllm.engine.x", "EngineCore failed to start.")
    ]
    monkeypatch.delenv("VLLM_LOGGING_LEVEL")
    configure_logging("debug", "json", capture)
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"
    assert logging.getLogger("vllm").level == logging.DEBUG


def test_an_explicit_vllm_level_is_kept(
    capture: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "INFO")
    configure_logging("info", "json", capture)
    assert logging.getLogger("vllm").level == logging.INFO


@pytest.mark.parametrize(
    "text",
    [
        f"Authorization: Bearer {KEY}",
        f"headers={{'authorization': 'Bearer {KEY}'}}",
        f'{{"api_key": "{KEY}"}}',
        f"api_key={KEY}&x=1",
        f"LABEL_STUDIO_API_KEY={KEY}",
        f"token {KEY}",  # a literal registered secret, whatever surrounds it
        "secret whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw rejected",
        "postgresql://batch:hunter2hunter2@db:5432/x",
    ],
)
def test_redaction(text: str) -> None:
    logs.add_secrets([KEY, "short", None])
    try:
        cleaned = redact(text)
    finally:
        logs._secrets.clear()
    for secret in (KEY, "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "hunter2hunter2"):
        assert secret not in cleaned
    assert "[REDACTED]" in cleaned


@pytest.mark.parametrize(
    "text",
    [
        "batch batch_1 completed: 16 lines, max_tokens=32, short prompts",
        'curl -H "Authorization: Bearer $VLLM_BATCH_API_KEY" http://h/v1/models',
        'OpenAI(base_url="http://h/v1", api_key="<your key>")',
    ],
)
def test_redaction_leaves_ordinary_text(text: str) -> None:
    logs.add_secrets(["short"])  # too short to redact literally
    try:
        assert redact(text) == text
    finally:
        logs._secrets.clear()


def test_secrets_never_reach_the_output(capture: io.StringIO) -> None:
    configure_logging("debug", "json", capture)
    logs.add_secrets([KEY])
    log = logging.getLogger("vllm_batch.leaky")
    log.info("client sent %s", f"Bearer {KEY}", extra={"header": KEY})
    try:
        raise RuntimeError(f"bad api_key={KEY} and whsec_abcdefghijklmnop")
    except RuntimeError:
        log.exception("failed")
    output = capture.getvalue()
    assert KEY not in output and "whsec_abcdefghijklmnop" not in output
    assert next(line["message"] for line in lines(capture)) == "client sent Bearer [REDACTED]"
    assert "RuntimeError" in lines(capture)[1]["exception"]


def test_banner_content(capture: io.StringIO, capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(host="0.0.0.0", port=4081, models=["m1=/p/1", "m2=/p/2"])
    banner = make_banner(settings, key_required=True)
    assert banner == Banner("http://127.0.0.1:4081", ["m1", "m2"], True)
    emit(banner, "console")
    text = capsys.readouterr().out
    assert "ready on http://127.0.0.1:4081" in text
    assert "http://127.0.0.1:4081/dashboard" in text and "m1, m2" in text
    assert (
        'curl -s -H "Authorization: Bearer $VLLM_BATCH_API_KEY" http://127.0.0.1:4081/v1/models'
        in text
    )
    assert 'OpenAI(base_url="http://127.0.0.1:4081/v1", api_key="<your key>")' in text
    configure_logging("info", "json", capture)
    emit(make_banner(Settings(port=4082, models=["m"]), key_required=False), "json")
    (line,) = lines(capture)
    assert line["event"] == "ready" and line["url"] == "http://127.0.0.1:4082"
    assert line["dashboard"] == "http://127.0.0.1:4082/dashboard" and line["models"] == ["m"]
    assert line["example"] == "curl -s http://127.0.0.1:4082/v1/models"


@pytest.mark.parametrize("command", ["serve", "worker", "run"])
def test_log_level_option(command: str) -> None:
    from typer.testing import CliRunner

    from vllm_batch.cli import app

    runner = CliRunner()
    assert "--log-level" in runner.invoke(app, [command, "--help"]).output
    result = runner.invoke(app, [command, "--log-level", "loud"])
    assert result.exit_code == 2 and "loud" in result.output


def test_log_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_BATCH_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("VLLM_BATCH_LOG_FORMAT", "json")
    settings = Settings()
    assert (settings.log_level, settings.log_format) == ("debug", "json")


def test_grafana_enabled_is_not_silently_ignored(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from vllm_batch.api.app import warn_ignored_environment

    monkeypatch.setenv("GRAFANA_ENABLED", "true")
    with caplog.at_level("WARNING", logger="vllm_batch.api.app"):
        warn_ignored_environment()
    assert "GRAFANA_ENABLED is set but not a server setting" in caplog.text
    assert "--profile monitoring" in caplog.text


def test_default_handler_follows_the_current_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import logging
    import sys

    from vllm_batch.observability.logs import CurrentStderrHandler

    handler = CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    first, second = io.StringIO(), io.StringIO()
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    monkeypatch.setattr(sys, "stderr", first)
    handler.emit(record)
    first.close()  # a swapped-out stream may be closed: never written again
    monkeypatch.setattr(sys, "stderr", second)
    handler.emit(record)
    assert second.getvalue() == "hello\n"
