// API access for the page: JSON requests with the API key, readable errors, and /stream's
// Server-Sent Events read with fetch (EventSource cannot send the key).
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// Relative to the page, so that the service also works behind a path prefix.
const url = (path) => new URL("." + path, document.baseURI);

function headers(extra = {}) {
  const key = $("#api-key").value.trim();
  return key ? { ...extra, "X-API-Key": key } : extra;
}

async function api(path, { method = "GET", body, extraHeaders = {} } = {}) {
  const init = { method, headers: headers(extraHeaders) };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url(path), init);
  } catch (e) {
    throw new ApiError(0, "unreachable", `the server did not answer (${e.message})`);
  }
  if (!response.ok) throw await apiError(response);
  return response;
}

async function apiError(response) {
  let code = "http_error";
  let message = `${response.status} ${response.statusText}`;
  try {
    ({ code, message } = (await response.json()).error);
  } catch {
    // not the API's JSON (a proxy's error page): keep the status line
  }
  const retry = response.headers.get("Retry-After");
  if (retry) message += ` (try again in ${retry} s)`;
  return new ApiError(response.status, code, message);
}

const getJSON = async (path, options) => (await api(path, options)).json();

// One Server-Sent Events message ("id:", "event:", "data:" lines); null for a heartbeat comment.
function parseEvent(block) {
  const fields = {};
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    fields[name] = name === "data" && name in fields ? `${fields.data}\n${value}` : value;
  }
  if (!("data" in fields)) return null;
  const id = fields.id ? Number(fields.id) : null;
  return { id, event: fields.event || "message", data: JSON.parse(fields.data) };
}

// The events of /stream/{id}, read with fetch because EventSource cannot send the API key.
// A dropped connection resumes after the last event seen (Last-Event-ID).
async function* events(path) {
  let lastId = null;
  for (let attempt = 0; attempt < 5; attempt++) {
    const resume = lastId === null ? {} : { "Last-Event-ID": String(lastId) };
    const response = await api(path, { extraHeaders: { Accept: "text/event-stream", ...resume } });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const message = parseEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (!message) continue;
          if (message.id !== null) lastId = message.id;
          yield message;
          if (message.event === "done" || message.event === "error") return;
        }
      }
    } catch (e) {
      if (!(e instanceof TypeError)) throw e; // a network error ends up here as a TypeError
    }
    await sleep(500 * 2 ** attempt);
  }
  throw new ApiError(0, "stream_lost", "lost the progress stream; the job goes on: look again later");
}

async function download(path, filename) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await (await api(path)).blob());
  link.download = filename;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
}
