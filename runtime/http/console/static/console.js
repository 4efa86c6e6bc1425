// loradock console: what the server-rendered pages gain with script (search and sort, alias
// writes, live serving figures, the curve readout, streamed playground answers). No build step.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

function toast(text, bad = false) {
  const box = $("#toast");
  box.textContent = text;
  box.className = bad ? "show bad" : "show";
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.className = ""; }, 6000);
}

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text) node.textContent = text;
  return node;
}

function humanSize(n) {
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i ? `${n.toFixed(1)} ${units[i]}` : `${n} B`;
}

// ---- writes: alias moves and rollbacks ----

async function write(path, body) {
  const response = await fetch(path, {
    method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-Loradock-Console": "1"},
    body: JSON.stringify(body),
  });
  const answer = await response.json().catch(() => ({error: `HTTP ${response.status}`}));
  if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
  return answer;
}

function setUpWrites() {
  for (const button of $$("[data-rollback]")) {
    button.addEventListener("click", async () => {
      const {name, alias} = button.dataset;
      const reason = prompt(`Roll ${name}@${alias} back to its previous target. Reason (kept in its history):`, "");
      if (reason === null) return;
      try {
        const moved = await write("/ui/api/rollback", {name, alias, reason});
        toast(`${name}@${alias} → ${moved.ref} (rolled back)`);
        setTimeout(() => location.reload(), 800);
      } catch (e) { toast(`Not rolled back: ${e.message}`, true); }
    });
  }
  const form = $("#move-alias");
  if (form) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const body = {name: form.dataset.name, version: Number(form.dataset.version), alias: form.alias.value.trim(),
                    weight: Number(form.weight.value || 100), reason: form.reason.value, require: form.require.value};
      try {
        const moved = await write("/ui/api/aliases", body);
        toast(`${body.name}@${body.alias} → ${moved.ref}${body.weight < 100 ? ` (${body.weight}% canary)` : ""}`);
        setTimeout(() => location.reload(), 800);
      } catch (e) { toast(`Not moved: ${e.message}`, true); }
    });
  }
}

// ---- adapters page: search, sort, expand ----

function setUpAdapters() {
  const table = $("#adapters");
  if (!table) return;
  const groups = $$("tbody.adapter", table);
  const search = $("#search");
  const none = $("#no-match");
  search.addEventListener("input", () => {
    const words = search.value.toLowerCase().split(/\s+/).filter(Boolean);
    let shown = 0;
    for (const group of groups) {
      const text = group.dataset.search.toLowerCase();
      group.hidden = !words.every((w) => text.includes(w));
      if (!group.hidden) shown++;
    }
    none.hidden = shown > 0;
  });
  const order = {
    name: (a, b) => a.dataset.name.localeCompare(b.dataset.name),
    created: (a, b) => b.dataset.created.localeCompare(a.dataset.created),
    versions: (a, b) => Number(b.dataset.versions) - Number(a.dataset.versions),
    size: (a, b) => Number(b.dataset.size) - Number(a.dataset.size),
  };
  $("#sort").addEventListener("change", (event) => {
    const sorted = [...groups].sort(order[event.target.value]);
    for (const group of sorted) table.appendChild(group);
  });
  for (const button of $$("[data-expand]", table)) {
    button.addEventListener("click", () => {
      const open = button.getAttribute("aria-expanded") !== "true";
      button.setAttribute("aria-expanded", String(open));
      button.textContent = open ? "hide" : "show all";
      for (const row of $$("tr.older", button.closest("tbody"))) row.hidden = !open;
    });
  }
}

// ---- version page: the loss curve's readout ----

function setUpCurve() {
  const svg = $("#curve");
  if (!svg) return;
  const points = $$("circle.pt", svg);
  const readout = $("#curve-readout");
  svg.addEventListener("mousemove", (event) => {
    const box = svg.getBoundingClientRect();
    const x = (event.clientX - box.left) * 600 / box.width;
    let best = null;
    for (const p of points) {
      const d = Math.abs(Number(p.getAttribute("cx")) - x);
      if (!best || d < best.d) best = {d, p};
    }
    if (!best) return;
    for (const p of points) p.classList.toggle("hot", p === best.p);
    const {series, step, value} = best.p.dataset;
    readout.textContent = `${series} ${Number(value).toFixed(4)} at step ${step}`;
  });
}

// ---- serving page: live figures ----

function field(data, path) {
  return path.split(".").reduce((value, key) => (value == null ? value : value[key]), data);
}

function renderTier(id, refs) {
  const box = $(id);
  if (!box) return;
  box.replaceChildren(...(refs.length ? refs.map((ref) => el("a", {class: "alias", href: `/ui/adapters/${ref.replace("@", "/")}`}, ref))
                                       : [el("span", {class: "muted"}, "none")]));
}

function spark(series) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 120 24");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `requests per interval: ${series.join(", ")}`);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  const top = Math.max(1, ...series);
  const step = 120 / Math.max(1, series.length - 1);
  line.setAttribute("points", series.map((n, i) => `${i * step},${22 - 20 * n / top}`).join(" "));
  svg.appendChild(line);
  return svg;
}

