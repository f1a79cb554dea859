/* Parley playground: a chat page over the server's own public API, in plain JavaScript.

   What it calls (paths relative to the page, so it also works behind a proxy's prefix):
     GET  info                   the model and its limits
     GET  v1/models              the served model's names and its LoRA adapters (the model chooser)
     POST v1/chat/completions    streamed (SSE), with logprobs for the token colours
     GET  metrics                Prometheus text, for the server status panel, every 2 s
   With --api-key every call sends `Authorization: Bearer KEY`; the key is asked for on the first
   401 and kept in sessionStorage (this tab only). The conversation and the settings are kept in
   localStorage. Model output is only ever inserted as text (textContent), never as HTML. */
"use strict";

const SAVED = "parley.playground";  // localStorage: {system, model, settings, messages}
const KEY = "parley.apiKey";        // sessionStorage
const STATUS_EVERY_MS = 2000;
const NUMBER_PARAMS = ["temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                       "repetition_penalty", "seed", "max_tokens"];

const $ = (id) => document.getElementById(id);

const page = {
  info: null,          // GET /info, once connected
  controller: null,    // the AbortController of the generation running, if any
  editing: null,       // index of the message being edited
  lastTokens: null,    // {at, tokens}: the previous status poll, for the server's tokens/s
  renderQueued: false,
};

let saved = loadSaved();

function loadSaved() {
  try {
    const value = JSON.parse(localStorage.getItem(SAVED));
    if (value && Array.isArray(value.messages)) return {system: "", model: "", settings: {}, ...value};
  } catch (_) { /* unreadable: start afresh */ }
  return {system: "", model: "", settings: {logprobs: true}, messages: []};
}

function save() {
  localStorage.setItem(SAVED, JSON.stringify(saved));
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// -- talking to the server -------------------------------------------------------------------------
class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = {...(options.headers || {})};
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = "Bearer " + key;
  const response = await fetch(path, {...options, headers});
  if (response.status === 401) {
    askForKey(key ? "The server refused this key." : "");
    throw new HttpError(401, "the server wants an API key");
  }
  if (!response.ok) throw new HttpError(response.status, await errorMessage(response));
  return response;
}

async function errorMessage(response) {
  const text = await response.text();
  try {
    const error = JSON.parse(text).error;  // TGI's {"error": "..."} or OpenAI's {"error": {"message"}}
    return `${response.status}: ${typeof error === "string" ? error : error.message}`;
  } catch (_) {
    return `${response.status}: ${text || response.statusText}`;
  }
}

/* The JSON payload of each `data:` event of a response's SSE body, until [DONE]. */
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = frame.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function askForKey(reason) {
  const dialog = $("key-dialog");
  if (dialog.open) return;
  dialog.querySelector("p").textContent =
    (reason ? reason + " " : "") + "This server wants an API key. It is kept in this browser tab only (sessionStorage).";
  $("key-input").value = "";
  dialog.showModal();
}

async function connect() {
  try {
    page.info = await (await api("info")).json();
    const models = (await (await api("v1/models")).json()).data;
    showModels(models);
    showLimits(page.info);
    notice("");
    pollStatus();
  } catch (err) {
    if (err.status === 503) {  // still loading the model
      notice("The server is loading the model… (" + err.message + ")");
      setTimeout(connect, 2000);
    } else if (err.status !== 401) {
      notice("Cannot reach the server: " + err.message);
    }
  }
  $("forget-key").hidden = !sessionStorage.getItem(KEY);
}

function notice(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

function showModels(models) {
  const select = $("model");
  select.replaceChildren();
  for (const card of models) {
    const label = card.parent ? `${card.id} (LoRA adapter on ${card.parent})` : card.id;
    const option = el("option", "", label);
    option.value = card.id;
    select.append(option);
  }
  if (models.some((card) => card.id === saved.model)) select.value = saved.model;
  saved.model = select.value;
}

function showLimits(info) {
  $("model-info").textContent = $("model-info").title = `${info.model_id} · ${info.model_dtype} on ${info.model_device_type} · ` +
    `context ${info.max_total_tokens} tokens (prompt ≤ ${info.max_input_tokens}) · ` +
    `≤ ${info.max_stop_sequences} stop sequences, ≤ ${info.max_top_n_tokens} top logprobs · Parley ${info.version}`;
  const maxTokens = document.querySelector('[data-param="max_tokens"]');
  maxTokens.max = info.max_total_tokens - 1;
  maxTokens.title = `at most ${info.max_total_tokens} with the prompt`;
  document.querySelector('[data-param="stop"]').title = `at most ${info.max_stop_sequences}`;
  const logprobs = document.querySelector('[data-param="logprobs"]');
  logprobs.disabled = !info.max_top_n_tokens;
}

// -- settings -> the chat request ------------------------------------------------------------------
function bindSettings() {
  for (const input of document.querySelectorAll("[data-param]")) {
    const name = input.dataset.param;
    const value = saved.settings[name];
    if (input.type === "checkbox") input.checked = value ?? input.checked;
    else if (value !== undefined) input.value = value;
    input.addEventListener("input", () => {
      saved.settings[name] = input.type === "checkbox" ? input.checked : input.value;
      save();
      showFormatFields();
    });
  }
  $("system").value = saved.system;
  $("system").addEventListener("input", () => { saved.system = $("system").value; save(); });
  $("model").addEventListener("change", () => { saved.model = $("model").value; save(); });
  showFormatFields();
}

function showFormatFields() {
  const format = setting("format") || "text";
  $("format-value-label").hidden = !["json_schema", "regex"].includes(format);
  $("format-value-label").firstChild.textContent = format === "regex" ? "pattern " : "JSON schema ";
  document.querySelector('[data-param="strict"]').parentElement.hidden = format !== "json_schema";
}

function setting(name) {
  const input = document.querySelector(`[data-param="${name}"]`);
  return input.type === "checkbox" ? input.checked : input.value;
}

class SettingsError extends Error {}

function parseJson(text, what) {
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new SettingsError(`${what} is not valid JSON: ${err.message}`);
  }
}

/* The /v1/chat/completions body for `messages` with the current settings (without streaming).
   Throws SettingsError, naming the setting, for what cannot be sent. */
function chatBody(messages) {
  const body = {};
  if ($("model").value) body.model = $("model").value;
  body.messages = [...(saved.system.trim() ? [{role: "system", content: saved.system}] : []), ...messages.map(wireMessage)];
  for (const name of NUMBER_PARAMS) {
    const text = setting(name);
    if (text === "") continue;
    const value = Number(text);
    if (!Number.isFinite(value)) throw new SettingsError(`${name} must be a number`);
    body[name] = value;
  }
  const stop = setting("stop").split("\n").filter((s) => s !== "");
  if (stop.length) body.stop = stop;
  if (setting("logprobs") && page.info && page.info.max_top_n_tokens) {
    body.logprobs = true;
    body.top_logprobs = Math.min(5, page.info.max_top_n_tokens);
  }
  const format = setting("format") || "text";
  const value = setting("format_value");
  if (format === "json_object") body.response_format = {type: "json_object"};
  if (format === "json_schema") {
    if (!value.trim()) throw new SettingsError("response_format: paste a JSON schema, or choose another format");
    const schema = parseJson(value, "The JSON schema");
    body.response_format = {type: "json_schema", json_schema: {name: "answer", schema, strict: setting("strict")}};
  }
  if (format === "regex") {
    if (!value) throw new SettingsError("response_format: write a regex, or choose another format");
    body.response_format = {type: "regex", value};
  }
  if (setting("tools").trim()) {
    const tools = parseJson(setting("tools"), "tools");
    if (!Array.isArray(tools)) throw new SettingsError("tools must be a JSON array of function tools");
    body.tools = tools;
    body.tool_choice = setting("tool_choice");
    if (setting("single_call")) body.parallel_tool_calls = false;
  }
  return body;
}

function wireMessage(message) {
  const wire = {role: message.role, content: message.content};
  if (message.tool_calls && message.tool_calls.length) {
    wire.tool_calls = message.tool_calls;
    wire.content = message.content || null;
  }
  if (message.role === "tool") wire.tool_call_id = message.tool_call_id;
  return wire;
}

function settingsError(text) {
  $("settings-error").textContent = text;
  $("settings-error").hidden = !text;
}

function settingsOk() {
  try {
    chatBody([]);
    settingsError("");
    return true;
  } catch (err) {
    if (!(err instanceof SettingsError)) throw err;
    settingsError(err.message);
    return false;
  }
}

// -- generating ------------------------------------------------------------------------------------
async function generate() {
  let body;
  try {
    body = {...chatBody(saved.messages), stream: true, stream_options: {include_usage: true}};
    settingsError("");
  } catch (err) {
    if (!(err instanceof SettingsError)) throw err;
    settingsError(err.message);
    return;
  }
  const reply = {role: "assistant", content: "", tokens: [], tool_calls: [], stats: {}, streaming: true};
  saved.messages.push(reply);
  renderMessages();
  const controller = new AbortController();
  page.controller = controller;
  setBusy(true);
  const started = performance.now();
  const bytes = new TextDecoder();  // token bytes -> text, across tokens that split a character
  let firstAt = null;
  let received = 0;
  try {
    const response = await api("v1/chat/completions", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
      signal: controller.signal,
    });
    for await (const event of sseEvents(response)) {
      if (event.error) throw new Error(typeof event.error === "string" ? event.error : event.error.message);
      if (event.usage) reply.usage = event.usage;
      for (const choice of event.choices || []) {
        const delta = choice.delta || {};
        const entries = (choice.logprobs && choice.logprobs.content) || [];
        if (delta.content) reply.content += delta.content;
        if (delta.reasoning_content) reply.reasoning = (reply.reasoning || "") + delta.reasoning_content;
        for (const entry of entries) reply.tokens.push(tokenOf(entry, bytes));
        if (delta.tool_calls) mergeToolCalls(reply.tool_calls, delta.tool_calls);
        if (choice.finish_reason) reply.finish = choice.finish_reason;
        if (entries.length || delta.content || delta.reasoning_content || delta.tool_calls) {
          firstAt = firstAt ?? performance.now();
          received += Math.max(entries.length, 1);
        }
      }
      reply.stats = figures(started, firstAt, performance.now(), received, reply.usage);
      queueRender();
    }
  } catch (err) {
    if (err.name === "AbortError") reply.stopped = true;
    else reply.error = err.message;
  } finally {
    reply.streaming = false;
    reply.stats = figures(started, firstAt, performance.now(), received, reply.usage);
    page.controller = null;
    setBusy(false);
    save();
    renderMessages();
  }
}

