"""``vllm-batch run``: a drop-in for ``vllm run-batch`` on the server's request path.

One input file (local path or http(s) URL) in, one output file out, in input order,
through the same ``Dispatcher``/``execute_line``/``VllmEngine`` path as the server's worker.
Nothing here imports vLLM at module level.
"""

from vllm_batch.offline.runner import RunFailed, RunOptions, RunSummary, run_batch

__all__ = ["RunFailed", "RunOptions", "RunSummary", "run_batch"]
