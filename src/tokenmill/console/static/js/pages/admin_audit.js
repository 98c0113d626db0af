// The audit log, for the operator: every change made through the admin API or `tokenmill admin`, newest
// first (GET /v1/admin/audit-log), a page at a time (`before_id` = the last id shown), optionally filtered by
// action or target. Before and after are shown as compact JSON text, never as markup.
import { api } from "../api.js";
import { field, fill, h, table } from "../dom.js";
import { dateTime, number } from "../format.js";
import { t } from "../i18n.js";
import { errorBox, loading, pageHeader } from "../ui.js";
import { compactJson } from "../admin_common.js";

const PAGE = 50;

function change(entry) {
  return h(
    "div",
    { class: "audit-change" },
    h("code", {}, compactJson(entry.before)),
    h("span", { class: "muted" }, " → "),
    h("code", {}, compactJson(entry.after)),
  );
}

export default {
  title: "admin.audit_title",
  async render(main) {
    const listBox = h("div", {}, loading());
    const action = h("input", { type: "text", maxlength: 100, autocomplete: "off", placeholder: "top_up" });
    const target = h("input", { type: "text", maxlength: 200, autocomplete: "off" });
    const filters = h(
      "form",
      {
        class: "row",
        onsubmit: (event) => {
          event.preventDefault();
          start();
        },
      },
      field(t("admin.filter_action"), action).field,
      field(t("admin.filter_target"), target).field,
      h("button", { type: "submit" }, t("admin.filter")),
    );
    main.append(
      pageHeader(t("admin.audit_title")),
      h("p", { class: "muted" }, t("admin.audit_intro")),
      filters,
      h("section", { class: "page-section" }, h("h2", {}, t("admin.audit_list_title")), listBox),
    );
    await start();

    /** From the newest entry again, with the filters as they are now. */
    function start() {
      const query = { limit: PAGE, action: action.value.trim(), target: target.value.trim() };
      const rows = [];
      let before = null;
      const more = h("button", { type: "button", class: "secondary", onclick: next }, t("admin.older"));
      const note = h("p", { class: "muted", role: "status" });
      const columns = [
        { label: t("admin.col_time"), cell: (e) => dateTime(e.created_at) },
        { label: t("admin.col_actor"), cell: (e) => h("code", {}, e.actor) },
        { label: t("admin.col_action"), cell: (e) => e.action },
        { label: t("admin.col_target"), cell: (e) => h("code", {}, e.target) },
        { label: t("admin.col_change"), cell: change },
      ];
      async function next() {
        more.disabled = true;
        try {
          const page = await api("/v1/admin/audit-log", { query: { ...query, before_id: before } });
          rows.push(...page.data);
          if (page.data.length) before = page.data[page.data.length - 1].id;
          note.textContent = rows.length ? t("admin.showing", { n: number(rows.length) }) : "";
          fill(listBox, table(columns, rows, { caption: t("admin.audit_caption"), empty: t("admin.audit_empty") }), note, page.has_more ? more : null);
        } catch (err) {
          fill(listBox, errorBox(err));
        } finally {
          more.disabled = false;
        }
      }
      return next();
    }
  },
};