/* One logprobs entry: the text its bytes add (continuing `bytes`), its logprob and the alternatives. */
function tokenOf(entry, bytes) {
  const text = entry.bytes ? bytes.decode(new Uint8Array(entry.bytes), {stream: true}) : entry.token;
  return {t: text, lp: entry.logprob, top: (entry.top_logprobs || []).map((alt) => [alt.token, alt.logprob])};
}

/* OpenAI's streamed tool calls: the first piece of call `index` has its id and name, the next ones
   pieces of its arguments. */
function mergeToolCalls(calls, pieces) {
  for (const piece of pieces) {
    const call = calls[piece.index] ||= {id: "", type: "function", function: {name: "", arguments: ""}};
    if (piece.id) call.id = piece.id;
    if (piece.function && piece.function.name) call.function.name += piece.function.name;
    if (piece.function && piece.function.arguments) call.function.arguments += piece.function.arguments;
  }
}

/* The request's figures: time to first token, tokens/s after it, and the usage the server reports. */
function figures(started, firstAt, now, received, usage) {
  const stats = {ttft_ms: firstAt === null ? null : firstAt - started, tokens: received};
  const output = usage ? usage.completion_tokens : received;
  if (firstAt !== null && output > 1 && now > firstAt) stats.tok_s = (output - 1) / ((now - firstAt) / 1000);
  if (usage) {
    stats.prompt_tokens = usage.prompt_tokens;
    stats.completion_tokens = usage.completion_tokens;
    const details = usage.prompt_tokens_details;
    if (details && typeof details.cached_tokens === "number") stats.cached_tokens = details.cached_tokens;
  }
  return stats;
}

