"""All settings in one pydantic-settings object, built once and passed down."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, computed_field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from vllm_batch.models.adapters import LoraSpec, resolve_adapters
from vllm_batch.models.kinds import ModelKind, detect_kind
from vllm_batch.net.base_url import check_base_url

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
KIND_VALUES = frozenset(kind.value for kind in ModelKind)


def _env(*names: str) -> AliasChoices:
    """Accept ``VLLM_BATCH_<NAME>`` first, then the legacy names given."""
    return AliasChoices(*names)


@dataclass(frozen=True)
class ModelSpec:
    """A served model: the name clients put in ``body.model``, where its weights are, and
    (optionally) its kind: ``generate``, ``embed``, ``score`` or ``transcribe`` (see
    ``models/kinds.py``)."""

    name: str
    path: str
    kind: ModelKind | None = None
    """As given (``NAME=PATH:KIND``); None: detected from the model's files."""

    @classmethod
    def parse(cls, spec: str) -> ModelSpec:
        """Parse ``NAME=PATH`` or ``PATH`` (served under the path as given, like vLLM), each
        optionally followed by ``:KIND`` (``generate``, ``embed``, ``score``, ``transcribe``)."""
        kind: ModelKind | None = None
        head, colon, tail = spec.rpartition(":")
        if colon and tail in KIND_VALUES:
            spec, kind = head, ModelKind(tail)
        name, sep, path = spec.partition("=")
        if not sep:
            return cls(name=spec, path=spec, kind=kind)
        if not name or not path:
            raise ValueError(
                f"invalid model spec {spec!r}: expected NAME=PATH or PATH, "
                "optionally followed by :generate, :embed, :score or :transcribe"
            )
        return cls(name=name, path=path, kind=kind)

    @property
    def resolved_kind(self) -> ModelKind | None:
        """The kind given, else detected from the files (None: they cannot be read here)."""
        return self.kind if self.kind is not None else detect_kind(self.path)


