"""Pipeline overhead and memory: the real server, with the BENCHMARK-ONLY instant engine.

Measures lines/s through upload, validation, queue, dispatch, result saving, output
assembly and download, and the peak RSS of the server process (API + worker) for growing
batch sizes, to show that memory stays flat. No inference happens here; see
``bench_batch.py`` for the real-engine throughput comparison.

    python benchmarks/bench_pipeline.py --database sqlite --sizes 10000 100000 1000000
    python benchmarks/bench_pipeline.py --database postgres --sizes 100000 --profile /tmp/prof

``--database postgres`` uses PostgreSQL at 127.0.0.1:5432 (trust auth, or
``--pg-admin-dsn``): every size gets a fresh database ``bench_pipeline_<pid>_<lines>``,
dropped afterwards. ``--profile DIR`` samples the server process with py-spy (collapsed
stacks, one file per size) and prints the top functions; results are then not saved.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RssSampler, create_chat_batch, save, tree_rss, upload_batch_file

MODEL = "bench-model"


def write_input(path: Path, lines: int) -> int:
    with open(path, "wb") as out:
        for i in range(lines):
            out.write(
                json.dumps(
                    {
                        "custom_id": f"req-{i}",
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": {
                            "model": MODEL,
                            "max_tokens": 16,
                            "messages": [{"role": "user", "content": f"Question number {i}?"}],
                        },
                    }
                ).encode()
                + b"\n"
            )
    return path.stat().st_size


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(data_dir: Path, lines: int, extra_env: dict[str, str]) -> tuple[Any, str]:
    port = free_port()
    env = {
        **os.environ,
        "VLLM_BATCH_MAX_REQUESTS_PER_BATCH": str(lines + 1),
        "VLLM_BATCH_MAX_UPLOAD_BYTES": str(10 * 2**30),
        **extra_env,
    }
    with open(data_dir / "server.log", "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vllm_batch.cli",
                "serve",
                "--engine",
                "instant-benchmark",
                "--model",
                f"{MODEL}=unused",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


async def _pg_admin(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@contextlib.contextmanager
def database(kind: str, lines: int, admin_dsn: str) -> Iterator[dict[str, str]]:
    """Server env for ``kind``: SQLite in the data dir, or a fresh PostgreSQL database."""
    if kind == "sqlite":
        yield {}
        return
    name = f"bench_pipeline_{os.getpid()}_{lines}"
    asyncio.run(_pg_admin(admin_dsn, f'CREATE DATABASE "{name}"'))
    base = admin_dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    try:
        yield {"VLLM_BATCH_DATABASE_URL": f"{base}/{name}"}
    finally:
        asyncio.run(_pg_admin(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def start_profiler(pid: int, out: Path) -> Any:
    """py-spy sampling ``pid`` (all threads) into collapsed stacks at ``out``."""
    py_spy = str(Path(sys.executable).parent / "py-spy")
    command = [py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200"]
    return subprocess.Popen(
        [*command, "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _frame(text: str) -> str:
    """``name (path/to/file.py:12)`` → ``name (file.py)``."""
    name, _, where = text.partition(" (")
    return f"{name} ({where.split(':')[0].rsplit('/', 1)[-1]})"


def top_functions(collapsed: Path, limit: int = 25) -> str:
    """Self and total sample shares per function from a py-spy ``raw`` (collapsed) file."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for row in collapsed.read_text().splitlines():
        stack, _, count_text = row.rpartition(" ")
        count = int(count_text)
        samples += count
        frames = [_frame(f) for f in stack.split(";") if " (" in f]
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count

    def table(counter: collections.Counter[str]) -> str:
        return "\n".join(
            f"{100 * n / max(samples, 1):5.1f}%  {name}" for name, n in counter.most_common(limit)
        )

    return f"samples: {samples}\n-- self --\n{table(own)}\n-- total --\n{table(total)}"


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of the server process so far (all its threads).

    Steadier than wall time on a shared machine: other processes' load barely moves it.
    """
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def run_size(
    lines: int, workdir: Path, extra_env: dict[str, str], profile: Path | None = None
) -> dict[str, Any]:
    data_dir = workdir / f"data-{lines}"
    data_dir.mkdir()
    input_path = workdir / f"input-{lines}.jsonl"
    size = write_input(input_path, lines)
    process, url = start_server(data_dir, lines, extra_env)
    profiler = None
    try:
        time.sleep(1.0)
        baseline = tree_rss(process.pid)
        if profile is not None:
            profiler = start_profiler(process.pid, profile)
            time.sleep(1.0)
        with (
            RssSampler(process.pid) as sampler,
            httpx.Client(base_url=f"{url}/v1", timeout=600) as client,
        ):
            cpu0 = process_cpu(process.pid)
            t0 = time.perf_counter()
            file_id = upload_batch_file(client, input_path)
            t1 = time.perf_counter()
            batch = create_chat_batch(client, file_id)
            while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
                time.sleep(0.2)
                batch = client.get(f"/batches/{batch['id']}").json()
            t2 = time.perf_counter()
            assert batch["status"] == "completed", batch
            count = 0
            with client.stream("GET", f"/files/{batch['output_file_id']}/content") as stream:
                for chunk in stream.iter_bytes():
                    count += chunk.count(b"\n")
            t3 = time.perf_counter()
            cpu = process_cpu(process.pid) - cpu0
        assert count == lines, (count, lines)
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(120)
        return {
            "lines": lines,
            "input_mb": round(size / 2**20, 1),
            "upload_s": round(t1 - t0, 2),
            "process_s": round(t2 - t1, 2),
            "download_s": round(t3 - t2, 2),
            "total_s": round(t3 - t0, 2),
            "lines_per_s": round(lines / (t3 - t0)),
            "server_cpu_s": round(cpu, 2),
            "load_avg_1m": round(os.getloadavg()[0], 1),
            "baseline_rss_mb": round(baseline / 2**20),
            "peak_rss_mb": round(sampler.peak / 2**20),
            "rss_growth_mb": round((sampler.peak - baseline) / 2**20),
        }
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument(
        "--pg-admin-dsn",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="where to create (and drop) the benchmark databases",
    )
    parser.add_argument("--name", default=None, help="default: pipeline_<database>")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy output directory")
    args = parser.parse_args()
    name = args.name or f"pipeline_{args.database}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for lines in args.sizes:
            profile = None
            if args.profile is not None:
                args.profile.mkdir(parents=True, exist_ok=True)
                profile = args.profile / f"{name}_{lines}.txt"
            with database(args.database, lines, args.pg_admin_dsn) as extra:
                row = run_size(lines, Path(tmp), extra, profile)
            print(row, flush=True)
            rows.append(row)
            if profile is not None:
                print(top_functions(profile), flush=True)
    if args.profile is not None:
        return
    header = (
        "| lines | input MB | upload s | process s | download s | total s | lines/s "
        "| server CPU s | load avg | baseline RSS MB | peak RSS MB | growth MB |\n"
        + "|---" * 12
        + "|"
    )
    body = "\n".join(
        f"| {r['lines']:,} | {r['input_mb']} | {r['upload_s']} | {r['process_s']} | "
        f"{r['download_s']} | {r['total_s']} | {r['lines_per_s']:,} | {r['server_cpu_s']} | "
        f"{r['load_avg_1m']} | "
        f"{r['baseline_rss_mb']} | "
        f"{r['peak_rss_mb']} | {r['rss_growth_mb']} |"
        for r in rows
    )
    note = (
        "Server + in-process worker as one subprocess, BENCHMARK-ONLY instant engine "
        f"(no inference), database: {args.database}. Server CPU s: user + system CPU of "
        "the server process (PostgreSQL's own CPU not included); load avg: the machine's "
        f"1-minute load average at the end of the run ({os.cpu_count()} cores), as the "
        "machine may be shared."
    )
    print(
        save(
            name,
            {"rows": rows, "database": args.database},
            f"{note}\n\n{header}\n{body}",
        ).read_text()
    )


if __name__ == "__main__":
    main()
