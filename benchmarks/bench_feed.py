"""How well the worker feeds the engine: chunking, many small batches, head-of-line blocking.

Every scenario runs real vLLM behind ``vllm-batch serve`` (in-process worker), started in a
subprocess, engine loaded and warmed with a small batch before anything is timed. Batch
files are synthetic and seeded (same arguments, same files); engine settings are the same
for every run (and for ``vllm run-batch``, where it runs). One scenario per invocation:

* ``chunks``: one N-line batch (mixed max_tokens) on a server with
  ``VLLM_BATCH_CHUNK_SIZE=--chunk-size`` (250), then on a server where it is one chunk.
  Reports throughput(chunked) / throughput(one chunk); target >= 0.98.
* ``many``: ``--batches`` (20) batches of ``--batch-lines`` (100) submitted at once against
  one batch holding the same lines, on the same warm server: throughput ratio (target
  >= 0.95). Then the same small files through ``vllm run-batch`` one after the other
  (whole process each): our wall / their total wall (target <= 0.2). ``--run-batch-runs K``
  runs only K of them and extrapolates (labelled so).
* ``hol``: a ``--small-lines`` (50) batch alone on the idle warm server, then again while a
  long N-line batch is running: its submit -> completed time both ways.
* ``deadline``: ``--deadline-batches`` batches with completion_window 24h, then as many with
  1h: completion order and times per window.

    python benchmarks/bench_feed.py --scenario chunks                 # tiny model, N=4000
    python benchmarks/bench_feed.py --scenario many --run-batch-runs 5
    python benchmarks/bench_feed.py --scenario hol --model smollm2 -n 1000
    python benchmarks/bench_feed.py --scenario deadline

The defaults are sized for the tiny model (about 4,000 output tok/s on 2 cores); with
``--model smollm2`` (about 90 tok/s there) lower ``-n`` and ``--max-tokens``.
Results go to ``benchmarks/results/feed_<scenario>_<model>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch import (
    CPU_ENV,
    Context,
    EngineConfig,
    Variant,
    Workload,
    int_range,
    load_tokenizer,
    log,
    read_outputs,
    resolve_model,
    run_run_batch,
    write_batch,
)
from common import markdown_table, save
from warm_server import TERMINAL, Finished, Submitted, WarmServer, split_batch

SCENARIOS = ("chunks", "many", "hol", "deadline")


@dataclass
class Setup:
    """What every scenario needs: engine, files, environment and the parsed arguments."""

    args: argparse.Namespace
    engine: EngineConfig
    model_key: str
    ignore_eos: bool
    workdir: Path
    env: dict[str, str]
    tokenizer: Any

    def batch(
        self, name: str, n: int, seed: int, max_tokens: tuple[int, int] | None = None
    ) -> Path:
        """A seeded chat batch file of ``n`` lines (ids ``req-0..``); same arguments, same bytes."""
        work = Workload(
            n=n,
            prompt_words=self.args.prompt_words,
            max_tokens=max_tokens or self.args.max_tokens,
            shared_prefix_fraction=0.0,
            prefix_tokens=0,
            ignore_eos=self.ignore_eos,
            seed=seed,
        )
        path = self.workdir / f"{name}.jsonl"
        write_batch(path, work, self.engine.name, self.tokenizer, self.engine.max_model_len)
        return path

    def server(self, label: str, extra_env: dict[str, str] | None = None) -> WarmServer:
        """A warm server (engine loaded, warm-up batch done) once entered."""
        warmup = self.batch("warm-up", 16, seed=999_999, max_tokens=(4, 16))
        env = {**self.args.server_env, **(extra_env or {})}
        return WarmServer(
            self.engine, self.workdir, label, self.env, env, self.args.timeout, warmup
        )


def max_tokens_sum(path: Path) -> int:
    with open(path) as handle:
        return sum(json.loads(line)["body"]["max_tokens"] for line in handle if line.strip())


def outputs(setup: Setup, srv: WarmServer, done: Finished, source: Path) -> dict[str, Any]:
    """Download a finished batch's output; count lines, errors, tokens (and check them)."""
    n = done.submitted.lines
    path = srv.download(done, setup.workdir / f"{srv.label}.{done.submitted.label}.out.jsonl")
    stats = read_outputs(path, n)
    problems = []
    if done.status != "completed":
        problems.append(f"batch {done.status}")
    if stats["ok_lines"] != n or stats.pop("missing_ids"):
        problems.append(f"{stats['ok_lines']}/{n} ok lines, first error: {stats['first_error']}")
    if setup.ignore_eos and stats["output_tokens"] != max_tokens_sum(source):
        problems.append(f"{stats['output_tokens']} output tokens != {max_tokens_sum(source)}")
    stats.pop("first_error")
    stats["problems"] = problems
    return stats


