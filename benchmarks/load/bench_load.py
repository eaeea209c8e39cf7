"""Load benchmark (issue 19): a real ``vllm-batch serve`` subprocess on loopback, with its
worker (serve's default: a child process) on a real engine, under

1. a burst of 80 concurrent ``POST /v1/batches`` from 4 API keys (httpx), then
2. Locust headless: 40 users for 2 minutes, each doing upload → create → poll every
   second → download (``locustfile.py``),

on SQLite or PostgreSQL. Records p50/p95/p99 per call, 5xx responses and connection
errors into ``benchmarks/results/load_<db>.md`` (and ``.json``).

    python benchmarks/load/bench_load.py --db sqlite
    python benchmarks/load/bench_load.py --db postgres --pg-admin postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import free_port, markdown_table, save  # noqa: E402

KEYS = [f"sk-load-{n}" for n in range(4)]
MODEL = "tiny"
TERMINAL = {"completed", "failed", "cancelled", "expired"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _pg_admin(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@contextlib.contextmanager
def database(kind: str, admin_dsn: str) -> Iterator[dict[str, str]]:
    """Server env for ``kind``: SQLite in the data dir, or a fresh PostgreSQL database."""
    if kind == "sqlite":
        yield {}
        return
    name = f"bench_load_{os.getpid()}"
    asyncio.run(_pg_admin(admin_dsn, f'CREATE DATABASE "{name}"'))
    base = admin_dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    try:
        yield {"VLLM_BATCH_DATABASE_URL": f"{base}/{name}"}
    finally:
        asyncio.run(_pg_admin(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def model_dir(name: str, work: Path) -> Path:
    if name == "smollm2":
        return Path("/work/main/models/SmolLM2-135M-Instruct")
    from vllm_batch.weights.tiny import make_test_model

    return Path(make_test_model(work / "tiny"))


@contextlib.contextmanager
def server(work: Path, model: Path, db_env: dict[str, str]) -> Iterator[tuple[str, Any]]:
    """``vllm-batch serve`` with 4 API keys; yields its URL once a batch went through."""
    port = free_port()
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_BATCH_API_KEYS": ",".join(f"team-{n}:{key}" for n, key in enumerate(KEYS)),
        "VLLM_BATCH_DTYPE": "float32",
        "VLLM_BATCH_ENFORCE_EAGER": "true",
        "VLLM_BATCH_MAX_MODEL_LEN": "512",
        "VLLM_BATCH_LOG_LEVEL": "warning",
        **db_env,
    }
    command = [
        sys.executable,
        "-m",
        "vllm_batch.cli",
        "serve",
        "--model",
        f"{MODEL}={model}",
        "--port",
        str(port),
        "--data-dir",
        str(work / "data"),
    ]
    log = open(work / "server.log", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        warm_up(url, process)
        yield url, process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        log.close()


def batch_body(lines: int = 2) -> bytes:
    rows = [
        {
            "custom_id": f"warm-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"Count to {i}."}],
                "max_tokens": 4,
            },
        }
        for i in range(lines)
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def upload(http: httpx.Client, key: str) -> str:
    response = http.post(
        "/files",
        headers={"Authorization": f"Bearer {key}"},
        files={"file": ("in.jsonl", batch_body())},
        data={"purpose": "batch"},
    )
    response.raise_for_status()
    return str(response.json()["id"])


def warm_up(url: str, process: Any) -> None:
    """Wait for the API, then for one batch to complete (the engine has loaded)."""
    deadline = time.monotonic() + 600
    while True:
        if process.poll() is not None:
            raise RuntimeError("the server exited; see server.log")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not answer /health within 600 s")
        time.sleep(0.5)
    with httpx.Client(base_url=f"{url}/v1", timeout=300) as http:
        file_id = upload(http, KEYS[0])
        auth = {"Authorization": f"Bearer {KEYS[0]}"}
        batch = http.post(
            "/batches",
            headers=auth,
            json={
                "input_file_id": file_id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        ).json()
        while batch["status"] not in TERMINAL:
            if time.monotonic() > deadline:
                raise RuntimeError("the warm-up batch did not finish within 600 s")
            time.sleep(1)
            batch = http.get(f"/batches/{batch['id']}", headers=auth).json()
        if batch["status"] != "completed":
            raise RuntimeError(f"warm-up batch {batch['status']}: {batch.get('errors')}")


async def create_burst(url: str, files: dict[str, str], count: int) -> dict[str, Any]:
    """``count`` concurrent creates round-robin over the keys; then wait for them all."""
    keys = list(files)
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    latencies: list[float] = []
    statuses: list[int] = []
    errors = 0

    async def one(n: int, http: httpx.AsyncClient) -> tuple[str, str] | None:
        nonlocal errors
        key = keys[n % len(keys)]
        started = time.monotonic()
        try:
            response = await http.post(
                "/batches",
                headers={"Authorization": f"Bearer {key}"},
                json={
                    "input_file_id": files[key],
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                },
            )
        except httpx.TransportError:
            errors += 1
            return None
        latencies.append(time.monotonic() - started)
        statuses.append(response.status_code)
        return (response.json()["id"], key) if response.status_code == 200 else None

    async with httpx.AsyncClient(base_url=f"{url}/v1", limits=limits, timeout=120) as http:
        started = time.monotonic()
        created = await asyncio.gather(*(one(n, http) for n in range(count)))
        wall = time.monotonic() - started
        pending = {batch_id: key for batch_id, key in filter(None, created)}
        completed = 0
        while pending and time.monotonic() - started < 600:
            await asyncio.sleep(1)
            for batch_id, key in list(pending.items()):
                batch = (
                    await http.get(
                        f"/batches/{batch_id}", headers={"Authorization": f"Bearer {key}"}
                    )
                ).json()
                if batch["status"] in TERMINAL:
                    completed += batch["status"] == "completed"
                    del pending[batch_id]
        all_done = time.monotonic() - started
    return {
        "requests": count,
        "ok": statuses.count(200),
        "5xx": sum(1 for s in statuses if s >= 500),
        "connection_errors": errors,
        "wall_s": round(wall, 2),
        "p50_ms": round(1000 * percentile(latencies, 0.5)),
        "p95_ms": round(1000 * percentile(latencies, 0.95)),
        "p99_ms": round(1000 * percentile(latencies, 0.99)),
        "max_ms": round(1000 * max(latencies)),
        "completed": completed,
        "all_finished_s": round(all_done, 1),
    }


def run_locust(url: str, work: Path, users: int, duration: str) -> dict[str, Any]:
    """Locust headless against ``url``; its per-call stats and the 5xx / connection counts."""
    prefix = work / "locust"
    summary = work / "locust_summary.json"
    env = {
        **os.environ,
        "LOAD_API_KEYS": ",".join(KEYS),
        "LOAD_MODEL": MODEL,
        "LOAD_SUMMARY": str(summary),
    }
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(HERE / "locustfile.py"),
        "--headless",
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        duration,
        "--host",
        url,
        "--csv",
        str(prefix),
        "--only-summary",
        "--loglevel",
        "WARNING",
    ]
    with open(work / "locust.log", "wb") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    calls = []
    with open(f"{prefix}_stats.csv") as handle:
        for row in csv.DictReader(handle):
            calls.append(
                {
                    "name": row["Name"],
                    "requests": int(row["Request Count"]),
                    "failures": int(row["Failure Count"]),
                    "p50_ms": int(float(row["50%"])),
                    "p95_ms": int(float(row["95%"])),
                    "p99_ms": int(float(row["99%"])),
                    "max_ms": int(float(row["Max Response Time"])),
                }
            )
    counts = json.loads(summary.read_text()) if summary.exists() else {}
    return {"calls": calls, "counts": counts}


def pools() -> str:
    """The default connection pool sizes, as measured."""
    from vllm_batch.config import Settings

    fields = Settings.model_fields
    api = f"{fields['db_pool_size'].default}+{fields['db_max_overflow'].default}"
    work = f"{fields['db_worker_pool_size'].default}+{fields['db_worker_max_overflow'].default}"
    return f"API {api}, background {work} connections"


def report(db: str, model: str, burst: dict[str, Any], load: dict[str, Any], cmd: str) -> str:
    counts = load["counts"]
    burst_table = markdown_table(
        ["requests", "200", "5xx", "conn. errors", "wall s", "p50 ms", "p95 ms", "p99 ms",
         "max ms", "completed", "all finished s"],
        [[burst[k] for k in ("requests", "ok", "5xx", "connection_errors", "wall_s", "p50_ms",
                             "p95_ms", "p99_ms", "max_ms", "completed", "all_finished_s")]],
    )  # fmt: skip
    load_table = markdown_table(
        ["call", "requests", "failures", "p50 ms", "p95 ms", "p99 ms", "max ms"],
        [
            [c["name"], c["requests"], c["failures"], c["p50_ms"], c["p95_ms"], c["p99_ms"],
             c["max_ms"]]
            for c in load["calls"]
        ],
    )  # fmt: skip
    return (
        f"`{cmd}`\n\n"
        f"A `vllm-batch serve` subprocess (API, its worker in serve's default child process, model "
        f"`{model}` on the "
        f"CPU vLLM engine, 4 API keys, default pool sizes: {pools()}) on 127.0.0.1, "
        f"database: {db}. "
        "The load generators run on the same 2 cores; the machine's 1-minute load average "
        f"was {load['load_avg'][0]} before the burst and {load['load_avg'][1]} after Locust.\n\n"
        "## 80 concurrent `POST /v1/batches` from 4 keys (2-line files)\n\n"
        f"{burst_table}\n\n"
        "## Locust: 40 users, 2 minutes, upload → create → poll every 1 s → download\n\n"
        f"{load_table}\n\n"
        f"5xx responses: {counts.get('5xx', 0)}; connection errors (no HTTP answer): "
        f"{counts.get('connection_errors', 0)}; batches completed and downloaded: "
        f"{counts.get('batches_completed', 0)}; batches not completed: "
        f"{counts.get('batches_not_completed', 0)} (users stopped mid-poll at the end "
        "are not counted)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--duration", default="2m")
    parser.add_argument("--burst", type=int, default=80)
    parser.add_argument("--no-save", action="store_true", help="print, do not write results")
    args = parser.parse_args()
    cmd = "python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/load/bench_load.py", *sys.argv[1:]]
    )
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        work = Path(tmp)
        model = model_dir(args.model, work)
        try:
            with (
                database(args.db, args.pg_admin) as db_env,
                server(work, model, db_env) as (url, _),
            ):
                with httpx.Client(base_url=f"{url}/v1", timeout=120) as http:
                    files = {key: upload(http, key) for key in KEYS}
                load_before = os.getloadavg()[0]
                burst = asyncio.run(create_burst(url, files, args.burst))
                print("burst:", json.dumps(burst), flush=True)
                load = run_locust(url, work, args.users, args.duration)
                load["load_avg"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
                print("locust:", json.dumps(load), flush=True)
        except BaseException:
            log = work / "server.log"
            if log.exists():
                print(log.read_text()[-4000:], file=sys.stderr)
            raise
        text = report(args.db, args.model, burst, load, cmd)
        payload = {"db": args.db, "model": args.model, "burst": burst, "load": load, "command": cmd}
        if args.no_save:
            print(text)
        else:
            print(save(f"load_{args.db}", payload, text))


if __name__ == "__main__":
    main()
