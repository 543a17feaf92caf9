"use strict";
// llmlab's page. Each tab sends its form to one /api endpoint and draws the JSON that comes back;
// every number shown is a field of that JSON, formatted, never recomputed here.

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
let RUN = null; // GET /api/run

// --- talking to the server -------------------------------------------------------------------

function request(body) {
  return body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
}

// A whole answer as JSON; an error answer is {"error": one line}.
async function answer(response) {
  const text = await response.text();
  let data = null;
  try {
    data = JSON.parse(text);
  } catch {
    throw new Error(`${response.status} ${response.statusText}: ${text.slice(0, 200)}`);
  }
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

async function api(path, body) {
  return answer(await fetch(path, request(body)));
}

// A streamed answer: JSON lines, each handed to onLine as it arrives; a line {"error"} ends it as an error.
async function apiStream(path, body, onLine) {
  const response = await fetch(path, request(body));
  if (!response.ok) await answer(response); // refused before it started: throws its one line
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += value;
    const lines = buffered.split("\n");
    buffered = lines.pop();
    for (const line of lines) {
      if (!line) continue;
      const data = JSON.parse(line);
      if (data.error) throw new Error(data.error);
      onLine(data);
    }
  }
}

// Each form (and the count tab) has its own error line, so a message stays with the tab it is about;
// #error above the tabs is the page's own (the run could not be read).
function errorLine(key) {
  return document.querySelector(`p.error[data-for="${key}"]`);
}

function showError(message, line = $("error")) {
  line.textContent = message;
  line.hidden = false;
}

// outputs: what the form draws, cleared first, so an error never stands beside an earlier answer
function onSubmit(formId, handler, outputs) {
  const form = $(formId);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button");
    button.disabled = true;
    const line = errorLine(formId);
    line.hidden = true;
    for (const id of outputs) $(id).innerHTML = "";
    try {
      await handler();
    } catch (e) {
      showError(e.message, line);
    } finally {
      button.disabled = false;
    }
  });
}

// An empty field is sent as null: "off" for top-k and top-p, an error the server names for the others.
function numberOrNull(id) {
  const input = $(id), text = input.value.trim();
  const name = input.closest("label")?.firstChild.textContent.trim() ?? id;
  // a number input reads "" for what it cannot parse (1e400, "abc"): badInput tells that from empty
  if (input.validity?.badInput || (text !== "" && !Number.isFinite(Number(text)))) {
    throw new Error(`${name}: not a finite number`);
  }
  const x = text === "" ? null : Number(text);
  if (Number.isInteger(x) && !Number.isSafeInteger(x)) { // JSON from JavaScript would round it
    throw new Error(`${name}: the page sends integers up to 2^53 − 1 exactly; the API takes larger ones`);
  }
  return x;
}

// --- formatting and colour -------------------------------------------------------------------

const int = (n) => n.toLocaleString("en-US");
const fixed = (x, digits) => (x === null || x === undefined ? "–" : x.toFixed(digits));
const mib = (bytes) => `${(bytes / 2 ** 20).toFixed(2)} MiB`;
// a token as a label: "" is a byte-level token that ends inside a character (the next one completes it)
const visible = (text) => (text === "" ? "…" : text.replaceAll("\n", "⏎").replaceAll(" ", "·").replaceAll("\t", "⇥"));
// Math.max(...xs) overflows the call stack above ~10⁵ values; nulls (inf or NaN on the server) are skipped
const maxOf = (xs) => xs.reduce((m, x) => (x === null || x <= m ? m : x), -Infinity);
const minOf = (xs) => -maxOf(xs.map((x) => (x === null ? null : -x)));

// white at 0, red at `max`
function heat(x, max) {
  const t = max > 0 ? Math.min(1, Math.max(0, x / max)) : 0;
  const mix = (a, b) => Math.round(a + (b - a) * t);
  return `rgb(${mix(255, 214)}, ${mix(255, 48)}, ${mix(255, 39)})`;
}