function statsText(message) {
  const s = message.stats || {};
  const parts = [];
  if (s.ttft_ms != null) parts.push(`TTFT ${Math.round(s.ttft_ms)} ms`);
  if (s.tok_s != null) parts.push(`${s.tok_s.toFixed(1)} tok/s`);
  if (s.prompt_tokens != null) parts.push(`prompt ${s.prompt_tokens} tokens`);
  parts.push(`output ${s.completion_tokens ?? s.tokens ?? 0} tokens`);
  if (s.cached_tokens != null) parts.push(`prefix cache ${s.cached_tokens}/${s.prompt_tokens} tokens`);
  else if (s.prompt_tokens != null) parts.push("prefix cache: not reported");
  if (message.finish) parts.push(`finish: ${message.finish}`);
  if (message.stopped) parts.push("stopped");
  return parts.join(" · ");
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  document.body.classList.toggle("busy", busy);
}

function send() {
  if (page.controller || !settingsOk()) return;
  const text = $("prompt").value;
  if (text.trim()) {
    saved.messages.push({role: "user", content: text});
    $("prompt").value = "";
  } else if (!saved.messages.length || saved.messages[saved.messages.length - 1].role === "assistant") {
    return;  // nothing new to answer
  }
  save();
  generate();
}

/* Drop messages from `index` on (keep = the message stays) and generate again. */
function rerun(index, keep) {
  if (page.controller) return;
  saved.messages.splice(keep ? index + 1 : index);
  page.editing = null;
  save();
  generate();
}

