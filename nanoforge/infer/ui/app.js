// nanoforge web UI: chat, side by side, tokenizer playground. Talks only to this server's OpenAI-style API.
// Model output is untrusted: markdown goes through marked, then DOMPurify; tool blocks use textContent.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];
const store = {
  get: (k, d) => { try { return JSON.parse(localStorage.getItem("nanoforge." + k)) ?? d; } catch { return d; } },
  set: (k, v) => localStorage.setItem("nanoforge." + k, JSON.stringify(v)),
};
const S = { models: [], convs: store.get("conversations", []), current: store.get("current", null),
  controllers: [], busy: false, editing: null };
const SETTINGS = ["system", "temperature", "top_k", "top_p", "max_tokens", "seed", "api_key"];

// ---- server calls --------------------------------------------------------------------------------
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("#api_key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

class ServerError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, body) {
  let res;
  try {
    res = await fetch(path, body === undefined ? { headers: headers() }
      : { method: "POST", headers: headers(), body: JSON.stringify(body) });
  } catch (e) { throw new ServerError(0, "cannot reach the server"); }
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new ServerError(res.status, data.error?.message || res.statusText);
  return data;
}

function banner(text) {
  const b = $("#banner");
  b.textContent = text || "";
  b.hidden = !text;
}

function explain(err) {
  if (err.name === "AbortError") return "";
  const s = err.status;
  if (s === 0) return "Cannot reach the server: is `nanoforge serve` still running?";
  if (s === 429) return "The server is busy (its queue is full): try again in a moment.";
  if (s === 503) return "The model is still loading: try again in a moment.";
  if (s === 401) return "The server needs an API key: set it in Settings.";
  return "Error: " + err.message;
}

// Stream one chat completion; calls onText(piece) as text arrives. Returns the reply with its numbers.
async function streamChat(model, messages, params, onText, controller, onQueue) {
  const t0 = performance.now();
  let res;
  try {
    res = await fetch("v1/chat/completions", { method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true }, ...params }) });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ServerError(0, "cannot reach the server");
  }
  if (!res.ok) {
    const data = await res.json().catch(() => ({}));
    throw new ServerError(res.status, data.error?.message || res.statusText);
  }
  const out = { text: "", finish: null, usage: null, timings: null, ttft_ms: null };
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  const handle = (event) => {
    for (const line of event.split("\n")) {
      if (line.startsWith(": queue position")) { onQueue?.(parseInt(line.slice(17), 10)); continue; }
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") return true;
      const obj = JSON.parse(data);
      if (obj.error) throw new ServerError(500, obj.error.message);
      if (obj.usage) out.usage = obj.usage;
      if (obj.timings) out.timings = obj.timings;
      const ch = obj.choices?.[0];
      if (ch?.delta?.content) {
        if (out.ttft_ms === null) out.ttft_ms = performance.now() - t0;
        out.text += ch.delta.content;
        onText(ch.delta.content, out.text);
      }
      if (ch?.finish_reason) out.finish = ch.finish_reason;
    }
    return false;
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, i);
      buf = buf.slice(i + 2);
      if (handle(event)) return finishStats(out, t0);
    }
  }
  return finishStats(out, t0);
}

function finishStats(out, t0) {
  out.total_ms = performance.now() - t0;
  return out;
}

// ---- rendering -----------------------------------------------------------------------------------
const TOOL_RE = /<\|python_start\|>([\s\S]*?)(?:<\|python_end\|>|$)|<\|output_start\|>([\s\S]*?)(?:<\|output_end\|>|$)/g;

// No images, frames or forms from model output: the page must not fetch what a reply names.
const PURIFY = { FORBID_TAGS: ["img", "image", "video", "audio", "iframe", "form", "input", "style", "link"],
  FORBID_ATTR: ["style", "srcset"] };