def timing(done: Finished) -> dict[str, Any]:
    sub = done.submitted
    return {
        "batch": sub.label,
        "lines": sub.lines,
        "window": sub.window,
        "metadata": sub.metadata,
        "status": done.status,
        "create_to_done_s": round(done.create_to_done_s, 3),
        "upload_to_done_s": round(done.seen_at - sub.upload_started, 3),
        "server_created_at": done.info.get("created_at"),
        "server_in_progress_at": done.info.get("in_progress_at"),
        "server_completed_at": done.info.get("completed_at"),
    }


def _f(value: float | None, digits: int = 2) -> str | None:
    return None if value is None else f"{value:,.{digits}f}"


def _verdict(value: float | None, target: float, higher_is_better: bool) -> str:
    if value is None:
        return "not measured"
    met = value >= target if higher_is_better else value <= target
    return f"**{value:.3f}** (target {'>=' if higher_is_better else '<='} {target}: " + (
        "met)" if met else "NOT met)"
    )


# --- scenarios --------------------------------------------------------------------------


def scenario_chunks(setup: Setup) -> tuple[dict[str, Any], str]:
    """The same batch with small chunks and as one chunk, each on a fresh warm server."""
    args = setup.args
    source = setup.batch("chunks", args.n, args.seed)
    one_chunk = max(args.n, 4000)
    runs: list[dict[str, Any]] = []
    answers: dict[str, dict[str, str]] = {}
    for label, size in ((f"chunk-{args.chunk_size}", args.chunk_size), ("one-chunk", one_chunk)):
        with setup.server(label, {"VLLM_BATCH_CHUNK_SIZE": str(size)}) as srv:
            done = srv.wait([srv.submit(source, "batch")])[0]
            stats = outputs(setup, srv, done, source)
        answers[label] = stats.pop("answers")
        row = {
            "run": label,
            "chunk_size": size,
            "chunks": math.ceil(args.n / size),
            "startup_s": srv.startup_s,
            **timing(done),
            **stats,
        }
        row["req_per_s"] = args.n / row["create_to_done_s"]
        row["out_tok_per_s"] = row["output_tokens"] / row["create_to_done_s"]
        runs.append(row)
        log(f"{label}: {row['create_to_done_s']:.2f} s, {row['req_per_s']:.1f} req/s")
    chunked, whole = runs
    ratio = chunked["req_per_s"] / whole["req_per_s"]
    labels = list(answers)
    same = sum(answers[labels[0]].get(k) == v for k, v in answers[labels[1]].items())
    rows = [
        [
            r["run"],
            r["chunk_size"],
            r["chunks"],
            r["status"],
            f"{r['ok_lines']}/{args.n}",
            _f(r["create_to_done_s"]),
            _f(r["req_per_s"], 1),
            _f(r["out_tok_per_s"], 0),
            "; ".join(r["problems"]) or None,
        ]
        for r in runs
    ]
    headers = ["run", "chunk size", "chunks", "status", "ok lines", "create→completed s"]
    headers += ["req/s", "out tok/s", "problems"]
    table = markdown_table(headers, rows) + (
        f"\n\nthroughput({chunked['run']}) / throughput(one chunk) = "
        f"{_verdict(ratio, 0.98, True)}\n\nSame output text in both runs: {same}/{args.n}."
    )
    return {"runs": runs, "ratio": ratio, "same_text": same}, table


