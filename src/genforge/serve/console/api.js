// The console's one way to the API: the key (asked once, kept in this tab's sessionStorage), the
// OpenAI-style error body turned into a message, and a 401 turned into "enter the key again".

const KEY_STORE = "genforge.api_key";

export class ApiError extends Error {
  constructor(message, { status = 0, code = null, type = null } = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.type = type;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
}

// Set by app.js: shows the key dialog and resolves once the user entered a key.
let askForKey = async () => false;
export function onKeyNeeded(fn) {
  askForKey = fn;
}

export function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}`, ...extra } : { ...extra };
}

// The message of an OpenAI-style error response ({"error": {"message", "type", "code"}}).
export async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const err = body && body.error ? body.error : {};
  const message = err.message || `${response.status} ${response.statusText || "error"}`;
  return new ApiError(message, { status: response.status, code: err.code || null, type: err.type || null });
}

// fetch() with the key; a 401 asks for the key again and retries once with the new one.
// Network failures become an ApiError with status 0 and a sentence a person understands.
export async function request(path, options = {}, retried = false) {
  let response;
  try {
    response = await fetch(relative(path), { ...options, headers: authHeaders(options.headers || {}) });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError("The server cannot be reached: is `genforge serve` still running?", { status: 0 });
  }
  if (response.status === 401 && !retried) {
    const why = apiKey() ? "The server refused this API key. Enter it again." : "This server needs an API key.";
    if (await askForKey(why)) return request(path, options, true);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function getJSON(path) {
  return (await request(path)).json();
}

export async function postJSON(path, body, options = {}) {
  return request(path, {
    method: "POST",
    body: JSON.stringify(body),
    ...options,
    headers: { "Content-Type": "application/json", ...(options.headers || {}) },
  });
}

// The records of a streamed body, split at `separator`; a connection cut mid-body throws `cut`.
async function* records(response, separator, cut) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(cut, { status: 0, code: "stream_cut" });
    }
    if (chunk.done) break;
    buffer += decoder.decode(chunk.value, { stream: true });
    let at;
    while ((at = buffer.indexOf(separator)) >= 0) {
      yield buffer.slice(0, at);
      buffer = buffer.slice(at + separator.length);
    }
  }
  if (buffer.trim()) yield buffer;
}

// Server-sent events of a streamed completion: yields each `data:` payload parsed, stops at [DONE].
// Returns normally only after [DONE]; a stream cut before it throws, so the caller can say so.
export async function* sseEvents(response) {
  const cut = "The server went away in the middle of the answer.";
  for await (const event of records(response, "\n\n", cut)) {
    for (const line of event.split("\n")) {
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      const parsed = JSON.parse(data);
      if (parsed.error) throw new ApiError(parsed.error.message, { code: parsed.error.code, status: 500 });
      yield parsed;
    }
  }
  throw new ApiError(cut, { status: 0, code: "stream_cut" });
}

// Lines of an NDJSON stream, parsed (document ingest progress).
export async function* ndjsonLines(response) {
  for await (const line of records(response, "\n", "The server went away while indexing.")) {
    if (line.trim()) yield JSON.parse(line);
  }
}

// Paths relative to the page, so a server behind a proxy prefix (--root-path /api) works as well.
export function relative(path) {
  return path.replace(/^\//, "");
}

// Where the page is served from (http://host:port or http://host:port/api).
export function serverUrl() {
  return new URL(".", location.href).href.replace(/\/$/, "");
}

// The base URL a user would type into curl or the openai client.
export function baseUrl() {
  return `${serverUrl()}/v1`;
}

export function keyForSnippet() {
  return apiKey() ? "$GENFORGE_API_KEY" : "-";
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function showStatus(message, kind = "info") {
  const status = document.getElementById("status");
  status.hidden = !message;
  status.textContent = message || "";
  status.dataset.kind = kind;
}