function renderAdapters(rows) {
  const body = $("#per-adapter tbody");
  if (!body) return;
  const ms = (v) => (v == null ? "–" : `${v} ms`);
  body.replaceChildren(...(rows.length ? rows.map((a) => {
    const tr = el("tr", {"data-key": a.key});
    tr.append(el("th", {scope: "row"}, a.key), el("td", {}, String(a.window.requests_per_min)),
              el("td", {}, String(a.window.generated_tokens_per_min)), el("td", {}, String(a.window.errors)),
              el("td", {}, ms(a.ttft_p50_ms)), el("td", {}, ms(a.ttft_p99_ms)), el("td", {}, ms(a.duration_p50_ms)));
    const cell = el("td");
    cell.appendChild(spark(a.series));
    tr.append(cell, el("td", {}, `${a.totals.requests} requests, ${a.totals.generated_tokens} tokens, ${a.totals.errors} errors`));
    return tr;
  }) : [(() => { const tr = el("tr"); tr.appendChild(el("td", {colspan: "9", class: "muted"}, "No requests yet.")); return tr; })()]));
}

function setUpServing() {
  const live = $("#serving[data-live]");
  if (!live) return;
  const every = Number(document.body.dataset.refreshMs) || 2000;
  async function tick() {
    try {
      const response = await fetch(live.dataset.live, {credentials: "same-origin"});
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const data = await response.json();
      if (!data.ready) return;
      if (!$(".gauges", live)) { location.reload(); return; }  // it was loading: draw the whole page
      for (const node of $$("[data-field]")) {
        const value = field(data, node.dataset.field);
        if (value != null) node.textContent = node.dataset.format === "size" ? humanSize(value) : String(value);
      }
      $("#kv-meter").value = data.kv.reserved_tokens;
      $("#slot-meter").value = data.slots.used;
      renderTier("#tier-device", data.resident.device);
      renderTier("#tier-host", data.resident.host);
      $("#promoting").textContent = data.promoting.join(", ") || "–";
      renderAdapters(data.adapters);
      live.dataset.updated = String(Date.now());
    } catch (e) {
      $("#serving-state").textContent = `Not updating: ${e.message}`;
    } finally {
      setTimeout(tick, every);
    }
  }
  setTimeout(tick, every);
}

// ---- playground: one prompt, several models, streamed side by side ----

function requestFor(model, form) {
  const messages = [];
  if (form.system.value.trim()) messages.push({role: "system", content: form.system.value});
  messages.push({role: "user", content: form.prompt.value});
  const body = {model, messages, stream: true, max_tokens: Number(form.max_tokens.value),
                temperature: Number(form.temperature.value), top_p: Number(form.top_p.value)};
  if (form.seed.value !== "") body.seed = Number(form.seed.value);
  return body;
}

function showCode(body, models) {
  const shown = {...body, model: models[0]};
  $("#code-curl").textContent =
    `curl ${location.origin}/v1/chat/completions \\\n  -H "Authorization: Bearer $LORADOCK_TOKEN" \\\n` +
    `  -H "Content-Type: application/json" \\\n  -d '${JSON.stringify(shown).replace(/'/g, "'\\''")}'`;
  const args = Object.entries(body).filter(([k]) => k !== "messages" && k !== "model" && k !== "stream")
    .map(([k, v]) => `        ${k}=${JSON.stringify(v)},`).join("\n");
  $("#code-python").textContent =
    `import os\n\nfrom openai import OpenAI\n\nclient = OpenAI(base_url="${location.origin}/v1", api_key=os.environ["LORADOCK_TOKEN"])\n` +
    `for model in ${JSON.stringify(models)}:\n    stream = client.chat.completions.create(\n` +
    `        model=model,\n        messages=${JSON.stringify(body.messages)},\n        stream=True,\n${args}\n    )\n` +
    `    for chunk in stream:\n        print(chunk.choices[0].delta.content or "", end="")\n    print()`;
}

async function stream(body, column) {
  const text = $(".text", column);
  const meta = $(".meta", column);
  const started = performance.now();
  let first = null;
  let tokens = 0;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", credentials: "same-origin", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error((error.error && error.error.message) || `HTTP ${response.status}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        $(".served", column).textContent = chunk.model;
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) {
            if (first === null) first = performance.now();
            tokens++;
            text.textContent += choice.delta.content;
          }
          if (choice.finish_reason) column.dataset.finish = choice.finish_reason;
        }
      }
    }
    const ttft = first === null ? "–" : `${Math.round(first - started)} ms`;
    meta.textContent = `${tokens} chunks · first token ${ttft} · ${Math.round(performance.now() - started)} ms · ${column.dataset.finish || ""}`;
    column.dataset.state = "done";
  } catch (e) {
    meta.textContent = `Error: ${e.message}`;
    column.dataset.state = "error";
  }
}

function setUpPlayground() {
  const form = $("#playground");
  if (!form) return;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const models = $$("input[name=model]:checked", form).map((box) => box.value);
    if (!models.length) { toast("Pick at least one model.", true); return; }
    const answers = $("#answers");
    answers.replaceChildren();
    const runs = models.map((model) => {
      const column = el("section", {class: "answer card", "data-model": model, "data-state": "streaming", "aria-label": `answer of ${model}`});
      const head = el("h2", {class: "small"}, model);
      head.appendChild(el("span", {class: "served muted"}));
      column.append(head, el("div", {class: "text"}), el("p", {class: "meta muted"}, "streaming…"));
      answers.appendChild(column);
      return stream(requestFor(model, form), column);
    });
    showCode(requestFor(models[0], form), models);
    $("#send").disabled = true;
    await Promise.all(runs);
    $("#send").disabled = false;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  setUpWrites();
  setUpAdapters();
  setUpCurve();
  setUpServing();
  setUpPlayground();
});
