// Models: the base models this server fine-tunes and the organization's fine-tuned ones.

import { del, get, modelPath } from "../api.js";
import { announce, errorBox, h, replace, table, time } from "../dom.js";

export async function render(main, _params, { signal }) {
  const slot = h("div");
  replace(main, h("div", { class: "page-head" }, h("h1", {}, "Models")), slot);
  const load = async () => {
    const { data } = await get("/models", { signal });
    const base = data.filter((m) => m.owned_by === "system");
    const tuned = data.filter((m) => m.owned_by !== "system");
    replace(
      slot,
      h("h2", {}, "Fine-tuned models"),
      table("Fine-tuned models", ["Model", "Kind", "Base model", "Labels", "Job", "Created", "Actions"], tuned.map((m) => tunedRow(m, load)), {
        id: "tuned-models",
        captionHidden: true,
        empty: "None yet: a job that succeeds adds its model here.",
      }),
      h("h2", {}, "Base models"),
      table(
        "Base models",
        ["Model", "Kind", "Owner"],
        base.map((m) => h("tr", {}, h("th", { scope: "row", class: "model" }, m.id), h("td", {}, m.task ?? "—"), h("td", {}, m.owned_by))),
        { id: "base-models", captionHidden: true },
      ),
    );
  };
  await load();
}

function tunedRow(model, reload) {
  return h(
    "tr",
    { dataset: { model: model.id } },
    h("th", { scope: "row", class: "model" }, model.id),
    h("td", {}, model.task ?? "—"),
    h("td", { class: "model" }, model.base_model ?? "—"),
    h("td", {}, model.labels?.join(", ") ?? "—"),
    h("td", {}, model.job_id ? h("a", { href: `#/jobs/${model.job_id}` }, model.job_id) : "—"),
    h("td", {}, time(model.created)),
    h(
      "td",
      {},
      h(
        "button",
        {
          type: "button",
          class: "danger small",
          "aria-label": `Delete model ${model.id}`,
          onclick: async (event) => {
            if (!confirm(`Delete ${model.id} and its checkpoints?`)) return;
            try {
              await del(`/models/${modelPath(model.id)}`);
              announce(`Deleted ${model.id}`);
              await reload();
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
