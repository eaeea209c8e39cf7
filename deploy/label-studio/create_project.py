"""Create the Label Studio project the ``label_studio`` result handler imports into.

Idempotent: an existing project with the same title is reused. Prints the project id; the
server and workers need it as ``LABEL_STUDIO_PROJECT_ID`` (a fresh Label Studio gives 1).
Standard library only, so it runs in Label Studio's own image (compose profile ``curation``).

Environment: ``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY`` (legacy token or personal access
token), ``LABEL_STUDIO_PROJECT_TITLE`` (default "vLLM Batch review"),
``LABEL_STUDIO_WAIT_SECONDS`` (how long to wait for Label Studio to answer, default 300).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

# The tags vllm_batch/handlers/label_studio.py writes its tasks and predictions for.
LABEL_CONFIG = """<View>
  <Header value="$custom_id"/>
  <Text name="answer" value="$answer"/>
  <TextArea name="review" toName="answer" editable="true" maxSubmissions="1"/>
</View>"""


def request(url: str, auth: str, method: str = "GET", body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", auth)
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as response:
        return json.loads(response.read() or b"null")


def authorization(base: str, key: str) -> str:
    """``Token <key>`` for a legacy token; a personal access token is exchanged first."""
    if key.count(".") == 2 and key.startswith("eyJ"):
        req = urllib.request.Request(
            f"{base}/api/token/refresh/",
            data=json.dumps({"refresh": key}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as response:
            return "Bearer " + json.loads(response.read())["access"]
    return f"Token {key}"


def wait_for_projects(base: str, key: str, seconds: float) -> tuple[str, list[dict[str, Any]]]:
    """The authorization header and every project, once Label Studio answers."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            auth = authorization(base, key)
            found = request(f"{base}/api/projects/?page_size=1000", auth)
            return auth, found["results"] if isinstance(found, dict) else found
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code in (401, 403):
                raise SystemExit(f"Label Studio rejected LABEL_STUDIO_API_KEY: {exc}") from None
            if time.monotonic() > deadline:
                raise SystemExit(f"Label Studio at {base} did not answer: {exc}") from None
            time.sleep(2)


def main() -> int:
    base = os.environ.get("LABEL_STUDIO_URL", "http://label-studio:8080").rstrip("/")
    key = os.environ.get("LABEL_STUDIO_API_KEY", "").strip()
    title = os.environ.get("LABEL_STUDIO_PROJECT_TITLE", "vLLM Batch review")
    if not key:
        print("LABEL_STUDIO_API_KEY is not set: no project created", file=sys.stderr)
        return 2
    wait = float(os.environ.get("LABEL_STUDIO_WAIT_SECONDS", "300"))
    auth, projects = wait_for_projects(base, key, wait)
    found = [p["id"] for p in projects if p.get("title") == title]
    if found:
        project_id = int(found[0])
    else:
        body = {"title": title, "label_config": LABEL_CONFIG}
        project_id = int(request(f"{base}/api/projects/", auth, "POST", body)["id"])
    print(project_id)
    configured = os.environ.get("LABEL_STUDIO_PROJECT_ID", "")
    if configured and configured != str(project_id):
        print(
            f"warning: project {title!r} has id {project_id}, but LABEL_STUDIO_PROJECT_ID is "
            f"{configured}: set LABEL_STUDIO_PROJECT_ID={project_id}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
