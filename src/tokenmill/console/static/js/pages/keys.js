// The organization's API keys: the list (GET /v1/keys), a form to create one (POST /v1/keys: its secret is
// in that one response, so it is shown once, here, with a warning), and revocation (DELETE /v1/keys/{id})
// behind an inline confirm step.
import { api } from "../api.js";
import { field, fill, h, newId, select, table } from "../dom.js";
import { dateTime, money, number } from "../format.js";
import { t } from "../i18n.js";
import { alertBox, copyButton, errorBox, loading, pageHeader, toast } from "../ui.js";

const EXPIRY_DAYS = [0, 7, 30, 90, 365];
const DAY_S = 86_400;
const MAX_SPEND_UNITS = 1e9; // the API's ceiling (10^15 micros)

function status(key) {
  if (key.revoked_at !== null) return "revoked";
  if (key.expires_at !== null && key.expires_at * 1000 <= Date.now()) return "expired";
  return "active";
}

function statusBadge(key) {
  const state = status(key);
  return h("span", { class: `badge ${state === "active" ? "badge-ok" : "badge-bad"}` }, t(`keys.status_${state}`));
}

/** "600 RPM · 100,000 TPM · 32 concurrent"; null is unlimited. */
function describeLimits(limits) {
  const part = (value, unit) => t(unit, { n: value === null || value === undefined ? "∞" : number(value) });
  return [
    part(limits.requests_per_minute, "keys.rpm"),
    part(limits.tokens_per_minute, "keys.tpm"),
    part(limits.max_concurrent_requests, "keys.concurrent"),
  ].join(" · ");
}

function limitsCell(key, tierLimits) {
  const spend = key.spend_limit_micros === null ? t("keys.no_spend_limit") : t("keys.spend_limit_of", { amount: money(key.spend_limit_micros) });
  // A key's own rate-limit overrides when the API reports them; otherwise the tier's, which every key
  // without overrides is held to.
  const own = ["requests_per_minute", "tokens_per_minute", "max_concurrent_requests"].some((k) => key[k] != null);
  let rate = null;
  if (own) rate = describeLimits(key);
  else if (tierLimits) rate = t("keys.tier_limits", { limits: describeLimits(tierLimits) });
  return h("div", {}, h("div", {}, spend), rate ? h("small", { class: "muted" }, rate) : null);
}

function parseSpend(text) {
  if (!text.trim()) return null;
  const units = Number(text);
  if (!Number.isFinite(units) || units < 0 || units > MAX_SPEND_UNITS) throw new Error(t("keys.spend_invalid"));
  return Math.round(units * 1e6);
}

