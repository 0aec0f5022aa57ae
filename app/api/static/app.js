// The ddpm-serve page: sample, interpolate and reconstruct, with live x̂₀ previews from /stream.
// Plain JavaScript, no dependencies; every request goes to this server (API.md).
// Uses api.js (requests, events) and png.js (uploads), loaded before it.
"use strict";

const PREVIEWS_PER_JOB = 60; // about this many x̂₀ frames per job, whatever its length
const QUEUE_POLL_MS = 1500; // how often a queued job's place is asked for (its stream is silent until it starts)

// The page picks the seeds it does not get from the form: the server's own random seeds go up to 2^63,
// which JavaScript numbers cannot hold exactly, so they could not be shown or reused.
const randomSeed = () => crypto.getRandomValues(new Uint32Array(1))[0];
const seedFrom = (text) => (text === "" || text === null ? randomSeed() : Number(text));

// ---------------------------------------------------------------- models and earlier samples

const state = { models: [], samples: [] }; // samples: {job, index, model, seed, src}

const model = () => state.models.find((m) => m.name === $("#model").value) || state.models[0];

let modelsRetry = null;

// The models, again and again while the server is unreachable or not ready (503): a page opened before
// the server is up, or while it restarts, comes to life by itself. A refusal (401: the API key) waits
// for the user instead.
async function loadModels() {
  clearTimeout(modelsRetry);
  const error = $("#page-error");
  try {
    state.models = await getJSON("/models");
    error.hidden = true;
  } catch (e) {
    const again = transient(e);
    error.textContent = `Could not list the models: ${e.message}${again ? "; trying again…" : ""}`;
    error.hidden = false;
    if (again) modelsRetry = setTimeout(loadModels, Math.min(e.retryAfter || 3, 30) * 1000);
    return;
  }
  const select = $("#model");
  const previous = select.value;
  select.replaceChildren(...state.models.map((m) => new Option(m.name, m.name)));
  const kept = state.models.some((m) => m.name === previous);
  select.value = kept ? previous : (state.models.find((m) => m.default) || state.models[0])?.name ?? "";
  modelChanged();
}

function modelChanged() {
  const m = model();
  if (!m) return;
  const channels = m.channels === 1 ? "grayscale" : m.channels === 3 ? "RGB" : `${m.channels} channels`;
  const variance = m.variance === "beta" ? "σ² = β" : "σ² = β̃";
  $("#model-info").textContent =
    `${m.resolution}×${m.resolution} ${channels} · T = ${m.timesteps} · ${m.beta_schedule} β · ${variance}`;
  // What the user typed stays (a reloaded model list, another API key, another model) while it is valid
  // for this model; the rest follows the model: all T steps, t = T/2, or the server's limit if less
  // (DDPM_MAX_STEPS: the server's own defaults, /models' max_steps).
  const most = Math.min(m.timesteps, m.max_steps ?? m.timesteps);
  const inRange = (t) => Number.isInteger(t) && t >= 1 && t <= most;
  const steps = $("#sample [name=steps]");
  steps.max = most;
  keepOrSet(steps, most, (text) => inRange(Number(text)));
  const half = Math.max(1, Math.min(Math.floor(m.timesteps / 2), most));
  $("#reconstruct [name=t]").max = most;
  keepOrSet($("#reconstruct [name=t]"), half, (text) => inRange(Number(text)));
  keepOrSet($("#interpolate [name=t]"), half, (text) => listOfT(text).every(inRange));
  // A seed end of an interpolation is sampled with all T steps: where the server allows fewer, a seed
  // cannot be used, and the ends default to earlier samples instead.
  for (const fieldset of $$("#interpolate .source")) {
    const seed = $("option[value=seed]", fieldset);
    seed.disabled = most < m.timesteps;
    const limit = `needs all T = ${m.timesteps} steps; this server allows ${most}`;
    seed.textContent = seed.disabled ? `a seed (${limit})` : "a seed";
    const kind = $(".kind", fieldset);
    if (seed.disabled && kind.value === "seed") {
      kind.value = "sample";
      kind.dispatchEvent(new Event("change"));
    }
  }
  // Crisp pixels at a useful size: an integer scale of the model's resolution.
  const cell = Math.max(1, Math.round(96 / m.resolution)) * m.resolution;
  document.documentElement.style.setProperty("--cell", `${cell}px`);
  refreshPickers();
}