function legend(el, max, unit) {
  el.innerHTML = "";
  if (!Number.isFinite(max)) return;
  const bar = document.createElement("span");
  bar.className = "bar";
  bar.style.background = `linear-gradient(to right, ${heat(0, 1)}, ${heat(1, 1)})`;
  el.append("0", bar, `${fixed(max, 2)} ${unit}`);
}

function rows(table, pairs) {
  table.innerHTML = "";
  for (const [name, value] of pairs) {
    const tr = table.insertRow();
    tr.insertCell().textContent = name;
    tr.insertCell().textContent = value;
  }
}

function token(text, className, background, title) {
  const span = document.createElement("span");
  span.className = className;
  span.textContent = text;
  if (background) span.style.background = background;
  if (title) span.title = title;
  return span;
}

function svg(tag, attrs, parent) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (parent) parent.append(el);
  return el;
}

// A grid of cells [rows][cols] coloured by value / max, with labels; cellTitle(i, j) on hover.
function heatmap(grid, rowLabels, colLabels, max, cellTitle) {
  const n = grid.length, m = grid[0].length;
  const size = Math.max(8, Math.min(26, Math.floor(420 / Math.max(n, m))));
  const left = 14 + 7 * maxOf(rowLabels.map((s) => s.length));
  const top = 18 + 7 * maxOf(colLabels.map((s) => s.length));
  const root = svg("svg", { width: left + m * size + 4, height: top + n * size + 4 });
  rowLabels.forEach((label, i) => {
    const t = svg("text", { x: left - 4, y: top + i * size + size * 0.7, "text-anchor": "end" }, root);
    t.textContent = label;
  });
  colLabels.forEach((label, j) => {
    const x = left + j * size + size * 0.7;
    const t = svg("text", { x, y: top - 4, transform: `rotate(-90 ${x} ${top - 4})` }, root);
    t.textContent = label;
  });
  grid.forEach((row, i) => row.forEach((value, j) => {
    const cell = svg("rect", {
      x: left + j * size, y: top + i * size, width: size, height: size, fill: heat(value, max),
      stroke: "#eef0f3", "data-value": value, class: "cell",
    }, root);
    svg("title", {}, cell).textContent = cellTitle(i, j);
  }));
  return root;
}

function figure(caption, content) {
  const fig = document.createElement("figure");
  const cap = document.createElement("figcaption");
  cap.textContent = caption;
  fig.append(cap, content);
  return fig;
}

// --- the run ---------------------------------------------------------------------------------

async function loadRun() {
  RUN = await api("/api/run");
  const m = RUN.model;
  $("run-name").textContent = RUN.run;
  document.title = `llmlab · ${RUN.run}`;
  $("run-summary").textContent = [
    `${m.n_layers} layers`, `H = ${m.d_model}`, `${m.n_heads} heads`, `context ${m.block_size}`,
    `${int(RUN.tokenizer.vocab_size)} ${RUN.tokenizer.kind} tokens`, `${int(RUN.params)} parameters`,
    `${m.positions} positions, ${m.activation}, ${m.norm_placement}-${m.norm}`,
    RUN.data ? `trained on ${RUN.data}` : "",
  ].filter(Boolean).join(" · ");
  for (let layer = 0; layer < m.n_layers; layer++) $("attention-layer").add(new Option(`${layer}`, `${layer}`));
  if (RUN.example_fact) {
    $("knowledge-prompt").value = RUN.example_fact.prompt;
    $("knowledge-subject").value = RUN.example_fact.subject;
    $("knowledge-target").value = RUN.example_fact.target;
  }
  if (RUN.example_edit) {
    $("edit-prompt").value = RUN.example_edit.prompt;
    $("edit-subject").value = RUN.example_edit.subject;
    $("edit-target").value = RUN.example_edit.target;
  }
  drawTraining(RUN.metrics);
}

// --- entropy: POST /api/score ------------------------------------------------------------------

let lastScore = null;

