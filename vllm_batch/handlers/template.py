"""The ``template`` result handler: renders a Jinja2 template of the results to a file.

``VLLM_BATCH_TEMPLATE_HANDLER_TEMPLATE`` names the template (others next to it can be
included), ``VLLM_BATCH_TEMPLATE_HANDLER_OUTPUT`` the file to write, with ``{batch_id}``
replaced. The template sees:

``results``
    the result lines (dicts), output lines then error lines, streamed; loop over them as
    often as needed; ``results|length``, ``results.successes()``.
``batch``, ``batch_id``, ``metadata``
    the batch (``batch.status``, ``batch.model``, ``batch.output_file_id``, …), its id and
    its metadata.
``answer(result)`` (also a filter)
    the generated text of a line, or none.
``tojson(value)`` (also a filter)
    compact JSON, not HTML-escaped.
``csv(values)`` (also a filter)
    one CSV record, quoted as needed, without the line break:
    ``{{ [r.custom_id, r|answer]|csv }}``.

Output is rendered chunk by chunk into a temporary file that replaces the target only when
complete. Templates run sandboxed (no access to Python internals or to the storage behind
``results``), without HTML autoescaping; ``none`` prints as nothing and a missing key
(``r.response.body.usage`` on an error line) is simply undefined.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from jinja2 import ChainableUndefined, FileSystemLoader, Undefined
from jinja2.sandbox import SandboxedEnvironment

from vllm_batch.config import Settings
from vllm_batch.handlers.base import ResultHandler
from vllm_batch.handlers.results import ResultStream, answer_text

SAFE_BATCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# What a template may reach on ``results``: not its storage (which can write and delete).
STREAM_ATTRIBUTES = frozenset({"batch", "successes"})
DEFAULT_MODE = 0o644


def to_json(value: Any) -> str:
    """Compact JSON; an undefined value (a key the line lacks) is ``null``."""
    return json.dumps(None if isinstance(value, Undefined) else value, ensure_ascii=False)


def csv_record(values: Any) -> str:
    """One CSV record (RFC 4180 quoting), without its line break; a string is one field."""
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        values = [values]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(values)
    return buffer.getvalue()[:-2]


def _finalize(value: Any) -> Any:
    return "" if value is None else value


class ResultSandbox(SandboxedEnvironment):
    """Jinja's sandbox, also keeping templates away from the storage behind ``results``."""

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, ResultStream) and attr not in STREAM_ATTRIBUTES:
            return False
        return bool(super().is_safe_attribute(obj, attr, value))


def make_environment(directory: Path) -> SandboxedEnvironment:
    """The sandboxed environment templates in ``directory`` render in."""
    env = ResultSandbox(
        loader=FileSystemLoader(str(directory)),
        autoescape=False,
        undefined=ChainableUndefined,
        keep_trailing_newline=True,
        finalize=_finalize,
        auto_reload=True,
    )
    helpers = {"answer": answer_text, "tojson": to_json, "csv": csv_record}
    env.filters.update(helpers)
    env.globals.update(helpers)
    return env


@contextlib.contextmanager
def atomic_text_file(path: Path) -> Iterator[io.TextIOWrapper]:
    """A UTF-8 text file that replaces ``path`` only when the block exits cleanly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = DEFAULT_MODE
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class TemplateHandler(ResultHandler):
    """Render each finished batch's results through a Jinja2 template into a file."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.template = settings.template_handler_template
        self.output = settings.template_handler_output
        self.env = make_environment(self.template.expanduser().parent) if self.template else None

    def name(self) -> str:
        return "template"

    def enabled(self, metadata: dict[str, Any] | None = None) -> bool:
        return bool(self.template and self.output)

    def output_path(self, batch_id: str) -> Path:
        if not self.output:
            raise RuntimeError("VLLM_BATCH_TEMPLATE_HANDLER_OUTPUT is not set")
        if "{batch_id}" in self.output and not SAFE_BATCH_ID.fullmatch(batch_id):
            raise ValueError(f"unsafe batch id for a file name: {batch_id!r}")
        return Path(self.output.replace("{batch_id}", batch_id)).expanduser()

    def handle(
        self, batch_id: str, results: Iterable[dict[str, Any]], metadata: dict[str, Any]
    ) -> bool:
        if self.env is None or self.template is None:
            raise RuntimeError("VLLM_BATCH_TEMPLATE_HANDLER_TEMPLATE is not set")
        template = self.env.get_template(self.template.name)
        context = {
            "results": results,
            "batch": getattr(results, "batch", None),
            "batch_id": batch_id,
            "metadata": metadata,
        }
        with atomic_text_file(self.output_path(batch_id)) as handle:
            for chunk in template.generate(context):
                handle.write(chunk)
        return True