// Keeps an input's value when the user typed it and it is still `valid`; otherwise sets `fallback`
// (and the input follows the model again until the user types in it).
function keepOrSet(input, fallback, valid) {
  if (input.dataset.typed && input.value.trim() !== "" && valid(input.value)) return;
  input.value = fallback;
  delete input.dataset.typed;
}

function remember(job) {
  const { id, seed } = job;
  const images = job.result.images.map((_, index) => ({ job: id, index, model: job.model, seed }));
  state.samples.push(...images);
  refreshPickers();
  return images;
}

function refreshPickers() {
  const mine = state.samples.filter((s) => s.model === model()?.name);
  for (const select of $$(".source .pick")) {
    const chosen = select.value;
    const options = mine.map((s) => {
      const label = `sample ${s.index} of job ${s.job.slice(0, 6)} (seed ${s.seed})`;
      return new Option(label, `${s.job}:${s.index}`);
    });
    select.replaceChildren(...(options.length ? options : [new Option("none yet: sample first", "")]));
    if (options.some((o) => o.value === chosen)) select.value = chosen;
  }
}

// ---------------------------------------------------------------- sources and uploads

function setUpSource(fieldset, seed) {
  fieldset.append($("#source").content.cloneNode(true));
  if ("noSeed" in fieldset.dataset) $("option[value=seed]", fieldset).remove();
  // "A: seed", "B: seed": each control's name says which side it belongs to.
  const side = $("legend", fieldset).textContent;
  for (const control of $$("[aria-label]", fieldset)) {
    control.setAttribute("aria-label", `${side}: ${control.getAttribute("aria-label")}`);
  }
  $(".seed", fieldset).value = seed;
  const kind = $(".kind", fieldset);
  const show = () => {
    for (const name of ["seed", "pick", "file"]) {
      const wanted = { seed: "seed", sample: "pick", upload: "file" }[kind.value];
      // Disabled as well as hidden: a control the user cannot see must not block the form with its
      // validity (an old negative seed behind "an upload" would, without a word).
      const control = $(`.${name}`, fieldset);
      control.hidden = control.disabled = name !== wanted;
    }
  };
  kind.addEventListener("change", show);
  show();
}

// The request's view of a source: {"seed"}, {"job", "index"} or {"image": base64 PNG}.
async function readSource(fieldset) {
  const side = fieldset.dataset.side;
  switch ($(".kind", fieldset).value) {
    case "seed":
      return { seed: Number($(".seed", fieldset).value) };
    case "sample": {
      const [job, index] = $(".pick", fieldset).value.split(":");
      if (!job) throw new ApiError(0, "no_sample", `${side}: there is no earlier sample of this model yet`);
      return { job, index: Number(index) };
    }
    default: {
      const file = $(".file", fieldset).files[0];
      if (!file) throw new ApiError(0, "no_file", `${side}: choose an image file`);
      try {
        return { image: await toModelPNG(file, model()) };
      } catch (e) {
        const message = `${side}: ${file.name} is not an image this browser can read (${e.message})`;
        throw new ApiError(0, "bad_file", message);
      }
    }
  }
}

// ---------------------------------------------------------------- one job, watched

class JobView {
  constructor(panel) {
    panel.append($("#job-view").content.cloneNode(true));
    this.panel = panel;
    this.root = $(".job", panel);
    this.bar = $("progress", panel);
    this.status = $(".status", panel);
    this.previews = $(".previews", panel);
    this.results = $(".results", panel);
    this.downloads = $(".downloads", panel);
    this.error = $(".error", panel);
    this.live = $(".announce", panel);
    this.name = $("h2", panel).textContent;
    this.bar.setAttribute("aria-label", `${this.name} progress`);
  }

  start() {
    // The last job's images are blobs held until their URLs are revoked (a link and its image share one).
    for (const image of $$("img", this.results)) URL.revokeObjectURL(image.src);
    this.root.hidden = false;
    this.error.hidden = true;
    this.downloads.hidden = true;
    this.previews.replaceChildren();
    this.results.replaceChildren();
    this.bar.hidden = true; // no job yet: nothing to show progress of
    this.bar.value = 0;
    this.status.textContent = "submitting…";
    this.first = null;
    this.waiting = null; // "queued (position 2)", "starting…": the job's state before its first step
    this.place = null; // the queue position last announced
    this.running = null; // "step 5 / 100 · t = …": the job's state since
    this.lost = null; // "…: reconnecting (try 2)…" while the stream is down
    this.said = null;
    this.quarter = 0;
  }

