// Talking to the node: the API key (sessionStorage only), authenticated fetches, and
// server-sent events read from a fetch body (EventSource cannot send the key).

const KEY = "mesh.api_key";

export const key = {
  get: () => sessionStorage.getItem(KEY) || "",
  set: (k) => sessionStorage.setItem(KEY, k),
  clear: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// Called with the error when a call is refused for its key (401): the app shows the login.
export const hooks = { authLost: () => {} };

function headers(extra = {}) {
  const k = key.get();
  return k ? { Authorization: `Bearer ${k}`, ...extra } : extra;
}

async function failure(r) {
  let message = `${r.status} ${r.statusText}`, code = null;
  try {
    const body = await r.json();
    const err = body && body.error;
    if (err && typeof err === "object") { message = err.message || message; code = err.code; }
    else if (typeof err === "string") message = err;
  } catch (_) { /* not JSON: keep the status line */ }
  const e = new ApiError(r.status, message, code);
  if (r.status === 401) hooks.authLost(e);
  return e;
}

// One call; resolves to the Response (ok) or throws ApiError with the server's message.
export async function call(path, { method = "GET", json, body, signal, raw = false } = {}) {
  const init = { method, signal, headers: headers(json !== undefined ? { "Content-Type": "application/json" } : {}) };
  if (json !== undefined) init.body = JSON.stringify(json);
  else if (body !== undefined) init.body = body;
  let r;
  try {
    r = await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, `cannot reach the node (${e.message})`);
  }
  if (!r.ok) throw await failure(r);
  return raw ? r : r.json();
}

// The `data:` payloads of a text/event-stream body, as strings, until it ends.
export async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += value.replace(/\r\n/g, "\n");
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, i);
        buf = buf.slice(i + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (data) yield data;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}
