"""Does the API answer while the worker saturates the engine?

Starts ``vllm-batch serve`` (its worker in a child process, or inline with
``--worker-mode inline``; real vLLM on the tiny model by default) with asyncio's debug mode
on in serve's own process (``python -X dev``: every callback that holds the API's event loop
longer than 100 ms is logged as ``Executing ... took N seconds``; the worker process runs
without it, at full speed). It loads the engine, runs a 16-line warm-up batch, then submits
one N-line batch (12,000 by default). Once the batch is in progress, it calls
``GET /v1/batches/{id}`` and ``GET /v1/files`` one after the other (sequential,
``--interval`` apart) until the batch is completed, and at least ``--probes`` times each.
It reports p50/p95/p99/max per route, and the slow callbacks serve's loop logged from the
batch's submission to its completion (count, max and the slowest few).

    python benchmarks/bench_api_latency.py                      # tiny model, 12,000 lines
    python benchmarks/bench_api_latency.py -n 2000 --results-name api_latency_quick
    python benchmarks/bench_api_latency.py --no-asyncio-debug   # latency without debug mode
    python benchmarks/bench_api_latency.py --py-spy DIR         # also py-spy samples

Results go to ``benchmarks/results/<results-name>.{json,md}`` (default ``api_latency_tiny``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpx
from bench_batch import (
    CPU_ENV,
    EngineConfig,
    Workload,
    int_range,
    load_tokenizer,
    log,
    resolve_model,
    write_batch,
)
from common import markdown_table, save
from warm_server import TERMINAL, WarmServer

LAG_BUCKET = re.compile(
    r'vllm_batch_event_loop_lag_seconds_bucket\{le="(?P<le>[^"]+)"\} (?P<count>[0-9.e+]+)'
)
SLOW_CALLBACK = re.compile(r"Executing (?P<handle>.*?) took (?P<seconds>\d+\.\d+) seconds")
WORKER_PROCESS = '"process": "worker"'
"""What the worker process's log lines carry (its own loop is not the API's)."""
ROUTES = ("GET /v1/batches/{id}", "GET /v1/files")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--model", help="tiny (default), smollm2, or a model directory")
    add("--name", help="served model name [from the model]")
    add("-n", type=int, default=12_000, help="lines of the batch [%(default)s]")
    add("--prompt-words", type=int_range, default="10-60", help="user words [10-60]")
    add("--max-tokens", type=int_range, default="16-16", help="max_tokens [16-16]")
    add("--seed", type=int, default=0, help="same seed, same batch file [%(default)s]")
    add("--probes", type=int, default=300, help="at least this many calls per route [300]")
    add("--interval", type=float, default=0.1, help="s between probe rounds [%(default)s]")
    add("--max-num-seqs", type=int, default=64, help="engine [%(default)s]")
    add("--max-model-len", type=int, default=1024, help="engine [%(default)s]")
    add("--max-num-batched-tokens", type=int, default=4096, help="engine [%(default)s]")
    add(
        "--asyncio-debug",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run serve with python -X dev (asyncio debug) and count slow callbacks [on]",
    )
    add("--py-spy", type=Path, help="sample the server with py-spy (collapsed stacks) into DIR")
    add("--worker-mode", choices=("process", "inline"), default="process", help="[process]")
    add("--nice-engine", type=int, help="renice the server's child processes (the engine) [no]")
    add("--label", default="", help="a note on the code measured (shown in the results)")
    add("--timeout", type=float, default=1800, help="seconds per wait [%(default)s]")
    add("--workdir", type=Path, help="keep the batch file and server log here")
    add("--results-name", default="api_latency_tiny", help="[%(default)s]")
    return parser.parse_args(argv)


WORKER_WHERE = {"process": "in a child process", "inline": "inline, on the API's event loop"}


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p95/p99/max of ``samples`` (seconds) in milliseconds."""
    ordered = sorted(samples)
    cuts = statistics.quantiles(ordered, n=100, method="inclusive")
    return {
        "n": len(ordered),
        "p50_ms": round(cuts[49] * 1000, 1),
        "p95_ms": round(cuts[94] * 1000, 1),
        "p99_ms": round(cuts[98] * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


def slow_callbacks(log_path: Path, batch_id: str) -> list[tuple[float, str]]:
    """``(seconds, handle)`` of every slow callback logged after ``batch_id`` first appears."""
    found: list[tuple[float, str]] = []
    seen = False
    for line in log_path.read_text(errors="replace").splitlines():
        seen = seen or batch_id in line
        match = SLOW_CALLBACK.search(line)
        if seen and match and WORKER_PROCESS not in line:  # serve's own loop only
            found.append((float(match["seconds"]), match["handle"][:300]))
    return found


def probe(server: WarmServer, batch_id: str, args: argparse.Namespace) -> dict[str, Any]:
    """Sequential GETs until the batch is final (and at least ``--probes`` of each)."""
    samples: dict[str, list[float]] = {route: [] for route in ROUTES}
    client = server.client
    status = "in_progress"
    deadline = time.time() + args.timeout
    rounds_in_progress = 0
    while status not in TERMINAL or len(samples[ROUTES[0]]) < args.probes:
        if time.time() > deadline:
            raise RuntimeError(f"batch {batch_id} not final after {args.timeout:.0f} s")
        t0 = time.perf_counter()
        response = client.get(f"/batches/{batch_id}")
        t1 = time.perf_counter()
        files = client.get("/files", params={"limit": 20})
        t2 = time.perf_counter()
        response.raise_for_status()
        files.raise_for_status()
        samples[ROUTES[0]].append(t1 - t0)
        samples[ROUTES[1]].append(t2 - t1)
        status = response.json()["status"]
        if status not in TERMINAL:
            rounds_in_progress += 1
        time.sleep(args.interval)
    return {"samples": samples, "rounds_while_running": rounds_in_progress, "status": status}


def loop_lag_buckets(url: str) -> dict[float, float]:
    """The server's ``vllm_batch_event_loop_lag_seconds`` histogram: ``{le: count}``."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    buckets: dict[float, float] = {}
    for match in LAG_BUCKET.finditer(text):
        buckets[float(match["le"])] = float(match["count"])
    return buckets


def lag_summary(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """Timer lags measured between two histogram snapshots: how many, how many >= 100 ms,
    and the bucket the worst fell in (``None``: no watcher in this server)."""
    if not after:
        return {"measured": 0, "over_100ms": None, "worst_bucket_le": None}
    delta = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
    total = delta[max(delta)]
    below_100ms = max((count for le, count in delta.items() if le < 0.1), default=0.0)
    worst = min((le for le, count in delta.items() if count >= total), default=None)
    return {
        "measured": int(total),
        "over_100ms": int(total - below_100ms),
        "worst_bucket_le": worst,
    }


def start_py_spy(pid: int, out_dir: Path) -> subprocess.Popen[bytes]:
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = ["py-spy", "record", "--pid", str(pid), "--rate", "100", "--threads", "--gil"]
    cmd += ["--format", "raw", "--output", str(out_dir / "server.txt"), "--nonblocking"]
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen([py_spy, *cmd[1:]], stdout=subprocess.DEVNULL)


def main() -> None:
    args = parse_args()
    model, name = resolve_model(args.model, args.name)
    engine = EngineConfig(
        model=model,
        name=name,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-api-latency-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model)

    def batch_file(label: str, n: int, seed: int, max_tokens: tuple[int, int]) -> Path:
        path = workdir / f"{label}.jsonl"
        work = Workload(n, args.prompt_words, max_tokens, 0.0, 0, True, seed)
        write_batch(path, work, name, tokenizer, args.max_model_len)
        return path

    batch_path = batch_file("batch", args.n, args.seed, args.max_tokens)
    warmup = batch_file("warm-up", 16, 999_999, (4, 16))
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in CPU_ENV.items()}}
    env["PYTHONUNBUFFERED"] = "1"
    extra_env = {"VLLM_BATCH_WORKER_MODE": args.worker_mode}
    if args.asyncio_debug:
        # -X dev would also put debug hooks on the allocator (slowing serve 3x); not this.
        extra_env["PYTHONMALLOC"] = "pymalloc"
    python_flags = ("-X", "dev") if args.asyncio_debug else ()
    spy: subprocess.Popen[bytes] | None = None
    load_before = os.getloadavg()[0]
    with WarmServer(
        engine,
        workdir,
        "server",
        env,
        extra_env,
        args.timeout,
        warmup_file=warmup,
        python_flags=python_flags,
    ) as server:
        assert server.child is not None
        if args.nice_engine is not None:
            for child in psutil.Process(server.child.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.nice(args.nice_engine)
        lag_before = loop_lag_buckets(server.url)
        submitted = server.submit(batch_path, "batch")
        started = server.first_progress(submitted)
        log(f"batch {submitted.batch_id} in progress; probing the API")
        if args.py_spy is not None:
            spy = start_py_spy(server.child.proc.pid, args.py_spy)
        try:
            probed = probe(server, submitted.batch_id, args)
        finally:
            if spy is not None:
                spy.send_signal(2)
                spy.wait(60)
        done_s = time.time() - submitted.created
        info = server.client.get(f"/batches/{submitted.batch_id}").json()
        counts = info.get("request_counts") or {}
        if info["status"] != "completed" or counts.get("completed") != args.n:
            raise RuntimeError(f"batch ended {info['status']} with {counts}")
        lag_after = loop_lag_buckets(server.url)
        running_from = started - submitted.created
        log(f"batch completed in {done_s:.1f} s (in progress from {running_from:.1f} s)")
    slow = slow_callbacks(workdir / "server.log", submitted.batch_id)
    stats = {route: percentiles(samples) for route, samples in probed["samples"].items()}
    slow_summary = {
        "asyncio_debug": args.asyncio_debug,
        "count_over_100ms": len(slow),
        "max_s": max((s for s, _ in slow), default=None),
        "slowest": [{"seconds": s, "handle": h} for s, h in sorted(slow, reverse=True)[:8]],
    }
    lag = lag_summary(lag_before, lag_after)
    command = "python benchmarks/bench_api_latency.py " + shlex.join(sys.argv[1:])
    rows = [
        [route, s["n"], s["p50_ms"], s["p95_ms"], s["p99_ms"], s["max_ms"]]
        for route, s in stats.items()
    ]
    table = markdown_table(["route", "calls", "p50 ms", "p95 ms", "p99 ms", "max ms"], rows)
    if args.asyncio_debug:
        slowest = "".join(
            f"\n  - {item['seconds']:.3f} s: `{item['handle'][:160]}`"
            for item in slow_summary["slowest"]
        )
        slow_text = (
            f"Slow callbacks on serve's event loop (asyncio debug, > 100 ms) from submission "
            f"to completion: "
            f"**{len(slow)}**, max {slow_summary['max_s'] or 0:.3f} s.{slowest}"
        )
    else:
        slow_text = "asyncio debug mode off: slow callbacks not recorded."
    if lag["measured"]:
        lag_text = (
            f"Loop-lag watcher (a 50 ms timer, `vllm_batch_event_loop_lag_seconds`) during the "
            f"batch: {lag['measured']} timers, **{lag['over_100ms']}** late by 100 ms or more, "
            f"worst within the <= {lag['worst_bucket_le']} s bucket."
        )
    else:
        lag_text = "No loop-lag watcher in this server (metric absent)."
    body = (
        f"{args.label + chr(10) + chr(10) if args.label else ''}"
        f"Model `{name}` ({model}); one {args.n}-line chat batch (seed {args.seed}, user "
        f"prompt {args.prompt_words[0]}-{args.prompt_words[1]} words, max_tokens "
        f"{args.max_tokens[0]}-{args.max_tokens[1]} with ignore_eos) on `vllm-batch serve` "
        f"with its worker {WORKER_WHERE[args.worker_mode]} (SQLite, local files), engine "
        f"dtype float32, "
        f"max-num-seqs {args.max_num_seqs}, max-model-len {args.max_model_len}; "
        f"asyncio debug {'on in serve' if args.asyncio_debug else 'off'}. From the batch's first "
        f"result to its completion, one `GET /v1/batches/{{id}}` then one `GET /v1/files` "
        f"every {args.interval} s (sequential, one client on loopback). Batch done "
        f"{done_s:.1f} s after submission; {probed['rounds_while_running']} probe rounds "
        f"while it was not final. Load average before: {load_before:.1f}.\n\n"
        f"{table}\n\n{slow_text}\n\n{lag_text}\n\nReproduce: `{command}`"
    )
    payload = {
        "command": command,
        "label": args.label,
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "batch_seconds": round(done_s, 1),
        "rounds_while_running": probed["rounds_while_running"],
        "latency": stats,
        "slow_callbacks": slow_summary,
        "loop_lag": lag,
        "load_avg_before": load_before,
    }
    print(save(args.results_name, payload, body).read_text())
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
