// The llmaas console: plain ES modules, no build step, no external fonts or CDNs. It speaks only the public
// API (the same routes and keys as curl or the openai client), so a tenant sees exactly what the API shows it.
const ROOT = location.pathname.replace(/\/ui(\/.*)?$/, "");  // the app's route prefix ("" or "/something")
const $ = (id) => document.getElementById(id);
const KEY = "llmaas-key";
let models = [];

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { Authorization: `Bearer ${key}`, ...extra } : extra;
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const response = await fetch(ROOT + path, { ...options, headers: headers(options.headers) });
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

function show(page) {
  for (const section of document.querySelectorAll("main > section")) section.hidden = section.id !== `page-${page}`;
  for (const link of document.querySelectorAll("#nav a")) {
    link.toggleAttribute("aria-current", link.getAttribute("href") === `#${page}`);
  }
}

// ----- key -----
async function loadModels() {
  models = (await api("/v1/models")).data;
}

async function signIn() {
  try {
    await loadModels();
  } catch (err) {
    $("nav").hidden = true;
    show("key");
    $("key-error").textContent = sessionStorage.getItem(KEY) && err.status === 401 ? err.message : "";
    $("key-input").focus();
    return false;
  }
  $("nav").hidden = false;
  return true;
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("key-input").value.trim());
  isAdmin = null;
  $("key-input").value = "";
  if (await signIn()) route();
});
$("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  isAdmin = null;
  location.hash = "";
  signIn();
});

// ----- playground -----
function fillModels(select, keep, withNone = false) {
  const current = keep ?? select.value;
  select.replaceChildren(...(withNone ? [el("option", { value: "" }, "(none)")] : []),
    ...models.map((m) => el("option", { value: m.id }, m.alias_of ? `${m.id} → ${m.alias_of}` : m.id)));
  if (keep && !models.some((m) => m.id === keep)) {
    select.append(el("option", { value: keep }, keep));  // asked for by name (a job's new version, not listed yet)
  }
  if ([...select.options].some((o) => o.value === current)) select.value = current;
}

async function stream(model, side, messages) {
  const out = $(`answer-${side}`), stats = $(`stats-${side}`);
  $(`title-${side}`).textContent = model;
  out.textContent = "";
  stats.textContent = "…";
  const body = {
    model, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
  };
  if ($("json-mode").checked) body.response_format = { type: "json_object" };
  const started = performance.now();
  let first = null, usage = null, served = model;
  try {
    const response = await fetch(`${ROOT}/v1/chat/completions`, {
      method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body),
    });
    if (!response.ok) {
      const err = await response.json().catch(() => null);
      throw new ApiError(response.status, err);
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new ApiError(500, chunk);
          served = chunk.model || served;
          if (chunk.usage) usage = chunk.usage;
          const text = chunk.choices?.[0]?.delta?.content;
          if (text) {
            first ??= performance.now();
            out.textContent += text;
          }
        }
      }
    }
  } catch (err) {
    stats.textContent = "";
    out.textContent = `Error: ${err.message}`;
    out.classList.add("error");
    return;
  }
  out.classList.remove("error");
  const total = performance.now() - started;
  $(`title-${side}`).textContent = served;
  stats.textContent = `${usage ? `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens · ` : ""}` +
    `first token ${first ? Math.round(first - started) : "–"} ms · total ${Math.round(total)} ms`;
}

$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const messages = [];
  if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value });
  messages.push({ role: "user", content: $("prompt").value });
  const other = $("compare-select").value;
  $("side-b").hidden = !other;
  $("send").disabled = true;
  try {
    await Promise.all([stream($("model-select").value, "a", messages), other && stream(other, "b", messages)]);
  } finally {
    $("send").disabled = false;
  }
});

async function playground(params) {
  await loadModels();  // a version made since the last look (a job's "try it" link)
  fillModels($("model-select"), params.get("model"));
  fillModels($("compare-select"), params.get("compare") ?? undefined, true);
  $("prompt").focus();
}

// ----- models -----
function metricsText(metrics) {
  return Object.entries(metrics || {}).map(([k, v]) => `${k} ${typeof v === "number" ? v.toFixed(3) : v}`).join(", ");
}

async function adminAction(method, path, what, body) {
  if (!confirm(`${what}?`)) return;
  try {
    await api(path, { method, headers: { "Content-Type": "application/json" },
      body: body ? JSON.stringify(body) : undefined });
    $("models-error").textContent = "";
  } catch (err) {
    $("models-error").textContent = err.message;
  }
  await refreshModels();
}

let isAdmin = null;  // known after the first models page: admins read the whole registry (/v1/adapters)
let modelsDrawn = "";  // what the models table shows now (skips redraws that would change nothing)

