// One job: its state and progress, curves of its metrics (live from the events stream while it
// runs), the event log, checkpoints, resolved hyperparameters and its model to try.

import { events, get } from "../api.js";
import { JOB_CHARTS, MetricsChart } from "../charts.js";
import { dl, errorBox, eta, h, methodName, number, progress, replace, statusBadge, table, time } from "../dom.js";
import { actionButtons, TERMINAL } from "./jobs.js";
import { tryModel } from "./try.js";

const POLL_MS = 2000;
const LOG_LIMIT = 1000; // newest log entries kept on the page

const LATEST = [
  ["step", "Step"],
  ["train_loss", "Train loss"],
  ["valid_loss", "Validation loss"],
  ["valid_accuracy", "Validation accuracy"],
  ["valid_mean_token_accuracy", "Validation token accuracy"],
  ["learning_rate", "Learning rate"],
  ["samples_per_second", "Samples/s"],
  ["tokens_per_second", "Tokens/s"],
];

export async function render(main, [jobId], { signal }) {
  const path = `/fine_tuning/jobs/${encodeURIComponent(jobId)}`;
  let job = await get(path, { signal });

  const head = h("div", { class: "page-head" });
  const summary = h("section", { "aria-labelledby": "summary-title", class: "card" });
  const latest = h("div", { id: "latest" });
  const chartGrid = h("div", { class: "charts" });
  const log = h("ol", { class: "log", role: "log", "aria-label": "Job events", id: "event-log" });
  const showMetrics = h("input", { type: "checkbox", id: "log-metrics", checked: true });
  const checkpoints = h("div", { id: "checkpoints" });
  const hyperparameters = h("section", { "aria-labelledby": "hp-title", class: "card" });
  const modelSlot = h("div", { id: "model-slot" });
  replace(
    main,
    h("p", { class: "crumbs" }, h("a", { href: "#/jobs" }, "← Jobs")),
    head,
    summary,
    h(
      "section",
      { "aria-labelledby": "charts-title", class: "card" },
      h("h2", { id: "charts-title" }, "Metrics"),
      latest,
      h("p", { class: "hint", id: "charts-empty" }, "The curves appear with the job's first metrics."),
      chartGrid,
    ),
    modelSlot,
    h(
      "section",
      { "aria-labelledby": "events-title", class: "card" },
      h("div", { class: "section-head" }, h("h2", { id: "events-title" }, "Events"), h("label", { class: "inline" }, showMetrics, " metrics events")),
      log,
    ),
    h("section", { "aria-labelledby": "checkpoints-title" }, h("h2", { id: "checkpoints-title" }, "Checkpoints"), checkpoints),
    hyperparameters,
  );

  const charts = JOB_CHARTS.map((spec) => {
    const figure = h("figure", { class: "chart", id: `chart-${spec.name}`, hidden: true, "aria-label": `${spec.title} by step` });
    chartGrid.append(figure);
    return { figure, chart: new MetricsChart(figure, spec) };
  });
  signal.addEventListener("abort", () => charts.forEach(({ chart }) => chart.destroy()));

  const metrics = new Map(); // step -> the newest metrics event's data for that step
  const seen = new Set(); // event ids already shown (a reconnected stream starts over)
  let drawPending = false;
  const draw = () => {
    drawPending = false;
    if (signal.aborted) return; // the page was left meanwhile
    const points = [...metrics.entries()].sort(([a], [b]) => a - b);
    let any = false;
    for (const { chart } of charts) any = chart.update(points) || any;
    document.getElementById("charts-empty").hidden = any;
    drawLatest(latest, points.at(-1)?.[1]);
  };
  const scheduleDraw = () => {
    if (!drawPending) {
      drawPending = true;
      setTimeout(draw, 50); // a burst of events (the history) draws once
    }
  };

  const addEvent = (event) => {
    if (seen.has(event.id)) return;
    seen.add(event.id);
    if (event.type === "metrics" && event.data && typeof event.data.step === "number") {
      metrics.set(event.data.step, event.data);
      scheduleDraw();
      // The stream is ahead of the job's recorded progress (written at most once a second).
      if (!TERMINAL.includes(job.status) && event.data.step > (job.steps_completed ?? 0)) {
        job = { ...job, steps_completed: event.data.step };
        drawProgress(job);
      }
    }
    const stick = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
    log.append(logEntry(event, showMetrics.checked));
    while (log.childElementCount > LOG_LIMIT) log.firstElementChild.remove();
    if (stick) log.scrollTop = log.scrollHeight;
  };
  showMetrics.addEventListener("change", () => {
    for (const li of log.querySelectorAll(".type-metrics")) li.hidden = !showMetrics.checked;
  });

  const show = (updated) => {
    job = updated;
    drawJob(head, summary, hyperparameters, job, () => refresh());
  };
  let checkpointsAt = -1;
  const refresh = async () => {
    show(await get(path, { signal }));
    if (job.steps_completed !== checkpointsAt || TERMINAL.includes(job.status)) {
      checkpointsAt = job.steps_completed;
      drawCheckpoints(checkpoints, await get(`${path}/checkpoints?limit=100`, { signal }));
    }
    if (job.fine_tuned_model && !modelSlot.dataset.model) {
      modelSlot.dataset.model = job.fine_tuned_model;
      tryModel(modelSlot, job.fine_tuned_model, signal).catch((err) => {
        if (err.name !== "AbortError") modelSlot.append(errorBox(err));
      });
    }
  };
  show(job);
  draw();
  await refresh();

  // The events stream: the whole history, then each new event, until the job ends.
  (async () => {
    while (!signal.aborted) {
      try {
        for await (const event of events(`${path}/events?stream=true`, { signal })) addEvent(event);
      } catch (err) {
        if (signal.aborted) return;
        log.append(h("li", { class: "level-warn" }, `The events stream broke (${err.message}); reconnecting…`));
      }
      if (signal.aborted) return;
      try {
        await refresh();
      } catch {
        // the poll below tries again
      }
      if (TERMINAL.includes(job.status)) return;
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
  })();
  // The job's own figures (progress, ETA, status) while it is not finished.
  (async () => {
    while (!signal.aborted && !TERMINAL.includes(job.status)) {
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      if (signal.aborted) return;
      try {
        await refresh();
      } catch {
        // a failed poll is retried by the next one
      }
    }
  })();
}

function drawJob(head, summary, hyperparameters, job, onChange) {
  replace(
    head,
    h("h1", {}, `Job ${job.id}`),
    h("div", { class: "head-status", id: "job-status", dataset: { status: job.status } }, statusBadge(job.status)),
    actionButtons(job, onChange),
  );
  const supervised = job.method?.[job.method?.type ?? "supervised"] ?? {};
  replace(
    summary,
    h("h2", { id: "summary-title" }, "Summary"),
    h("div", { id: "job-progress" }),
    job.error ? errorBox(job.error, "job-error") : null,
    dl([
      ["Base model", job.model],
      ["Method", methodName(job.method)],
      ["Fine-tuned model", job.fine_tuned_model ?? "—"],
      ["Training file", h("a", { href: `#/files/${job.training_file}` }, job.training_file)],
      ["Validation file", job.validation_file ? h("a", { href: `#/files/${job.validation_file}` }, job.validation_file) : "held out from the training file"],
      ["Device", job.device ?? "—"],
      ["Attempt", String(job.attempt)],
      ["Created", time(job.created_at)],
      ["Started", time(job.started_at)],
      ["Finished", time(job.finished_at)],
      ["Trained tokens", number(job.trained_tokens)],
      ["Seed", String(job.seed)],
    ]),
  );
  drawProgress(job);
  const extra = [];
  if (supervised.adapter) extra.push(["adapter", JSON.stringify(supervised.adapter)]);
  if (supervised.architecture) extra.push(["architecture", JSON.stringify(supervised.architecture)]);
  if (job.resources) extra.push(["resources", JSON.stringify(job.resources)]);
  replace(
    hyperparameters,
    h("h2", { id: "hp-title" }, "Hyperparameters (resolved)"),
    dl(
      [...Object.entries(job.hyperparameters ?? {}).sort(([a], [b]) => a.localeCompare(b)).map(([k, v]) => [k, plain(v)]), ...extra],
      { id: "hyperparameters" },
    ),
  );
}

function drawProgress(job) {
  const slot = document.getElementById("job-progress");
  if (slot) replace(slot, progress(job), h("span", { class: "hint" }, `ETA ${eta(job)}`));
}

function plain(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "number") return number(value, 6);
  return typeof value === "string" ? value : JSON.stringify(value);
}