def scenario_many(setup: Setup) -> tuple[dict[str, Any], str]:
    """K small batches at once vs one batch of the same lines; then K ``run-batch`` runs."""
    args = setup.args
    total = args.batches * args.batch_lines
    one = setup.batch("many-one", total, args.seed)
    parts = split_batch(one, args.batches, setup.workdir, "many-part")
    with setup.server("many") as srv:
        single = srv.wait([srv.submit(one, "one-batch")])[0]
        single_stats = outputs(setup, srv, single, one)
        t0 = time.time()
        subs = [srv.submit(p, f"part-{k:02d}") for k, p in enumerate(parts)]
        submitted = time.time()
        finished = srv.wait(subs)
        processed = max(f.seen_at for f in finished)
        part_stats: dict[str, dict[str, Any]] = {}
        for done in finished:
            source = parts[int(done.submitted.label.split("-")[1])]
            part_stats[done.submitted.label] = outputs(setup, srv, done, source)
        t_end = time.time()
        startup, warmup = srv.startup_s, srv.warmup_s
    single_s = single.create_to_done_s
    many_s = processed - min(s.created for s in subs)  # first create -> last completed
    thr_ratio = single_s / many_s  # same lines: throughput ratio = time ratio inverted
    ours_wall = t_end - t0  # uploads, creates, processing and downloads of all K
    problems = [f"{k}: {p}" for k, s in part_stats.items() for p in s["problems"]]
    problems += [f"one-batch: {p}" for p in single_stats["problems"]]

    runs = args.run_batch_runs if args.run_batch_runs is not None else args.batches
    runs = min(runs, args.batches)
    run_results = []
    same = compared = 0
    for k in range(runs):
        ctx = Context(
            engine=setup.engine,
            workdir=setup.workdir,
            input=parts[k],
            n=args.batch_lines,
            expected_output_tokens=max_tokens_sum(parts[k]) if setup.ignore_eos else None,
            timeout=args.timeout,
            env=setup.env,
        )
        log(f"=== run-batch {k + 1}/{runs}")
        result = run_run_batch(Variant(f"run-batch-{k:02d}", "run-batch"), ctx)
        ours = part_stats[f"part-{k:02d}"]["answers"]
        compared += len(result.answers)
        same += sum(ours.get(key) == value for key, value in result.answers.items())
        run_results.append({k: v for k, v in asdict(result).items() if k != "answers"})
        log(f"run-batch {k + 1}/{runs}: {result.status}, whole process {result.exit_s:.1f} s")
    measured = sum(r["exit_s"] or 0 for r in run_results)
    theirs = measured / runs * args.batches if runs else None
    extrapolated = 0 < runs < args.batches
    wall_ratio = ours_wall / theirs if theirs else None
    cold_ratio = (ours_wall + (startup or 0) + (warmup or 0)) / theirs if theirs else None
    for p in part_stats.values():
        p.pop("answers")
    single_stats.pop("answers")

    label = f" (EXTRAPOLATED from {runs} of {args.batches} runs)" if extrapolated else ""
    rows = [
        ["server: 1 batch", total, _f(single_s), _f(total / single_s, 1), None],
        [
            f"server: {args.batches} batches at once",
            total,
            _f(many_s),
            _f(total / many_s, 1),
            f"all created {submitted - t0:.2f} s after the first upload",
        ],
        [
            f"vllm run-batch x{args.batches}, one after the other{label}",
            total,
            _f(theirs),
            _f(total / theirs, 1) if theirs else None,
            f"{runs} whole-process runs measured: {measured:.1f} s",
        ],
    ]
    headers = ["what", "lines", "time s", "req/s", "note"]
    table = "\n".join(
        [
            markdown_table(headers, rows),
            "",
            f"- server time: POST /v1/batches (first) -> last batch seen completed; "
            f"throughput({args.batches} batches) / throughput(1 batch) = "
            f"{_verdict(thr_ratio, 0.95, True)}",
            f"- our wall for the {args.batches} batches (first upload -> last download, warm "
            f"engine): {ours_wall:.1f} s; / run-batch total wall{label}: "
            f"{_verdict(wall_ratio, 0.2, False)}",
            f"- with our one-off cold start added (engine load {_f(startup, 1)} s + warm-up "
            f"{_f(warmup, 1)} s): {_f(cold_ratio, 3)}",
            f"- same output text, server vs run-batch: {same}/{compared}",
            f"- problems: {'; '.join(problems) or 'none'}",
        ]
    )
    payload = {
        "single": {**timing(single), **single_stats},
        "parts": [{**timing(f), **part_stats[f.submitted.label]} for f in finished],
        "throughput_ratio": thr_ratio,
        "ours_wall_s": ours_wall,
        "server_startup_s": startup,
        "server_warmup_s": warmup,
        "run_batch": run_results,
        "run_batch_runs": runs,
        "run_batch_total_s": theirs,
        "run_batch_extrapolated": extrapolated,
        "wall_ratio": wall_ratio,
        "wall_ratio_with_cold_start": cold_ratio,
        "same_text": f"{same}/{compared}",
    }
    return payload, table


