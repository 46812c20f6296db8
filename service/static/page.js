// The page's only script: a client of GET /models and POST /classify, nothing else.
// Relative URLs, so the page also works behind a path prefix. No framework and no build step;
// every text from the service or a file name goes in through textContent, never as HTML.
"use strict";

const MAX_RESULTS = 30; // cards kept; older ones are dropped (and their previews freed)
const IN_FLIGHT = 4; // requests at once when several files are given
const TICK_LEVELS = [0.9, 0.99, 0.999]; // operating points drawn as ticks on the distance bar
const DEFAULT_TOP_K = 3;

const ui = {
  model: document.getElementById("model"),
  topk: document.getElementById("topk"),
  info: document.getElementById("model-info"),
  drop: document.getElementById("drop"),
  choose: document.getElementById("choose"),
  files: document.getElementById("files"),
  clear: document.getElementById("clear"),
  status: document.getElementById("status"),
  empty: document.getElementById("empty"),
  results: document.getElementById("results"),
  heading: document.getElementById("results-heading"),
};

const models = new Map(); // "name:version" -> the /models entry
let cardCount = 0;
let modelsTimer = null;

// ---------- small helpers ----------

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

const num = (x) => x.toFixed(3);
const percent = (q) => `${Math.round(q * 1000) / 10}%`;
const plural = (n, word, many = `${word}s`) => `${n} ${n === 1 ? word : many}`;

// The quantile table's value at level q (linear between its points, clamped at its ends).
function valueAt(table, q) {
  if (q <= table[0].q) return table[0].value;
  for (let i = 1; i < table.length; i++) {
    const a = table[i - 1];
    const b = table[i];
    if (q <= b.q) return a.value + ((q - a.q) / (b.q - a.q)) * (b.value - a.value);
  }
  return table[table.length - 1].value;
}

// The largest level q whose table value is below d: {q}, or {below: true} when d is at or
// under the table's first value, or {above: true} when d is over its last.
function levelOf(table, d) {
  if (d <= table[0].value) return { below: true };
  const last = table[table.length - 1];
  if (d > last.value) return { above: true };
  for (let i = 1; i < table.length; i++) {
    const a = table[i - 1];
    const b = table[i];
    if (a.value < d && d <= b.value) {
      return { q: a.q + ((d - a.value) / (b.value - a.value)) * (b.q - a.q) };
    }
  }
  return { above: true };
}

function modelKey(m) {
  return `${m.name}:${m.version}`;
}

function providerName(p) {
  return p ? p.replace("ExecutionProvider", "") : "?";
}

// ---------- models ----------

async function loadModels() {
  clearTimeout(modelsTimer);
  let body;
  try {
    const r = await fetch("models", { headers: { accept: "application/json" } });
    if (!r.ok) throw new Error(`GET /models answered HTTP ${r.status}`);
    body = await r.json();
  } catch (e) {
    ui.info.textContent = `Could not read the list of models (${e.message}); retrying.`;
    modelsTimer = setTimeout(loadModels, 3000);
    return;
  }
  const previous = ui.model.value;
  models.clear();
  ui.model.replaceChildren();
  const ready = [];
  const problems = [];
  for (const m of body.models) {
    const key = modelKey(m);
    models.set(key, m);
    const opt = el("option", { value: key, text: `${m.name} (version ${m.version})` });
    if (m.status !== "ready") {
      opt.disabled = true;
      opt.textContent += ` — ${m.status}`;
      problems.push(m.error ? `${key}: ${m.status}, ${m.error}` : `${key}: ${m.status}`);
    } else {
      ready.push(key);
    }
    ui.model.append(opt);
  }
  // Keep the user's choice; else the version that `?model=<name>` gets; else the first ready.
  const preferred = body.models.find((m) => m.status === "ready" && m.default);
  if (ready.includes(previous)) ui.model.value = previous;
  else if (preferred) ui.model.value = modelKey(preferred);
  else if (ready.length) ui.model.value = ready[0];
  if (body.models.some((m) => m.status === "loading")) {
    modelsTimer = setTimeout(loadModels, 2000);
  }
  showModel(problems);
}

