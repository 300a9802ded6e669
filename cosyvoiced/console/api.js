// Talking to the daemon: relative URLs only (the page may sit behind a proxy's sub-path),
// the API key in a header (never in a URL), errors as the daemon words them.

const KEY_STORE = "cosyvoiced.console.key";

export function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
}

export function authHeaders(extra = {}) {
  const headers = { ...extra };
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** The daemon's own error (OpenAI-shaped: {"error": {"code", "message"}}) as an ApiError. */
export async function errorOf(response) {
  let code = `http_${response.status}`;
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch (_ignored) { /* not JSON: the status line says enough */ }
  return new ApiError(response.status, code, message);
}

/** fetch with the key; JSON in and out; throws ApiError for a refusal. */
export async function call(path, { method = "GET", json, body, signal } = {}) {
  const headers = authHeaders(json === undefined ? {} : { "Content-Type": "application/json" });
  const response = await fetch(path, {
    method, headers, signal, body: json === undefined ? body : JSON.stringify(json),
  });
  if (!response.ok) throw await errorOf(response);
  const type = response.headers.get("Content-Type") || "";
  return type.includes("json") ? response.json() : response;
}

/**
 * Server-Sent Events read with fetch (EventSource cannot send the key in a header).
 * `handlers[name](data)` gets each event's parsed data; resolves when the stream ends.
 */
export async function readEvents(path, handlers, signal) {
  const response = await fetch(path, { headers: authHeaders(), signal, cache: "no-store" });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffered += value;
    let end;
    while ((end = buffered.indexOf("\n\n")) >= 0) {
      const block = buffered.slice(0, end);
      buffered = buffered.slice(end + 2);
      dispatch(block, handlers);
    }
  }
}

function dispatch(block, handlers) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;  // a keepalive comment
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (data.length && handlers[name]) handlers[name](JSON.parse(data.join("\n")));
}
