// The node's API keys (admin): list, create (the secret is shown once), revoke.

import { call } from "./api.js";
import { el, $, say } from "./dom.js";

const when = (ts) => (ts ? new Date(ts * 1000).toLocaleString() : "never");

export async function refresh() {
  const note = $("#keys-note");
  let data;
  try {
    data = (await call("/mesh/keys")).data;
  } catch (e) {
    say(note, e.status === 403 ? `${e.message}: key management needs the admin feature` : e.message, "error");
    return;
  }
  say(note, data.length ? `${data.filter((k) => !k.revoked).length} live keys, valid on every node of the mesh`
    : "no key yet: the node is open (the first key must carry admin)");
  $("#keys-list").replaceChildren(...data.map((k) => el("tr", { dataset: { key: k.name } },
    el("td", { text: k.name }), el("td", { text: k.features.join(", ") }),
    el("td", { text: when(k.created) }), el("td", { text: when(k.last_used) }),
    el("td", { text: k.revoked ? "revoked" : "live", class: k.revoked ? "bad" : "ok" }),
    el("td", {}, k.revoked ? null : el("button", {
      type: "button", class: "revoke", text: "Revoke",
      onclick: async () => {
        if (!confirm(`Revoke the key ${k.name} on every node?`)) return;
        try { await call(`/mesh/keys/${encodeURIComponent(k.name)}`, { method: "DELETE" }); await refresh(); }
        catch (e) { say(note, e.message, "error"); }
      },
    })))));
}

// `features`: what a key may carry, as the node lists them (/dashboard/session).
export function setFeatures(features) {
  $("#keys-features").replaceChildren(...features.map((f) => el("label", { class: "check" },
    el("input", { type: "checkbox", value: f, checked: f === "chat" }), f)));
}

export function setup() {
  $("#keys-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const name = $("#keys-name").value.trim();
    const features = [...document.querySelectorAll("#keys-features input:checked")].map((i) => i.value);
    const shown = $("#keys-created");
    try {
      const k = await call("/mesh/keys", { method: "POST", json: { name, features } });
      shown.replaceChildren(el("p", { text: `Key ${k.name} (${k.features.join(", ")}), shown only now:` }),
        el("code", { class: "secret", text: k.key }));
      shown.hidden = false;
      $("#keys-name").value = "";
      await refresh();
    } catch (err) {
      shown.hidden = true;
      say($("#keys-note"), err.message, "error");
    }
  });
}