def scenario_hol(setup: Setup) -> tuple[dict[str, Any], str]:
    """A small batch alone, then behind a running long batch: its completion time."""
    args = setup.args
    long_file = setup.batch("hol-long", args.n, args.seed)
    small = setup.batch("hol-small", args.small_lines, args.seed + 1)
    metadata = {"priority": str(args.small_priority)} if args.small_priority is not None else None
    with setup.server("hol") as srv:
        alone = srv.wait([srv.submit(small, "small-alone", metadata=metadata)])[0]
        alone_stats = outputs(setup, srv, alone, small)
        long_sub = srv.submit(long_file, "long")
        running = srv.first_progress(long_sub)
        time.sleep(args.hol_delay)
        before = srv.states([long_sub.batch_id])[long_sub.batch_id]["request_counts"]
        busy_sub = srv.submit(small, "small-busy", metadata=metadata)
        busy = srv.wait([busy_sub])[0]
        busy_stats = outputs(setup, srv, busy, small)
        long_info = srv.states([long_sub.batch_id])[long_sub.batch_id]
        after = long_info["request_counts"]
        long_done: Finished | None = None
        if long_info["status"] in TERMINAL or args.finish_long:
            long_done = srv.wait([long_sub])[0]
        else:  # not timed: cancel it (or, if the server refuses, let it end)
            srv.cancel(long_sub)
            srv.wait([long_sub])
    ratio = busy.create_to_done_s / alone.create_to_done_s
    problems = [f"alone: {p}" for p in alone_stats.pop("problems")]
    problems += [f"busy: {p}" for p in busy_stats.pop("problems")]
    alone_stats.pop("answers")
    busy_stats.pop("answers")
    long_note = (
        f"long batch {long_done.status} {long_done.create_to_done_s:.1f} s after its create"
        if long_done
        else "long batch cancelled once the small one completed"
    )
    rows = [
        ["alone, idle warm server", _f(alone.create_to_done_s), None],
        [
            f"while a {args.n}-line batch runs",
            _f(busy.create_to_done_s),
            f"long batch had {before['completed']}/{before['total']} done at submit, "
            f"{after['completed']}/{after['total']} when the small one completed",
        ],
    ]
    priority = f", metadata.priority {args.small_priority}" if metadata else ""
    table = "\n".join(
        [
            f"Small batch: {args.small_lines} lines{priority}; submitted {args.hol_delay:g} s "
            f"after the long batch showed its first completed requests.",
            "",
            markdown_table([f"{args.small_lines}-line batch", "submit→completed s", "note"], rows),
            "",
            f"- busy / alone = {ratio:.2f}x ({long_note})",
            f"- problems: {'; '.join(problems) or 'none'}",
        ]
    )
    payload = {
        "alone": {**timing(alone), **alone_stats},
        "busy": {**timing(busy), **busy_stats},
        "long_first_progress_at": running,
        "long_counts_at_small_submit": before,
        "long_counts_at_small_done": after,
        "long": timing(long_done) if long_done else {"status": "cancelled by the benchmark"},
        "busy_over_alone": ratio,
    }
    return payload, table


