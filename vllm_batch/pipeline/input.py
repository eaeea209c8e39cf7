"""Streaming JSONL checks with line numbers: at upload, and when a batch is created.

Both run in a worker thread over file handles and hold one line in memory at a time.
Line numbers are 1-based physical lines; blank lines are skipped and do not count as
requests. ``request index`` is the 0-based position among non-blank lines.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import orjson

from vllm_batch.models.kinds import (
    AUDIO_ENDPOINTS,
    POOLING_ENDPOINTS,
    ModelKind,
    body_problems,
    kind_problem,
)

SUPPORTED_ENDPOINTS: tuple[str, ...] = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    *POOLING_ENDPOINTS,
    *AUDIO_ENDPOINTS,
)
MAX_REPORTED_ERRORS = 100
MAX_JSON_DEPTH = 64  # nesting levels per line; orjson itself gives up at 1024


class UploadRejected(Exception):
    """The uploaded bytes are not a batch file at all (HTTP 400 or 413)."""

    def __init__(self, message: str, *, status: int = 400, code: str = "invalid_file") -> None:
        super().__init__(message)
        self.message, self.status, self.code = message, status, code


@dataclass(frozen=True)
class UploadScan:
    bytes: int
    requests: int


def iter_lines(handle: BinaryIO) -> Iterator[tuple[int, int, bytes]]:
    """Yield ``(line_number, byte_offset, raw_line)`` for non-blank lines."""
    offset = 0
    for number, raw in enumerate(handle, start=1):
        start = offset
        offset += len(raw)
        if raw.strip():
            yield number, start, raw


def copy_limited(
    pieces: Iterable[bytes], dst: BinaryIO, *, max_bytes: int, what: str = "File", code: str = ""
) -> Iterator[bytes]:
    """Write ``pieces`` to ``dst`` and yield each one written; ``UploadRejected`` (413) once
    they add up to more than ``max_bytes`` (``what``: the message's subject)."""
    size = 0
    for piece in pieces:
        size += len(piece)
        if size > max_bytes:
            limit = f"{max_bytes} bytes" + (" per part" if what == "Part" else "")
            raise UploadRejected(
                f"{what} is too large: the limit is {limit}.",
                status=413,
                code=code or f"{what.lower()}_too_large",
            )
        dst.write(piece)
        yield piece


def copy_upload(src: BinaryIO, dst: BinaryIO, *, max_bytes: int, check_jsonl: bool) -> UploadScan:
    """Copy an upload to storage, rejecting it if too big or (for batches) not JSONL."""
    size = 0
    requests = 0
    for number, raw in enumerate(copy_limited(src, dst, max_bytes=max_bytes), start=1):
        size += len(raw)
        if check_jsonl and raw.strip():
            _parse_object(raw, number)
            requests += 1
    if check_jsonl and requests == 0:
        raise UploadRejected(
            "The file is empty: a batch file needs at least one JSONL line.", code="empty_file"
        )
    return UploadScan(bytes=size, requests=requests)


def utf8_problem(raw: bytes, number: int) -> str | None:
    """Where line ``number`` is not valid UTF-8 (None if it is)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return (
            f"Invalid JSONL: line {number} is not valid UTF-8 (byte 0x{raw[exc.start]:02x} "
            f"at byte {exc.start + 1} of the line); batch files must be UTF-8 encoded."
        )
    return None


def _parse_object(raw: bytes, number: int) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        problem = utf8_problem(raw, number)
        if problem is not None:  # orjson calls it "surrogates not allowed"
            raise UploadRejected(problem, code="invalid_utf8") from None
        raise UploadRejected(
            f"Invalid JSONL: line {number} is not valid JSON ({exc.msg}).", code="invalid_jsonl"
        ) from None
    if not isinstance(value, dict):
        raise UploadRejected(
            f"Invalid JSONL: line {number} must be a JSON object, got {type(value).__name__}.",
            code="invalid_jsonl",
        )
    if raw.count(b"{") + raw.count(b"[") > MAX_JSON_DEPTH and too_deep(value, MAX_JSON_DEPTH):
        raise UploadRejected(
            f"Invalid JSONL: line {number} is nested deeper than {MAX_JSON_DEPTH} levels.",
            code="json_too_deep",
        )
    return value


def too_deep(value: Any, limit: int) -> bool:
    """Whether objects/arrays nest more than ``limit`` levels (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


@dataclass
class BatchPlan:
    """What batch creation learned from the input file: a model and chunk boundaries."""

    model: str | None = None
    total: int = 0
    # (start request index, end request index, byte offset of the start line)
    chunks: list[tuple[int, int, int]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def error(
        self, code: str, message: str, line: int | None = None, param: str | None = None
    ) -> None:
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"code": code, "line": line, "message": message, "param": param})


def plan_batch(
    handle: BinaryIO,
    *,
    endpoint: str,
    served_models: Sequence[str],
    max_requests: int,
    chunk_size: int,
    model_kinds: Mapping[str, ModelKind | None] | None = None,
    adapters: Mapping[str, str] | None = None,
    model_source: str | None = None,
) -> BatchPlan:
    """Check every line of a batch input file and cut it into chunks of ``chunk_size``.

    ``model_kinds`` (model name -> kind): a line whose model cannot serve the endpoint
    fails (see ``models/kinds.py``), and pooling bodies get their structural checks.
    ``adapters`` maps LoRA adapter names to their base models: a line naming an adapter is
    its base model's work (``plan.model`` is always a served model, never an adapter).
    ``model_source`` says where ``served_models`` came from, for ``model_not_found`` (the
    remote engine: the upstreams' ``/v1/models``).
    """
    plan = BatchPlan()
    bases = dict(adapters or {})
    seen_ids: set[int] = set()
    for number, offset, raw in iter_lines(handle):
        index = plan.total
        plan.total += 1
        if index % chunk_size == 0:
            plan.chunks.append((index, index, offset))
        if plan.total > max_requests:
            continue
        _check_line(
            plan, raw, number, endpoint, served_models, seen_ids, bases, model_kinds, model_source
        )
    if plan.chunks:
        start, _, offset = plan.chunks[-1]
        plan.chunks[-1] = (start, plan.total, offset)
        plan.chunks[:-1] = [
            (start, start + chunk_size, offset) for start, _, offset in plan.chunks[:-1]
        ]
    if plan.total == 0:
        plan.error("empty_file", "The input file contains no requests.")
    elif plan.total > max_requests:
        plan.error(
            "too_many_requests",
            f"The input file has {plan.total} requests; the limit per batch is {max_requests}.",
        )
    return plan


def _check_line(
    plan: BatchPlan,
    raw: bytes,
    number: int,
    endpoint: str,
    served_models: Sequence[str],
    seen_ids: set[int],
    bases: Mapping[str, str],
    model_kinds: Mapping[str, ModelKind | None] | None = None,
    model_source: str | None = None,
) -> None:
    """Check one line; whatever goes wrong becomes this line's error, never a crash."""
    try:
        line = _parse_object(raw, number)
    except UploadRejected as exc:
        plan.error("invalid_json_line", exc.message, number)
        return
    except Exception as exc:
        plan.error("invalid_json_line", f"Line {number} could not be parsed ({exc}).", number)
        return
    try:
        _check_fields(plan, line, number, endpoint, served_models, seen_ids, bases, model_source)
        if model_kinds is not None:
            _check_kind(plan, line, number, endpoint, model_kinds, bases)
    except Exception as exc:
        plan.error(
            "invalid_line",
            f"Line {number} could not be checked ({exc.__class__.__name__}).",
            number,
        )


def _check_fields(
    plan: BatchPlan,
    line: dict[str, Any],
    number: int,
    endpoint: str,
    served_models: Sequence[str],
    seen_ids: set[int],
    bases: Mapping[str, str],
    model_source: str | None = None,
) -> None:
    custom_id = line.get("custom_id")
    if custom_id is None:
        plan.error(
            "missing_required_parameter",
            "Missing required parameter: 'custom_id'.",
            number,
            "custom_id",
        )
    elif not isinstance(custom_id, str):
        plan.error("invalid_type", "'custom_id' must be a string.", number, "custom_id")
    elif not custom_id:
        plan.error(
            "invalid_value",
            "'custom_id' must not be empty: each line needs a unique, non-empty custom_id.",
            number,
            "custom_id",
        )
    else:
        key = hash(custom_id)
        if key in seen_ids:
            plan.error(
                "duplicate_custom_id",
                f"The custom_id {custom_id!r} is used on more than one line; "
                "custom_id values must be unique.",
                number,
                "custom_id",
            )
        seen_ids.add(key)
    method = line.get("method")
    if method != "POST":
        plan.error(
            "invalid_method",
            f"Invalid method {method!r}: only 'POST' is supported.",
            number,
            "method",
        )
    url = line.get("url")
    if url != endpoint:
        plan.error(
            "mismatched_endpoint" if url in SUPPORTED_ENDPOINTS else "invalid_url",
            f"The url {url!r} does not match the batch endpoint {endpoint!r}.",
            number,
            "url",
        )
    body = line.get("body")
    if not isinstance(body, dict):
        plan.error(
            "missing_required_parameter" if body is None else "invalid_type",
            "'body' must be a JSON object with the request parameters.",
            number,
            "body",
        )
        return
    model = body.get("model")
    if not isinstance(model, str) or not model:
        plan.error(
            "missing_required_parameter",
            "Missing required parameter: 'body.model'.",
            number,
            "body.model",
        )
    elif model not in served_models and model not in bases:
        adapters = f" LoRA adapters: {', '.join(bases)}." if bases else ""
        plan.error(
            "model_not_found",
            f"The model {model!r} is not served {model_source or 'here'}. Served models: "
            f"{', '.join(served_models) or 'none'}.{adapters}",
            number,
            "body.model",
        )
    elif plan.model is None:
        plan.model = bases.get(model, model)
    elif bases.get(model, model) != plan.model:
        plan.error(
            "mismatched_model",
            f"Line uses model {model!r} but the batch uses {plan.model!r}; "
            "a batch file may contain only one model (and LoRA adapters of it).",
            number,
            "body.model",
        )


def _check_kind(
    plan: BatchPlan,
    line: dict[str, Any],
    number: int,
    endpoint: str,
    model_kinds: Mapping[str, ModelKind | None],
    bases: Mapping[str, str],
) -> None:
    """The line's model (an adapter: its base model) must be of a kind that serves
    ``endpoint``; pooling and audio bodies need the fields their endpoint reads."""
    body = line.get("body")
    if not isinstance(body, dict):
        return
    model = body.get("model")
    if isinstance(model, str):
        model = bases.get(model, model)
    if isinstance(model, str) and model in model_kinds:
        problem = kind_problem(model, model_kinds[model], endpoint)
        if problem is not None:
            plan.error("wrong_model_kind", problem, number, "body.model")
    if line.get("url") == endpoint:
        for code, message, param in body_problems(endpoint, body):
            plan.error(code, message, number, param)
