"""Memory of ``vllm-batch run`` when its first request is much slower than the rest.

Output is written in input order, so every result that finishes before line 0 waits in the
reorder buffer. ``--max-buffered-results`` bounds that buffer (reading pauses when it is
full); this measures peak RSS with the default bound and with the bound disabled.

BENCHMARK ONLY engine: ``SlowFirstLineBenchmarkEngine`` (no inference) answers every line at
once with a ``--content-bytes`` completion, except line 0, which answers only once the rest
of the file is done or submission has stalled for 0.5 s. Each variant runs in a fresh
process (peak RSS is that process's ``ru_maxrss``).

    python benchmarks/bench_run_slow_line.py --lines 200000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save

UNBOUNDED = 10**9


class SlowFirstLineBenchmarkEngine:
    """BENCHMARK ONLY: line 0 is slow, every other line is instant (no inference)."""

    def __init__(self, model_name: str, lines: int, content_bytes: int) -> None:
        self.model_name = model_name
        self.lines = lines
        self.content = "x" * content_bytes
        self.submitted = 0
        self.last_submit = time.monotonic()

    @property
    def max_in_flight(self) -> int:
        return 512

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> Any:
        from vllm_batch.engines.engine import EngineResult

        self.submitted += 1
        self.last_submit = time.monotonic()
        if request_id.endswith("-0"):
            while self.submitted < self.lines and time.monotonic() - self.last_submit < 0.5:
                await asyncio.sleep(0.05)
        else:
            await asyncio.sleep(0)
        message = {"role": "assistant", "content": self.content}
        response = {"id": f"cmpl-{request_id}", "choices": [{"index": 0, "message": message}]}
        return EngineResult(200, json.dumps(response), input_tokens=10, output_tokens=100)


def child(lines: int, bound: int, content_bytes: int, workdir: Path) -> dict[str, Any]:
    from vllm_batch.config import ModelSpec, Settings
    from vllm_batch.offline import RunOptions, run_batch

    source, target = workdir / "in.jsonl", workdir / f"out-{bound}.jsonl"
    if not source.exists():
        with source.open("w") as handle:
            for i in range(lines):
                body = {"model": "bench", "messages": [{"role": "user", "content": f"q{i}"}]}
                line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
                handle.write(json.dumps({**line, "body": body}) + "\n")
    options = RunOptions(
        input=str(source),
        output=str(target),
        spec=ModelSpec("bench", "unused"),
        settings=Settings(),
        progress_tty=False,
        progress_interval=3600,
        max_buffered=bound,
    )
    engine = SlowFirstLineBenchmarkEngine("bench", lines, content_bytes)
    started = time.perf_counter()
    summary = run_batch(options, lambda _spec, _settings: engine)  # type: ignore[arg-type,return-value]
    return {
        "max_buffered": "unbounded" if bound == UNBOUNDED else bound,
        "lines": lines,
        "seconds": round(time.perf_counter() - started, 2),
        "peak_buffered": summary.peak_buffered,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--bounds", type=int, nargs="+", default=[4096, UNBOUNDED])
    parser.add_argument("--content-bytes", type=int, default=2000)
    parser.add_argument("--name", default="run_slow_line")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.lines, args.child, args.content_bytes, args.workdir)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bound in args.bounds:
            command = [sys.executable, __file__, "--lines", str(args.lines), "--child", str(bound)]
            command += ["--content-bytes", str(args.content_bytes), "--workdir", tmp]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1])
    table = "| max buffered | lines | wall s | peak buffered | peak RSS MB |\n"
    table += "|---|---|---|---|---|\n"
    table += "\n".join(
        f"| {r['max_buffered']} | {r['lines']:,} | {r['seconds']} | {r['peak_buffered']:,} "
        f"| {r['peak_rss_mb']} |"
        for r in rows
    )
    note = (
        "`vllm-batch run` in-process with the BENCHMARK-ONLY `SlowFirstLineBenchmarkEngine` "
        f"(line 0 finishes last; {args.content_bytes}-byte completions; no inference)."
    )
    print(save(args.name, {"rows": rows}, f"{note}\n\n{table}").read_text())


if __name__ == "__main__":
    main()
