// Compare: models side by side (a column each) from GET /v1/catalog/compare, and what a request of the shape
// the user types costs on each: the server computes it with billing's own formula, so the figure here is the
// one the invoice will show. The models and the shape live in the URL (#/compare?models=a,b&input=1000).
import { api } from "../api.js";
import { field, h } from "../dom.js";
import { duration, money, number } from "../format.js";
import { t } from "../i18n.js";
import { alertBox, errorBox, loading, pageHeader } from "../ui.js";
import { COMPARE_MAX, COMPARE_MIN, stateBadge } from "./square.js";

const TYPING_MS = 300;
const DEFAULT_SHAPE = { input: "1000", output: "500", requests: "1" };
const WHOLE = /^\d{1,12}$/;

function readModels(params) {
  return [...new Set((params.get("models") || "").split(",").map((s) => s.trim()).filter(Boolean))];
}

function readShape(params) {
  const shape = {};
  for (const [key, fallback] of Object.entries(DEFAULT_SHAPE)) {
    const value = params.get(key);
    shape[key] = value !== null && WHOLE.test(value) ? value : fallback;
  }
  return shape;
}

function address(models, shape) {
  const rest = new URLSearchParams(shape).toString();
  return `compare?models=${models.map(encodeURIComponent).join(",")}&${rest}`;
}

const yesNo = (flag) => (flag ? h("span", { class: "badge badge-free" }, t("compare.yes")) : t("compare.no"));

/** The attribute rows: [label, cell(model)]. The cost rows come after these, when a shape is given. */
function attributeRows() {
  const live = (fn) => (m) => (m.live.has_traffic ? fn(m.live) : t("square.no_traffic"));
  return [
    [t("square.provider"), (m) => m.provider],
    [t("square.task"), (m) => (["chat", "embedding"].includes(m.task) ? t(`square.task_${m.task}`) : m.task)],
    [t("square.context"), (m) => (m.context_length == null ? t("square.unknown") : number(m.context_length))],
    [t("square.input_price"), (m) => money(m.pricing.input_micros_per_mtok)],
    [t("square.output_price"), (m) => money(m.pricing.output_micros_per_mtok)],
    [t("compare.free"), (m) => yesNo(m.pricing.free)],
    [t("compare.speed"), live((l) => (l.output_tokens_per_s_p50 == null ? "—" : number(l.output_tokens_per_s_p50, 1)))],
    [t("compare.ttft"), live((l) => (l.ttft_p50_s == null ? "—" : duration(l.ttft_p50_s * 1000)))],
    [t("compare.state"), (m) => stateBadge(m.state)],
    [t("compare.license"), (m) => m.license || "—"],
    [t("square.tags"), (m) => (m.tags.length ? m.tags.join(", ") : "—")],
    [t("compare.description"), (m) => h("span", { class: "model-description" }, m.description || "—")],
  ];
}

/** The side-by-side table; `cheapest` holds the ids whose request costs least (marked in words too). */
function comparisonTable(models, shape, cheapest, onRemove) {
  const costCell = (micros, m) => [money(micros), cheapest.has(m.id) ? h("span", { class: "badge badge-cheapest" }, t("compare.cheapest")) : null];
  const rows = attributeRows();
  if (models[0]?.request_cost) {
    const n = Number(shape.requests);
    rows.push([t("compare.cost_one"), (m) => costCell(m.request_cost.cost_micros, m)]);
    if (n !== 1) rows.push([t("compare.cost_n", { n: number(n) }), (m) => costCell(m.request_cost.cost_micros * n, m)]);
  }
  const head = h(
    "tr",
    {},
    h("th", { scope: "col" }, t("compare.attribute")),
    models.map((m) =>
      h(
        "th",
        { scope: "col", class: cheapest.has(m.id) ? "cheapest" : null },
        h("span", { class: "compare-name" }, m.display_name),
        h("span", { class: "mono model-id" }, m.id),
        h("button", { type: "button", class: "secondary small", "aria-label": t("compare.remove_named", { name: m.display_name }), onclick: () => onRemove(m.id) }, t("compare.remove")),
      ),
    ),
  );
  const body = rows.map(([label, cell]) =>
    h("tr", {}, h("th", { scope: "row" }, label), models.map((m) => h("td", { class: cheapest.has(m.id) ? "cheapest" : null }, cell(m)))),
  );
  return h("div", { class: "table-wrap" }, h("table", { class: "compare-table" }, h("caption", {}, t("compare.caption")), h("thead", {}, head), h("tbody", {}, body)));
}

/** The ids of the models a request costs least on; none when every model costs the same. */
function cheapestOf(models) {
  if (!models[0]?.request_cost) return new Set();
  const costs = models.map((m) => m.request_cost.cost_micros);
  const least = Math.min(...costs);
  if (costs.every((c) => c === least)) return new Set();
  return new Set(models.filter((m) => m.request_cost.cost_micros === least).map((m) => m.id));
}

