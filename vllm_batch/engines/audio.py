"""Transcription and translation requests through vLLM's speech-to-text serving objects.

``init_app_state`` builds ``openai_serving_transcription`` and ``openai_serving_translation``
when the model supports the ``transcription`` task (Whisper), as for ``vllm serve`` and
``vllm run-batch``. A line's body is ``vllm run-batch``'s ``BatchTranscriptionRequest`` or
``BatchTranslationRequest``: the audio is at ``file_url``. The body is validated first, then
the audio is fetched (``net/file_url.py``: the private-address guard, size and time limits) and
handed to the serving object as the upload ``file`` of vLLM's own request type, exactly as
``vllm run-batch`` does; the response object is the result body. vLLM is imported lazily.
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from vllm_batch.config import Settings
from vllm_batch.engines.engine import EngineResult
from vllm_batch.engines.serving import (
    call_serving,
    error_response_result,
    error_result,
    validation_error_result,
)
from vllm_batch.models.kinds import AUDIO_ENDPOINTS
from vllm_batch.net.file_url import PARAM, FileFetcher, FileURLError
from vllm_batch.net.guard import AllowList, Resolver, system_resolver

TRANSCRIPTIONS, TRANSLATIONS = AUDIO_ENDPOINTS


@dataclass(frozen=True)
class AudioServers:
    """The speech-to-text serving objects vLLM built for this model (None: not supported),
    and the fetcher for their ``file_url``."""

    transcription: Any = None
    translation: Any = None
    fetcher: FileFetcher | None = None

    @classmethod
    def from_state(cls, state: Any, fetcher: FileFetcher | None) -> AudioServers:
        return cls(
            transcription=getattr(state, "openai_serving_transcription", None),
            translation=getattr(state, "openai_serving_translation", None),
            fetcher=fetcher,
        )

    def serving(self, url: str) -> Any:
        return self.transcription if url == TRANSCRIPTIONS else self.translation

    def close(self) -> None:
        """Stop the serving objects' audio-decoding thread pools."""
        for serving in (self.transcription, self.translation):
            if serving is not None:
                serving.shutdown()


def is_audio_url(url: str) -> bool:
    return url in AUDIO_ENDPOINTS


@functools.cache
def _request_types() -> dict[str, tuple[Any, Any]]:
    """Per endpoint: ``vllm run-batch``'s line body type and vLLM's request type."""
    from vllm.entrypoints.launchers.run_batch import (
        BatchTranscriptionRequest,
        BatchTranslationRequest,
    )
    from vllm.entrypoints.speech_to_text.transcription.protocol import TranscriptionRequest
    from vllm.entrypoints.speech_to_text.translation.protocol import TranslationRequest

    return {
        TRANSCRIPTIONS: (BatchTranscriptionRequest, TranscriptionRequest),
        TRANSLATIONS: (BatchTranslationRequest, TranslationRequest),
    }


async def run_audio(
    servers: AudioServers, url: str, body: dict[str, Any], model_name: str
) -> EngineResult:
    """Run one transcription or translation; bad requests are results, engine breakage
    raises."""
    from fastapi import UploadFile
    from pydantic import ValidationError
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.exceptions import VLLMValidationError

    serving = servers.serving(url)
    if serving is None or servers.fetcher is None:
        return error_result(
            400, "invalid_request_error", f"The model {model_name!r} does not support {url}."
        )
    if body.get("stream"):
        return error_result(
            400, "invalid_request_error", "Streaming is not supported in batch requests.", "stream"
        )
    line_type, request_type = _request_types()[url]
    try:
        line_body = line_type.model_validate(body)
    except ValidationError as exc:
        return validation_error_result(exc)
    except VLLMValidationError as exc:  # its own check: no "file" in a batch body
        return error_result(400, "invalid_request_error", exc.args[0], exc.parameter)
    try:
        audio = await servers.fetcher.fetch(line_body.file_url)
    except FileURLError as exc:
        return error_result(400, "invalid_request_error", str(exc), PARAM)
    fields = line_body.model_dump(exclude={"file_url"})
    fields["file"] = UploadFile(file=io.BytesIO(audio), filename="audio")
    try:
        request = request_type.model_validate(fields)
    except ValidationError as exc:
        return validation_error_result(exc)
    create = serving.create_transcription if url == TRANSCRIPTIONS else serving.create_translation
    response = await call_serving(create(audio, request, None), serving)
    if isinstance(response, ErrorResponse):
        return error_response_result(response)
    return EngineResult(status_code=200, body_json=response.model_dump_json())


@contextlib.asynccontextmanager
async def file_fetcher(
    settings: Settings, resolver: Resolver = system_resolver
) -> AsyncIterator[FileFetcher]:
    """A ``FileFetcher`` with the ``audio_*`` settings, its HTTP client open while in use."""
    timeout = httpx.Timeout(settings.audio_fetch_timeout)
    async with httpx.AsyncClient(
        timeout=timeout, follow_redirects=False, trust_env=False
    ) as client:
        yield FileFetcher(
            client=client,
            allow=AllowList(settings.audio_allowed_hosts),
            max_bytes=settings.audio_max_bytes,
            timeout=settings.audio_fetch_timeout,
            resolver=resolver,
        )
