"""What a served model does, which batch endpoints that allows, and body checks for the
pooling and audio endpoints.

Kinds:

- ``generate``: chat/completions (and every other non-pooling endpoint); vLLM's
  ``runner="generate"``.
- ``embed``: ``/v1/embeddings``, plus ``/v1/score`` and ``/v1/rerank`` (cosine similarity
  of the embeddings, as vLLM does); vLLM's ``runner="pooling"``.
- ``score``: a cross-encoder (``*ForSequenceClassification`` with one label):
  ``/v1/score`` and ``/v1/rerank``; vLLM's ``runner="pooling"``.
- ``transcribe``: a speech-to-text model (Whisper and vLLM's other transcription-only
  models): ``/v1/audio/transcriptions`` and ``/v1/audio/translations``; vLLM's
  ``runner="generate"``.

A kind is given with ``--model NAME=PATH:KIND`` or detected from the model's
``config.json`` (its ``architectures``) and sentence-transformers files. A model whose
files this process cannot read (a hub id, a path mounted only on workers) has no known
kind: its batches are not checked against a kind, and vLLM picks the runner.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Any

from vllm_batch.net.file_url import file_url_problem

POOLING_ENDPOINTS: tuple[str, ...] = ("/v1/embeddings", "/v1/score", "/v1/rerank")
AUDIO_ENDPOINTS: tuple[str, ...] = ("/v1/audio/transcriptions", "/v1/audio/translations")
SCORE_PAIRS: tuple[tuple[str, str], ...] = (
    ("queries", "documents"),
    ("queries", "items"),
    ("data_1", "data_2"),
    ("text_1", "text_2"),
)
"""The two sides of a ``/v1/score`` body, as vLLM's ``ScoreRequest`` variants name them."""
JSON_ENCODINGS = ("float", "base64")
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json")
TRANSCRIPTION_ARCHITECTURES = frozenset(
    {
        "WhisperForConditionalGeneration",
        "CohereAsrForConditionalGeneration",
        "FireRedASR2ForConditionalGeneration",
        "FunASRForConditionalGeneration",
        "MossTranscribeDiarizeForConditionalGeneration",
    }
)
"""vLLM's transcription-only models (``supports_transcription_only``): detected as
``transcribe``. Models that also chat (Voxtral, Gemma 3n, ...) are ``generate`` unless
given ``:transcribe``."""
AUDIO_FORMATS = ("json", "text", "verbose_json", "diarized_json")


class ModelKind(StrEnum):
    GENERATE = "generate"
    EMBED = "embed"
    SCORE = "score"
    TRANSCRIBE = "transcribe"


KIND_ENDPOINTS: dict[ModelKind, tuple[str, ...]] = {
    ModelKind.EMBED: POOLING_ENDPOINTS,
    ModelKind.SCORE: ("/v1/score", "/v1/rerank"),
    ModelKind.TRANSCRIBE: AUDIO_ENDPOINTS,
}
"""Endpoints of the pooling and audio kinds; ``generate`` serves every endpoint not in this
table's union (chat, completions, responses, and text-generation endpoints added later)."""
POOLING_KINDS = frozenset({ModelKind.EMBED, ModelKind.SCORE})
KIND_LABELS = {
    ModelKind.GENERATE: "a text-generation model",
    ModelKind.EMBED: "an embedding model",
    ModelKind.SCORE: "a cross-encoder (score) model",
    ModelKind.TRANSCRIBE: "a speech-to-text model",
}


def kind_serves(kind: ModelKind | None, endpoint: str) -> bool:
    """Whether a model of ``kind`` serves ``endpoint`` (an unknown kind: assume it does)."""
    if kind is None:
        return True
    if kind is ModelKind.GENERATE:
        return endpoint not in POOLING_ENDPOINTS and endpoint not in AUDIO_ENDPOINTS
    return endpoint in KIND_ENDPOINTS[kind]


def is_pooling(kind: ModelKind | None) -> bool:
    return kind in POOLING_KINDS


def detect_kind(path: str) -> ModelKind | None:
    """The kind of the model at ``path``, from its files; None when they cannot be read.

    A kind found is remembered; an unreadable path is looked at again next time (its files
    may not be there yet).
    """
    known = _detected.get(path)
    if known is None:
        known = _read_kind(Path(path))
        if known is not None:
            _detected[path] = known
    return known


_detected: dict[str, ModelKind] = {}
"""Kinds found, by path: a cache, so batch checks do not reread ``config.json``."""


