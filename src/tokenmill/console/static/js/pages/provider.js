// The provider's page: the organization's own listings in every status (GET /v1/provider/listings), each
// edited through PATCH /v1/catalog/models/{id} with exactly what that endpoint accepts (display name, tags,
// description, prices, visibility and who it is shared with; publishing a draft, retiring a published
// listing), and the earnings per model and UTC day (GET /v1/usage?role=provider). A retired listing is
// read-only: only the server's operator brings it back.
import { api } from "../api.js";
import { field, fill, h, select, table } from "../dom.js";
import { money, number } from "../format.js";
import { t } from "../i18n.js";
import { alertBox, describeError, errorBox, loading, pageHeader } from "../ui.js";
import { parseUnits, section, stateBadge, unitsText } from "../admin_common.js";

const DEFAULT_DAYS = 30;
const ISO_DAY = /^\d{4}-\d{2}-\d{2}$/;
const STATUS_TONE = { published: true, draft: null, retired: false }; // the badge's text always says it too

function isoDay(date) {
  return date.toISOString().slice(0, 10);
}

function daysAgo(days) {
  const date = new Date();
  date.setUTCDate(date.getUTCDate() - days);
  return isoDay(date);
}

function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.map(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]));
}

function listingFacts(listing) {
  const yours = listing.yours;
  return facts([
    [t("provider.status"), stateBadge(t(`provider.status_${yours.status}`), STATUS_TONE[yours.status])],
    [t("provider.visibility"), t(`provider.visibility_${yours.visibility}`)],
    [t("provider.price"), t("provider.price_value", { input: listing.pricing.input_per_1m, output: listing.pricing.output_per_1m })],
    [t("provider.fee"), t("provider.fee_value", { percent: number(yours.platform_fee_bps / 100, 2) })],
    [t("provider.tags"), listing.tags.length ? listing.tags.join(", ") : t("common.none")],
  ]);
}

function tagList(text) {
  return text.split(",").map((tag) => tag.trim()).filter(Boolean);
}

/** The API's refusal in words; the message usually names the field already, say which one only if not. */
function refusal(err) {
  const text = describeError(err);
  return err.param && !text.includes(err.param) ? `${t("provider.error_field", { field: err.param })}${text}` : text;
}