async function score() {
  lastScore = null; // so that "colour by" cannot redraw an earlier answer if this request fails
  lastScore = await api("/api/score", { text: $("score-text").value, temperature: numberOrNull("score-temperature") });
  drawScore(lastScore);
}

function drawScore(r) {
  const by = $("score-by").value;
  const max = maxOf(r.tokens.slice(1).map((t) => t[by]));
  const out = $("score-tokens");
  out.innerHTML = "";
  r.tokens.forEach((t, i) => {
    if (i === 0) return out.append(token(t.text, "token context", null, "context: nothing predicts the first token"));
    const alternatives = t.alternatives.map((a) => `  ${JSON.stringify(a.text)} ${fixed(a.prob, 4)}`).join("\n");
    const title = `${JSON.stringify(t.text)}\nsurprisal ${fixed(t.surprisal, 3)} nats · entropy ${fixed(t.entropy, 3)}` +
      ` nats\np ${fixed(t.prob, 4)} · rank ${t.rank}\nmost likely:\n${alternatives}`;
    const span = token(t.text, "token", t[by] === null ? null : heat(t[by], max), title);
    span.dataset.value = t[by];
    out.append(span);
  });
  legend($("score-legend"), max, `nats of ${by}`);
  const s = r.totals;
  rows($("score-totals"), [
    ["tokens", `${int(s.tokens)} (${int(s.scored)} scored; the first is context only)`],
    ["cross-entropy", `${fixed(s.mean_surprisal, 4)} nats/token (${fixed(s.bits_per_token, 4)} bits)`],
    ["perplexity", fixed(s.perplexity, 3)],
    ["sequence NLL", `${fixed(s.sequence_nll, 2)} nats`],
    ["entropy", `mean ${fixed(s.mean_entropy, 4)}, max ${fixed(s.max_entropy, 4)} nats (token ${s.max_entropy_at})`],
    ["top-1 accuracy", fixed(s.top1_accuracy, 4)],
    ["windows", `${r.windows} of ${r.context} tokens, stride ${r.stride}, temperature ${r.temperature}`],
  ]);
}

// --- rejection sampling: POST /api/rejection ------------------------------------------------------

async function rejection() {
  const r = await api("/api/rejection", {
    prompt: $("rejection-prompt").value, proposal_temperature: numberOrNull("rejection-temperature"),
    samples: numberOrNull("rejection-samples"), seed: numberOrNull("rejection-seed"),
  });
  rows($("rejection-figures"), [
    ["envelope M = max p/q", fixed(r.envelope, 4)],
    ["acceptance rate", `${fixed(r.acceptance_rate, 4)} measured (${int(r.accepted)} of ${int(r.proposed)} proposals), ` +
      `1/M = ${fixed(r.expected_acceptance, 4)} expected`],
    ["distance from p", `total variation ${fixed(r.total_variation, 4)} for the accepted draws, ` +
      `${fixed(r.total_variation_direct, 4)} for as many draws from p itself`],
  ]);
  $("rejection-bars").append(bars(r.tokens, r.envelope));
}

// For each token: p (bar), the frequency of the accepted draws (dot) and M·q (tick), on one scale.
function bars(tokens, M) {
  const W = 720, rowH = 18, left = 60, top = 20;
  const scale = (W - left - 20) / maxOf(tokens.map((t) => Math.max(t.p, M * t.q, t.frequency)));
  const root = svg("svg", { width: W, height: top + rowH * tokens.length + 8, id: "rejection-svg" });
  svg("text", { x: left, y: 12 }, root).textContent = "bars: p · dots: the accepted draws · ticks: M·q";
  tokens.forEach((t, i) => {
    const y = top + i * rowH;
    svg("text", { x: left - 6, y: y + 12, "text-anchor": "end" }, root).textContent = visible(t.text);
    const bar = svg("rect", { x: left, y: y + 3, width: t.p * scale, height: rowH - 6, fill: "#f2b8b0", class: "p",
      "data-value": t.p }, root);
    svg("title", {}, bar).textContent = `${JSON.stringify(t.text)}: p ${fixed(t.p, 4)}, q ${fixed(t.q, 4)}, ` +
      `M·q ${fixed(M * t.q, 4)}, accepted ${fixed(t.frequency, 4)}`;
    svg("line", { x1: left + M * t.q * scale, x2: left + M * t.q * scale, y1: y + 1, y2: y + rowH - 1,
      stroke: "#1d2430", class: "envelope" }, root);
    svg("circle", { cx: left + t.frequency * scale, cy: y + rowH / 2, r: 3.5, fill: "#d63027", class: "frequency",
      "data-value": t.frequency }, root);
  });
  return root;
}

