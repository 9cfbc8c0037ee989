// The playground: a page over this server's own OpenAI routes. No framework, no build step.
// All text from the server or the user is set with textContent, never parsed as HTML.
"use strict";

const KEY_STORE = "jaxembed-api-key";  // sessionStorage: this tab only, gone when it closes
const $ = (id) => document.getElementById(id);
const state = { info: null, vectors: [], texts: [], selected: 0, messages: [], abort: null };

// ---- HTTP ------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    const err = body && body.error;
    super(err && err.message ? err.message : `HTTP ${status}`);
    this.status = status;
    this.param = err ? err.param : null;
  }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, body, signal) {
  const init = { headers: authHeaders(), signal };
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  if (!resp.ok) {
    let parsed = null;
    try { parsed = await resp.json(); } catch (_) { /* not JSON: the status says it */ }
    if (resp.status === 401) askForKey(parsed && parsed.error && parsed.error.message);
    throw new ApiError(resp.status, parsed);
  }
  return resp;
}

function showError(id, error) {
  const el = $(id);
  if (!error) { el.hidden = true; el.textContent = ""; return; }
  el.textContent = error.param ? `${error.message} (parameter: ${error.param})` : error.message;
  el.hidden = false;
}

// ---- API key ---------------------------------------------------------------------------------

function askForKey(message) {
  $("auth").hidden = false;
  showError("auth-error", message && sessionStorage.getItem(KEY_STORE) ? { message } : null);
  $("api-key").focus();
}

$("auth").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
  loadInfo();
});

// ---- tabs ------------------------------------------------------------------------------------

for (const tab of document.querySelectorAll('[role="tab"]')) {
  tab.addEventListener("click", () => {
    for (const other of document.querySelectorAll('[role="tab"]')) {
      const on = other === tab;
      other.setAttribute("aria-selected", String(on));
      $(`panel-${other.dataset.panel}`).hidden = !on;
    }
  });
}

// ---- info ------------------------------------------------------------------------------------

function definitionList(el, rows) {
  el.replaceChildren();
  for (const [term, value] of rows) {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = term;
    dd.textContent = value;
    el.append(dt, dd);
  }
}

async function loadInfo() {
  let info;
  try {
    info = await (await api("/info")).json();
  } catch (error) {
    if (error.status !== 401) {  // 401 asks for the key; anything else (503 while loading) retries
      showError("status", { message: `${error.message} (retrying)` });
      setTimeout(loadInfo, 2000);
    }
    return;
  }
  $("auth").hidden = true;
  showError("auth-error", null);
  showError("status", null);
  state.info = info;
  $("model-name").textContent = info.model;
  const pooling = info.embeddings;
  definitionList($("info"), [
    ["model", info.model],
    ["served names", [...info.served_model_names, "default"].join(", ")],
    ["family", info.family],
    ["format", info.format],
    ["dtype", info.dtype],
    ["kept quantized", info.quantized.length ? info.quantized.join(", ") : "none"],
    ["backend", info.backend],
    ["context", `${info.max_model_len} tokens`],
    ["embedding size", String(pooling.embedding_size)],
    ["attention", info.attention],
    ["pooling default", pooling.embedding_type],
    ["normalize default", pooling.normalize ? "on" : "off"],
    ["dimensions", pooling.dimensions.length ? pooling.dimensions.join(", ") : "any up to the size"],
    ["prompts", pooling.prompts.length ? pooling.prompts.join(", ") : "none"],
    ["chat template", info.generation.chat_template ? "yes" : "no (chat is sent as a plain completion)"],
    ["sequences at once", String(info.generation.max_num_seqs)],
    ["tasks", info.tasks.join(", ")],
    ["scoring", info.scoring.source],
    ["version", info.version],
  ]);
  $("rerank-mode").textContent = info.scoring.classifier
    ? `Scores from ${info.scoring.source}, through /v1/rerank.`
    : "This model has no classifier: /v1/rerank scores by the cosine similarity of embeddings.";
  $("chat-mode").textContent = info.generation.chat_template
    ? "Messages go to /v1/chat/completions through the model's chat template."
    : "This model has no chat template: each message is sent to /v1/completions as a plain prompt.";
  $("dimensions").max = pooling.embedding_size;
  updateCurl();
  pollMetrics();
}

