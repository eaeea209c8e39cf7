"""The remote engine (``--engine openai``) on PostgreSQL, against BENCHMARK-ONLY simulated
GPU servers (``sim_upstream.py``: a fixed latency per request and a concurrency cap, no
inference), so that 2 cores do not cap what is measured.

``--scenario scale``: N workers (``vllm-batch worker --engine openai``), each with its own
upstream, N = 1, 2, 4, 8, and an API-only server; one batch of N x ``--lines-per-upstream``
lines each time. Scale-out efficiency = throughput(N) / (N x throughput(1)).

``--scenario queue``: the queue's own limit: 8 workers on 8 instant upstreams (no latency,
no cap) move one big batch through claim, save and finalize; the same with the in-process
``instant-benchmark`` engine (no HTTP at all) for comparison.

``--scenario yield``: one upstream shared with "online" traffic (an open-loop client at
half the upstream's capacity, measuring its latency) while a batch runs through one worker:
online alone, then with the batch at a fixed window (no back-off), with AIMD on latency,
and with an upstream that answers 429 when its queue is full.

    python benchmarks/bench_remote.py --scenario scale
    python benchmarks/bench_remote.py --scenario queue
    python benchmarks/bench_remote.py --scenario yield
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import MODEL, database, write_input
from common import create_chat_batch, free_port, markdown_table, save, upload_batch_file

PY = sys.executable
SIM = str(Path(__file__).resolve().parent / "sim_upstream.py")
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def simulated(ports: list[int], workdir: Path, **options: Any) -> Iterator[list[str]]:
    """Simulated upstreams on ``ports`` (one process); yields their base URLs."""
    cmd = [PY, SIM, "--ports", ",".join(map(str, ports)), "--model", MODEL]
    for key, value in options.items():
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    process = spawn(cmd, dict(os.environ), workdir / "sim.log")
    urls = [f"http://127.0.0.1:{port}/v1" for port in ports]
    try:
        for url in urls:
            wait_for(lambda u=url: httpx.get(f"{u}/models", timeout=1).status_code == 200)
        yield urls
    finally:
        stop(process)


def wait_for(check: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, OSError):
            if check():
                return
        time.sleep(0.1)
    raise TimeoutError("not ready")


def server_env(db: dict[str, str], lines: int, **settings: Any) -> dict[str, str]:
    env = {
        **os.environ,
        **db,
        "VLLM_BATCH_MAX_REQUESTS_PER_BATCH": str(lines + 1),
        "VLLM_BATCH_MAX_UPLOAD_BYTES": str(2**30),
        "VLLM_BATCH_LOG_LEVEL": "warning",
    }
    env.update({f"VLLM_BATCH_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def engine_args(urls: list[str], engine: str = "openai") -> list[str]:
    if engine != "openai":
        return ["--engine", engine, "--model", f"{MODEL}=unused"]
    return ["--engine", "openai", "--model", MODEL, *(f"--engine-url={u}" for u in urls)]


@contextlib.contextmanager
def api_server(
    data_dir: Path, env: dict[str, str], urls: list[str], engine: str = "openai"
) -> Iterator[str]:
    port = free_port()
    cmd = [PY, "-m", "vllm_batch.cli", "serve", "--no-worker", "--port", str(port)]
    cmd += ["--data-dir", str(data_dir), *engine_args(urls, engine)]
    process = spawn(cmd, env, data_dir / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/health", timeout=1).status_code == 200)
        yield url
    finally:
        stop(process)


@contextlib.contextmanager
def workers(
    data_dir: Path, env: dict[str, str], upstreams: list[list[str]], engine: str = "openai"
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """One ``vllm-batch worker`` per entry of ``upstreams`` (its upstream URLs)."""
    procs = []
    for index, urls in enumerate(upstreams):
        cmd = [PY, "-m", "vllm_batch.cli", "worker", "--data-dir", str(data_dir)]
        procs.append(spawn([*cmd, *engine_args(urls, engine)], env, data_dir / f"w{index}.log"))
    try:
        time.sleep(4)  # imports and the first /models probe; they then wait on LISTEN/NOTIFY
        for index, proc in enumerate(procs):
            if proc.poll() is not None:
                raise RuntimeError(f"worker {index} exited: see {data_dir}/w{index}.log")
        yield procs
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            stop(proc)


def run_batch(url: str, input_path: Path, lines: int) -> dict[str, Any]:
    """Upload, create, poll every 0.1 s until done; times from create to completed."""
    with httpx.Client(base_url=f"{url}/v1", timeout=600) as client:
        file_id = upload_batch_file(client, input_path)
        t0 = time.perf_counter()
        batch = create_chat_batch(client, file_id)
        started = None
        while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
            time.sleep(0.1)
            batch = client.get(f"/batches/{batch['id']}").json()
            if started is None and batch["request_counts"]["completed"] > 0:
                started = time.perf_counter()
        t1 = time.perf_counter()
    assert batch["status"] == "completed", batch
    counts = batch["request_counts"]
    assert counts == {"total": lines, "completed": lines, "failed": 0}, counts
    return {
        "seconds": round(t1 - t0, 2),
        "lines_per_s": round(lines / (t1 - t0), 1),
        "first_result_s": round((started or t1) - t0, 2),
    }


# ------------------------------------------------------------------ scale


def scale(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], str]:
    ideal = args.concurrency / args.latency
    rows, runs = [], []
    for n in args.counts:
        lines = n * args.lines_per_upstream
        data_dir = workdir / f"scale-{n}"
        data_dir.mkdir()
        input_path = data_dir / "input.jsonl"
        write_input(input_path, lines)
        ports = [free_port() for _ in range(n)]
        with (
            simulated(ports, data_dir, latency=args.latency, concurrency=args.concurrency) as urls,
            database("postgres", lines, PG_ADMIN) as db,
        ):
            env = server_env(db, lines, chunk_size=args.chunk_size)
            with (
                api_server(data_dir, env, urls) as url,
                workers(data_dir, env, [[u] for u in urls]),
            ):
                log(f"scale N={n}: {lines} lines")
                run = {
                    "workers": n,
                    "upstreams": n,
                    "lines": lines,
                    **run_batch(url, input_path, lines),
                }
                run["load_avg_1m"] = round(os.getloadavg()[0], 1)
        runs.append(run)
        log(str(run))
    one = runs[0]["lines_per_s"]
    for run in runs:
        run["efficiency"] = round(run["lines_per_s"] / (run["workers"] * one), 3)
        run["of_ideal"] = round(run["lines_per_s"] / (run["upstreams"] * ideal), 3)
        rows.append(
            [
                run["workers"],
                run["upstreams"],
                f"{run['lines']:,}",
                run["seconds"],
                run["lines_per_s"],
                f"{run['efficiency']:.3f}",
                f"{run['of_ideal']:.3f}",
                run["load_avg_1m"],
            ]
        )
    table = markdown_table(
        [
            "workers",
            "upstreams",
            "lines",
            "create → completed s",
            "lines/s",
            "efficiency: lines/s / (N x lines/s at N=1)",
            "of the ideal (N x cap / latency)",
            "load avg",
        ],
        rows,
    )
    note = (
        f"PostgreSQL; each worker `vllm-batch worker --engine openai` with its own simulated "
        f"upstream (BENCHMARK-ONLY `sim_upstream.py`: {args.latency} s per request, "
        f"{args.concurrency} at once, so {ideal:.0f} lines/s each at best); API server "
        f"`serve --no-worker`; chunk size {args.chunk_size}; default AIMD "
        "(latency factor 3, slow start from 4). Time from `POST /v1/batches` to the poll "
        "(every 0.1 s) that sees `completed`: validation, claims, the AIMD ramp, saves and "
        "finalization included."
    )
    return {"runs": runs}, f"{note}\n\n{table}"


# ------------------------------------------------------------------ queue limit


def queue(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], str]:
    lines, n = args.queue_lines, 8
    runs = []
    for engine in ("openai", "instant-benchmark"):
        data_dir = workdir / f"queue-{engine}"
        data_dir.mkdir()
        input_path = data_dir / "input.jsonl"
        write_input(input_path, lines)
        ports = [free_port() for _ in range(n)]
        with (
            simulated(ports, data_dir, latency=0, concurrency=10_000) as urls,
            database("postgres", lines, PG_ADMIN) as db,
        ):
            env = server_env(
                db, lines, chunk_size=args.queue_chunk_size, engine_max_concurrency=128
            )
            with (
                api_server(data_dir, env, urls, engine) as url,
                workers(data_dir, env, [[u] for u in urls], engine),
            ):
                log(f"queue {engine}: {lines} lines, {n} workers")
                run = {"engine": engine, "workers": n, "lines": lines}
                run.update(run_batch(url, input_path, lines))
                run["load_avg_1m"] = round(os.getloadavg()[0], 1)
        runs.append(run)
        log(str(run))
    rows = [
        [
            "remote, 8 instant upstreams"
            if r["engine"] == "openai"
            else "instant-benchmark (no HTTP)",
            r["workers"],
            f"{r['lines']:,}",
            r["seconds"],
            f"{r['lines_per_s']:,.0f}",
            r["load_avg_1m"],
        ]
        for r in runs
    ]
    table = markdown_table(
        ["engine", "workers", "lines", "create → completed s", "lines/s", "load avg"], rows
    )
    note = (
        f"PostgreSQL, chunk size {args.queue_chunk_size}, 8 `vllm-batch worker` processes "
        "and `serve --no-worker` on this machine's cores, with the simulated upstreams (no "
        "latency, no cap) or no upstream at all: what claim, save and finalize move when "
        "inference costs nothing. Every process shares the same 2 cores, so this is the "
        "CPU cost of the queue path per line, not a cluster's limit."
    )
    return {"runs": runs}, f"{note}\n\n{table}"


# ------------------------------------------------------------------ yield to online traffic


async def online_load(
    url: str, rate: float, seconds: float, seed: int = 0
) -> tuple[list[float], int]:
    """Open-loop Poisson arrivals at ``rate``/s for ``seconds``: latencies and errors."""
    rng = random.Random(seed)
    latencies: list[float] = []
    errors = 0
    body = {"model": MODEL, "messages": [{"role": "user", "content": "online"}]}

    async with httpx.AsyncClient(timeout=120) as client:

        async def one() -> None:
            nonlocal errors
            start = time.perf_counter()
            while True:  # an online client retries 429s after Retry-After
                response = await client.post(f"{url}/chat/completions", json=body)
                if response.status_code != 429:
                    break
                await asyncio.sleep(float(response.headers.get("retry-after", "1")))
            if response.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

        tasks = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            tasks.append(asyncio.create_task(one()))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    return latencies, errors


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def yield_scenario(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], str]:
    capacity = args.yield_concurrency / args.yield_latency
    rate = capacity / 2
    variants: list[tuple[str, dict[str, Any] | None, int | None]] = [
        ("online alone", None, None),
        ("+ batch, fixed window 64 (no back-off)", {"engine_latency_factor": 0}, None),
        ("+ batch, AIMD on latency (factor 2)", {"engine_latency_factor": 2}, None),
        ("+ batch, upstream 429s past 4 waiting", {"engine_latency_factor": 0}, 4),
    ]
    runs = []
    for name, settings, max_queue in variants:
        data_dir = workdir / f"yield-{len(runs)}"
        data_dir.mkdir()
        lines = args.yield_lines
        input_path = data_dir / "input.jsonl"
        write_input(input_path, lines)
        port = free_port()
        options = {
            "latency": args.yield_latency,
            "concurrency": args.yield_concurrency,
            "max_queue": max_queue,
        }
        with simulated([port], data_dir, **options) as urls:
            batch_stats: dict[str, Any] = {}
            with contextlib.ExitStack() as stack:
                if settings is not None:
                    db = stack.enter_context(database("postgres", lines, PG_ADMIN))
                    env = server_env(
                        db, lines, chunk_size=200, engine_max_concurrency=64, **settings
                    )
                    url = stack.enter_context(api_server(data_dir, env, urls))
                    stack.enter_context(workers(data_dir, env, [urls]))
                    with httpx.Client(base_url=f"{url}/v1", timeout=60) as client:
                        created = create_chat_batch(client, upload_batch_file(client, input_path))
                    time.sleep(args.yield_warmup)
                log(f"yield: {name}")
                before = httpx.get(f"{urls[0].removesuffix('/v1')}/stats").json()
                t0 = time.perf_counter()
                latencies, errors = asyncio.run(online_load(urls[0], rate, args.yield_seconds))
                elapsed = time.perf_counter() - t0  # arrivals, then the last answers
                after = httpx.get(f"{urls[0].removesuffix('/v1')}/stats").json()
                if settings is not None:
                    with httpx.Client(base_url=f"{url}/v1", timeout=60) as client:
                        batch = client.get(f"/batches/{created['id']}").json()
                        client.post(f"/batches/{created['id']}/cancel")
                    batch_stats = {"batch_completed": batch["request_counts"]["completed"]}
        served = after["served"] - before["served"]
        online = len(latencies)
        run = {
            "variant": name,
            "online_requests": online,
            "online_errors": errors,
            "online_p50_s": round(percentile(latencies, 0.5), 3),
            "online_p95_s": round(percentile(latencies, 0.95), 3),
            "online_p99_s": round(percentile(latencies, 0.99), 3),
            "online_mean_s": round(statistics.mean(latencies), 3),
            "batch_lines_per_s": round((served - online) / elapsed, 1),
            "upstream_busy": round(served / elapsed / capacity, 3),
            "window_s": round(elapsed, 1),
            "throttled": after["throttled"] - before["throttled"],
            **batch_stats,
        }
        runs.append(run)
        log(str(run))
    rows = [
        [
            r["variant"],
            r["online_requests"],
            r["online_p50_s"],
            r["online_p95_s"],
            r["online_p99_s"],
            r["batch_lines_per_s"],
            f"{100 * r['upstream_busy']:.0f}%",
            r["throttled"],
        ]
        for r in runs
    ]
    table = markdown_table(
        [
            "variant",
            "online requests",
            "online p50 s",
            "online p95 s",
            "online p99 s",
            "batch lines/s",
            "upstream busy",
            "429s",
        ],
        rows,
    )
    note = (
        f"One simulated upstream (BENCHMARK-ONLY `sim_upstream.py`: {args.yield_latency} s "
        f"per request, {args.yield_concurrency} at once: {capacity:.0f} requests/s at best). "
        f"Online traffic: Poisson arrivals at {rate:.0f}/s for {args.yield_seconds:.0f} s "
        "(half the capacity), latency measured by the client (429s retried after "
        "Retry-After). The batch: one `vllm-batch worker --engine openai` on PostgreSQL, "
        "`--engine-max-concurrency 64`, started "
        f"{args.yield_warmup:.0f} s before the online load. Over the window (first online "
        "arrival to last online answer): batch lines/s = upstream answers minus online ones; "
        "upstream busy = answers / capacity."
    )
    return {"runs": runs}, f"{note}\n\n{table}"


SCENARIOS = {"scale": scale, "queue": queue, "yield": yield_scenario}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--scenario", choices=sorted(SCENARIOS), required=True)
    add("--counts", type=int, nargs="+", default=[1, 2, 4, 8], help="N for --scenario scale")
    add("--latency", type=float, default=1.0, help="scale: seconds per request")
    add("--concurrency", type=int, default=16, help="scale: requests at once per upstream")
    add("--lines-per-upstream", type=int, default=800, help="scale: lines per upstream")
    add("--chunk-size", type=int, default=100, help="scale: lines per chunk")
    add("--queue-lines", type=int, default=40_000)
    add("--queue-chunk-size", type=int, default=1000)
    add("--yield-latency", type=float, default=0.5)
    add("--yield-concurrency", type=int, default=8)
    add("--yield-seconds", type=float, default=30.0)
    add("--yield-warmup", type=float, default=8.0)
    add("--yield-lines", type=int, default=4000)
    add("--results-name", help="default: remote_<scenario>")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        payload, table = SCENARIOS[args.scenario](args, Path(tmp))
    payload["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    name = args.results_name or f"remote_{args.scenario}"
    print(save(name, payload, f"{table}\n\nCommand: `{payload['command']}`").read_text())


if __name__ == "__main__":
    main()
