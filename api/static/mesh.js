// The mesh as a live picture: a graph of the nodes and their links (RTT as measured by
// each node, from gossip), and a card per node with memory bars, models, slots, tokens/s,
// split models and memory lent. Fed by /mesh/events, read as server-sent events.

import { call, events, ApiError } from "./api.js";
import { el, svg, $, bytes, shortId, ago, say } from "./dom.js";

let latest = null;

function bar(label, free, total) {
  if (!total) return null;
  const used = Math.max(0, total - free), pct = Math.min(100, (100 * used) / total);
  return el("div", { class: "meter" },
    el("span", { class: "meter-label", text: label }),
    el("span", { class: "meter-bar", title: `${pct.toFixed(0)}% used` },
      el("span", { class: "meter-fill" + (pct > 90 ? " hot" : ""), style: `width:${pct}%` })),
    el("span", { class: "meter-text", text: `${bytes(free)} free of ${bytes(total)}` }));
}

function slots(m) {
  const n = Math.max(0, m.slots || 0), busy = Math.min(n, m.busy || 0);
  const boxes = [];
  for (let i = 0; i < n; i++) boxes.push(el("span", { class: "slot" + (i < busy ? " busy" : "") }));
  return el("span", { class: "slots", title: `${busy} of ${n} slots busy, ${m.queued || 0} queued` },
    boxes, m.queued ? el("span", { class: "queued", text: `+${m.queued} queued` }) : null);
}

function modelRow(m, names) {
  const split = m.split && m.split.nodes && m.split.nodes.length ? m.split : null;
  return el("li", { class: "model", dataset: { model: m.id, state: m.state } },
    el("span", { class: "model-id", text: m.id }),
    el("span", { class: "badge " + (m.state === "loaded" ? "ok" : m.state === "failed" ? "bad" : "warn"), text: m.state }),
    m.backend === "llama" || m.slots ? slots(m) : null,
    m.tokens_per_s ? el("span", { class: "tps", text: `${m.tokens_per_s.toFixed(1)} tok/s` }) : null,
    split ? el("div", { class: "split" },
      `split over ${split.nodes.join(" + ")}`,
      split.layers ? ` (layers ${split.layers.join(" / ")})` : "",
      split.failure ? el("span", { class: "bad", text: ` · ${split.failure}` }) : null) : null);
}

function card(n, self, names) {
  const mem = n.memory || {}, rpc = n.rpc || {};
  const holder = rpc.used_by || rpc.holder;
  return el("article", { class: `node-card ${n.state}`, dataset: { node: n.name, id: n.id || "" } },
    el("header", {},
      el("span", { class: "dot " + n.state }),
      el("h3", { text: n.name }),
      self ? el("span", { class: "badge", text: "this node" }) : null,
      el("span", { class: "badge " + (n.state === "alive" ? "ok" : "warn"), text: n.state })),
    el("div", { class: "facts" },
      el("span", { title: n.id || "", text: shortId(n.id) }),
      n.rtt_ms != null ? el("span", { text: `rtt ${n.rtt_ms.toFixed(1)} ms` }) : null,
      el("span", { text: `load ${(n.load || 0).toFixed(2)}` }),
      el("span", { text: self ? `up ${Math.round(n.uptime_s || 0)} s` : `seen ${ago(n.last_seen)}` }),
      n.api ? el("span", { class: "api", text: n.api }) : null),
    bar("RAM", mem.ram_free, mem.ram_total),
    bar("VRAM", mem.vram_free, mem.vram_total),
    rpc.offered ? el("div", { class: "lend" },
      `lends ${bytes(rpc.offered)} to split models, ${bytes(rpc.free)} free`,
      holder ? ` · holding part of a model for ${names[holder] || shortId(holder)}` : "") : null,
    n.open ? el("div", { class: "bad", text: "open: API beyond loopback with no key" }) : null,
    (n.models || []).length
      ? el("ul", { class: "models" }, n.models.map((m) => modelRow(m, names)))
      : el("p", { class: "muted", text: "no models" }));
}