// ---- live figures from /metrics --------------------------------------------------------------

const metricsSeen = { at: 0, embedded: 0, generated: 0 };

function parseMetrics(text) {
  const sums = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = /^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$/.exec(line);
    if (match) sums[match[1]] = (sums[match[1]] || 0) + Number(match[3]);
  }
  return sums;
}

async function pollMetrics() {
  clearTimeout(pollMetrics.timer);
  pollMetrics.timer = setTimeout(pollMetrics, 2000);
  if (document.hidden) return;
  let m;
  try {
    m = parseMetrics(await (await api("/metrics")).text());
  } catch (_) {
    return;  // a missed scrape is shown by figures that stop moving
  }
  const now = performance.now();
  const embedded = m.jaxembed_tokens_embedded_total || 0;
  const generated = m.jaxembed_tokens_generated_total || 0;
  const rows = [
    ["queue depth", `${m.jaxembed_queue_depth ?? 0} of ${m.jaxembed_queue_capacity ?? "?"}`],
    ["sequences generating", `${m.jaxembed_sequences_running ?? 0} of ${m.jaxembed_sequences_capacity ?? "?"}`],
    ["tokens embedded", String(embedded)],
    ["tokens generated", String(generated)],
    ["compilations", String(m.jaxembed_compilations_total ?? 0)],
  ];
  $("live-queue").textContent = String(m.jaxembed_queue_depth ?? 0);
  if (metricsSeen.at) {
    const seconds = (now - metricsSeen.at) / 1000;
    const embedRate = (embedded - metricsSeen.embedded) / seconds;
    const genRate = (generated - metricsSeen.generated) / seconds;
    $("live-rate").textContent = `${embedRate.toFixed(0)} tok/s embedded, ${genRate.toFixed(1)} tok/s generated`;
    rows.push(["throughput", $("live-rate").textContent]);
  }
  Object.assign(metricsSeen, { at: now, embedded, generated });
  definitionList($("live-info"), rows);
}

// ---- embeddings ------------------------------------------------------------------------------

function embeddingRequest() {
  const texts = $("texts").value.split("\n").map((t) => t.trim()).filter((t) => t);
  const body = { model: "default", input: texts, encoding_format: "float" };
  if ($("pooling").value) body.embedding_type = $("pooling").value;
  if ($("normalize").value) body.normalize = $("normalize").value === "true";
  const dims = $("dimensions").value.trim();
  if (dims) body.dimensions = Number(dims);
  return body;
}

function shellQuote(s) {
  return `'${s.replaceAll("'", "'\\''")}'`;
}

function updateCurl() {
  const needsKey = Boolean(sessionStorage.getItem(KEY_STORE));
  const lines = [`curl ${location.origin}/v1/embeddings`, "  -H 'Content-Type: application/json'"];
  // The key itself is never written into the page: the command reads it from the environment.
  if (needsKey) lines.push('  -H "Authorization: Bearer $JAXEMBED_API_KEY"');
  lines.push(`  -d ${shellQuote(JSON.stringify(embeddingRequest()))}`);
  $("curl").textContent = lines.join(" \\\n");
}

for (const id of ["texts", "pooling", "normalize", "dimensions"]) {
  $(id).addEventListener("input", updateCurl);
}

$("copy-curl").addEventListener("click", async () => {
  const text = $("curl").textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {  // no clipboard permission: select the text so that Ctrl+C copies it
    getSelection().selectAllChildren($("curl"));
    return;
  }
  $("copy-done").hidden = false;
  setTimeout(() => { $("copy-done").hidden = true; }, 1500);
});

function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return na && nb ? dot / Math.sqrt(na * nb) : 0;
}

// White at the lowest off-diagonal similarity, the accent colour at the highest: decoder
// embeddings often sit in a narrow band of cosines, which a fixed -1..1 scale would flatten.
function heatColour(value, lo, hi) {
  const t = hi > lo ? Math.min(1, Math.max(0, (value - lo) / (hi - lo))) : 1;
  const mix = (a, b) => Math.round(a + (b - a) * t);
  return [`rgb(${mix(255, 36)}, ${mix(255, 87)}, ${mix(255, 197)})`, t > 0.55 ? "#fff" : "#1d2430"];
}

