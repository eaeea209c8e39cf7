"""vLLM adapter: an ``AsyncLLM`` engine behind vLLM's own OpenAI serving layer.

Chat, completion and Responses API requests go through ``OpenAIServingChat``,
``OpenAIServingCompletion`` and ``OpenAIServingResponses`` exactly as ``vllm serve`` handles
them (chat template, sampling parameters, structured outputs, LoRA adapters named in
``model``, logprobs, errors), so response bodies are the same bytes a vLLM server returns.
Pooling requests go to ``engines/pooling.py``, audio requests to ``engines/audio.py``.
vLLM is imported lazily, inside ``start``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from vllm_batch.config import ModelSpec, Settings
from vllm_batch.engines.audio import AudioServers, file_fetcher, is_audio_url, run_audio
from vllm_batch.engines.blocking import in_daemon_thread, launch_processes
from vllm_batch.engines.engine import EngineResult, MaxNumSeqs
from vllm_batch.engines.pooling import PoolingServers, is_pooling_url, run_pooling
from vllm_batch.engines.serving import (
    call_serving,
    error_response_result,
    error_result,
    streaming_refused,
)
from vllm_batch.engines.start_method import chosen_method, engine_start
from vllm_batch.engines.structured import ConflictingStructuredOutputs, translate_guided_fields
from vllm_batch.models.adapters import LoraSpec, max_lora_rank
from vllm_batch.models.kinds import ModelKind, is_pooling

log = logging.getLogger(__name__)

VLLM_MODULES = (
    "starlette.datastructures",
    "vllm.engine.arg_utils",
    "vllm.entrypoints.launchers.api_server.app_state",
    "vllm.entrypoints.launchers.run_batch",
    "vllm.v1.engine.async_llm",
)
"""What ``start`` imports; ``import_vllm`` loads them off the event loop."""
CPU_DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
MEDIA_ENV = {"VLLM_MEDIA_URL_ALLOW_REDIRECTS": "0"}
"""vLLM fetches a line's media URLs itself: ``net/media_url.py`` checks the URL a line names,
so vLLM must not follow a redirect from it to an address the check refuses. Set where unset
(an operator may set it to 1 again: docs/security.md)."""
CPU_PREFIX_BLOCK_SIZE = 32
"""KV-cache block on CPU for generative models with prefix caching, unless one is set.

vLLM's CPU default is 128 tokens, and its prefix cache reuses only whole blocks: a shared
400-token document is reused as 384 tokens, and a 150-token system prompt as 128. 32 is the
CPU backend's preferred granularity; benchmarks/results/prefix_* measure the difference.
"""


def set_cpu_env(settings: Settings) -> None:
    """vLLM's CPU variables for an engine about to start (``CPU_DEFAULT_ENV`` where unset).

    vLLM's CPU platform applies ``VLLM_CPU_KVCACHE_SPACE`` over ``--kv-cache-memory-bytes``,
    so an explicit ``kv_cache_gib`` removes it to take effect.
    """
    for key, value in CPU_DEFAULT_ENV.items():
        if not os.environ.get(key):
            os.environ[key] = value
    if settings.kv_cache_gib is not None:
        del os.environ["VLLM_CPU_KVCACHE_SPACE"]


def set_media_env() -> None:
    """``MEDIA_ENV`` where unset, before an engine starts (its processes inherit it)."""
    for key, value in MEDIA_ENV.items():
        os.environ.setdefault(key, value)


def has_cuda_gpu() -> bool:
    return any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl"))


def engine_argv(
    spec: ModelSpec, settings: Settings, *, max_num_seqs: int | None = None
) -> list[str]:
    """``vllm run-batch``-style arguments for one model, from our settings.

    ``max_num_seqs`` overrides the setting (the worker lowers it after a CUDA OOM).
    """
    gpu = has_cuda_gpu()
    dtype = "float32" if settings.dtype == "auto" and not gpu else settings.dtype
    eager = settings.enforce_eager if settings.enforce_eager is not None else not gpu
    argv = ["-i", "-", "-o", "-", "--model", spec.path, "--served-model-name", spec.name]
    argv += ["--dtype", dtype, "--tensor-parallel-size", str(settings.tensor_parallel_size)]
    argv += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    argv += ["--enable-prompt-tokens-details", "--disable-log-stats"]
    prefix = (
        "--enable-prefix-caching"
        if settings.enable_prefix_caching
        else "--no-enable-prefix-caching"
    )
    if spec.resolved_kind in (ModelKind.GENERATE, None):
        # Pooling and speech-to-text models: vLLM decides (encoders and Whisper's cross
        # attention cannot cache prefixes; forcing it on crashes a Whisper engine).
        argv.append(prefix)
    if eager:
        argv.append("--enforce-eager")
    for flag, value in (
        ("--max-model-len", settings.max_model_len),
        ("--max-num-seqs", max_num_seqs or settings.max_num_seqs),
        ("--max-num-batched-tokens", settings.max_num_batched_tokens),
        ("--block-size", block_size(spec, settings, gpu=gpu)),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if settings.kv_cache_gib is not None:
        argv += ["--kv-cache-memory-bytes", str(int(settings.kv_cache_gib * 1024**3))]
    return argv + runner_argv(spec) + lora_argv(settings.adapters_of(spec.name), settings)


def block_size(spec: ModelSpec, settings: Settings, *, gpu: bool) -> int | None:
    """The KV-cache block to ask for: the setting, else ``CPU_PREFIX_BLOCK_SIZE`` where it
    helps (CPU, prefix caching on, a generative model), else vLLM's default (None)."""
    if settings.block_size is not None:
        return settings.block_size
    if gpu or not settings.enable_prefix_caching or spec.resolved_kind is not ModelKind.GENERATE:
        return None
    return CPU_PREFIX_BLOCK_SIZE


