// The transcription drop zone: an audio file dropped (or picked) is sent to
// /v1/audio/transcriptions with a transcription model of the mesh.

import { call } from "./api.js";
import { el, $, say } from "./dom.js";

export async function loadModels() {
  try {
    const list = await call("/v1/models");
    const ids = list.data.filter((c) => (c.capabilities || []).includes("transcription")).map((c) => c.id);
    const pick = $("#stt-model"), keep = pick.value;
    pick.replaceChildren(...ids.map((id) => el("option", { value: id, text: id })));
    if (ids.includes(keep)) pick.value = keep;
    say($("#stt-note"), ids.length ? "" : "no transcription model is loaded anywhere in the mesh", ids.length ? "" : "error");
  } catch (e) {
    say($("#stt-note"), e.message, "error");
  }
}

async function send(file) {
  const out = $("#stt-result"), note = $("#stt-note");
  const model = $("#stt-model").value;
  if (!model) { say(note, "pick a transcription model", "error"); return; }
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("model", model);
  form.append("response_format", "verbose_json");
  const lang = $("#stt-language").value.trim();
  if (lang) form.append("language", lang);
  out.dataset.state = "running";
  out.replaceChildren();
  say(note, `transcribing ${file.name} (${Math.round(file.size / 1024)} KiB)…`);
  const t0 = performance.now();
  try {
    const r = await call("/v1/audio/transcriptions", { method: "POST", body: form, raw: true });
    const node = r.headers.get("x-mesh-node") || "?";
    const data = await r.json();
    out.dataset.node = node;
    out.replaceChildren(el("p", { class: "stt-text", text: data.text.trim() }),
      el("p", { class: "muted", text: `served by ${node} · ${data.duration ? data.duration.toFixed(1) + " s of audio, " : ""}` +
        `${((performance.now() - t0) / 1000).toFixed(1)} s · language ${data.language || "?"}` }));
    out.dataset.state = "done";
    say(note, "");
  } catch (e) {
    out.dataset.state = "error";
    say(note, e.message, "error");
  }
}

export function setup() {
  const zone = $("#stt-drop"), input = $("#stt-file");
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]);
  });
  input.addEventListener("change", () => { if (input.files.length) send(input.files[0]); input.value = ""; });
}