/** One listing: a heading, its facts, and what its status allows (the edit form and Publish or Retire). */
function listingCard(initial) {
  let listing = initial;
  const heading = h("h3", { tabindex: -1 }, listing.display_name);
  const body = h("div");
  // Outside `body`, so it survives a re-render and screen readers announce what it says.
  const message = h("div", { "aria-live": "polite" });

  /** PATCH the listing; the answer is the listing as saved. Returns false (and says why) when refused. */
  async function patch(changes, markInvalid) {
    try {
      listing = await api(`/v1/catalog/models/${encodeURIComponent(listing.id)}`, { method: "PATCH", body: changes });
      heading.textContent = listing.display_name;
      return true;
    } catch (err) {
      markInvalid?.(err.param);
      fill(message, alertBox("error", refusal(err)));
      return false;
    }
  }

  async function setStatus(status, done) {
    fill(message);
    body.querySelectorAll(".provider-lifecycle button").forEach((b) => (b.disabled = true));
    if (await patch({ status })) fill(message, alertBox("success", t(done)));
    // A retired listing loses its form; publishing keeps the form and whatever is typed in it.
    if (listing.yours.status === "retired") render();
    else refresh();
    heading.focus(); // the button pressed is gone: keep the keyboard user in this card
  }

  /** The facts and the lifecycle buttons (named after the listing) follow the listing as saved. */
  function refresh() {
    const [oldFacts, oldLifecycle] = body.children;
    oldFacts.replaceWith(listingFacts(listing));
    oldLifecycle.replaceWith(lifecycle(listing.yours.status));
  }

  function render() {
    const yours = listing.yours;
    if (yours.status === "retired") {
      fill(body, listingFacts(listing), h("p", { class: "model-description" }, listing.description), alertBox("info", t("provider.retired_note")));
      return;
    }
    fill(body, listingFacts(listing), lifecycle(yours.status), editForm());
  }

  function lifecycle(status) {
    const box = h("div", { class: "row provider-lifecycle" });
    const name = listing.display_name;
    if (status === "draft") {
      const publish = h("button", { type: "button", "aria-label": t("provider.publish_named", { name }), onclick: () => setStatus("published", "provider.published") }, t("provider.publish"));
      return fill(box, publish, h("small", { class: "hint" }, t("provider.publish_hint")));
    }
    // Retiring cannot be undone by the provider, so the first click only asks (as revoking a key does).
    const ask = () => {
      const confirm = h("button", { type: "button", class: "danger small", onclick: () => setStatus("retired", "provider.retired_done") }, t("provider.confirm_retire"));
      const cancel = h("button", { type: "button", class: "secondary small", onclick: reset }, t("common.cancel"));
      fill(box, h("span", {}, t("provider.retire_question", { name })), confirm, cancel);
      confirm.focus();
    };
    const reset = () => {
      const retire = h("button", { type: "button", class: "danger", "aria-label": t("provider.retire_named", { name }), onclick: ask }, t("provider.retire"));
      fill(box, retire, h("small", { class: "hint" }, t("provider.retire_hint")));
      return retire;
    };
    reset();
    return box;
  }

  function editForm() {
    const yours = listing.yours;
    const displayName = h("input", { type: "text", maxlength: 200, autocomplete: "off", value: listing.display_name });
    const tags = h("input", { type: "text", autocomplete: "off", value: listing.tags.join(", ") });
    const description = h("textarea", { rows: 4, maxlength: 4000, value: listing.description });
    const input = h("input", { type: "text", inputmode: "decimal", autocomplete: "off", value: unitsText(listing.pricing.input_micros_per_mtok) });
    const output = h("input", { type: "text", inputmode: "decimal", autocomplete: "off", value: unitsText(listing.pricing.output_micros_per_mtok) });
    const visibility = select(["public", "private", "shared"].map((v) => [v, t(`provider.visibility_${v}`)]));
    visibility.value = yours.visibility;
    const sharedWith = h("input", { type: "text", autocomplete: "off", value: yours.shared_with.join(", ") });
    const sharedField = field(t("provider.shared_with"), sharedWith, t("provider.shared_with_hint")).field;
    const controls = { display_name: displayName, tags, description, pricing: [input, output], visibility, shared_with: sharedWith };
    const save = h("button", { type: "submit" }, t("common.save"));
    const showShared = () => (sharedField.hidden = visibility.value !== "shared");
    visibility.addEventListener("change", showShared);
    showShared();
    const priceLabels = [t("provider.input_price"), t("provider.output_price")];

    /** Only what differs from the listing as last saved: an unchanged price is not written again. */
    function changes() {
      const body = {};
      if (displayName.value.trim() !== listing.display_name) body.display_name = displayName.value;
      const newTags = tagList(tags.value);
      if (newTags.join(",") !== listing.tags.join(",")) body.tags = newTags;
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
      const name = (param || "").split(/[.[]/)[0]; // "pricing.input_micros_per_mtok", "shared_with[0]", "tags[2]"
      for (const control of [controls[name]].flat()) control?.setAttribute("aria-invalid", "true");
    }

    async function submit(event) {
      event.preventDefault();
      fill(message);
      for (const control of Object.values(controls).flat()) control.removeAttribute("aria-invalid");
      let edit;
      try {
        edit = changes();
      } catch (err) {
        return fill(message, alertBox("error", err.message));
      }
      if (Object.keys(edit).length === 0) return fill(message, alertBox("info", t("provider.no_changes")));
      save.disabled = true;
      if (await patch(edit, markInvalid)) {
        refresh(); // the form stays as it is, focus too
        displayName.value = listing.display_name; // as the API stored them: trimmed, tags without repeats
        tags.value = listing.tags.join(", ");
        fill(message, alertBox("success", t("provider.saved")));
      }
      save.disabled = false;
    }

    return h(
      "form",
      { class: "stack", onsubmit: submit },
      h("div", { class: "grid" }, field(t("provider.display_name"), displayName).field, field(t("provider.tags"), tags, t("provider.tags_hint")).field),
      field(t("provider.description"), description).field,
      h("div", { class: "grid" }, field(priceLabels[0], input, t("provider.price_hint")).field, field(priceLabels[1], output, t("provider.price_hint")).field),
      h("div", { class: "grid" }, field(t("provider.visibility"), visibility).field, sharedField),
      h("div", { class: "row" }, save),
    );
  }

  render();
  return h("article", { class: "card provider-listing", dataset: { model: listing.id } }, heading, h("p", { class: "model-id" }, h("code", {}, listing.id)), body, message);
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
        const own = (await api("/v1/provider/listings")).data;
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