// --- generation: POST /api/generate/stream -------------------------------------------------------

// Tokens appear as they are drawn, uncoloured; the last line is /api/generate's answer, drawn whole.
async function generate() {
  const request = {
    prompt: $("generate-prompt").value, max_new_tokens: numberOrNull("generate-max"),
    temperature: numberOrNull("generate-temperature"), top_k: numberOrNull("generate-top-k"),
    top_p: numberOrNull("generate-top-p"), seed: numberOrNull("generate-seed"),
  };
  const out = $("generate-output");
  let r = null;
  try {
    await apiStream("/api/generate/stream", request, (line) => {
      if (line.done) r = line.done;
      else {
        if (!out.childElementCount) out.append(token(request.prompt, "token context", null, "the prompt"));
        out.append(token(line.text, "token pending", null, `id ${line.token_id} · H(p) ${fixed(line.entropy, 3)} nats`));
      }
    });
    if (r === null) throw new Error("the stream ended without its answer");
  } catch (e) {
    out.innerHTML = ""; // no part of an answer beside the error
    throw e;
  }
  drawGeneration(r);
}

function drawGeneration(r) {
  const out = $("generate-output");
  out.innerHTML = "";
  out.append(token(r.prompt, "token context", null, "the prompt"));
  const max = Math.max(maxOf(r.entropies), 1e-9);
  r.token_texts.forEach((text, i) => {
    const span = token(text, "token", heat(r.entropies[i], max), `id ${r.token_ids[i]} · H(p) ${fixed(r.entropies[i], 3)} nats`);
    span.dataset.value = r.entropies[i];
    out.append(span);
  });
  legend($("generate-legend"), max, "nats of entropy");
  rows($("generate-figures"), [
    ["new tokens", int(r.token_ids.length)],
    ["entropy", `mean ${fixed(r.mean_entropy, 4)}, max ${fixed(r.max_entropy, 4)} nats`],
  ]);
}

// --- attention: POST /api/attention ----------------------------------------------------------------

async function attention() {
  const r = await api("/api/attention", { prompt: $("attention-prompt").value, layer: numberOrNull("attention-layer") });
  const labels = r.tokens.map(visible);
  const out = $("attention-heads");
  out.innerHTML = "";
  r.pattern.forEach((head, h) => {
    const map = heatmap(head, labels, labels, 1, (i, j) =>
      `head ${h}: query ${i} ${JSON.stringify(r.tokens[i])} → key ${j} ${JSON.stringify(r.tokens[j])}` +
      `\np = ${fixed(head[i][j], 4)}${j > i ? " (masked: −∞ before softmax)" : ""}`);
    out.append(figure(`layer ${r.layer}, head ${h} · mean row entropy ${fixed(r.mean_entropy[h], 3)} nats`, map));
  });
}

// --- shapes: POST /api/trace --------------------------------------------------------------------