function renderMarkdown(el, text) {
  el.innerHTML = DOMPurify.sanitize(marked.parse(text, { gfm: true, breaks: true }), PURIFY);
  for (const pre of $$("pre", el)) {
    const b = document.createElement("button");
    b.className = "copy-code";
    b.type = "button";
    b.textContent = "Copy";
    b.onclick = () => copy(pre.querySelector("code")?.textContent ?? pre.textContent, b);
    pre.appendChild(b);
  }
}

function renderContent(el, text) {
  el.replaceChildren();
  let pos = 0, tool = null;
  const md = (s) => { if (s.trim()) { const d = document.createElement("div"); renderMarkdown(d, s); el.appendChild(d); } };
  for (const m of text.matchAll(TOOL_RE)) {
    md(text.slice(pos, m.index));
    pos = m.index + m[0].length;
    if (m[1] !== undefined) {
      tool = document.createElement("details");
      tool.className = "tool";
      const sum = document.createElement("summary");
      sum.textContent = "calculator: " + m[1];
      const pre = document.createElement("pre");
      pre.textContent = m[1];
      tool.append(sum, pre);
      el.appendChild(tool);
    } else {
      if (!tool) { tool = document.createElement("details"); tool.className = "tool";
        const sum = document.createElement("summary"); sum.textContent = "tool output"; tool.appendChild(sum);
        el.appendChild(tool); }
      const pre = document.createElement("pre");
      pre.className = "tool-output";
      pre.textContent = "→ " + m[2];
      tool.appendChild(pre);
      tool.querySelector("summary").textContent += " = " + m[2];
      tool = null;
    }
  }
  md(text.slice(pos));
}

function statsText(r, model) {
  if (!r) return "";
  if (!r.timings && !r.usage) return [r.ttft_ms ? `TTFT ${Math.round(r.ttft_ms)} ms` : null, r.finish].filter(Boolean).join(" · ");
  const t = r.timings || {};
  const prompt = t.prompt_n ?? r.usage?.prompt_tokens ?? 0;
  const reply = r.usage?.completion_tokens ?? t.predicted_n ?? 0;
  const ctx = S.models.find((m) => m.id === model)?.context;
  const parts = [
    `TTFT ${Math.round(r.ttft_ms ?? 0)} ms`,
    `${(t.predicted_per_second ?? 0).toFixed(1)} tok/s`,
    `prompt ${prompt} tok`, `reply ${reply} tok`,
    `context ${prompt + reply}/${ctx ?? "?"}`,
  ];
  if (t.queued_ms > 50) parts.push(`queued ${Math.round(t.queued_ms)} ms`);
  if (r.finish && r.finish !== "stop") parts.push(r.finish);
  return parts.join(" · ");
}

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    const old = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = old; }, 1200);
  } catch { banner("The browser refused clipboard access."); }
}

// ---- conversations -------------------------------------------------------------------------------
function conv() { return S.convs.find((c) => c.id === S.current); }

function save() {
  store.set("conversations", S.convs);
  store.set("current", S.current);
}

function newChat() {
  const c = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6), title: "New chat",
    model: $("#model").value, messages: [] };
  S.convs.unshift(c);
  S.current = c.id;
  save();
  renderAll();
  $("#input").focus();
}

function renderSidebar() {
  const ul = $("#conversations");
  ul.replaceChildren();
  for (const c of S.convs) {
    const li = document.createElement("li");
    li.className = c.id === S.current ? "active" : "";
    li.dataset.id = c.id;
    const span = document.createElement("span");
    span.textContent = c.title;
    const del = document.createElement("button");
    del.textContent = "×";
    del.title = "Delete this chat";
    del.className = "delete";
    del.onclick = (e) => {
      e.stopPropagation();
      S.convs = S.convs.filter((x) => x.id !== c.id);
      if (S.current === c.id) S.current = S.convs[0]?.id ?? null;
      save();
      renderAll();
    };
    li.onclick = () => { S.current = c.id; save(); renderAll(); };
    li.append(span, del);
    ul.appendChild(li);
  }
}

