// The console's only way to the server: the public HTTP API, same origin, with the session cookie. A
// state-changing request carries the CSRF token the session handed out; an error becomes an ApiError
// holding OpenAI's error fields, and a 401 tells the shell the session is gone.

let csrfToken = null;
let onSignedOut = () => {};

export function setCsrfToken(token) {
  csrfToken = token;
}

/** Called with no arguments whenever the API answers 401 outside /v1/auth/ (an expired or revoked session). */
export function onUnauthorized(handler) {
  onSignedOut = handler;
}

export class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = error?.code ?? null;
    this.type = error?.type ?? null;
    this.param = error?.param ?? null;
    this.retryAfter = null;
  }
}

function url(path, query) {
  if (!query) return path;
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query)) {
    if (value === null || value === undefined || value === "") continue;
    for (const item of Array.isArray(value) ? value : [value]) params.append(key, String(item));
  }
  const text = params.toString();
  return text ? `${path}?${text}` : path;
}

/** fetch() with the console's conventions; resolves to the Response when it is 2xx, else throws ApiError. */
export async function request(path, { method = "GET", body, query, signal, headers = {} } = {}) {
  const init = { method, signal, credentials: "same-origin", headers: { Accept: "application/json", ...headers } };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  if (method !== "GET" && method !== "HEAD" && csrfToken) init.headers["X-CSRF-Token"] = csrfToken;
  const response = await fetch(url(path, query), init);
  if (response.ok) return response;
  let error = null;
  try {
    error = (await response.json()).error;
  } catch {
    error = null;
  }
  const failure = new ApiError(response.status, error);
  const retry = response.headers.get("Retry-After");
  if (retry) failure.retryAfter = Number(retry);
  if (response.status === 401 && !path.startsWith("/v1/auth/")) onSignedOut();
  throw failure;
}

/** The JSON body of a successful call. */
export async function api(path, options) {
  const response = await request(path, options);
  return response.status === 204 ? null : response.json();
}

/**
 * POST `body` to a streaming endpoint and yield each server-sent event's JSON until [DONE]. Aborting
 * `signal` closes the connection (the server then bills only what it generated).
 */
export async function* streamEvents(path, body, { signal } = {}) {
  const response = await request(path, { method: "POST", body, signal, headers: { Accept: "text/event-stream" } });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const parsed = JSON.parse(data);
      if (parsed.error) throw new ApiError(200, parsed.error);
      yield parsed;
    }
  }
}