def scenario_deadline(setup: Setup) -> tuple[dict[str, Any], str]:
    """Batches with completion_window 24h, then as many with 1h: who finishes when."""
    args = setup.args
    k = args.deadline_batches
    files = [
        setup.batch(f"deadline-{i:02d}", args.deadline_lines, args.seed + 10 + i)
        for i in range(2 * k)
    ]
    plan = [("24h", f"24h-{i}") for i in range(k)] + [("1h", f"1h-{i}") for i in range(k)]
    refused: dict[str, str] = {}
    with setup.server("deadline") as srv:
        subs: list[Submitted] = []
        for (window, label), path in zip(plan, files, strict=True):
            try:
                subs.append(srv.submit(path, label, window=window))
            except RuntimeError as exc:
                refused[label] = str(exc)
                log(f"{label}: {exc}")
        finished = srv.wait(subs)
    order = {f.submitted.label: i + 1 for i, f in enumerate(finished)}
    rows = [
        [
            s.label,
            s.window,
            i + 1,
            order.get(s.label),
            next((_f(f.create_to_done_s) for f in finished if f.submitted is s), None),
        ]
        for i, s in enumerate(subs)
    ]
    means = {}
    for window in ("24h", "1h"):
        times = [f.create_to_done_s for f in finished if f.submitted.window == window]
        means[window] = sum(times) / len(times) if times else None
    last_1h = max((order[s.label] for s in subs if s.window == "1h"), default=None)
    first_24h_after = sum(
        1 for s in subs if s.window == "24h" and last_1h and order[s.label] > last_1h
    )
    headers = ["batch", "window", "submit order", "completion order", "create→completed s"]
    table = "\n".join(
        [
            f"{k} batches of {args.deadline_lines} lines with completion_window 24h, then {k} "
            "with 1h, submitted back to back on a warm idle server.",
            "",
            markdown_table(headers, rows),
            "",
            "- mean create→completed: "
            + ", ".join(f"{w}: {_f(m) or '—'} s" for w, m in means.items()),
            f"- 24h batches completing after the last 1h batch: {first_24h_after}/{k}",
            f"- refused by the server: {json.dumps(refused) if refused else 'none'}",
        ]
    )
    payload = {
        "batches": [{**timing(f), "completion_order": order[f.submitted.label]} for f in finished],
        "mean_create_to_done_s": means,
        "refused": refused,
    }
    return payload, table


RUNNERS = {
    "chunks": scenario_chunks,
    "many": scenario_many,
    "hol": scenario_hol,
    "deadline": scenario_deadline,
}


# --- main -------------------------------------------------------------------------------