def runner_argv(spec: ModelSpec) -> list[str]:
    """``--runner pooling`` for embedding and score models; vLLM's default otherwise."""
    return ["--runner", "pooling"] if is_pooling(spec.resolved_kind) else []


def lora_argv(adapters: list[LoraSpec], settings: Settings) -> list[str]:
    """vLLM's LoRA flags for ``adapters`` (none: LoRA stays off).

    Every adapter of the model gets a slot (``--max-loras``) unless ``max_loras`` says
    otherwise, so one engine step can mix all of them.
    """
    if not adapters:
        return []
    rank = settings.max_lora_rank or max_lora_rank(adapters)
    slots = settings.max_loras or len(adapters)
    argv = ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(slots)]
    return [*argv, "--lora-modules", *(f"{a.name}={a.path}" for a in adapters)]


class VllmEngine(MaxNumSeqs):
    """One model on one ``AsyncLLM``; ``run`` never raises for a bad request."""

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        super().__init__(settings.max_num_seqs)
        self.model_name = spec.name
        self._spec = spec
        self._settings = settings
        self._stack = contextlib.AsyncExitStack()
        self._chat: Any = None
        self._completion: Any = None
        self._pooling = PoolingServers()
        self._audio = AudioServers()
        self._responses: Any = None

    @property
    def max_in_flight(self) -> int:
        # Twice the scheduler's batch keeps it full while finished results are written.
        return 2 * self._max_num_seqs

    async def start(self) -> None:
        """Import vLLM and launch the engine; the blocking steps run off the event loop.

        Cancelling a start stops the engine processes it launched (see ``launch_processes``).
        """
        if not has_cuda_gpu():
            set_cpu_env(self._settings)
        set_media_env()
        await in_daemon_thread(import_vllm, "vllm-import")
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.run_batch import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        args = make_arg_parser(FlexibleArgumentParser()).parse_args(
            engine_argv(self._spec, self._settings, max_num_seqs=self._max_num_seqs_cap)
        )
        log.info("starting vLLM engine for %s from %s", self._spec.name, self._spec.path)
        client = await self._stack.enter_async_context(
            open_client(args, with_stats=self._settings.metrics_enabled)
        )
        state = State()
        await init_app_state(client, state, args, await client.get_supported_tasks())
        self._chat = getattr(state, "openai_serving_chat", None)
        self._completion = getattr(state, "openai_serving_completion", None)
        self._pooling = PoolingServers.from_state(state)
        fetcher = None
        if getattr(state, "openai_serving_transcription", None) is not None:
            fetcher = await self._stack.enter_async_context(file_fetcher(self._settings))
        self._audio = AudioServers.from_state(state, fetcher)
        self._responses = getattr(state, "openai_serving_responses", None)
        self._max_num_seqs = client.vllm_config.scheduler_config.max_num_seqs
        log.info("vLLM engine ready for %s (max_num_seqs=%d)", self.model_name, self._max_num_seqs)

    async def stop(self) -> None:
        self._chat = self._completion = self._responses = None
        self._pooling = PoolingServers()
        self._audio.close()
        self._audio = AudioServers()
        await self._stack.aclose()

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> EngineResult:
        from pydantic import ValidationError
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        if is_pooling_url(url):  # embeddings, score, rerank: engines/pooling.py
            return await run_pooling(self._pooling, url, body, request_id, self.model_name)
        if is_audio_url(url):  # transcriptions, translations: engines/audio.py
            return await run_audio(self._audio, url, body, self.model_name)
        if url == "/v1/chat/completions" and self._chat is not None:
            request_type: Any = ChatCompletionRequest
            handler = self._chat.create_chat_completion
        elif url == "/v1/completions" and self._completion is not None:
            request_type = CompletionRequest
            handler = self._completion.create_completion
        elif url == "/v1/responses" and self._responses is not None:
            from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

            request_type = ResponsesRequest
            handler = self._responses.create_responses
        else:
            return error_result(
                400,
                "invalid_request_error",
                f"The model {self.model_name!r} does not support {url}.",
            )
        if body.get("stream"):
            return streaming_refused()
        try:
            body = translate_guided_fields(body)
        except ConflictingStructuredOutputs as exc:
            return error_result(400, "invalid_request_error", str(exc), exc.param)
        try:
            request = request_type.model_validate({**body, "request_id": request_id})
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ()))
            return error_result(
                400,
                "invalid_request_error",
                f"Invalid request body: {first.get('msg')}",
                param or None,
            )
        response = await call_serving(handler(request, None), handler.__self__)
        if isinstance(response, ErrorResponse):
            return error_response_result(response)
        # Responses bodies carry aliased fields (text.format "schema"): dump them as vLLM does.
        body_json = response.model_dump_json(by_alias=url == "/v1/responses")
        return ok_result(body_json, response.usage)


