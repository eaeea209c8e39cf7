"""The one options model of ``vllm-batch``: every flag declared once, shared by its commands.

A ``Flag`` names its parameter, its option names (aliases such as ``-tp``), its type, its
help and the ``Settings`` field it maps to. Environment variables are read by ``Settings``
itself (``VLLM_BATCH_<FIELD>``); a flag given on the command line wins over them, and a flag
left unset (None) leaves the environment's value (or the default) in place.

``command(*flags)`` turns a function taking ``Given`` into a typer command whose parameters
are exactly those flags, so a command lists the flags it takes, never their declarations.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.models import OptionInfo

from vllm_batch.observability.logs import LEVELS


class Executor(StrEnum):
    """Where the engine runs (``Settings.executor``)."""

    local = "local"
    ray = "ray"


class Runner(StrEnum):
    """``vllm run-batch``'s ``--runner`` values that ``vllm-batch run`` takes."""

    auto = "auto"
    generate = "generate"
    pooling = "pooling"


LogLevel = Enum("LogLevel", {name: name for name in LEVELS}, type=str)  # type: ignore[misc]


@dataclass(frozen=True)
class Flag:
    """One command-line flag: its parameter, type, click option and ``Settings`` field."""

    param: str
    type: Any
    option: OptionInfo
    setting: str | None = None
    """The ``Settings`` field it sets; None: the command uses the value itself."""
    default: Any = None

    @property
    def annotation(self) -> Any:
        """The ``Annotated`` type typer reads."""
        return Annotated[self.type, self.option]

    def required(self) -> Flag:
        """The same flag, required (``run`` needs its ``--model``)."""
        return dataclasses.replace(self, default=inspect.Parameter.empty)

    def to_setting(self, value: Any) -> Any:
        """The flag's value as its setting's: enums by value, an empty list as unset."""
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, list) and not value:
            return None
        return value


def flag(
    param: str, type_: Any, *decls: str, setting: str | None = None, default: Any = None, **kw: Any
) -> Flag:
    """A ``Flag``; ``decls`` are its option names (default: ``--param-name``)."""
    return Flag(param, type_, typer.Option(*decls, **kw), setting, default)


# ------------------------------------------------------------------------- where and logs

HOST = flag(
    "host",
    str | None,
    setting="host",
    help="Bind address (run: for --enable-metrics; default VLLM_BATCH_HOST).",
)
PORT = flag(
    "port", int | None, setting="port", help="Port (run: for --enable-metrics, default 8000)."
)
DATA_DIR = flag(
    "data_dir", Path | None, setting="data_dir", help="Data directory (SQLite DB and files)."
)
DATABASE_URL = flag(
    "database_url", str | None, setting="database_url", help="Database URL (sqlite or postgresql)."
)
STORAGE_URL = flag(
    "storage_url",
    str | None,
    setting="storage_url",
    help="Storage: a local path or s3://bucket/prefix.",
)
LOG_LEVEL = flag(
    "log_level",
    LogLevel | None,  # type: ignore[valid-type]
    "--log-level",
    setting="log_level",
    case_sensitive=False,
    help="Log level (vLLM's own logs stay at warning unless debug). "
    "Env: VLLM_BATCH_LOG_LEVEL; VLLM_BATCH_LOG_FORMAT=auto|json|console.",
)

# ------------------------------------------------------------------------------ the API

API_KEY = flag(
    "api_key",
    str | None,
    setting="api_key",
    help="Require this bearer token on /v1 (shows in `ps`; see --api-key-file).",
)
API_KEY_FILE = flag(
    "api_key_file",
    Path | None,
    help="Read the bearer token for /v1 from this file (whitespace stripped).",
)
API_KEYS_FILE = flag(
    "api_keys_file",
    Path | None,
    setting="api_keys_file",
    help="Per-key ownership: a file of 'NAME:KEY' or 'NAME:KEY:admin' lines. Each key "
    "sees only its own files and batches; admin keys see all. "
    "Env: VLLM_BATCH_API_KEYS_FILE (or VLLM_BATCH_API_KEYS, comma separated).",
)
WORKER = flag(
    "worker",
    bool | None,
    "--worker/--no-worker",
    setting="worker",
    help="Run an in-process worker.",
)
CHUNK_SIZE = flag("chunk_size", int | None, setting="chunk_size", help="Lines per work unit.")
METRICS_PORT = flag(
    "metrics_port",
    int | None,
    setting="metrics_port",
    help="Serve this host's process metrics on http://HOST:PORT/metrics (for workers "
    "on hosts without the API server). Env: VLLM_BATCH_METRICS_PORT.",
)
METRICS_HOST = flag(
    "metrics_host",
    str | None,
    setting="metrics_host",
    help="Bind address for --metrics-port (default: VLLM_BATCH_HOST).",
)

# ---------------------------------------------------------------------- models and engines

