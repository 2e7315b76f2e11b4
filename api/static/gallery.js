// The gallery: what this node can install, with install and load buttons; an install is
// followed through its job's server-sent events (/mesh/jobs/<id>/events) as a progress bar.

import { call, events } from "./api.js";
import { el, $, bytes, say } from "./dom.js";

const updates = {};          // model id -> progress events received for its job
const jobs = {};             // model id -> its latest install job (kept once ended: a redraw shows how it ended)

function progress(row, job) {
  const bar = row.querySelector("progress"), text = row.querySelector(".job-text");
  row.dataset.state = job.state;
  row.dataset.updates = String(updates[row.dataset.model] || 0);
  bar.hidden = false;
  if (job.bytes_total) { bar.max = job.bytes_total; bar.value = job.bytes_done; } else bar.removeAttribute("value");
  const amount = job.bytes_total ? `${bytes(job.bytes_done)} of ${bytes(job.bytes_total)}` : bytes(job.bytes_done);
  const speed = job.speed_bps && !["done", "failed"].includes(job.state) ? ` · ${bytes(job.speed_bps)}/s` : "";
  const from = job.source ? ` · from ${job.source}` : "";
  text.textContent = job.state === "failed" ? `failed: ${job.error}` : `${job.state} ${amount}${speed}${from}`;
  text.className = "job-text " + (job.state === "failed" ? "bad" : job.state === "done" ? "ok" : "");
}

async function follow(id, job, signal) {
  jobs[id] = job;
  const r = await call(`/mesh/jobs/${encodeURIComponent(job.id)}/events`, { raw: true, signal });
  for await (const data of events(r)) {
    const j = (jobs[id] = JSON.parse(data));
    updates[id] = (updates[id] || 0) + 1;
    const row = document.querySelector(`#gallery-list tr[data-model="${CSS.escape(id)}"]`);
    if (row) progress(row, j);
    if (j.state === "done" || j.state === "failed") break;
  }
  if (jobs[id].state === "done") await refresh(signal);
}

async function install(id, load, signal) {
  const row = document.querySelector(`#gallery-list tr[data-model="${CSS.escape(id)}"]`);
  row.querySelectorAll("button").forEach((b) => { b.disabled = true; });
  try {
    const job = await call("/mesh/models/install", { method: "POST", json: { id, load }, signal });
    progress(row, job);
    await follow(id, job, signal);
  } catch (e) {
    say(row.querySelector(".job-text"), e.message, "error");
    row.querySelectorAll("button").forEach((b) => { b.disabled = false; });
  }
}

async function load(id, signal) {
  const row = document.querySelector(`#gallery-list tr[data-model="${CSS.escape(id)}"]`);
  row.querySelectorAll("button").forEach((b) => { b.disabled = true; });
  say(row.querySelector(".job-text"), "loading…");
  try {
    await call("/mesh/models/load", { method: "POST", json: { id }, signal });
    await refresh(signal);
  } catch (e) {
    say(row.querySelector(".job-text"), e.message, "error");
    row.querySelectorAll("button").forEach((b) => { b.disabled = false; });
  }
}

export async function refresh(signal) {
  const note = $("#gallery-note");
  let gallery, models;
  try {
    [gallery, models] = await Promise.all([call("/mesh/gallery", { signal }), call("/mesh/models", { signal })]);
  } catch (e) {
    if (e.name !== "AbortError") say(note, e.status === 403 ? `${e.message}: the gallery needs the admin feature` : e.message, "error");
    return;
  }
  const loaded = new Set(models.loaded.map((m) => m.id));
  say(note, `${gallery.data.length} models in this node's gallery, ${models.installed.length} installed here`);
  $("#gallery-list").replaceChildren(...gallery.data.map((e) => {
    const size = e.files.reduce((s, f) => s + (f.size || 0), 0);
    const state = loaded.has(e.id) ? "loaded" : e.installed ? "installed" : "";
    const row = el("tr", { dataset: { model: e.id, state: jobs[e.id] ? jobs[e.id].state : state } },
      el("td", {}, el("b", { text: e.id }), el("div", { class: "muted", text: e.description || "" })),
      el("td", { text: e.backend }),
      el("td", { text: size ? bytes(size) : "?" }),
      el("td", { class: "actions" },
        e.installed
          ? (state === "loaded" ? el("span", { class: "badge ok", text: "loaded" })
            : el("span", {}, el("span", { class: "badge", text: "installed" }),
                 el("button", { type: "button", class: "load", text: "Load", onclick: () => load(e.id, signal) })))
          : el("span", {},
              el("button", { type: "button", class: "install", text: "Install", onclick: () => install(e.id, false, signal) }),
              el("button", { type: "button", class: "install-load", text: "Install + load", onclick: () => install(e.id, true, signal) })),
        el("progress", { hidden: true }),
        el("div", { class: "job-text" })));
    if (jobs[e.id]) progress(row, jobs[e.id]);
    return row;
  }));
}
