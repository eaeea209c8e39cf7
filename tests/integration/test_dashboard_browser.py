"""The dashboard in real headless Chromium (Debian's ``chromium``, driven by Playwright).

A live server with an API key and the session's tiny engine: the browser opens ``/``
(redirected to ``/dashboard``), is refused data until the key is entered once, watches a
batch made through the API progress to completed, opens its detail page (timeline,
chunks with their owners, deliveries), and downloads the output and error files, which
must equal the API's file contents. Screenshots go to ``test-artifacts/``; with
``VLLM_BATCH_UPDATE_SCREENSHOTS=1`` the overview also refreshes ``docs/img/dashboard.png``
and the charts ``docs/img/dashboard-charts.png``.

Acting in the page (same server): a file uploaded through the file picker (and one dropped
on the drop zone) becomes a batch, whose charts and progress move as the server samples it;
a second batch is cancelled from the list, a third from its page; the output downloads
byte-identical. ``/docs`` (the vendored Swagger UI) sends the key once it is authorized.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from tests.conftest import TINY_NAME, LiveServer, LoopThread, engine_settings, start_server
from tests.helpers import chat_line, jsonl
from tests.webhook_receiver import Receiver, webhook_receiver
from vllm_batch.protocol.webhook_event import new_secret

KEY = "sk-dashboard-browser"
CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
README_IMAGE = REPO / "docs" / "img" / "dashboard.png"
CHARTS_IMAGE = REPO / "docs" / "img" / "dashboard-charts.png"
HISTORY_INTERVAL = 0.5  # seconds between the server's history samples (default 5)
FIRST_LINES = 120  # the batch made in the page: three chunks, long enough to watch
LINES, CHUNK, BAD_LINE = 240, 40, 5  # six chunks, long enough to watch (several polls)
# What /ready's ``gpu`` section holds on a GPU host (there is none here) while the guard
# pauses claims: the dashboard must render readings and the pause.
HOT_GPU = {
    "guard": "on",
    "available": True,
    "reason": None,
    "claims_paused": True,
    "pause_reason": "GPU 0 at 91 °C (pause at 85 °C)",
    "pauses": 1,
    "oom_backoffs": 2,
    "gpus": [
        {
            "index": 0,
            "name": "NVIDIA L4",
            "utilization_percent": 97.0,
            "memory_used_bytes": 20 * 2**30,
            "memory_total_bytes": 24 * 2**30,
            "temperature_celsius": 91.0,
            "power_watts": 70.2,
            "power_limit_watts": 72.0,
            "throttle_reasons": ["sw_thermal_slowdown"],
        }
    ],
}


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with webhook_receiver("127.0.0.2") as found:
        yield found


@pytest.fixture(scope="module")
def live(
    loop_thread: LoopThread,
    tiny_engine: Any,
    tiny_model: Path,
    receiver: Receiver,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    data = tmp_path_factory.mktemp("dashboard-browser")
    settings = engine_settings(
        tiny_model,
        database_url=f"sqlite+aiosqlite:///{data / 'db.sqlite'}",
        data_dir=data,
        chunk_size=CHUNK,
        api_key=KEY,
        webhook_secret=new_secret(),
        webhook_allowed_hosts=["127.0.0.2"],
        delivery_backoff_base=0.2,
        delivery_backoff_max=0.5,
        delivery_poll_interval=0.1,
        dashboard_history_interval=HISTORY_INTERVAL,
    )
    yield from start_server(loop_thread, settings, tiny_engine)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make chromium` (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox"]
        )
        yield launched
        launched.close()


def submit(live: LiveServer, receiver: Receiver) -> str:
    """A batch with one bad line (negative temperature) and a webhook that fails once."""
    lines = [chat_line(i, TINY_NAME, max_tokens=64, ignore_eos=True) for i in range(LINES)]
    lines[BAD_LINE] = chat_line(BAD_LINE, TINY_NAME, temperature=-3)
    client = OpenAI(base_url=live.base_url, api_key=KEY)
    upload = client.files.create(file=("questions.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"webhook_url": receiver.script("/hook", 503, 200), "project": "dashboard-demo"},
    )
    return batch.id


def api_file(live: LiveServer, file_id: str) -> bytes:
    response = httpx.get(
        f"{live.base_url}/files/{file_id}/content", headers={"Authorization": f"Bearer {KEY}"}
    )
    response.raise_for_status()
    return response.content


def watch_row(page: Page, batch_id: str, timeout: float = 120) -> list[tuple[str, int]]:
    """``(status, percent)`` of the batch's row as the page updates it, until completed."""
    row = page.locator(f'tr[data-batch-id="{batch_id}"]')
    expect(row).to_be_visible(timeout=30_000)
    seen: list[tuple[str, int]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = page.evaluate(
            """id => {
                const row = document.querySelector(`tr[data-batch-id="${id}"]`);
                if (!row) return null;
                const bar = row.querySelector('[role="progressbar"]');
                return [row.dataset.status, Number(bar.getAttribute('aria-valuenow'))];
            }""",
            batch_id,
        )
        if state is not None and (not seen or tuple(state) != seen[-1]):
            seen.append((state[0], state[1]))
        if seen and seen[-1] == ("completed", 100):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"row never reached completed/100%: {seen}")