MODEL = flag(
    "model",
    list[str] | None,
    "--model",
    setting="models",
    help="Model to serve, NAME=PATH or PATH (served under PATH, like vLLM), optionally with "
    ":KIND (generate, embed, score, transcribe; detected from the model's files if not "
    "given). Repeatable (run: one). Env: VLLM_BATCH_MODELS (serve, worker).",
)
SERVED_MODEL_NAME = flag(
    "served_model_name",
    str | None,
    help="Name requests use in body.model (overrides NAME=; needs exactly one model).",
)
LORA = flag(
    "lora",
    list[str] | None,
    "--lora",
    "--lora-modules",
    setting="loras",
    help="LoRA adapter NAME=PATH (of the only model) or NAME=PATH@MODEL (repeatable); "
    "requests name it in body.model. Env: VLLM_BATCH_LORAS; VLLM_BATCH_MAX_LORA_RANK.",
)
ENFORCE_EAGER = flag(
    "enforce_eager",
    bool | None,
    "--enforce-eager/--no-enforce-eager",
    setting="enforce_eager",
    help="Disable CUDA graphs / compilation.",
)
MAX_MODEL_LEN = flag(
    "max_model_len", int | None, setting="max_model_len", help="Engine max model length."
)
MAX_NUM_SEQS = flag(
    "max_num_seqs", int | None, setting="max_num_seqs", help="Engine max concurrent sequences."
)
MAX_NUM_BATCHED_TOKENS = flag(
    "max_num_batched_tokens",
    int | None,
    setting="max_num_batched_tokens",
    help="Engine max tokens per scheduler step.",
)
BLOCK_SIZE = flag(
    "block_size",
    int | None,
    setting="block_size",
    min=1,
    help="Tokens per KV-cache block (vLLM's --block-size): prefix caching reuses whole "
    "blocks only. Default: 32 on CPU for generative models with prefix caching, else "
    "vLLM's (16 on GPU).",
)
GPU_MEMORY_UTILIZATION = flag(
    "gpu_memory_utilization",
    float | None,
    setting="gpu_memory_utilization",
    help="Fraction of GPU memory for the engine.",
)
TENSOR_PARALLEL_SIZE = flag(
    "tensor_parallel_size",
    int | None,
    "--tensor-parallel-size",
    "-tp",
    setting="tensor_parallel_size",
    help="GPUs per model.",
)
DTYPE = flag("dtype", str | None, setting="dtype", help="Model dtype (auto: float32 on CPU).")
ENABLE_PREFIX_CACHING = flag(
    "enable_prefix_caching",
    bool | None,
    "--enable-prefix-caching/--no-enable-prefix-caching",
    setting="enable_prefix_caching",
    help="vLLM prefix caching.",
)
ENGINE = flag(
    "engine",
    str | None,
    "--engine",
    setting="engine",
    help="'vllm' (default: in-process), 'openai' (send lines to --engine-url upstreams; "
    "--model NAME or NAME=UPSTREAM_MODEL then names the upstream's model) or "
    "'instant-benchmark' (no inference; benchmarks only, not run). Env: VLLM_BATCH_ENGINE.",
)
ENGINE_URL = flag(
    "engine_url",
    list[str] | None,
    "--engine-url",
    setting="engine_urls",
    help="With --engine openai: an OpenAI-compatible upstream, http://HOST:PORT/v1 "
    "(repeatable). Env: VLLM_BATCH_ENGINE_URLS (comma-separated).",
)
ENGINE_API_KEY = flag(
    "engine_api_key",
    str | None,
    "--engine-api-key",
    setting="engine_api_key",
    help="Bearer token for the upstreams (shows in `ps`: prefer VLLM_BATCH_ENGINE_API_KEY).",
)
ENGINE_MAX_CONCURRENCY = flag(
    "engine_max_concurrency",
    int | None,
    "--engine-max-concurrency",
    setting="engine_max_concurrency",
    min=1,
    help="Most requests in flight per upstream (adaptive back-off lowers it while the "
    "upstream is slow or answers 429). Env: VLLM_BATCH_ENGINE_MAX_CONCURRENCY.",
)
EXECUTOR = flag(
    "executor",
    Executor | None,
    "--executor",
    setting="executor",
    case_sensitive=False,
    help="Where the engine runs: 'local' (this process, the default) or 'ray' (Ray actors, "
    "one engine each; see --ray-address). Env: VLLM_BATCH_EXECUTOR.",
)
RAY_ADDRESS = flag(
    "ray_address",
    str | None,
    "--ray-address",
    setting="ray_address",
    help="With --executor ray: the cluster's head HOST:PORT, or 'auto' (the cluster `ray "
    "start` runs on this machine); unset: a private Ray instance here. "
    "Env: VLLM_BATCH_RAY_ADDRESS.",
)
RAY_REPLICAS = flag(
    "ray_replicas",
    int | None,
    "--ray-replicas",
    setting="ray_replicas",
    min=1,
    help="With --executor ray: engine replicas (actors); default: as many as the cluster's "
    "GPUs hold, 1 without GPUs. Env: VLLM_BATCH_RAY_REPLICAS.",
)

