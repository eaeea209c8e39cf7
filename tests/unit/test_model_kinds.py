"""Model kinds: ``NAME=PATH:KIND`` specs, detection from model files, per-line kind and
pooling/audio body checks, and the endpoint check at batch creation."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from vllm_batch.api.batch_routes import check_endpoint_served
from vllm_batch.api.errors import APIError
from vllm_batch.config import ModelSpec, Settings
from vllm_batch.engines.serving import body_param
from vllm_batch.engines.vllm_engine import engine_argv
from vllm_batch.models.kinds import (
    AUDIO_ENDPOINTS,
    ModelKind,
    body_problems,
    detect_kind,
    kind_problem,
    kind_serves,
)
from vllm_batch.pipeline.input import SUPPORTED_ENDPOINTS, BatchPlan, plan_batch


def model_dir(tmp_path: Path, name: str, architectures: list[str], *extra: str) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": architectures}))
    for file in extra:
        (folder / file).write_text("[]")
    return str(folder)


def test_spec_parses_an_optional_kind_suffix() -> None:
    assert ModelSpec.parse("e=/m/e:embed") == ModelSpec("e", "/m/e", ModelKind.EMBED)
    assert ModelSpec.parse("/m/x:score") == ModelSpec("/m/x", "/m/x", ModelKind.SCORE)
    assert ModelSpec.parse("c=/m/c:generate").kind is ModelKind.GENERATE
    # A colon that is not followed by a kind is part of the path.
    assert ModelSpec.parse("a=/m/a:b") == ModelSpec("a", "/m/a:b")
    with pytest.raises(ValueError, match=":embed"):
        ModelSpec.parse("=/m/e:embed")


def test_kinds_are_detected_from_model_files(tmp_path: Path) -> None:
    assert detect_kind(model_dir(tmp_path, "llama", ["LlamaForCausalLM"])) is ModelKind.GENERATE
    assert detect_kind(model_dir(tmp_path, "bert", ["BertModel"])) is ModelKind.EMBED
    st = model_dir(tmp_path, "st", ["XLMRobertaModel"], "modules.json")
    assert detect_kind(st) is ModelKind.EMBED
    cross = model_dir(tmp_path, "cross", ["BertForSequenceClassification"])
    assert detect_kind(cross) is ModelKind.SCORE
    assert detect_kind(str(tmp_path / "missing")) is None  # unknown: nothing is checked
    assert detect_kind("org/some-hub-id") is None


def test_settings_list_each_model_with_its_kind(tmp_path: Path) -> None:
    chat = model_dir(tmp_path, "chat", ["LlamaForCausalLM"])
    bert = model_dir(tmp_path, "bert", ["BertModel"])
    settings = Settings(models=[f"chat={chat}", f"minilm={bert}", "cross=/nowhere:score"])
    assert settings.model_kinds == {
        "chat": ModelKind.GENERATE,
        "minilm": ModelKind.EMBED,
        "cross": ModelKind.SCORE,
    }
    # Pooling kinds get vLLM's pooling runner; generation keeps vLLM's default.
    specs = {spec.name: spec for spec in settings.model_specs}
    pooling_argv = engine_argv(specs["minilm"], settings)
    assert pooling_argv[-2:] == ["--runner", "pooling"]
    assert "--enable-prefix-caching" not in pooling_argv  # vLLM decides for encoders
    assert "--runner" not in engine_argv(specs["chat"], settings)


def test_endpoints_per_kind() -> None:
    for endpoint in ("/v1/embeddings", "/v1/score", "/v1/rerank"):
        assert endpoint in SUPPORTED_ENDPOINTS
        assert kind_serves(ModelKind.EMBED, endpoint)
        assert not kind_serves(ModelKind.GENERATE, endpoint)
        assert kind_serves(None, endpoint)
    assert not kind_serves(ModelKind.SCORE, "/v1/embeddings")
    assert kind_serves(ModelKind.SCORE, "/v1/rerank")
    assert kind_serves(ModelKind.GENERATE, "/v1/chat/completions")
    assert not kind_serves(ModelKind.EMBED, "/v1/chat/completions")


def request_line(custom_id: str, url: str, body: dict[str, Any]) -> bytes:
    line = {"custom_id": custom_id, "method": "POST", "url": url, "body": body}
    return json.dumps(line).encode() + b"\n"


KINDS = {"chat": ModelKind.GENERATE, "minilm": ModelKind.EMBED, "remote": None}


def plan(endpoint: str, *lines: bytes) -> BatchPlan:
    return plan_batch(
        io.BytesIO(b"".join(lines)),
        endpoint=endpoint,
        served_models=list(KINDS),
        max_requests=100,
        chunk_size=10,
        model_kinds=KINDS,
    )


def test_a_line_for_a_model_of_the_wrong_kind_fails_naming_the_line() -> None:
    chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    ok = plan(
        "/v1/embeddings",
        request_line("a", "/v1/embeddings", {"model": "minilm", "input": "hello"}),
        request_line("b", "/v1/embeddings", {"model": "minilm", "input": ["x", "y"]}),
    )
    assert ok.errors == [] and ok.model == "minilm"
    unknown = plan("/v1/embeddings", request_line("u", "/v1/embeddings", {"model": "remote"}))
    assert [e["code"] for e in unknown.errors] == ["missing_required_parameter"]  # no kind check
    result = plan(
        "/v1/embeddings",
        request_line("a", "/v1/embeddings", {**chat, "input": "hello"}),
        request_line("b", "/v1/embeddings", {**chat, "input": "hello"}),
    )
    assert [(e["code"], e["line"], e["param"]) for e in result.errors] == [
        ("wrong_model_kind", 1, "body.model"),
        ("wrong_model_kind", 2, "body.model"),
    ]
    assert "'chat' is a text-generation model" in result.errors[0]["message"]
    assert "not /v1/embeddings" in result.errors[0]["message"]

    chat_batch = plan(
        "/v1/chat/completions",
        request_line("c", "/v1/chat/completions", {**chat, "model": "minilm"}),
    )
    (error,) = chat_batch.errors
    assert error["code"] == "wrong_model_kind" and error["line"] == 1
    assert "an embedding model" in error["message"] and "/v1/embeddings" in error["message"]


def test_pooling_bodies_need_their_fields() -> None:
    result = plan(
        "/v1/embeddings",
        request_line("a", "/v1/embeddings", {"model": "minilm", "messages_typo": []}),
        request_line(
            "b", "/v1/embeddings", {"model": "minilm", "input": "x", "encoding_format": "bytes"}
        ),
        request_line("c", "/v1/embeddings", {"model": "minilm", "input": "x", "dimensions": 0}),
        request_line("d", "/v1/embeddings", {"model": "minilm", "input": ["x", "y"]}),
    )
    assert [(e["line"], e["param"]) for e in result.errors] == [
        (1, "body.input"),
        (2, "body.encoding_format"),
        (3, "body.dimensions"),
    ]
    score = plan(
        "/v1/score",
        request_line("a", "/v1/score", {"model": "minilm", "text_1": "q", "text_2": ["d"]}),
        request_line("b", "/v1/score", {"model": "minilm", "query": "q", "documents": ["d"]}),
        request_line("c", "/v1/score", {"model": "minilm", "input": "q"}),
    )
    assert [(e["line"], e["code"]) for e in score.errors] == [(3, "missing_required_parameter")]
    rerank = plan(
        "/v1/rerank",
        request_line("a", "/v1/rerank", {"model": "minilm", "query": "q", "documents": ["d"]}),
        request_line("b", "/v1/rerank", {"model": "minilm", "documents": ["d"]}),
    )
    assert [(e["line"], e["param"]) for e in rerank.errors] == [(2, "body.query")]


def test_creating_a_batch_for_an_endpoint_no_model_serves_is_a_400(tmp_path: Path) -> None:
    chat = model_dir(tmp_path, "chat", ["LlamaForCausalLM"])
    settings = Settings(models=[f"chat={chat}"])
    check_endpoint_served(settings, "/v1/chat/completions")
    with pytest.raises(APIError) as exc:
        check_endpoint_served(settings, "/v1/embeddings")
    assert exc.value.status == 400
    assert "No served model supports /v1/embeddings" in exc.value.message
    assert "chat (generate)" in exc.value.message
    with pytest.raises(APIError) as exc:
        check_endpoint_served(settings, "/v1/audio/transcriptions")
    assert "No served model supports /v1/audio/transcriptions" in exc.value.message


def test_validation_error_locations_become_parameter_names() -> None:
    loc = ("function-wrap[__log_extra_fields__()]", "input", "list[int]")
    assert body_param(loc) == "input"
    tagged = ("function-wrap[x()]", "messages", 0, "content", "str")
    assert body_param(tagged) == "messages.0.content"
    assert body_param(()) is None


def test_run_runner_flag_sets_the_kind(tmp_path: Path) -> None:
    from vllm_batch.cli.options import Runner
    from vllm_batch.cli.run import runner_kind

    bert = ModelSpec("e", model_dir(tmp_path, "bert", ["BertModel"]))
    cross = ModelSpec("c", model_dir(tmp_path, "cross", ["BertForSequenceClassification"]))
    unknown = ModelSpec("u", str(tmp_path / "nowhere"))
    assert runner_kind(Runner.pooling, unknown) is ModelKind.EMBED
    assert runner_kind(Runner.pooling, cross) is ModelKind.SCORE
    assert runner_kind(Runner.generate, bert) is ModelKind.GENERATE
    assert runner_kind(Runner.auto, bert) is ModelKind.EMBED
    assert runner_kind(Runner.auto, unknown) is None


def test_transcription_models_are_their_own_kind(tmp_path: Path) -> None:
    whisper = model_dir(tmp_path, "whisper", ["WhisperForConditionalGeneration"])
    assert detect_kind(whisper) is ModelKind.TRANSCRIBE
    voxtral = model_dir(tmp_path, "voxtral", ["VoxtralForConditionalGeneration"])
    assert detect_kind(voxtral) is ModelKind.GENERATE  # it chats too: `:transcribe` if wanted
    assert ModelSpec.parse("w=/m/w:transcribe") == ModelSpec("w", "/m/w", ModelKind.TRANSCRIBE)
    for endpoint in AUDIO_ENDPOINTS:
        assert endpoint in SUPPORTED_ENDPOINTS
        assert kind_serves(ModelKind.TRANSCRIBE, endpoint)
        assert not kind_serves(ModelKind.GENERATE, endpoint)
        assert not kind_serves(ModelKind.EMBED, endpoint)
    assert not kind_serves(ModelKind.TRANSCRIBE, "/v1/chat/completions")
    assert not kind_serves(ModelKind.TRANSCRIBE, "/v1/embeddings")
    # Whisper runs on vLLM's generate runner, which decides about prefix caching itself.
    settings = Settings(models=[f"w={whisper}"])
    argv = engine_argv(settings.model_specs[0], settings)
    assert "--runner" not in argv
    assert not any("prefix-caching" in arg for arg in argv)


def test_run_generate_runner_keeps_a_transcription_model(tmp_path: Path) -> None:
    from vllm_batch.cli.options import Runner
    from vllm_batch.cli.run import runner_kind

    whisper = ModelSpec("w", model_dir(tmp_path, "whisper", ["WhisperForConditionalGeneration"]))
    assert runner_kind(Runner.generate, whisper) is ModelKind.TRANSCRIBE
    assert runner_kind(Runner.auto, whisper) is ModelKind.TRANSCRIBE


def audio(**body: Any) -> dict[str, Any]:
    return {"model": "w", "file_url": "https://example.com/a.wav", **body}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (audio(), []),
        (audio(file_url="data:audio/wav;base64,UklGRg=="), []),
        (audio(response_format="verbose_json"), []),
        ({"model": "w", "prompt": "hi"}, [("missing_required_parameter", "body.file_url")]),
        (audio(file="a.wav"), [("invalid_value", "body.file")]),
        (audio(file_url="s3://bucket/a.wav"), [("invalid_value", "body.file_url")]),
        (audio(file_url="/local/a.wav"), [("invalid_value", "body.file_url")]),
        (audio(file_url=42), [("invalid_value", "body.file_url")]),
        (audio(file_url="data:audio/wav,RIFF"), [("invalid_value", "body.file_url")]),
        (audio(file_url="https://user:pw@example.com/a"), [("invalid_value", "body.file_url")]),
        (audio(response_format="vtt"), [("invalid_value", "body.response_format")]),
        (audio(stream=True), [("invalid_value", "body.stream")]),
    ],
)
def test_audio_body_problems(body: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    for endpoint in AUDIO_ENDPOINTS:
        problems = body_problems(endpoint, body)
        assert [(code, param) for code, _, param in problems] == expected


def test_audio_line_on_a_chat_model_names_the_kinds() -> None:
    message = kind_problem("chat", ModelKind.GENERATE, "/v1/audio/transcriptions")
    assert message is not None and "'chat' is a text-generation model" in message
    message = kind_problem("w", ModelKind.TRANSCRIBE, "/v1/chat/completions")
    assert message is not None and "'w' is a speech-to-text model (kind 'transcribe')" in message
