// The /v1 API as the dashboard calls it: the signed-in key (kept in this tab's sessionStorage,
// never in a cookie) sent as a bearer header, errors as the API's envelope says them, and
// server-sent events read from fetch() (EventSource cannot send a header).

const KEY_ITEM = "tunehouse.apiKey";

export class ApiError extends Error {
  constructor(status, error) {
    super(error.message);
    this.status = status;
    this.type = error.type ?? null;
    this.code = error.code ?? null;
    this.param = error.param ?? null;
  }
}

export const session = {
  key: () => sessionStorage.getItem(KEY_ITEM),
  signIn: (key) => sessionStorage.setItem(KEY_ITEM, key),
  signOut: () => sessionStorage.removeItem(KEY_ITEM),
};

// Relative to the page, so the dashboard works behind a proxy that serves it under a prefix.
const url = (path) => new URL(`v1${path}`, document.baseURI);

async function errorOf(response) {
  try {
    const body = await response.json();
    if (body?.error?.message) return new ApiError(response.status, body.error);
  } catch {
    // not JSON: fall through to the status line
  }
  return new ApiError(response.status, {
    message: `The server answered ${response.status} ${response.statusText}`.trim(),
  });
}

// fetch() with the key; resolves to the Response when it is a 2xx, else throws an ApiError.
export async function call(path, { method = "GET", json, form, key, signal } = {}) {
  const headers = { Authorization: `Bearer ${key ?? session.key() ?? ""}` };
  let body;
  if (form !== undefined) {
    body = form;
  } else if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(url(path), { method, headers, body, signal });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, { message: `Cannot reach the server: ${error.message}` });
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

export const get = async (path, options) => (await call(path, options)).json();
export const post = async (path, json, options = {}) =>
  (await call(path, { ...options, method: "POST", json: json ?? {} })).json();
export const del = async (path, options = {}) =>
  (await call(path, { ...options, method: "DELETE" })).json();

// Every page of a list endpoint (`after` = the last id), up to `max` items.
export async function listAll(path, { max = 1000, limit = 100, signal } = {}) {
  const items = [];
  let after = null;
  for (;;) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await get(`${path}${sep}limit=${limit}${after ? `&after=${encodeURIComponent(after)}` : ""}`, { signal });
    items.push(...page.data);
    if (!page.has_more || items.length >= max || !page.last_id) return { items, more: page.has_more };
    after = page.last_id;
  }
}

// The data: payloads of a text/event-stream answer, parsed, until `[DONE]` or the end.
// An `{"error": ...}` payload (an error in mid-stream) is thrown as an ApiError.
export async function* events(path, options = {}) {
  const response = await call(path, options);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue; // a comment (keep-alive)
        if (data === "[DONE]") return;
        const payload = JSON.parse(data);
        if (payload.error) throw new ApiError(response.status, payload.error);
        yield payload;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// The first `maxBytes` of a file's content (the stream is dropped after that).
export async function head(path, { maxBytes = 64 * 1024, signal } = {}) {
  const response = await call(path, { signal });
  const reader = response.body.getReader();
  const chunks = [];
  let size = 0;
  while (size < maxBytes) {
    const { value, done } = await reader.read();
    if (done) break;
    chunks.push(value);
    size += value.length;
  }
  reader.cancel().catch(() => {});
  const bytes = new Uint8Array(size);
  let offset = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, offset);
    offset += chunk.length;
  }
  return { bytes: bytes.slice(0, maxBytes), truncated: size >= maxBytes };
}

// A model id in a path: its ':' and '/' stay as they are (the API routes /models/{model:path}).
export const modelPath = (id) => encodeURIComponent(id).replace(/%2F/gi, "/").replace(/%3A/gi, ":");
