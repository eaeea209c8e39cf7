"""Transcription and translation batches on the real vLLM engine (the tiny random-weight
Whisper), through the official ``openai`` SDK (upload, create, poll, download) and through
``vllm-batch run``. One module, so that one xdist worker starts the one Whisper engine.

The server serves two models of different kinds: the tiny Whisper (transcribe, detected from
its files) and the tiny Llama (generate; it only answers validation here, its engine never
starts). Audio comes from a real HTTP server on ``AUDIO_HOST`` (the only private address the
engine's ``file_url`` guard allows) and from ``data:`` URLs. Transcripts are compared with
transformers' own Whisper decoding the same audio. SQLite only: the audio path has no
database code of its own.

``vllm-batch run``: ``run_batch`` (the command's body after argument parsing) runs
in-process on its own event loop, with the session's Whisper engine lent across loops (as in
``test_pooling_run``); its output lines are checked with vLLM's own ``BatchRequestOutput``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from openai.types.audio import Transcription, Translation

from tests.audio_fixtures import (
    TRANSCRIPTIONS,
    TRANSLATIONS,
    audio_line,
    data_url,
    reference_text,
    tone_wav,
)
from tests.conftest import (
    AUDIO_FETCH_TIMEOUT,
    AUDIO_HOST,
    AUDIO_MAX_BYTES,
    TINY_NAME,
    WHISPER_NAME,
    LiveServer,
    LoopThread,
    SharedEngine,
    UnusedEngine,
    database,
    run_lent,
    start_server,
    whisper_settings,
)
from tests.doc_blocks import noted
from tests.helpers import jsonl, parse_jsonl, results, run_options, submit, wait_for_batch
from tests.webhook_receiver import Receiver, webhook_receiver
from vllm_batch.config import ModelSpec
from vllm_batch.offline import RunFailed, RunOptions, run_batch

THIS = "tests/integration/test_audio_batches.py"
LOW, HIGH = tone_wav(440), tone_wav(3000)


@pytest.fixture(scope="module")
def server(
    loop_thread: LoopThread,
    whisper_engine: Any,
    tiny_whisper: Path,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    data = tmp_path_factory.mktemp("data")
    with database("sqlite", data / "test.db") as url:
        settings = whisper_settings(
            tiny_whisper,
            models=[f"{WHISPER_NAME}={tiny_whisper}", f"{TINY_NAME}={tiny_model}"],
            database_url=url,
            data_dir=data,
        )

        def factory(spec: ModelSpec) -> Any:
            if spec.name == WHISPER_NAME:
                return SharedEngine(whisper_engine)
            return UnusedEngine(TINY_NAME)

        yield from start_server(loop_thread, settings, None, engine_factory=factory)


@pytest.fixture(scope="module")
def files() -> Iterator[Receiver]:
    with webhook_receiver(AUDIO_HOST) as receiver:
        yield receiver


def run(client: OpenAI, lines: list[dict[str, Any]], endpoint: str) -> Any:
    return wait_for_batch(client, submit(client, lines, endpoint).id, timeout=180)


def test_models_lists_every_model_with_its_kind(server: LiveServer) -> None:
    data = httpx.get(f"{server.base_url}/models").json()["data"]
    kinds = {(m["id"], m["kind"]) for m in data}
    assert kinds == {(WHISPER_NAME, "transcribe"), (TINY_NAME, "generate")}


def test_transcriptions_match_transformers_whisper(
    client: OpenAI, files: Receiver, tiny_whisper: Path
) -> None:
    long_tone = tone_wav(440, seconds=2.5, rate=22_050)  # resampled; two 2-second windows
    lines = [
        audio_line("http", TRANSCRIPTIONS, files.serve("/low.wav", LOW), language="en"),
        audio_line("data", TRANSCRIPTIONS, data_url(HIGH), language="en"),
        audio_line("detect", TRANSCRIPTIONS, data_url(LOW), response_format="text"),
        audio_line("long", TRANSCRIPTIONS, files.serve("/long.wav", long_tone, sized=False)),
    ]
    batch = run(client, lines, TRANSCRIPTIONS)
    assert batch.status == "completed", batch.errors
    assert batch.request_counts.model_dump() == {"total": 4, "completed": 4, "failed": 0}
    assert batch.model == WHISPER_NAME and batch.error_file_id is None
    out = results(client, batch.output_file_id)
    assert {r["response"]["status_code"] for r in out.values()} == {200}
    texts = {}
    for name, result in out.items():
        body = Transcription.model_validate(result["response"]["body"])
        assert body.text.strip(), name
        texts[name] = body.text.strip()
    assert texts["http"] == reference_text(tiny_whisper, LOW, "transcribe")
    assert texts["data"] == reference_text(tiny_whisper, HIGH, "transcribe")
    assert texts["http"] != texts["data"]  # the audio reaches the model
    assert out["http"]["response"]["body"]["usage"] == {"type": "duration", "seconds": 1}
    assert out["long"]["response"]["body"]["usage"] == {"type": "duration", "seconds": 3}
    assert len(files.at("/long.wav")) == 1


def test_translations_match_transformers_whisper(
    client: OpenAI, files: Receiver, tiny_whisper: Path
) -> None:
    lines = [
        audio_line("http", TRANSLATIONS, files.serve("/high.wav", HIGH), language="en"),
        audio_line("detect", TRANSLATIONS, data_url(LOW)),
    ]
    batch = run(client, lines, TRANSLATIONS)
    assert batch.status == "completed", batch.errors
    assert batch.request_counts.completed == 2
    out = results(client, batch.output_file_id)
    text = Translation.model_validate(out["http"]["response"]["body"]).text.strip()
    assert text == reference_text(tiny_whisper, HIGH, "translate")
    assert text != reference_text(tiny_whisper, HIGH, "transcribe")  # the task reaches it too
    assert Translation.model_validate(out["detect"]["response"]["body"]).text.strip()


def test_a_model_of_the_wrong_kind_fails_the_batch_naming_the_line(client: OpenAI) -> None:
    on_chat_model = [audio_line("a", TRANSCRIPTIONS, data_url(LOW), model=TINY_NAME)]
    batch = run(client, on_chat_model, TRANSCRIPTIONS)
    assert batch.status == "failed"
    (error,) = batch.errors.data
    assert (error.code, error.line, error.param) == ("wrong_model_kind", 1, "body.model")
    assert f"'{TINY_NAME}' is a text-generation model" in error.message

    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    chat_on_whisper = [
        {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": chat}
    ]
    chat_on_whisper[0]["body"]["model"] = WHISPER_NAME
    batch = run(client, chat_on_whisper, "/v1/chat/completions")
    assert batch.status == "failed"
    (error,) = batch.errors.data
    assert (error.code, error.line) == ("wrong_model_kind", 1)
    assert "a speech-to-text model" in error.message
    assert "/v1/audio/transcriptions, /v1/audio/translations" in error.message


def test_a_wrong_body_fails_the_batch_naming_each_line(client: OpenAI, files: Receiver) -> None:
    ok = audio_line("ok", TRANSCRIPTIONS, data_url(LOW))
    completion = {**ok, "custom_id": "completion"}
    completion["body"] = {"model": WHISPER_NAME, "prompt": "Say hi", "max_tokens": 4}
    upload = audio_line("file", TRANSCRIPTIONS, data_url(LOW), file="audio.wav")
    lines = [
        ok,
        completion,
        upload,
        audio_line("ftp", TRANSCRIPTIONS, f"ftp://{AUDIO_HOST}/a.wav"),
        audio_line("plain", TRANSCRIPTIONS, "data:audio/wav,RIFF"),
        audio_line("srt", TRANSCRIPTIONS, data_url(LOW), response_format="srt"),
    ]
    batch = run(client, lines, TRANSCRIPTIONS)
    assert batch.status == "failed"
    assert [(e.code, e.line, e.param) for e in batch.errors.data] == [
        ("missing_required_parameter", 2, "body.file_url"),
        ("invalid_value", 3, "body.file"),
        ("invalid_value", 4, "body.file_url"),
        ("invalid_value", 5, "body.file_url"),
        ("invalid_value", 6, "body.response_format"),
    ]
    messages = [e.message for e in batch.errors.data]
    assert "not the scheme 'ftp'" in messages[2] and "base64" in messages[3]


def test_fetch_and_decode_problems_are_error_lines(client: OpenAI, files: Receiver) -> None:
    """Each ``file_url`` problem found when the line runs is that line's 400 error (param
    ``file_url``), and so is audio vLLM cannot decode; the other lines are transcribed."""
    port = files.url.rsplit(":", 1)[1]
    big = tone_wav(440, seconds=AUDIO_MAX_BYTES / 32_000 + 1)
    cases = {
        "ok-redirected": files.redirect("/moved.wav", "/low-again.wav"),
        "localhost": f"http://localhost:{port}/low.wav",
        "metadata": "http://169.254.169.254/latest/meta-data/",
        "redirect-private": files.redirect("/escape.wav", f"http://127.0.0.1:{port}/low.wav"),
        "redirect-loop": files.redirect("/loop.wav", "/loop.wav"),
        "missing": f"{files.url}/missing.wav",
        "large": files.serve("/large.wav", big),
        "large-unsized": files.serve("/large-unsized.wav", big, sized=False),
        "large-data": data_url(big),
        "slow": files.serve("/slow.wav", LOW, drip=AUDIO_FETCH_TIMEOUT + 2),
        "not-base64": "data:audio/wav;base64,UklGRg*=",
        "not-audio": files.serve("/notes.txt", b"These are not the sounds you are looking for."),
    }
    files.serve("/low-again.wav", LOW)
    lines = [audio_line(name, TRANSCRIPTIONS, url) for name, url in cases.items()]
    lines.append(audio_line("language", TRANSCRIPTIONS, data_url(LOW), language="xx"))
    batch = run(client, lines, TRANSCRIPTIONS)
    assert batch.status == "completed", batch.errors
    assert batch.request_counts.model_dump() == {"total": 13, "completed": 1, "failed": 12}
    assert set(results(client, batch.output_file_id)) == {"ok-redirected"}
    errors = results(client, batch.error_file_id)
    assert set(errors) == set(cases) - {"ok-redirected"} | {"language"}
    for name, line in errors.items():
        assert line["response"]["status_code"] == 400, name
        assert line["error"]["message"] == line["response"]["body"]["error"]["message"]
    message = {name: line["error"]["message"] for name, line in errors.items()}
    param = {name: line["response"]["body"]["error"]["param"] for name, line in errors.items()}
    fetched = set(errors) - {"not-audio", "language"}  # these two come from vLLM's decoding
    assert {param[name] for name in fetched} == {"file_url"}
    assert "targets a loopback address: localhost (" in message["localhost"]
    assert "VLLM_BATCH_AUDIO_ALLOWED_HOSTS" in message["localhost"]
    assert "cloud metadata service" in message["metadata"]
    assert (
        f"redirects to http://127.0.0.1:{port}/low.wav, which targets a loopback"
        in (message["redirect-private"])
    )
    assert "redirects more than 3 times" in message["redirect-loop"]
    assert "HTTP 404" in message["missing"]
    limit = f"larger than the limit of {AUDIO_MAX_BYTES} bytes"
    assert f"{limit} ({len(big)} bytes)" in message["large"]
    assert limit in message["large-unsized"] and limit in message["large-data"]
    assert f"took longer than {AUDIO_FETCH_TIMEOUT:g} s" in message["slow"]
    assert "not valid base64" in message["not-base64"]
    assert "Invalid or corrupted audio data" in message["not-audio"]
    assert "Unsupported language: 'xx'" in message["language"]
    # The guard refuses before connecting: nothing reached the loopback address 127.0.0.1.
    assert [r.path for r in files.requests if r.path == "/loop.wav"] == ["/loop.wav"] * 4


def readme_lines(file_url: str) -> list[dict[str, Any]]:
    """The docs' example line per audio endpoint (model and audio URL are ours here)."""
    block = noted(THIS, "each line run as a batch").code
    block = block.replace('"whisper-large-v3"', f'"{WHISPER_NAME}"')
    return parse_jsonl(block.replace("https://example.com/audio/hello.wav", file_url))