async function shapes() {
  const r = await api("/api/trace", { prompt: $("shapes-prompt").value });
  $("shapes-letters").textContent = Object.entries(r.letters).map(([k, v]) => `${k} = ${v}`).join(", ") +
    (r.all_match ? " — every tensor matches its letters" : " — NOT every tensor matches its letters");
  const table = $("shapes-rows");
  table.innerHTML = "<tr><th>tensor</th><th>shape</th><th>the notes write</th><th>remark</th></tr>";
  for (const row of r.rows) {
    const tr = table.insertRow();
    tr.insertCell().textContent = row.name;
    const shape = tr.insertCell();
    shape.textContent = `[${row.letters.join(", ")}] = [${row.shape.join(", ")}]`;
    shape.classList.add("mono");
    if (!row.matches) shape.classList.add("mismatch");
    tr.insertCell().textContent = row.notes;
    tr.insertCell().textContent = row.remark;
    tr.cells[0].classList.add("mono");
  }
}

// --- count: GET /api/count ------------------------------------------------------------------------

async function count() {
  const r = await api("/api/count");
  const out = $("count-output");
  out.innerHTML = `<p>B = ${r.batch}, S = ${r.seq}</p>`;
  const params = document.createElement("table");
  params.className = "figures";
  const on = r.measured_layers === r.model.n_layers ? "the model" : "models of 1 and 2 layers, extended to L";
  rows(params, [["parameters", `${int(r.params.total)} (measured on ${on}: ${int(r.params.measured)})`],
    ...Object.entries(r.params.by_component).filter(([, v]) => v).map(([k, v]) => [`  ${k}`, int(v)])]);
  const flops = document.createElement("table");
  flops.className = "rows";
  flops.innerHTML = "<tr><th>forward FLOPs</th><th>exact</th><th>measured</th><th>notes formula</th><th>notes vs exact</th><th>why</th></tr>";
  const f = r.flops;
  for (const c of f.forward.by_component) {
    const tr = flops.insertRow();
    [c.component, int(c.exact), int(c.measured), int(c.notes),
      c.diff_pct === null ? "" : `${c.diff_pct > 0 ? "+" : ""}${c.diff_pct.toFixed(1)}%`, c.reason]
      .forEach((v, i) => { const td = tr.insertCell(); td.textContent = v; if (i > 0 && i < 5) td.className = "num"; });
  }
  const totals = document.createElement("table");
  totals.className = "figures";
  const t = r.memory.train;
  rows(totals, [
    ["forward total", `${int(f.forward.exact)} exact, ${int(f.forward.measured)} measured, notes ${int(f.forward.notes)}`],
    ["training step", `${int(f.train_step.exact)} exact (3× forward), ${int(f.train_step.measured)} measured`],
    ["Kaplan's 6N·B·S", `${int(f.train_step.kaplan_6n)} (${fixed(f.train_step.kaplan_diff_pct, 1)}%)`],
    ["decode step", `${int(f.decode_step.exact)} exact, ${int(f.decode_step.measured)} measured`],
    ["training memory", `weights ${mib(t.weights)} + gradients ${mib(t.gradients)} + AdamW ${mib(t.optimizer)}` +
      ` + activations ${mib(t.activations)}: peak ${mib(t.predicted_bytes)} predicted, at the ${t.peak_moment}`],
    ["inference memory", `weights ${mib(r.memory.inference.weights)} + KV cache ${mib(r.memory.kv_cache_bytes)}`],
  ]);
  out.append(params, flops, totals);
}

// --- knowledge: POST /api/locate ------------------------------------------------------------------