ENGINE_FLAGS: tuple[Flag, ...] = (
    MODEL,
    SERVED_MODEL_NAME,
    LORA,
    ENFORCE_EAGER,
    MAX_MODEL_LEN,
    MAX_NUM_SEQS,
    MAX_NUM_BATCHED_TOKENS,
    BLOCK_SIZE,
    GPU_MEMORY_UTILIZATION,
    TENSOR_PARALLEL_SIZE,
    DTYPE,
    ENABLE_PREFIX_CACHING,
    ENGINE,
    ENGINE_URL,
    ENGINE_API_KEY,
    ENGINE_MAX_CONCURRENCY,
    EXECUTOR,
    RAY_ADDRESS,
    RAY_REPLICAS,
    LOG_LEVEL,
)
"""The flags of the engine (and logs): ``serve``, ``worker`` and ``run`` take them all."""

STORE_FLAGS: tuple[Flag, ...] = (DATA_DIR, DATABASE_URL, STORAGE_URL)

# ------------------------------------------------------------- `run` (as `vllm run-batch`)

REQUIRED = inspect.Parameter.empty
INPUT_FILE = flag(
    "input_file",
    str,
    "-i",
    "--input-file",
    default=REQUIRED,
    help="Input JSONL: a local path or http(s) URL.",
)
OUTPUT_FILE = flag(
    "output_file",
    str,
    "-o",
    "--output-file",
    default=REQUIRED,
    help="Output JSONL: a local path or http(s) URL (HTTP PUT).",
)
OUTPUT_TMP_DIR = flag(
    "output_tmp_dir", str | None, help="Where to write a URL output before uploading it."
)
STRICT = flag(
    "strict",
    bool,
    "--strict",
    default=False,
    help="Validate every line like the server; exit on any error.",
)
RESUME = flag(
    "resume",
    bool,
    "--resume",
    default=False,
    help="Continue a local output left by an interrupted run.",
)
PROGRESS_INTERVAL = flag(
    "progress_interval",
    float,
    default=5.0,
    help="Seconds between progress log lines (when not a TTY).",
)
MAX_BUFFERED_RESULTS = flag(
    "max_buffered_results",
    int,
    default=4096,
    min=1,
    help="Most finished results kept in memory behind a slower earlier request; "
    "when full, reading pauses until that request finishes.",
)
RUNNER = flag(
    "runner",
    Runner | None,
    help="vLLM's runner: pooling serves embeddings/score/rerank (same as --model "
    "...:embed or :score); default: the model's kind, detected from its files.",
)
ENABLE_METRICS = flag(
    "enable_metrics",
    bool,
    "--enable-metrics",
    setting="metrics_enabled",
    default=False,
    help="Serve Prometheus metrics on http://HOST:PORT/metrics while the run lasts.",
)
URL = flag("url", str | None, help="Deprecated (as in vLLM): use --host.", hidden=True)
ENABLE_PROMPT_TOKENS_DETAILS = flag(
    "enable_prompt_tokens_details",
    bool,
    "--enable-prompt-tokens-details",
    default=False,
    help="Always on; accepted as vLLM's.",
    hidden=True,
)
"""Where the database and files live: ``serve`` and ``worker``."""


class Given:
    """The values a command was given, by parameter name."""

    def __init__(self, flags: Iterable[Flag], values: dict[str, Any]) -> None:
        self.flags = {f.param: f for f in flags}
        self.values = values

    def __getitem__(self, param: str) -> Any:
        return self.values[param]

    def settings_values(self, *, exclude: Iterable[str] = ()) -> dict[str, Any]:
        """The given flags as ``Settings`` fields (unset flags left out)."""
        skip = set(exclude)
        values: dict[str, Any] = {}
        for param, f in self.flags.items():
            if f.setting is None or param in skip:
                continue
            value = f.to_setting(self.values[param])
            if value is not None:
                values[f.setting] = value
        return values


def command(
    *flags: Flag, context: bool = False
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A typer command taking exactly ``flags``; the body gets ``Given`` (after ``ctx``
    when ``context``). A flag listed twice is a programming error."""
    params = [f.param for f in flags]
    duplicates = sorted({p for p in params if params.count(p) > 1})
    if duplicates:
        raise ValueError(f"flags listed twice: {', '.join(duplicates)}")

    def decorate(body: Callable[..., None]) -> Callable[..., None]:
        def run(**values: Any) -> None:
            if context:
                body(values.pop("ctx"), Given(flags, values))
            else:
                body(Given(flags, values))

        parameters = [
            inspect.Parameter(
                f.param, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.annotation
            )
            for f in flags
        ]
        annotations = {f.param: f.annotation for f in flags}
        if context:
            parameters.insert(
                0,
                inspect.Parameter(
                    "ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
                ),
            )
            annotations["ctx"] = typer.Context
        run.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        run.__annotations__ = annotations
        run.__name__ = body.__name__
        run.__qualname__ = body.__qualname__
        run.__doc__ = body.__doc__
        run.__module__ = body.__module__
        run.flags = flags  # type: ignore[attr-defined]
        return run

    return decorate