function renderMessages() {
  const box = $("#messages");
  // A message being edited stays open, with what was typed, through re-renders the user did not ask for
  // (the model list arriving, a reply finishing); it closes when another conversation is shown.
  const editing = S.editing;
  S.editing = null;
  box.replaceChildren();
  const c = conv();
  if (!c) return;
  c.messages.forEach((m, i) => {
    const el = box.appendChild(messageEl(c, m, i));
    if (editing?.id === c.id && editing.i === i && m.role === "user") {
      editMessage(el, c, i, editing.box.value, document.activeElement === editing.box);
    }
  });
  box.scrollTop = box.scrollHeight;
}

function messageEl(c, m, i) {
  const wrap = document.createElement("div");
  wrap.className = "msg " + m.role;
  const bubble = document.createElement("div");
  bubble.className = "bubble " + m.role;
  if (m.role === "user") bubble.textContent = m.content;
  else renderContent(bubble, m.content);
  const actions = document.createElement("div");
  actions.className = "actions";
  const button = (label, fn, cls) => { const b = document.createElement("button"); b.type = "button";
    b.textContent = label; b.className = cls; b.onclick = () => fn(b); actions.appendChild(b); };
  button("Copy", (b) => copy(m.content, b), "copy-msg");
  if (m.role === "user") button("Edit", () => editMessage(wrap, c, i), "edit");
  else button("Regenerate", () => { c.messages = c.messages.slice(0, i); save(); renderMessages(); generate(); }, "regen");
  wrap.append(bubble, actions);
  if (m.role === "assistant") {
    const st = document.createElement("div");
    st.className = "stats";
    st.textContent = statsText(m.stats, m.model || c.model);
    wrap.appendChild(st);
  }
  return wrap;
}

function editMessage(wrap, c, i, text = c.messages[i].content, focus = true) {
  const box = document.createElement("textarea");
  box.className = "edit-box";
  box.value = text;
  S.editing = { id: c.id, i, box };
  const ok = document.createElement("button");
  ok.textContent = "Save & regenerate";
  ok.className = "save-edit";
  ok.onclick = () => {
    S.editing = null;
    c.messages = c.messages.slice(0, i);
    c.messages.push({ role: "user", content: box.value });
    save();
    renderMessages();
    generate();
  };
  wrap.replaceChildren(box, ok);
  if (focus) box.focus();
}

function params() {
  const num = (id) => { const v = $("#" + id).value; return v === "" ? undefined : Number(v); };
  const p = { temperature: num("temperature"), top_p: num("top_p"), top_k: num("top_k"), max_tokens: num("max_tokens") };
  const seed = num("seed");
  if (seed !== undefined) p.seed = seed;
  return p;
}

function apiMessages(messages) {
  const sys = $("#system").value.trim();
  const out = messages.map((m) => ({ role: m.role, content: m.content }));
  return sys ? [{ role: "system", content: sys }, ...out] : out;
}

function setBusy(busy) {
  S.busy = busy;
  $("#send").hidden = busy;
  $("#stop").hidden = !busy;
}

function stopAll() {
  for (const c of S.controllers) c.abort();
  S.controllers = [];
}

async function send() {
  const text = $("#input").value;
  if (!text.trim() || S.busy) return;
  if (!conv()) newChat();
  const c = conv();
  c.messages.push({ role: "user", content: text });
  if (c.title === "New chat") c.title = text.slice(0, 40);
  $("#input").value = "";
  save();
  renderAll();
  await generate();
}

