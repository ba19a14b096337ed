// lab serve's page: a playground on /v1/completions and a view of the runs' curves, recipe and samples.
// Plain JavaScript, no build step. The API key, when the server wants one, is asked of the user and
// kept in this tab's sessionStorage; it is never part of the page.
"use strict";

const $ = (id) => document.getElementById(id);
let controller = null; // the generation in flight, for Stop
let chart = null;
let runTimer = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem("lab-api-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, options = {}) {
  const r = await fetch(path, { ...options, headers: headers() });
  if (r.status === 401) {
    $("key-form").hidden = false;
    $("api-key").focus();
    throw new Error("this server needs an API key: enter it at the top right");
  }
  if (!r.ok) {
    let message = r.status + " " + r.statusText;
    try { message = (await r.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return r;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

// ------------------------------------------------------------------------------- playground

async function loadModels() {
  const models = (await (await api("/v1/models")).json()).data;
  const select = $("model");
  select.innerHTML = "";
  for (const m of models) select.add(new Option(m.id, m.id));
}

async function generate() {
  showError("");
  $("output-prompt").textContent = $("prompt").value;
  $("output-text").textContent = "";
  $("stats").textContent = "starting…";
  const body = {
    model: $("model").value, prompt: $("prompt").value, stream: true,
    max_tokens: parseInt($("max_tokens").value, 10),
    temperature: parseFloat($("temperature").value),
    top_k: parseInt($("top_k").value, 10),
    top_p: parseFloat($("top_p").value),
  };
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  const started = performance.now();
  let first = null, tokens = 0, reason = null;
  try {
    const r = await api("/v1/completions", { method: "POST", body: JSON.stringify(body), signal: controller.signal });
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) { // one server-sent event
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
        const choice = JSON.parse(event.slice(6)).choices[0];
        if (choice.text) {
          first = first ?? performance.now();
          tokens += 1;
          $("output-text").textContent += choice.text;
        }
        reason = choice.finish_reason || reason;
        showStats(started, first, tokens, reason);
      }
    }
  } catch (e) {
    if (e.name === "AbortError") reason = "stopped";
    else showError(e.message);
  } finally {
    controller = null;
    $("generate").disabled = false;
    $("stop").disabled = true;
    showStats(started, first, tokens, reason);
  }
}

function showStats(started, first, tokens, reason) {
  const now = performance.now();
  const parts = [tokens + " tokens"];
  if (first !== null) {
    parts.push("first after " + ((first - started) / 1000).toFixed(2) + " s");
    if (tokens > 1 && now > first) parts.push((1000 * (tokens - 1) / (now - first)).toFixed(1) + " tokens/s");
  }
  if (reason) parts.push(reason);
  $("stats").textContent = parts.join(" · ");
}

// -------------------------------------------------------------------------------------- runs

async function loadRuns() {
  const runs = (await (await api("/api/runs")).json()).runs;
  const list = $("runs-list");
  list.innerHTML = "";
  for (const run of runs) {
    const b = document.createElement("button");
    b.textContent = run.id + (run.step !== null ? " (step " + run.step + ")" : " (training, no checkpoint yet)");
    b.dataset.run = run.id;
    b.onclick = () => openRun(run.id);
    const li = document.createElement("li");
    li.appendChild(b);
    list.appendChild(li);
  }
}

async function openRun(id) {
  for (const b of document.querySelectorAll("#runs-list button")) b.classList.toggle("active", b.dataset.run === id);
  $("run-detail").hidden = false;
  $("run-title").textContent = id;
  const enc = encodeURIComponent(id);
  const [recipe, generated] = await Promise.all([
    api("/api/runs/" + enc + "/recipe").then((r) => r.text()),
    api("/api/runs/" + enc + "/generated").then((r) => r.text()),
  ]);
  $("recipe").textContent = recipe || "(none)";
  $("generated").textContent = generated || "(none yet: written when training ends)";
  if (chart) { chart.destroy(); chart = null; }
  clearInterval(runTimer);
  await drawCurves(id);
  runTimer = setInterval(() => drawCurves(id).catch((e) => showError(e.message)), 2000); // live while it trains
}

async function drawCurves(id) {
  const records = (await (await api("/api/runs/" + encodeURIComponent(id) + "/metrics")).json()).records;
  const steps = [...new Set(records.map((r) => r.step))].sort((a, b) => a - b);
  const at = new Map(steps.map((s, i) => [s, i]));
  const train = steps.map(() => null), val = steps.map(() => null);
  for (const r of records) {
    if (r.loss !== undefined) train[at.get(r.step)] = r.loss;
    if (r.val_loss !== undefined) val[at.get(r.step)] = r.val_loss;
  }
  const data = [steps, train, val];
  if (chart) { chart.setData(data); return; }
  const width = Math.min(940, $("chart").clientWidth || 900);
  chart = new uPlot({
    width, height: 320,
    scales: { x: { time: false } },
    axes: [{ label: "step" }, { label: "loss" }],
    series: [
      { label: "step" },
      { label: "train loss", stroke: "#1f77b4", width: 1.5, spanGaps: true },
      { label: "val loss", stroke: "#d62728", width: 2, spanGaps: true, points: { show: true, size: 6 } },
    ],
  }, data, $("chart"));
}

// --------------------------------------------------------------------------------------- wiring

function show(view) {
  for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.dataset.view === view);
  $("view-play").hidden = view !== "play";
  $("view-runs").hidden = view !== "runs";
  if (view === "runs") loadRuns().catch((e) => showError(e.message));
  else clearInterval(runTimer);
}

for (const t of document.querySelectorAll(".tab")) t.onclick = () => show(t.dataset.view);
$("generate").onclick = generate;
$("stop").onclick = () => controller && controller.abort();
$("key-form").onsubmit = (e) => {
  e.preventDefault();
  sessionStorage.setItem("lab-api-key", $("api-key").value);
  $("key-form").hidden = true;
  loadModels().then(() => showError("")).catch((err) => showError(err.message));
};
loadModels().catch((e) => showError(e.message));
