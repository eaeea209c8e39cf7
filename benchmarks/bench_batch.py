"""Real-engine throughput: raw vLLM vs ``vllm run-batch`` vs ``vllm-batch run`` vs the server.

One synthetic chat batch file (seeded: same arguments, same file) is run, on the same model
and identical engine settings, by each variant in its own subprocess:

* ``raw``: ``LLM.chat`` on all conversations at once (the ceiling);
* ``run-batch``: vLLM's own offline tool (``python -m vllm.entrypoints.openai.run_batch``);
* ``vllm-batch-run``: our offline drop-in (``python -m vllm_batch.cli run``);
* ``server``: ``vllm-batch serve`` with the in-process worker; the engine is loaded first,
  then upload -> create -> poll -> download is timed (the cold wall time is reported too);
* ``server-remote``: the same, with the remote engine (``--engine openai``) sending every
  line to one real vLLM OpenAI server on loopback (``python -m
  vllm.entrypoints.openai.api_server``, same engine settings; not in the default set).

Any variant can get a ``-no-prefix-cache`` suffix (vLLM prefix caching off), and
``server-no-grouping`` / ``vllm-batch-run-no-grouping`` turn off our prefix-aware
submission order (needs ``VLLM_BATCH_GROUP_PREFIXES``; skipped until it exists).
``--prefix-ab`` runs the server with and without them on a 50%-shared-prefix file.

    python benchmarks/bench_batch.py                      # tiny random model, all variants
    python benchmarks/bench_batch.py --model smollm2 -n 2000 --max-tokens 32-256
    python benchmarks/bench_batch.py --prefix-ab --model smollm2 -n 1000
    python benchmarks/bench_batch.py --pairs 3 --model smollm2 -n 200 --max-tokens 8-16

Every variant reports its whole-process wall (process start to exit, engine shutdown and
interpreter exit included) besides the cold wall. ``--pairs N`` runs ``vllm-batch-run`` and
``run-batch`` N times each, alternating which goes first, and compares whole-process walls
per pair (the machine's load drifts; a pair shares it).

Results go to ``benchmarks/results/<results-name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RssSampler,
    create_chat_batch,
    free_port,
    markdown_table,
    save,
    upload_batch_file,
)

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BASES = ("raw", "run-batch", "vllm-batch-run", "server", "server-remote")
DEFAULT_VARIANTS = "raw,run-batch,vllm-batch-run,server"
PREFIX_AB_VARIANTS = "server,server-no-prefix-cache,server-no-grouping"
PAIR_VARIANTS = ("vllm-batch-run", "run-batch")
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
TEMPLATE_TOKENS = 16  # chat-template overhead allowed for when checking max_model_len
# A log line printed once the engine is up and the batch is about to be read: start-up ends.
START_MARKERS = ("Reading batch from", "vLLM engine ready for")

_WORD_TEXT = """
    time person year way day thing man world life hand part child eye woman place work
    week case point company number group problem fact water river garden house window
    table morning evening story music city road market teacher doctor student friend
    family letter book paper light colour green blue small large old young quick quiet
    happy careful bright simple strong early late open close bring carry find make take
    give look watch write read build paint cook walk travel answer question explain
    describe remember bread apple stone bridge train ship island forest mountain valley
    village field flower tree bird horse dog cat fish summer winter spring autumn rain
    snow wind cloud sun moon star night kitchen school office shop street corner door
    wall floor chair lamp clock picture song game plan idea reason answer order price
    money bank card phone message news report paper letter word name voice sound colour
    shape size weight speed distance journey holiday party dinner lunch breakfast coffee
    tea milk sugar salt soup cake egg rice bean potato onion carrot lemon orange grape
"""
WORDS = tuple(_WORD_TEXT.split())


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- workload ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What goes into the synthetic batch file."""

    n: int
    prompt_words: tuple[int, int]
    max_tokens: tuple[int, int]
    shared_prefix_fraction: float
    prefix_tokens: int
    ignore_eos: bool
    seed: int


def int_range(text: str) -> tuple[int, int]:
    """``"16-128"``, ``"16:128"`` or ``"32"`` as an inclusive ``(low, high)``."""
    for sep in ("-", ":"):
        if sep in text:
            low, high = (int(part) for part in text.split(sep, 1))
            break
    else:
        low = high = int(text)
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"bad range {text!r}: need 0 < low <= high")
    return low, high


def load_tokenizer(model: Path) -> Any:
    """The model's fast tokenizer (``tokenizers`` only, no torch), or None."""
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(model / "tokenizer.json"))
    except Exception:
        return None


def count_tokens(tokenizer: Any, texts: list[str]) -> list[int]:
    """Token counts without special tokens; ~1.4 tokens a word without a tokenizer."""
    if tokenizer is None:
        return [round(len(text.split()) * 1.4) for text in texts]
    return [len(enc.ids) for enc in tokenizer.encode_batch(texts, add_special_tokens=False)]


def system_prompt(rng: random.Random, tokens: int, tokenizer: Any) -> str:
    """A long system prompt of about ``tokens`` tokens, shared by part of the requests."""
    words = ["You are a careful assistant.", "Background notes follow."]
    while count_tokens(tokenizer, [" ".join(words)])[0] < tokens:
        words.extend(rng.choice(WORDS) for _ in range(8))
    return " ".join(words)