async function locate() {
  const r = await api("/api/locate", {
    prompt: $("knowledge-prompt").value, subject: $("knowledge-subject").value, target: $("knowledge-target").value,
  });
  $("knowledge-figures").textContent = `p(target) clean ${fixed(r.p_clean, 4)}, subject corrupted ` +
    `${fixed(r.p_corrupt, 4)} (noise std ${fixed(r.noise_std, 3)})`;
  const labels = r.tokens.map((t, i) => visible(t) + (i >= r.subject[0] && i < r.subject[1] ? "*" : ""));
  const out = $("knowledge-maps");
  out.innerHTML = "";
  for (const [kind, grid] of Object.entries(r.restored)) {
    const effect = r.effects[kind];
    const max = Math.max(maxOf(effect.flat()), 1e-9);
    const layers = grid[0].map((_, l) => `${l}`);
    const peak = r.peaks[kind];
    const map = heatmap(effect, labels, layers, max, (i, l) =>
      `restore ${kind} of token ${i} ${JSON.stringify(r.tokens[i])} at layer ${l}\n` +
      `p(target) ${fixed(grid[i][l], 4)} · indirect effect ${fixed(effect[i][l], 4)}`);
    const caption = peak.effect > 0
      ? `${kind}: peak at layer ${peak.layer}, token ${JSON.stringify(peak.token_text)}, effect ${fixed(peak.effect, 4)}`
      : `${kind}: no hidden state restores any probability (p(target) is ${fixed(r.p_clean, 4)} even when clean)`;
    out.append(figure(`${caption} (* = subject)`, map));
  }
}

// --- knowledge editing: POST /api/edit -----------------------------------------------------------

