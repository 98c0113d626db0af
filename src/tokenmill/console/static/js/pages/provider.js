// The provider's page: the organization's own listings (catalog entries that carry `yours`), each editable
// through PATCH /v1/catalog/models/{id} with exactly what that endpoint accepts (description, prices,
// visibility and who it is shared with), and the earnings per model and UTC day (GET /v1/usage?role=provider).
import { api } from "../api.js";
import { field, fill, h, select, table } from "../dom.js";
import { money, number } from "../format.js";
import { t } from "../i18n.js";
import { alertBox, describeError, errorBox, loading, pageHeader } from "../ui.js";
import { parseUnits, section, stateBadge, unitsText } from "../admin_common.js";

const PAGE = 100; // the catalog's largest page
const DEFAULT_DAYS = 30;
const ISO_DAY = /^\d{4}-\d{2}-\d{2}$/;

function isoDay(date) {
  return date.toISOString().slice(0, 10);
}

function daysAgo(days) {
  const date = new Date();
  date.setUTCDate(date.getUTCDate() - days);
  return isoDay(date);
}

/** Every catalog entry the caller may see, page by page, keeping the caller's own. */
async function ownListings() {
  const own = [];
  for (let offset = 0; ; offset += PAGE) {
    const page = await api("/v1/catalog/models", { query: { limit: PAGE, offset } });
    own.push(...page.data.filter((m) => m.yours));
    if (offset + PAGE >= page.total || page.data.length === 0) return own;
  }
}

function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.map(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]));
}

function listingFacts(listing) {
  const yours = listing.yours;
  return facts([
    [t("provider.status"), stateBadge(t(`provider.status_${yours.status}`), yours.status === "published" || null)],
    [t("provider.visibility"), t(`provider.visibility_${yours.visibility}`)],
    [t("provider.price"), t("provider.price_value", { input: listing.pricing.input_per_1m, output: listing.pricing.output_per_1m })],
    [t("provider.fee"), t("provider.fee_value", { percent: number(yours.platform_fee_bps / 100, 2) })],
  ]);
}