function showModel(problems = []) {
  const m = models.get(ui.model.value);
  const previousK = Number(ui.topk.value) || DEFAULT_TOP_K;
  ui.topk.replaceChildren();
  const k = m && m.labels.length ? m.labels.length : DEFAULT_TOP_K;
  for (let i = 1; i <= k; i++) ui.topk.append(el("option", { value: String(i), text: String(i) }));
  ui.topk.value = String(Math.min(previousK, k));
  if (!m || m.status !== "ready") {
    ui.info.textContent = problems.length
      ? `No model is ready yet: ${problems.join("; ")}.`
      : "No model is served.";
    return;
  }
  const parts = [
    plural(m.labels.length, "class", "classes"),
    `runs on ${providerName(m.provider)}`,
    `${m.class_thresholds ? "a threshold per predicted class" : "one threshold"}, keeping ${percent(
      m.target_tpr,
    )} of validation images`,
  ];
  const temperature = m.calibration && m.calibration.temperature;
  if (typeof temperature === "number") parts.push(`probabilities at temperature ${temperature.toFixed(2)}`);
  const acc = m.metrics && m.metrics.accuracy && m.metrics.accuracy.test;
  if (typeof acc === "number") parts.push(`test accuracy ${percent(acc)}`);
  ui.info.textContent = parts.join(" · ") + ".";
}

// ---------- results ----------

function newCard(file) {
  const id = `result-${++cardCount}`;
  const name = file.name || "pasted image";
  const li = el("li", { class: "card pending", "aria-busy": "true" });
  const article = el("article", { "aria-labelledby": `${id}-name` });
  const preview = el("div", { class: "preview" });
  if (file.type && file.type.startsWith("image/")) {
    const url = URL.createObjectURL(file);
    li.dataset.url = url;
    const img = el("img", { src: url, alt: `Preview of ${name}` });
    img.addEventListener("error", () => img.replaceWith(el("span", { text: "no preview" })));
    img.addEventListener("load", () => {
      if (img.naturalWidth < 112) img.classList.add("pixelated"); // 28x28: show the pixels
    });
    preview.append(img);
  } else {
    preview.append(el("span", { text: "no preview" }));
  }
  const head = el("div", { class: "card-head" }, el("h3", { id: `${id}-name`, text: name }));
  const main = el("div", { class: "card-main" }, el("p", { class: "muted", text: "Classifying…" }));
  article.append(preview, head, main);
  li.append(article);
  return { li, head, main, name };
}

function badge(isOod) {
  return el(
    "p",
    { class: `badge ${isOod ? "out" : "in"}` },
    el("span", { class: "badge-icon", "aria-hidden": "true", text: isOod ? "!" : "✓" }),
    el("span", { class: "badge-text", text: isOod ? "Out of distribution" : "In distribution" }),
  );
}

function topKList(result) {
  const list = el("ol", { class: "topk", "aria-label": "Most probable classes" });
  for (const c of result.top_k) {
    const fill = el("span", { class: "bar-fill" });
    fill.style.width = `${Math.max(0, Math.min(1, c.probability)) * 100}%`;
    list.append(
      el(
        "li",
        {},
        el("span", { class: "topk-label", text: c.label }),
        el("span", { class: "bar", "aria-hidden": "true" }, fill),
        el("span", { class: "topk-value", text: percent(c.probability) }),
      ),
    );
  }
  return list;
}

function positioned(cls, x, text) {
  const e = el("span", { class: cls, text });
  e.style.left = `${x}%`;
  return e;
}

// A step of 1, 2, 2.5 or 5 times a power of ten that puts about four labels on an axis of
// `span`: 0.5 for min_distance (0-2), 100 or 200 for a Mahalanobis score in the hundreds.
function axisStep(span) {
  const raw = span / 4;
  const p = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 2.5, 5]) if (m * p >= raw) return m * p;
  return 10 * p;
}