export default {
  title: "compare.title",
  async render(main, ctx) {
    const ids = readModels(ctx.params);
    const shape = readShape(ctx.params);
    const back = h("a", { href: "#/square" }, t("compare.back"));
    main.append(pageHeader(t("compare.title"), back), loading());

    let everything;
    try {
      everything = (await api("/v1/catalog/models", { query: { limit: 100 } })).data;
    } catch (err) {
      main.lastChild.replaceWith(errorBox(err));
      return;
    }
    main.lastChild.remove();

    const others = everything.filter((m) => !ids.includes(m.id));
    const adder = h("select", {}, others.map((m) => h("option", { value: m.id }, `${m.display_name} (${m.id})`)));
    const full = ids.length >= COMPARE_MAX;
    const addForm = h(
      "form",
      { class: "row add-model", onsubmit: (e) => (e.preventDefault(), adder.value && ctx.go(address([...ids, adder.value], shape))) },
      field(t("compare.add_label"), adder).field,
      h("button", { type: "submit", class: "secondary", disabled: full || others.length === 0 }, t("compare.add")),
      full ? h("p", { class: "muted" }, t("compare.full", { max: COMPARE_MAX })) : null,
    );
    if (others.length === 0) adder.disabled = true;

    if (ids.length < COMPARE_MIN) {
      main.append(
        alertBox("info", t("compare.too_few", { min: COMPARE_MIN })),
        h("p", {}, h("a", { href: "#/square" }, t("compare.pick_in_square"))),
        h("section", { class: "card" }, h("h2", {}, t("compare.add_title")), addForm),
      );
      return;
    }

    let typing = null;
    let asked = 0; // answers to an older shape are dropped: the newest one wins
    const inputs = {};
    const errors = h("div", {});
    const shapeForm = h("form", { class: "card shape-form", onsubmit: (e) => (e.preventDefault(), changed()) }, h("h2", {}, t("compare.shape_title")), h("p", { class: "muted" }, t("compare.shape_intro")));
    const shapeRow = h("div", { class: "row" });
    for (const key of Object.keys(DEFAULT_SHAPE)) {
      inputs[key] = h("input", { type: "number", min: key === "requests" ? "1" : "0", step: "1", inputmode: "numeric", value: shape[key], class: "count-input" });
      inputs[key].addEventListener("input", () => {
        clearTimeout(typing);
        typing = setTimeout(changed, TYPING_MS);
      });
      shapeRow.append(field(t(`compare.${key}`), inputs[key]).field);
    }
    shapeForm.append(shapeRow, errors);
    const verdict = h("p", { role: "status", "aria-live": "polite", class: "verdict" });
    const tableBox = h("div", {}, loading());
    main.append(
      shapeForm,
      h("h2", {}, t("compare.side_by_side")),
      verdict,
      tableBox,
      h("section", { class: "card add-section" }, h("h2", {}, t("compare.add_title")), addForm),
    );

    const remove = (id) => ctx.go(address(ids.filter((x) => x !== id), shape));

    async function load() {
      const mine = ++asked;
      try {
        const query = { models: ids.join(","), input_tokens: shape.input, output_tokens: shape.output };
        const models = (await api("/v1/catalog/compare", { query })).data;
        if (mine !== asked) return;
        const cheapest = cheapestOf(models);
        tableBox.replaceChildren(comparisonTable(models, shape, cheapest, remove));
        const names = models.filter((m) => cheapest.has(m.id)).map((m) => m.display_name);
        verdict.textContent = names.length ? t("compare.verdict", { names: names.join(", ") }) : t("compare.verdict_same");
      } catch (err) {
        if (mine === asked) tableBox.replaceChildren(errorBox(err));
      }
    }

    /** Read the shape the user typed; a value that is not a whole number is named, not sent. */
    function changed() {
      const bad = Object.keys(DEFAULT_SHAPE).filter((key) => !WHOLE.test(inputs[key].value.trim()) || (key === "requests" && Number(inputs[key].value) < 1));
      for (const key of Object.keys(DEFAULT_SHAPE)) inputs[key].setAttribute("aria-invalid", String(bad.includes(key)));
      if (bad.length) {
        errors.replaceChildren(alertBox("error", t("compare.bad_shape", { fields: bad.map((key) => t(`compare.${key}`)).join(", ") })));
        return;
      }
      errors.replaceChildren();
      for (const key of Object.keys(DEFAULT_SHAPE)) shape[key] = String(Number(inputs[key].value.trim()));
      history.replaceState(history.state, "", `#/${address(ids, shape)}`);
      load();
    }

    await load();
    return () => {
      clearTimeout(typing);
      asked += 1;
    };
  },
};
