// Files: upload (a refused dataset shows the API's message: line number and reason), the list,
// and one file's stats and first rows (from its content), delete.

import { call, del, get, head, listAll } from "../api.js";
import { announce, bytes, dl, errorBox, h, number, replace, table, time } from "../dom.js";

const PREVIEW_ROWS = 10;

export async function render(main, [fileId], { signal }) {
  const message = h("div", { id: "upload-message", "aria-live": "polite" });
  const fileInput = h("input", { id: "upload-file", name: "file", type: "file", required: true, accept: ".jsonl,.json,.csv,.parquet,.txt", "aria-describedby": "upload-hint" });
  const form = h(
    "form",
    { class: "card upload", id: "upload-form", "aria-labelledby": "upload-title" },
    h("h2", { id: "upload-title" }, "Upload a dataset"),
    h("label", { for: "upload-file" }, "File"),
    fileInput,
    h("p", { class: "hint", id: "upload-hint" }, "JSONL, CSV, Parquet or plain text. It is checked as it arrives: a bad row is refused with its line number."),
    h("button", { type: "submit" }, "Upload"),
    message,
  );
  const list = h("div", { id: "files-table" });
  const detail = h("div", { id: "file-detail" });
  replace(main, h("div", { class: "page-head" }, h("h1", {}, "Files")), form, detail, list);

  const load = async () => {
    const { items } = await listAll("/files", { signal });
    replace(list, table("Files, newest first", ["File", "Format", "Rows", "Size", "Purpose", "Created", "Actions"], items.map((f) => fileRow(f, load)), { empty: "No files yet." }));
  };

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const file = fileInput.files[0];
    if (!file) return;
    const data = new FormData();
    data.append("purpose", "fine-tune");
    data.append("file", file, file.name);
    const button = form.querySelector("button");
    button.disabled = true;
    replace(message, h("p", { class: "hint" }, `Uploading ${file.name}…`));
    try {
      const stored = await (await call("/files", { method: "POST", form: data })).json();
      replace(message, h("p", { class: "ok", role: "status" }, `Uploaded ${stored.filename} as ${stored.id}: ${number(stored.stats?.rows)} rows, ${stored.format ?? "unknown"} format.`));
      form.reset();
      await load();
      location.hash = `#/files/${stored.id}`;
    } catch (err) {
      replace(message, errorBox(err, "upload-error"));
    } finally {
      button.disabled = false;
    }
  });

  await load();
  if (fileId) await showFile(detail, fileId, signal);
}

function fileRow(file, reload) {
  return h(
    "tr",
    { dataset: { fileId: file.id } },
    h("th", { scope: "row" }, h("a", { href: `#/files/${file.id}` }, file.filename), h("div", { class: "hint" }, file.id)),
    h("td", {}, file.format ?? "—"),
    h("td", {}, number(file.stats?.rows)),
    h("td", {}, bytes(file.bytes)),
    h("td", {}, file.purpose),
    h("td", {}, time(file.created_at)),
    h(
      "td",
      {},
      h(
        "button",
        {
          type: "button",
          class: "danger small",
          "aria-label": `Delete file ${file.filename} (${file.id})`,
          onclick: async (event) => {
            if (!confirm(`Delete ${file.filename} (${file.id})?`)) return;
            try {
              await del(`/files/${file.id}`);
              announce(`Deleted ${file.filename}`);
              if (location.hash === `#/files/${file.id}`) location.hash = "#/files";
              else await reload();
            } catch (err) {
              event.target.after(errorBox(err));
            }
          },
        },
        "Delete",
      ),
    ),
  );
}

async function showFile(slot, fileId, signal) {
  const file = await get(`/files/${encodeURIComponent(fileId)}`, { signal });
  const preview = h("div", { id: "file-preview" }, h("p", { class: "hint" }, "Reading the first rows…"));
  replace(
    slot,
    h(
      "section",
      { class: "card", "aria-labelledby": "file-title" },
      h("h2", { id: "file-title" }, file.filename),
      dl([
        ["Id", file.id],
        ["Format", file.format ?? "—"],
        ["Size", bytes(file.bytes)],
        ["Status", file.status_details ? `${file.status}: ${file.status_details}` : file.status],
        ["Created", time(file.created_at)],
        ["Expires", time(file.expires_at)],
        ["SHA-256", h("code", { class: "hash" }, file.sha256)],
      ]),
      h("h3", {}, "Stats"),
      stats(file.stats ?? {}),
      h("h3", {}, `First rows`),
      preview,
    ),
  );
  try {
    const { bytes: content, truncated } = await head(`/files/${encodeURIComponent(fileId)}/content`, { signal });
    replace(preview, previewOf(file, content, truncated));
  } catch (err) {
    if (err.name !== "AbortError") replace(preview, errorBox(err));
  }
}

function stats(values) {
  return dl(
    Object.entries(values).map(([key, value]) => {
      if (value && typeof value === "object" && !Array.isArray(value)) {
        return [key.replaceAll("_", " "), dl(Object.entries(value).map(([k, v]) => [k, number(v, 1)]), { class: "facts nested" })];
      }
      return [key.replaceAll("_", " "), typeof value === "number" ? number(value, 1) : JSON.stringify(value)];
    }),
    { id: "file-stats" },
  );
}

function previewOf(file, content, truncated) {
  if (file.filename.toLowerCase().endsWith(".parquet")) {
    return h("p", { class: "hint" }, "Parquet is a binary format: see its stats above.");
  }
  let lines = new TextDecoder().decode(content).split(/\r?\n/);
  if (truncated) lines = lines.slice(0, -1); // the last line may be cut
  lines = lines.filter((line) => line.trim()).slice(0, PREVIEW_ROWS + 1);
  const rows = lines.map((line) => {
    try {
      const value = JSON.parse(line);
      return value && typeof value === "object" && !Array.isArray(value) ? value : null;
    } catch {
      return null;
    }
  });
  if (rows.length && rows.every(Boolean)) {
    const shown = rows.slice(0, PREVIEW_ROWS);
    const columns = [...new Set(shown.flatMap((row) => Object.keys(row)))];
    const cell = (v) => (v === undefined ? "" : typeof v === "string" ? v : JSON.stringify(v));
    return table(
      `The first ${shown.length} rows`,
      ["#", ...columns],
      shown.map((row, i) => h("tr", {}, h("th", { scope: "row" }, String(i + 1)), columns.map((c) => h("td", {}, cell(row[c]))))),
      { id: "preview-table", captionHidden: true },
    );
  }
  // CSV (a header and rows) or plain text: the lines as they are.
  return h("pre", { class: "preview", id: "preview-text", tabindex: "0" }, lines.join("\n"));
}