// The served score (`score`, or `min_distance` for bundles that serve it) against the threshold
// of its class, on a bar split into the in (left) and out (right) zones, with ticks where the
// threshold would be at other operating points (the manifest's table). A score whose
// in-distribution side is "higher" is drawn negated, so out is always to the right; its labels
// keep the API's values.
function distanceFigure(result, info) {
  const cal = info && info.calibration;
  const served = typeof result.score === "number";
  const sign = cal && cal.in_distribution === "higher" ? -1 : 1;
  const d = sign * (served ? result.score : result.min_distance);
  const thr = sign * result.threshold;
  const classTable =
    info && info.class_thresholds && cal && cal.class_quantiles
      ? cal.class_quantiles[result.label]
      : null;
  const raw = classTable || (cal && cal.quantiles && cal.quantiles.length ? cal.quantiles : null);
  const table = raw ? raw.map((p) => ({ q: p.q, value: sign * p.value })) : null;
  const overall = cal && cal.quantiles ? cal.quantiles.map((p) => ({ q: p.q, value: sign * p.value })) : [];
  const ticks = table ? TICK_LEVELS.map((q) => ({ q, value: valueAt(table, q) })) : [];
  const values = [d, thr, ...ticks.map((t) => t.value)];
  const step = axisStep(Math.max(Math.max(...values) * 1.1 - Math.min(0, ...values), 0.1));
  const lo = Math.min(0, Math.floor(Math.min(...values) / step) * step);
  const hi = Math.max(Math.ceil((Math.max(...values) * 1.1) / step) * step, lo + step);
  const x = (v) => Math.max(0, Math.min(100, ((v - lo) / (hi - lo)) * 100));
  const shown = (v) => num(sign * v);
  const digits = step >= 1 ? 0 : step >= 0.5 ? 1 : 2;

  const scale = el("div", { class: "scale", "aria-hidden": "true" });
  const zoneIn = el("span", { class: "zone zone-in" });
  zoneIn.style.width = `${x(thr)}%`;
  const zoneOut = el("span", { class: "zone zone-out" });
  zoneOut.style.left = `${x(thr)}%`;
  scale.append(zoneIn, zoneOut);
  for (const t of ticks) scale.append(positioned("tick", x(t.value), ""));
  scale.append(positioned("threshold", x(thr), ""));
  scale.append(positioned(`marker ${result.is_ood ? "out" : "in"}`, x(d), ""));

  const above = el("div", { class: "scale-above", "aria-hidden": "true" });
  above.append(positioned("mark-label", x(d), `this image ${shown(d)}`));

  const below = el("div", { class: "scale-below", "aria-hidden": "true" });
  below.append(positioned("thr-label", x(thr), `threshold ${shown(thr)}`));
  for (let v = lo; v <= hi + 1e-9 * step; v += step) {
    below.append(positioned(v === lo ? "axis start" : "axis", x(v), (sign * v).toFixed(digits)));
  }

  const sentences = [];
  const gap = Math.abs(d - thr);
  const whose = classTable ? `the ${result.label} threshold` : "the threshold";
  const noun = served ? "Score" : "Distance";
  sentences.push(
    `${noun} ${shown(d)} is ${num(gap)} ${sign * d > sign * thr ? "over" : "under"} ${whose} ${shown(thr)}.`,
  );
  if (table) {
    const lv = levelOf(table, d);
    if (result.is_ood) {
      sentences.push(
        lv.above
          ? `It stays out even at an operating point keeping ${percent(table[table.length - 1].q)} of validation images.`
          : `It stays out at any operating point keeping up to ${percent(lv.q || table[0].q)} of validation images.`,
      );
    } else {
      sentences.push(
        lv.below
          ? `It stays in even at an operating point keeping only ${percent(table[0].q)} of validation images.`
          : `It would be flagged only at an operating point keeping under ${percent(lv.q)} of validation images.`,
      );
    }
  }
  if (overall.length) {
    const g = levelOf(overall, d);
    const what = served ? "Its score is farther out" : "It is farther from its prototype";
    sentences.push(
      g.below
        ? served
          ? "Its score is more typical than the median validation image's."
          : "It is closer to its prototype than the median validation image."
        : g.above
          ? `${what} than ${percent(overall[overall.length - 1].q)} of validation images.`
          : `${what} than ${percent(g.q)} of validation images.`,
    );
  }
  const caption = served
    ? `Out-of-distribution score (${(cal && cal.score) || "score"}) against its threshold`
    : "Distance to the nearest prototype (min_distance)";

  return el(
    "figure",
    { class: "distance" },
    el("figcaption", { text: caption }),
    above,
    scale,
    below,
    el("p", { class: "distance-text", text: sentences.join(" ") }),
  );
}

