"""Pipeline overhead and memory: the real server, with the BENCHMARK-ONLY instant engine.

Measures lines/s through upload, validation, queue, dispatch, result saving, output
assembly and download, and the peak RSS of the server process (API + worker) for growing
batch sizes, to show that memory stays flat. No inference happens here; see
``bench_batch.py`` for the real-engine throughput comparison.

    python benchmarks/bench_pipeline.py --sizes 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

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


def run_size(lines: int, workdir: Path, extra_env: dict[str, str]) -> dict[str, Any]:
    data_dir = workdir / f"data-{lines}"
    data_dir.mkdir()
    input_path = workdir / f"input-{lines}.jsonl"
    size = write_input(input_path, lines)
    process, url = start_server(data_dir, lines, extra_env)
    try:
        time.sleep(1.0)
        baseline = tree_rss(process.pid)
        with (
            RssSampler(process.pid) as sampler,
            httpx.Client(base_url=f"{url}/v1", timeout=600) as client,
        ):
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
        assert count == lines, (count, lines)
        return {
            "lines": lines,
            "input_mb": round(size / 2**20, 1),
            "upload_s": round(t1 - t0, 2),
            "process_s": round(t2 - t1, 2),
            "download_s": round(t3 - t2, 2),
            "total_s": round(t3 - t0, 2),
            "lines_per_s": round(lines / (t3 - t0)),
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
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temp dir")
    parser.add_argument("--name", default="pipeline")
    args = parser.parse_args()
    extra = {"VLLM_BATCH_DATABASE_URL": args.database_url} if args.database_url else {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for lines in args.sizes:
            row = run_size(lines, Path(tmp), extra)
            print(row, flush=True)
            rows.append(row)
    header = (
        "| lines | input MB | upload s | process s | download s | total s | lines/s "
        "| baseline RSS MB | peak RSS MB | growth MB |\n" + "|---" * 10 + "|"
    )
    body = "\n".join(
        f"| {r['lines']:,} | {r['input_mb']} | {r['upload_s']} | {r['process_s']} | "
        f"{r['download_s']} | {r['total_s']} | {r['lines_per_s']:,} | {r['baseline_rss_mb']} | "
        f"{r['peak_rss_mb']} | {r['rss_growth_mb']} |"
        for r in rows
    )
    note = (
        "Server + in-process worker as one subprocess, BENCHMARK-ONLY instant engine "
        f"(no inference), database: {args.database_url or 'SQLite'}."
    )
    print(
        save(
            args.name,
            {"rows": rows, "database": args.database_url or "sqlite"},
            f"{note}\n\n{header}\n{body}",
        ).read_text()
    )


if __name__ == "__main__":
    main()
