// Usage & billing: the balance (GET /v1/user/info), usage per UTC day stacked by model as tokens or spend
// (GET /v1/usage, with a data table and a summary for screen readers), its CSV export (the same report,
// format=csv), the requests as billed (GET /v1/usage/requests) and the ledger (GET /v1/ledger), both paged.
import { api, request } from "../api.js";
import { field, fill, h, newId, table } from "../dom.js";
import { chartsAvailable, daysBetween, seriesByModel, stackedBars } from "../charts.js";
import { dateTime, duration, money, number } from "../format.js";
import { t } from "../i18n.js";
import { alertBox, errorBox, loading, pageHeader } from "../ui.js";

const DEFAULT_DAYS = 30;
const MAX_DAYS = 366;
const PAGE = 50;
const ISO_DAY = /^\d{4}-\d{2}-\d{2}$/;

function isoDay(date) {
  return date.toISOString().slice(0, 10);
}

/** The range in the URL (#/usage?start=...&end=...), else the last 30 UTC days, as the API counts them. */
function pickRange(params) {
  const end = ISO_DAY.test(params.get("end") || "") ? params.get("end") : isoDay(new Date());
  const fallback = new Date(`${end}T00:00:00Z`);
  fallback.setUTCDate(fallback.getUTCDate() - (DEFAULT_DAYS - 1));
  const start = ISO_DAY.test(params.get("start") || "") ? params.get("start") : isoDay(fallback);
  return { start, end };
}

function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.map(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]));
}

/** dom.js's table, reachable by keyboard: on a narrow screen its wrapper scrolls sideways, and a table of
plain text has nothing else to focus for the arrow keys to scroll it (axe: scrollable-region-focusable). */
function scrollTable(columns, rows, options) {
  const wrap = table(columns, rows, options);
  wrap.setAttribute("tabindex", "0");
  wrap.setAttribute("role", "region");
  wrap.setAttribute("aria-label", options.caption);
  return wrap;
}

/** A table that grows a page at a time: `fetchPage(after)` resolves to the API's list. */
function pagedTable(container, columns, options, fetchPage) {
  const rows = [];
  let after = null;
  const more = h("button", { type: "button", class: "secondary", onclick: next }, t("usage.load_more"));
  const note = h("p", { class: "muted", role: "status" });
  async function next() {
    more.disabled = true;
    try {
      const page = await fetchPage(after);
      rows.push(...page.data);
      after = page.last_id;
      note.textContent = rows.length ? t("usage.showing", { n: number(rows.length) }) : "";
      fill(container, scrollTable(columns, rows, options), note, page.has_more ? more : null);
    } catch (err) {
      fill(container, errorBox(err));
    } finally {
      more.disabled = false;
    }
  }
  return next();
}