function graph(p) {
  const nodes = p.nodes || [];
  const W = 640, H = 250, cx = W / 2, cy = H / 2 - 8, ry = nodes.length > 2 ? 70 : 0;
  const rx = nodes.length > 1 ? 200 : 0;
  const pos = {};
  nodes.forEach((n, i) => {           // on an ellipse, the first node (this one) on the left
    const a = Math.PI + (2 * Math.PI * i) / Math.max(1, nodes.length);
    pos[n.id || n.name] = [cx + rx * Math.cos(a), cy + ry * Math.sin(a)];
  });
  const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "graph", role: "img", "aria-label": "mesh graph" });
  const seen = new Set();
  for (const [from, tos] of Object.entries(p.rtt || {})) {
    for (const [to, ms] of Object.entries(tos)) {
      const k = [from, to].sort().join("|");
      if (seen.has(k) || !pos[from] || !pos[to]) continue;
      seen.add(k);
      const back = (p.rtt[to] || {})[from];
      const [x1, y1] = pos[from], [x2, y2] = pos[to];
      g.append(svg("line", { x1, y1, x2, y2, class: "link" }));
      const label = back != null ? `${ms.toFixed(1)} / ${back.toFixed(1)} ms` : `${ms.toFixed(1)} ms`;
      g.append(svg("text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 6, class: "link-label" }, label));
    }
  }
  nodes.forEach((n, i) => {
    const [x, y] = pos[n.id || n.name];
    const models = (n.models || []).length;
    g.append(svg("circle", { cx: x, cy: y, r: 24, class: `node ${n.state}${i === 0 ? " self" : ""}` },
      svg("title", {}, `${n.name}: ${n.state}, ${models} model${models === 1 ? "" : "s"}`)));
    g.append(svg("text", { x, y: y + 5, class: "node-count" }, String(models)));
    g.append(svg("text", { x, y: y + 44, class: "node-label" }, n.name.length > 24 ? n.name.slice(0, 23) + "…" : n.name));
  });
  return g;
}

export function render(p) {
  latest = p;
  const names = Object.fromEntries((p.nodes || []).map((n) => [n.id, n.name]));
  const alive = (p.nodes || []).filter((n) => n.state === "alive").length;
  const models = new Set((p.nodes || []).flatMap((n) => (n.models || []).map((m) => m.id)));
  $("#mesh-summary").dataset.ts = String(p.ts || "");
  $("#mesh-summary").replaceChildren(
    el("span", { text: p.mesh ? `mesh ${p.mesh}` : "single node (no mesh token)" }),
    el("span", { text: `${(p.nodes || []).length} nodes, ${alive} alive` }),
    el("span", { text: `${models.size} models` }));
  $("#mesh-graph").replaceChildren(graph(p));
  $("#mesh-nodes").replaceChildren(...(p.nodes || []).map((n, i) => card(n, i === 0, names)));
  $("#mesh-warnings").replaceChildren(...(p.warnings || []).map((w) => el("p", { class: "note error", text: w })));
}

export const current = () => latest;

// Follow /mesh/events forever: reconnect when a stream ends (the node ends each after a
// while) or fails, backing off to 5 s; stop on a refusal that a retry cannot fix.
export async function follow(signal, live) {
  let delay = 500;
  while (!signal.aborted) {
    try {
      const r = await call("/mesh/events", { raw: true, signal });
      say(live, "live", "ok");
      delay = 500;
      for await (const data of events(r)) render(JSON.parse(data));
    } catch (e) {
      if (signal.aborted) return;
      if (e instanceof ApiError && (e.status === 401 || e.status === 403)) {
        say(live, "no mesh view", "error");
        say($("#mesh-error"), e.status === 403 ? `${e.message}: the mesh view needs a key with the admin feature`
          : e.message, "error");
        return;
      }
      say(live, `reconnecting (${e.message})`, "error");
      delay = Math.min(5000, delay * 2);
    }
    await new Promise((ok) => setTimeout(ok, delay));
  }
}
