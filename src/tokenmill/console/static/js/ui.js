// Small pieces every page uses: page headings, alerts for API errors, toasts, copy buttons.
import { h } from "./dom.js";
import { t } from "./i18n.js";

export function pageHeader(title, ...actions) {
  return h("div", { class: "page-header" }, h("h1", {}, title), h("div", { class: "actions" }, actions));
}

/** A message box; `kind` is info, success, warning or error (errors are announced to screen readers). */
export function alertBox(kind, text) {
  return h("div", { class: `alert alert-${kind}`, role: kind === "error" ? "alert" : "status" }, text);
}

/** What went wrong, in words: the API's own message, with a plain sentence for permissions and absence. */
export function describeError(err) {
  if (err?.status === 403) return `${t("error.forbidden")} (${err.message})`;
  if (err?.status === 404) return `${t("error.not_found")} (${err.message})`;
  if (err?.status === 429 && err.retryAfter) return `${err.message} ${t("error.retry_after", { s: err.retryAfter })}`;
  if (err instanceof TypeError) return t("error.network");
  return err?.message || String(err);
}

export function errorBox(err) {
  return alertBox("error", describeError(err));
}

export function toast(text, kind = "info") {
  const box = document.getElementById("toasts");
  const note = h("div", { class: `toast toast-${kind}` }, text);
  box.append(note);
  setTimeout(() => note.remove(), 4000);
}

export function copyButton(getText, label = t("common.copy")) {
  return h(
    "button",
    {
      type: "button",
      class: "secondary small",
      onclick: async () => {
        try {
          await navigator.clipboard.writeText(typeof getText === "function" ? getText() : getText);
          toast(t("common.copied"), "success");
        } catch {
          toast(t("common.copy_failed"), "warning");
        }
      },
    },
    label,
  );
}

/** A placeholder while a page loads its data. */
export function loading() {
  return h("p", { class: "muted", role: "status" }, t("common.loading"));
}