export default {
  title: "usage.title",
  async render(main, ctx) {
    const { start, end } = pickRange(ctx.params);
    let chart = null;
    let metric = "tokens";
    let report = null;
    const exportMessage = h("div", { "aria-live": "polite" });
    const balanceBox = h("div", {}, loading());
    const chartBox = h("div", {}, loading());
    const requestsBox = h("div", {}, loading());
    const ledgerBox = h("div", {}, loading());
    const from = h("input", { type: "date", value: start, required: true });
    const to = h("input", { type: "date", value: end, required: true });
    const rangeMessage = h("div", { "aria-live": "polite" });
    const rangeForm = h(
      "form",
      { class: "row", onsubmit: applyRange },
      field(t("usage.from"), from).field,
      field(t("usage.to"), to).field,
      h("button", { type: "submit" }, t("usage.apply")),
      h("button", { type: "button", class: "secondary", onclick: exportCsv }, t("usage.export_csv")),
    );
    main.append(
      pageHeader(t("usage.title")),
      h("section", { class: "card page-section" }, h("h2", {}, t("usage.balance_title")), balanceBox),
      h("section", { class: "card page-section" }, h("h2", {}, t("usage.range_title")), rangeForm, rangeMessage, exportMessage),
      h("section", { class: "card page-section" }, h("h2", {}, t("usage.chart_title")), chartBox),
      h("section", { class: "page-section" }, h("h2", {}, t("usage.requests_title")), requestsBox),
      h("section", { class: "page-section" }, h("h2", {}, t("usage.ledger_title")), ledgerBox),
    );

    await Promise.all([loadBalance(), loadReport(), loadRequests(), loadLedger()]);
    return () => chart?.destroy();

    function applyRange(event) {
      event.preventDefault();
      fill(rangeMessage);
      if (from.value > to.value) return fill(rangeMessage, alertBox("error", t("usage.range_order")));
      if (daysBetween(from.value, to.value).length > MAX_DAYS) {
        return fill(rangeMessage, alertBox("error", t("usage.range_too_long", { days: MAX_DAYS })));
      }
      ctx.go(`usage?start=${from.value}&end=${to.value}`);
    }

    async function loadBalance() {
      try {
        const info = (await api("/v1/user/info")).data;
        fill(
          balanceBox,
          facts([
            [t("usage.balance"), money(info.balance_micros)],
            [t("usage.available"), money(info.available_micros)],
            [t("usage.held"), money(info.held_micros)],
          ]),
          h("small", { class: "hint" }, t("usage.available_hint")),
        );
      } catch (err) {
        fill(balanceBox, errorBox(err));
      }
    }

    async function loadReport() {
      try {
        report = await api("/v1/usage", { query: { start_date: start, end_date: end } });
        showReport();
      } catch (err) {
        fill(chartBox, errorBox(err));
      }
    }

    function showReport() {
      const rows = report.data;
      const sum = (key) => rows.reduce((total, row) => total + row[key], 0);
      const totals = facts([
        [t("usage.total_requests"), number(sum("num_requests"))],
        [t("usage.total_prompt"), number(sum("prompt_tokens"))],
        [t("usage.total_completion"), number(sum("completion_tokens"))],
        [t("usage.total_tokens"), number(sum("total_tokens"))],
        [t("usage.total_cost"), money(report.total_cost_micros)],
      ]);
      const panelId = newId("panel");
      const tabs = ["tokens", "spend"].map((name) =>
        h(
          "button",
          { type: "button", role: "tab", id: `${panelId}-${name}`, "aria-controls": panelId, "aria-selected": String(name === metric), onclick: () => switchTo(name) },
          t(`usage.tab_${name}`),
        ),
      );
      const canvas = h("canvas", { role: "img", class: "usage-chart" });
      const panel = h("div", { role: "tabpanel", id: panelId, "aria-labelledby": `${panelId}-${metric}` }, h("div", { class: "chart-frame" }, canvas));
      const dataTable = scrollTable(
        [
          { label: t("usage.col_date"), cell: (r) => r.date },
          { label: t("usage.col_model"), cell: (r) => r.model },
          { label: t("usage.col_requests"), cell: (r) => number(r.num_requests), class: "num" },
          { label: t("usage.col_prompt"), cell: (r) => number(r.prompt_tokens), class: "num" },
          { label: t("usage.col_completion"), cell: (r) => number(r.completion_tokens), class: "num" },
          { label: t("usage.col_total"), cell: (r) => number(r.total_tokens), class: "num" },
          { label: t("usage.col_cost"), cell: (r) => money(r.cost_micros), class: "num" },
        ],
        rows,
        { caption: t("usage.table_caption", { start, end }), empty: t("usage.no_usage") },
      );
      fill(chartBox, totals, h("div", { class: "tabs", role: "tablist", "aria-label": t("usage.chart_title") }, tabs), panel, dataTable);
      draw(canvas);

      function switchTo(name) {
        metric = name;
        for (const tab of tabs) tab.setAttribute("aria-selected", String(tab.id.endsWith(`-${name}`)));
        panel.setAttribute("aria-labelledby", `${panelId}-${name}`);
        draw(canvas);
      }
    }

    function draw(canvas) {
      const days = daysBetween(start, end);
      const spend = metric === "spend";
      const valueOf = spend ? (row) => row.cost_micros / 1e6 : (row) => row.total_tokens;
      const series = seriesByModel(report.data, days, valueOf);
      const total = series.reduce((all, s) => all + s.values.reduce((a, b) => a + b, 0), 0);
      const fmt = spend ? (v) => money(Math.round(v * 1e6)) : (v) => number(v);
      const byModel = series.map((s) => `${s.label} ${fmt(s.values.reduce((a, b) => a + b, 0))}`).join("; ");
      canvas.setAttribute(
        "aria-label",
        t(spend ? "usage.chart_spend_label" : "usage.chart_tokens_label", { start, end, total: fmt(total), models: byModel || t("common.none") }),
      );
      chart?.destroy();
      chart = null;
      if (!chartsAvailable()) return;
      chart = stackedBars(canvas, { labels: days, series, yTitle: t(spend ? "usage.axis_spend" : "usage.axis_tokens"), format: fmt });
    }

    function loadRequests() {
      const status = (r) =>
        h("span", { class: `badge ${r.status === "ok" ? "badge-ok" : "badge-bad"}` }, t(`usage.status_${r.status}`));
      const tokens = (r) =>
        h("span", {}, number(r.total_tokens), " ", h("small", { class: "muted" }, `(${number(r.prompt_tokens)} + ${number(r.completion_tokens)})`));
      const columns = [
        { label: t("usage.col_time"), cell: (r) => dateTime(r.created_at) },
        { label: t("usage.col_model"), cell: (r) => r.model },
        { label: t("usage.col_key"), cell: (r) => h("code", {}, `${r.key_prefix}…`) },
        { label: t("usage.col_tokens"), cell: tokens, class: "num" },
        { label: t("usage.col_cost"), cell: (r) => money(r.cost_micros), class: "num" },
        { label: t("usage.col_latency"), cell: (r) => duration(r.latency_ms), class: "num" },
        { label: t("usage.col_status"), cell: status },
      ];
      const query = { start_date: start, end_date: end, limit: PAGE };
      return pagedTable(requestsBox, columns, { caption: t("usage.requests_caption"), empty: t("usage.no_requests") }, (after) =>
        api("/v1/usage/requests", { query: { ...query, after } }),
      );
    }

    function loadLedger() {
      const details = (e) => [e.note, e.model ? t("usage.charge_for", { model: e.model }) : null].filter(Boolean).join(" · ") || "—";
      const columns = [
        { label: t("usage.col_time"), cell: (e) => dateTime(e.created_at) },
        { label: t("usage.col_kind"), cell: (e) => t(`usage.kind_${e.kind}`) },
        { label: t("usage.col_amount"), cell: (e) => money(e.amount_micros), class: "num" },
        { label: t("usage.col_details"), cell: details },
      ];
      return pagedTable(ledgerBox, columns, { caption: t("usage.ledger_caption"), empty: t("usage.no_ledger") }, (after) =>
        api("/v1/ledger", { query: { limit: PAGE, after } }),
      );
    }

    // The download goes through fetch (the session cookie authenticates it, as every call) and a Blob, so
    // no private export endpoint is needed: this is GET /v1/usage?format=csv, as a script would call it.
    async function exportCsv() {
      fill(exportMessage);
      try {
        const response = await request("/v1/usage", {
          query: { start_date: start, end_date: end, format: "csv" },
          headers: { Accept: "text/csv" },
        });
        const url = URL.createObjectURL(await response.blob());
        const link = h("a", { href: url, download: `tokenmill-usage-${start}-${end}.csv`, hidden: true });
        document.body.append(link);
        link.click();
        link.remove();
        setTimeout(() => URL.revokeObjectURL(url), 60_000); // after the browser has taken the file
        fill(exportMessage, alertBox("success", t("usage.exported")));
      } catch (err) {
        fill(exportMessage, errorBox(err));
      }
    }
  },
};
