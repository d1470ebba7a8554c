// The swarm's web page: a chat over /v1/chat/completions (streamed) and a picture of /v1/swarm/status.
// No build step and nothing from the network but this coordinator: the page must work offline.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_SLOT = "swarm-key";
const COLOURS = ["#2f6fdf", "#2e8b57", "#c77d00", "#8e44ad", "#c0392b", "#16a085", "#7f8c8d", "#d35400"];

let model = null;
let history = [];          // the conversation: {role, content}
let running = null;        // the AbortController of the answer being streamed
let seenRecoveries = null; // how many recoveries the page has shown (null: none drawn yet)
let lastSessions = {};     // session id -> {generated, at}: tokens/s between two polls

// ------------------------------------------------------------------ the key

function key() { return sessionStorage.getItem(KEY_SLOT); }

function askKey(message) {
  $("key-error").textContent = message || "";
  if (!$("key-dialog").open) $("key-dialog").showModal();
  $("key").focus();
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const value = $("key").value.trim();
  if (!value) return;
  sessionStorage.setItem(KEY_SLOT, value);
  $("key-dialog").close();
  start();
});

async function api(path, options = {}) {
  const headers = Object.assign({"Authorization": "Bearer " + key()}, options.headers || {});
  const response = await fetch(path, Object.assign({}, options, {headers}));
  if (response.status === 401) {
    sessionStorage.removeItem(KEY_SLOT);
    askKey("That key was refused; enter the swarm key again.");
    throw new Error("the swarm key was refused");
  }
  return response;
}

async function errorText(response) {
  try { return (await response.json()).error.message; } catch (_) { return response.status + " " + response.statusText; }
}

// ------------------------------------------------------------------ chat

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function setRunning(controller) {
  running = controller;
  $("send").disabled = !!controller;
  $("stop").disabled = !controller;
}

async function send(text) {
  history.push({role: "user", content: text});
  bubble("user", text);
  const out = bubble("assistant", "");
  out.classList.add("streaming");
  const body = {model, messages: history, stream: true, stream_options: {include_usage: true}};
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  if ($("temperature").value !== "") body.temperature = parseFloat($("temperature").value);
  const controller = new AbortController();
  setRunning(controller);
  const started = performance.now();
  let answer = "", first = null, usage = null, finish = null;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST", body: JSON.stringify(body), signal: controller.signal,
      headers: {"Content-Type": "application/json"},
    });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      const events = buffer.split(/\r?\n\r?\n/);
      buffer = events.pop();
      for (const event of events) {
        for (const line of event.split(/\r?\n/)) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          for (const choice of chunk.choices || []) {
            if (choice.delta && choice.delta.content) {
              first = first || performance.now();
              answer += choice.delta.content;
              out.textContent = answer;
              $("messages").scrollTop = $("messages").scrollHeight;
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
    }
    const meta = document.createElement("span");
    meta.className = "meta";
    const secs = (performance.now() - (first || started)) / 1000;
    meta.textContent = (usage ? `${usage.completion_tokens} tokens` : "") +
      (usage && secs > 0 ? `, ${(usage.completion_tokens / secs).toFixed(1)} tokens/s` : "") +
      (first ? `, first token after ${((first - started) / 1000).toFixed(2)} s` : "") +
      (finish === "length" ? " (max tokens reached)" : "");
    out.appendChild(meta);
  } catch (e) {
    if (e.name === "AbortError") {
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = "stopped";
      out.appendChild(meta);
    } else {
      bubble("error", e.message);
    }
  } finally {
    out.classList.remove("streaming");
    out.classList.add("done");
    if (answer) history.push({role: "assistant", content: answer});
    else history.pop(); // nothing came back: the question can be asked again
    setRunning(null);
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || running) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => running && running.abort());
$("new-chat").addEventListener("click", () => {
  if (running) running.abort();
  history = [];
  $("messages").replaceChildren();
  $("prompt").focus();
});

// ------------------------------------------------------------------ the swarm

const mb = (bytes) => Math.round(Number(bytes) / (1 << 20)).toLocaleString() + " MB";
const span = (r) => `${r.start}:${r.end}`;

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function drawRoute(status, colour) {
  const parts = [];
  for (const n of status.nodes) {
    if (n.has_layers && n.layers) parts.push({node: n, r: n.layers, taken: false});
    for (const r of n.extra_layers || []) parts.push({node: n, r, taken: true});
  }
  parts.sort((a, b) => a.r.start - b.r.start);
  const route = $("route");
  route.replaceChildren();
  for (const p of parts) {
    const d = el("div", "span" + (p.taken ? " taken" : ""), `${p.node.name} ${span(p.r)}${p.taken ? " (taken over)" : ""}`);
    d.style.flex = String(p.r.end - p.r.start);
    d.style.background = colour(p.node);
    d.title = `${p.node.name} (${p.node.address}) holds layers ${span(p.r)}` + (p.taken ? ", taken over" : "");
    route.appendChild(d);
  }
  if (!parts.length) route.appendChild(el("div", "muted", " no layers placed yet"));
}