// -- rendering -------------------------------------------------------------------------------------
function queueRender() {
  if (page.renderQueued) return;
  page.renderQueued = true;
  requestAnimationFrame(() => {
    page.renderQueued = false;
    const index = saved.messages.length - 1;
    const old = document.querySelector(`#messages > li[data-index="${index}"]`);
    if (old && saved.messages[index]) old.replaceWith(messageItem(saved.messages[index], index));
    $("live").textContent = page.controller ? "generating… " + statsText(saved.messages[index]) : "";
    followBottom();
  });
}

function renderMessages() {
  const list = $("messages");
  list.replaceChildren(...saved.messages.map(messageItem));
  $("live").textContent = "";
  followBottom();
}

function followBottom() {
  const list = $("messages");
  list.scrollTop = list.scrollHeight;
}

function messageItem(message, index) {
  const item = el("li", `msg ${message.role}` + (message.streaming ? " streaming" : ""));
  item.dataset.index = index;
  item.dataset.role = message.role;
  if (message.finish) item.dataset.finish = message.finish;
  const head = el("div", "head");
  head.append(el("span", "role", message.role + (message.role === "tool" ? ` (${message.tool_call_id})` : "")));
  const action = (label, handler) => {
    const button = el("button", "link", label);
    button.type = "button";
    button.disabled = !!page.controller;
    button.addEventListener("click", handler);
    head.append(button);
  };
  if (!message.streaming) {
    action("edit", () => { page.editing = index; renderMessages(); });
    if (message.role === "assistant") action("regenerate", () => rerun(index, false));
    else action("run from here", () => rerun(index, true));
    if (message.role === "assistant" && message.tool_calls && message.tool_calls.length) {
      action("add tool results", () => addToolResults(index));
    }
    action("delete", () => { saved.messages.splice(index, 1); page.editing = null; save(); renderMessages(); });
  }
  item.append(head);
  if (page.editing === index) {
    item.append(editor(message));
    return item;
  }
  if (message.reasoning) {  // a thinking model's reasoning_content, folded away
    const thinking = el("details", "thinking");
    thinking.append(el("summary", "muted", "thinking"), el("div", "", message.reasoning));
    item.append(thinking);
  }
  const body = el("div", "body");
  // tokens are coloured from the first one on: with a reasoning before it, the content starts later
  if (message.tokens && message.tokens.length && !message.reasoning) colouredTokens(body, message, index);
  else body.textContent = message.content;
  item.append(body);
  if (message.tool_calls && message.tool_calls.length) {
    const calls = el("div", "calls");
    for (const call of message.tool_calls) {
      calls.append(el("div", "", `${call.function.name}(${call.function.arguments})  id ${call.id}`));
    }
    item.append(calls);
  }
  if (message.error) item.append(el("div", "error", message.error));
  if (message.role === "assistant" && message.stats) item.append(el("div", "stats muted", statsText(message)));
  return item;
}

