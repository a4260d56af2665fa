// Building elements (text is always set as text, never parsed as HTML) and formatting values.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2).toLowerCase(), value);
    } else if (name === "class") {
      el.className = value;
    } else if (name === "dataset") {
      Object.assign(el.dataset, value);
    } else if (name in el && typeof value !== "string") {
      el[name] = value; // properties such as value, checked, max
    } else {
      el.setAttribute(name, value === true ? "" : value);
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

// Announced to screen readers (the page's role=status region) and shown nowhere else.
export function announce(message) {
  const status = document.getElementById("status");
  status.textContent = "";
  requestAnimationFrame(() => {
    status.textContent = message;
  });
}

// An error box: role=alert, the API's message as it gave it.
export function errorBox(error, id) {
  const detail = [error.code && `code: ${error.code}`, error.param && `param: ${error.param}`]
    .filter(Boolean)
    .join(", ");
  return h(
    "div",
    { class: "error", role: "alert", id },
    h("p", { class: "error-message" }, error.message),
    detail ? h("p", { class: "error-detail" }, detail) : null,
  );
}

// A table with a caption and column headers. At a phone's width the stylesheet shows each row
// as a block, each cell labelled with its column (data-label); the roles keep the table's
// semantics for assistive technology whatever the display.
export function table(caption, headers, rows, { id, captionHidden = false, empty = "None yet." } = {}) {
  const thead = h("thead", { role: "rowgroup" }, h("tr", { role: "row" }, headers.map((name) => h("th", { scope: "col", role: "columnheader" }, name))));
  for (const row of rows) {
    row.setAttribute("role", "row");
    [...row.children].forEach((cell, i) => {
      cell.dataset.label = headers[i] ?? "";
      cell.setAttribute("role", cell.tagName === "TH" ? "rowheader" : "cell");
    });
  }
  const tbody = h("tbody", { role: "rowgroup" }, rows);
  if (!rows.length) {
    tbody.append(h("tr", { role: "row" }, h("td", { role: "cell", colspan: headers.length, class: "empty" }, empty)));
  }
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { id, role: "table" },
      h("caption", { class: captionHidden ? "visually-hidden" : null }, caption),
      thead,
      tbody,
    ),
  );
}

export function dl(entries, attrs = {}) {
  return h(
    "dl",
    { class: "facts", ...attrs },
    entries
      .filter(([, value]) => value !== undefined)
      .map(([term, value]) => h("div", {}, h("dt", {}, term), h("dd", {}, value ?? "—"))),
  );
}

// ---- formats ---------------------------------------------------------------------------

const TIME_FORMAT = new Intl.DateTimeFormat(undefined, {
  month: "short",
  day: "numeric",
  hour: "2-digit",
  minute: "2-digit",
  second: "2-digit",
});

export function time(seconds) {
  if (!seconds) return "—";
  const date = new Date(seconds * 1000);
  return h("time", { datetime: date.toISOString(), title: date.toString() }, TIME_FORMAT.format(date));
}

export function duration(seconds) {
  if (seconds < 0) seconds = 0;
  if (seconds < 60) return `${Math.round(seconds)} s`;
  const minutes = Math.round(seconds / 60);
  if (minutes < 60) return `${minutes} min`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

export function eta(job) {
  if (!job.estimated_finish || job.status !== "running") return "—";
  return `in ${duration(job.estimated_finish - Date.now() / 1000)}`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function number(value, digits = 4) {
  if (value === null || value === undefined) return "—";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en");
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e6)) return value.toExponential(2);
  return value.toFixed(digits);
}

export function statusBadge(status) {
  return h("span", { class: `badge status-${status}` }, status.replace("_", " "));
}

export function progress(job) {
  const total = job.total_steps;
  const done = job.steps_completed ?? 0;
  const label = total ? `${done} / ${total} steps` : "not started";
  return h(
    "div",
    { class: "progress" },
    h("progress", {
      max: total || 1,
      value: total ? Math.min(done, total) : 0,
      "aria-label": `Progress: ${label}`,
    }),
    h("span", { class: "progress-text" }, label),
  );
}

export function methodName(method) {
  // The settings of the method's own type: method.supervised, or method.dpo.
  const adapter = method?.[method?.type ?? "supervised"]?.adapter;
  const kind = adapter?.type === "lora" ? `LoRA r=${adapter.r}` : "full";
  return `${method?.type ?? "supervised"} (${kind})`;
}
