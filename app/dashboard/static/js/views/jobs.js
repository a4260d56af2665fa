// The jobs: a form to start one, and a table with progress, filtered by status, whose rows
// follow the jobs while any of them is active.

import { get, listAll, post } from "../api.js";
import { announce, errorBox, h, methodName, progress, replace, statusBadge, table, time, eta } from "../dom.js";

export const TERMINAL = ["succeeded", "failed", "cancelled"];
const STATUSES = ["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"];
const POLL_MS = 2000;
const MAX_JOBS = 200; // the newest, in the table

// The buttons a job's status allows (the API refuses the others with a 409).
export function actionButtons(job, onChange) {
  const act = (action, verb) =>
    h(
      "button",
      {
        type: "button",
        class: action === "cancel" ? "danger small" : "secondary small",
        "aria-label": `${verb} job ${job.id}`,
        onclick: async (event) => {
          const button = event.currentTarget;
          button.disabled = true;
          try {
            const updated = await post(`/fine_tuning/jobs/${job.id}/${action}`);
            announce(`Job ${job.id} is ${updated.status.replace("_", " ")}`);
            onChange(updated);
          } catch (err) {
            button.disabled = false;
            announce(err.message);
            button.after(errorBox(err));
          }
        },
      },
      verb,
    );
  const buttons = [];
  if (["queued", "running"].includes(job.status)) buttons.push(act("pause", "Pause"));
  if (job.status === "paused") buttons.push(act("resume", "Resume"));
  if (!TERMINAL.includes(job.status)) buttons.push(act("cancel", "Cancel"));
  return buttons.length ? h("div", { class: "actions" }, buttons) : null;
}

function jobRow(job, refresh) {
  return h(
    "tr",
    { dataset: { jobId: job.id, status: job.status } },
    h("th", { scope: "row" }, h("a", { href: `#/jobs/${job.id}` }, job.id), job.suffix ? h("div", { class: "hint" }, job.suffix) : null),
    h("td", {}, statusBadge(job.status)),
    h("td", { class: "model" }, job.model),
    h("td", {}, methodName(job.method)),
    h("td", {}, progress(job)),
    h("td", {}, eta(job)),
    h("td", {}, time(job.created_at)),
    h("td", {}, time(job.finished_at)),
    h("td", {}, actionButtons(job, refresh)),
  );
}

export async function render(main, _params, { signal }) {
  const filter = h(
    "select",
    { id: "status-filter", name: "status" },
    h("option", { value: "" }, "all"),
    h("option", { value: "active" }, "active"),
    STATUSES.map((s) => h("option", { value: s }, s.replace("_", " "))),
  );
  const tableSlot = h("div", { id: "jobs-table" });
  const more = h("p", { class: "hint" });
  replace(
    main,
    h("div", { class: "page-head" }, h("h1", {}, "Fine-tuning jobs")),
    await newJobForm(signal),
    h("div", { class: "toolbar" }, h("label", { for: "status-filter" }, "Status"), filter),
    tableSlot,
    more,
  );

  let jobs = [];
  let hasMore = false;
  let shown = ""; // what the table shows, to rebuild it only when something changed
  const draw = () => {
    const wanted = filter.value;
    const rows = jobs.filter((j) =>
      !wanted ? true : wanted === "active" ? !TERMINAL.includes(j.status) : j.status === wanted,
    );
    const signature = JSON.stringify([wanted, rows]);
    if (signature === shown) return;
    shown = signature;
    const focused = document.activeElement?.getAttribute("aria-label");
    replace(
      tableSlot,
      table("Jobs, newest first", ["Job", "Status", "Base model", "Method", "Progress", "ETA", "Created", "Finished", "Actions"], rows.map((j) => jobRow(j, load)), {
        empty: wanted ? "No jobs with this status." : "No jobs yet: start one above.",
      }),
    );
    if (focused) tableSlot.querySelector(`[aria-label="${CSS.escape(focused)}"]`)?.focus();
    more.textContent = hasMore ? `Showing the newest ${MAX_JOBS} jobs.` : "";
  };
  const load = async () => {
    ({ items: jobs, more: hasMore } = await listAll("/fine_tuning/jobs", { max: MAX_JOBS, signal }));
    draw();
  };
  filter.addEventListener("change", draw);
  await load();
  // Follow the table while the page is open: faster while a job is active.
  (async () => {
    while (!signal.aborted) {
      const active = jobs.some((j) => !TERMINAL.includes(j.status));
      await new Promise((resolve) => setTimeout(resolve, active ? POLL_MS : POLL_MS * 3));
      if (signal.aborted) return;
      try {
        await load();
      } catch {
        // a failed poll is retried by the next one
      }
    }
  })();
}