def env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--scenario", required=True, choices=SCENARIOS)
    add("--model", help="tiny (default: random 2-layer Llama), smollm2, or a model directory")
    add("--name", help="served model name [from the model]")
    add("-n", type=int, default=4000, help="lines of the chunks / hol long batch [%(default)s]")
    add("--prompt-words", type=int_range, default="10-100", help="user words [10-100]")
    add("--max-tokens", type=int_range, default="8-200", help="max_tokens, LOW-HIGH [8-200]")
    add(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="every request generates exactly max_tokens [on for the tiny model only]",
    )
    add("--seed", type=int, default=0, help="same seed, same batch files [%(default)s]")
    add("--chunk-size", type=int, default=250, help="chunks: the small chunk size [%(default)s]")
    add("--batches", type=int, default=20, help="many: small batches [%(default)s]")
    add("--batch-lines", type=int, default=100, help="many: lines each [%(default)s]")
    add(
        "--run-batch-runs",
        type=int,
        help="many: run only K of the run-batch runs and extrapolate [all]; 0 skips them",
    )
    add("--small-lines", type=int, default=50, help="hol: the small batch [%(default)s]")
    add("--small-priority", type=int, help="hol: metadata.priority of the small batch [unset]")
    add("--hol-delay", type=float, default=2.0, help="hol: s after long's first results [2]")
    add("--finish-long", action="store_true", help="hol: let the long batch finish (timed)")
    add("--deadline-batches", type=int, default=3, help="deadline: batches per window [3]")
    add("--deadline-lines", type=int, default=300, help="deadline: lines each [%(default)s]")
    add("--max-num-seqs", type=int, default=64, help="engine [%(default)s]")
    add("--max-model-len", type=int, default=1024, help="engine [%(default)s]")
    add("--max-num-batched-tokens", type=int, default=4096, help="engine [%(default)s]")
    add(
        "--server-env",
        type=env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for every server (VLLM_BATCH_DATABASE_URL=...), repeatable",
    )
    add("--timeout", type=float, default=3600, help="seconds per wait [%(default)s]")
    add("--workdir", type=Path, help="keep the batch files, outputs and logs here")
    add("--results-name", help="[feed_<scenario>_<model>]")
    args = parser.parse_args(argv)
    args.server_env = dict(args.server_env)
    return args


def describe(setup: Setup, scenario: str) -> str:
    args, engine = setup.args, setup.engine
    words, tokens = args.prompt_words, args.max_tokens
    return (
        f"Scenario `{scenario}`. Model `{engine.name}` ({engine.model}); synthetic chat lines "
        f"(seed {args.seed}): user prompt {words[0]}-{words[1]} words, max_tokens "
        f"{tokens[0]}-{tokens[1]}{' with ignore_eos' if setup.ignore_eos else ''}, temperature "
        f"0. Engine for every run: dtype {engine.dtype}, enforce-eager, max-num-seqs "
        f"{engine.max_num_seqs}, max-model-len {engine.max_model_len}, max-num-batched-tokens "
        f"{engine.max_num_batched_tokens}, prefix caching on, "
        + ", ".join(f"{k}={setup.env[k]}" for k in CPU_ENV)
        + ". Server: `vllm-batch serve` subprocess with its in-process worker (SQLite in a "
        "fresh data dir unless --server-env says otherwise), engine loaded and a 16-line "
        "warm-up batch run before timing; times are client clock, polled every 0.2 s"
        + (f"; server env: {args.server_env}" if args.server_env else "")
        + "."
    )


def main() -> None:
    args = parse_args()
    model, name = resolve_model(args.model, args.name)
    model_key = args.model or "tiny"
    if model_key not in ("tiny", "smollm2"):
        model_key = Path(model_key).name
    ignore_eos = args.ignore_eos if args.ignore_eos is not None else model_key == "tiny"
    engine = EngineConfig(
        model=model,
        name=name,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"bench-feed-{args.scenario}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in CPU_ENV.items()}}
    env["PYTHONUNBUFFERED"] = "1"
    setup = Setup(args, engine, model_key, ignore_eos, workdir, env, load_tokenizer(model))
    log(f"scenario {args.scenario}, files and logs in {workdir}")
    ok = False
    try:
        payload, table = RUNNERS[args.scenario](setup)
        ok = True
    finally:
        if args.workdir is None and ok:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not ok:
            log(f"failed: logs kept in {workdir}")
    command = "python benchmarks/bench_feed.py " + shlex.join(sys.argv[1:])
    body = f"{describe(setup, args.scenario)}\n\n{table}\n\nReproduce: `{command}`"
    payload = {
        "scenario": args.scenario,
        "command": command,
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "engine": {**asdict(engine), "model": str(engine.model)},
        "env": {k: env[k] for k in CPU_ENV},
        **payload,
    }
    results_name = args.results_name or f"feed_{args.scenario}_{model_key}"
    print(save(results_name, payload, body).read_text())


if __name__ == "__main__":
    main()
