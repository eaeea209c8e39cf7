"""URL input/output and ``--resume`` scanning of ``vllm-batch run``.

``FileServer`` (a ``http.server`` in a thread) is also used by the e2e tests.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from vllm_batch.offline.io import ResumeMismatch, TransferError, download, scan_resume, upload


class FileServer:
    """Serves ``files`` on GET; stores PUT bodies in ``received`` after failing ``fail_puts``."""

    def __init__(self, files: dict[str, bytes] | None = None, fail_puts: int = 0) -> None:
        self.files = dict(files or {})
        self.fail_puts = fail_puts
        self.put_attempts = 0
        self.put_headers: list[dict[str, str]] = []
        self.received: dict[str, bytes] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                server.put_attempts += 1
                server.put_headers.append(dict(self.headers))
                if server.put_attempts <= server.fail_puts:
                    self.send_error(500)
                    return
                server.received[self.path] = body
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    delays: list[float] = []
    monkeypatch.setattr(time, "sleep", delays.append)
    return delays


def _assert_backoff(delays: list[float], retries: int) -> None:
    """Exponential backoff from 1 s with up to 1 s of jitter (``offline_io.BACKOFF_SECONDS``)."""
    assert len(delays) == retries
    for n, delay in enumerate(delays):
        assert 2**n <= delay <= 2**n + 1, delays


def test_download_streams_to_a_file(tmp_path: Path) -> None:
    data = b'{"a": 1}\n' * 100_000
    with FileServer({"/in.jsonl": data}) as server:
        download(f"{server.url}/in.jsonl", tmp_path / "in.jsonl")
    assert (tmp_path / "in.jsonl").read_bytes() == data


def test_download_of_a_missing_file_fails_without_retrying(
    tmp_path: Path, no_sleep: list[float]
) -> None:
    with FileServer() as server, pytest.raises(TransferError, match="HTTP 404"):
        download(f"{server.url}/missing", tmp_path / "in.jsonl")
    assert no_sleep == []


def test_upload_retries_with_backoff(tmp_path: Path, no_sleep: list[float]) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"line\n" * 300_000)
    with FileServer(fail_puts=2) as server:
        upload(path, f"{server.url}/out.jsonl")
    assert server.received["/out.jsonl"] == path.read_bytes()
    assert server.put_attempts == 3
    _assert_backoff(no_sleep, 2)
    assert server.put_headers[-1]["Content-Length"] == str(path.stat().st_size)
    assert "Transfer-Encoding" not in server.put_headers[-1]


def test_upload_gives_up_after_five_attempts(tmp_path: Path, no_sleep: list[float]) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"x\n")
    with FileServer(fail_puts=99) as server, pytest.raises(TransferError, match="5 attempts"):
        upload(path, f"{server.url}/out.jsonl")
    assert server.put_attempts == 5
    _assert_backoff(no_sleep, 4)


def _input(path: Path, ids: list[str]) -> Path:
    lines = [json.dumps({"custom_id": i, "method": "POST", "url": "/u", "body": {}}) for i in ids]
    path.write_text("\n".join([*lines[:2], "", *lines[2:]]) + "\n")  # a blank line is no request
    return path


def _out_line(custom_id: str) -> str:
    return json.dumps({"id": "x", "custom_id": custom_id, "response": None, "error": None})


def test_resume_without_output_starts_at_zero(tmp_path: Path) -> None:
    assert scan_resume(tmp_path / "none.jsonl", _input(tmp_path / "in", ["a"])) == 0


def test_resume_counts_complete_lines_and_truncates_a_partial_one(tmp_path: Path) -> None:
    inp = _input(tmp_path / "in", ["a", "b", "c", "d"])
    out = tmp_path / "out.jsonl"
    complete = "".join(f"{_out_line(i)}\n" for i in ("a", "b", "c"))
    out.write_text(complete + _out_line("d")[:20])
    assert scan_resume(out, inp) == 3
    assert out.read_text() == complete


def test_resume_of_a_finished_output(tmp_path: Path) -> None:
    inp = _input(tmp_path / "in", ["a", "b"])
    out = tmp_path / "out.jsonl"
    out.write_text(f"{_out_line('a')}\n{_out_line('b')}\n")
    assert scan_resume(out, inp) == 2


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["a", "x"], "output line 2 has custom_id 'x' but input line 2 has 'b'"),
        (["a", "b", "c", "d"], "more lines than the input"),
    ],
)
def test_resume_rejects_an_output_of_another_input(
    tmp_path: Path, lines: list[str], message: str
) -> None:
    inp = _input(tmp_path / "in", ["a", "b", "c"])
    out = tmp_path / "out.jsonl"
    out.write_text("".join(f"{_out_line(i)}\n" for i in lines))
    with pytest.raises(ResumeMismatch, match=message):
        scan_resume(out, inp)


def test_resume_rejects_a_corrupt_line(tmp_path: Path) -> None:
    inp = _input(tmp_path / "in", ["a", "b"])
    out = tmp_path / "out.jsonl"
    out.write_text(f"{_out_line('a')}\nnot json\n")
    with pytest.raises(ResumeMismatch, match="output line 2 is not a result line"):
        scan_resume(out, inp)