  // Screen readers hear state changes only (the visible status changes at every preview): queued,
  // started, each quarter, the end; each message once. Errors are said by the role="alert" paragraph.
  announce(text) {
    if (text === this.said) return;
    this.said = text;
    this.live.textContent = `${this.name}: ${text}`;
  }

  // The job as POST or GET /jobs/{id} gave it, before its first progress event. `say`: announce the
  // place in the queue (not for the POST's answer: a job on an idle server starts at once).
  queued(job, say = false) {
    this.bar.hidden = false;
    if (this.first) return; // the stream has spoken since
    this.bar.max = job.progress.steps || 1;
    if (job.status === "queued" && job.queue_position) {
      this.waiting = `queued (position ${job.queue_position})`;
      if (say && job.queue_position !== this.place) {
        this.announce(`queued, position ${job.queue_position}`); // once per place, however often asked
        this.place = job.queue_position;
      }
    } else if (job.status === "queued" || job.status === "running") {
      this.waiting = "starting…"; // out of the queue, no step done yet
      if (job.status === "running") this.announce("started");
    } else return; // ended (cancelled while queued…): the stream's "done" says how
    this.show();
  }

  // Where the job is (its place in the queue, then its step) and, while the stream is down, that it is:
  // a place in the queue that keeps being updated must not hide that.
  show() {
    this.status.textContent = [this.running ?? this.waiting, this.lost].filter(Boolean).join("; ");
  }

  reconnecting({ attempt, message }) {
    this.lost = `${message}: reconnecting (try ${attempt})…`;
    this.show();
    this.announce("connection lost, reconnecting");
  }

  reconnected() {
    this.lost = null;
    this.show();
    this.announce("reconnected");
  }

  progress(event, columns) {
    const now = performance.now();
    if (!this.first) this.announce("started");
    this.first ??= { time: now, step: event.step };
    const quarter = Math.floor((4 * event.step) / event.steps);
    if (quarter > this.quarter && quarter < 4) {
      this.quarter = quarter;
      this.announce(`${25 * quarter} %`);
    }
    this.bar.max = event.steps;
    this.bar.value = event.step;
    const rate = (event.step - this.first.step) / ((now - this.first.time) / 1000);
    const eta = rate > 0 ? ` · ${formatSeconds((event.steps - event.step) / rate)} left` : "";
    this.running = `step ${event.step} / ${event.steps} · t = ${event.t}${eta}`;
    this.show();
    // Past the job's preview budget (DDPM_MAX_PREVIEW_BYTES) events carry no images: the last ones stay.
    if (!event.x0.length) return;
    this.previews.hidden = false;
    showGrid(this.previews, event.x0.length, columns(event.x0.length));
    event.x0.forEach((png, k) => {
      this.previews.children[k].src = `data:image/png;base64,${png}`;
    });
  }

  async finish(job, columns) {
    const seconds = (new Date(job.finished_at) - new Date(job.started_at || job.created_at)) / 1000;
    if (job.status !== "succeeded") {
      this.status.textContent = `${job.status} at step ${job.progress.step} / ${job.progress.steps}`;
      this.announce(`${job.status} at step ${job.progress.step} of ${job.progress.steps}`);
      if (job.error) this.fail(new ApiError(0, job.error.code, job.error.message));
      return;
    }
    this.bar.value = this.bar.max;
    this.status.textContent = `done in ${formatSeconds(seconds)} · seed ${job.seed}`;
    this.announce(`done in ${formatSeconds(seconds)}, seed ${job.seed}`);
    const blobs = await Promise.all(job.result.images.map(async (image) => (await api(image.url)).blob()));
    const cells = blobs.map((blob, k) => {
      const src = URL.createObjectURL(blob);
      const link = Object.assign(document.createElement("a"), { href: src, download: `${job.id}-${k}.png` });
      link.title = `image ${k}: click to download`;
      link.append(Object.assign(document.createElement("img"), { src, alt: `image ${k}` }));
      return link;
    });
    this.previews.hidden = true;
    this.results.style.setProperty("--columns", columns(cells.length));
    this.results.replaceChildren(...cells);
    this.downloads.replaceChildren(
      "Download: ",
      downloadButton("grid.png", job.result.grid_url, `${job.id}-grid.png`, (e) => this.fail(e)),
      " ",
      downloadButton("all as .npy (float32)", job.result.npy_url, `${job.id}.npy`, (e) => this.fail(e)),
    );
    this.downloads.hidden = false;
  }

