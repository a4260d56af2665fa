// The page: signing in and out, and the sections, chosen by the URL's hash
// (#/jobs, #/jobs/<id>, #/files, #/files/<id>, #/models, #/keys).

import { ApiError, get, session } from "./api.js";
import { errorBox, h, replace } from "./dom.js";
import * as files from "./views/files.js";
import * as job from "./views/job.js";
import * as jobs from "./views/jobs.js";
import * as keys from "./views/keys.js";
import * as models from "./views/models.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const signOutButton = document.getElementById("sign-out");

const ROUTES = [
  [/^#\/jobs\/([^/]+)$/, job, "jobs"],
  [/^#\/jobs$/, jobs, "jobs"],
  [/^#\/files(?:\/([^/]+))?$/, files, "files"],
  [/^#\/models$/, models, "models"],
  [/^#\/keys$/, keys, "keys"],
];

let current = null; // the shown view: { controller }
const state = { admin: false };

function leaveView() {
  current?.controller.abort();
  current = null;
}

function showSignIn(error) {
  leaveView();
  nav.hidden = true;
  signOutButton.hidden = true;
  const input = h("input", {
    id: "api-key",
    name: "api-key",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
    placeholder: "sk-th-…",
    "aria-describedby": "api-key-help",
  });
  const message = h("div", { id: "sign-in-message" }, error ? errorBox(error) : null);
  const form = h(
    "form",
    { class: "card sign-in", "aria-labelledby": "sign-in-title" },
    h("h1", { id: "sign-in-title" }, "Sign in"),
    h("label", { for: "api-key" }, "API key"),
    input,
    h(
      "p",
      { id: "api-key-help", class: "hint" },
      "The key is kept in this browser tab only (session storage) and sent as a bearer header.",
    ),
    h("button", { type: "submit" }, "Sign in"),
    message,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    replace(message, h("p", { class: "hint" }, "Checking the key…"));
    try {
      await get("/models", { key });
    } catch (err) {
      replace(message, errorBox(err instanceof ApiError ? err : { message: String(err) }));
      input.focus();
      return;
    }
    session.signIn(key);
    await start();
  });
  replace(main, form);
  input.focus();
}

async function start() {
  if (!session.key()) return showSignIn();
  try {
    // Whether this key may manage keys: an admin key lists them, any other gets a 403.
    await get("/organization/api_keys?limit=1");
    state.admin = true;
  } catch (err) {
    if (err.status === 401) {
      session.signOut();
      return showSignIn(err);
    }
    state.admin = false;
  }
  nav.hidden = false;
  signOutButton.hidden = false;
  document.getElementById("nav-keys").hidden = !state.admin;
  if (!location.hash || location.hash === "#" || location.hash === "#/") {
    history.replaceState(null, "", "#/jobs");
  }
  route();
}

function route() {
  if (!session.key()) return showSignIn();
  leaveView();
  const hash = location.hash || "#/jobs";
  for (const [pattern, view, section] of ROUTES) {
    const match = hash.match(pattern);
    if (!match) continue;
    for (const link of nav.querySelectorAll("a")) {
      if (link.dataset.section === section) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    const controller = new AbortController();
    current = { controller };
    main.replaceChildren();
    const context = {
      signal: controller.signal,
      admin: state.admin,
      // A 401 while signed in (the key was revoked): back to the sign-in form.
      unauthorized: (err) => {
        session.signOut();
        showSignIn(err);
      },
    };
    view.render(main, match.slice(1).map((part) => part && decodeURIComponent(part)), context).catch((err) => {
      if (err.name === "AbortError") return;
      if (err.status === 401) return context.unauthorized(err);
      main.append(errorBox(err));
    });
    main.focus({ preventScroll: true });
    return;
  }
  replace(main, h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/jobs" }, "Back to the jobs")));
}

signOutButton.addEventListener("click", () => {
  session.signOut();
  history.replaceState(null, "", "#/jobs");
  showSignIn();
});
window.addEventListener("hashchange", route);
start();
