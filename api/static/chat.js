// The chat playground: any model of the mesh, streamed, with a system prompt, sampling
// knobs, JSON mode (every llama chat model decodes under a grammar) and tools (only where
// the model's card lists "tools"); shows the node that served each answer (x-mesh-node).

import { call, events, ApiError } from "./api.js";
import { el, $, say } from "./dom.js";
import { render as markdown } from "./markdown.js";

const EXAMPLE_TOOLS = [{
  type: "function",
  function: {
    name: "get_weather", description: "Current weather in a city",
    parameters: { type: "object", properties: { city: { type: "string" }, unit: { enum: ["celsius", "fahrenheit"] } },
                  required: ["city", "unit"] },
  },
}];

let cards = {};            // model id -> card (capabilities)
let history = [];          // the conversation, as OpenAI messages (the system prompt apart)
let running = null;        // AbortController of the generation in progress

export async function loadModels() {
  const note = $("#chat-models-note");
  try {
    const list = await call("/v1/models");
    cards = Object.fromEntries(list.data.map((c) => [c.id, c]));
    const chat = list.data.filter((c) => (c.capabilities || []).includes("chat"));
    $("#chat-models").replaceChildren(...chat.map((c) => el("option", { value: c.id })));
    const pick = $("#chat-model");
    if (!pick.value || !cards[pick.value]) pick.value = chat.length ? chat[0].id : "";
    say(note, chat.length ? `${chat.length} chat model${chat.length === 1 ? "" : "s"} in the mesh` : "no chat model is loaded anywhere in the mesh",
        chat.length ? "" : "error");
  } catch (e) {
    say(note, e.status === 403 ? "this key cannot list models: type a model id" : e.message, "error");
  }
  capabilities();
}

function capabilities() {
  const card = cards[$("#chat-model").value];
  const caps = card ? card.capabilities || [] : [];
  $("#chat-caps").textContent = card ? `capabilities: ${caps.join(", ") || "none listed"}` : "";
  $("#chat-json-row").hidden = !!card && !caps.includes("chat");
  $("#chat-tools-row").hidden = !caps.includes("tools");
}

function settings() {
  const body = {
    model: $("#chat-model").value.trim(), stream: true, stream_options: { include_usage: true },
    temperature: parseFloat($("#chat-temperature").value), top_p: parseFloat($("#chat-top-p").value),
    max_tokens: parseInt($("#chat-max-tokens").value, 10),
  };
  const seed = $("#chat-seed").value.trim();
  if (seed) body.seed = parseInt(seed, 10);
  if (!$("#chat-json-row").hidden && $("#chat-json").checked) body.response_format = { type: "json_object" };
  if (!$("#chat-tools-row").hidden && $("#chat-tools-on").checked) {
    let tools;
    try { tools = JSON.parse($("#chat-tools").value); } catch (e) { throw new Error(`tools: not JSON (${e.message})`); }
    if (!Array.isArray(tools)) throw new Error("tools: expected a JSON array of tools");
    body.tools = tools;
    body.tool_choice = $("#chat-tool-choice").value;
  }
  if (!body.model) throw new Error("pick a model");
  if (!(body.max_tokens >= 1)) throw new Error("max tokens must be at least 1");
  return body;
}

function bubble(role, head) {
  const body = el("div", { class: "msg-body" + (role === "assistant" ? " md" : "") });
  const box = el("div", { class: `msg ${role}` }, el("div", { class: "msg-head" }, head), body);
  $("#chat-log").append(box);
  box.scrollIntoView({ block: "end" });
  return [box, body];
}

function pretty(text) {
  try { return "```json\n" + JSON.stringify(JSON.parse(text), null, 2) + "\n```"; } catch (_) { return text; }
}

