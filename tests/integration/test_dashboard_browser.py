"""The dashboard in real headless Chromium (Debian's ``chromium``, driven by Playwright).

A live server with an API key and the session's tiny engine: the browser opens ``/``
(redirected to ``/dashboard``), is refused data until the key is entered once, watches a
batch made through the API progress to completed, opens its detail page (timeline,
chunks with their owners, deliveries), and downloads the output and error files, which
must equal the API's file contents. Screenshots go to ``test-artifacts/``; with
``VLLM_BATCH_UPDATE_SCREENSHOTS=1`` the overview also refreshes ``docs/img/dashboard.png``.
"""

from __future__ import annotations

import json
import os
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
        expect(events).to_have_count(4)
        assert events.evaluate_all("els => els.map(e => e.dataset.event)") == [
            "created",
            "in progress",
            "finalizing",
            "completed",
        ]
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
