"""``vllm-batch run`` on transcription and translation files, on the session's Whisper engine.

``run_batch`` (the command's body after argument parsing) runs in-process on its own event
loop, with the session's tiny-Whisper engine lent across loops, as in ``test_pooling_run``.
Output lines are checked with vLLM's own ``BatchRequestOutput``; audio comes from a loopback
HTTP server and from ``data:`` URLs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.audio_fixtures import (
    TRANSCRIPTIONS,
    TRANSLATIONS,
    audio_line,
    data_url,
    reference_text,
    tone_wav,
)
from tests.conftest import (
    AUDIO_HOST,
    WHISPER_NAME,
    LoopThread,
    OtherLoopEngine,
    UnusedEngine,
    whisper_settings,
)
from tests.webhook_receiver import Receiver, webhook_receiver
from vllm_batch.config import ModelSpec
from vllm_batch.offline import RunFailed, RunOptions, run_batch

LOW, HIGH = tone_wav(440), tone_wav(3000)


@pytest.fixture(scope="module")
def files() -> Iterator[Receiver]:
    with webhook_receiver(AUDIO_HOST) as receiver:
        yield receiver


def options(
    tmp_path: Path, model: Path, lines: list[dict[str, Any]], **kwargs: Any
) -> tuple[RunOptions, Path]:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    spec = ModelSpec.parse(f"{WHISPER_NAME}={model}")
    settings = whisper_settings(model)
    return RunOptions(
        input=str(source), output=str(out), spec=spec, settings=settings, **kwargs
    ), out


def test_run_writes_vllm_batch_output_for_audio_endpoints(
    tmp_path: Path,
    tiny_whisper: Path,
    whisper_engine: Any,
    loop_thread: LoopThread,
    files: Receiver,
) -> None:
    from vllm.entrypoints.launchers.run_batch import BatchRequestOutput
    from vllm.entrypoints.speech_to_text.transcription.protocol import TranscriptionResponse
    from vllm.entrypoints.speech_to_text.translation.protocol import TranslationResponse

    chat = {"messages": [{"role": "user", "content": "hi"}]}
    lines = [
        audio_line("transcribe", TRANSCRIPTIONS, files.serve("/low.wav", LOW), language="en"),
        audio_line("translate", TRANSLATIONS, data_url(HIGH), language="en"),
        audio_line("other-model", TRANSCRIPTIONS, data_url(LOW), model="nope"),
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions", "body": chat},
        audio_line("private", TRANSCRIPTIONS, "http://127.0.0.1:9/a.wav"),
        audio_line("no-file-url", TRANSCRIPTIONS, data_url(LOW)),
    ]
    lines[3]["body"]["model"] = WHISPER_NAME
    del lines[5]["body"]["file_url"]
    run_options, out = options(tmp_path, tiny_whisper, lines)
    summary = run_batch(
        run_options, engine_factory=lambda spec, s: OtherLoopEngine(whisper_engine, loop_thread)
    )
    assert summary.total == len(lines) and summary.errors == 4
    raw_lines = out.read_text().splitlines()
    parsed = [BatchRequestOutput.model_validate_json(raw) for raw in raw_lines]
    assert [p.custom_id for p in parsed] == [line["custom_id"] for line in lines]

    transcribed, translated = parsed[0].response, parsed[1].response
    assert transcribed is not None and isinstance(transcribed.body, TranscriptionResponse)
    assert transcribed.body.text.strip() == reference_text(tiny_whisper, LOW, "transcribe")
    assert translated is not None and isinstance(translated.body, TranslationResponse)
    assert translated.body.text.strip() == reference_text(tiny_whisper, HIGH, "translate")

    # Error lines in vLLM's shape: response.body null, the ErrorResponse under "error".
    errors = {
        line["custom_id"]: json.loads(raw) for line, raw in zip(lines, raw_lines, strict=True)
    }
    assert errors["other-model"]["response"]["status_code"] == 404
    chat_error = errors["chat"]["error"]["error"]
    assert (
        chat_error["code"] == 400
        and "does not support /v1/chat/completions" in (chat_error["message"])
    )
    private = errors["private"]["error"]["error"]
    assert private["param"] == "file_url" and "targets a loopback address" in private["message"]
    missing = errors["no-file-url"]["error"]["error"]
    assert missing["code"] == 400 and missing["param"] == "file_url"


def test_strict_run_rejects_wrong_kind_and_unfetchable_file_urls(
    tmp_path: Path, tiny_whisper: Path
) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "model": WHISPER_NAME}
    lines = [
        {"custom_id": "c", "method": "POST", "url": TRANSCRIPTIONS, "body": chat},
        audio_line("ftp", TRANSCRIPTIONS, "ftp://example.com/a.wav"),
    ]
    run_options, out = options(tmp_path, tiny_whisper, lines, strict=True)
    with pytest.raises(RunFailed) as exc:
        run_batch(run_options, engine_factory=lambda spec, s: UnusedEngine(WHISPER_NAME))
    assert exc.value.exit_code == 2
    assert "line 1: Missing required parameter: 'body.file_url'" in exc.value.message
    assert "line 2: 'file_url' must be an http, https or data URL" in exc.value.message
    assert not out.exists()

    wrong_kind = [{"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": chat}]
    run_options, out = options(tmp_path, tiny_whisper, wrong_kind, strict=True)
    with pytest.raises(RunFailed) as exc:
        run_batch(run_options, engine_factory=lambda spec, s: UnusedEngine(WHISPER_NAME))
    assert f"line 1: The model '{WHISPER_NAME}' is a speech-to-text model" in exc.value.message
