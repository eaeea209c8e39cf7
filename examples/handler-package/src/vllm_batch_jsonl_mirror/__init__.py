"""An example result handler shipped as its own package, found through its entry point.

Writes ``<JSONL_MIRROR_DIR>/<batch_id>.jsonl`` with one ``{"custom_id", "ok", "answer"}``
object per result line. Enabled when ``JSONL_MIRROR_DIR`` is set, or per batch with
``metadata["jsonl_mirror"] = "off"`` to skip it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vllm_batch.handlers import ResultHandler, answer_text


class JsonlMirrorHandler(ResultHandler):
    def name(self) -> str:
        return "jsonl_mirror"

    def enabled(self, metadata: dict[str, Any] | None = None) -> bool:
        if (metadata or {}).get("jsonl_mirror") == "off":
            return False
        return bool(os.environ.get("JSONL_MIRROR_DIR"))

    def handle(
        self, batch_id: str, results: Iterable[dict[str, Any]], metadata: dict[str, Any]
    ) -> bool:
        target = Path(os.environ["JSONL_MIRROR_DIR"]) / f"{batch_id}.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        with partial.open("w", encoding="utf-8") as out:
            for result in results:  # streamed: one line in memory at a time
                record = {
                    "custom_id": result.get("custom_id"),
                    "ok": not result.get("error"),
                    "answer": answer_text(result),
                }
                out.write(json.dumps(record) + "\n")
        partial.replace(target)  # a retried run overwrites: no duplicates
        return True
