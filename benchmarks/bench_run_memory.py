"""Memory of ``vllm-batch run`` against input size, with the BENCHMARK-ONLY instant engine.

Shows that the offline runner streams: peak RSS for 200k lines stays close to 2k lines.
No inference happens (``VLLM_BATCH_ENGINE=instant-benchmark``); engine memory is the same
at any file size and is measured by ``bench_batch.py``.

    python benchmarks/bench_run_memory.py --sizes 2000 200000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import write_input
from common import RssSampler, save


def run_size(lines: int, workdir: Path) -> dict[str, object]:
    source, target = workdir / f"in-{lines}.jsonl", workdir / f"out-{lines}.jsonl"
    write_input(source, lines)
    env = {**os.environ, "VLLM_BATCH_ENGINE": "instant-benchmark"}
    started = time.perf_counter()
    with open(workdir / f"run-{lines}.log", "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vllm_batch.cli",
                "run",
                "-i",
                str(source),
                "-o",
                str(target),
                "--model",
                "bench-model=unused",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        with RssSampler(process.pid, interval=0.05) as sampler:
            code = process.wait()
    seconds = time.perf_counter() - started
    assert code == 0, (workdir / f"run-{lines}.log").read_text()[-2000:]
    with open(target, "rb") as out:
        produced = sum(1 for _ in out)
    assert produced == lines, (produced, lines)
    return {
        "lines": lines,
        "seconds": round(seconds, 2),
        "lines_per_s": round(lines / seconds),
        "peak_rss_mb": round(sampler.peak / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000, 200_000])
    parser.add_argument("--name", default="run_memory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_size(lines, Path(tmp)) for lines in args.sizes]
    for row in rows:
        print(row)
    table = "| lines | wall s | lines/s | peak RSS MB |\n|---|---|---|---|\n" + "\n".join(
        f"| {r['lines']:,} | {r['seconds']} | {r['lines_per_s']:,} | {r['peak_rss_mb']} |"
        for r in rows
    )
    note = (
        "`vllm-batch run` as a subprocess with the BENCHMARK-ONLY instant engine "
        "(no inference); wall time includes Python start-up."
    )
    print(save(args.name, {"rows": rows}, f"{note}\n\n{table}").read_text())


if __name__ == "__main__":
    main()
