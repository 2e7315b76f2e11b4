// The dashboard's entry point: the login (the API key lives in sessionStorage only),
// the tabs, and the live mesh feed. Every data call goes through api.js with the key.

import { key, call, hooks } from "./api.js";
import { $, say } from "./dom.js";
import * as mesh from "./mesh.js";
import * as chat from "./chat.js";
import * as gallery from "./gallery.js";
import * as keys from "./keys.js";
import * as agents from "./agents.js";
import * as transcribe from "./transcribe.js";

const TABS = { mesh: () => {}, chat: chat.loadModels, gallery: () => gallery.refresh(running && running.signal),
               transcribe: transcribe.loadModels, agents: agents.refresh, keys: keys.refresh };
let running = null;        // AbortController of this session's background work

function showLogin(message) {
  if (running) running.abort();
  running = null;
  $("#app").hidden = true;
  $("#who").hidden = true;
  $("#login").hidden = false;
  say($("#login-error"), message || "", message ? "error" : "");
  $("#login-key").focus();
}

function showTab() {
  const name = (location.hash || "#mesh").slice(1);
  const tab = name in TABS ? name : "mesh";
  for (const t of Object.keys(TABS)) {
    $(`#tab-${t}`).hidden = t !== tab;
    $(`nav a[href="#${t}"]`).classList.toggle("active", t === tab);
  }
  if (running) TABS[tab]();
}

function showApp(session) {
  $("#login").hidden = true;
  $("#app").hidden = false;
  $("#node-name").textContent = session.node;
  const who = $("#who");
  who.hidden = false;
  $("#who-name").textContent = session.caller
    ? `${session.caller.name} (${session.caller.features.join(", ")})`
    : session.enforcing ? "" : "open mesh: no API key";
  $("#who-name").className = session.caller ? "" : "bad";
  $("#logout").hidden = !session.caller;
  keys.setFeatures(session.features || []);
  running = new AbortController();
  mesh.follow(running.signal, $("#live"));
  showTab();
}

async function enter(candidate) {
  if (candidate !== undefined) key.set(candidate);
  try {
    showApp(await call("/dashboard/session"));
  } catch (e) {
    const had = !!key.get();
    key.clear();
    showLogin(e.status === 401 && !had && candidate === undefined ? "" : e.message);
  }
}

hooks.authLost = (e) => { key.clear(); showLogin(`${e.message} Sign in again.`); };

chat.setup();
keys.setup();
transcribe.setup();
window.addEventListener("hashchange", showTab);
$("#login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const k = $("#login-key").value.trim();
  $("#login-key").value = "";
  if (!k) { say($("#login-error"), "paste an API key (mk-...)", "error"); return; }
  enter(k);
});
$("#logout").addEventListener("click", () => { key.clear(); showLogin("signed out"); });
enter();
