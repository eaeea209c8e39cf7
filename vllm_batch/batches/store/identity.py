"""Who holds a lease: ``host/namespace/pid/token``, parsed exactly.

``namespace`` is a short hash of the kernel's boot id and this process's PID namespace,
so two containers sharing a hostname (and both PID 1) never mistake each other's
processes for their own. Host names never contain ``/``.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

import psutil


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _namespace() -> str:
    """Boot id + PID namespace: equal only for processes that can see each other's PIDs."""
    try:
        pid_ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pid_ns = ""
    boot = _read("/proc/sys/kernel/random/boot_id")
    return hashlib.sha256(f"{boot}|{pid_ns}".encode()).hexdigest()[:12]


@dataclass(frozen=True)
class InstanceId:
    host: str
    namespace: str
    pid: int
    token: str

    def __str__(self) -> str:
        return f"{self.host}/{self.namespace}/{self.pid}/{self.token}"

    @property
    def scope(self) -> str:
        """The prefix shared by every process whose PIDs this one can check."""
        return f"{self.host}/{self.namespace}/"

    @classmethod
    def new(cls) -> InstanceId:
        return cls(socket.gethostname()[:64], _namespace(), os.getpid(), secrets.token_hex(4))

    @classmethod
    def parse(cls, text: str) -> InstanceId | None:
        """The id in ``text``, or None if it is not exactly ``host/ns/pid/token``."""
        parts = text.split("/")
        if len(parts) != 4 or not all(parts) or not parts[2].isdigit():
            return None
        return cls(parts[0], parts[1], int(parts[2]), parts[3])

    def sees_dead(self, other: InstanceId) -> bool:
        """Whether ``other`` is certainly dead, judged from this process.

        Only owners in our own scope (same host, boot and PID namespace) can be judged:
        dead if their PID no longer runs, or if it is our own PID with another token (an
        earlier incarnation of this process's PID).
        """
        if other == self or other.scope != self.scope:
            return False
        if other.pid == self.pid:
            return True
        return not psutil.pid_exists(other.pid)
