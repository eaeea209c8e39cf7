"""A small tmpfs to fill up: for the full-disk tests (root only; ``mount`` must work).

``small_tmpfs`` mounts one and always unmounts it; a failed mount fails the test (it does
not skip), saying why. ``fill`` takes all but a given number of bytes with a filler file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

PAGE = 4096


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``mount -o size=``) at ``path``, unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    mounted = subprocess.run(command, capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.fail(
            f"the full-disk tests need a small tmpfs, but `{' '.join(command)}` failed "
            f"(exit {mounted.returncode}: {mounted.stderr.strip() or mounted.stdout.strip()}); "
            "run them as root on a host that allows mount"
        )
    try:
        yield path
    finally:
        unmounted = subprocess.run(["umount", str(path)], capture_output=True, check=False)
        if unmounted.returncode != 0:  # something still holds a file open: detach it
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def fill(path: Path, leave: int, name: str = "filler") -> Path:
    """Allocate a file under ``path`` so that about ``leave`` bytes stay free; returns it."""
    filler = path / name
    size = free_bytes(path) - leave
    assert size > 0, f"{path} has only {free_bytes(path)} bytes free, wanted to leave {leave}"
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.posix_fallocate(fd, 0, size - size % PAGE)
    finally:
        os.close(fd)
    left = free_bytes(path)
    assert leave - PAGE <= left <= leave + 2 * PAGE, f"filled {path}: {left} bytes free"
    return filler
