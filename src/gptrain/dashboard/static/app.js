// gptrain dashboard: draws runs' metrics.jsonl rows (one run followed in full, others overlaid on its
// charts) and sends its controls. Every API call carries the token from the URL fragment (#token=...)
// in an Authorization header; corpus text (samples, prompts, the log) is shown as text only.
"use strict";

const token = new URLSearchParams(location.hash.slice(1)).get("token") || "";
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"];
const RUNS_EVERY_MS = 3000;  // checkpoints, live/finished state
const LOG_EVERY_MS = 2000;
const MAX_LIST_ITEMS = 200;
const state = { main: 0, shown: new Set(), runs: [], data: new Map(), logOffset: 0 };

function api(path, options = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + token }, options.headers || {});
  return fetch(path, Object.assign({}, options, { headers }));
}

async function getJson(path) {
  const response = await api(path);
  if (!response.ok) throw new Error(path + ": " + response.status);
  return response.json();
}

function byId(id) { return document.getElementById(id); }

function setStatus(text) { byId("status").textContent = text; }

function smooth(values, weight) {
  let last = null;
  return values.map((v) => (last = last === null ? v : last * weight + (1 - weight) * v));
}

function series(rows, kind, key, scale = 1) {
  const x = byId("x-axis").value;
  const kept = rows.filter((r) => r.kind === kind && typeof r[key] === "number" && typeof r[x] === "number");
  return { x: kept.map((r) => r[x]), y: kept.map((r) => r[key] * scale) };
}

function layout(title, logY) {
  return { title: { text: title, font: { size: 13 } }, margin: { t: 30, r: 10, b: 30, l: 55 },
    yaxis: { type: logY ? "log" : "linear" }, xaxis: { title: byId("x-axis").value }, showlegend: true,
    legend: { font: { size: 10 } } };
}

// The runs drawn: the followed one first, then the ones ticked to overlay it, each with its colour.
function drawn() {
  return [state.main, ...[...state.shown].filter((i) => i !== state.main)]
    .filter((i) => state.data.has(i)).map((i) => ({ index: i, rows: state.data.get(i).rows,
      name: state.runs[i] ? state.runs[i].name : String(i), color: COLORS[i % COLORS.length] }));
}

function lossTraces(weight) {
  const traces = [];
  for (const run of drawn()) {
    const train = series(run.rows, "train", "loss");
    const val = series(run.rows, "val", "val_loss");
    if (run.index === state.main) {
      traces.push({ x: train.x, y: train.y, name: run.name + " train", mode: "lines",
        line: { width: 1, color: run.color }, opacity: 0.3 });
    }
    traces.push({ x: train.x, y: smooth(train.y, weight), name: run.name + " train (smoothed)", mode: "lines",
      line: { color: run.color } });
    traces.push({ x: val.x, y: val.y, name: run.name + " val", mode: "lines+markers",
      line: { color: run.color, dash: "dot" }, marker: { symbol: "diamond" } });
  }
  return traces;
}

function drawSmall(id, key, title, scale = 1) {
  const traces = drawn().map((run) => Object.assign(series(run.rows, "train", key, scale),
    { name: run.name, mode: "lines", line: { color: run.color } }));
  Plotly.react(id, traces, layout(title, false), { responsive: true });
}

function drawSystem() {
  const main = state.data.get(state.main);
  const rows = main ? main.rows : [];
  const traces = [["cpu_percent", "trainer CPU % (100 = one core)"], ["memory_percent", "memory %"],
    ["gpu_utilization", "GPU utilisation %"], ["gpu_memory_percent", "GPU memory %"]]
    .map(([key, name]) => Object.assign(series(rows, "system", key), { name, mode: "lines+markers" }))
    .filter((t) => t.y.length > 0);
  Plotly.react("chart-system", traces, layout("system use", false), { responsive: true });
}

function draw() {
  if (!window.Plotly) return;
  const weight = Number(byId("smoothing").value);
  Plotly.react("chart-loss", lossTraces(weight), layout("loss", byId("log-y").checked), { responsive: true });
  drawSmall("chart-lr", "lr", "learning rate");
  drawSmall("chart-speed", "tokens_per_second", "tokens/s");
  drawSmall("chart-mfu", "mfu", "MFU %", 100);
  drawSmall("chart-grad", "grad_norm", "grad norm");
  drawSystem();
}

function addText(listId, text, tag) {
  const item = document.createElement(tag);
  item.textContent = text;  // never innerHTML: samples and events carry corpus text
  const list = byId(listId);
  list.prepend(item);
  while (list.children.length > MAX_LIST_ITEMS) list.lastChild.remove();
}

function showRowText(row) {
  if (row.kind === "sample") addText("samples", "step " + row.step + "\n" + row.text, "pre");
  if (row.kind === "event") addText("events", "step " + row.step + ": " + row.message, "li");
}

// What the followed run is doing, from its rows: the last step, and paused / finished.
function runStatus(rows) {
  let phase = "", last = null;
  for (const row of rows) {
    if (row.kind === "train") last = row;
    if (row.kind !== "event") continue;
    if (row.command === "pause") phase = "paused";
    if (row.command === "resume" || /^resumed from step/.test(row.message || "")) phase = "";
    if (/^(done:|stopped at step|early stop)/.test(row.message || "")) phase = "finished";
  }
  const info = state.runs[state.main];
  if (phase !== "finished" && info && !info.is_live) phase = "not running";
  if (!last) return "no steps yet" + (phase ? " · " + phase : "");
  return "step " + last.step + " · loss " + last.loss.toFixed(4) + (phase ? " · " + phase : "");
}

