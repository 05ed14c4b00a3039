// gptrain dashboard: draws a run's metrics.jsonl rows and sends its controls. Every API call carries the
// token from the URL fragment (#token=...) in an Authorization header; corpus text is shown as text only.
"use strict";

const token = new URLSearchParams(location.hash.slice(1)).get("token") || "";
const state = { run: 0, offset: 0, rows: [], abort: null };

function api(path, options = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + token }, options.headers || {});
  return fetch(path, Object.assign({}, options, { headers }));
}

function setStatus(text) { document.getElementById("status").textContent = text; }

function smooth(values, weight) {
  let last = null;
  return values.map((v) => (last = last === null ? v : last * weight + (1 - weight) * v));
}

function series(kind, key) {
  const x = document.getElementById("x-axis").value;
  const rows = state.rows.filter((r) => r.kind === kind && typeof r[key] === "number" && typeof r[x] === "number");
  return { x: rows.map((r) => r[x]), y: rows.map((r) => r[key]) };
}

function draw() {
  if (!window.Plotly) return;
  const weight = Number(document.getElementById("smoothing").value);
  const train = series("train", "loss");
  const val = series("val", "val_loss");
  const layout = (title, logY) => ({ title: { text: title, font: { size: 13 } }, margin: { t: 30, r: 10, b: 30, l: 50 },
    yaxis: { type: logY ? "log" : "linear" }, xaxis: { title: document.getElementById("x-axis").value } });
  const logY = document.getElementById("log-y").checked;
  Plotly.react("chart-loss", [
    { x: train.x, y: train.y, name: "train loss", mode: "lines", line: { width: 1, color: "rgba(31,119,180,0.3)" } },
    { x: train.x, y: smooth(train.y, weight), name: "train (smoothed)", mode: "lines", line: { color: "#1f77b4" } },
    { x: val.x, y: val.y, name: "val loss", mode: "lines+markers", line: { color: "#ff7f0e" } },
  ], layout("loss", logY), { responsive: true });
  const one = (id, kind, key, title) => {
    const s = series(kind, key);
    Plotly.react(id, [{ x: s.x, y: s.y, mode: "lines", name: key }], layout(title, false), { responsive: true });
  };
  one("chart-lr", "train", "lr", "learning rate");
  one("chart-speed", "train", "tokens_per_second", "tokens/s");
  one("chart-grad", "train", "grad_norm", "grad norm");
  one("chart-system", "system", "cpu_percent", "trainer CPU % (100 = one core)");
}

function addText(listId, text, tag) {
  const item = document.createElement(tag);
  item.textContent = text;  // never innerHTML: samples are corpus text
  const list = document.getElementById(listId);
  list.prepend(item);
  while (list.children.length > 200) list.lastChild.remove();
}

function take(payload) {
  if (payload.reset) {  // the file was cut back (a resume): start over
    state.rows = [];
    document.getElementById("samples").textContent = "";
    document.getElementById("events").textContent = "";
  }
  state.offset = payload.offset;
  for (const row of payload.rows) {
    state.rows.push(row);
    if (row.kind === "sample") addText("samples", "step " + row.step + "\n" + row.text, "pre");
    if (row.kind === "event") addText("events", "step " + row.step + ": " + row.message, "li");
  }
  const last = [...state.rows].reverse().find((r) => r.kind === "train");
  setStatus(last ? "step " + last.step + " · loss " + last.loss.toFixed(4) : "no steps yet");
  draw();
}

async function follow() {
  if (state.abort) state.abort.abort();
  state.abort = new AbortController();
  const response = await api("/api/stream?run=" + state.run + "&offset=" + state.offset, { signal: state.abort.signal });
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
      if (event.startsWith("data: ")) take(JSON.parse(event.slice(6)));
    }
  }
}

async function showRun(index) {
  state.run = index; state.offset = 0; state.rows = [];
  const runs = await (await api("/api/runs")).json();
  const run = runs[index];
  document.getElementById("config").textContent = run.config;
  const list = document.getElementById("checkpoints");
  list.textContent = "";
  for (const c of run.checkpoints) addText("checkpoints", c.name + " (step " + c.step + ")", "li");
  take(Object.assign(await (await api("/api/rows?run=" + index)).json(), { reset: true }));
  follow().catch((e) => setStatus("disconnected: " + e));
}

async function sendControl(command) {
  const value = command === "lr_scale" ? Number(document.getElementById("lr-scale").value)
    : command === "eval_every" ? Number(document.getElementById("eval-every").value) : null;
  const answer = document.getElementById("control-answer");
  answer.textContent = command + "…";
  const response = await api("/api/control", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ run: state.run, command, value }) });
  const body = await response.json();
  answer.textContent = response.ok ? body.message : (body.detail || body.error);
}

async function generate() {
  const out = document.getElementById("generated");
  out.textContent = document.getElementById("prompt").value;
  const response = await api("/api/generate", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ run: state.run, prompt: document.getElementById("prompt").value,
      temperature: Number(document.getElementById("temperature").value),
      top_k: Number(document.getElementById("top-k").value), checkpoint: document.getElementById("which").value }) });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    out.textContent += decoder.decode(value, { stream: true });
  }
}

async function start() {
  if (!token) { setStatus("open the URL gptrain printed (it carries #token=...)"); return; }
  const runs = await (await api("/api/runs")).json();
  const select = document.getElementById("run");
  runs.forEach((r, i) => { const o = document.createElement("option"); o.value = i; o.textContent = r.name; select.append(o); });
  select.addEventListener("change", () => showRun(Number(select.value)));
  for (const b of document.querySelectorAll("button[data-command]")) b.addEventListener("click", () => sendControl(b.dataset.command));
  document.getElementById("generate").addEventListener("click", generate);
  for (const id of ["x-axis", "log-y", "smoothing"]) document.getElementById(id).addEventListener("input", draw);
  await showRun(0);
}

start().catch((e) => setStatus("error: " + e));