  // The stream's `error`: the job failed (no `done` follows). Where it stopped, said as `finish` says a
  // cancelled job's end; the last x̂₀ previews stay, as what the model made of it.
  failed(error) {
    const at = this.first ? ` at step ${this.bar.value} / ${this.bar.max}` : " before its first step";
    this.running = `failed${at}`;
    this.waiting = this.lost = null;
    this.show();
    this.announce(`failed${at.replace(" / ", " of ")}`);
    this.fail(error);
  }

  fail(error) {
    const where = error.status ? ` (${error.status} ${error.code})` : "";
    this.error.textContent = error.message + where;
    this.error.hidden = false;
  }
}

function showGrid(grid, count, columns) {
  grid.style.setProperty("--columns", columns);
  while (grid.children.length > count) grid.lastChild.remove();
  while (grid.children.length < count) {
    grid.append(Object.assign(document.createElement("img"), { alt: "x̂₀ preview" }));
  }
}

// A failed download (the job expired, the server is gone) is said in the panel, like any other error.
function downloadButton(label, path, filename, failed) {
  const button = Object.assign(document.createElement("button"), { type: "button", textContent: label });
  button.addEventListener("click", () => download(path, filename).catch(failed));
  return button;
}

// The stream of a queued job is silent until the job starts: meanwhile its place in the queue is asked
// for with GET /jobs/{id}, until it leaves the queue or the returned function is called (the stream
// spoke). Failures are left to the stream to report.
function watchQueue(view, job) {
  let watching = job.status === "queued";
  (async () => {
    while (watching) {
      await sleep(QUEUE_POLL_MS);
      if (!watching) return;
      let now;
      try {
        now = await getJSON(`/jobs/${job.id}`);
      } catch (e) {
        if (transient(e)) continue;
        return;
      }
      if (!watching) return;
      watching = now.status === "queued";
      view.queued(now, true);
    }
  })();
  return () => {
    watching = false;
  };
}