def download(page: Page, button: str) -> bytes:
    with page.expect_download() as info:
        page.click(button)
    path = info.value.path()
    return Path(path).read_bytes()


def test_dashboard_in_chromium(live: LiveServer, browser: Browser, receiver: Receiver) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    try:
        # A browser asking for / lands on the dashboard, which needs the key for any data.
        page.goto(f"{live.url}/")
        assert page.url == f"{live.url}/dashboard"
        expect(page.locator("#notice")).to_contain_text("needs an API key")
        page.fill("#api-key", KEY)
        page.click("#save-key")
        expect(page.locator("#viewer")).to_have_text("key “default” (admin)")
        expect(page.locator("#notice")).to_be_hidden()
        console_errors.clear()  # the refused calls before the key was entered
        # Entered once: kept in the browser and used again after a reload.
        page.reload()
        expect(page.locator("#viewer")).to_have_text("key “default” (admin)")
        assert page.evaluate("localStorage.getItem('vllm-batch:api-key')") == KEY
        expect(page.locator("#this-worker")).to_contain_text(TINY_NAME)
        expect(page.locator("#gpu")).to_contain_text("no GPU")

        batch_id = submit(live, receiver)
        seen = watch_row(page, batch_id)
        percents = [pct for _, pct in seen]
        assert percents == sorted(percents), seen  # the bar only moves forward
        assert any(0 < pct < 100 for pct in percents), seen  # seen mid-way: updated live
        row = page.locator(f'tr[data-batch-id="{batch_id}"]')
        expect(row.locator(".counts-cell")).to_have_text(f"{LINES - 1} · 1 · {LINES}")
        expect(row.locator(".eta")).to_have_text("done")
        expect(row).to_contain_text(f"request-{BAD_LINE}")  # first errors
        rate = row.locator(".rate").inner_text()
        assert rate == "\u2013" or float(rate) > 0, rate
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

        # The detail page: timeline, chunks with their owner, deliveries.
        row.locator(f'a[href="/dashboard/batches/{batch_id}"]').click()
        page.wait_for_url(f"{live.url}/dashboard/batches/{batch_id}")
        expect(page.locator("#status")).to_have_text("completed")
        events = page.locator("#timeline li[data-event]")
        expect(events).to_have_count(6)
        assert events.evaluate_all("els => els.map(e => e.dataset.event)") == [
            "created",
            "in progress",
            "first line started",
            "last line finished",
            "finalizing",
            "completed",
        ]
        phases = page.locator("#phases").inner_text()
        assert re.fullmatch(
            r"validation [\d.]+ s · queue [\d.]+ s · run \S.* · finalize [\d.]+ s", phases
        ), phases
        chunks = page.locator("#chunks tbody tr")
        expect(chunks).to_have_count(LINES // CHUNK)
        assert set(chunks.evaluate_all("els => els.map(e => e.dataset.status)")) == {"done"}
        worker_id = live.app.state.ctx.worker.ctx.worker_id
        owners = page.locator("#chunks td.owner").all_inner_texts()
        assert owners == [worker_id] * (LINES // CHUNK), owners
        delivery = page.locator("#deliveries tbody tr")
        expect(delivery).to_have_count(1)
        expect(delivery).to_have_attribute("data-status", "succeeded", timeout=30_000)
        expect(delivery).to_contain_text("webhook")
        expect(page.locator("#errors")).to_contain_text("temperature")

        # Downloads carry the key (blob download) and equal the API's file contents.
        batch = OpenAI(base_url=live.base_url, api_key=KEY).batches.retrieve(batch_id)
        assert batch.output_file_id and batch.error_file_id
        assert download(page, "#download-output") == api_file(live, batch.output_file_id)
        assert download(page, "#download-errors") == api_file(live, batch.error_file_id)
        page.screenshot(path=str(ARTIFACTS / "dashboard-batch.png"), full_page=True)
        if os.environ.get("VLLM_BATCH_UPDATE_SCREENSHOTS") == "1":
            README_IMAGE.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ARTIFACTS / "dashboard.png", README_IMAGE)
        assert not console_errors, console_errors
    finally:
        context.close()


@pytest.mark.parametrize(
    "gpu",
    [HOT_GPU, {"guard": "on", "available": False, "reason": "no NVIDIA driver", "gpus": []}],
    ids=["hot-gpu", "no-gpu"],
)
def test_gpu_section(live: LiveServer, browser: Browser, gpu: dict[str, Any]) -> None:
    """The GPU section from /ready's ``gpu``: the real /ready answer, with readings added."""
    context = browser.new_context()
    context.add_init_script(f"localStorage.setItem('vllm-batch:api-key', {json.dumps(KEY)})")
    page = context.new_page()

    def with_gpu(route: Route) -> None:
        response = route.fetch()
        route.fulfill(response=response, json={**response.json(), "gpu": gpu})

    page.route("**/ready", with_gpu)
    try:
        page.goto(f"{live.url}/dashboard")
        expect(page.locator("#viewer")).to_have_text("key “default” (admin)")
        if gpu["gpus"]:
            expect(page.locator("#gpu-paused")).to_have_text(
                f"Claims paused: {gpu['pause_reason']}"
            )
            cells = page.locator("#gpus tbody tr td")
            expect(cells).to_have_text(
                [
                    "0 NVIDIA L4",
                    "97%",
                    "20.0 / 24.0 GiB",
                    "91 °C",
                    "70 / 72 W",
                    "sw_thermal_slowdown",
                ]
            )
        else:
            expect(page.locator("#gpu")).to_have_text("no GPU (no NVIDIA driver)")
    finally:
        context.close()


# ------------------------------------------------------------------ acting in the dashboard


def keyed_page(browser: Browser) -> tuple[Any, Page, list[str]]:
    """A context whose page has the key saved, and the console errors it logs."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.add_init_script(f"localStorage.setItem('vllm-batch:api-key', {json.dumps(KEY)})")
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    return context, page, errors


def batch_file(count: int, max_tokens: int = 64) -> bytes:
    lines = [chat_line(i, TINY_NAME, max_tokens=max_tokens, ignore_eos=True) for i in range(count)]
    return jsonl(lines)


def batch_status(batch_id: str, live: LiveServer) -> str:
    return OpenAI(base_url=live.base_url, api_key=KEY).batches.retrieve(batch_id).status


def create_from_form(page: Page, endpoint: str = "/v1/chat/completions") -> str:
    """Create a batch from the uploaded file with ``endpoint`` and the default window."""
    expect(page.locator("#create-batch")).to_be_enabled(timeout=30_000)
    page.select_option("#endpoint", endpoint)
    assert page.input_value("#completion-window") == "24h"
    page.click("#create-batch")
    created = page.locator("#created-batch")
    expect(created).to_be_visible(timeout=30_000)
    return created.inner_text()


def drop_file(page: Page, name: str, content: bytes) -> None:
    """Drag ``content`` as a file onto the drop zone (a DataTransfer made in the page)."""
    page.evaluate(
        """([name, text]) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([text], name, { type: "application/jsonl" }));
            const zone = document.getElementById("drop-zone");
            for (const type of ["dragenter", "dragover", "drop"]) {
                zone.dispatchEvent(new DragEvent(type, { dataTransfer: transfer, bubbles: true,
                    cancelable: true }));
            }
        }""",
        [name, content.decode()],
    )


def grows(page: Page, read: str, times: int = 2, deadline_s: float = 60) -> list[float]:
    """Values of the JS expression ``read`` until it has increased ``times`` times."""
    seen: list[float] = []
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = float(page.evaluate(read))
        if not seen or value != seen[-1]:
            seen.append(value)
        if len(seen) > times and seen == sorted(seen):
            return seen
        time.sleep(0.1)
    raise AssertionError(f"{read} did not grow: {seen}")


def test_act_in_the_dashboard(live: LiveServer, browser: Browser) -> None:
    """Upload (picker and drop), create, watch the charts move, cancel twice, download."""
    ARTIFACTS.mkdir(exist_ok=True)
    context, page, console_errors = keyed_page(browser)
    page.on("dialog", lambda dialog: dialog.accept())
    try:
        page.goto(f"{live.url}/dashboard")
        expect(page.locator("#viewer")).to_have_text("key “default” (admin)", timeout=30_000)
        expect(page.locator("#endpoint option")).not_to_have_count(0, timeout=30_000)
        endpoints = page.locator("#endpoint option").all_inner_texts()
        assert "/v1/chat/completions" in endpoints and "/v1/embeddings" not in endpoints

        # Not a batch file: the API's error message shows inline, no batch is made.
        page.set_input_files(
            "#file-input", {"name": "bad.jsonl", "mimeType": "text/plain", "buffer": b"\x00"}
        )
        expect(page.locator("#action-error")).to_be_visible(timeout=30_000)
        assert page.locator("#action-error").inner_text().startswith("400: ")
        expect(page.locator("#create-batch")).to_be_disabled()
        assert [e for e in console_errors if "400" in e] == console_errors  # that refusal only
        console_errors.clear()

        # The file picker: uploaded with progress, then a batch made from it.
        first = batch_file(FIRST_LINES)
        page.set_input_files(
            "#file-input", {"name": "first.jsonl", "mimeType": "text/plain", "buffer": first}
        )
        expect(page.locator("#upload-state")).to_contain_text("Uploaded first.jsonl")
        expect(page.locator("#action-error")).to_be_hidden()
        assert page.locator("#upload-progress").evaluate("el => el.value") == 100
        first_id = create_from_form(page)
        row = page.locator(f'tr[data-batch-id="{first_id}"]')
        expect(row).to_be_visible(timeout=30_000)

        # The charts are the server's samples: more points arrive, the queue is drawn.
        expect(page.locator("#chart-rate canvas")).to_have_count(1, timeout=30_000)
        expect(page.locator("#chart-queue canvas")).to_have_count(1)
        points = grows(page, "document.getElementById('chart-rate').dataset.points")
        assert points[-1] > points[0], points

        # A dropped file becomes a second batch, cancelled from the list (confirmed).
        drop_file(page, "second.jsonl", batch_file(80))
        expect(page.locator("#upload-state")).to_contain_text("Uploaded second.jsonl")
        second_id = create_from_form(page)
        cancel = page.locator(f'tr[data-batch-id="{second_id}"] button[data-action="cancel"]')
        cancel.click(timeout=30_000)
        deadline = time.monotonic() + 60
        while batch_status(second_id, live) not in ("cancelling", "cancelled"):
            assert time.monotonic() < deadline, batch_status(second_id, live)
            time.sleep(0.2)
        expect(page.locator(f'tr[data-batch-id="{second_id}"]')).to_have_attribute(
            "data-status", re.compile("cancell"), timeout=30_000
        )

        # A third one, cancelled from its page: dismissing the confirm changes nothing.
        client = OpenAI(base_url=live.base_url, api_key=KEY)
        upload = client.files.create(file=("third.jsonl", batch_file(40)), purpose="batch")
        third = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        third_page = context.new_page()
        third_page.goto(f"{live.url}/dashboard/batches/{third.id}")
        third_page.once("dialog", lambda dialog: dialog.dismiss())
        third_page.click("#cancel-batch", timeout=30_000)
        assert batch_status(third.id, live) in ("validating", "in_progress")
        third_page.once("dialog", lambda dialog: dialog.accept())
        third_page.click("#cancel-batch", timeout=30_000)
        expect(third_page.locator("#status")).to_have_text(re.compile("cancell"), timeout=30_000)
        expect(third_page.locator("#cancel-batch")).to_be_hidden()
        third_page.close()

        # The first batch's page: its progress chart and count move while it runs.
        page.goto(f"{live.url}/dashboard/batches/{first_id}")
        expect(page.locator("#chart-progress canvas")).to_have_count(1, timeout=30_000)
        if batch_status(first_id, live) == "in_progress":
            read = "document.getElementById('chart-progress').dataset.completed"
            done = grows(page, read, times=1, deadline_s=120)
            assert done[-1] > done[0], done
        expect(page.locator("#status")).to_have_text("completed", timeout=120_000)
        expect(page.locator("#chart-progress")).to_have_attribute(
            "data-completed", str(FIRST_LINES), timeout=30_000
        )
        batch = client.batches.retrieve(first_id)
        assert batch.output_file_id and batch.request_counts
        assert batch.request_counts.completed == FIRST_LINES
        assert download(page, "#download-output") == api_file(live, batch.output_file_id)
        expect(page.locator("#cancel-batch")).to_be_hidden()
        page.screenshot(path=str(ARTIFACTS / "dashboard-batch-progress.png"), full_page=True)

        # The overview's charts hold the whole run (a page opened late sees it too).
        late = context.new_page()
        late.goto(f"{live.url}/dashboard")
        expect(late.locator("#chart-rate canvas")).to_have_count(1, timeout=30_000)
        history = httpx.get(
            f"{live.base_url}/dashboard/history", headers={"Authorization": f"Bearer {KEY}"}
        ).json()
        assert max(r or 0 for r in history["lines_per_second"]) > 0, history
        assert max(history["queued_lines"]) + max(history["running_lines"]) > 0, history
        assert int(late.locator("#chart-rate").get_attribute("data-points") or 0) > 3
        late.locator("section.wide").nth(1).screenshot(path=str(ARTIFACTS / "dashboard-charts.png"))
        if os.environ.get("VLLM_BATCH_UPDATE_SCREENSHOTS") == "1":
            CHARTS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ARTIFACTS / "dashboard-charts.png", CHARTS_IMAGE)
        assert not console_errors, console_errors
    finally:
        context.close()


def test_swagger_ui_sends_the_key(live: LiveServer, browser: Browser) -> None:
    """``/docs`` loads from the server (strict CSP, no CDN); "Try it out" on ``GET
    /v1/batches`` gets 401 until the key is given to "Authorize", then 200."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    outside: list[str] = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(live.url) else None)
    try:
        response = page.goto(f"{live.url}/docs")
        assert (
            response is not None
            and "script-src 'self'" in response.headers["content-security-policy"]
        )
        path = page.locator('.opblock-summary-path[data-path="/v1/batches"]')
        block = page.locator(".opblock-get").filter(has=path)
        expect(block).to_have_count(1, timeout=60_000)
        block.locator(".opblock-summary").click()
        block.locator(".try-out__btn").click()

        def execute() -> str:
            block.locator(".execute").click()
            status = block.locator(".live-responses-table .response .response-col_status")
            expect(status).to_be_visible(timeout=30_000)
            text = status.first.inner_text().split()[0]
            block.locator(".btn-clear").click()
            return text

        assert execute() == "401"
        page.locator(".auth-wrapper .authorize").click()
        modal = page.locator(".modal-ux")
        modal.locator("input").fill(KEY)
        modal.locator("button.authorize").click()
        modal.locator("button.btn-done").click()
        assert execute() == "200"
        assert not outside, outside
        # The only console errors: the 401 of the first try.
        assert all("401" in e for e in console_errors), console_errors
    finally:
        context.close()