/** One listing: its facts and the edit form. */
function listingCard(initial) {
  let listing = initial;
  const factsBox = h("div", {}, listingFacts(listing));
  const message = h("div", { "aria-live": "polite" });
  const description = h("textarea", { rows: 4, maxlength: 4000, value: listing.description });
  const input = h("input", { type: "text", inputmode: "decimal", autocomplete: "off", value: unitsText(listing.pricing.input_micros_per_mtok) });
  const output = h("input", { type: "text", inputmode: "decimal", autocomplete: "off", value: unitsText(listing.pricing.output_micros_per_mtok) });
  const visibility = select(["public", "private", "shared"].map((v) => [v, t(`provider.visibility_${v}`)]));
  visibility.value = listing.yours.visibility;
  const sharedWith = h("input", { type: "text", autocomplete: "off", value: listing.yours.shared_with.join(", ") });
  const sharedField = field(t("provider.shared_with"), sharedWith, t("provider.shared_with_hint")).field;
  const controls = { description, pricing: [input, output], visibility, shared_with: sharedWith };
  const save = h("button", { type: "submit" }, t("common.save"));
  const showShared = () => (sharedField.hidden = visibility.value !== "shared");
  visibility.addEventListener("change", showShared);
  showShared();
  const priceLabels = [t("provider.input_price"), t("provider.output_price")];

  const form = h(
    "form",
    { class: "stack", onsubmit: submit },
    field(t("provider.description"), description).field,
    h("div", { class: "grid" }, field(priceLabels[0], input, t("provider.price_hint")).field, field(priceLabels[1], output, t("provider.price_hint")).field),
    h("div", { class: "grid" }, field(t("provider.visibility"), visibility).field, sharedField),
    h("div", { class: "row" }, save),
    message,
  );

  async function submit(event) {
    event.preventDefault();
    fill(message);
    for (const control of [description, input, output, visibility, sharedWith]) control.removeAttribute("aria-invalid");
    let body;
    try {
      body = changes();
    } catch (err) {
      return fill(message, alertBox("error", err.message));
    }
    if (Object.keys(body).length === 0) return fill(message, alertBox("info", t("provider.no_changes")));
    save.disabled = true;
    try {
      listing = await api(`/v1/catalog/models/${encodeURIComponent(listing.id)}`, { method: "PATCH", body });
      fill(factsBox, listingFacts(listing));
      fill(message, alertBox("success", t("provider.saved")));
    } catch (err) {
      markInvalid(err.param);
      // The API's message usually names the field already; say which one only when it does not.
      const text = describeError(err);
      const where = err.param && !text.includes(err.param) ? t("provider.error_field", { field: err.param }) : "";
      fill(message, alertBox("error", `${where}${text}`));
    } finally {
      save.disabled = false;
    }
  }

  /** Only what differs from the listing as last saved: an unchanged price is not written again. */
  function changes() {
    const body = {};
    if (description.value !== listing.description) body.description = description.value;
    const prices = [input, output].map((control, i) => {
      try {
        return parseUnits(control.value);
      } catch (err) {
        control.setAttribute("aria-invalid", "true");
        throw new Error(`${priceLabels[i]}: ${err.message}`);
      }
    });
    const old = listing.pricing;
    if (prices[0] !== old.input_micros_per_mtok || prices[1] !== old.output_micros_per_mtok) {
      body.pricing = { input_micros_per_mtok: prices[0], output_micros_per_mtok: prices[1] };
    }
    if (visibility.value !== listing.yours.visibility) body.visibility = visibility.value;
    if (visibility.value === "shared") {
      const ids = sharedWith.value.split(/[\s,]+/).filter(Boolean);
      if (ids.join(",") !== listing.yours.shared_with.join(",")) body.shared_with = ids;
    }
    return body;
  }

  function markInvalid(param) {
    const name = (param || "").split(/[.[]/)[0]; // "pricing.input_micros_per_mtok", "shared_with[0]"
    for (const control of [controls[name]].flat()) control?.setAttribute("aria-invalid", "true");
  }

  return h(
    "article",
    { class: "card provider-listing" },
    h("h3", {}, listing.display_name),
    h("p", { class: "model-id" }, h("code", {}, listing.id)),
    factsBox,
    form,
  );
}

export default {
  title: "provider.title",
  async render(main) {
    const listingsBox = h("div", {}, loading());
    const earningsBox = h("div", { class: "provider-earnings" }, loading());
    const from = h("input", { type: "date", value: daysAgo(DEFAULT_DAYS - 1), required: true });
    const to = h("input", { type: "date", value: isoDay(new Date()), required: true });
    const rangeForm = h(
      "form",
      {
        class: "row",
        onsubmit: (event) => {
          event.preventDefault();
          loadEarnings();
        },
      },
      field(t("provider.from"), from).field,
      field(t("provider.to"), to).field,
      h("button", { type: "submit" }, t("provider.show")),
    );
    main.append(
      pageHeader(t("provider.title")),
      h("p", { class: "muted" }, t("provider.intro")),
      h("section", { class: "page-section" }, h("h2", {}, t("provider.listings_title")), listingsBox),
      section(t("provider.earnings_title"), rangeForm, earningsBox),
    );
    await Promise.all([loadListings(), loadEarnings()]);

    async function loadListings() {
      try {
        const own = await ownListings();
        if (own.length === 0) {
          fill(listingsBox, alertBox("info", t("provider.none")));
          return;
        }
        fill(listingsBox, h("p", { class: "muted" }, t("provider.status_note")), h("div", { class: "provider-listings" }, own.map(listingCard)));
      } catch (err) {
        fill(listingsBox, errorBox(err));
      }
    }

    async function loadEarnings() {
      if (!ISO_DAY.test(from.value) || !ISO_DAY.test(to.value) || from.value > to.value) {
        fill(earningsBox, alertBox("error", t("provider.range_invalid")));
        return;
      }
      const start = from.value;
      const end = to.value;
      fill(earningsBox, loading());
      try {
        const report = await api("/v1/usage", { query: { role: "provider", start_date: start, end_date: end } });
        fill(earningsBox, earnings(report, start, end));
      } catch (err) {
        fill(earningsBox, errorBox(err));
      }
    }
  },
};

function earnings(report, start, end) {
  const rows = report.data;
  const fees = rows.reduce((sum, r) => sum + (r.platform_fee_micros || 0), 0);
  const totals = facts([
    [t("provider.total_requests"), number(rows.reduce((sum, r) => sum + r.num_requests, 0))],
    [t("provider.total_sales"), money(report.total_cost_micros)],
    [t("provider.total_fee"), money(fees)],
    [t("provider.total_earnings"), money(report.total_earnings_micros ?? 0)],
  ]);
  const columns = [
    { label: t("provider.col_date"), cell: (r) => r.date },
    { label: t("provider.col_model"), cell: (r) => r.model },
    { label: t("provider.col_requests"), cell: (r) => number(r.num_requests), class: "num" },
    { label: t("provider.col_tokens"), cell: (r) => number(r.total_tokens), class: "num" },
    { label: t("provider.col_sales"), cell: (r) => money(r.cost_micros), class: "num" },
    { label: t("provider.col_fee"), cell: (r) => money(r.platform_fee_micros ?? 0), class: "num" },
    { label: t("provider.col_earnings"), cell: (r) => money(r.earnings_micros ?? 0), class: "num" },
  ];
  return h(
    "div",
    { class: "stack" },
    totals,
    table(columns, rows, { caption: t("provider.earnings_caption", { start, end }), empty: t("provider.no_sales") }),
  );
}