function renderHeatmap(sims) {
  const n = sims.length;
  const off = sims.flatMap((row, i) => row.filter((_, j) => j !== i));
  const lo = off.length ? Math.min(...off) : 0;
  const hi = off.length ? Math.max(...off) : 1;
  const table = $("heatmap");
  table.replaceChildren();
  const head = table.createTHead().insertRow();
  head.append(document.createElement("th"));
  for (let j = 0; j < n; j++) {
    const th = document.createElement("th");
    th.textContent = `#${j + 1}`;
    th.title = state.texts[j];
    head.append(th);
  }
  const body = table.createTBody();
  sims.forEach((row, i) => {
    const tr = body.insertRow();
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = `#${i + 1} ${state.texts[i]}`;
    th.title = state.texts[i];
    tr.append(th);
    tr.addEventListener("click", () => selectText(i));
    row.forEach((value, j) => {
      const td = tr.insertCell();
      td.dataset.value = String(value);
      td.textContent = value.toFixed(3);
      td.title = `#${i + 1} · #${j + 1}: ${value.toFixed(6)}`;
      [td.style.background, td.style.color] = i === j ? ["#e5e7eb", "#5f6b7a"] : heatColour(value, lo, hi);
    });
  });
  $("heatmap-scale").textContent = n > 1
    ? `Colour from ${lo.toFixed(3)} (white) to ${hi.toFixed(3)} (blue), the range off the diagonal.`
    : "";
}

function selectText(i) {
  state.selected = i;
  const sims = state.sims;
  document.querySelectorAll("#heatmap tbody tr").forEach((tr, k) => tr.classList.toggle("selected", k === i));
  $("nn-of").textContent = state.texts[i];
  const order = sims[i].map((value, j) => [value, j]).filter(([, j]) => j !== i).sort((a, b) => b[0] - a[0]);
  const list = $("neighbours");
  list.replaceChildren();
  for (const [value, j] of order) {
    const li = document.createElement("li");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = value.toFixed(4);
    li.append(score, state.texts[j]);
    li.dataset.index = String(j);
    li.addEventListener("click", () => selectText(j));
    list.append(li);
  }
}

async function runEmbeddings() {
  const request = embeddingRequest();
  showError("embed-error", null);
  $("embed-run").disabled = true;
  const started = performance.now();
  try {
    const resp = await api("/v1/embeddings", request);
    const result = await resp.json();
    const ms = performance.now() - started;
    state.texts = request.input;
    state.vectors = result.data.sort((a, b) => a.index - b.index).map((d) => d.embedding);
    state.sims = state.vectors.map((a) => state.vectors.map((b) => cosine(a, b)));
    $("embed-summary").textContent = `${state.vectors.length} vectors of ${state.vectors[0].length} values, ` +
      `${result.usage.prompt_tokens} tokens, ${ms.toFixed(0)} ms ` +
      `(queue ${resp.headers.get("x-queue-time") ?? "?"} ms, inference ${resp.headers.get("x-inference-time") ?? "?"} ms)`;
    renderHeatmap(state.sims);
    selectText(Math.min(state.selected, state.vectors.length - 1));
    $("embed-result").hidden = false;
  } catch (error) {
    showError("embed-error", error);
  } finally {
    $("embed-run").disabled = false;
  }
}

$("embed-run").addEventListener("click", runEmbeddings);

// ---- rerank ----------------------------------------------------------------------------------

function rerankRequest() {
  const request = {
    model: "default",
    query: $("query").value,
    documents: $("documents").value.split("\n").map((t) => t.trim()).filter((t) => t.length > 0),
  };
  const n = $("top-n").value.trim();
  if (n !== "") request.top_n = Number(n);
  return request;
}