function formatSeconds(seconds) {
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

// Submits a job from a panel's form and follows it to the end; the panel's Cancel button cancels it.
function jobPanel(panel, { path, body, columns, done = () => {} }) {
  const view = new JobView(panel);
  const form = $("form", panel);
  const submit = $("button[type=submit]", form);
  const cancel = $(".cancel", form);
  // The job of the last submit: {id, following (its stream is being read: it says how the job ends),
  // answer (what DELETE said of it)}; a Cancel click acts on the job it was shown for, not on a later one.
  let current = null;
  // The Cancel button is disabled once it has done its work, which drops the keyboard focus on it to the
  // page's start; it goes to the (again enabled) submit button instead.
  let refocus = false;
  const disableCancel = () => {
    refocus ||= document.activeElement === cancel;
    cancel.disabled = true;
  };
  // The job as DELETE left it, shown where no stream will say how it ended (the stream was lost).
  const ended = async (job) => {
    view.lost = null;
    view.error.hidden = true;
    await view.finish(job, columns);
    if (job.status === "succeeded") done(job);
  };
  cancel.addEventListener("click", async () => {
    const run = current;
    if (!run) return;
    disableCancel();
    try {
      run.answer = await getJSON(`/jobs/${run.id}`, { method: "DELETE" });
      if (run === current && !run.following) await ended(run.answer);
    } catch (e) {
      if (run !== current) return; // another job is shown now
      view.fail(e);
      if (!run.following) cancel.disabled = false; // nothing else can stop it: let the user try again
    }
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    let stopWatching = () => {};
    let lost = false; // the stream was lost with the job perhaps running: Cancel stays for it
    current = null; // a Cancel still enabled for an earlier job whose stream was lost no longer applies
    disableCancel();
    view.start();
    submit.disabled = true;
    try {
      if (!model()) {
        throw new ApiError(0, "no_model", "no model to use yet: see the message at the top of the page");
      }
      const request = { model: model().name, ...(await body(new FormData(form))) };
      const job = await getJSON(path, { method: "POST", body: request });
      current = { id: job.id, following: true, answer: null };
      cancel.disabled = false;
      view.queued(job);
      stopWatching = watchQueue(view, job);
      for await (const message of events(job.urls.stream)) {
        if (["progress", "done", "error"].includes(message.event)) stopWatching(); // the job has moved
        if (message.event === "progress") view.progress(message.data, columns);
        else if (message.event === "reconnecting") view.reconnecting(message.data);
        else if (message.event === "reconnected") view.reconnected();
        else if (message.event === "done") {
          disableCancel();
          await view.finish(message.data, columns);
          if (message.data.status === "succeeded") done(message.data);
        } else if (message.event === "error") {
          disableCancel();
          view.failed(new ApiError(0, message.data.code, message.data.message));
        }
      }
    } catch (e) {
      lost = e.code === "stream_lost" && current !== null;
      if (lost) {
        view.lost = null; // no longer reconnecting: the error says what happened
        view.show();
      } else view.status.textContent = "";
      view.fail(e);
    } finally {
      const run = current;
      if (run) run.following = false;
      stopWatching();
      submit.disabled = false;
      if (lost && run.answer) await ended(run.answer); // cancelled while the stream was down: it ended so
      else if (lost && !run.answer) cancel.disabled = false; // Cancel asked for, or still to be, not lost
      else disableCancel();
      // Chromium moves the focus off a disabled button only at its next rendering update: until then
      // it is still on Cancel.
      const dropped = [document.body, cancel, null].includes(document.activeElement);
      if (refocus && dropped) submit.focus();
      refocus = false;
    }
  });
}

const square = (count) => Math.ceil(Math.sqrt(count));
const previewEvery = (steps) => Math.max(1, Math.ceil(steps / PREVIEWS_PER_JOB));
const listOfT = (text) => text.split(",").map((t) => Number(t.trim()));

// ---------------------------------------------------------------- the three panels

function setUp() {
  $("#api-key").value = sessionStorage.getItem("ddpm-api-key") || "";
  $("#api-key").addEventListener("change", () => {
    sessionStorage.setItem("ddpm-api-key", $("#api-key").value.trim());
    loadModels();
  });
  $("#model").addEventListener("change", modelChanged);
  for (const input of $$("#sample [name=steps], #interpolate [name=t], #reconstruct [name=t]")) {
    input.addEventListener("input", () => {
      input.dataset.typed = "yes";
    });
  }
  $$(".source").forEach((fieldset, k) => setUpSource(fieldset, k + 1));

  const sampler = $("#sample [name=sampler]");
  sampler.addEventListener("change", () => {
    $("#sample [name=eta]").disabled = sampler.value !== "ddim";
  });

  jobPanel($("#sample"), {
    path: "/sample",
    body: (form) => {
      const steps = Number(form.get("steps"));
      const sampler = form.get("sampler");
      const request = { n: Number(form.get("n")), steps, sampler, seed: seedFrom(form.get("seed")) };
      if (sampler === "ddim") request.eta = Number(form.get("eta"));
      return { ...request, stream_every: previewEvery(steps) };
    },
    columns: square,
    done: remember,
  });

  let interpolation = { rows: 1, columns: 2 };
  jobPanel($("#interpolate"), {
    path: "/interpolate",
    body: async (form) => {
      const ts = listOfT(form.get("t"));
      const [a, b] = await Promise.all($$("#interpolate .source").map(readSource));
      const seeded = "seed" in a || "seed" in b;
      const steps = (seeded ? model().timesteps : 0) + Math.max(...ts); // seed ends are sampled first
      interpolation = { rows: ts.length, columns: Number(form.get("num")) };
      const t = ts.length === 1 ? ts[0] : ts;
      return { a, b, t, num: interpolation.columns, seed: randomSeed(), stream_every: previewEvery(steps) };
    },
    // While the ends are being sampled the previews are those two images; then the t × λ grid.
    columns: (count) => {
      const { rows, columns } = interpolation;
      return count === rows * columns ? columns : count;
    },
  });

  jobPanel($("#reconstruct"), {
    path: "/reconstruct",
    body: async (form) => {
      const source = await readSource($("#reconstruct .source"));
      const t = Number(form.get("t"));
      return { ...source, t, n: Number(form.get("n")), seed: randomSeed(), stream_every: previewEvery(t) };
    },
    columns: (count) => Math.min(count, 8),
  });

  loadModels();
}

setUp();