async function generate() {
  const c = conv();
  const model = $("#model").value;
  c.model = model;
  const reply = { role: "assistant", content: "", model };
  const history = apiMessages(c.messages);
  c.messages.push(reply);
  const i = c.messages.length - 1;
  const box = $("#messages");
  const el = messageEl(c, reply, i);
  box.appendChild(el);
  const bubble = $(".bubble", el), stats = $(".stats", el);
  bubble.classList.add("streaming");
  const controller = new AbortController();
  S.controllers.push(controller);
  setBusy(true);
  banner("");
  let pending = false;
  const t0 = performance.now();
  let first = null;
  try {
    const r = await streamChat(model, history, params(), (piece, all) => {
      first ??= performance.now() - t0;
      reply.content = all;
      if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; renderContent(bubble, reply.content);
        box.scrollTop = box.scrollHeight; }); }
    }, controller, (pos) => { stats.textContent = `waiting in queue: position ${pos}`; });
    reply.content = r.text;
    reply.stats = { ttft_ms: r.ttft_ms, timings: r.timings, usage: r.usage, finish: r.finish };
  } catch (err) {
    if (err.name === "AbortError") reply.stats = { ttft_ms: first, finish: "stopped" };
    else { banner(explain(err)); if (!reply.content) c.messages.pop(); }
  } finally {
    S.controllers = S.controllers.filter((x) => x !== controller);
    setBusy(false);
    save();
    renderMessages();
  }
}

// ---- side by side ----------------------------------------------------------------------------------
async function compare() {
  const text = $("#compare-input").value;
  if (!text.trim()) return;
  banner("");
  const messages = apiMessages([{ role: "user", content: text }]);
  await Promise.all($$("#tab-compare .pane").map(async (pane) => {
    const model = $(".pane-model", pane).value;
    const out = $(".pane-out", pane), st = $(".pane-stats", pane);
    out.replaceChildren();
    st.textContent = "";
    const controller = new AbortController();
    S.controllers.push(controller);
    try {
      const r = await streamChat(model, messages, { ...params(), temperature: Number($(".pane-temp", pane).value) },
        (piece, all) => renderContent(out, all), controller, (pos) => { st.textContent = `queue position ${pos}`; });
      renderContent(out, r.text);
      st.textContent = statsText(r, model);
    } catch (err) {
      if (err.name === "AbortError") st.textContent += " (stopped)";
      else st.textContent = explain(err);
    } finally {
      S.controllers = S.controllers.filter((x) => x !== controller);
    }
  }));
}

// ---- tokenizer playground --------------------------------------------------------------------------
let tokTimer = null;
async function tokenizeAll() {
  const text = $("#tok-input").value;
  await Promise.all($$(".tok-pane").map(async (pane) => {
    const name = $(".tok-name", pane).value;
    if (!name) return;
    try {
      const r = await api("tokenize", { content: text, tokenizer: name });
      const view = $(".tok-view", pane);
      view.replaceChildren();
      r.pieces.forEach((p, k) => {
        const s = document.createElement("span");
        // a piece that is part of a UTF-8 character shows its bytes
        s.textContent = p.piece.includes("\ufffd") ? p.hex.replace(/(..)/g, "\\x$1") : p.piece;
        s.dataset.id = p.id;
        s.title = `id ${p.id} · ${p.bytes} bytes`;
        s.style.background = `hsla(${(k * 67) % 360}, 70%, 60%, 0.35)`;
        view.appendChild(s);
      });
      $(".tok-ids", pane).textContent = JSON.stringify(r.tokens);
      const per = r.count ? (r.bytes / r.count).toFixed(2) : "0";
      $(".tok-count", pane).textContent = `${r.count} tokens · ${r.bytes} bytes · ${per} bytes/token`;
    } catch (err) { $(".tok-count", pane).textContent = explain(err); }
  }));
}

// ---- models, settings, wiring ----------------------------------------------------------------------
function fmtParams(n) { return n >= 1e9 ? (n / 1e9).toFixed(1) + "B" : n >= 1e6 ? (n / 1e6).toFixed(1) + "M" : (n / 1e3).toFixed(1) + "K"; }

