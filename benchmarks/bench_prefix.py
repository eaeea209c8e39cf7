"""Prefix-heavy batches: document Q&A, and long system prompts that do not all fit the cache.

Two seeded workloads (same arguments, same file), chat requests at temperature 0:

* document Q&A (default): ``--docs`` (60) pseudo-text documents of about ``--doc-tokens``
  (400) tokens each (counted with the model's tokenizer), ``--questions`` (6) questions on
  each, all lines shuffled. Each user message is the document, then the question; the
  system prompt is short and common to every line.
* ``--system-prompts``: ``--prompts`` (12) different system prompts of about
  ``--prompt-tokens`` (2400) tokens each, ``--lines-per-prompt`` (20) short questions each,
  shuffled; together the prompts are larger than the KV cache (the report shows both).

Each variant runs in its own subprocess on the same engine settings (SmolLM2 with a
``--kv-cache-gib`` (1) GiB KV cache, ``VLLM_CPU_KVCACHE_SPACE``), reusing the runners of
``bench_batch.py``: ``run-batch`` (vLLM's ``python -m vllm.entrypoints.openai.run_batch``),
``vllm-batch-run`` (``python -m vllm_batch.cli run``) and ``server`` (``vllm-batch serve``;
upload -> create -> poll -> download timed once the engine is loaded). ``-no-prefix-cache``
and ``-no-grouping`` suffixes work as in ``bench_batch.py``.

Reported: whole-process wall (process start to exit) of the offline tools, the server's
processing time, speed-ups over run-batch (target >= 1.5x for ours), the prefix cache hit
rate (cached / prompt tokens, from the outputs' usage) and whether the texts are identical.

    python benchmarks/bench_prefix.py                       # SmolLM2, document Q&A
    python benchmarks/bench_prefix.py --system-prompts
    python benchmarks/bench_prefix.py --docs 6 --questions 2 --variants run-batch,server

Results go to ``benchmarks/results/prefix_<docs|system_prompts>_<model>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch import (
    CPU_ENV,
    RUNNERS,
    TEMPLATE_TOKENS,
    WORDS,
    Context,
    EngineConfig,
    Result,
    Variant,
    count_tokens,
    load_tokenizer,
    log,
    resolve_model,
    same_text,
)
from common import markdown_table, save

DEFAULT_VARIANTS = "run-batch,vllm-batch-run,server"
SHORT_SYSTEM = "You are a helpful assistant. Answer from the document, briefly."
QUESTIONS = (
    "What is the main topic of the document?",
    "Which place is mentioned first in the document?",
    "Summarise the document in one sentence.",
    "Which animals appear in the document?",
    "What happens in the morning, according to the document?",
    "Name three objects that the document mentions.",
    "Who is the document about?",
    "What food is mentioned in the document?",
)
ENDINGS = (".", ".", ".", ",", ";", "!", "?")


def pseudo_text(rng: random.Random, tokens: int, tokenizer: Any, opening: str) -> str:
    """Sentences of random words, grown until about ``tokens`` tokens (model tokenizer)."""
    parts = [opening]
    while count_tokens(tokenizer, [" ".join(parts)])[0] < tokens:
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        parts.append(" ".join(words).capitalize() + rng.choice(ENDINGS))
    return " ".join(parts)


def question(k: int, rng: random.Random) -> str:
    if k < len(QUESTIONS):
        return QUESTIONS[k]
    return f"What does the document say about the {rng.choice(WORDS)}?"


@dataclass(frozen=True)
class Line:
    """One request: its system prompt, user text, and which shared prefix it has."""

    prefix: int
    system: str
    user: str


def docs_lines(args: argparse.Namespace, tokenizer: Any) -> tuple[list[Line], list[int]]:
    """Document Q&A: document + question in the user message, short common system prompt."""
    rng = random.Random(args.seed)
    lines: list[Line] = []
    sizes = []
    for d in range(args.docs):
        doc = pseudo_text(rng, args.doc_tokens, tokenizer, f"Document {d}.")
        sizes.append(count_tokens(tokenizer, [doc])[0])
        for q in range(args.questions):
            user = f"{doc}\n\nQuestion: {question(q, rng)}"
            lines.append(Line(d, SHORT_SYSTEM, user))
    rng.shuffle(lines)
    return lines, sizes


def system_prompt_lines(args: argparse.Namespace, tokenizer: Any) -> tuple[list[Line], list[int]]:
    """Long, different system prompts, each followed by short user questions."""
    rng = random.Random(args.seed)
    lines: list[Line] = []
    sizes = []
    for p in range(args.prompts):
        opening = f"You are assistant number {p}. Follow these house rules and notes."
        prompt = pseudo_text(rng, args.prompt_tokens, tokenizer, opening)
        sizes.append(count_tokens(tokenizer, [prompt])[0])
        for j in range(args.lines_per_prompt):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20)))
            lines.append(Line(p, prompt, f"Question {j}: tell me about {words}."))
    rng.shuffle(lines)
    return lines, sizes


def write_lines(
    path: Path, lines: list[Line], name: str, max_tokens: int, tokenizer: Any, max_len: int
) -> dict[str, Any]:
    """Write the batch file (ids ``req-0..``); return its statistics."""
    texts = count_tokens(tokenizer, [f"{line.system}\n{line.user}" for line in lines])
    prompts = [t + TEMPLATE_TOKENS for t in texts]
    if max(prompts) + max_tokens > max_len:
        raise SystemExit(
            f"a request needs ~{max(prompts) + max_tokens} tokens > --max-model-len {max_len}"
        )
    with open(path, "w") as out:
        for i, line in enumerate(lines):
            body = {
                "model": name,
                "messages": [
                    {"role": "system", "content": line.system},
                    {"role": "user", "content": line.user},
                ],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            record = {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions"}
            out.write(json.dumps({**record, "body": body}) + "\n")
    return {
        "requests": len(lines),
        "prompt_tokens_estimate": sum(prompts),
        "file_bytes": path.stat().st_size,
    }


def kv_capacity_tokens(model: Path, gib: float, dtype: str) -> int | None:
    """Tokens a ``gib`` GiB KV cache holds for this model (K and V, every layer)."""
    try:
        config = json.loads((model / "config.json").read_text())
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        kv_heads = config.get("num_key_value_heads") or heads
        layers = config["num_hidden_layers"]
    except (OSError, KeyError, ValueError):
        return None
    size = {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 4)
    return int(gib * 2**30 // (2 * layers * kv_heads * head_dim * size))


def _num(value: float | None, digits: int = 1) -> str | None:
    return None if value is None else f"{value:,.{digits}f}"


def _ratio(ref: float | None, this: float | None) -> str | None:
    return f"{ref / this:.2f}x" if ref and this else None


def report(results: list[Result], n: int) -> tuple[str, dict[str, Any]]:
    """The results table and the speed-ups over run-batch."""
    by_name = {r.variant: r for r in results}
    ref = by_name.get("run-batch")
    reference = ref if ref and ref.answers else next((r for r in results if r.answers), None)
    rows = []
    speedups: dict[str, Any] = {}
    for r in results:
        offline = not r.variant.startswith("server")
        whole = r.exit_s if offline else None
        rb_whole = ref.exit_s if ref and ref.status == "ok" else None
        rb_proc = ref.processing_s if ref and ref.status == "ok" else None
        speedups[r.variant] = {
            "whole_process": rb_whole / whole if rb_whole and whole else None,
            "processing": rb_proc / r.processing_s if rb_proc and r.processing_s else None,
        }
        hit = (
            f"{100 * r.cached_tokens / r.prompt_tokens:.0f}%"
            if r.cached_tokens is not None and r.prompt_tokens
            else None
        )
        rows.append(
            [
                r.variant,
                r.status,
                f"{r.ok_lines}/{n}" if r.status in ("ok", "incomplete") else None,
                _num(whole),
                _num(r.startup_s),
                _num(r.processing_s, 2),
                _num(r.output_tokens / r.processing_s if r.processing_s else None, 0),
                hit,
                same_text(reference, r, n),
                _ratio(rb_whole, whole),
                _ratio(rb_proc, r.processing_s),
            ]
        )
    headers = [
        "variant",
        "status",
        "ok lines",
        "whole process s",
        "start-up s",
        "processing s",
        "out tok/s",
        "prefix cache hits",
        f"same text as {reference.variant if reference else '—'}",
        "speed-up vs run-batch (whole process)",
        "speed-up vs run-batch (processing)",
    ]
    parts = [markdown_table(headers, rows), ""]
    for r in results:
        note = f"; {r.note}" if r.note else ""
        load = f" (load average before: {r.load_avg_before:.1f})" if r.load_avg_before else ""
        parts.append(f"- **{r.variant}**{load}: processing = {r.processing_from or '—'}{note}")
    parts += [
        "",
        "Whole process: process start to exit (engine start-up and shutdown included), offline "
        "tools only. Server processing: upload start to download end, engine already loaded. "
        "Prefix cache hits: cached / prompt tokens from the outputs' usage. Target: ours >= "
        "1.5x run-batch.",
    ]
    return "\n".join(parts), speedups


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--model", default="smollm2", help="smollm2 [default], tiny, or a model directory")
    add("--name", help="served model name [from the model]")
    add("--system-prompts", action="store_true", help="the long-system-prompts workload")
    add("--docs", type=int, default=60, help="documents [%(default)s]")
    add("--doc-tokens", type=int, default=400, help="tokens per document [%(default)s]")
    add("--questions", type=int, default=6, help="questions per document [%(default)s]")
    add("--prompts", type=int, default=12, help="--system-prompts: prompts [%(default)s]")
    add("--prompt-tokens", type=int, default=2400, help="--system-prompts: tokens each [2400]")
    add("--lines-per-prompt", type=int, default=20, help="--system-prompts: lines each [20]")
    add("--max-tokens", type=int, default=32, help="max_tokens of every line [%(default)s]")
    add("--seed", type=int, default=0, help="same seed, same batch file [%(default)s]")
    add("--variants", default=DEFAULT_VARIANTS, help="comma-separated [%(default)s]")
    add("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE [%(default)s]")
    add("--max-num-seqs", type=int, default=64, help="engine, every variant [%(default)s]")
    add("--max-model-len", type=int, help="engine [1024; 4096 with --system-prompts]")
    add("--max-num-batched-tokens", type=int, default=4096, help="engine [%(default)s]")
    add("--block-size", type=int, help="engine, every variant [vLLM's: 128 on CPU]")
    add("--timeout", type=float, default=3600, help="seconds per variant [%(default)s]")
    add("--workdir", type=Path, help="keep the batch file, outputs and logs here")
    add("--results-name", help="[prefix_<docs|system_prompts>_<model>]")
    args = parser.parse_args(argv)
    if args.max_model_len is None:
        args.max_model_len = 4096 if args.system_prompts else 1024
    try:
        args.variants = [Variant.parse(v.strip()) for v in args.variants.split(",") if v.strip()]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    return args


def main() -> None:
    args = parse_args()
    model, name = resolve_model(args.model, args.name)
    model_key = args.model if args.model in ("tiny", "smollm2") else Path(args.model).name
    engine = EngineConfig(
        model=model,
        name=name,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
    )
    workload = "system_prompts" if args.system_prompts else "docs"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"bench-prefix-{workload}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model)
    if tokenizer is None:
        log("no tokenizer.json: token counts are estimates (1.4 tokens a word)")
    build = system_prompt_lines if args.system_prompts else docs_lines
    lines, prefix_sizes = build(args, tokenizer)
    batch_file = workdir / "batch.jsonl"
    stats = write_lines(batch_file, lines, name, args.max_tokens, tokenizer, engine.max_model_len)
    capacity = kv_capacity_tokens(model, args.kv_cache_gib, engine.dtype)
    stats |= {
        "shared_prefixes": len(prefix_sizes),
        "prefix_tokens_mean": round(sum(prefix_sizes) / len(prefix_sizes)),
        "prefix_tokens_total": sum(prefix_sizes),
        "kv_cache_tokens_estimate": capacity,
    }
    log(f"batch file {batch_file}: {stats}")
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in CPU_ENV.items()}}
    env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)
    env["PYTHONUNBUFFERED"] = "1"
    ctx = Context(
        engine=engine,
        workdir=workdir,
        input=batch_file,
        n=len(lines),
        expected_output_tokens=None,
        timeout=args.timeout,
        env=env,
    )
    results: list[Result] = []
    try:
        for variant in args.variants:
            log(f"=== {variant.name}")
            try:
                result = RUNNERS[variant.base](variant, ctx)
            except Exception as exc:
                log(f"{variant.name} failed: {type(exc).__name__}: {exc}")
                first_line = (str(exc).splitlines() or [""])[0]
                note = f"{type(exc).__name__}: {first_line} (logs: {workdir})"
                result = Result(variant.name, "failed", note)
            log(f"{variant.name}: {result.status} {result.note}".rstrip())
            results.append(result)
    finally:
        if args.workdir is None and all(r.status != "failed" for r in results):
            shutil.rmtree(workdir, ignore_errors=True)
    table, speedups = report(results, len(lines))
    if args.system_prompts:
        what = (
            f"{args.prompts} system prompts of ~{stats['prefix_tokens_mean']} tokens "
            f"({stats['prefix_tokens_total']} in all), {args.lines_per_prompt} short questions "
            "each, shuffled"
        )
    else:
        what = (
            f"{args.docs} documents of ~{stats['prefix_tokens_mean']} tokens "
            f"({stats['prefix_tokens_total']} in all), {args.questions} questions each, "
            "shuffled; user message = document then question; short common system prompt"
        )
    description = (
        f"Model `{name}` ({model}), {len(lines)} chat requests (seed {args.seed}): {what}; "
        f"max_tokens {args.max_tokens}, temperature 0. KV cache {args.kv_cache_gib} GiB "
        f"(~{capacity or '?'} tokens at {engine.dtype}). Engine for every variant: dtype "
        f"{engine.dtype}, enforce-eager, max-num-seqs {engine.max_num_seqs}, max-model-len "
        f"{engine.max_model_len}, max-num-batched-tokens {engine.max_num_batched_tokens}, "
        f"block size {engine.block_size or 'vLLM default (128 on CPU)'}, "
        "prefix caching on unless -no-prefix-cache, "
        + ", ".join(f"{k}={env[k]}" for k in CPU_ENV)
        + ". Each variant is its own subprocess."
    )
    command = "python benchmarks/bench_prefix.py " + shlex.join(sys.argv[1:])
    payload = {
        "workload": workload,
        "command": command,
        "arguments": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k != "variants"
        },
        "batch": stats,
        "engine": {**asdict(engine), "model": str(engine.model)},
        "env": {k: env[k] for k in CPU_ENV},
        "speedups_vs_run_batch": speedups,
        "results": [{k: v for k, v in asdict(r).items() if k != "answers"} for r in results],
    }
    results_name = args.results_name or f"prefix_{workload}_{model_key}"
    body = f"{description}\n\n{table}\n\nReproduce: `{command}`"
    print(save(results_name, payload, body).read_text())


if __name__ == "__main__":
    main()