def write_batch(
    path: Path, work: Workload, model_name: str, tokenizer: Any, max_model_len: int
) -> dict[str, Any]:
    """Write the batch file; return its statistics. Same workload and seed, same bytes."""
    rng = random.Random(work.seed)
    # Its own generator: the requests do not depend on the tokenizer.
    prefix = system_prompt(random.Random(f"prefix-{work.seed}"), work.prefix_tokens, tokenizer)
    requests: list[tuple[bool, str, int]] = []
    for i in range(work.n):
        shared = rng.random() < work.shared_prefix_fraction
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*work.prompt_words)))
        requests.append((shared, f"Request {i}: {words}", rng.randint(*work.max_tokens)))
    prefix_len = count_tokens(tokenizer, [prefix])[0]
    user_lens = count_tokens(tokenizer, [text for _, text, _ in requests])
    prompt_lens = [
        used + TEMPLATE_TOKENS + (prefix_len if shared else 0)
        for used, (shared, _, _) in zip(user_lens, requests, strict=True)
    ]
    longest = max(p + k for p, (_, _, k) in zip(prompt_lens, requests, strict=True))
    if longest > max_model_len:
        raise SystemExit(
            f"a request needs ~{longest} tokens > --max-model-len {max_model_len}: "
            "lower --prompt-words / --max-tokens / --prefix-tokens or raise --max-model-len"
        )
    with open(path, "w") as out:
        for i, (shared, text, max_tokens) in enumerate(requests):
            messages = [{"role": "system", "content": prefix}] if shared else []
            messages.append({"role": "user", "content": text})
            body: dict[str, Any] = {
                "model": model_name,
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            if work.ignore_eos:
                body["ignore_eos"] = True
            line = {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions"}
            out.write(json.dumps({**line, "body": body}) + "\n")
    return {
        "requests": work.n,
        "shared_prefix_requests": sum(s for s, _, _ in requests),
        "prefix_tokens": prefix_len,
        "prompt_tokens_estimate": sum(prompt_lens),
        "max_tokens_sum": sum(k for _, _, k in requests),
        "file_bytes": path.stat().st_size,
    }


# --- engine settings and variants -------------------------------------------------------


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings shared by every variant."""

    model: Path
    name: str
    max_num_seqs: int
    max_model_len: int
    max_num_batched_tokens: int
    dtype: str = "float32"
    block_size: int | None = None
    """KV-cache block tokens for every variant (None: vLLM's default, 128 on CPU)."""


@dataclass(frozen=True)
class Variant:
    """A variant name parsed into its base and switches."""

    name: str
    base: str
    prefix_caching: bool = True
    grouping: bool = True

    @classmethod
    def parse(cls, name: str) -> Variant:
        base, caching, grouping = name, True, True
        if base.endswith("-no-prefix-cache"):
            base, caching = base.removesuffix("-no-prefix-cache"), False
        if base.endswith("-no-grouping"):
            base, grouping = base.removesuffix("-no-grouping"), False
        if base not in BASES or (not grouping and base not in ("server", "vllm-batch-run")):
            raise argparse.ArgumentTypeError(
                f"unknown variant {name!r}: one of {', '.join(BASES)}, optionally with "
                "-no-prefix-cache; server and vllm-batch-run also -no-grouping"
            )
        return cls(name, base, caching, grouping)


@dataclass
class Result:
    """One variant's measurements (times in seconds, wall clock)."""

    variant: str
    status: str = "ok"  # ok | incomplete | failed | skipped
    note: str = ""
    wall_s: float | None = None  # cold: process start until all results are available
    exit_s: float | None = None  # process start until it exited (engine shutdown included)
    startup_s: float | None = None
    processing_s: float | None = None
    processing_from: str = ""
    lines: int = 0
    ok_lines: int = 0
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int | None = None
    peak_rss_mb: int | None = None
    peak_pss_mb: int | None = None
    load_avg_before: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    same_text: str | None = None  # answers identical to the reference variant's
    answers: dict[str, str] = field(default_factory=dict, repr=False)  # custom_id -> digest


@dataclass
class Context:
    """Everything a variant runner needs."""

    engine: EngineConfig
    workdir: Path
    input: Path
    n: int
    expected_output_tokens: int | None
    timeout: float
    env: dict[str, str]


@dataclass
class OurArgs:
    """How our CLI gets the engine settings: flags it has, ``VLLM_BATCH_*`` env for the rest."""

    flags: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    via_env: list[str] = field(default_factory=list)

    @property
    def note(self) -> str:
        if not self.via_env:
            return ""
        return f"set via VLLM_BATCH_* env (no such flag): {' '.join(self.via_env)}"


def our_cli_help(command: str) -> str | None:
    """``vllm-batch <command> --help``, or None if the command does not exist (yet)."""
    proc = subprocess.run(
        [PY, "-m", "vllm_batch.cli", command, "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "TERMINAL_WIDTH": "250"},
        check=False,
    )
    return proc.stdout if proc.returncode == 0 else None


def our_engine_args(help_text: str, engine: EngineConfig, variant: Variant) -> OurArgs:
    """The engine settings for ``vllm-batch serve``/``run``, as flags where it has them."""

    def has(flag: str) -> bool:
        return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None

    args = OurArgs()
    for flag, var, value in (
        ("--max-num-seqs", "MAX_NUM_SEQS", str(engine.max_num_seqs)),
        ("--max-model-len", "MAX_MODEL_LEN", str(engine.max_model_len)),
        ("--max-num-batched-tokens", "MAX_NUM_BATCHED_TOKENS", str(engine.max_num_batched_tokens)),
        ("--dtype", "DTYPE", engine.dtype),
        ("--block-size", "BLOCK_SIZE", str(engine.block_size) if engine.block_size else None),
    ):
        if value is None:
            continue
        if has(flag):
            args.flags += [flag, value]
        else:
            args.env[f"VLLM_BATCH_{var}"] = value
            args.via_env.append(flag)
    for on, var, enabled in (
        ("--enforce-eager", "ENFORCE_EAGER", True),
        ("--enable-prefix-caching", "ENABLE_PREFIX_CACHING", variant.prefix_caching),
    ):
        switch = on if enabled else on.replace("--", "--no-", 1)
        if has(switch):
            args.flags.append(switch)
        else:
            args.env[f"VLLM_BATCH_{var}"] = str(enabled).lower()
            args.via_env.append(switch)
    if not variant.grouping:
        args.env["VLLM_BATCH_GROUP_PREFIXES"] = "false"
    return args


def grouping_switch_exists() -> bool:
    """Whether our settings have the switch that turns prefix-aware grouping off."""
    from vllm_batch.config import Settings

    return "group_prefixes" in Settings.model_fields


# --- subprocesses -----------------------------------------------------------------------


class Child:
    """A subprocess in its own session: output logged with arrival times, tree RSS sampled."""

    def __init__(
        self, cmd: list[str], env: dict[str, str], log_path: Path, markers: tuple[str, ...] = ()
    ) -> None:
        self.markers = markers
        self.marks: dict[str, float] = {}
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - closed in wait()
        self._log.write((" ".join(cmd) + "\n\n").encode())
        self.started = time.time()
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        self.ended: float | None = None
        self.sampler = RssSampler(self.proc.pid, pss_interval=1.0).__enter__()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.time()
            self._log.write(line)
            text = line.decode(errors="replace")
            for marker in self.markers:
                if marker not in self.marks and marker in text:
                    self.marks[marker] = now

    @property
    def first_mark(self) -> tuple[str, float] | None:
        """The earliest start marker seen, if any."""
        return min(self.marks.items(), key=lambda item: item[1]) if self.marks else None

    def wait(self, timeout: float) -> int:
        """Wait for the exit (stopping it on timeout); return the exit code."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        finally:
            self._finish()
        return self.proc.returncode

    def stop(self) -> None:
        """SIGTERM the process (it stops its children), SIGKILL its group after 60 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._finish()

    def _finish(self) -> None:
        if self.ended is not None:
            return
        self.ended = time.time()
        with contextlib.suppress(ProcessLookupError):  # strays left in our process group
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.sampler.__exit__(None, None, None)
        self._reader.join(10)
        self._log.close()

    def measure(self, result: Result) -> None:
        """Fill in process lifetime and peak memory."""
        assert self.ended is not None
        result.exit_s = self.ended - self.started
        result.peak_rss_mb = round(self.sampler.peak / 2**20)
        result.peak_pss_mb = round(self.sampler.peak_pss / 2**20)

    def failure(self, what: str) -> RuntimeError:
        """An error naming the log and its likeliest cause; the log's tail is printed."""
        if not self._log.closed:
            self._log.flush()
        lines = [line.strip() for line in self.log_path.read_text(errors="replace").splitlines()]
        log("\n".join(lines[-15:]))
        causes = [
            line for line in lines if re.search(r"(Error|Exception)\b|\b(error|exception)\b", line)
        ]
        cause = f": {causes[-1][:300]}" if causes else ""
        return RuntimeError(f"{what}, see {self.log_path.name}{cause}")


def digest(text: str | None) -> str:
    """A short fingerprint of an answer, to compare variants without keeping the texts."""
    return hashlib.sha1((text or "").encode()).hexdigest()[:16]


def read_outputs(path: Path, n: int) -> dict[str, Any]:
    """Count lines, successes and tokens of a batch output file."""
    stats: dict[str, Any] = {"lines": 0, "ok_lines": 0, "output_tokens": 0, "prompt_tokens": 0}
    cached: int | None = None
    ids: set[str] = set()
    answers: dict[str, str] = {}
    first_error: Any = None
    with open(path, "rb") as handle:
        for raw in handle:
            if not raw.strip():
                continue
            stats["lines"] += 1
            record = json.loads(raw)
            ids.add(record.get("custom_id"))
            response = record.get("response") or {}
            body = response.get("body") or {}
            if response.get("status_code") == 200 and not record.get("error"):
                stats["ok_lines"] += 1
            elif first_error is None:
                first_error = record.get("error") or body.get("error") or response
            choices = body.get("choices") or [{}]
            answers[record.get("custom_id")] = digest(
                (choices[0].get("message") or {}).get("content")
            )
            usage = body.get("usage") or {}
            stats["output_tokens"] += usage.get("completion_tokens") or 0
            stats["prompt_tokens"] += usage.get("prompt_tokens") or 0
            details = usage.get("prompt_tokens_details") or {}
            if details.get("cached_tokens") is not None:
                cached = (cached or 0) + details["cached_tokens"]
    stats["cached_tokens"] = cached
    stats["answers"] = answers
    stats["missing_ids"] = n - len(ids & {f"req-{i}" for i in range(n)})
    stats["first_error"] = first_error
    return stats


def check(result: Result, ctx: Context, missing_ids: int = 0, first_error: Any = None) -> Result:
    """Mark the result incomplete unless every request came back with status 200."""
    problems = []
    if result.lines != ctx.n or missing_ids:
        problems.append(f"{result.lines} lines for {ctx.n} requests ({missing_ids} ids missing)")
    if result.ok_lines != result.lines:
        problems.append(f"{result.lines - result.ok_lines} errors, first: {first_error}")
    if ctx.expected_output_tokens is not None and result.output_tokens != (
        ctx.expected_output_tokens
    ):
        problems.append(
            f"{result.output_tokens} output tokens, expected {ctx.expected_output_tokens}"
        )
    if problems:
        result.status = "incomplete"
        result.note = "; ".join([result.note, *problems]).strip("; ")
    return result


def from_output_file(result: Result, ctx: Context, output: Path) -> Result:
    stats = read_outputs(output, ctx.n)
    missing, first_error = stats.pop("missing_ids"), stats.pop("first_error")
    for key, value in stats.items():
        setattr(result, key, value)
    return check(result, ctx, missing, first_error)


def run_to_end(child: Child, result: Result, ctx: Context, output: Path) -> None:
    """Wait for ``child``, record its memory, and fail unless it exited 0 with ``output``."""
    try:
        code = child.wait(ctx.timeout)
    finally:
        child.stop()
    child.measure(result)
    if code != 0 or not output.exists():
        raise child.failure(f"exit code {code}")


def run_offline(
    variant: Variant, ctx: Context, cmd: list[str], env: dict[str, str], output: Path
) -> Result:
    """Run an offline tool to completion; start-up ends at its first start-marker log line."""
    result = Result(variant.name, load_avg_before=os.getloadavg()[0])
    log(f"{variant.name}: {' '.join(cmd)}")
    child = Child(cmd, env, ctx.workdir / f"{variant.name}.log", START_MARKERS)
    run_to_end(child, result, ctx, output)
    # The output file is written last: its mtime ends processing (engine shutdown excluded).
    done = output.stat().st_mtime
    result.wall_s = done - child.started
    mark = child.first_mark
    if mark is not None:
        result.startup_s = mark[1] - child.started
        result.processing_s = done - mark[1]
        result.processing_from = f"log line {mark[0]!r} to output file mtime"
    else:
        result.processing_from = "no start-up marker in the log: wall time only"
    return from_output_file(result, ctx, output)


# --- variants ---------------------------------------------------------------------------


def run_raw(variant: Variant, ctx: Context) -> Result:
    """``LLM.chat`` in a child process (this script with ``--raw-child``)."""
    config = ctx.workdir / f"{variant.name}.config.json"
    out = ctx.workdir / f"{variant.name}.result.json"
    engine = ctx.engine
    config.write_text(
        json.dumps(
            {
                "input": str(ctx.input),
                "output": str(out),
                "model": str(engine.model),
                "dtype": engine.dtype,
                "max_num_seqs": engine.max_num_seqs,
                "max_model_len": engine.max_model_len,
                "max_num_batched_tokens": engine.max_num_batched_tokens,
                "enable_prefix_caching": variant.prefix_caching,
                "block_size": engine.block_size,
            }
        )
    )
    result = Result(variant.name, load_avg_before=os.getloadavg()[0])
    child = Child(
        [PY, str(Path(__file__).resolve()), "--raw-child", str(config)],
        ctx.env,
        ctx.workdir / f"{variant.name}.log",
    )
    run_to_end(child, result, ctx, out)
    raw = json.loads(out.read_text())
    result.startup_s = raw["ready_at"] - child.started
    result.wall_s = raw["done_at"] - child.started
    result.processing_s = raw["done_at"] - raw["ready_at"]
    result.processing_from = "time around llm.chat"
    for key in ("lines", "ok_lines", "output_tokens", "prompt_tokens", "cached_tokens", "answers"):
        setattr(result, key, raw[key])
    return check(result, ctx)


def raw_child(config_path: Path) -> None:
    """The ``raw`` variant's process: load the file, start ``LLM``, time ``llm.chat``."""
    config = json.loads(config_path.read_text())
    from vllm import LLM, SamplingParams

    ids, conversations, params = [], [], []
    with open(config["input"]) as handle:
        for line in handle:
            request = json.loads(line)
            ids.append(request["custom_id"])
            body = request["body"]
            conversations.append(body["messages"])
            params.append(
                SamplingParams(
                    max_tokens=body["max_tokens"],
                    temperature=body.get("temperature", 1.0),
                    ignore_eos=body.get("ignore_eos", False),
                )
            )
    llm = LLM(
        model=config["model"],
        dtype=config["dtype"],
        enforce_eager=True,
        max_num_seqs=config["max_num_seqs"],
        max_model_len=config["max_model_len"],
        max_num_batched_tokens=config["max_num_batched_tokens"],
        enable_prefix_caching=config["enable_prefix_caching"],
        block_size=config["block_size"],
    )
    ready_at = time.time()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    done_at = time.time()
    finished = [o for o in outputs if o.finished and o.outputs]
    result = {
        "ready_at": ready_at,
        "done_at": done_at,
        "lines": len(outputs),
        "ok_lines": len(finished),
        "output_tokens": sum(len(o.outputs[0].token_ids) for o in finished),
        "prompt_tokens": sum(len(o.prompt_token_ids or ()) for o in outputs),
        "cached_tokens": sum(o.num_cached_tokens or 0 for o in outputs),
        "answers": {
            custom_id: digest(o.outputs[0].text if o.outputs else None)
            for custom_id, o in zip(ids, outputs, strict=True)
        },
    }
    Path(config["output"]).write_text(json.dumps(result))


def run_run_batch(variant: Variant, ctx: Context) -> Result:
    """vLLM's ``run-batch`` (the ``vllm`` console script fails with this wheel)."""
    engine = ctx.engine
    output = ctx.workdir / f"{variant.name}.out.jsonl"
    cmd = [PY, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(ctx.input)]
    cmd += ["-o", str(output), "--model", str(engine.model)]
    cmd += ["--served-model-name", engine.name, "--dtype", engine.dtype, "--enforce-eager"]
    cmd += ["--max-num-seqs", str(engine.max_num_seqs)]
    cmd += ["--max-model-len", str(engine.max_model_len)]
    cmd += ["--max-num-batched-tokens", str(engine.max_num_batched_tokens)]
    if engine.block_size:
        cmd += ["--block-size", str(engine.block_size)]
    cmd += ["--enable-prompt-tokens-details", "--disable-log-stats"]
    cmd.append(
        "--enable-prefix-caching" if variant.prefix_caching else "--no-enable-prefix-caching"
    )
    return run_offline(variant, ctx, cmd, ctx.env, output)


def run_vllm_batch_run(variant: Variant, ctx: Context) -> Result:
    """Our offline drop-in, ``vllm-batch run``."""
    help_text = our_cli_help("run")
    if help_text is None:
        return Result(variant.name, "skipped", "`vllm-batch run` does not exist yet")
    if not variant.grouping and not grouping_switch_exists():
        return Result(variant.name, "skipped", "no VLLM_BATCH_GROUP_PREFIXES setting yet")
    engine = ctx.engine
    output = ctx.workdir / f"{variant.name}.out.jsonl"
    ours = our_engine_args(help_text, engine, variant)
    cmd = [PY, "-m", "vllm_batch.cli", "run", "-i", str(ctx.input), "-o", str(output)]
    cmd += ["--model", f"{engine.name}={engine.model}", *ours.flags]
    result = run_offline(variant, ctx, cmd, {**ctx.env, **ours.env}, output)
    result.note = "; ".join(filter(None, [ours.note, result.note]))
    return result


def wait_ready(child: Child, url: str, model: str, timeout: float) -> float:
    """Poll ``/ready`` until the worker has loaded ``model``; return when that was seen."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if child.proc.poll() is not None:
            raise child.failure(f"server exited ({child.proc.returncode})")
        with contextlib.suppress(httpx.HTTPError, ValueError):
            worker = httpx.get(f"{url}/ready", timeout=2).json().get("worker", {})
            if worker.get("loaded_model") == model:
                return time.time()
            if worker.get("engine") == "failed":
                raise child.failure("engine failed to start")
        time.sleep(0.25)
    raise child.failure(f"server not ready after {timeout:.0f} s")


def upstream_command(engine: EngineConfig, variant: Variant, port: int) -> list[str]:
    """A vLLM OpenAI server with the engine settings every variant gets."""
    cmd = [PY, "-m", "vllm.entrypoints.openai.api_server", "--model", str(engine.model)]
    cmd += ["--served-model-name", engine.name, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--dtype", engine.dtype, "--enforce-eager", "--max-num-seqs", str(engine.max_num_seqs)]
    cmd += ["--max-model-len", str(engine.max_model_len)]
    cmd += ["--max-num-batched-tokens", str(engine.max_num_batched_tokens)]
    caching = "--enable-prefix-caching" if variant.prefix_caching else "--no-enable-prefix-caching"
    return [*cmd, caching, "--enable-prompt-tokens-details", "--disable-uvicorn-access-log"]


def start_upstream(variant: Variant, ctx: Context) -> tuple[Child, str]:
    """The ``server-remote`` variant's vLLM server, once it lists the model."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    cmd = upstream_command(ctx.engine, variant, port)
    log(f"{variant.name} upstream: {' '.join(cmd)}")
    child = Child(cmd, ctx.env, ctx.workdir / f"{variant.name}.upstream.log")
    deadline = time.time() + ctx.timeout
    while time.time() < deadline:
        if child.proc.poll() is not None:
            raise child.failure(f"upstream exited ({child.proc.returncode})")
        with contextlib.suppress(httpx.HTTPError, ValueError):
            models = httpx.get(f"{url}/models", timeout=2).json()["data"]
            if any(m["id"] == ctx.engine.name for m in models):
                return child, url
        time.sleep(0.25)
    child.stop()
    raise child.failure("upstream not ready")


async def replay(batch_file: Path, url: str, concurrency: int) -> float:
    """Seconds to send every line's body straight to ``url`` (``concurrency`` at once)."""
    lines = [json.loads(raw) for raw in batch_file.read_text().splitlines() if raw.strip()]
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def one(line: dict[str, Any]) -> None:
            async with slots:
                response = await client.post(f"{url}{line['url'][3:]}", json=line["body"])
                response.raise_for_status()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(line) for line in lines))
        return time.perf_counter() - t0


def run_server(variant: Variant, ctx: Context) -> Result:
    """``vllm-batch serve`` + in-process worker (``server-remote``: + one vLLM upstream);
    upload -> completed -> download, warm."""
    if not variant.grouping and not grouping_switch_exists():
        return Result(variant.name, "skipped", "no VLLM_BATCH_GROUP_PREFIXES setting yet")
    engine = ctx.engine
    port = free_port()
    data_dir = ctx.workdir / f"{variant.name}.data"
    data_dir.mkdir()
    output = ctx.workdir / f"{variant.name}.out.jsonl"
    ours = our_engine_args(our_cli_help("serve") or "", engine, variant)
    env = {
        **ctx.env,
        **ours.env,
        "VLLM_BATCH_MAX_REQUESTS_PER_BATCH": str(max(50_000, ctx.n)),
        "VLLM_BATCH_MAX_UPLOAD_BYTES": str(max(200 * 2**20, 2 * ctx.input.stat().st_size)),
    }
    cmd = [PY, "-m", "vllm_batch.cli", "serve", "--port", str(port), "--data-dir", str(data_dir)]
    upstream: Child | None = None
    started = time.time()
    if variant.base == "server-remote":
        upstream, upstream_url = start_upstream(variant, ctx)
        # The in-process window (2 x max-num-seqs) in flight; a dedicated upstream: no
        # latency back-off (the upstream's own queue keeps it full).
        cmd += ["--engine", "openai", "--engine-url", upstream_url, "--model", engine.name]
        cmd += ["--engine-max-concurrency", str(2 * engine.max_num_seqs)]
        env["VLLM_BATCH_ENGINE_LATENCY_FACTOR"] = "0"
    else:
        cmd += ["--model", f"{engine.name}={engine.model}", *ours.flags]
    result = Result(variant.name, note=ours.note, load_avg_before=os.getloadavg()[0])
    log(f"{variant.name}: {' '.join(cmd)}")
    url = f"http://127.0.0.1:{port}"
    child = Child(cmd, env, ctx.workdir / f"{variant.name}.log")
    try:
        ready = wait_ready(child, url, engine.name, ctx.timeout)
        result.startup_s = ready - started
        log(f"{variant.name}: engine loaded after {result.startup_s:.1f} s; running the batch")
        with httpx.Client(base_url=f"{url}/v1", timeout=600) as client:
            t0 = time.time()
            file_id = upload_batch_file(client, ctx.input)
            t1 = time.time()
            info = create_chat_batch(client, file_id)
            while info["status"] not in ("completed", "failed", "cancelled", "expired"):
                if child.proc.poll() is not None:
                    raise child.failure("server exited")
                if time.time() - t0 > ctx.timeout:
                    raise RuntimeError(f"batch not done after {ctx.timeout:.0f} s: {info}")
                time.sleep(0.25)
                info = client.get(f"/batches/{info['id']}").json()
            t2 = time.time()
            if info["status"] != "completed" or not info.get("output_file_id"):
                raise RuntimeError(f"batch ended {info['status']}: {info.get('errors')}")
            with (
                client.stream("GET", f"/files/{info['output_file_id']}/content") as stream,
                open(output, "wb") as out,
            ):
                stream.raise_for_status()
                for chunk in stream.iter_bytes():
                    out.write(chunk)
            t3 = time.time()
        result.wall_s = t3 - started
        result.processing_s = t3 - t0
        result.processing_from = "upload start to download end, engine loaded"
        result.extra = {
            "upload_s": round(t1 - t0, 3),
            "create_to_completed_s": round(t2 - t1, 3),
            "download_s": round(t3 - t2, 3),
            "request_counts": info.get("request_counts"),
            "error_file_id": info.get("error_file_id"),
        }
        if upstream is not None:  # the same lines straight to the upstream, same concurrency
            child.stop()
            direct = asyncio.run(replay(ctx.input, upstream_url, 2 * engine.max_num_seqs))
            result.extra["direct_to_upstream_s"] = round(direct, 2)
            sent = f"the same requests sent straight to the upstream: {direct:.1f} s"
            result.note = "; ".join(filter(None, [result.note, sent]))
    finally:
        child.stop()
        if upstream is not None:
            upstream.stop()
    child.measure(result)
    if upstream is not None:  # one deployment: the server and its upstream
        result.exit_s = (child.ended or time.time()) - started
        result.peak_rss_mb = (result.peak_rss_mb or 0) + round(upstream.sampler.peak / 2**20)
        result.peak_pss_mb = (result.peak_pss_mb or 0) + round(upstream.sampler.peak_pss / 2**20)
        result.note = "; ".join(filter(None, [result.note, "start-up, walls, RSS: + upstream"]))
    return from_output_file(result, ctx, output)


RUNNERS = {
    "raw": run_raw,
    "run-batch": run_run_batch,
    "vllm-batch-run": run_vllm_batch_run,
    "server": run_server,
    "server-remote": run_server,
}


# --- model, report, main ----------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm-batch"


def resolve_model(model: str | None, name: str | None) -> tuple[Path, str]:
    """The model directory (building the tiny model or SmolLM2 if asked) and served name."""
    cli = [PY, "-m", "vllm_batch.cli", "models"]
    if model in (None, "tiny"):
        path = cache_dir() / "tiny-llama"
        subprocess.run([*cli, "make-test-model", str(path)], cwd=ROOT, check=True)
        return path, name or "tiny-llama"
    if model == "smollm2":
        path = ROOT / "models" / "SmolLM2-135M-Instruct"
        subprocess.run([*cli, "prepare", "smollm2", "--out", str(path)], cwd=ROOT, check=True)
        return path, name or "SmolLM2-135M-Instruct"
    path = Path(model).resolve()
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {model}: no config.json there (or use 'tiny' / 'smollm2')")
    return path, name or path.name


def _num(value: float | None, digits: int = 1) -> str | None:
    return None if value is None else f"{value:,.{digits}f}"


def _speeds(ref: Result | None, this: Result) -> str | None:
    """Speed of ``this`` relative to ``ref`` (ref time / this time, >1 is faster): proc / cold."""
    if ref is None or ref.status != "ok" or this.status not in ("ok", "incomplete"):
        return None
    cells = []
    for attr in ("processing_s", "wall_s"):
        ref_t, this_t = getattr(ref, attr), getattr(this, attr)
        cells.append(f"{ref_t / this_t:.2f}x" if ref_t and this_t else "—")
    return " / ".join(cells)


def same_text(ref: Result | None, this: Result, n: int) -> str | None:
    """How many answers ``this`` shares with ``ref`` (greedy decoding: should be all)."""
    if ref is None or not this.answers:
        return None
    same = sum(ref.answers.get(key) == value for key, value in this.answers.items())
    this.same_text = f"{same}/{n}"
    return this.same_text


def ok_times(*results: Result) -> bool:
    """Whether all these results are complete and have a processing time."""
    return all(r.status == "ok" and r.processing_s for r in results)


def report(results: list[Result], n: int) -> str:
    """The results table, a per-variant note list and any prefix A/B gains."""
    by_name = {r.variant: r for r in results}
    raw, run_batch = by_name.get("raw"), by_name.get("run-batch")
    answered = [r for r in results if r.answers]
    reference = run_batch if run_batch and run_batch.answers else next(iter(answered), None)
    rows = []
    for r in results:
        measured = r.status in ("ok", "incomplete")
        proc = r.processing_s
        cached = (
            f"{100 * r.cached_tokens / r.prompt_tokens:.0f}%"
            if r.cached_tokens is not None and r.prompt_tokens
            else None
        )
        rows.append(
            [
                r.variant,
                r.status,
                f"{r.ok_lines}/{n}" if measured else None,
                _num(r.wall_s),
                _num(r.exit_s),
                _num(r.startup_s),
                _num(proc, 2),
                _num(n / proc if proc else None),
                _num(r.output_tokens / proc if proc and r.output_tokens else None, 0),
                cached,
                r.peak_rss_mb,
                r.peak_pss_mb,
                same_text(reference, r, n),
                _speeds(raw, r),
                _speeds(run_batch, r),
            ]
        )
    headers = [
        "variant",
        "status",
        "ok lines",
        "cold wall s",
        "process wall s",
        "start-up s",
        "processing s",
        "req/s",
        "out tok/s",
        "cached prompt",
        "peak RSS MB",
        "peak PSS MB",
        f"same text as {reference.variant if reference else '—'}",
        "speed vs raw (proc / cold)",
        "speed vs run-batch (proc / cold)",
    ]
    parts = [markdown_table(headers, rows), ""]
    for r in results:
        how = r.processing_from or "—"
        load = f" (load average before: {r.load_avg_before:.1f})" if r.load_avg_before else ""
        note = f"; {r.note}" if r.note else ""
        parts.append(f"- **{r.variant}**{load}: processing = {how}{note}")
    gains = []
    switches = (("-no-prefix-cache", "vLLM prefix caching"), ("-no-grouping", "our grouping"))
    for r in results:
        for suffix, what in switches:
            base = by_name.get(r.variant.removesuffix(suffix))
            if not r.variant.endswith(suffix) or base is None or not ok_times(base, r):
                continue
            assert base.processing_s and r.processing_s
            gains.append(
                f"- {base.variant}: {what} speeds processing up "
                f"{r.processing_s / base.processing_s:.2f}x "
                f"({r.processing_s:.2f} s without, {base.processing_s:.2f} s with)"
            )
    if gains:
        parts += ["", "Prefix A/B:", *gains]
    return "\n".join(parts)


def run_variant(variant: Variant, ctx: Context) -> Result:
    """One variant, its failure turned into a ``failed`` result."""
    log(f"=== {variant.name}")
    try:
        result = RUNNERS[variant.base](variant, ctx)
    except Exception as exc:
        log(f"{variant.name} failed: {type(exc).__name__}: {exc}")
        first_line = (str(exc).splitlines() or [""])[0]
        note = f"{type(exc).__name__}: {first_line} (logs: {ctx.workdir})"
        result = Result(variant.name, "failed", note)
    log(f"{variant.name}: {result.status} {result.note}".rstrip())
    return result


def run_pairs(variants: list[Variant], ctx: Context, count: int) -> list[dict[str, Any]]:
    """``count`` pairs of runs, the first variant going first in even pairs, second in odd."""
    pairs = []
    for index in range(count):
        workdir = ctx.workdir / f"pair-{index + 1}"
        workdir.mkdir(exist_ok=True)
        order = variants if index % 2 == 0 else variants[::-1]
        runs = {v.name: run_variant(v, replace(ctx, workdir=workdir)) for v in order}
        pairs.append(
            {"pair": index + 1, "order": [v.name for v in order], "runs": list(runs.values())}
        )
    return pairs


def _ratio(ref: Result, this: Result) -> float | None:
    """``ref``'s whole-process wall over ``this``'s (>1: ``this`` is faster)."""
    if ref.status != "ok" or this.status != "ok" or not ref.exit_s or not this.exit_s:
        return None
    return ref.exit_s / this.exit_s


def pairs_summary(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-variant medians and the per-pair ratios (run-batch wall / vllm-batch-run wall)."""
    ours, theirs = PAIR_VARIANTS
    walls: dict[str, list[float]] = {ours: [], theirs: []}
    ratios = []
    for pair in pairs:
        by_name = {r.variant: r for r in pair["runs"]}
        for name, values in walls.items():
            if by_name[name].status == "ok" and by_name[name].exit_s:
                values.append(by_name[name].exit_s)
        ratio = _ratio(by_name[theirs], by_name[ours])
        if ratio is not None:
            ratios.append(ratio)
    return {
        "median_process_wall_s": {
            name: round(statistics.median(v), 2) if v else None for name, v in walls.items()
        },
        "ratios": [round(r, 3) for r in ratios],
        "median_ratio": round(statistics.median(ratios), 3) if ratios else None,
        "ratio_means": f"{theirs} process wall / {ours} process wall (>1: {ours} is faster)",
    }


def pairs_report(pairs: list[dict[str, Any]], n: int) -> str:
    """One row per run, then the medians and the per-pair ratios."""
    ours, theirs = PAIR_VARIANTS
    reference = next(
        (r for pair in pairs for r in pair["runs"] if r.variant == theirs and r.answers), None
    )
    rows = []
    for pair in pairs:
        by_name = {r.variant: r for r in pair["runs"]}
        ratio = _ratio(by_name[theirs], by_name[ours])
        for position, name in enumerate(pair["order"]):
            r = by_name[name]
            rows.append(
                [
                    pair["pair"],
                    position + 1,
                    r.variant,
                    r.status,
                    _num(r.exit_s, 2),
                    _num(r.wall_s, 2),
                    _num(r.startup_s, 2),
                    _num(r.processing_s, 2),
                    _num(r.load_avg_before),
                    same_text(reference, r, n),
                    f"{ratio:.3f}x" if ratio is not None and name == ours else None,
                ]
            )
    headers = [
        "pair",
        "ran",
        "variant",
        "status",
        "process wall s",
        "cold wall s",
        "start-up s",
        "processing s",
        "load avg before",
        f"same text as first {theirs}",
        f"{theirs} / {ours} (process wall)",
    ]
    summary = pairs_summary(pairs)
    medians = summary["median_process_wall_s"]
    ratios = ", ".join(f"{r:.3f}x" for r in summary["ratios"]) or "—"
    lines = [
        markdown_table(headers, rows),
        "",
        f"- median process wall: {ours} {medians[ours]} s, {theirs} {medians[theirs]} s",
        f"- per-pair ratio {theirs} / {ours}: {ratios}; median {summary['median_ratio']}x "
        f"(>1: {ours} exits sooner)",
    ]
    notes = [
        f"- {r.variant} (pair {pair['pair']}): {r.note}"
        for pair in pairs
        for r in pair["runs"]
        if r.note
    ]
    return "\n".join(lines + notes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--model", help="tiny (default: random 2-layer Llama), smollm2, or a model directory")
    add("--name", help="served model name [from the model]")
    add("-n", type=int, default=1000, help="requests in the batch [%(default)s]")
    add("--prompt-words", type=int_range, default="10-200", help="user words, LOW-HIGH [10-200]")
    add("--max-tokens", type=int_range, default="16-128", help="max_tokens, LOW-HIGH [16-128]")
    add(
        "--shared-prefix-fraction",
        type=float,
        default=0.5,
        help="part of the requests starting with the long system prompt [%(default)s]",
    )
    add("--prefix-tokens", type=int, default=300, help="system prompt tokens [%(default)s]")
    add(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="every request generates exactly max_tokens [on for the tiny model only]",
    )
    add("--seed", type=int, default=0, help="same seed, same batch file [%(default)s]")
    add("--variants", help=f"comma-separated [{DEFAULT_VARIANTS}]")
    add("--prefix-ab", action="store_true", help=f"run {PREFIX_AB_VARIANTS}")
    add("--max-num-seqs", type=int, default=64, help="engine, every variant [%(default)s]")
    add("--max-model-len", type=int, default=1024, help="engine, every variant [%(default)s]")
    add(
        "--max-num-batched-tokens",
        type=int,
        default=4096,
        help="engine, every variant [%(default)s: vLLM's CPU default for LLM()]",
    )
    add("--block-size", type=int, help="engine, every variant [vLLM's: 128 on CPU]")
    add("--timeout", type=float, default=3600, help="seconds per variant [%(default)s]")
    add("--workdir", type=Path, help="keep the batch file, outputs and logs here")
    add(
        "--pairs",
        type=int,
        default=0,
        help="run vllm-batch-run and run-batch this many times each, alternating, and "
        "compare whole-process walls pair by pair",
    )
    add("--results-name", help="[batch, batch-prefix-ab with --prefix-ab, batch-pairs]")
    args = parser.parse_args(argv)
    if sum(bool(x) for x in (args.variants, args.prefix_ab, args.pairs)) > 1:
        parser.error("--variants, --prefix-ab and --pairs are exclusive")
    names = args.variants or (PREFIX_AB_VARIANTS if args.prefix_ab else DEFAULT_VARIANTS)
    if args.pairs:
        names = ",".join(PAIR_VARIANTS)
    try:
        args.variants = [Variant.parse(v.strip()) for v in names.split(",") if v.strip()]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if not 0 <= args.shared_prefix_fraction <= 1:
        parser.error("--shared-prefix-fraction must be in [0, 1]")
    return args


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--raw-child":
        raw_child(Path(sys.argv[2]))
        return
    args = parse_args()
    model, name = resolve_model(args.model, args.name)
    ignore_eos = args.ignore_eos if args.ignore_eos is not None else args.model in (None, "tiny")
    work = Workload(
        n=args.n,
        prompt_words=args.prompt_words,
        max_tokens=args.max_tokens,
        shared_prefix_fraction=args.shared_prefix_fraction,
        prefix_tokens=args.prefix_tokens,
        ignore_eos=ignore_eos,
        seed=args.seed,
    )
    engine = EngineConfig(
        model=model,
        name=name,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-batch-"))
    workdir.mkdir(parents=True, exist_ok=True)
    batch_file = workdir / "batch.jsonl"
    stats = write_batch(batch_file, work, name, load_tokenizer(model), args.max_model_len)
    log(f"batch file {batch_file}: {stats}")
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in CPU_ENV.items()}}
    env["PYTHONUNBUFFERED"] = "1"  # log lines arrive when printed (start-up markers)
    ctx = Context(
        engine=engine,
        workdir=workdir,
        input=batch_file,
        n=args.n,
        expected_output_tokens=stats["max_tokens_sum"] if ignore_eos else None,
        timeout=args.timeout,
        env=env,
    )
    results: list[Result] = []
    pairs: list[dict[str, Any]] = []
    try:
        if args.pairs:
            pairs = run_pairs(args.variants, ctx, args.pairs)
            results = [run for pair in pairs for run in pair["runs"]]
        else:
            results = [run_variant(variant, ctx) for variant in args.variants]
    finally:
        if args.workdir is None and all(r.status != "failed" for r in results):
            shutil.rmtree(workdir, ignore_errors=True)
    table = pairs_report(pairs, args.n) if pairs else report(results, args.n)
    words, tokens = work.prompt_words, work.max_tokens
    description = (
        f"Model `{name}` ({model}), {args.n} chat requests (seed {args.seed}): user prompt "
        f"{words[0]}-{words[1]} words, max_tokens {tokens[0]}-{tokens[1]}"
        f"{' with ignore_eos' if ignore_eos else ''}, {stats['shared_prefix_requests']} "
        f"share a {stats['prefix_tokens']}-token system prompt. Engine for every variant: "
        f"dtype {engine.dtype}, enforce-eager, max-num-seqs {engine.max_num_seqs}, "
        f"max-model-len {engine.max_model_len}, max-num-batched-tokens "
        f"{engine.max_num_batched_tokens}, block size {engine.block_size or 'vLLM default'}, "
        "prefix caching on unless -no-prefix-cache, "
        + ", ".join(f"{k}={env[k]}" for k in CPU_ENV)
        + ". Each variant is its own subprocess. Cold wall: process start until all results "
        "are out (engine shutdown excluded). Process wall: process start until it exited "
        "(`exit_s`; for the server, until it stopped after the download). Peak RSS sums the "
        "process tree (API/driver, engine core, worker); PSS counts shared pages once. "
        "Speeds: ref time / this time (>1 is faster), on processing / cold wall time."
    )
    payload = {
        "workload": asdict(work),
        "batch": stats,
        "engine": {**asdict(engine), "model": str(engine.model)},
        "env": {k: env[k] for k in CPU_ENV},
        "results": [{k: v for k, v in asdict(r).items() if k != "answers"} for r in results],
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    if pairs:
        payload["pairs"] = pairs_summary(pairs)
    default_name = "batch-pairs" if args.pairs else "batch"
    results_name = args.results_name or ("batch-prefix-ab" if args.prefix_ab else default_name)
    command = f"Command: `{payload['command']}`"
    print(save(results_name, payload, f"{description}\n\n{table}\n\n{command}").read_text())


if __name__ == "__main__":
    main()