// ---- starting a job ---------------------------------------------------------------------

async function newJobForm(signal) {
  const [models, files] = await Promise.all([
    get("/models", { signal }),
    listAll("/files?purpose=fine-tune", { signal }),
  ]);
  const usable = files.items.filter((f) => f.status !== "error");
  const fileOptions = (none) => [
    none ? h("option", { value: "" }, none) : null,
    usable.map((f) => h("option", { value: f.id }, `${f.filename} (${f.id}${f.format ? `, ${f.format}` : ""})`)),
  ];
  const base = models.data.filter((m) => m.owned_by === "system");
  const tuned = models.data.filter((m) => m.owned_by !== "system");
  const field = (id, label, input, hint) =>
    h("div", { class: "field" }, h("label", { for: id }, label), input, hint ? h("p", { class: "hint", id: `${id}-hint` }, hint) : null);
  const numberInput = (id, attrs) =>
    h("input", { id, name: id, type: "number", inputmode: "decimal", placeholder: "auto", ...attrs });
  const message = h("div", { id: "new-job-message" });

  const form = h(
    "form",
    { class: "grid-form", id: "new-job-form" },
    field(
      "job-model",
      "Base model",
      h(
        "select",
        { id: "job-model", name: "model", required: true },
        h("optgroup", { label: "Base models" }, base.map((m) => h("option", { value: m.id }, `${m.id} (${m.task ?? "model"})`))),
        tuned.length ? h("optgroup", { label: "Your fine-tuned models" }, tuned.map((m) => h("option", { value: m.id }, m.id))) : null,
      ),
    ),
    field("job-training-file", "Training file", h("select", { id: "job-training-file", name: "training_file", required: true }, fileOptions(usable.length ? null : "Upload a file first"))),
    field("job-validation-file", "Validation file", h("select", { id: "job-validation-file", name: "validation_file" }, fileOptions("none (10% of the training rows are held out)"))),
    field("job-suffix", "Suffix", h("input", { id: "job-suffix", name: "suffix", maxlength: 64, pattern: "[\\w.\\-]+", placeholder: "optional" })),
    field("job-epochs", "Epochs", numberInput("job-epochs", { min: 1, max: 50, step: 1 })),
    field("job-batch-size", "Batch size", numberInput("job-batch-size", { min: 1, max: 256, step: 1 })),
    field("job-lr-multiplier", "Learning rate multiplier", numberInput("job-lr-multiplier", { min: 0, step: "any" })),
    field("job-eval-every", "Evaluate every (steps)", numberInput("job-eval-every", { min: 1, step: 1, placeholder: "each epoch" })),
    field(
      "job-adapter",
      "Adapter",
      h("select", { id: "job-adapter", name: "adapter" }, h("option", { value: "full" }, "full fine-tune"), h("option", { value: "lora" }, "LoRA (causal language models)")),
    ),
    h("div", { class: "form-actions" }, h("button", { type: "submit" }, "Start job")),
    message,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = (id) => form.querySelector(`#${id}`).value.trim();
    const hyperparameters = {};
    for (const [id, key, parse] of [
      ["job-epochs", "n_epochs", parseInt],
      ["job-batch-size", "batch_size", parseInt],
      ["job-lr-multiplier", "learning_rate_multiplier", parseFloat],
      ["job-eval-every", "eval_every_steps", parseInt],
    ]) {
      if (value(id)) hyperparameters[key] = parse(value(id));
    }
    const supervised = { hyperparameters };
    if (value("job-adapter") === "lora") supervised.adapter = { type: "lora" };
    const body = {
      model: value("job-model"),
      training_file: value("job-training-file"),
      method: { type: "supervised", supervised },
    };
    if (value("job-validation-file")) body.validation_file = value("job-validation-file");
    if (value("job-suffix")) body.suffix = value("job-suffix");
    replace(message);
    const submit = form.querySelector("button[type=submit]");
    submit.disabled = true;
    try {
      const job = await post("/fine_tuning/jobs", body);
      announce(`Started job ${job.id}`);
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      replace(message, errorBox(err, "new-job-error"));
    } finally {
      submit.disabled = false;
    }
  });
  return h("details", { class: "card", id: "new-job" }, h("summary", {}, "Start a fine-tuning job"), form);
}