function drawNodes(status, colour) {
  const box = $("nodes");
  box.replaceChildren();
  for (const n of status.nodes) {
    const card = el("div", "node");
    card.style.borderLeftColor = colour(n);
    card.dataset.name = n.name;
    const r = n.resources || {};
    const layers = (n.has_layers && n.layers ? span(n.layers) : "no layers") +
      (n.extra_layers || []).map((x) => " + " + span(x)).join("");
    card.append(el("b", "", n.name + (n.is_coordinator ? " (coordinator)" : "")), el("br"));
    card.append(el("span", "muted", n.address + " · "), el("span", "state-" + n.state, n.state), el("br"));
    card.append(el("span", "", `layers ${layers}${n.pinned ? " (pinned)" : ""}`), el("br"));
    card.append(el("span", "", `memory ${mb(r.memory_available || 0)} free of ${mb(r.memory_total || 0)}` +
      (Number(r.max_memory) ? `, cap ${mb(r.max_memory)}` : "")), el("br"));
    const p = n.profile;
    card.append(el("span", "muted", p ? `decode ${p.decode_ns_per_byte.toFixed(2)} ns/byte, ` +
      `${p.step_overhead_ms.toFixed(2)} ms/step, rtt ${p.rtt_ms.toFixed(2)} ms` + (p.cached ? " (cached)" : "")
      : "not measured yet"));
    if (n.detail) card.append(el("br"), el("span", "muted", n.detail));
    box.appendChild(card);
  }
}

function drawSessions(status) {
  const now = performance.now();
  const body = $("sessions").querySelector("tbody");
  body.replaceChildren();
  const next = {};
  for (const s of status.sessions) {
    const before = lastSessions[s.session_id];
    const rate = before && now > before.at ? (s.generated - before.generated) / ((now - before.at) / 1000) : null;
    next[s.session_id] = {generated: s.generated, at: now};
    const row = el("tr");
    for (const cell of [s.session_id, s.positions, s.generated, rate === null ? "…" : rate.toFixed(1),
                        s.age_s.toFixed(0) + " s"]) row.appendChild(el("td", "", String(cell)));
    body.appendChild(row);
  }
  lastSessions = next;
  if (!status.sessions.length) {
    const row = el("tr");
    const cell = el("td", "muted", "no session running");
    cell.colSpan = 5;
    row.appendChild(cell);
    body.appendChild(row);
  }
}

function drawRecoveries(status) {
  const list = $("recoveries");
  const all = status.recoveries || [];
  list.replaceChildren();
  all.slice().reverse().forEach((r, i) => {
    const at = new Date(r.at_unix * 1000).toLocaleTimeString();
    const li = el("li", "recovery");
    li.textContent = `${at}: node ${r.node} (${r.address}, layers ${r.layers ? span(r.layers) : "none"}) ` +
      `${r.detection}; path ${r.path}, ${r.sessions} session(s), stall ${r.stall_ms.toFixed(0)} ms` +
      (r.successor ? `, taken by ${r.successor}` : "") +
      (r.replayed_positions ? `, ${r.replayed_positions} positions replayed` : "") + (r.detail ? `; ${r.detail}` : "");
    if (seenRecoveries !== null && i < all.length - seenRecoveries) li.classList.add("new");
    list.appendChild(li);
  });
  if (!all.length) list.appendChild(el("li", "muted", "none so far"));
  seenRecoveries = all.length;
}

async function poll() {
  if (!key()) return;
  try {
    const response = await api("/v1/swarm/status");
    if (!response.ok) throw new Error(await errorText(response));
    const status = await response.json();
    const order = status.nodes.map((n) => n.node_id);
    const colour = (n) => COLOURS[order.indexOf(n.node_id) % COLOURS.length];
    $("swarm-name").textContent = status.swarm;
    $("summary").textContent = `${status.model_name} (${status.n_layer} layers) · ${status.state}: ${status.detail}` +
      (status.predicted_decode_tps ? ` · ${status.predicted_decode_tps.toFixed(1)} tokens/s predicted` : "") +
      (status.measured_sessions ? `, ${status.measured_decode_tps.toFixed(1)} measured` : "");
    drawRoute(status, colour);
    drawNodes(status, colour);
    drawSessions(status);
    drawRecoveries(status);
  } catch (e) {
    $("summary").textContent = "cannot reach the coordinator: " + e.message;
  }
}

async function start() {
  try {
    const response = await api("/v1/models");
    if (!response.ok) throw new Error(await errorText(response));
    model = (await response.json()).data[0].id;
  } catch (e) {
    return;
  }
  poll();
}

setInterval(poll, 1000);
if (key()) start(); else askKey();