function modelInfo() {
  const m = S.models.find((x) => x.id === $("#model").value);
  $("#model-info").textContent = !m ? "" : [m.phase, m.step != null ? `step ${m.step}` : null,
    m.parameters ? `${fmtParams(m.parameters)} params` : null, m.val_bpb != null ? `val bpb ${m.val_bpb.toFixed(3)}` : null,
    m.tokenizer ? `tokenizer ${m.tokenizer}` : null, m.context ? `context ${m.context}` : null].filter(Boolean).join(" · ");
}

async function loadModels() {
  try {
    S.models = (await api("v1/models")).data;
  } catch (err) { banner(explain(err)); return; }
  const fill = (sel, pick) => {
    sel.replaceChildren();
    for (const m of S.models) {
      const o = document.createElement("option");
      o.value = m.id;
      o.textContent = [m.id, m.phase, m.step != null ? `step ${m.step}` : null,
        m.parameters ? fmtParams(m.parameters) : null, m.val_bpb != null ? `bpb ${m.val_bpb.toFixed(3)}` : null,
        m.tokenizer].filter(Boolean).join(" · ");
      sel.appendChild(o);
    }
    if (pick && S.models.some((m) => m.id === pick)) sel.value = pick;
  };
  fill($("#model"), conv()?.model || store.get("model", null));
  $$(".pane-model").forEach((sel, k) => fill(sel, S.models[Math.min(k, S.models.length - 1)]?.id));
  modelInfo();
  try {
    const toks = (await api("tokenizers")).data;
    $$(".tok-name").forEach((sel, k) => {
      sel.replaceChildren();
      for (const t of toks) { const o = document.createElement("option"); o.value = o.textContent = t.name; sel.appendChild(o); }
      sel.value = toks[Math.min(k, toks.length - 1)]?.name ?? "";
    });
  } catch { /* the playground shows the error when used */ }
}

function renderAll() {
  renderSidebar();
  renderMessages();
  const c = conv();
  if (c?.model && S.models.some((m) => m.id === c.model)) { $("#model").value = c.model; modelInfo(); }
}

function showTab(name) {
  $$("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  $$(".tab").forEach((t) => { t.hidden = t.id !== "tab-" + name; });
  if (name === "tokenizer") tokenizeAll();
}

function init() {
  const saved = store.get("settings", {});
  for (const k of SETTINGS) if (saved[k] !== undefined) $("#" + k).value = saved[k];
  for (const k of SETTINGS) $("#" + k).addEventListener("change", () => {
    store.set("settings", Object.fromEntries(SETTINGS.map((x) => [x, $("#" + x).value])));
  });
  document.documentElement.dataset.theme = store.get("theme", matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light");
  $("#theme").onclick = () => {
    const t = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
    document.documentElement.dataset.theme = t;
    store.set("theme", t);
  };
  $("#api_key").addEventListener("change", () => { banner(""); loadModels().then(renderAll); });
  $("#settings-toggle").onclick = () => { $("#settings").hidden = !$("#settings").hidden; };
  $("#new-chat").onclick = newChat;
  $("#tabs").onclick = (e) => { if (e.target.dataset.tab) showTab(e.target.dataset.tab); };
  $("#model").onchange = () => { store.set("model", $("#model").value); const c = conv(); if (c) { c.model = $("#model").value; save(); } modelInfo(); };
  $("#composer").onsubmit = (e) => { e.preventDefault(); send(); };
  $("#stop").onclick = stopAll;
  $("#compare-form").onsubmit = (e) => { e.preventDefault(); compare(); };
  const enterSends = (box, fn) => box.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); fn(); }
  });
  enterSends($("#input"), send);
  enterSends($("#compare-input"), compare);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") stopAll();
    if (e.key.toLowerCase() === "o" && e.ctrlKey && e.shiftKey) { e.preventDefault(); newChat(); }
  });
  $("#tok-input").addEventListener("input", () => { clearTimeout(tokTimer); tokTimer = setTimeout(tokenizeAll, 150); });
  $$(".tok-name").forEach((s) => { s.onchange = tokenizeAll; });
  renderAll();
  loadModels().then(renderAll);
}

init();
