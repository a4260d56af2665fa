// API keys of the organization, for an admin key: create (the secret is shown once), revoke.

import { del, listAll, post } from "../api.js";
import { announce, errorBox, h, replace, table, time } from "../dom.js";

export async function render(main, _params, { signal, admin }) {
  if (!admin) {
    replace(main, h("h1", {}, "API keys"), h("p", {}, "Managing keys needs an admin key (`tunehouse keys create --admin`)."));
    return;
  }
  const name = h("input", { id: "key-name", maxlength: 128, placeholder: "optional" });
  const isAdmin = h("input", { id: "key-admin", type: "checkbox" });
  const created = h("div", { id: "new-key", "aria-live": "polite" });
  const form = h(
    "form",
    { class: "card grid-form", "aria-labelledby": "new-key-title" },
    h("h2", { id: "new-key-title", class: "span-all" }, "Create a key"),
    h("div", { class: "field" }, h("label", { for: "key-name" }, "Name"), name),
    h("div", { class: "field" }, h("label", { class: "inline", for: "key-admin" }, isAdmin, " admin (may manage keys)")),
    h("div", { class: "form-actions" }, h("button", { type: "submit" }, "Create key")),
    created,
  );
  const list = h("div", { id: "keys-table" });
  replace(main, h("div", { class: "page-head" }, h("h1", {}, "API keys")), form, list);

  const load = async () => {
    const { items } = await listAll("/organization/api_keys", { signal });
    const rows = items.map((k) =>
      h(
        "tr",
        { dataset: { keyId: k.id } },
        h("th", { scope: "row" }, k.name ?? "—", h("div", { class: "hint" }, k.id)),
        h("td", {}, h("code", {}, k.redacted_value)),
        h("td", {}, k.admin ? "yes" : "no"),
        h("td", {}, time(k.created_at)),
        h("td", {}, time(k.last_used_at)),
        h("td", {}, k.revoked_at ? time(k.revoked_at) : "—"),
        h(
          "td",
          {},
          k.revoked_at
            ? null
            : h(
                "button",
                {
                  type: "button",
                  class: "danger small",
                  "aria-label": `Revoke key ${k.name ?? k.id}`,
                  onclick: async (event) => {
                    if (!confirm(`Revoke ${k.name ?? k.id}? Requests with it are refused from then on.`)) return;
                    try {
                      await del(`/organization/api_keys/${k.id}`);
                      announce(`Revoked ${k.name ?? k.id}`);
                      await load();
                    } catch (err) {
                      event.target.after(errorBox(err));
                    }
                  },
                },
                "Revoke",
              ),
        ),
      ),
    );
    replace(list, table("Keys of this organization", ["Name", "Key", "Admin", "Created", "Last used", "Revoked", "Actions"], rows));
  };

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const key = await post("/organization/api_keys", { name: name.value.trim() || null, admin: isAdmin.checked });
      replace(
        created,
        h(
          "div",
          { class: "secret", role: "status" },
          h("p", {}, h("strong", {}, "Copy the key now: it is shown once."), ` ${key.name ?? key.id}:`),
          h("code", { id: "new-key-value", tabindex: "0" }, key.value),
          " ",
          h("button", { type: "button", class: "secondary small", onclick: () => navigator.clipboard?.writeText(key.value).then(() => announce("Copied")) }, "Copy"),
        ),
      );
      form.reset();
      await load();
    } catch (err) {
      replace(created, errorBox(err));
    }
  });
  await load();
}