def _read_kind(folder: Path) -> ModelKind | None:
    try:
        config: Any = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    names = [str(a) for a in architectures] if isinstance(architectures, list) else []
    if any(a in TRANSCRIPTION_ARCHITECTURES for a in names):
        return ModelKind.TRANSCRIBE
    if any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in names):
        return ModelKind.GENERATE
    if any(a.endswith("ForSequenceClassification") for a in names):
        return ModelKind.SCORE
    if any((folder / name).is_file() for name in SENTENCE_TRANSFORMERS_FILES):
        return ModelKind.EMBED
    if any(a.endswith("Model") for a in names):  # BertModel, XLMRobertaModel, ...: no head
        return ModelKind.EMBED
    return ModelKind.GENERATE if names else None


def kind_problem(model: str, kind: ModelKind | None, endpoint: str) -> str | None:
    """Why ``model`` cannot serve ``endpoint``, or None if it can."""
    if kind_serves(kind, endpoint):
        return None
    assert kind is not None
    serves = (
        ", ".join(KIND_ENDPOINTS[kind])
        if kind in KIND_ENDPOINTS
        else "the text-generation endpoints (/v1/chat/completions, /v1/completions)"
    )
    return (
        f"The model {model!r} is {KIND_LABELS[kind]} (kind {kind.value!r}); it serves "
        f"{serves}, not {endpoint}."
    )


def body_problems(endpoint: str, body: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(code, message, param)`` for a pooling or audio request body that cannot be valid.

    Only what is certain without the model: the fields each endpoint needs, JSON-only
    ``encoding_format`` (a batch output line holds JSON, not raw bytes), and a ``file_url``
    that could never be fetched (whether it answers is found out when the line runs).
    """
    if endpoint in AUDIO_ENDPOINTS:
        return audio_body_problems(body)
    problems: list[tuple[str, str, str]] = []
    if endpoint == "/v1/embeddings":
        if "input" not in body and "messages" not in body:
            problems.append(
                (
                    "missing_required_parameter",
                    "Missing required parameter: 'body.input' (a string or a list of strings "
                    "or token ids to embed).",
                    "body.input",
                )
            )
        encoding = body.get("encoding_format", "float")
        if encoding not in JSON_ENCODINGS:
            problems.append(
                (
                    "invalid_value",
                    f"Invalid 'encoding_format' {encoding!r}: batch output is JSON, so only "
                    "'float' and 'base64' are supported.",
                    "body.encoding_format",
                )
            )
        dimensions = body.get("dimensions")
        if dimensions is not None and (
            not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1
        ):
            problems.append(
                (
                    "invalid_value",
                    "'dimensions' must be a positive integer.",
                    "body.dimensions",
                )
            )
    elif endpoint == "/v1/score":
        if not any(a in body and b in body for a, b in SCORE_PAIRS) and not is_rerank_body(body):
            pairs = ", ".join(f"{a}/{b}" for a, b in SCORE_PAIRS)
            problems.append(
                (
                    "missing_required_parameter",
                    f"A /v1/score body needs two sides to score: one of {pairs} "
                    "(or query/documents for a rerank).",
                    "body",
                )
            )
    elif endpoint == "/v1/rerank":
        for name in ("query", "documents"):
            if name not in body:
                problems.append(
                    (
                        "missing_required_parameter",
                        f"Missing required parameter: 'body.{name}'.",
                        f"body.{name}",
                    )
                )
    return problems


def audio_body_problems(body: dict[str, Any]) -> list[tuple[str, str, str]]:
    """A transcription or translation body, as ``vllm run-batch`` takes it: the audio in
    ``file_url`` (not ``file``), a JSON ``response_format``, no streaming."""
    problems: list[tuple[str, str, str]] = []
    if "file" in body:
        problems.append(
            (
                "invalid_value",
                "'file' is not supported in batch requests: give the audio's URL (or a "
                "data: URL) in 'file_url'.",
                "body.file",
            )
        )
    if "file_url" not in body:
        problems.append(
            (
                "missing_required_parameter",
                "Missing required parameter: 'body.file_url' (an http(s) or data: URL of "
                "the audio).",
                "body.file_url",
            )
        )
    elif (problem := file_url_problem(body["file_url"])) is not None:
        problems.append(("invalid_value", problem, "body.file_url"))
    response_format = body.get("response_format", "json")
    if response_format not in AUDIO_FORMATS:
        problems.append(
            (
                "invalid_value",
                f"Invalid 'response_format' {response_format!r}: batch output is JSON, so "
                f"one of {', '.join(AUDIO_FORMATS)}.",
                "body.response_format",
            )
        )
    if body.get("stream"):
        problems.append(
            ("invalid_value", "Streaming is not supported in batch requests.", "body.stream")
        )
    return problems


def is_rerank_body(body: dict[str, Any]) -> bool:
    """A rerank request (``query`` + ``documents``), also when sent to ``/v1/score``.

    Parasail's ``openai-batch`` client sends its rerank batches to ``/v1/score``.
    """
    return "query" in body and "documents" in body and "queries" not in body
