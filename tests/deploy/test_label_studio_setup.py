"""The curation profile's setup script, against a real Label Studio: it creates a project the
``label_studio`` handler can import into, and reuses it when run again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.deploy.deployfiles import REPO
from tests.integration import test_label_studio_handler as ls_tests
from vllm_batch.handlers.label_studio import LabelStudioHandler

SCRIPT = REPO / "deploy" / "label-studio" / "create_project.py"
label_studio = ls_tests.label_studio  # the real Label Studio server fixture (module scope)


def _run(ls: ls_tests.LabelStudio, key: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT)],
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LABEL_STUDIO_URL": ls.url,
            "LABEL_STUDIO_API_KEY": key,
            "LABEL_STUDIO_WAIT_SECONDS": "20",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_creates_the_project_once_and_the_handler_imports_into_it(
    label_studio: ls_tests.LabelStudio, tmp_path: Path
) -> None:
    first = _run(label_studio, label_studio.token, LABEL_STUDIO_PROJECT_TITLE="compose review")
    assert first.returncode == 0, first.stderr
    project = int(first.stdout)
    # again, with the personal access token and a stale configured id: same project, a hint
    again = _run(
        label_studio,
        label_studio.pat,
        LABEL_STUDIO_PROJECT_TITLE="compose review",
        LABEL_STUDIO_PROJECT_ID=str(project + 100),
    )
    assert again.returncode == 0, again.stderr
    assert int(again.stdout) == project
    assert f"LABEL_STUDIO_PROJECT_ID={project}" in again.stderr

    settings = ls_tests._settings(label_studio, project, label_studio.token)
    handler = LabelStudioHandler(settings)
    assert handler.handle("batch_compose", ls_tests._stream(tmp_path, "batch_compose", 4), {})
    ls_tests._assert_landed(label_studio, project, "batch_compose", range(4))


def test_refuses_to_run_without_a_key_or_with_a_wrong_one(
    label_studio: ls_tests.LabelStudio,
) -> None:
    missing = _run(label_studio, "")
    assert missing.returncode == 2 and "LABEL_STUDIO_API_KEY" in missing.stderr
    wrong = _run(label_studio, "0" * 40)
    assert wrong.returncode != 0 and "rejected" in wrong.stderr