// Labels are centred on their mark unless that would cross the figure's edge; axis numbers
// that the threshold's label would cover are hidden. Measured, so it holds at any width, and
// redone when the window is resized.
function fitAxis(figure) {
  const box = figure.getBoundingClientRect();
  for (const label of figure.querySelectorAll(".mark-label, .thr-label")) {
    label.classList.remove("end");
    label.classList.add("mid");
    const r = label.getBoundingClientRect();
    if (r.right > box.right) label.classList.replace("mid", "end");
    else if (r.left < box.left) label.classList.remove("mid");
  }
  const thr = figure.querySelector(".thr-label");
  if (!thr) return;
  const t = thr.getBoundingClientRect();
  for (const a of figure.querySelectorAll(".axis")) {
    a.style.visibility = "";
    const r = a.getBoundingClientRect();
    if (r.right + 6 > t.left && r.left - 6 < t.right) a.style.visibility = "hidden";
  }
}

let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => document.querySelectorAll(".distance").forEach(fitAxis), 100);
});

function showResult(card, result, body, info) {
  card.li.classList.remove("pending");
  card.li.classList.add(result.is_ood ? "is-out" : "is-in");
  card.li.removeAttribute("aria-busy");
  card.head.append(
    badge(result.is_ood),
    el(
      "p",
      { class: "class-line" },
      el("span", { class: "class-label", text: result.label }),
      el("span", { class: "muted", text: ` · ${body.model} version ${body.version}` }),
    ),
  );
  const figure = distanceFigure(result, info);
  card.main.replaceChildren(topKList(result), figure);
  fitAxis(figure);
  return `${card.name}: ${result.label}, ${result.is_ood ? "out of distribution" : "in distribution"} (${typeof result.score === "number" ? "score" : "distance"} ${num(
    typeof result.score === "number" ? result.score : result.min_distance,
  )}, threshold ${num(result.threshold)}).`;
}

const STATUS_TEXT = {
  400: "Not a readable image.",
  404: "Unknown model.",
  405: "The service refused the request method.",
  413: "Too large.",
  415: "Not an image.",
  422: "The request was refused.",
  503: "The service is not ready or too busy.",
};

// `detail` is the service's own words; `problem` is what the page itself saw (no answer).
function showError(card, status, detail, retryAfter, problem) {
  card.li.classList.remove("pending");
  card.li.classList.add("is-error");
  card.li.removeAttribute("aria-busy");
  let title = status
    ? STATUS_TEXT[status] || `Unexpected answer (HTTP ${status}).`
    : "No answer from the service.";
  if (status === 503) {
    // With Retry-After: loading or a full queue. Without: the model failed for good.
    title = retryAfter
      ? `${title} Try again in ${plural(Number(retryAfter), "second")}.`
      : "The model cannot be served.";
  }
  card.head.append(
    el(
      "p",
      { class: "badge error" },
      el("span", { class: "badge-icon", "aria-hidden": "true", text: "×" }),
      el("span", { class: "badge-text", text: "Error" }),
    ),
  );
  const parts = [el("p", { class: "error-title", text: title })];
  if (problem) parts.push(el("p", { class: "error-detail", text: problem }));
  if (detail) parts.push(el("p", { class: "error-detail" }, "The service said: ", el("q", { text: detail })));
  card.main.replaceChildren(...parts);
  return `${card.name}: error. ${title}`;
}