async function runRerank() {
  const request = rerankRequest();
  showError("rerank-error", null);
  $("rerank-run").disabled = true;
  const started = performance.now();
  try {
    const result = await (await api("/v1/rerank", request)).json();
    const scores = result.results.map((r) => r.relevance_score);
    // Bars from the lowest score shown (or 0) to the highest: cosines may be negative.
    const lo = Math.min(0, ...scores);
    const span = Math.max(...scores) - lo || 1;
    const list = $("ranking");
    list.replaceChildren();
    for (const r of result.results) {
      const li = document.createElement("li");
      li.dataset.index = String(r.index);
      li.dataset.score = String(r.relevance_score);
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = r.relevance_score.toFixed(4);
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = `${(100 * (r.relevance_score - lo)) / span}%`;
      li.append(score, document.createTextNode(request.documents[r.index]), bar);
      list.append(li);
    }
    $("rerank-summary").textContent = `${result.results.length} of ${request.documents.length} ` +
      `documents, ${result.usage.total_tokens} tokens, ${(performance.now() - started).toFixed(0)} ms`;
  } catch (error) {
    showError("rerank-error", error);
  } finally {
    $("rerank-run").disabled = false;
  }
}

$("rerank-run").addEventListener("click", runRerank);

// ---- chat ------------------------------------------------------------------------------------

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.textContent = text;
  $("conversation").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

// Server-sent events: `data: {...}` blocks separated by a blank line, ending with `data: [DONE]`.
async function* events(resp) {
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function chatRequest(text) {
  const temperature = Number($("temperature").value || 0);
  const body = { model: "default", stream: true, stream_options: { include_usage: true }, temperature };
  const maxTokens = $("max-tokens").value.trim();
  if (maxTokens) body.max_tokens = Number(maxTokens);
  const stop = $("stop").value.replaceAll("\\n", "\n");
  if (stop) body.stop = [stop];
  if (state.info && !state.info.generation.chat_template) {
    return ["/v1/completions", { ...body, prompt: text }];
  }
  return ["/v1/chat/completions", { ...body, messages: [...state.messages, { role: "user", content: text }] }];
}

function showRate(tokens, firstAt, lastAt, started) {
  const seconds = (lastAt - firstAt) / 1000;
  const parts = [`${tokens} tokens`, `first after ${(firstAt - started).toFixed(0)} ms`];
  if (tokens > 1 && seconds > 0) parts.push(`${((tokens - 1) / seconds).toFixed(1)} tokens/s`);
  $("chat-stats").textContent = parts.join(" · ");
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || state.abort) return;
  showError("chat-error", null);
  const [path, request] = chatRequest(text);
  state.abort = new AbortController();
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  const started = performance.now();
  let reply = null, firstAt = 0, lastAt = 0, chunks = 0, usage = null;
  try {
    const resp = await api(path, request, state.abort.signal);
    addMessage("user", text);
    state.messages.push({ role: "user", content: text });
    $("chat-input").value = "";
    reply = addMessage("assistant", "");
    reply.classList.add("streaming");
    for await (const chunk of events(resp)) {
      if (chunk.error) throw new ApiError(400, chunk);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      const piece = choice ? (choice.delta ? choice.delta.content : choice.text) : "";
      if (!piece) continue;
      lastAt = performance.now();
      if (!firstAt) firstAt = lastAt;
      chunks += 1;
      reply.textContent += piece;
      showRate(chunks, firstAt, lastAt, started);
      reply.scrollIntoView({ block: "end" });
    }
    if (usage) showRate(usage.completion_tokens, firstAt || started, lastAt || started, started);
  } catch (error) {
    if (error.name !== "AbortError") showError("chat-error", error);
  } finally {
    if (reply) {
      reply.classList.remove("streaming");
      reply.dataset.done = "true";
      if (reply.textContent) state.messages.push({ role: "assistant", content: reply.textContent });
    }
    state.abort = null;
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
  }
}

$("chat-form").addEventListener("submit", sendChat);
$("chat-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) sendChat(event);
});
// Aborting the fetch closes the connection: the server stops the generation and frees its slot.
$("chat-stop").addEventListener("click", () => state.abort && state.abort.abort());
$("chat-clear").addEventListener("click", () => {
  state.messages = [];
  $("conversation").replaceChildren();
  $("chat-stats").textContent = "";
  showError("chat-error", null);
});

updateCurl();
loadInfo();
