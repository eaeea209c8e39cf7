"""``vllm-batch run --executor ray`` against ``vllm-batch run`` on the same file, same machine.

Both are subprocesses, one after the other, on the same input (greedy chat requests that
run to ``--max-tokens``). Reported per run: the whole process (wall time: start-up, Ray,
engine load, requests, exit) and the processing alone (from the engine being ready to the
last result, from the run's own JSON log timestamps), plus the Ray/local ratios. The Ray
run uses a private Ray instance (no ``--ray-address``) with one replica of
``--ray-cpus`` CPUs, so the difference is Ray's cost: the per-request actor calls, the
result transfers and the extra start-up.

    python benchmarks/bench_ray.py                       # the tiny test model, generated
    python benchmarks/bench_ray.py --model-path models/SmolLM2-135M-Instruct --lines 400
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save

MODEL_NAME = "bench-model"
READY = {"local": "vLLM engine ready for", "ray": "Ray replicas ready for"}
ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_BATCH_LOG_FORMAT": "json",
}


def write_input(path: Path, lines: int, max_tokens: int) -> None:
    with path.open("w") as out:
        for i in range(lines):
            body = {
                "model": MODEL_NAME,
                "messages": [{"role": "user", "content": f"Tell me about number {i}."}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
            out.write(json.dumps({**line, "body": body}) + "\n")


def log_time(log: list[dict[str, Any]], needle: str, last: bool = False) -> float:
    """The timestamp (seconds) of the first (or last) JSON log line whose message has it."""
    found = [e for e in log if needle in str(e.get("message", ""))]
    assert found, f"no log line with {needle!r}"
    stamp = str(found[-1 if last else 0]["timestamp"]).replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp()


def run_once(
    executor: str, args: argparse.Namespace, source: Path, workdir: Path
) -> dict[str, Any]:
    target = workdir / f"out-{executor}.jsonl"
    command = [sys.executable, "-m", "vllm_batch.cli", "run", "-i", str(source), "-o", str(target)]
    command += ["--model", f"{MODEL_NAME}={args.model_path}", "--max-num-seqs", str(args.seqs)]
    command += ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512"]
    command += ["--progress-interval", "5"]
    env = {**os.environ, **ENV}
    if executor == "ray":
        command += ["--executor", "ray", "--ray-replicas", "1"]
        env["VLLM_BATCH_RAY_CPUS_PER_REPLICA"] = str(args.ray_cpus)
    log_path = workdir / f"run-{executor}.log"
    started = time.perf_counter()
    with log_path.open("wb") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - started
    text = log_path.read_text(errors="replace")
    assert code == 0, text[-3000:]
    entries = [json.loads(x) for x in text.splitlines() if x.startswith('{"timestamp"')]
    processing = log_time(entries, "progress: ", last=True) - log_time(entries, READY[executor])
    outputs = [json.loads(x) for x in target.read_text().splitlines()]
    assert len(outputs) == args.lines and all(o["error"] is None for o in outputs)
    tokens = sum(o["response"]["body"]["usage"]["completion_tokens"] for o in outputs)
    return {
        "executor": executor,
        "wall_s": round(wall, 1),
        "processing_s": round(processing, 1),
        "lines_per_s": round(args.lines / processing, 1),
        "output_tok_per_s": round(tokens / processing),
        "texts": [o["response"]["body"]["choices"][0]["message"]["content"] for o in outputs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-path", type=Path, help="default: the tiny test model (built)")
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seqs", type=int, default=64, help="--max-num-seqs of the engine")
    parser.add_argument("--ray-cpus", type=float, default=2.0, help="CPUs the replica reserves")
    parser.add_argument("--name", default="ray_executor_tiny")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.model_path is None:
            from vllm_batch.weights.tiny import make_test_model

            args.model_path = make_test_model(workdir / "tiny")
        source = workdir / "input.jsonl"
        write_input(source, args.lines, args.max_tokens)
        runs = [run_once(executor, args, source, workdir) for executor in ("local", "ray")]
    local, ray = runs
    same = local.pop("texts") == ray.pop("texts")
    ratios = {
        "wall": round(ray["wall_s"] / local["wall_s"], 2),
        "processing": round(ray["processing_s"] / local["processing_s"], 2),
    }
    model = Path(args.model_path).name if args.model_path else "tiny"
    command = " ".join(["python benchmarks/bench_ray.py", *sys.argv[1:]])
    header = "| executor | whole process s | processing s | lines/s | output tok/s |"
    rows = "\n".join(
        f"| {r['executor']} | {r['wall_s']} | {r['processing_s']} | {r['lines_per_s']} | "
        f"{r['output_tok_per_s']:,} |"
        for r in runs
    )
    table = (
        f"`{command}`: {args.lines} chat lines x {args.max_tokens} tokens (greedy) on "
        f"{model}, max-num-seqs {args.seqs}; the Ray run: a private Ray instance, one "
        f"replica reserving {args.ray_cpus:g} CPUs. Same texts in both outputs: {same}.\n\n"
        f"{header}\n|---|---|---|---|---|\n{rows}\n\n"
        f"Ray / local: whole process x{ratios['wall']}, processing x{ratios['processing']}."
    )
    payload = {"command": command, "model": model, "runs": runs, "ratios": ratios, "same": same}
    print(save(args.name, payload, table).read_text())


if __name__ == "__main__":
    main()
