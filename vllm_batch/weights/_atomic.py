"""Shared helpers for building a model directory once, atomically."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

MARKER = ".prepared"


def is_prepared(out_dir: Path, marker_text: str | None = None) -> bool:
    """Tell whether ``out_dir`` holds a complete model: config plus the marker written last.

    With ``marker_text``, the marker must also say that (e.g. the same seed was used).
    """
    marker = out_dir / MARKER
    if not ((out_dir / "config.json").is_file() and marker.is_file()):
        return False
    return marker_text is None or marker.read_text(encoding="utf-8").strip() == marker_text


def _make_readable(path: Path) -> None:
    """Give the build dir and its files normal permissions (mkdtemp creates them private)."""
    path.chmod(0o755)
    for f in path.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)


def _remove_previous(out_dir: Path) -> None:
    """Delete ``out_dir`` if it is empty or was built by us; refuse to delete anything else."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    elif (out_dir / MARKER).is_file():
        shutil.rmtree(out_dir)
    else:
        raise FileExistsError(
            f"{out_dir} exists and was not built by vllm_batch; not overwriting it"
        )


def build_atomically(out_dir: Path, build: Callable[[Path], None], marker_text: str) -> Path:
    """Run ``build(tmp)`` in a temp dir next to ``out_dir``, then rename it into place.

    Returns ``out_dir`` at once if it is already prepared with the same ``marker_text``.
    An empty ``out_dir`` or one we built with other settings is replaced; any other existing
    directory raises :class:`FileExistsError`. If another process wins the race, its result
    is kept.
    """
    out_dir = Path(out_dir)
    if is_prepared(out_dir, marker_text):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        build(tmp)
        (tmp / MARKER).write_text(marker_text + "\n", encoding="utf-8")
        _make_readable(tmp)
        if out_dir.exists():
            if is_prepared(out_dir, marker_text):  # a concurrent builder finished first
                return out_dir
            _remove_previous(out_dir)
        try:
            tmp.rename(out_dir)
        except OSError:
            if not is_prepared(out_dir, marker_text):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