async function classifyOne(file, card, key, info, k) {
  const form = new FormData();
  form.append("file", file, card.name);
  const params = new URLSearchParams({ top_k: String(k) });
  if (key) params.set("model", key);
  let r;
  try {
    r = await fetch(`classify?${params}`, { method: "POST", body: form });
  } catch (e) {
    return showError(card, 0, null, null, `Could not reach the service (${e.message}).`);
  }
  let body = null;
  try {
    body = await r.json();
  } catch {
    body = null;
  }
  if (!r.ok || !body || !Array.isArray(body.results)) {
    if (r.status === 404) loadModels(); // the model list changed under us
    const detail = body && typeof body.detail === "string" ? body.detail : null;
    return showError(card, r.ok ? 0 : r.status, detail, r.headers.get("retry-after"));
  }
  return showResult(card, body.results[0], body, info);
}

function trimResults() {
  while (ui.results.children.length > MAX_RESULTS) {
    const last = ui.results.lastElementChild;
    if (last.dataset.url) URL.revokeObjectURL(last.dataset.url);
    last.remove();
  }
  const n = ui.results.children.length;
  ui.empty.hidden = n > 0;
  ui.clear.disabled = n === 0;
}

async function classifyFiles(fileList) {
  const files = Array.from(fileList || []);
  if (!files.length) return;
  const key = ui.model.value;
  const info = models.get(key);
  const k = Number(ui.topk.value) || DEFAULT_TOP_K;
  const cards = files.map(newCard);
  ui.results.prepend(...cards.map((c) => c.li)); // newest first, in the order given
  trimResults();
  ui.status.textContent = `Classifying ${plural(files.length, "image")}…`;
  const said = new Array(files.length);
  let next = 0;
  async function worker() {
    while (next < files.length) {
      const i = next++;
      said[i] = await classifyOne(files[i], cards[i], key, info, k);
    }
  }
  await Promise.all(Array.from({ length: Math.min(IN_FLIGHT, files.length) }, worker));
  ui.status.textContent = said.join(" ");
}

// ---------- input: picker, drag and drop, paste ----------

ui.choose.addEventListener("click", () => ui.files.click());
ui.files.addEventListener("change", () => {
  const files = Array.from(ui.files.files);
  ui.files.value = ""; // choosing the same file again fires change again
  classifyFiles(files);
});

const hasFiles = (e) => !!e.dataTransfer && Array.from(e.dataTransfer.types || []).includes("Files");
let dragDepth = 0;
document.addEventListener("dragenter", (e) => {
  if (!hasFiles(e)) return;
  e.preventDefault();
  dragDepth++;
  ui.drop.classList.add("over");
});
document.addEventListener("dragleave", (e) => {
  if (!hasFiles(e)) return;
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) ui.drop.classList.remove("over");
});
document.addEventListener("dragover", (e) => {
  if (!hasFiles(e)) return;
  e.preventDefault(); // else the browser opens the file instead of dropping it here
  e.dataTransfer.dropEffect = "copy";
});
document.addEventListener("drop", (e) => {
  if (!hasFiles(e)) return;
  e.preventDefault();
  dragDepth = 0;
  ui.drop.classList.remove("over");
  classifyFiles(e.dataTransfer.files);
});
document.addEventListener("paste", (e) => {
  const files = e.clipboardData ? Array.from(e.clipboardData.files || []) : [];
  if (!files.length) return; // text pasted into a field stays text
  e.preventDefault();
  classifyFiles(files);
});

ui.model.addEventListener("change", () => showModel());
ui.clear.addEventListener("click", () => {
  for (const li of ui.results.children) if (li.dataset.url) URL.revokeObjectURL(li.dataset.url);
  ui.results.replaceChildren();
  trimResults();
  ui.status.textContent = "Results cleared.";
  ui.heading.focus(); // the button just disabled itself; keep the focus somewhere sensible
});

loadModels();
