"""Embeddings, score and rerank requests through vLLM's pooling serving objects.

``init_app_state`` builds ``serving_embedding`` (embedding models) and ``serving_scores``
(embedding models, by cosine similarity, and one-label cross-encoders), exactly as for
``vllm serve`` and ``vllm run-batch``; each is called with the parsed request and returns a
JSON response whose bytes become the result body. vLLM is imported lazily.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import orjson

from vllm_batch.engines.engine import EngineResult
from vllm_batch.engines.serving import (
    call_serving,
    error_response_result,
    error_result,
    validation_error_result,
)
from vllm_batch.models.kinds import JSON_ENCODINGS, POOLING_ENDPOINTS, is_rerank_body


@dataclass(frozen=True)
class PoolingServers:
    """The pooling serving objects vLLM built for this model (None: not supported)."""

    embedding: Any = None
    scores: Any = None

    @classmethod
    def from_state(cls, state: Any) -> PoolingServers:
        return cls(
            embedding=getattr(state, "serving_embedding", None),
            scores=getattr(state, "serving_scores", None),
        )

    def handler(self, url: str) -> Any:
        return self.embedding if url == "/v1/embeddings" else self.scores


def is_pooling_url(url: str) -> bool:
    return url in POOLING_ENDPOINTS


@functools.cache
def _adapters() -> dict[str, Any]:
    """pydantic validators for each request shape (built once: they are costly)."""
    from pydantic import TypeAdapter
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest
    from vllm.entrypoints.pooling.scoring.protocol import RerankRequest, ScoreRequest

    return {
        "embeddings": TypeAdapter(EmbeddingRequest),
        "score": TypeAdapter(ScoreRequest),
        "rerank": TypeAdapter(RerankRequest),
    }


def parse_request(url: str, body: dict[str, Any]) -> Any:
    """The vLLM request object for ``body`` (raises pydantic's ``ValidationError``).

    A ``/v1/score`` body with ``query`` and ``documents`` is a rerank request: Parasail's
    ``openai-batch`` client sends its rerank batches there.
    """
    adapters = _adapters()
    if url == "/v1/embeddings":
        return adapters["embeddings"].validate_python(body)
    if url == "/v1/rerank" or is_rerank_body(body):
        return adapters["rerank"].validate_python(body)
    return adapters["score"].validate_python(body)


async def run_pooling(
    servers: PoolingServers,
    url: str,
    body: dict[str, Any],
    request_id: str,
    model_name: str,
) -> EngineResult:
    """Run one pooling request; bad requests are results, engine breakage raises."""
    from pydantic import ValidationError
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    handler = servers.handler(url)
    if handler is None:
        return error_result(
            400, "invalid_request_error", f"The model {model_name!r} does not support {url}."
        )
    encoding = body.get("encoding_format", "float")
    if url == "/v1/embeddings" and encoding not in JSON_ENCODINGS:
        return error_result(
            400,
            "invalid_request_error",
            f"Invalid encoding_format {encoding!r}: batch output is JSON, so only "
            "'float' and 'base64' are supported.",
            "encoding_format",
        )
    try:
        request = parse_request(url, {**body, "request_id": request_id})
    except ValidationError as exc:
        return validation_error_result(exc)
    response = await call_serving(handler(request, None), handler)
    if isinstance(response, ErrorResponse):
        dimensions = "dimensions" in body and "dimensions" in response.error.message
        return error_response_result(response, "dimensions" if dimensions else None)
    raw = getattr(response, "body", None)
    if not isinstance(raw, bytes | memoryview):
        return error_result(
            400, "invalid_request_error", "The request did not produce a JSON response."
        )
    data = bytes(raw)
    parsed = orjson.loads(data)
    if not isinstance(parsed, dict):
        return error_result(500, "InternalServerError", "Unexpected pooling response.")
    if "error" in parsed and "usage" not in parsed:
        error: dict[str, Any] = parsed["error"] if isinstance(parsed["error"], dict) else {}
        status = int(getattr(response, "status_code", 0) or 0)
        if status < 400:
            code = error.get("code")
            status = code if isinstance(code, int) and code >= 400 else 400
        return error_result(
            status,
            str(error.get("type", "BadRequestError")),
            str(error.get("message", "")),
            error.get("param"),
        )
    usage = parsed.get("usage") or {}
    return EngineResult(
        status_code=200,
        body_json=data.decode(),
        input_tokens=int(usage.get("prompt_tokens") or 0),
    )