function editor(message) {
  const box = el("div");
  const area = el("textarea");
  area.rows = Math.min(12, message.content.split("\n").length + 1);
  area.value = message.content;
  const saveButton = el("button", "", "Save");
  saveButton.type = "button";
  saveButton.addEventListener("click", () => {
    message.content = area.value;
    if (message.role === "assistant") {  // its tokens and figures belong to the text it had
      message.tokens = [];
      message.stats = null;
      message.finish = undefined;
    }
    page.editing = null;
    save();
    renderMessages();
  });
  const cancel = el("button", "", "Cancel");
  cancel.type = "button";
  cancel.addEventListener("click", () => { page.editing = null; renderMessages(); });
  const row = el("div", "row");
  row.append(saveButton, cancel);
  box.append(area, row);
  return box;
}

function addToolResults(index) {
  const calls = saved.messages[index].tool_calls;
  saved.messages.splice(index + 1, 0, ...calls.map((call) => ({role: "tool", tool_call_id: call.id, content: ""})));
  page.editing = index + 1;
  save();
  renderMessages();
}

/* The message's text as one span per token, coloured by its probability. The text is what the
   server sent as content: tokens past it (a stop sequence, tool-call text) are not shown. */
function colouredTokens(body, message, index) {
  const text = message.content;
  let used = 0;
  for (let i = 0; i < message.tokens.length && used < text.length; i++) {
    const token = message.tokens[i];
    const piece = token.t.slice(0, text.length - used);
    if (!piece) continue;  // a token that ends inside a character: the next one shows it
    if (!text.startsWith(piece, used)) break;
    const span = el("span", "tok", piece);
    span.style.setProperty("--p", Math.exp(token.lp).toFixed(3));
    span.dataset.m = index;
    span.dataset.t = i;
    body.append(span);
    used += piece.length;
  }
  if (used < text.length) body.append(text.slice(used));
}

function visible(text) {
  return text.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "⇥");
}

function showTip(event) {
  const span = event.target.closest(".tok[data-t]");
  const tip = $("tip");
  if (!span) { tip.hidden = true; return; }
  const token = saved.messages[span.dataset.m].tokens[span.dataset.t];
  const table = el("table");
  const alternatives = token.top.some(([, lp]) => lp === token.lp) ? token.top : [[token.t, token.lp], ...token.top];
  for (const [text, lp] of alternatives) {
    const row = el("tr", text === token.t || lp === token.lp ? "chosen" : "");
    const bar = el("td", "bar");
    const fill = el("span");
    fill.style.width = `${(Math.exp(lp) * 100).toFixed(1)}%`;
    bar.append(fill);
    row.append(el("td", "", visible(text)), bar, el("td", "", `${(Math.exp(lp) * 100).toFixed(1)}%`),
               el("td", "", lp.toFixed(3)));
    table.append(row);
  }
  tip.replaceChildren(el("div", "", `p ${(Math.exp(token.lp) * 100).toFixed(1)}% · logprob ${token.lp.toFixed(3)}`), table);
  tip.hidden = false;
  tip.style.left = `${Math.min(event.clientX + 12, innerWidth - tip.offsetWidth - 8)}px`;
  tip.style.top = `${Math.min(event.clientY + 16, innerHeight - tip.offsetHeight - 8)}px`;
}

// -- export ----------------------------------------------------------------------------------------
function exportAs(kind) {
  let body;
  try {
    body = chatBody(saved.messages);
    settingsError("");
  } catch (err) {
    if (!(err instanceof SettingsError)) throw err;
    settingsError(err.message);
    return;
  }
  const json = JSON.stringify(body, null, 2);
  const url = new URL("v1/chat/completions", document.baseURI).href;
  const auth = sessionStorage.getItem(KEY) ? `  -H "Authorization: Bearer $PARLEY_API_KEY" \\\n` : "";
  const text = kind === "json" ? json
    : `curl -sS '${url}' \\\n  -H 'Content-Type: application/json' \\\n${auth}  -d @- <<'JSON'\n${json}\nJSON\n`;
  $("export-title").textContent = kind === "json"
    ? "The body of a POST /v1/chat/completions request with this conversation and these settings:"
    : "This conversation as a curl command" + (auth ? " (the key is read from $PARLEY_API_KEY):" : ":");
  $("export-text").value = text;
  $("export-dialog").dataset.kind = kind;
  $("export-dialog").showModal();
}