function take(index, payload) {
  const data = state.data.get(index);
  if (!data) return;
  const isMain = index === state.main;
  if (payload.reset) {  // the file was cut back (a resume): start over
    data.rows = [];
    if (isMain) { byId("samples").textContent = ""; byId("events").textContent = ""; }
  }
  data.offset = payload.offset;
  for (const row of payload.rows) {
    data.rows.push(row);
    if (isMain) showRowText(row);
  }
  if (isMain && payload.rows.some((r) => r.kind === "event" && /saved/.test(r.message || ""))) {
    refreshRuns().catch(() => {});  // a checkpoint was written: list it now
  }
  if (isMain) setStatus(runStatus(data.rows));
  draw();
}

async function follow(index) {
  const data = state.data.get(index);
  const response = await api("/api/stream?run=" + index + "&offset=" + data.offset, { signal: data.abort.signal });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (event.startsWith("data: ")) take(index, JSON.parse(event.slice(6)));
    }
  }
}

// Start drawing a run: its thinned rows, then new ones as they come.
async function load(index) {
  if (state.data.has(index)) return;
  const data = { offset: 0, rows: [], abort: new AbortController() };
  state.data.set(index, data);
  take(index, Object.assign(await getJson("/api/rows?run=" + index), { reset: true }));
  follow(index).catch((e) => { if (e.name !== "AbortError") setStatus("disconnected: " + e); });
}

function unload(index) {
  const data = state.data.get(index);
  if (data) data.abort.abort();
  state.data.delete(index);
}

function showCheckpoints() {
  const run = state.runs[state.main];
  byId("config").textContent = run.config;
  const list = byId("checkpoints");
  const items = run.checkpoints.map((c) => c.name + " (step " + c.step + ")");
  if (items.join("\n") === [...list.children].map((li) => li.textContent).reverse().join("\n")) return;
  list.textContent = "";
  for (const item of items) addText("checkpoints", item, "li");
}

async function refreshRuns() {
  state.runs = await getJson("/api/runs");
  showCheckpoints();
  const main = state.data.get(state.main);
  if (main) setStatus(runStatus(main.rows));
}

async function showRun(index) {
  if (index !== state.main && !state.shown.has(state.main)) unload(state.main);
  state.main = index;
  byId("samples").textContent = ""; byId("events").textContent = ""; byId("log").textContent = "";
  state.logOffset = 0;
  showCheckpoints();
  const data = state.data.get(index);
  if (data) { data.rows.forEach(showRowText); setStatus(runStatus(data.rows)); draw(); }
  else await load(index);
  await pollLog();
}

async function pollLog() {
  const index = state.main;
  const answer = await getJson("/api/log?run=" + index + "&offset=" + state.logOffset);
  if (index !== state.main) return;
  const log = byId("log");
  if (answer.reset) log.textContent = "";
  log.textContent = (log.textContent + answer.text).slice(-64 * 1024);
  if (answer.text) log.scrollTop = log.scrollHeight;
  state.logOffset = answer.offset;
}

function buildRunPickers() {
  const select = byId("run");
  const overlay = byId("overlay");
  state.runs.forEach((r, i) => {
    const option = document.createElement("option");
    option.value = i; option.textContent = r.name;
    select.append(option);
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox"; box.dataset.run = i; box.checked = false;
    box.addEventListener("change", () => toggleOverlay(i, box.checked));
    label.append(box, " " + r.name);
    overlay.append(label);
  });
  select.addEventListener("change", () => showRun(Number(select.value)));
  byId("overlay-box").hidden = state.runs.length < 2;
}

function toggleOverlay(index, isOn) {
  if (isOn) { state.shown.add(index); load(index).then(draw); }
  else { state.shown.delete(index); if (index !== state.main) unload(index); draw(); }
}

async function sendControl(command) {
  const inputs = { lr_scale: "lr-scale", eval_every: "eval-every", sample_every: "sample-every" };
  const value = inputs[command] ? Number(byId(inputs[command]).value) : null;
  const answer = byId("control-answer");
  answer.textContent = command + "…";
  const response = await api("/api/control", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ run: state.main, command, value }) });
  const body = await response.json();
  answer.textContent = response.ok ? body.message : (body.detail || body.error);
}

async function generate() {
  const out = byId("generated");
  out.textContent = byId("prompt").value;
  const response = await api("/api/generate", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ run: state.main, prompt: byId("prompt").value,
      temperature: Number(byId("temperature").value), top_k: Number(byId("top-k").value),
      max_tokens: Number(byId("max-tokens").value), checkpoint: byId("which").value }) });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    out.textContent += decoder.decode(value, { stream: true });
  }
}

function every(ms, job) {
  const tick = () => job().catch(() => {}).finally(() => setTimeout(tick, ms));
  setTimeout(tick, ms);
}

async function start() {
  if (!token) { setStatus("open the URL gptrain printed (it carries #token=...)"); return; }
  state.runs = await getJson("/api/runs");
  buildRunPickers();
  for (const b of document.querySelectorAll("button[data-command]")) b.addEventListener("click", () => sendControl(b.dataset.command));
  byId("generate").addEventListener("click", generate);
  for (const id of ["x-axis", "log-y", "smoothing"]) byId(id).addEventListener("input", draw);
  await showRun(0);
  every(RUNS_EVERY_MS, refreshRuns);
  every(LOG_EVERY_MS, pollLog);
}

start().catch((e) => setStatus("error: " + e));
