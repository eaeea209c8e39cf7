"""``vllm-batch bench``: the benchmark harness of a source checkout."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer


def bench(ctx: typer.Context) -> None:
    """Run the benchmark harness (benchmarks/bench_batch.py of a source checkout)."""
    candidates = [Path.cwd() / "benchmarks", Path(__file__).resolve().parents[2] / "benchmarks"]
    for folder in candidates:
        script = folder / "bench_batch.py"
        if script.is_file():
            os.execv(sys.executable, [sys.executable, str(script), *ctx.args])
    raise typer.BadParameter("benchmarks/bench_batch.py not found: run from a source checkout")
