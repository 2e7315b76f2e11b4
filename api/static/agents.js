// Agents (docs/agents.md): each agent's model, tools and schedule, the next ticks and the
// nodes that would take them, the ticks gossip saw; run one now, list its runs, and follow
// a run's steps live (GET /v1/agents/{name}/runs/{id}/events).

import { call, events } from "./api.js";
import { el, $, say } from "./dom.js";

const when = (ts) => (ts ? new Date(ts * 1000).toLocaleString() : "-");
let following = null;      // AbortController of the run being followed

function schedule(d) {
  const s = d && d.schedule;
  if (!s) return "on demand";
  return s.cron ? `cron ${s.cron}` : `every ${s.every} s`;
}

function tools(d) {
  const t = (d && d.tools) || {};
  const out = [];
  for (const [k, v] of Object.entries(t)) {
    if (Array.isArray(v) ? v.length : v && typeof v === "object" ? Object.keys(v).length : v) out.push(k);
  }
  return out.join(", ") || "none";
}

function stepLine(s) {
  let what;
  if (s.type === "model") {
    const calls = (s.tool_calls || []).map((c) => `${c.name}(${c.arguments})`).join(", ");
    what = `${s.node ? `on ${s.node}: ` : ""}${calls ? `calls ${calls}` : (s.text || "").slice(0, 300)}`;
  } else {
    what = `${s.name || s.type}(${s.arguments || s.path || ""}) → `
      + (s.error ? `error: ${s.error}` : (s.output || s.status || "").toString().slice(0, 300));
  }
  return el("li", { class: "step", dataset: { n: s.n, type: s.type } }, el("b", { text: s.type }), " ", what);
}

async function follow(agent, run, ended = () => {}) {
  if (following) following.abort();
  following = new AbortController();
  const box = $("#agent-run");
  const list = el("ol", { class: "steps" });
  const state = el("p", { class: "note", text: `run ${run.id}: ${run.status}` });
  delete box.dataset.status;
  box.replaceChildren(el("h3", { text: `${agent} · ${run.id}` }), state, list);
  box.hidden = false;
  try {
    const r = await call(`/v1/agents/${encodeURIComponent(agent)}/runs/${run.id}/events`,
      { raw: true, signal: following.signal });
    for await (const data of events(r)) {
      if (data === "[DONE]") break;
      const ev = JSON.parse(data);
      if (ev.error) { say(state, ev.error.message, "error"); break; }
      if (ev.object === "agent.run.step") list.append(stepLine(ev));
      else if (ev.object === "agent.run") {
        const ok = ev.status === "completed";
        say(state, `run ${ev.id} ${ev.status} on ${ev.node || "?"}` + (ev.output ? `: ${ev.output}` : "")
          + (ev.error ? `: ${ev.error.message || ev.error}` : ""), ok ? "ok" : "error");
        box.dataset.status = ev.status;
        ended();
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") say(state, e.message, "error");
  }
}

async function showRuns(name, cell) {
  try {
    const runs = (await call(`/v1/agents/${encodeURIComponent(name)}/runs?limit=10`)).data;
    cell.replaceChildren(...(runs.length ? runs.map((r) => el("button", {
      type: "button", class: "run-link", dataset: { run: r.id }, text: `${r.status} ${when(r.created_at)}`,
      onclick: () => follow(name, r, () => showRuns(name, cell)),
    })) : ["no runs yet"]));
  } catch (e) { cell.textContent = e.message; }
}

let timer = null;
let shown = "";           // the agents (name@rev) the table shows: re-drawn only when they change

export async function refresh() {
  clearTimeout(timer);     // while the tab is open, look again every few seconds
  timer = setTimeout(() => { if (!$("#tab-agents").hidden) refresh(); }, 4000);
  const note = $("#agents-note");
  let data;
  try {
    data = (await call("/v1/agents")).data;
  } catch (e) {
    say(note, e.message, "error");
    return;
  }
  const now = data.map((a) => `${a.name}@${a.rev}`).join(" ");
  if (now === shown && $("#agents-list").children.length === data.length) return;
  shown = now;
  say(note, data.length ? `${data.length} agents, defined once for the whole mesh`
    : "no agent yet: create one with `mesh agents create` or POST /v1/agents (docs/agents.md)");
  $("#agents-list").replaceChildren(...data.map((a) => {
    const d = a.definition || {};
    const runs = el("td", { class: "runs" });
    const input = el("input", { class: "agent-input", placeholder: "input", value: "" });
    const row = el("tr", { dataset: { agent: a.name } },
      el("td", {}, el("b", { text: a.name }), el("div", { class: "muted", text: d.description || "" })),
      el("td", { text: d.model || "?" }), el("td", { text: tools(d) }),
      el("td", {}, schedule(d), a.next_runs && a.next_runs.length
        ? el("ul", { class: "ticks" }, ...a.next_runs.slice(0, 3).map((t) => el("li", {
          text: `${when(t.at)} → ${t.nodes.join(", ") || "no node"}` }))) : null,
        a.recent_ticks && a.recent_ticks.length
          ? el("ul", { class: "ticks seen" }, ...a.recent_ticks.slice(0, 3).map((t) => el("li", {
            text: `${when(t.at)} ${t.state} by ${t.node}` }))) : null),
      el("td", { text: (a.runnable_on || []).join(", ") || "no node" }),
      el("td", {}, input, el("button", {
        type: "button", class: "run-now", text: "Run now",
        onclick: async () => {
          try {
            const run = await call(`/v1/agents/${encodeURIComponent(a.name)}/runs`,
              { method: "POST", json: { input: input.value } });
            showRuns(a.name, runs);
            follow(a.name, run, () => showRuns(a.name, runs));
          } catch (e) { say(note, e.message, "error"); }
        },
      })),
      runs);
    showRuns(a.name, runs);
    return row;
  }));
}