class Settings(BaseSettings):
    """Server, worker and engine settings; every field is also an environment variable."""

    model_config = SettingsConfigDict(
        env_prefix="VLLM_BATCH_", populate_by_name=True, extra="ignore"
    )

    # ---- Server and storage (installation.md)
    host: str = Field(default="127.0.0.1", description="Bind address of the API server.")
    port: int = Field(default=4080, description="Port of the API server.")
    # The SQLite database (unless database_url says otherwise) and, by default, the files.
    data_dir: Path = Path("./data")
    # The database: sqlite+aiosqlite:///… or postgresql+asyncpg://… (plain postgresql:// and
    # sqlite:// work too); unset: from the POSTGRES_* parts if host and database are set,
    # else SQLite in data_dir.
    database_url: str | None = Field(
        default=None, validation_alias=_env("VLLM_BATCH_DATABASE_URL", "DATABASE_URL")
    )
    postgres_host: str | None = Field(
        default=None,
        validation_alias=_env("POSTGRES_HOST"),
        description="With POSTGRES_DB (and no database URL): selects PostgreSQL on this host.",
    )
    postgres_port: int = Field(
        default=5432, validation_alias=_env("POSTGRES_PORT"), description="PostgreSQL's port."
    )
    postgres_db: str | None = Field(
        default=None, validation_alias=_env("POSTGRES_DB"), description="PostgreSQL database."
    )
    postgres_user: str | None = Field(
        default=None,
        validation_alias=_env("POSTGRES_USER"),
        description="PostgreSQL user (unset: postgres).",
    )
    postgres_password: str | None = Field(
        default=None,
        validation_alias=_env("POSTGRES_PASSWORD"),
        description="PostgreSQL password (never logged).",
    )
    # Where file contents live: a local path or s3://bucket/prefix (credentials, region and
    # endpoint from the usual AWS_* variables, e.g. AWS_ENDPOINT_URL for MinIO); unset:
    # data_dir.
    storage_url: str | None = None
    # /ready is 503 (and vllm_batch_storage_ok 0) while local file storage has less free
    # space than this; 0 turns the check off. S3 has no free space to check.
    storage_min_free_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    # A batch whose output files the storage refuses (full) retries with backoff (2 s,
    # doubling) up to this interval.
    finalize_retry_max_seconds: float = Field(default=60.0, gt=0)

    # ---- Models and LoRA adapters (models.md)
    # NAME=PATH, or PATH (served under the path, like vLLM), optionally followed by
    # :generate, :embed, :score or :transcribe (else the kind is detected); unset: the
    # default model, SmolLM2-135M-Instruct in ./models.
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # LoRA adapters, "NAME=PATH" (of the only model) or "NAME=PATH@MODEL"; requests name
    # them in body.model.
    loras: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # vLLM's --max-lora-rank; unset: the smallest that fits every adapter's r (from its
    # adapter_config.json).
    max_lora_rank: int | None = Field(default=None, ge=1)
    # vLLM's --max-loras; unset: all of the model's adapters.
    max_loras: int | None = Field(default=None, ge=1)

    # ---- API keys and HTTP (security.md)
    # Require Authorization: Bearer <key> on /v1: one admin key named "default". Checked
    # before any body is read; never printed or logged.
    api_key: str | None = Field(default=None, repr=False)
    # Per-key ownership: "NAME:KEY" or "NAME:KEY:admin" entries, comma separated, and/or a
    # file of such lines. Each key sees only its own files and batches; admin keys see all.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)
    # A file of NAME:KEY or NAME:KEY:admin lines (# starts a comment), as api_keys.
    api_keys_file: Path | None = None
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS (comma-separated)."
    )
    # Host headers accepted when no API key is set (DNS-rebinding guard); "*" allows all.
    # localhost, 127.0.0.1, ::1 and ``host`` are always allowed.
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    docs_enabled: bool = True  # serve /docs, /redoc and /openapi.json
    # Bytes a request body may have, except uploads (POST /v1/files: max_upload_bytes) and
    # upload parts (max_upload_part_bytes); counted as bytes arrive, chunked bodies too.
    max_request_body_bytes: int = Field(default=1024 * 1024, ge=1)
    # Seconds a connection may take to send a request's headers (from connecting, or from a
    # kept-alive request's first byte); later: a 408 and the connection is closed
    # (api/connections.py).
    header_timeout: float = Field(default=10.0, gt=0)
    # A request body must advance by 1 KiB (or end) every this many seconds, not counting
    # time the server itself is not reading; else the connection is closed (a 408 if no
    # answer has started).
    body_timeout: float = Field(default=30.0, gt=0)
    # Connections one client address may have open at once; more get a 429
    # too_many_connections and are closed. 0: no cap. Behind a reverse proxy every client
    # has the proxy's address: raise it or set 0 there.
    max_connections_per_client: int = Field(default=128, ge=0)

    # ---- Logging (observability.md)
    # debug, info, warning, error, critical; vLLM's own logs stay at WARNING unless debug.
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    # json (one object per line), console, or auto: console on a terminal, JSON otherwise.
    log_format: Literal["auto", "json", "console"] = "auto"

    # ---- Processes and engine choice (scaling.md)
    worker: bool = Field(default=True, description="Run a worker with serve (worker_mode).")
    # Where serve runs that worker: "process", a child process of its own, so that API
    # requests never wait for the engine's front end (it dies with serve); or "inline", on
    # the API's own event loop. An app given an engine factory (tests) runs it inline.
    worker_mode: Literal["process", "inline"] = "process"
    # The worker process's CPU niceness (and its engine's), 0-19: with few cores, the API
    # gets the CPU first and answers while the engine's front end is busy.
    worker_nice: int = Field(default=10, ge=0, le=19)
    # "vllm": an in-process engine per worker; "openai": OpenAI-compatible upstream servers
    # (engine_urls, docs/scaling.md); "instant-benchmark": no inference, benchmarks only.
    engine: Literal["vllm", "openai", "instant-benchmark"] = "vllm"

    # ---- Remote upstreams (scaling.md)
    # Base URLs of OpenAI-compatible servers (vLLM, SGLang, TGI, llama.cpp, a router), each
    # http(s)://HOST:PORT/v1 without credentials; lines go to any of them that lists the
    # line's model in /v1/models.
    engine_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Authorization: Bearer token for the upstreams (never logged).
    engine_api_key: str | None = Field(default=None, repr=False)
    # Per upstream: most requests in flight from one worker.
    engine_max_concurrency: int = Field(default=64, ge=1)
    # The floor the adaptive (AIMD) window shrinks to.
    engine_min_concurrency: int = Field(default=1, ge=1)
    # AIMD: halve an upstream's window when its latency (per output token, averaged) exceeds
    # this many times its lowest recent value, or on a 429; 0 turns the latency signal off.
    engine_latency_factor: float = Field(default=3.0, ge=0)
    engine_request_timeout: float = Field(default=600.0, gt=0)  # seconds per attempt
    # How long one request may keep failing over / waiting for a healthy upstream before
    # the engine counts as failed (the chunk is handed back, as when a local engine dies).
    engine_retry_seconds: float = Field(default=300.0, gt=0)
    engine_health_interval: float = Field(default=2.0, gt=0)  # probe dead upstreams this often

    # ---- Ray executor (scaling.md)
    # "local": the engine runs in this process; "ray": as Ray actors, one engine each.
    executor: Literal["local", "ray"] = "local"
    # Unset: a private Ray instance on this machine (or RAY_ADDRESS); "auto": the cluster
    # `ray start` runs here; HOST:PORT: that cluster's head.
    ray_address: str | None = None
    # Engine replicas (actors); unset: as many as the cluster's GPUs hold (1 without GPUs).
    ray_replicas: int | None = Field(default=None, ge=1)
    ray_cpus_per_replica: float = Field(default=1.0, ge=0)  # CPUs each replica reserves
    # GPUs each replica reserves; unset: tensor_parallel_size on a cluster with GPUs, else 0.
    ray_gpus_per_replica: float | None = Field(default=None, ge=0)
    # How often Ray restarts a replica whose process died before the engine gives up on it.
    ray_max_restarts: int = Field(default=3, ge=0)

    # ---- Database connection pools
    # API requests and background work (worker, finalization, housekeeping, validation,
    # deliveries) each have their own pool, so a burst of requests cannot starve the worker.
    db_pool_size: int = Field(
        default=10, ge=1, description="Connections kept open for API requests."
    )
    db_max_overflow: int = Field(
        default=10, ge=0, description="Extra connections for API requests under a burst."
    )
    db_worker_pool_size: int = Field(
        default=5,
        ge=1,
        description="Connections kept open for background work (vllm-batch worker uses only "
        "this pool).",
    )
    db_worker_max_overflow: int = Field(
        default=5, ge=0, description="Extra connections for background work under a burst."
    )
    # Seconds a request waits for a free connection before it gets a 503 (code
    # database_busy, Retry-After: 1); background work retries.
    db_pool_timeout: float = Field(default=10.0, gt=0)
    # SQLite: how long a statement waits for another process's write lock before it fails.
    sqlite_busy_timeout: float = Field(default=60.0, gt=0)

    # ---- Files, uploads and batch limits (api.md)
    max_upload_bytes: int = Field(
        default=200 * 1024 * 1024, description="Largest POST /v1/files upload (413 above)."
    )
    # Uploads API (POST /v1/uploads): the largest part (413 above; OpenAI's limit: 64 MB).
    max_upload_part_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    # Uploads API: the largest `bytes` an upload may be created with (OpenAI's: 8 GB).
    max_chunked_upload_bytes: int = Field(default=8 * 1024**3, ge=1)
    # Uploads API: seconds an upload may stay pending before it expires (OpenAI's: an hour).
    upload_expiry_seconds: int = Field(default=3600, ge=1)
    max_requests_per_batch: int = Field(
        default=50_000, description="Lines per batch file (raise it freely)."
    )

    # ---- Workers, chunks and leases (durability.md)
    chunk_size: int = Field(
        default=5_000,
        ge=1,
        validation_alias=_env("VLLM_BATCH_CHUNK_SIZE", "CHUNK_SIZE"),
        description="Lines per chunk, the unit of work a worker leases.",
    )
    # Chunk lease; a dead worker's chunk is reclaimed after it (at once when the dead worker
    # ran on the same host).
    lease_seconds: float = 60.0
    # After this many real engine failures on a chunk (not restarts, lease takeovers or a
    # model that cannot load), its unfinished lines become engine_error lines.
    max_chunk_attempts: int = 10
    poll_interval: float = 0.5  # seconds between polls of an idle worker
    # Save results at least this often (seconds) / every N results; a worker holding more
    # than 4 chunks stretches the interval in proportion.
    flush_interval: float = 1.0
    flush_every: int = Field(default=1000, description="Save results every N results.")

    # ---- Scheduling (scheduling.md)
    # Chunks a worker holds at once (of one model, any batches) when it takes a chunk of a
    # batch it holds nothing of (fairness). To keep the engine's in-flight window full
    # across chunk boundaries it claims past this while the lines it holds don't fill it.
    max_chunks_in_flight: int = Field(default=8, ge=1)
    # A batch whose estimated finish leaves less than this fraction of its completion
    # window goes before every batch that is not at risk (least slack first).
    deadline_margin: float = Field(default=0.25, ge=0, le=1)
    # Seconds another model's batch may wait, with none of its chunks running, before a
    # worker serving several models drains its current model and switches.
    model_max_wait: float = Field(default=300.0, ge=0)

    # ---- vLLM engine (models.md)
    gpu_memory_utilization: float = Field(
        default=0.9,
        validation_alias=_env("VLLM_BATCH_GPU_MEMORY_UTILIZATION", "GPU_MEMORY_UTILIZATION"),
        description="Share of GPU memory vLLM may use.",
    )
    max_model_len: int | None = None  # context length; unset: the model's
    # Scheduler sizes (unset: vLLM's); the in-flight window is 2 x max_num_seqs.
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None  # tokens per scheduler step; unset: vLLM's
    # Tokens per KV-cache block; prefix caching reuses whole blocks. Unset: 32 on CPU for
    # generative models with prefix caching, else vLLM's choice (16 on GPU).
    block_size: int | None = Field(default=None, ge=1)
    dtype: str = "auto"  # "auto" means float32 on CPU (bf16 is slow and inaccurate there)
    enforce_eager: bool | None = None  # unset: eager on CPU (fast start), graphs on GPU
    tensor_parallel_size: int = 1  # GPUs per engine
    enable_prefix_caching: bool = True  # vLLM prefix caching
    # Submit requests sharing a prompt prefix together: over a whole chunk on the server,
    # over --max-buffered-results lines in vllm-batch run.
    group_prefixes: bool = True
    # KV cache size in GiB (fractions allowed); unset: vLLM's. On CPU it takes precedence
    # over VLLM_CPU_KVCACHE_SPACE (default 1 GiB).
    kv_cache_gib: float | None = None

    # ---- GPU health guard (observability.md)
    # Pause claiming new work while a GPU is too hot or thermal-throttled (readings and
    # metrics stay on when off).
    gpu_guard: bool = True
    gpu_max_temperature: float = Field(default=85.0, gt=0)  # °C: pause at or above this
    gpu_resume_temperature: float = Field(default=80.0, gt=0)  # °C: resume at or below this
    # NVML throttle reasons that pause claims (power-cap throttling is normal under load).
    gpu_pause_throttle_reasons: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["hw_thermal_slowdown", "sw_thermal_slowdown"]
    )
    gpu_poll_interval: float = Field(default=5.0, gt=0)  # seconds between GPU readings
    # CUDA out-of-memory back-off: the in-flight window halves down to this.
    oom_min_in_flight: int = Field(default=4, ge=1)
    # CUDA out-of-memory back-off: max_num_seqs halves down to this.
    oom_min_num_seqs: int = Field(default=2, ge=1)

    # ---- Webhooks and result handlers (webhooks.md)
    webhook_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Webhook targets for every batch (comma-separated)."
    )
    # whsec_… signing secret; unset: generated on first start and kept in the database.
    webhook_secret: str | None = Field(default=None, repr=False)
    # Hosts, IPs or CIDRs that webhooks may target although private/loopback/link-local.
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webhook_timeout: float = Field(default=10.0, gt=0)  # seconds per delivery attempt
    # Deliveries (webhooks and handler runs) retry with backoff until this many seconds pass.
    delivery_retry_horizon: float = Field(default=72 * 3600, gt=0)
    delivery_backoff_base: float = Field(default=5.0, gt=0)  # first retry delay (seconds)
    # Cap of the retry delay (doubling, jitter x0.5-1).
    delivery_backoff_max: float = Field(default=3600.0, gt=0)
    delivery_concurrency: int = Field(default=8, ge=1)  # deliveries in flight per process
    # Per receiver (a webhook host, or one result handler): attempts in flight per process.
    delivery_host_concurrency: int = Field(default=2, ge=1)
    # Consecutive failures of a receiver (timeout, connection error, HTTP 429 or 5xx, a
    # failed handler run) that open its circuit breaker.
    delivery_breaker_failures: int = Field(default=5, ge=1)
    # Seconds an open breaker waits before one probe attempt.
    delivery_breaker_cooldown: float = Field(default=60.0, gt=0)
    delivery_poll_interval: float = Field(default=1.0, gt=0)  # seconds between claims
    deliveries: bool = True  # run the delivery dispatcher in this process
    # Which handlers run ("webhook" included); unset: every handler whose enabled() is true.
    handlers: Annotated[list[str] | None, NoDecode] = None
    # Modules to import that register result handlers (comma-separated).
    handler_modules: Annotated[list[str], NoDecode] = Field(default_factory=list)
    label_studio_url: str | None = Field(
        default=None,
        validation_alias=_env("VLLM_BATCH_LABEL_STUDIO_URL", "LABEL_STUDIO_URL"),
        description="Label Studio's URL: enables the label_studio handler.",
    )
    label_studio_api_key: str | None = Field(
        default=None,
        repr=False,
        validation_alias=_env("VLLM_BATCH_LABEL_STUDIO_API_KEY", "LABEL_STUDIO_API_KEY"),
        description="Label Studio legacy token or personal access token (never logged).",
    )
    label_studio_project_id: int | None = Field(
        default=None,
        validation_alias=_env("VLLM_BATCH_LABEL_STUDIO_PROJECT_ID", "LABEL_STUDIO_PROJECT_ID"),
        description="The project tasks go to (or metadata.label_studio_project_id).",
    )
    label_studio_page_size: int = Field(default=500, ge=1)  # tasks per import request
    s3_handler_target: str | None = None  # s3://bucket/prefix: the s3 handler copies files there
    # A postgresql://… URL: the postgres handler writes one row per result there (never
    # logged).
    postgres_handler_dsn: str | None = Field(default=None, repr=False)
    postgres_handler_table: str = "vllm_batch_results"  # the postgres handler's table
    template_handler_template: Path | None = None  # a Jinja2 template file
    template_handler_output: str | None = None  # path; "{batch_id}" is replaced

    # ---- Audio endpoints' file_url (models.md)
    audio_max_bytes: int = Field(default=25 * 1024 * 1024, ge=1)  # OpenAI's limit: 25 MB
    # Seconds for a whole fetch: resolving, connecting, redirects and every byte.
    audio_fetch_timeout: float = Field(default=30.0, gt=0)
    # Hosts, IPs or CIDRs a file_url may target although private/loopback/link-local.
    audio_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # ---- Media URLs in request bodies (security.md)
    # Hosts, IPs or CIDRs a chat image_url/audio_url/video_url may target although
    # private/loopback/link-local.
    media_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # ---- Metrics (observability.md)
    metrics_enabled: bool = Field(
        default=True,
        validation_alias=_env(
            "VLLM_BATCH_METRICS_ENABLED", "VLLM_BATCH_PROMETHEUS_ENABLED", "PROMETHEUS_ENABLED"
        ),
        description="Serve /metrics and record metrics.",
    )
    # /metrics needs an admin key when API keys are configured, unless this is true.
    metrics_public: bool = False
    # Where processes on this host share their counters (prometheus-client multiprocess
    # mode); unset: PROMETHEUS_MULTIPROC_DIR, else <data_dir>/metrics.
    metrics_dir: Path | None = Field(
        default=None, validation_alias=_env("VLLM_BATCH_METRICS_DIR", "PROMETHEUS_MULTIPROC_DIR")
    )
    # ``vllm-batch worker`` only: serve /metrics on this port (off when unset).
    metrics_port: int | None = None
    metrics_host: str | None = None  # the worker's /metrics bind address; unset: ``host``
    # Seconds between the dashboard's history samples (its charts keep one hour of them).
    dashboard_history_interval: float = Field(default=5.0, gt=0, le=3600)

    @field_validator(
        "models",
        "loras",
        "cors_origins",
        "allowed_hosts",
        "api_keys",
        "webhook_urls",
        "webhook_allowed_hosts",
        "audio_allowed_hosts",
        "media_allowed_hosts",
        "handlers",
        "handler_modules",
        "gpu_pause_throttle_reasons",
        "engine_urls",
        mode="before",
    )
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check_gpu_temperatures(self) -> Settings:
        if self.gpu_resume_temperature > self.gpu_max_temperature:
            raise ValueError(
                "gpu_resume_temperature must not exceed gpu_max_temperature "
                f"({self.gpu_resume_temperature} > {self.gpu_max_temperature})"
            )
        return self

    @model_validator(mode="after")
    def _check_remote_engine(self) -> Settings:
        if self.engine == "openai" and not self.engine_urls:
            raise ValueError(
                "engine 'openai' needs at least one upstream: --engine-url "
                "http://HOST:PORT/v1 (or VLLM_BATCH_ENGINE_URLS)"
            )
        self.engine_urls = [check_base_url(url) for url in self.engine_urls]
        if self.engine_min_concurrency > self.engine_max_concurrency:
            raise ValueError(
                "engine_min_concurrency must not exceed engine_max_concurrency "
                f"({self.engine_min_concurrency} > {self.engine_max_concurrency})"
            )
        return self

    @model_validator(mode="after")
    def _check_executor(self) -> Settings:
        if self.executor == "ray" and self.engine == "openai":
            raise ValueError(
                "executor 'ray' runs engines on Ray actors, engine 'openai' sends requests to "
                "upstream servers: use one of them"
            )
        return self

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @computed_field  # type: ignore[prop-decorator]
    @property
    def resolved_database_url(self) -> str:
        """The database URL: explicit, else from ``POSTGRES_*`` parts, else embedded SQLite."""
        if self.database_url:
            return normalize_database_url(self.database_url)
        if self.postgres_host and self.postgres_db:
            auth = self.postgres_user or "postgres"
            if self.postgres_password:
                auth += f":{self.postgres_password}"
            return (
                f"postgresql+asyncpg://{auth}@{self.postgres_host}:"
                f"{self.postgres_port}/{self.postgres_db}"
            )
        return f"sqlite+aiosqlite:///{(self.data_dir / 'vllm-batch.db').resolve()}"

    @property
    def model_specs(self) -> list[ModelSpec]:
        """Configured models, or the default model prepared by ``models prepare smollm2``."""
        if not self.models:
            return [ModelSpec(DEFAULT_MODEL_NAME, str(default_model_dir()))]
        return [ModelSpec.parse(spec) for spec in self.models]

    @property
    def served_model_names(self) -> list[str]:
        return [spec.name for spec in self.model_specs]

    @property
    def model_kinds(self) -> dict[str, ModelKind | None]:
        """Each served model's kind (None: unknown here, so its batches are not checked)."""
        return {spec.name: spec.resolved_kind for spec in self.model_specs}

    @property
    def lora_specs(self) -> list[LoraSpec]:
        """Configured LoRA adapters, each with its base model (``AdapterConfigError`` if bad)."""
        return resolve_adapters(self.loras, self.served_model_names)

    def adapters_of(self, model: str) -> list[LoraSpec]:
        """The adapters served on ``model`` (specs were checked against the served models)."""
        specs = [LoraSpec.parse(text) for text in self.loras]
        return [LoraSpec(s.name, s.path, model) for s in specs if s.base in (None, model)]

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def resolved_metrics_dir(self) -> Path:
        """The directory this host's processes share their metrics in."""
        return self.metrics_dir if self.metrics_dir is not None else self.data_dir / "metrics"


def normalize_database_url(url: str) -> str:
    """Map plain ``postgresql://``/``sqlite://`` URLs to their async drivers."""
    for prefix, driver in (
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if url.startswith(prefix):
            return driver + url[len(prefix) :]
    return url


def default_model_dir() -> Path:
    """Where ``models prepare smollm2`` writes the default model unless told otherwise."""
    return Path(os.environ.get("VLLM_BATCH_MODELS_DIR", "./models")) / DEFAULT_MODEL_NAME