function drawLatest(section, data) {
  replace(
    section,
    data
      ? dl(LATEST.filter(([key]) => key in data).map(([key, label]) => [label, number(data[key], key === "learning_rate" ? 8 : 4)]), { id: "latest-metrics", "aria-label": "Latest metrics" })
      : null,
  );
}

function logEntry(event, showMetrics) {
  const isMetrics = event.type === "metrics";
  return h(
    "li",
    { class: `level-${event.level} type-${event.type}`, hidden: isMetrics && !showMetrics },
    time(event.created_at),
    " ",
    event.level !== "info" ? h("strong", { class: "level" }, event.level === "warn" ? "warning" : "error") : null,
    " ",
    h("span", { class: "message" }, event.message),
  );
}

function drawCheckpoints(slot, page) {
  const rows = page.data
    .slice()
    .sort((a, b) => a.step_number - b.step_number)
    .map((c) =>
      h(
        "tr",
        {},
        h("th", { scope: "row" }, String(c.step_number)),
        h("td", { class: "model" }, c.fine_tuned_model_checkpoint),
        h("td", {}, time(c.created_at)),
        h("td", {}, Object.entries(c.metrics ?? {}).map(([k, v]) => h("div", {}, `${k} = ${number(v)}`))),
      ),
    );
  replace(slot, table("Checkpoints by step", ["Step", "Model id", "Created", "Metrics"], rows, { captionHidden: true, empty: "No checkpoints yet." }));
}
