// The shell: who is signed in, the navigation, the language switch, and the router. Pages live in
// pages/*.js; the URL fragment names one (#/playground?model=x) and its query becomes `ctx.params`.
import { api, onUnauthorized, setCsrfToken } from "./api.js";
import { fill, h } from "./dom.js";
import { getLang, LANGUAGES, setLang, t } from "./i18n.js";
import { alertBox, errorBox, toast } from "./ui.js";

// access: "public" pages are for signed-out visitors, "user" pages need an organization's session (or
// --no-auth), "admin" pages an operator's.
const PAGES = {
  signin: { load: () => import("./pages/signin.js"), access: "public" },
  signup: { load: () => import("./pages/signup.js"), access: "public" },
  square: { load: () => import("./pages/square.js"), access: "user", nav: "nav.square" },
  compare: { load: () => import("./pages/compare.js"), access: "user" }, // reached from the square's picks
  playground: { load: () => import("./pages/playground.js"), access: "user", nav: "nav.playground" },
  embeddings: { load: () => import("./pages/embeddings.js"), access: "user", nav: "nav.embeddings" },
  keys: { load: () => import("./pages/keys.js"), access: "user", nav: "nav.keys", accounts: true },
  usage: { load: () => import("./pages/usage.js"), access: "user", nav: "nav.usage", accounts: true },
  provider: { load: () => import("./pages/provider.js"), access: "user", nav: "nav.provider", accounts: true },
  account: { load: () => import("./pages/account.js"), access: "user", nav: "nav.account", accounts: true },
  "admin/organizations": { load: () => import("./pages/admin_orgs.js"), access: "admin", nav: "nav.admin_orgs" },
  "admin/invites": { load: () => import("./pages/admin_invites.js"), access: "admin", nav: "nav.admin_invites" },
  "admin/models": { load: () => import("./pages/admin_models.js"), access: "admin", nav: "nav.admin_models" },
  "admin/prices": { load: () => import("./pages/admin_prices.js"), access: "admin", nav: "nav.admin_prices" },
  "admin/audit": { load: () => import("./pages/admin_audit.js"), access: "admin", nav: "nav.admin_audit" },
};

const shell = {
  config: null, // GET /v1/auth/config
  session: null, // GET /v1/auth/session when signed in, else null
  cleanup: null, // the current page's clean-up (stop timers, abort streams)
};

function route() {
  const [path, query] = location.hash.replace(/^#\/?/, "").split("?");
  return { name: path || "", params: new URLSearchParams(query || "") };
}

function go(path) {
  location.hash = `#/${path}`;
}

function role() {
  if (!shell.config?.auth_enabled) return "user"; // --no-auth: one local user, no accounts
  if (!shell.session) return null;
  return shell.session.is_admin ? "admin" : "user";
}

function homePage() {
  return { admin: "admin/models", user: "square" }[role()] || "signin";
}

async function loadSession() {
  shell.config = await api("/v1/auth/config");
  if (!shell.config.auth_enabled) {
    shell.session = null;
    return;
  }
  const session = await api("/v1/auth/session");
  shell.session = session.signed_in === false ? null : session;
  setCsrfToken(shell.session?.csrf_token ?? null);
}

async function signOut() {
  try {
    await api("/v1/auth/logout", { method: "POST" });
  } finally {
    shell.session = null;
    setCsrfToken(null);
    go("signin");
  }
}

function renderNav(current) {
  const who = role();
  const items = Object.entries(PAGES).filter(
    ([, page]) => page.nav && page.access === who && (!page.accounts || shell.config?.auth_enabled),
  );
  fill(
    document.getElementById("nav"),
    h(
      "ul",
      {},
      items.map(([name, page]) =>
        h("li", {}, h("a", { href: `#/${name}`, "aria-current": name === current ? "page" : null }, t(page.nav))),
      ),
    ),
  );
  const language = h(
    "select",
    { id: "language", "aria-label": t("nav.language"), onchange: (e) => switchLanguage(e.target.value) },
    LANGUAGES.map(([value, label]) => h("option", { value, selected: value === getLang() }, label)),
  );
  const identity = shell.session
    ? [
        h("span", { class: "who", title: shell.session.user?.email }, shell.session.user?.email || t("nav.admin")),
        h("button", { type: "button", class: "secondary small", onclick: signOut }, t("nav.sign_out")),
      ]
    : [];
  fill(document.getElementById("topbar-tools"), language, identity);
}

function switchLanguage(lang) {
  setLang(lang);
  render();
}

let renders = 0;

async function render() {
  const turn = ++renders; // a later navigation supersedes this render while it awaits
  if (shell.cleanup) {
    shell.cleanup();
    shell.cleanup = null;
  }
  const { name, params } = route();
  const main = document.getElementById("main");
  const page = PAGES[name];
  if (!page) return go(homePage());
  const who = role();
  if (page.access === "public" && who) return go(homePage());
  if (page.access !== "public" && !who) return go(`signin?next=${encodeURIComponent(name)}`);
  renderNav(name);
  document.getElementById("nav").classList.remove("open");
  if (page.access !== "public" && page.access !== who) {
    document.title = "tokenmill";
    fill(main, h("h1", {}, t("error.forbidden_title")), alertBox("error", t("error.forbidden")));
    return;
  }
  let module;
  try {
    module = (await page.load()).default;
  } catch (err) {
    fill(main, errorBox(err));
    return;
  }
  if (turn !== renders) return;
  document.title = `${t(module.title)} · tokenmill`;
  // Each render writes into its own view: a render a later one superseded while it awaited (a language
  // switch mid-load) finishes into a detached node instead of adding a second copy of the page.
  const view = h("div", { class: "view" });
  fill(main, view);
  const ctx = { params, session: shell.session, config: shell.config, go, refresh: refreshSession };
  const cleanup = (await module.render(view, ctx)) || null;
  if (turn === renders) shell.cleanup = cleanup;
  else if (cleanup) cleanup(); // the user moved on before this page finished rendering
}

/** After signing in or out: read the session again and show the right page. */
async function refreshSession(next) {
  await loadSession();
  if (next !== undefined) go(next || homePage());
  else await render();
}

onUnauthorized(() => {
  if (!shell.session) return;
  shell.session = null;
  setCsrfToken(null);
  toast(t("auth.session_expired"), "warning");
  go(`signin?next=${encodeURIComponent(route().name)}`);
});

document.getElementById("menu-toggle").addEventListener("click", (e) => {
  const nav = document.getElementById("nav");
  const open = nav.classList.toggle("open");
  e.currentTarget.setAttribute("aria-expanded", String(open));
});
document.getElementById("menu-toggle").setAttribute("aria-label", t("nav.menu"));

window.addEventListener("hashchange", render);
try {
  await loadSession();
} catch (err) {
  fill(document.getElementById("main"), errorBox(err));
}
await render();
