// Organizations, for the operator: the list with balances and tiers (GET /v1/admin/organizations), creating
// one, moving one to another tier (PATCH) and topping one up (POST .../top-ups). A top-up carries an
// idempotency key made when its form opens and shown there: a double click or a retry after a lost answer
// repeats the same key, and the API pays a key once.
import { api } from "../api.js";
import { field, fill, h, select, table } from "../dom.js";
import { dateTime, money } from "../format.js";
import { t } from "../i18n.js";
import { alertBox, errorBox, loading, pageHeader } from "../ui.js";
import { newUuid, parseUnits, section } from "../admin_common.js";

export default {
  title: "admin.orgs_title",
  async render(main) {
    let tiers = ["default"];
    let orgs = [];
    const listBox = h("div", {}, loading());
    const listMessage = h("div", { "aria-live": "polite" });
    const topUpBox = h("div", {});
    const createMessage = h("div", { "aria-live": "polite" });
    const name = h("input", { type: "text", maxlength: 200, required: true, autocomplete: "off" });
    const tierSelect = select([]);
    const createForm = h(
      "form",
      { class: "row", onsubmit: create },
      field(t("admin.org_name"), name).field,
      field(t("admin.tier"), tierSelect).field,
      h("button", { type: "submit" }, t("admin.create_org")),
    );
    main.append(
      pageHeader(t("admin.orgs_title")),
      section(t("admin.create_org_title"), createForm, createMessage),
      topUpBox,
      h("section", { class: "page-section" }, h("h2", {}, t("admin.orgs_list_title")), listMessage, listBox),
    );

    try {
      tiers = (await api("/v1/admin/tiers")).data.map((tier) => tier.name);
    } catch (err) {
      fill(createMessage, errorBox(err));
    }
    fill(tierSelect, tiers.map((tier) => h("option", { value: tier, selected: tier === "default" }, tier)));
    await loadList();

    async function loadList() {
      try {
        orgs = (await api("/v1/admin/organizations")).data;
        fill(listBox, orgTable());
      } catch (err) {
        fill(listBox, errorBox(err));
      }
    }

    function orgTable() {
      const columns = [
        { label: t("admin.col_org"), cell: (o) => h("div", {}, h("div", {}, o.name), h("code", { class: "muted" }, o.id)) },
        { label: t("admin.col_balance"), cell: (o) => money(o.balance_micros), class: "num" },
        { label: t("admin.col_tier"), cell: tierControl },
        { label: t("admin.col_created"), cell: (o) => dateTime(o.created_at) },
        {
          label: t("admin.col_actions"),
          cell: (o) => h("button", { type: "button", class: "secondary small", "aria-label": t("admin.top_up_named", { name: o.name }), onclick: () => openTopUp(o) }, t("admin.top_up")),
        },
      ];
      return table(columns, orgs, { caption: t("admin.orgs_caption"), empty: t("admin.orgs_empty") });
    }

    // A select plus a button, not a select that saves on change: moving through the options with the
    // keyboard must not change anything by itself.
    function tierControl(org) {
      const choice = select(
        (tiers.includes(org.tier) ? tiers : [...tiers, org.tier]).map((tier) => [tier, tier]),
        { "aria-label": t("admin.tier_of", { name: org.name }) },
      );
      choice.value = org.tier;
      const save = async () => {
        if (choice.value === org.tier) return;
        fill(listMessage);
        try {
          const changed = await api(`/v1/admin/organizations/${encodeURIComponent(org.id)}`, { method: "PATCH", body: { tier: choice.value } });
          fill(listMessage, alertBox("success", t("admin.tier_changed", { name: changed.name, tier: changed.tier })));
          await loadList();
        } catch (err) {
          fill(listMessage, errorBox(err));
        }
      };
      const button = h("button", { type: "button", class: "secondary small", "aria-label": t("admin.change_tier_named", { name: org.name }), onclick: save }, t("admin.change_tier"));
      return h("div", { class: "row admin-inline" }, choice, button);
    }

    async function create(event) {
      event.preventDefault();
      fill(createMessage);
      try {
        const org = await api("/v1/admin/organizations", { method: "POST", body: { name: name.value.trim(), tier: tierSelect.value } });
        fill(createMessage, alertBox("success", t("admin.org_created", { name: org.name, id: org.id })));
        name.value = "";
        await loadList();
      } catch (err) {
        fill(createMessage, errorBox(err));
      }
    }

    /** The top-up form for one organization, with a new idempotency key each time it opens. */
    function openTopUp(org) {
      const key = newUuid();
      const amount = h("input", { type: "text", inputmode: "decimal", required: true, autocomplete: "off" });
      const note = h("input", { type: "text", maxlength: 500, autocomplete: "off" });
      const keyInput = h("input", { type: "text", value: key, readonly: true, class: "mono admin-key" });
      const message = h("div", { "aria-live": "polite" });
      const submit = h("button", { type: "submit" }, t("admin.top_up_submit"));
      const close = h("button", { type: "button", class: "secondary", onclick: () => fill(topUpBox) }, t("admin.close"));
      const form = h(
        "form",
        { class: "stack", onsubmit: send },
        h("div", { class: "grid" }, field(t("admin.amount"), amount, t("admin.amount_hint")).field, field(t("admin.note"), note).field),
        h("div", { class: "admin-key-field" }, field(t("admin.idempotency_key"), keyInput, t("admin.idempotency_hint")).field),
        h("div", { class: "row" }, submit, close),
        message,
      );
      fill(topUpBox, section(t("admin.top_up_title", { name: org.name }), form));
      amount.focus();

      async function send(event) {
        event.preventDefault();
        fill(message);
        let micros;
        try {
          micros = parseUnits(amount.value, { allowZero: false });
        } catch (err) {
          return fill(message, alertBox("error", `${t("admin.amount")}: ${err.message}`));
        }
        submit.disabled = true;
        try {
          const body = { amount_micros: micros, idempotency_key: key, note: note.value };
          const result = await api(`/v1/admin/organizations/${encodeURIComponent(org.id)}/top-ups`, { method: "POST", body });
          const words = { amount: money(result.amount_micros), name: org.name, balance: money(result.balance_micros) };
          fill(message, alertBox(result.created ? "success" : "info", t(result.created ? "admin.topped_up" : "admin.top_up_repeated", words)));
          await loadList();
        } catch (err) {
          fill(message, errorBox(err));
        } finally {
          submit.disabled = false;
        }
      }
    }
  },
};
