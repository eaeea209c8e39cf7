"""Blobs as files under a local directory, written atomically via rename.

A write that fails leaves nothing: its temporary file is removed, and so is every
directory it leaves empty below the key's first segment (``batches/<id>/<attempt>/``,
``uploads/<id>/``); ``delete`` prunes the same way. A write refused for lack of space
(``ENOSPC``, ``EDQUOT``) raises ``StorageFull``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from vllm_batch.storage.health import StorageHealth

TEMP_PREFIX = ".tmp-"
MKSTEMP_TRIES = 3  # a concurrent prune may remove the directory between mkdir and mkstemp


class LocalStorage:
    """Stores each blob as ``<root>/<key>``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.health = StorageHealth()

    def describe(self) -> str:
        return f"local directory {self.root.resolve()}"

    def usage(self) -> tuple[int, int] | None:
        """(free, total) bytes of the file system holding the root."""
        disk = shutil.disk_usage(self.root)
        return disk.free, disk.total

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"storage key escapes the storage root: {key!r}")
        return path

    @contextlib.contextmanager
    def open_read(self, key: str, offset: int = 0) -> Iterator[BinaryIO]:
        with open(self._path(key), "rb") as handle:
            if offset:
                handle.seek(offset)
            yield handle

    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[BinaryIO]:
        path = self._path(key)
        tmp: str | None = None
        try:
            fd, tmp = self._temporary(path)
            with os.fdopen(fd, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            self._prune(path.parent)
            self.health.raise_if_refused(exc, self.describe())
            raise
        self.health.succeeded()

    def _temporary(self, path: Path) -> tuple[int, str]:
        for attempt in range(MKSTEMP_TRIES):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                return tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=path.name)
            except FileNotFoundError:
                if attempt == MKSTEMP_TRIES - 1:
                    raise
        raise AssertionError("unreachable")

    def _prune(self, directory: Path) -> None:
        """Remove ``directory`` and its parents while empty, keeping top-level folders."""
        root = self.root.resolve()
        while directory.parent != root and root in directory.parents:
            try:
                directory.rmdir()
            except OSError:  # not empty (or already gone): stop here
                return
            directory = directory.parent

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._prune(path.parent)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def iter_keys(self, prefix: str) -> Iterator[str]:
        """Every blob under the folder ``prefix`` (temporary files of writes included)."""
        root = self.root.resolve()
        for folder, _dirs, names in os.walk(self._path(prefix)):
            for name in names:
                yield (Path(folder) / name).relative_to(root).as_posix()

    def prune_empty(self, prefix: str) -> int:
        """Remove empty directories below the folder ``prefix``; how many went."""
        removed = 0
        top = self._path(prefix)
        for folder, _dirs, _names in os.walk(top, topdown=False):
            if Path(folder) != top:
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
                    removed += 1
        return removed