def test_readme_example_lines(client: OpenAI, files: Receiver) -> None:
    lines = readme_lines(files.serve("/hello.wav", HIGH))
    assert [line["url"] for line in lines] == [TRANSCRIPTIONS, TRANSLATIONS]
    for example in lines:
        batch = run(client, [example], example["url"])
        assert batch.status == "completed" and batch.request_counts.completed == 1, batch
        (result,) = results(client, batch.output_file_id).values()
        assert result["response"]["body"]["text"].strip()


# ---------------------------------------------------------------- vllm-batch run


def options(
    tmp_path: Path, model: Path, lines: list[dict[str, Any]], **kwargs: Any
) -> tuple[RunOptions, Path]:
    return run_options(tmp_path, whisper_settings(model), jsonl(lines), **kwargs)


def test_run_writes_vllm_batch_output_for_audio_endpoints(
    tmp_path: Path,
    tiny_whisper: Path,
    whisper_engine: Any,
    loop_thread: LoopThread,
    files: Receiver,
) -> None:
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
        audio_line("upload", TRANSCRIPTIONS, data_url(LOW), file="a.wav"),
    ]
    lines[3]["body"]["model"] = WHISPER_NAME
    del lines[5]["body"]["file_url"]
    run_options, _ = options(tmp_path, tiny_whisper, lines)
    summary, raw_lines, parsed = run_lent(run_options, whisper_engine, loop_thread)
    assert summary.total == len(lines) and summary.errors == 5
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
    upload = errors["upload"]["error"]["error"]
    assert upload["code"] == 400 and upload["param"] == "file"
    assert "Use 'file_url' instead" in upload["message"]


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