function download() {
  const kind = $("export-dialog").dataset.kind;
  const link = el("a");
  link.href = URL.createObjectURL(new Blob([$("export-text").value], {type: "text/plain"}));
  link.download = kind === "json" ? "chat-request.json" : "chat-request.sh";
  link.click();
  URL.revokeObjectURL(link.href);
}

// -- server status from /metrics -------------------------------------------------------------------
/* Prometheus' text format -> {metric name: value}, labelled series of one name summed. */
function parseMetrics(text) {
  const values = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)/.exec(line);
    if (match) values[match[1]] = (values[match[1]] || 0) + Number(match[3]);
  }
  return values;
}

async function pollStatus() {
  if (!page.info || document.hidden) return;
  let metrics;
  try {
    metrics = parseMetrics(await (await api("metrics")).text());
  } catch (err) {
    $("status-age").textContent = "(" + err.message + ")";
    return;
  }
  const now = performance.now();
  const tokens = metrics.parley_generated_tokens_total ?? 0;
  let rate = "…";
  if (page.lastTokens) rate = ((tokens - page.lastTokens.tokens) / ((now - page.lastTokens.at) / 1000)).toFixed(1);
  page.lastTokens = {at: now, tokens};
  const used = metrics.parley_kv_blocks_used ?? 0;
  const total = metrics.parley_kv_blocks_total ?? 0;
  const meter = el("meter");
  meter.max = total || 1;
  meter.value = used;
  const kv = el("span", "", ` ${used}/${total} blocks (${total ? (100 * used / total).toFixed(1) : 0}%)`);
  const rows = [
    ["running", metrics.tgi_batch_current_size ?? 0],
    ["waiting", metrics.tgi_queue_size ?? 0],
    ["KV cache", [meter, kv]],
    ["tokens/s", rate],
    ["requests", `${metrics.tgi_request_count ?? 0} (${metrics.tgi_request_success ?? 0} answered, ` +
                 `${metrics.tgi_request_failure ?? 0} failed, ${metrics.parley_request_cancelled ?? 0} cancelled)`],
  ];
  $("status").replaceChildren(...rows.flatMap(([name, value]) => {
    const dd = el("dd");
    dd.dataset.name = name;
    if (Array.isArray(value)) dd.append(...value);
    else dd.textContent = String(value);
    return [el("dt", "", name), dd];
  }));
  $("status-age").textContent = "(every 2 s)";
}

// -- wiring ----------------------------------------------------------------------------------------
function start() {
  for (const span of document.querySelectorAll(".legend .tok")) span.style.setProperty("--p", span.dataset.p);
  bindSettings();
  renderMessages();
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => page.controller && page.controller.abort());
  $("new-chat").addEventListener("click", () => {
    if (page.controller) page.controller.abort();
    saved.messages = [];
    page.editing = null;
    save();
    renderMessages();
  });
  $("export-json").addEventListener("click", () => exportAs("json"));
  $("export-curl").addEventListener("click", () => exportAs("curl"));
  $("copy").addEventListener("click", () => navigator.clipboard.writeText($("export-text").value));
  $("download").addEventListener("click", download);
  $("key-form").addEventListener("submit", () => {
    sessionStorage.setItem(KEY, $("key-input").value);
    connect();
  });
  $("forget-key").addEventListener("click", () => { sessionStorage.removeItem(KEY); location.reload(); });
  $("messages").addEventListener("mousemove", showTip);
  $("messages").addEventListener("mouseleave", () => { $("tip").hidden = true; });
  setInterval(pollStatus, STATUS_EVERY_MS);
  connect();
}

start();