function registryRows(state) {
  const rows = models.filter((m) => !m.parent).map((m) => ({ id: m.id, kind: "base" }));
  for (const entry of Object.values(state.adapters)) {
    rows.push({ id: entry.name, kind: "name", owner: entry.owner, serves: entry.alias ? `${entry.name}@${entry.alias}` : "",
      canary: entry.canary && Object.fromEntries(Object.entries(entry.canary).map(([v, s]) => [`${entry.name}@${v}`, s])) });
    for (const v of Object.values(entry.versions)) {
      rows.push({ id: `${entry.name}@${v.version}`, kind: "version", metrics: v.metadata?.metrics });
    }
  }
  return rows;
}

function cardRows(cards) {
  return cards.map((m) => ({
    id: m.id, kind: !m.parent ? "base" : m.id.includes("@") ? "version" : "name", serves: m.alias_of ?? "",
    canary: m.canary && Object.fromEntries(Object.entries(m.canary).map(([v, s]) => [`${m.id}@${v}`, s])),
    metrics: m.metadata?.metrics,
  }));
}

function actionsFor(row) {
  const cell = el("td");
  if (!isAdmin || row.kind === "base") return cell;
  const [name, version] = row.id.split("@");
  if (row.kind === "name") {
    cell.append(el("button", { type: "button", class: "rollback", "data-model": row.id,
      onclick: () => adminAction("POST", `/v1/adapters/${name}/rollback`, `Roll back ${name}`) }, "Roll back"));
    return cell;
  }
  cell.append(
    el("button", { type: "button", class: "promote", "data-model": row.id,
      onclick: () => adminAction("POST", `/v1/adapters/${name}/promote`, `Promote ${row.id}`, { version: Number(version) }) },
      "Promote"),
    el("button", { type: "button", class: "canary", "data-model": row.id, onclick: () => {
      const share = Number(prompt(`Share of ${name}'s traffic for ${row.id} (0-1)`, "0.1"));
      if (share > 0 && share < 1) {
        adminAction("POST", `/v1/adapters/${name}/promote`, `Canary ${row.id} at ${share}`,
          { version: Number(version), canary_share: share });
      }
    } }, "Canary"),
    el("button", { type: "button", class: "delete", "data-model": row.id,
      onclick: () => adminAction("DELETE", `/v1/adapters/${row.id}`, `Delete ${row.id}`) }, "Delete"));
  return cell;
}

async function refreshModels() {
  let rows;
  try {
    await loadModels();
    if (isAdmin !== false) {
      try {
        rows = registryRows(await api("/v1/adapters"));
        isAdmin = true;
      } catch (err) {
        if (err.status !== 403) throw err;
        isAdmin = false;  // a tenant key: what /v1/models shows it
      }
    }
    rows ??= cardRows(models);
  } catch (err) {
    $("models-error").textContent = err.message;
    return;
  }
  // Redrawn only when something changed: a redraw every second would take keyboard focus off the buttons.
  const drawn = JSON.stringify([isAdmin, rows]);
  if (drawn === modelsDrawn) return;
  modelsDrawn = drawn;
  $("models").tBodies[0].replaceChildren(...rows.map((r) => el("tr", { "data-model": r.id },
    el("td", {}, r.owner ? `${r.id} (${r.owner})` : r.id), el("td", { class: "serves" }, r.serves ?? ""),
    el("td", { class: "canary-share" }, r.canary ? Object.entries(r.canary).map(([v, s]) => `${v} ${Math.round(s * 100)}%`).join(" ") : ""),
    el("td", {}, metricsText(r.metrics)), actionsFor(r))));
}

// ----- fine-tuning -----
$("upload-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", $("file-input").files[0]);
  const result = $("upload-result");
  result.className = "";
  result.textContent = "Uploading…";
  try {
    const file = await api("/v1/files", { method: "POST", body: form });
    result.textContent = `Uploaded ${file.filename}: ${file.id}, ${file.rows ?? "?"} rows`;
    await refreshFiles(file.id);
  } catch (err) {
    result.className = "error";
    result.textContent = err.message;  // names the line: "upload:3: invalid JSON (...)"
  }
});

async function refreshFiles(select) {
  const files = (await api("/v1/files")).data;
  $("job-file").replaceChildren(...files.map((f) => el("option", { value: f.id }, `${f.filename} (${f.id})`)));
  if (select) $("job-file").value = select;
}

$("job-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = {
    model: $("job-model").value, training_file: $("job-file").value,
    hyperparameters: { n_epochs: Number($("job-epochs").value), batch_size: Number($("job-batch").value),
      learning_rate_multiplier: Number($("job-lr").value) },
  };
  if ($("job-suffix").value) body.suffix = $("job-suffix").value;
  try {
    if ($("job-extra").value.trim()) body.llmaas = JSON.parse($("job-extra").value);
    const job = await api("/v1/fine_tuning/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body) });
    location.hash = `#job/${job.id}`;
  } catch (err) {
    $("job-result").className = "error";
    $("job-result").textContent = err.message;
  }
});

async function finetune() {
  $("job-model").replaceChildren(...models.filter((m) => !m.parent).map((m) => el("option", { value: m.id }, m.id)));
  await refreshFiles();
  const jobs = (await api("/v1/fine_tuning/jobs?limit=100")).data;
  $("jobs").tBodies[0].replaceChildren(...jobs.map((j) => el("tr", { "data-job": j.id },
    el("td", {}, el("a", { href: `#job/${j.id}` }, j.id)), el("td", {}, j.status), el("td", {}, j.fine_tuned_model ?? ""),
    el("td", {}, new Date(j.created_at * 1000).toLocaleString()))));
}