export default {
  title: "keys.title",
  async render(main) {
    const secretBox = h("div", {});
    const formMessage = h("div", { "aria-live": "polite" });
    const listBox = h("div", {}, loading());
    const modelsBox = h("div", {}, loading());
    const name = h("input", { type: "text", maxlength: 200, autocomplete: "off" });
    const spend = h("input", { type: "number", min: 0, step: "0.01", inputmode: "decimal" });
    const expiry = select(EXPIRY_DAYS.map((d) => [String(d), d ? t("keys.expires_in", { days: d }) : t("keys.never")]));
    const createButton = h("button", { type: "submit" }, t("keys.create"));
    const form = h(
      "form",
      { class: "stack", onsubmit: create },
      h(
        "div",
        { class: "grid" },
        field(t("keys.name"), name, t("keys.name_hint")).field,
        field(t("keys.spend_limit"), spend, t("keys.spend_limit_hint")).field,
        field(t("keys.expiry"), expiry).field,
      ),
      modelsBox,
      createButton,
    );
    main.append(
      pageHeader(t("keys.title")),
      h("p", { class: "muted" }, t("keys.intro")),
      secretBox,
      h("section", { class: "card page-section" }, h("h2", {}, t("keys.create_title")), form, formMessage),
      h("section", { class: "page-section" }, h("h2", {}, t("keys.list_title")), listBox),
    );

    let checkboxes = [];
    let tierLimits = null;
    const [models, info] = await Promise.allSettled([api("/v1/models"), api("/v1/user/info")]);
    if (info.status === "fulfilled") tierLimits = info.value.data.rate_limits.paid_models;
    if (models.status === "fulfilled") {
      const ids = models.value.data.map((m) => m.id).sort();
      checkboxes = ids.map((id) => h("input", { type: "checkbox", value: id, id: newId("model") }));
      fill(
        modelsBox,
        h(
          "fieldset",
          { class: "key-models" },
          h("legend", {}, t("keys.allowed_models")),
          h("small", { class: "hint" }, t("keys.allowed_models_hint")),
          h("div", { class: "key-model-list" }, checkboxes.map((box) => h("label", { for: box.id }, box, " ", box.value))),
        ),
      );
    } else {
      fill(modelsBox, errorBox(models.reason));
    }
    await loadList();

    async function loadList() {
      try {
        const keys = (await api("/v1/keys")).data.sort((a, b) => b.created_at - a.created_at);
        fill(listBox, keyTable(keys));
      } catch (err) {
        fill(listBox, errorBox(err));
      }
    }

    function keyTable(keys) {
      const columns = [
        { label: t("keys.col_name"), cell: (k) => h("div", {}, h("div", {}, k.name || t("keys.unnamed")), h("code", {}, `${k.prefix}…`)) },
        { label: t("keys.col_created"), cell: (k) => dateTime(k.created_at) },
        { label: t("keys.col_last_used"), cell: (k) => (k.last_used_at ? dateTime(k.last_used_at) : t("keys.never_used")) },
        { label: t("keys.col_expires"), cell: (k) => (k.expires_at ? dateTime(k.expires_at) : t("keys.never")) },
        { label: t("keys.col_models"), cell: (k) => (k.allowed_models ? k.allowed_models.join(", ") : t("keys.all_models")) },
        { label: t("keys.col_limits"), cell: (k) => limitsCell(k, tierLimits) },
        { label: t("keys.col_status"), cell: statusBadge },
        { label: t("keys.col_actions"), cell: (k) => (k.revoked_at === null ? revokeControl(k) : "—") },
      ];
      return table(columns, keys, { caption: t("keys.caption"), empty: t("keys.empty") });
    }

    // Revoking cannot be undone, so the first click only asks; the second, on a button that says what it
    // does, revokes. Inline rather than window.confirm: it reads in the page's language and is styled.
    function revokeControl(key) {
      const box = h("div", { class: "row revoke" });
      const label = key.name || key.prefix;
      const ask = () => {
        const confirm = h("button", { type: "button", class: "danger small", onclick: () => revoke(key, box) }, t("keys.confirm_revoke"));
        const cancel = h("button", { type: "button", class: "secondary small", onclick: reset }, t("common.cancel"));
        fill(box, h("span", {}, t("keys.revoke_question", { name: label })), confirm, cancel);
        confirm.focus();
      };
      const reset = () => {
        const button = h("button", { type: "button", class: "danger small", "aria-label": t("keys.revoke_named", { name: label }), onclick: ask }, t("keys.revoke"));
        fill(box, button);
        return button;
      };
      reset();
      return box;
    }

    async function revoke(key, box) {
      box.querySelectorAll("button").forEach((b) => (b.disabled = true));
      try {
        await api(`/v1/keys/${encodeURIComponent(key.id)}`, { method: "DELETE" });
        toast(t("keys.revoked", { name: key.name || key.prefix }), "success");
        await loadList();
      } catch (err) {
        fill(box, errorBox(err));
      }
    }

    async function create(event) {
      event.preventDefault();
      fill(formMessage);
      const body = { name: name.value.trim() };
      try {
        const limit = parseSpend(spend.value);
        if (limit !== null) body.spend_limit_micros = limit;
      } catch (err) {
        fill(formMessage, alertBox("error", err.message));
        return;
      }
      const allowed = checkboxes.filter((box) => box.checked).map((box) => box.value);
      if (allowed.length) body.allowed_models = allowed;
      const days = Number(expiry.value);
      if (days) body.expires_at = Math.floor(Date.now() / 1000) + days * DAY_S;
      createButton.disabled = true;
      try {
        const created = await api("/v1/keys", { method: "POST", body });
        form.reset();
        showSecret(created);
        await loadList();
      } catch (err) {
        fill(formMessage, errorBox(err));
      } finally {
        createButton.disabled = false;
      }
    }

    function showSecret(created) {
      const headingId = newId("secret");
      const secret = h("input", { type: "text", readonly: true, class: "key-secret mono", value: created.key, "aria-label": t("keys.secret_label") });
      const box = h(
        "section",
        { class: "card secret-box", "aria-labelledby": headingId, tabindex: "-1" },
        h("h2", { id: headingId }, t("keys.secret_title", { name: created.name || created.prefix })),
        alertBox("warning", t("keys.secret_warning")),
        h("div", { class: "row" }, secret, copyButton(() => created.key)),
        h("button", { type: "button", class: "secondary", onclick: () => fill(secretBox) }, t("keys.secret_done")),
      );
      fill(secretBox, box);
      box.focus();
      secret.select();
    }
  },
};
