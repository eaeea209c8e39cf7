// vLLM Batch dashboard: polls /v1 with the API key kept in localStorage and renders
// the overview (/dashboard) or one batch (/dashboard/batches/<id>). It also acts: upload a
// file and create a batch, cancel one. Charts use the vendored uPlot (uPlot.iife.min.js,
// loaded before this script); the data is the server's own history (/v1/dashboard/history).
"use strict";

(() => {
  const KEY_STORE = "vllm-batch:api-key";
  const POLL_MS = 1500;
  const RATE_WINDOW_S = 30;
  const TERMINAL = new Set(["completed", "failed", "cancelled", "expired"]);
  const RUNNING = new Set(["validating", "in_progress", "cancelling"]);
  const PHASES = ["validation", "queue", "run", "finalize"];
  // In the order they happen: a tie in whole seconds (OpenAI's stamps have no fraction,
  // the two line stamps do) keeps this order.
  const STAMPS = [
    ["created_at", "created"],
    ["in_progress_at", "in progress"],
    ["first_line_started_at", "first line started"],
    ["cancelling_at", "cancelling"],
    ["last_line_finished_at", "last line finished"],
    ["finalizing_at", "finalizing"],
    ["completed_at", "completed"],
    ["failed_at", "failed"],
    ["expired_at", "expired"],
    ["cancelled_at", "cancelled"],
  ];
  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ DOM helpers

  /** An element; string children become text nodes (never HTML). */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") el.className = value;
      else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else el.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function progressBar(done, total) {
    const pct = total > 0 ? Math.min(100, Math.floor((100 * done) / total)) : 0;
    const fill = h("div", { class: "fill" });
    fill.style.width = `${pct}%`;
    return h(
      "div",
      { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100,
        "aria-valuenow": pct, title: `${done} / ${total}` },
      fill,
      h("span", { class: "pct" }, `${pct}%`),
    );
  }

  const fmtNum = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en"));

  function fmtTime(ts) {
    if (!ts) return "–";
    const d = new Date(ts * 1000);
    const pad = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }

  /** A phase's length: tenths of a second below a minute ("0.4 s"), else as fmtDuration. */
  function fmtSeconds(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
    return seconds < 59.95 ? `${seconds.toFixed(1)} s` : fmtDuration(seconds);
  }

  const statusBadge = (status) =>
    h("span", { class: `status s-${String(status).replace(/\s+/g, "_")}` }, status);

  function notice(text, kind) {
    const el = $("notice");
    el.hidden = !text;
    el.textContent = text || "";
    el.className = `notice ${kind || ""}`;
  }

  // ------------------------------------------------------------------ API access

  const getKey = () => localStorage.getItem(KEY_STORE) || "";

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(path) {
    const headers = { Accept: "application/json" };
    const key = getKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    const res = await fetch(path, { headers, cache: "no-store" });
    if (!res.ok) {
      let message = res.statusText;
      try {
        message = (await res.json()).error.message || message;
      } catch (_) { /* not an API error body */ }
      throw new HttpError(res.status, message);
    }
    return res;
  }

  const getJSON = async (path) => (await api(path)).json();

  /** The ``error.message`` of an OpenAI-shaped error body, else ``fallback``. */
  function errorMessage(text, fallback) {
    try {
      return JSON.parse(text).error.message || fallback;
    } catch (_) {
      return fallback;
    }
  }

  /** POST ``body`` as JSON (or nothing) with the key; the parsed answer or an HttpError. */
  async function postJSON(path, body) {
    const headers = { Accept: "application/json" };
    const key = getKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const res = await fetch(path, {
      method: "POST", headers, cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    if (!res.ok) throw new HttpError(res.status, errorMessage(text, res.statusText));
    return JSON.parse(text);
  }

  /** POST /v1/files (purpose "batch") with XMLHttpRequest, reporting upload progress. */
  function uploadFile(file, onProgress) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", "/v1/files");
      xhr.setRequestHeader("Accept", "application/json");
      const key = getKey();
      if (key) xhr.setRequestHeader("Authorization", `Bearer ${key}`);
      xhr.upload.addEventListener("progress", (event) => {
        if (event.lengthComputable) onProgress(event.loaded / event.total);
      });
      xhr.addEventListener("load", () => {
        if (xhr.status >= 200 && xhr.status < 300) {
          try {
            resolve(JSON.parse(xhr.responseText));
          } catch (err) {
            reject(err);
          }
        } else {
          reject(new HttpError(xhr.status, errorMessage(xhr.responseText, xhr.statusText || "upload failed")));
        }
      });
      xhr.addEventListener("error", () => reject(new Error("the upload could not reach the server")));
      xhr.addEventListener("abort", () => reject(new Error("the upload was aborted")));
      const form = new FormData();
      form.append("purpose", "batch");
      form.append("file", file, file.name);
      xhr.send(form);
    });
  }

  const describe = (err) => (err instanceof HttpError ? `${err.status}: ${err.message}` : err.message);

  function inlineError(id, err) {
    const el = $(id);
    if (!el) return;
    el.hidden = !err;
    el.textContent = err ? describe(err) : "";
  }

  /** Fetch a file with the key (plain links cannot carry it) and save it as ``name``. */
  async function download(fileId, name) {
    try {
      const blob = await (await api(`/v1/files/${encodeURIComponent(fileId)}/content`)).blob();
      const url = URL.createObjectURL(blob);
      const link = h("a", { href: url, download: name, hidden: true });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
    } catch (err) {
      notice(`Download failed: ${err.message}`, "error");
    }
  }

  // ------------------------------------------------------------------ rates and ETA

  const samples = new Map(); // batch id -> [{t, done}] from successive polls

  const doneOf = (b) => b.request_counts.completed + b.request_counts.failed;

  function observe(b) {
    const now = Date.now() / 1000;
    const list = samples.get(b.id) || [];
    list.push({ t: now, done: doneOf(b) });
    while (list.length > 2 && now - list[0].t > RATE_WINDOW_S) list.shift();
    samples.set(b.id, list);
  }

  /** Lines per second: over recent polls while running, else from the batch's timestamps. */
  function rateOf(b) {
    const done = doneOf(b);
    if (TERMINAL.has(b.status) || b.status === "finalizing") {
      const end = b.finalizing_at || b.completed_at || b.cancelled_at || b.expired_at;
      const span = b.in_progress_at && end ? end - b.in_progress_at : 0;
      return span > 0 ? done / span : null;
    }
    if (b.status !== "in_progress" && b.status !== "cancelling") return null;
    const list = samples.get(b.id) || [];
    if (list.length >= 2) {
      const first = list[0];
      const last = list[list.length - 1];
      if (last.t - first.t >= 1) return (last.done - first.done) / (last.t - first.t);
    }
    const elapsed = b.in_progress_at ? Date.now() / 1000 - b.in_progress_at : 0;
    return elapsed > 0 && done > 0 ? done / elapsed : null;
  }

  /** Why the batch's output files cannot be written right now (storage full), if so. */
  function finalizeProblem(b) {
    const data = (b.errors && b.errors.data) || [];
    return data.find((e) => e.code === "storage_full") || null;
  }

  function etaOf(b, rate) {
    if (TERMINAL.has(b.status)) return "done";
    if (finalizeProblem(b)) return "storage full, retrying";
    if (b.status === "finalizing") return "writing files";
    const left = b.request_counts.total - doneOf(b);
    if (!rate || rate <= 0 || left <= 0) return "–";
    return fmtDuration(left / rate);
  }

  const fmtRate = (rate) => (rate === null ? "–" : rate.toFixed(rate < 10 ? 1 : 0));

  function errorList(errors) {
    if (!errors || !errors.length) return null;
    return h(
      "ul",
      { class: "errors" },
      errors.map((e) =>
        h(
          "li",
          {},
          e.line !== null && e.line !== undefined ? h("span", { class: "muted" }, `line ${e.line} `) : null,
          e.custom_id ? h("code", {}, e.custom_id) : null,
          e.code ? h("span", { class: "code" }, ` ${e.code}`) : null,
          `: ${e.message}`,
        ),
      ),
    );
  }

  function fileButtons(b) {
    const out = [];
    if (b.output_file_id) {
      out.push(h("button", { type: "button", class: "dl", "data-file": "output",
        onclick: () => download(b.output_file_id, `${b.id}_output.jsonl`) }, "output"));
    }
    if (b.error_file_id) {
      out.push(h("button", { type: "button", class: "dl", "data-file": "errors",
        onclick: () => download(b.error_file_id, `${b.id}_errors.jsonl`) }, "errors"));
    }
    return out.length ? out : [h("span", { class: "muted" }, "–")];
  }

  // ------------------------------------------------------------------ cancelling

  const CANCELLABLE = new Set(["validating", "in_progress"]);
  const rowErrors = new Map(); // batch id -> the last cancel error, shown in its row

  /** Cancel ``id`` after a confirmation; true if the server accepted it. */
  async function cancelBatch(id, onError) {
    if (!window.confirm(`Cancel batch ${id}? Lines not yet run are skipped.`)) return false;
    try {
      await postJSON(`/v1/batches/${encodeURIComponent(id)}/cancel`);
      onError(null);
      return true;
    } catch (err) {
      onError(err);
      return false;
    } finally {
      tick();
    }
  }

  // ------------------------------------------------------------------ charts (uPlot)

  const CHART_HEIGHT = 200;
  const charts = new Map(); // element id -> uPlot

  const chartWidth = (el) => Math.max(260, Math.floor(el.getBoundingClientRect().width) || 600);
  const fmtAxis = (digits) => (u, values) => values.map((v) => (v === null ? "" : Number(v).toFixed(digits)));

  /** Draw ``data`` (uPlot columns, x in seconds) in ``#id``, made once with ``options``. */
  function plot(id, options, data) {
    const el = $(id);
    if (!el || typeof uPlot === "undefined") return;
    let chart = charts.get(id);
    if (!chart) {
      el.replaceChildren();
      chart = new uPlot({ ...options, width: chartWidth(el), height: CHART_HEIGHT }, data, el);
      charts.set(id, chart);
    } else {
      chart.setData(data);
    }
    el.dataset.points = String(data[0].length);
  }

  function clearCharts() {
    for (const [id, chart] of charts) {
      chart.destroy();
      const el = $(id);
      if (el) el.dataset.points = "0";
    }
    charts.clear();
  }

  const line = (label, stroke, extra) => ({ label, stroke, width: 2, points: { show: false }, ...extra });
  const numberValue = (digits) => (u, v) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));

  const RATE_CHART = {
    scales: { x: { time: true }, lines: { auto: true }, tokens: { auto: true } },
    series: [
      {},
      line("lines/s", "#2f6fed", { scale: "lines", value: numberValue(1) }),
      line("tokens/s", "#1a7f37", { scale: "tokens", value: numberValue(0) }),
    ],
    axes: [
      {},
      { scale: "lines", label: "lines/s", values: fmtAxis(1), size: 50 },
      { scale: "tokens", label: "tokens/s", side: 1, grid: { show: false }, values: fmtAxis(0), size: 60 },
    ],
  };
  const QUEUE_CHART = {
    scales: { x: { time: true }, y: { auto: true, range: (u, min, max) => [0, Math.max(1, max)] } },
    series: [
      {},
      line("queued lines", "#b7791f", { fill: "rgba(183,121,31,.12)", value: numberValue(0) }),
      line("running lines", "#2f6fed", { fill: "rgba(47,111,237,.12)", value: numberValue(0) }),
    ],
    axes: [{}, { label: "lines", size: 50 }],
  };

  const SMOOTH_S = 30;

  /** Per-sample rates averaged over the trailing ``SMOOTH_S`` seconds (saves come in
   * groups of lines, so raw rates jump between zero and a spike). */
  function smooth(t, rates) {
    const out = [];
    for (let i = 0; i < t.length; i++) {
      let amount = 0;
      let span = 0;
      for (let k = i; k > 0 && t[i] - t[k - 1] <= SMOOTH_S + 1e-6; k--) {
        if (rates[k] === null) break;
        amount += rates[k] * (t[k] - t[k - 1]);
        span += t[k] - t[k - 1];
      }
      out.push(span > 0 ? amount / span : null);
    }
    return out;
  }

  function renderHistory(history) {
    const t = history.t;
    plot("chart-rate", RATE_CHART, [t, smooth(t, history.lines_per_second), smooth(t, history.tokens_per_second)]);
    plot("chart-queue", QUEUE_CHART, [history.t, history.queued_lines, history.running_lines]);
    const scope = history.scope === "all" ? "all keys" : "your batches";
    $("history-note").textContent =
      `${scope} · a sample every ${history.interval}s · ${history.t.length} samples`;
  }

  function renderProgressChart(hist) {
    const total = Math.max(1, hist.total);
    plot("chart-progress", {
      scales: { x: { time: true }, y: { range: () => [0, total] } },
      series: [
        {},
        line("completed", "#1a7f37", { fill: "rgba(26,127,55,.10)", value: numberValue(0) }),
        line("failed", "#c62828", { value: numberValue(0) }),
      ],
      axes: [{}, { label: "lines", size: 50 }],
    }, [hist.t, hist.completed, hist.failed]);
    const el = $("chart-progress");
    const last = hist.t.length - 1;
    el.dataset.completed = String(last >= 0 ? hist.completed[last] : 0);
    el.dataset.failed = String(last >= 0 ? hist.failed[last] : 0);
    $("progress-note").textContent = hist.sampled
      ? `${hist.t.length} points`
      : "not sampled by this server: start and end only";
  }

  window.addEventListener("resize", () => {
    for (const [id, chart] of charts) {
      const el = $(id);
      if (el) chart.setSize({ width: chartWidth(el), height: CHART_HEIGHT });
    }
  });

  // ------------------------------------------------------------------ new batch (upload)

  const draft = { fileId: null, uploading: false, endpoints: null };

  function setEndpoints(endpoints) {
    const select = $("endpoint");
    const key = endpoints.join(",");
    if (!select || draft.endpoints === key) return;
    draft.endpoints = key;
    const chosen = select.value;
    select.replaceChildren(...endpoints.map((e) => h("option", { value: e }, e)));
    if (endpoints.includes(chosen)) select.value = chosen;
  }

  async function takeFile(file) {
    if (!file || draft.uploading) return;
    inlineError("action-error", null);
    $("action-result").hidden = true;
    draft.fileId = null;
    draft.uploading = true;
    $("create-batch").disabled = true;
    const bar = $("upload-progress");
    const state = $("upload-state");
    bar.hidden = false;
    bar.value = 0;
    state.textContent = `Uploading ${file.name} (${fmtNum(file.size)} bytes)…`;
    try {
      const uploaded = await uploadFile(file, (fraction) => {
        bar.value = Math.round(100 * fraction);
      });
      bar.value = 100;
      draft.fileId = uploaded.id;
      state.replaceChildren(`Uploaded ${file.name} (${fmtNum(uploaded.bytes)} bytes) as `, h("code", { id: "uploaded-file" }, uploaded.id));
      $("create-batch").disabled = false;
    } catch (err) {
      bar.hidden = true;
      state.textContent = "";
      inlineError("action-error", err);
    } finally {
      draft.uploading = false;
      $("file-input").value = "";
    }
  }

  async function createBatch(event) {
    event.preventDefault();
    if (!draft.fileId) return;
    const button = $("create-batch");
    button.disabled = true;
    inlineError("action-error", null);
    try {
      const batch = await postJSON("/v1/batches", {
        input_file_id: draft.fileId,
        endpoint: $("endpoint").value,
        completion_window: $("completion-window").value,
      });
      draft.fileId = null;
      $("upload-progress").hidden = true;
      $("upload-state").textContent = "";
      const result = $("action-result");
      result.hidden = false;
      result.replaceChildren("Created ", h("a", { id: "created-batch", href: `/dashboard/batches/${encodeURIComponent(batch.id)}` }, batch.id), ".");
      tick();
    } catch (err) {
      button.disabled = false;
      inlineError("action-error", err);
    }
  }

  function setupNewBatch() {
    const zone = $("drop-zone");
    if (!zone) return;
    $("file-input").addEventListener("change", (event) => takeFile(event.target.files[0]));
    for (const name of ["dragenter", "dragover"]) {
      zone.addEventListener(name, (event) => {
        event.preventDefault();
        zone.classList.add("over");
      });
    }
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      const files = event.dataTransfer ? event.dataTransfer.files : null;
      if (files && files.length) takeFile(files[0]);
    });
    $("batch-form").addEventListener("submit", createBatch);
  }

  // ------------------------------------------------------------------ overview page

  const overview = { after: null, extra: [] };

  function batchRow(b) {
    observe(b);
    const rate = rateOf(b);
    const c = b.request_counts;
    return h(
      "tr",
      { "data-batch-id": b.id, "data-status": b.status },
      h("td", {}, h("a", { href: `/dashboard/batches/${encodeURIComponent(b.id)}` }, b.id),
        h("div", { class: "muted small" }, `${b.model || "model pending"} · ${b.endpoint}`)),
      h("td", { class: "status-cell" }, statusBadge(b.status)),
      h("td", {}, progressBar(doneOf(b), c.total)),
      h("td", { class: "num rate" }, fmtRate(rate)),
      h("td", { class: "num eta" }, etaOf(b, rate)),
      h("td", { class: "num counts-cell" },
        `${fmtNum(c.completed)} · `, h("span", { class: c.failed ? "bad" : "" }, fmtNum(c.failed)),
        ` · ${fmtNum(c.total)}`),
      h("td", { class: "small" }, fmtTime(b.created_at)),
      h("td", { class: "small" }, errorList(b.first_errors) || h("span", { class: "muted" }, "–")),
      h("td", { class: "files-cell" }, fileButtons(b)),
      h("td", { class: "actions-cell" },
        CANCELLABLE.has(b.status)
          ? h("button", { type: "button", class: "cancel danger", "data-action": "cancel",
            onclick: () => cancelBatch(b.id, (err) => {
              if (err) rowErrors.set(b.id, describe(err));
              else rowErrors.delete(b.id);
            }) }, "Cancel")
          : h("span", { class: "muted" }, "–"),
        rowErrors.has(b.id) ? h("span", { class: "row-error", role: "alert" }, rowErrors.get(b.id)) : null),
    );
  }

  /** Replace rows in place by batch id, so buttons stay put across polls. */
  function renderBatches(batches) {
    const body = $("batches").tBodies[0];
    const old = new Map([...body.rows].map((row) => [row.dataset.batchId, row]));
    const rows = batches.map((b) => {
      const fresh = batchRow(b);
      const prev = old.get(b.id);
      if (prev && prev.dataset.status === b.status && prev.textContent === fresh.textContent) {
        return prev; // unchanged: keep the node (and any pending click)
      }
      return fresh;
    });
    body.replaceChildren(...rows);
    $("no-batches").hidden = batches.length > 0;
  }

  function renderCounts(counts) {
    const parts = Object.entries(counts).sort().map(([s, n]) => h("span", { class: `chip s-${s}` }, `${s} ${n}`));
    $("counts").replaceChildren(...parts);
  }

  function renderQueue(queue) {
    $("queue").tBodies[0].replaceChildren(
      ...queue.map((q) =>
        h("tr", { "data-model": q.model },
          h("td", {}, q.model),
          h("td", { class: "num" }, fmtNum(q.batches)),
          h("td", { class: "num" }, `${fmtNum(q.queued_lines)} lines`,
            h("div", { class: "muted small" }, `${fmtNum(q.queued_chunks)} chunks`)),
          h("td", { class: "num" }, `${fmtNum(q.running_lines)} lines`,
            h("div", { class: "muted small" }, `${fmtNum(q.running_chunks)} chunks`))),
      ),
    );
    $("queue-empty").hidden = queue.length > 0;
  }

  function kvTable(obj) {
    const rows = Object.entries(obj)
      .filter(([, v]) => v !== null && v !== undefined && !(typeof v === "object" && !Object.keys(v).length))
      .map(([k, v]) => h("tr", {}, h("th", {}, k.replaceAll("_", " ")),
        h("td", {}, typeof v === "object" ? JSON.stringify(v) : String(v))));
    return h("table", { class: "kv" }, h("tbody", {}, rows));
  }

  function renderWorkers(data) {
    const parts = [];
    const local = data.this_process || {};
    if (local.enabled === false) {
      parts.push(h("p", { class: "muted" }, "This process runs no worker (API only)."));
    } else {
      parts.push(
        h("div", { class: "card", id: "this-worker" },
          h("h3", {}, "This process ", local.alive ? statusBadge("alive") : statusBadge("down")),
          kvTable({
            id: local.id,
            loaded_model: local.loaded_model || "none",
            engine: local.engine,
            busy: local.busy,
            current_chunk: local.current_chunk,
            chunks_done: local.chunks_done,
            restarts: local.restarts,
            database: local.database,
            serves: data.models.join(", "),
          })));
    }
    if (data.workers.length) {
      parts.push(
        h("table", { class: "grid", id: "remote-workers" },
          h("thead", {}, h("tr", {}, h("th", {}, "Worker (lease owner)"), h("th", {}, "Running chunks"),
            h("th", {}, "Models"), h("th", {}, "Lease until"))),
          h("tbody", {}, data.workers.map((w) =>
            h("tr", {}, h("td", {}, h("code", {}, w.id)), h("td", { class: "num" }, w.running_chunks),
              h("td", {}, w.models.join(", ")), h("td", {}, fmtTime(w.lease_until)))))));
    } else if (!data.viewer.admin) {
      parts.push(h("p", { class: "muted small" }, "Worker identities are shown to admin keys only."));
    }
    $("workers").replaceChildren(...parts);
    $("active-workers").textContent = `${data.active_workers} active`;
  }

  const gib = (bytes) => (bytes / 2 ** 30).toFixed(1);
  const GPU_COLUMNS = [
    ["GPU", ["index", "name"], (d) => `${d.index ?? ""} ${d.name ?? ""}`.trim()],
    ["Util", ["utilization_percent"], (d) => d.utilization_percent == null ? "–" : `${Math.round(d.utilization_percent)}%`],
    ["Memory", ["memory_used_bytes", "memory_total_bytes"], (d) => d.memory_total_bytes
      ? `${gib(d.memory_used_bytes || 0)} / ${gib(d.memory_total_bytes)} GiB` : "–"],
    ["Temp", ["temperature_celsius"], (d) => d.temperature_celsius == null ? "–" : `${Math.round(d.temperature_celsius)} °C`],
    ["Power", ["power_watts", "power_limit_watts"], (d) => d.power_watts == null ? "–"
      : `${Math.round(d.power_watts)}${d.power_limit_watts ? ` / ${Math.round(d.power_limit_watts)}` : ""} W`],
    ["Throttle", ["throttle_reasons"], (d) => [].concat(d.throttle_reasons || []).join(", ") || "none"],
  ];

  /** GPU health from /ready's ``gpu`` (readings and guard state); "no GPU" without one. */
  function renderGpu(ready) {
    const gpu = ready ? ready.gpu : undefined;
    const el = $("gpu");
    const devices = Array.isArray(gpu) ? gpu : gpu && (gpu.gpus || gpu.devices);
    if (!gpu || !Array.isArray(devices) || !devices.length) {
      const why = gpu && (gpu.reason || gpu.status || gpu.state);
      el.replaceChildren(h("p", { class: "muted", id: "no-gpu" }, "no GPU", why ? ` (${why})` : ""));
      return;
    }
    const known = new Set(["uuid", ...GPU_COLUMNS.flatMap(([, keys]) => keys)]);
    const extraKeys = [...new Set(devices.flatMap((d) => Object.keys(d)))].filter((k) => !known.has(k));
    const columns = [
      ...GPU_COLUMNS.filter(([, keys]) => devices.some((d) => keys.some((k) => k in d))),
      ...extraKeys.map((k) => [k.replaceAll("_", " "), [k], (d) => d[k] == null ? "–"
        : typeof d[k] === "object" ? JSON.stringify(d[k]) : String(d[k])]),
    ];
    const paused = !Array.isArray(gpu) && gpu.claims_paused;
    el.replaceChildren(
      paused ? h("p", { class: "bad", id: "gpu-paused" }, `Claims paused: ${gpu.pause_reason || "GPU guard"}`) : "",
      Array.isArray(gpu) ? "" : h("p", { class: "muted small" },
        `guard ${gpu.guard ?? "–"} · pauses ${gpu.pauses ?? 0} · OOM back-offs ${gpu.oom_backoffs ?? 0}`),
      h("table", { class: "grid", id: "gpus" },
        h("thead", {}, h("tr", {}, columns.map(([title]) => h("th", {}, title)))),
        h("tbody", {}, devices.map((d) => h("tr", {}, columns.map(([, , show]) => h("td", {}, show(d))))))),
    );
  }

  async function pollOverview() {
    const [info, list, ready, history] = await Promise.all([
      getJSON("/v1/dashboard/overview"),
      getJSON("/v1/dashboard/batches?limit=50"),
      getJSON("/ready").catch(() => null), // 503 while not ready: render without it
      getJSON("/v1/dashboard/history"),
    ]);
    showViewer(info.viewer);
    setEndpoints(info.endpoints || []);
    renderHistory(history);
    renderCounts(info.batches);
    renderBatches([...list.data, ...overview.extra.filter((b) => !list.data.some((x) => x.id === b.id))]);
    if (!overview.extra.length) overview.after = list.has_more ? list.last_id : null;
    $("more").hidden = !overview.after;
    renderQueue(info.queue);
    renderWorkers(info);
    renderGpu(ready);
  }

  async function loadMore() {
    if (!overview.after) return;
    const more = await getJSON(`/v1/dashboard/batches?limit=100&after=${encodeURIComponent(overview.after)}`);
    overview.extra.push(...more.data);
    overview.after = more.has_more ? more.last_id : null;
    $("more").hidden = !overview.after;
  }

  // ------------------------------------------------------------------ batch page

  function renderSummary(b) {
    observe(b);
    const rate = rateOf(b);
    const c = b.request_counts;
    $("status").replaceChildren(statusBadge(b.status));
    document.body.dataset.status = b.status;
    const usage = b.usage
      ? `${fmtNum(b.usage.input_tokens)} in (${fmtNum(b.usage.input_tokens_details.cached_tokens)} cached) · ${fmtNum(b.usage.output_tokens)} out`
      : null;
    $("summary").replaceChildren(
      progressBar(doneOf(b), c.total),
      kvTable({
        model: b.model,
        endpoint: b.endpoint,
        owner: b.owner,
        completed: c.completed,
        failed: c.failed,
        total: c.total,
        lines_per_second: fmtRate(rate),
        eta: etaOf(b, rate),
        tokens: usage,
        completion_window: b.completion_window,
        metadata: b.metadata,
      }),
    );
    const buttons = [
      ["download-output", b.output_file_id, "output"],
      ["download-errors", b.error_file_id, "errors"],
      ["download-input", b.input_file_id, "input"],
    ];
    for (const [id, fileId, what] of buttons) {
      const button = $(id);
      button.hidden = !fileId;
      button.onclick = fileId ? () => download(fileId, `${b.id}_${what}.jsonl`) : null;
    }
    const cancel = $("cancel-batch");
    cancel.hidden = !CANCELLABLE.has(b.status);
    cancel.onclick = () => cancelBatch(b.id, (err) => inlineError("batch-action-error", err));
    // "last line finished" is the latest save so far until the batch stops running lines.
    const running = RUNNING.has(b.status);
    const stamps = STAMPS
      .map(([field, label], order) => [b[field], label, order])
      .filter(([ts, label]) => ts && !(running && label === "last line finished"));
    stamps.sort((x, y) => Math.floor(x[0]) - Math.floor(y[0]) || x[2] - y[2]);
    const spans = b.phases || {};
    const phases = PHASES.filter((name) => spans[name] !== null && spans[name] !== undefined)
      .flatMap((name, i) => [i ? " · " : "",
        h("span", { class: "phase", "data-phase": name }, `${name} ${fmtSeconds(spans[name])}`)]);
    $("timeline").replaceChildren(
      ...stamps.map(([ts, label]) =>
        h("li", { "data-event": label }, h("span", { class: "when" }, fmtTime(ts)), " ", statusBadge(label),
          h("span", { class: "muted" }, ` +${fmtDuration(Math.floor(ts) - b.created_at)}`))),
      b.expires_at && !TERMINAL.has(b.status)
        ? h("li", { class: "muted" }, h("span", { class: "when" }, fmtTime(b.expires_at)), " window ends")
        : "",
      phases.length ? h("li", { class: "phases", id: "phases" }, ...phases) : "",
    );
    $("errors").replaceChildren(...(b.first_errors.length
      ? errorList(b.first_errors).children
      : [h("li", { class: "muted" }, "none")]));
  }

  function renderChunks(chunks) {
    $("chunks").tBodies[0].replaceChildren(
      ...chunks.data.map((c) =>
        h("tr", { "data-chunk": c.index, "data-status": c.status },
          h("td", { class: "num" }, c.index),
          h("td", { class: "num" }, `${c.start_line}–${c.end_line - 1}`),
          h("td", {}, c.model),
          h("td", {}, statusBadge(c.status)),
          h("td", {}, progressBar(c.saved_lines, c.lines)),
          h("td", { class: "num" }, c.attempts),
          h("td", { class: "num" }, c.engine_failures),
          h("td", { class: "owner" }, chunks.owners_visible
            ? (c.lease_owner ? h("code", {}, c.lease_owner) : "–")
            : h("span", { class: "muted" }, "admin only")),
          h("td", { class: "small" }, fmtTime(c.lease_until)))),
    );
  }

  function renderDeliveries(list) {
    $("deliveries").tBodies[0].replaceChildren(
      ...list.data.map((d) =>
        h("tr", { "data-delivery": d.id, "data-status": d.status },
          h("td", {}, d.kind),
          h("td", {}, h("code", {}, d.target)),
          h("td", {}, d.event_type),
          h("td", {}, statusBadge(d.status)),
          h("td", { class: "num" }, d.attempts),
          h("td", { class: "num" }, d.last_status_code ?? "–"),
          h("td", { class: "small" }, d.last_error || "–"),
          h("td", { class: "small" }, fmtTime(d.last_attempt_at)),
          h("td", { class: "small" }, fmtTime(d.finished_at)))),
    );
    $("no-deliveries").hidden = list.data.length > 0;
  }

  async function pollBatch() {
    const id = encodeURIComponent(document.body.dataset.batchId);
    const [batch, chunks, deliveries, info, history] = await Promise.all([
      getJSON(`/v1/dashboard/batches/${id}`),
      getJSON(`/v1/dashboard/batches/${id}/chunks`),
      getJSON(`/v1/batches/${id}/deliveries`),
      viewerShown ? null : getJSON("/v1/dashboard/overview"),
      getJSON(`/v1/dashboard/batches/${id}/history`),
    ]);
    if (info) showViewer(info.viewer);
    renderSummary(batch);
    renderProgressChart(history);
    renderChunks(chunks);
    renderDeliveries(deliveries);
  }

  // ------------------------------------------------------------------ key and polling

  let viewerShown = false;

  function showViewer(viewer) {
    viewerShown = true;
    const text = !viewer.keys_required
      ? "no API key needed"
      : `key “${viewer.name}”${viewer.admin ? " (admin)" : ""}`;
    $("viewer").textContent = text;
  }

  let timer = null;
  let stopped = false;

  async function tick() {
    clearTimeout(timer);
    const poll = document.body.dataset.view === "batch" ? pollBatch : pollOverview;
    try {
      await poll();
      notice("");
      document.body.dataset.loaded = "true";
    } catch (err) {
      if (err instanceof HttpError && err.status === 401) {
        notice(getKey() ? "This API key was refused: enter a valid one above."
          : "This server needs an API key: enter it above.", "error");
        $("viewer").textContent = "no valid key";
        for (const el of document.querySelectorAll("main tbody, #counts, #workers, #gpu, #summary, #timeline, #errors")) {
          el.replaceChildren(); // a forgotten or refused key shows nothing
        }
        clearCharts();
        viewerShown = false;
        stopped = true; // until a key is saved
        return;
      }
      notice(err instanceof HttpError ? `${err.status}: ${err.message}` : `Cannot reach the server (${err.message}); retrying…`, "error");
    }
    if (!stopped) timer = setTimeout(tick, POLL_MS);
  }

  function setup() {
    const input = $("api-key");
    input.value = getKey();
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (key) localStorage.setItem(KEY_STORE, key);
      else localStorage.removeItem(KEY_STORE);
      stopped = false;
      viewerShown = false;
      tick();
    });
    $("forget-key").addEventListener("click", () => {
      localStorage.removeItem(KEY_STORE);
      input.value = "";
      stopped = false;
      viewerShown = false;
      tick();
    });
    setupNewBatch();
    const more = $("more");
    if (more) more.addEventListener("click", () => loadMore().then(tick));
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && !stopped) tick();
    });
    tick();
  }

  document.addEventListener("DOMContentLoaded", setup);
})();