function lossCurve(points) {
  const svg = $("loss-curve");
  svg.replaceChildren();
  if (!points.length) return;
  const [w, h, pad] = [400, 160, 24];
  const steps = points.map((p) => p[0]), losses = points.map((p) => p[1]);
  const [s0, s1] = [Math.min(...steps), Math.max(...steps)], [l0, l1] = [Math.min(...losses), Math.max(...losses)];
  const x = (s) => pad + (s1 > s0 ? (s - s0) / (s1 - s0) : 0.5) * (w - 2 * pad);
  const y = (l) => h - pad - (l1 > l0 ? (l - l0) / (l1 - l0) : 0.5) * (h - 2 * pad);
  const ns = "http://www.w3.org/2000/svg";
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", points.map(([s, l]) => `${x(s).toFixed(1)},${y(l).toFixed(1)}`).join(" "));
  const label = (text, lx, ly) => {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", lx);
    t.setAttribute("y", ly);
    t.textContent = text;
    return t;
  };
  svg.append(line, label(`loss ${l1.toFixed(3)}`, 2, 12), label(`${l0.toFixed(3)}`, 2, h - 4),
    label(`step ${s1}`, w - 60, h - 4));
}

let jobTimer = null;
async function job(id) {
  clearTimeout(jobTimer);
  $("job-id").textContent = id;
  const [record, events] = await Promise.all([api(`/v1/fine_tuning/jobs/${id}`),
    api(`/v1/fine_tuning/jobs/${id}/events?limit=1000`)]);
  $("job-status").textContent = record.status + (record.error ? `: ${record.error.message}` : "");
  const ordered = events.data.slice().reverse();
  $("job-events").replaceChildren(...ordered.map((e) => el("li", { class: e.level }, `${e.type}: ${e.message}`)));
  lossCurve(ordered.filter((e) => e.type === "metrics" && e.data.train_loss !== undefined)
    .map((e) => [e.data.step, e.data.train_loss]));
  const names = [...new Set([...Object.keys(record.metrics_before || {}), ...Object.keys(record.metrics || {})])];
  $("job-eval").tBodies[0].replaceChildren(...names.map((k) => el("tr", {}, el("td", {}, k),
    el("td", {}, record.metrics_before?.[k]?.toFixed?.(3) ?? ""), el("td", {}, record.metrics?.[k]?.toFixed?.(3) ?? ""))));
  const tryIt = $("try-model");
  tryIt.hidden = !record.fine_tuned_model;
  if (record.fine_tuned_model) tryIt.href = `#playground?model=${encodeURIComponent(record.fine_tuned_model)}`;
  if (!["succeeded", "failed", "cancelled"].includes(record.status) && location.hash === `#job/${id}`) {
    jobTimer = setTimeout(() => job(id).catch(() => {}), 1000);
  }
}

// ----- usage and health -----
async function usage() {
  try {
    const rows = (await api("/v1/usage?group_by=tenant,model")).data;
    $("usage").tBodies[0].replaceChildren(...rows.map((r) => el("tr", {}, el("td", {}, r.tenant ?? ""),
      el("td", {}, r.model ?? ""), el("td", {}, r.requests), el("td", {}, r.prompt_tokens),
      el("td", {}, r.completion_tokens), el("td", {}, r.cached_tokens ?? 0), el("td", {}, r.avg_latency_ms ?? "–"),
      el("td", {}, r.training_tokens ?? 0))));
    $("usage-error").textContent = "";
  } catch (err) {
    $("usage-error").textContent = err.message;
  }
  try {
    const status = await api("/v1/status");
    $("health").textContent = status.replicas.map((r) =>
      `replica ${r.replica}: ${r.running} running, ${r.waiting} waiting, KV cache ${Math.round(r.kv_cache_usage * 100)}%, ` +
      `${r.adapters} adapters loaded`).join("; ");
  } catch (err) {
    $("health").textContent = err.status === 403 ? "replica health is shown to admin keys" : err.message;
  }
}

// ----- routing -----
let modelsTimer = null;
async function route() {
  clearInterval(modelsTimer);
  const [path, query] = (location.hash.slice(1) || "playground").split("?");
  const params = new URLSearchParams(query || "");
  const [page, arg] = path.split("/");
  show(page === "job" ? "job" : page);
  try {
    if (page === "playground") await playground(params);
    else if (page === "models") {
      await refreshModels();
      modelsTimer = setInterval(refreshModels, 1000);  // the registry's changes show within a second
    } else if (page === "finetune") await finetune();
    else if (page === "job") await job(arg);
    else if (page === "usage") await usage();
  } catch (err) {
    if (err.status === 401) signIn();
  }
}

window.addEventListener("hashchange", route);
if (await signIn()) route();