def ok_result(body_json: str, usage: Any) -> EngineResult:
    """A 200 result with the token counts of a chat/completion ``UsageInfo`` or a
    Responses ``ResponseUsage`` (``None``: no counts)."""
    if usage is None:
        return EngineResult(status_code=200, body_json=body_json)
    if hasattr(usage, "input_tokens"):  # the Responses API's names
        details = usage.input_tokens_details
        counts = (
            usage.input_tokens,
            (details.cached_tokens or 0) if details else 0,
            usage.output_tokens or 0,
            usage.output_tokens_details.reasoning_tokens or 0,
        )
    else:
        prompt, completion = usage.prompt_tokens_details, usage.completion_tokens_details
        counts = (
            usage.prompt_tokens,
            (prompt.cached_tokens or 0) if prompt else 0,
            usage.completion_tokens or 0,
            completion.reasoning_tokens if completion else 0,
        )
    input_tokens, cached_tokens, output_tokens, reasoning_tokens = counts
    return EngineResult(
        status_code=200,
        body_json=body_json,
        input_tokens=input_tokens,
        cached_tokens=cached_tokens,
        output_tokens=output_tokens,
        reasoning_tokens=reasoning_tokens,
    )


@contextlib.asynccontextmanager
async def open_client(args: Any, *, with_stats: bool) -> AsyncIterator[Any]:
    """An ``AsyncLLM`` as vLLM's ``build_async_engine_client`` makes it, plus our stat logger.

    ``with_stats``: vLLM's scheduler stats feed the ``vllm_batch_engine_*`` metrics
    (``observability/engine_stats.py``); vLLM's own stat logging stays off either way.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    from vllm_batch.observability.engine_stats import stat_logger_class

    engine_args = AsyncEngineArgs.from_cli_args(args)
    user_method = chosen_method()  # before vLLM's platform sets its own
    vllm_config = engine_args.create_engine_config(usage_context=UsageContext.LLM_CLASS)

    def launch() -> Any:
        # Built outside the event loop, AsyncLLM starts its output tasks on first use.
        with engine_start(user_method) as method:
            log.info("starting engine processes (%s)", method or "vLLM's default method")
            return AsyncLLM.from_vllm_config(
                vllm_config=vllm_config,
                usage_context=UsageContext.LLM_CLASS,
                stat_loggers=[stat_logger_class()] if with_stats else None,
                enable_log_requests=engine_args.enable_log_requests,
                disable_log_stats=engine_args.disable_log_stats,
            )

    client = await launch_processes(
        launch, "vllm-engine-launch", lambda built: built.shutdown(timeout=0)
    )
    try:
        await client.reset_mm_cache()  # as vLLM does: drop the profiling run's dummy data
        yield client
    finally:
        client.shutdown(timeout=vllm_config.shutdown_timeout)


def import_vllm() -> None:
    """The vLLM modules ``start`` needs (seconds of imports; run off the event loop)."""
    for name in VLLM_MODULES:
        importlib.import_module(name)
