"""docs/troubleshooting.md, entry 2: ``vllm-batch serve`` on a port that is taken exits with
code 3 and uvicorn's message, quoted on the page (its port 4080 is the test's port here)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from tests.unit.test_troubleshooting import message


def test_2_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "vllm_batch.cli",
                "serve",
                "--no-worker",
                "--port",
                str(port),
                "--data-dir",
                str(tmp_path / "data"),
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert result.returncode == 3, result.stderr[-2000:]
    errors = [
        record["message"]
        for record in (json.loads(x) for x in result.stderr.splitlines() if x.startswith("{"))
        if record["level"] == "error"
    ]
    assert errors == [message(2).replace("4080", str(port))], result.stderr[-2000:]
