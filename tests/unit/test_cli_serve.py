"""``vllm-batch serve --api-key-file``: clear errors before anything starts."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from vllm_batch.cli import app
from vllm_batch.cli.serve import read_api_key_file

runner = CliRunner()


def test_key_file_is_read_and_stripped(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("\n  sk-from-file \n")
    assert read_api_key_file(path) == "sk-from-file"


def test_missing_key_file_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve", "--api-key-file", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "--api-key-file" in result.output and "cannot read" in result.output


def test_empty_key_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text(" \n\t\n")
    result = runner.invoke(app, ["serve", "--api-key-file", str(path)])
    assert result.exit_code == 2 and "is empty" in result.output


def test_key_and_key_file_together_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("sk-secret-in-file")
    result = runner.invoke(app, ["serve", "--api-key", "x", "--api-key-file", str(path)])
    assert result.exit_code == 2 and "not both" in result.output
    assert "sk-secret-in-file" not in result.output
