"""Input checks before any request runs: structure (always) and full validation (``--strict``).

They run while the engine starts; a failed check stops that start.

Both stream the file and hold one line at a time. Line numbers are 1-based physical lines;
blank lines are skipped and are not requests.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from vllm_batch.models.kinds import ModelKind
from vllm_batch.pipeline.input import iter_lines, plan_batch

REQUIRED_FIELDS = ("custom_id", "method", "url", "body")
MAX_LISTED_ERRORS = 20


@dataclass
class Preflight:
    """What the structural pass learned: the request count and the lines that are broken."""

    total: int = 0
    first_url: str | None = None
    bad_lines: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.bad_lines == 0

    def add_error(self, message: str) -> None:
        self.bad_lines += 1
        if len(self.errors) < MAX_LISTED_ERRORS:
            self.errors.append(message)


def line_problem(raw: bytes, number: int) -> str | None:
    """Why line ``number`` is not a batch request line, or None if it is one."""
    try:
        line: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return f"line {number}: not valid JSON ({exc})"
    if not isinstance(line, dict):
        return f"line {number}: expected a JSON object, got {type(line).__name__}"
    missing = [name for name in REQUIRED_FIELDS if name not in line]
    if missing:
        names = ", ".join(repr(name) for name in missing)
        return f"line {number}: missing required field(s) {names}"
    for name in ("custom_id", "method", "url"):
        if not isinstance(line[name], str):
            return f"line {number}: {name!r} must be a string"
    if not isinstance(line["body"], dict):
        return f"line {number}: 'body' must be a JSON object"
    return None


def preflight(handle: BinaryIO) -> Preflight:
    """Count the requests and check that each is JSON with custom_id, method, url and body."""
    result = Preflight()
    for number, _offset, raw in iter_lines(handle):
        result.total += 1
        problem = line_problem(raw, number)
        if problem is not None:
            result.add_error(problem)
        elif result.first_url is None:
            result.first_url = str(orjson.loads(raw)["url"])
    return result


def strict_errors(
    path: Path,
    endpoint: str,
    served_models: list[str],
    model_kinds: Mapping[str, ModelKind | None] | None = None,
    adapters: Mapping[str, str] | None = None,
) -> list[str]:
    """The server's full batch validation (one endpoint, served models and their kinds,
    LoRA ``adapters`` (name: base model), unique custom_ids)."""
    with path.open("rb") as handle:
        plan = plan_batch(
            handle,
            endpoint=endpoint,
            served_models=served_models,
            model_kinds=model_kinds,
            max_requests=sys.maxsize,
            chunk_size=sys.maxsize,
            adapters=adapters,
        )
    return [
        f"line {error['line']}: {error['message']}" if error["line"] else str(error["message"])
        for error in plan.errors
    ]


def describe(errors: list[str], bad_lines: int, source: str) -> str:
    """A message listing the first errors, for the terminal."""
    shown = "\n".join(f"  {error}" for error in errors)
    more = bad_lines - len(errors)
    tail = f"\n  ... and {more} more" if more > 0 else ""
    return f"{source}: {bad_lines} invalid line(s):\n{shown}{tail}"
