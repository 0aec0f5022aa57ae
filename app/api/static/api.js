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
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    // The API's {"error": {"code", "message"}}; anything else (a proxy's or framework's body) keeps
    // the status line, or its plain-text "detail", never "[object Object]" or "undefined".
    const body = await response.json();
    const error = body?.error;
    if (typeof error?.code === "string" && error.code) code = error.code;
    const text = [error?.message, error, body?.detail].find((m) => typeof m === "string" && m.trim());
    if (text) message = text;
  } catch {
    // not JSON (a proxy's error page): keep the status line
  }
  const retry = response.headers.get("Retry-After");
  const error = new ApiError(response.status, code, message + (retry ? ` (try again in ${retry} s)` : ""));
  error.retryAfter = Number(retry) || null;
  return error;
}

// Worth trying again: no answer at all, or an answer saying "later" (busy, restarting, a proxy without
// a backend for the moment).
const transient = (error) =>
  error instanceof ApiError && (error.code === "unreachable" || [429, 502, 503, 504].includes(error.status));

async function getJSON(path, options) {
  const response = await api(path, options);
  try {
    return await response.json();
  } catch {
    const message = `the answer to ${path} was not JSON (a proxy in the way?)`;
    throw new ApiError(response.status, "bad_response", message);
  }
}

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
// A dropped connection, a server that is restarting or busy (no answer, 429, 502–504) is tried again
// with back-off, resuming after the last event seen (Last-Event-ID); before each new try it yields a
// {event: "reconnecting", data: {attempt, message}} of its own, for the page to say so, and once a try
// gets through, a {event: "reconnected"} (a queued job's stream is silent: nothing else would say so).
const STREAM_TRIES = 7; // consecutive failed connections: about half a minute in all

async function* events(path) {
  let lastId = null;
  let failures = 0;
  let reason = "the connection closed";
  while (failures < STREAM_TRIES) {
    if (failures > 0) {
      yield { id: null, event: "reconnecting", data: { attempt: failures, message: reason } };
      await sleep(Math.min(500 * 2 ** (failures - 1), 8000));
    }
    failures++;
    const resume = lastId === null ? {} : { "Last-Event-ID": String(lastId) };
    let response;
    try {
      response = await api(path, { extraHeaders: { Accept: "text/event-stream", ...resume } });
    } catch (e) {
      if (!transient(e)) throw e; // 401, 404 (a job this server does not know)…: for the user to read
      reason = e.message;
      continue;
    }
    if (failures > 1) yield { id: null, event: "reconnected", data: {} };
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    reason = "the connection closed";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const message = parseEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          failures = 1; // this connection worked (a heartbeat too): the next one starts the back-off afresh
          if (!message) continue;
          if (message.id !== null) lastId = message.id;
          if (message.event === "shutdown") reason = "the server is shutting down";
          yield message;
          if (message.event === "done" || message.event === "error") return;
        }
      }
    } catch (e) {
      if (!(e instanceof TypeError)) throw e; // a network error ends up here as a TypeError
      reason = `the connection broke (${e.message})`;
    }
  }
  throw new ApiError(0, "stream_lost", `lost the progress stream (${reason}); the job may still be running`);
}

async function download(path, filename) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await (await api(path)).blob());
  link.download = filename;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
}