const percent = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`);

async function editFact() {
  const r = await api("/api/edit", {
    prompt: $("edit-prompt").value, subject: $("edit-subject").value, target: $("edit-target").value,
    method: $("edit-method").value, site: $("edit-site").value,
  });
  rows($("edit-figures"), [
    ["edit", `${r.method}${r.site === null ? "" : `, site ${r.site}`}, layer${r.layers.length > 1 ? "s" : ""} ${r.layers.join(", ")}`],
    ["p(target)", `${fixed(r.p_target_before, 4)} → ${fixed(r.p_target_after, 4)}`],
    ["reliability", percent(r.reliability)],
    ["generalisation", percent(r.generalisation)],
    ["locality", percent(r.locality)],
    ["portability", percent(r.portability)],
    ["time", `${fixed(r.seconds, 2)} s editing, ${fixed(r.stats_seconds, 2)} s estimating C = E[kkᵀ]`],
  ]);
  const out = $("edit-texts");
  for (const [when, continuation] of [["before", r.before], ["after", r.after]]) {
    const p = document.createElement("p");
    p.className = "mono";
    p.dataset.when = when;
    const strong = document.createElement("strong");
    strong.textContent = `${when}: `;
    p.append(strong, r.text, token(continuation, "new"));
    out.append(p);
  }
}

// --- FFN memories: POST /api/neurons -------------------------------------------------------------

async function neurons() {
  const r = await api("/api/neurons", { prompt: $("neurons-prompt").value });
  const table = $("neurons-rows");
  table.innerHTML = "<tr><th>layer</th><th>neuron i</th><th>mᵢ</th><th>promotes (E·vᵢ)</th></tr>";
  for (const memory of r.layers.flat()) {
    const tr = table.insertRow();
    tr.insertCell().textContent = memory.layer;
    tr.insertCell().textContent = memory.neuron;
    tr.insertCell().textContent = fixed(memory.activation, 3);
    tr.insertCell().textContent = memory.promotes.map((t, i) => `${JSON.stringify(t)} ${fixed(memory.scores[i], 2)}`)
      .join("  ");
    tr.cells[2].className = "num";
    tr.cells[3].className = "mono";
  }
}

// --- training curve (from GET /api/run) ------------------------------------------------------------

function listed(xs, most) {
  return xs.slice(0, most).join(", ") + (xs.length > most ? ` … (${int(xs.length)} in all)` : "");
}

function drawTraining(m) {
  const out = $("training-curve");
  out.innerHTML = "";
  if (!m.step.length) {
    out.textContent = m.damaged_lines.length ? "No line of this run's metrics.csv parses." :
      "This run has no metrics.csv (it was imported, not trained here).";
    return;
  }
  const W = 720, H = 320, pad = { l: 56, r: 16, t: 12, b: 36 };
  const losses = m.train_loss.concat(m.val_loss).filter((x) => x !== null);
  const lo = minOf(losses), hi = maxOf(losses), last = m.step[m.step.length - 1];
  const x = (s) => pad.l + (s / Math.max(last, 1)) * (W - pad.l - pad.r);
  const y = (v) => pad.t + (1 - (v - lo) / (hi - lo || 1)) * (H - pad.t - pad.b);
  const root = svg("svg", { width: W, height: H, id: "training-svg" });
  svg("line", { x1: pad.l, y1: H - pad.b, x2: W - pad.r, y2: H - pad.b, class: "axis" }, root);
  svg("line", { x1: pad.l, y1: pad.t, x2: pad.l, y2: H - pad.b, class: "axis" }, root);
  for (let k = 0; k <= 4; k++) {
    const v = lo + ((hi - lo) * k) / 4;
    svg("text", { x: pad.l - 6, y: y(v) + 3, "text-anchor": "end" }, root).textContent = v.toFixed(2);
  }
  for (const s of new Set([0, 1, 2, 3, 4].map((k) => Math.round((last * k) / 4)))) {
    svg("text", { x: x(s), y: H - pad.b + 14, "text-anchor": "middle" }, root).textContent = int(s);
  }
  svg("text", { x: W / 2, y: H - 4, "text-anchor": "middle" }, root).textContent = "step";
  svg("text", { x: 12, y: H / 2, "text-anchor": "middle", transform: `rotate(-90 12 ${H / 2})` }, root).textContent =
    "cross-entropy, nats/token";
  const path = m.step.map((s, i) => `${i ? "L" : "M"}${x(s).toFixed(1)},${y(m.train_loss[i]).toFixed(1)}`).join("");
  svg("path", { d: path, fill: "none", stroke: "#7f8c9d", "stroke-width": 1, class: "train" }, root);
  m.val_step.forEach((s, i) => svg("circle", { cx: x(s), cy: y(m.val_loss[i]), r: 3.5, fill: "#d63027", class: "val" }, root));
  out.append(root);
  rows($("training-figures"), [
    ["steps", int(last)],
    ["train loss (last step)", `${fixed(m.train_loss[m.train_loss.length - 1], 4)} nats/token (grey line)`],
    ["val loss (best)", m.best_val_loss === null ? "–" :
      `${fixed(m.best_val_loss, 4)} nats/token, perplexity ${fixed(m.best_val_perplexity, 3)} (red dots)`],
    ...(m.not_finite ? [["not drawn", `${int(m.not_finite)} losses that are not finite (the run diverged)`]] : []),
    ...(m.damaged_lines.length ? [["damaged", `metrics.csv lines ${listed(m.damaged_lines, 10)} do not parse: left out`]] : []),
  ]);
}

// --- tabs ------------------------------------------------------------------------------------------

const LOAD_ON_OPEN = { count };
const opened = new Set();

function openTab(name) {
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const s of document.querySelectorAll(".tab")) s.classList.toggle("active", s.id === name);
  if (LOAD_ON_OPEN[name] && !opened.has(name)) {
    opened.add(name);
    errorLine(name).hidden = true;
    LOAD_ON_OPEN[name]().catch((e) => {
      opened.delete(name); // opening the tab again retries
      showError(e.message, errorLine(name));
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => openTab(b.dataset.tab));
  onSubmit("score-form", score, ["score-tokens", "score-legend", "score-totals"]);
  $("score-by").addEventListener("change", () => lastScore && drawScore(lastScore));
  onSubmit("rejection-form", rejection, ["rejection-figures", "rejection-bars"]);
  onSubmit("generate-form", generate, ["generate-output", "generate-legend", "generate-figures"]);
  onSubmit("attention-form", attention, ["attention-heads"]);
  onSubmit("shapes-form", shapes, ["shapes-letters", "shapes-rows"]);
  onSubmit("knowledge-form", locate, ["knowledge-figures", "knowledge-maps"]);
  onSubmit("neurons-form", neurons, ["neurons-rows"]);
  onSubmit("edit-form", editFact, ["edit-figures", "edit-texts"]);
  loadRun().catch((e) => showError(e.message));
});
