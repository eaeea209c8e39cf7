"""What an engine start costs, with vLLM's engine processes forked (our default for a
command's first engine on CPU) or spawned (vLLM's CPU default, chosen here through
``VLLM_WORKER_MULTIPROC_METHOD=spawn``, which we always keep).

Runs ``vllm-batch run`` on a 16-line chat file, alternating the two methods, ``--rounds``
times each, and reports the whole process's wall time and CPU seconds (user + system, the
engine processes included). The answers of both methods must be the same (temperature 0).

    python benchmarks/bench_engine_start.py                # tiny model, 3 rounds
    python benchmarks/bench_engine_start.py --model smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch import resolve_model
from common import markdown_table, save

METHODS = ("fork", "spawn")


def chat_file(path: Path, name: str, lines: int) -> None:
    with path.open("w") as out:
        for i in range(lines):
            body = {
                "model": name,
                "messages": [{"role": "user", "content": f"Say something about {i}."}],
                "max_tokens": 8,
                "temperature": 0,
            }
            row = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
            out.write(json.dumps({**row, "body": body}) + "\n")


def one_run(model: Path, name: str, method: str, work: Path) -> dict[str, Any]:
    """One ``vllm-batch run``: wall s, CPU s of the process tree, the answers."""
    env = dict(os.environ)
    env.pop("VLLM_WORKER_MULTIPROC_METHOD", None)
    if method == "spawn":
        env["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    out = work / f"out-{method}.jsonl"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "vllm_batch.cli", "run", "-i", str(work / "in.jsonl")]
    cmd += ["-o", str(out), "--model", str(model), "--served-model-name", name]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    answers = {
        row["custom_id"]: row["response"]["body"]["choices"][0]["message"]["content"]
        for row in map(json.loads, out.read_text().splitlines())
    }
    return {"wall_s": wall, "cpu_s": cpu, "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="tiny (default), smollm2, or a model directory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lines", type=int, default=16)
    parser.add_argument("--results-name", default="engine_start_tiny")
    args = parser.parse_args()
    model, name = resolve_model(args.model, None)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        chat_file(work / "in.jsonl", name, args.lines)
        for round_ in range(args.rounds):
            for method in METHODS:
                result = one_run(model, name, method, work)
                runs[method].append(result)
                took = f"{result['wall_s']:.1f} s wall, {result['cpu_s']:.1f} CPU-s"
                print(f"round {round_ + 1} {method}: {took}", flush=True)
    answers = {m: [r["answers"] for r in rs] for m, rs in runs.items()}
    same = all(a == answers["spawn"][0] for rs in answers.values() for a in rs)
    rows = []
    summary: dict[str, Any] = {}
    for method in METHODS:
        wall = statistics.median(r["wall_s"] for r in runs[method])
        cpu = statistics.median(r["cpu_s"] for r in runs[method])
        summary[method] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
        rows.append([method, f"{wall:.1f}", f"{cpu:.1f}"])
    ratio_wall = summary["spawn"]["wall_s"] / summary["fork"]["wall_s"]
    ratio_cpu = summary["spawn"]["cpu_s"] / summary["fork"]["cpu_s"]
    table = (
        f"`vllm-batch run` of {args.lines} chat lines (8 tokens, temperature 0) on `{name}`, "
        f"{args.rounds} rounds alternating the methods; medians of the whole process "
        "(CPU: user + system of the process and its engine processes).\n\n"
        + markdown_table(["engine processes", "wall s", "CPU s"], rows)
        + f"\n\nspawn / fork: **{ratio_wall:.2f}x** wall, **{ratio_cpu:.2f}x** CPU. "
        f"Same answers with both methods: {'yes' if same else 'NO'}.\n\n"
        f"Reproduce: `python benchmarks/bench_engine_start.py --rounds {args.rounds}`"
    )
    timings = {m: [{k: r[k] for k in ("wall_s", "cpu_s")} for r in rs] for m, rs in runs.items()}
    payload = {"runs": timings, "summary": summary, "same_answers": same}
    print(save(args.results_name, payload, table).read_text())
    if not same:
        raise SystemExit("the two methods gave different answers")


if __name__ == "__main__":
    main()