async function generate() {
  let body;
  try { body = settings(); } catch (e) { say($("#chat-error"), e.message, "error"); return; }
  const system = $("#chat-system").value.trim();
  body.messages = [...(system ? [{ role: "system", content: system }] : []), ...history];
  const head = el("span", {}, el("b", { text: body.model }), " · ", el("span", { class: "served-by", text: "…" }),
    el("span", { class: "stats" }));
  const [box, out] = bubble("assistant", head);
  box.dataset.state = "streaming";
  box.dataset.chunks = "0";
  if (body.response_format) box.dataset.format = body.response_format.type;
  running = new AbortController();
  $("#chat-send").disabled = true;
  $("#chat-stop").hidden = false;
  say($("#chat-error"), "");
  let text = "", calls = [], usage = null, finish = null, queued = false;
  const t0 = performance.now();
  const paint = () => {
    queued = false;
    out.innerHTML = markdown(body.response_format && finish ? pretty(text) : text);
  };
  try {
    const r = await call("/v1/chat/completions", { method: "POST", json: body, raw: true, signal: running.signal });
    const node = r.headers.get("x-mesh-node") || "?";
    box.dataset.node = node;
    head.querySelector(".served-by").textContent = `served by ${node}`;
    for await (const data of events(r)) {
      if (data === "[DONE]") break;
      const ev = JSON.parse(data);
      if (ev.error) throw new ApiError(500, ev.error.message || "the generation failed");
      if (ev.usage) usage = ev.usage;
      const ch = (ev.choices || [])[0];
      if (!ch) continue;
      const d = ch.delta || {};
      if (d.content) text += d.content;
      for (const t of d.tool_calls || []) {
        const c = (calls[t.index || 0] ||= { id: "", type: "function", function: { name: "", arguments: "" } });
        if (t.id) c.id = t.id;
        if (t.function && t.function.name) c.function.name = t.function.name;
        if (t.function && t.function.arguments) c.function.arguments += t.function.arguments;
      }
      if (ch.finish_reason) finish = ch.finish_reason;
      box.dataset.chunks = String(parseInt(box.dataset.chunks, 10) + 1);
      if (!queued) { queued = true; requestAnimationFrame(paint); }
    }
    finish = finish || "stop";
    paint();
    const s = (performance.now() - t0) / 1000;
    head.querySelector(".stats").textContent = usage
      ? ` · ${usage.completion_tokens} tokens in ${s.toFixed(1)} s · ${finish}` : ` · ${s.toFixed(1)} s · ${finish}`;
    box.dataset.state = "done";
    history.push({ role: "assistant", content: text || null, ...(calls.length ? { tool_calls: calls } : {}) });
    if (calls.length) toolForms(box, calls);
  } catch (e) {
    paint();
    box.dataset.state = "error";
    const msg = e.name === "AbortError" ? "stopped" : e.message;
    box.append(el("p", { class: "note error", text: msg }));
    if (text || calls.length) history.push({ role: "assistant", content: text || "" });
    else history.pop();       // the user turn that got no answer: edit and send it again
  } finally {
    running = null;
    $("#chat-send").disabled = false;
    $("#chat-stop").hidden = true;
  }
}

// The model called tools: show each call and take its result from the user; once every
// call has a result the conversation continues.
function toolForms(box, calls) {
  const wrap = el("div", { class: "tool-calls" });
  const answers = {};
  for (const c of calls) {
    let args = c.function.arguments;
    try { args = JSON.stringify(JSON.parse(args), null, 2); } catch (_) { /* shown as sent */ }
    const input = el("textarea", { class: "tool-result", rows: 2, placeholder: "the tool's result (text or JSON)" });
    const send = el("button", { type: "button", text: "send result" });
    const form = el("div", { class: "tool-call", dataset: { tool: c.function.name } },
      el("div", { class: "tool-name", text: `tool call: ${c.function.name}` }),
      el("pre", {}, el("code", { text: args })), input, send);
    send.addEventListener("click", () => {
      answers[c.id] = input.value;
      input.disabled = send.disabled = true;
      if (Object.keys(answers).length === calls.length) {
        for (const k of calls) history.push({ role: "tool", tool_call_id: k.id, content: answers[k.id] });
        generate();
      }
    });
    wrap.append(form);
  }
  box.append(wrap);
}

export function setup() {
  $("#chat-tools").value = JSON.stringify(EXAMPLE_TOOLS, null, 2);
  $("#chat-model").addEventListener("input", capabilities);
  for (const id of ["chat-temperature", "chat-top-p"]) {
    const input = $("#" + id), out = $(`output[for=${id}]`);
    const show = () => { out.textContent = input.value; };
    input.addEventListener("input", show);
    show();
  }
  $("#chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("#chat-input").value.trim();
    if (!text || running) return;
    $("#chat-input").value = "";
    history.push({ role: "user", content: text });
    bubble("user", "you")[1].textContent = text;
    generate();
  });
  $("#chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("#chat-form").requestSubmit(); }
  });
  $("#chat-stop").addEventListener("click", () => running && running.abort());
  $("#chat-clear").addEventListener("click", () => {
    if (running) running.abort();
    history = [];
    $("#chat-log").replaceChildren();
  });
  $("#chat-log").addEventListener("click", (e) => {
    const b = e.target.closest("button.copy");
    if (!b) return;
    navigator.clipboard.writeText(b.closest(".code").querySelector("code").textContent)
      .then(() => { b.textContent = "copied"; }, () => { b.textContent = "copy failed"; });
  });
}
