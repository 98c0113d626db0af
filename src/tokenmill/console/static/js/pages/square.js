// The model square: every model the caller may call, as cards, from GET /v1/catalog/models. The filters
// live in the URL fragment's query (#/square?q=pro&free=1), so a filtered view can be shared and survives a
// reload; the live figures are read again every few seconds while the page is open.
import { api } from "../api.js";
import { field, fill, h, select } from "../dom.js";
import { duration, money, number } from "../format.js";
import { t } from "../i18n.js";
import { alertBox, errorBox, loading, pageHeader } from "../ui.js";

const PAGE_SIZE = 20;
const REFRESH_MS = 10_000;
const TYPING_MS = 300; // wait for a pause in typing before asking the server
const SORTS = ["name", "price", "-price", "speed", "context"];
const TASKS = ["chat", "embedding"];
const GOOD_STATES = new Set(["loaded"]);
const BAD_STATES = new Set(["stopped", "failed"]);
export const COMPARE_MIN = 2;
export const COMPARE_MAX = 4;

// The models ticked for comparison outlive one render (a language switch, a trip to compare and back).
const picked = new Set();

/** The filters as the fragment holds them: a plain object of strings ("" when unset). */
function readFilters(params) {
  const get = (key) => params.get(key) ?? "";
  const sort = SORTS.includes(get("sort")) ? get("sort") : "name";
  const offset = Math.max(0, Number.parseInt(get("offset"), 10) || 0);
  return { q: get("q"), task: get("task"), tag: get("tag"), provider: get("provider"), free: get("free") === "1" ? "1" : "", max_price: get("max_price"), sort, offset };
}

/** Write the filters into the address without a navigation (the shell would re-render on hashchange). */
function writeFilters(filters) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(filters)) {
    if (value === "" || (key === "sort" && value === "name") || (key === "offset" && !value)) continue;
    params.set(key, String(value));
  }
  const query = params.toString();
  history.replaceState(history.state, "", `#/square${query ? `?${query}` : ""}`);
}

function apiQuery(filters) {
  return {
    q: filters.q.trim() || null,
    task: filters.task || null,
    tag: filters.tag || null,
    provider: filters.provider || null,
    free: filters.free ? "true" : null,
    max_output_price: filters.max_price.trim() || null,
    sort: filters.sort,
    limit: PAGE_SIZE,
    offset: filters.offset,
  };
}

function taskLabel(task) {
  return TASKS.includes(task) ? t(`square.task_${task}`) : task;
}

export function stateBadge(state) {
  const kind = GOOD_STATES.has(state) ? " badge-ok" : BAD_STATES.has(state) ? " badge-bad" : "";
  const known = ["loaded", "loading", "unloaded", "draining", "stopped", "failed"].includes(state);
  return h("span", { class: `badge${kind}` }, known ? t(`square.state_${state}`) : state);
}

/** "12.3 tokens/s · TTFT 180 ms", or that nothing was measured in the window. */
export function liveText(live) {
  if (!live.has_traffic) return t("square.no_traffic");
  const speed = live.output_tokens_per_s_p50 == null ? "—" : number(live.output_tokens_per_s_p50, 1);
  const ttft = live.ttft_p50_s == null ? "—" : duration(live.ttft_p50_s * 1000);
  return t("square.live_value", { speed, ttft });
}

function tryLink(model) {
  const page = model.task === "embedding" ? "embeddings" : "playground";
  const label = model.task === "embedding" ? t("square.try_embeddings") : t("square.try_playground");
  return h("a", { href: `#/${page}?model=${encodeURIComponent(model.id)}`, class: "button-link" }, label);
}

/** One card; returns the nodes the live refresh rewrites, so a refresh never loses a tick or the focus. */
function card(model, onPick) {
  const { pricing, live } = model;
  const state = h("span", {}, stateBadge(model.state));
  const speed = h("dd", {}, liveText(live));
  const pick = h("input", { type: "checkbox", checked: picked.has(model.id), onchange: (e) => onPick(model.id, e.target.checked) });
  const facts = [
    [t("square.provider"), model.provider],
    [t("square.task"), taskLabel(model.task)],
    [t("square.context"), model.context_length == null ? t("square.unknown") : t("square.tokens", { n: number(model.context_length) })],
    [t("square.input_price"), money(pricing.input_micros_per_mtok)],
    [t("square.output_price"), money(pricing.output_micros_per_mtok)],
    [t("square.batch_price"), t("square.batch_price_value", { input: money(model.batch_pricing.input_micros_per_mtok), output: money(model.batch_pricing.output_micros_per_mtok) })],
  ];
  const view = h(
    "article",
    { class: "card model-card", dataset: { model: model.id } },
    h(
      "div",
      { class: "model-card-head" },
      h("h2", {}, model.display_name),
      h("div", { class: "model-card-badges" }, pricing.free ? h("span", { class: "badge badge-free" }, t("square.free")) : null, state),
    ),
    h("p", { class: "mono model-id" }, model.id),
    model.tags.length ? h("ul", { class: "tag-list", "aria-label": t("square.tags") }, model.tags.map((tag) => h("li", { class: "badge" }, tag))) : null,
    model.description ? h("p", { class: "model-description" }, model.description) : null,
    h(
      "dl",
      { class: "facts" },
      facts.map(([label, value]) => [h("dt", {}, label), h("dd", {}, value)]),
      h("dt", {}, t("square.live", { minutes: number(live.window_s / 60) })),
      speed,
    ),
    h("div", { class: "model-card-actions" }, tryLink(model), h("label", { class: "check" }, pick, t("square.compare_pick"))),
  );
  return { view, pick, update: (m) => (state.replaceChildren(stateBadge(m.state)), speed.replaceChildren(liveText(m.live))) };
}

export default {
  title: "square.title",
  async render(main, ctx) {
    const filters = readFilters(ctx.params);
    const compareButton = h("button", { type: "button", onclick: () => ctx.go(`compare?models=${[...picked].map(encodeURIComponent).join(",")}`) });
    const compareHint = h("span", { class: "muted compare-hint" });
    main.append(pageHeader(t("square.title"), compareHint, compareButton), h("p", { class: "muted" }, t("square.intro")), loading());

    // All callable models once: the tag and provider choices come from them.
    let everything;
    try {
      everything = (await api("/v1/catalog/models", { query: { limit: 100 } })).data;
    } catch (err) {
      main.lastChild.replaceWith(errorBox(err));
      return;
    }
    main.lastChild.remove();
    const distinct = (values) => [...new Set(values)].sort((a, b) => a.localeCompare(b));
    const any = ["", t("square.any")];

    const search = h("input", { type: "search", value: filters.q, placeholder: t("square.search_placeholder"), maxlength: 200 });
    const task = select([any, ...TASKS.map((x) => [x, taskLabel(x)])], {});
    const tag = select([any, ...distinct(everything.flatMap((m) => m.tags)).map((x) => [x, x])], {});
    const provider = select([any, ...distinct(everything.map((m) => m.provider)).map((x) => [x, x])], {});
    const sort = select(SORTS.map((x) => [x, t(`square.sort_${x.replace("-", "desc_")}`)]), {});
    const maxPrice = h("input", { type: "number", min: "0", step: "any", inputmode: "decimal", value: filters.max_price, class: "price-input" });
    const free = h("input", { type: "checkbox", checked: filters.free === "1" });
    task.value = filters.task;
    tag.value = filters.tag;
    provider.value = filters.provider;
    sort.value = filters.sort;

    const summary = h("p", { class: "muted", role: "status", "aria-live": "polite" });
    const results = h("div", { class: "square-results" });
    const stale = h("p", { class: "muted", role: "status" });
    const pager = h("div", { class: "row pager" });
    let cards = new Map(); // model id -> card
    let asked = 0; // answers to older questions are dropped: the newest filters win
    let typing = null;

    function updateCompare() {
      const n = picked.size;
      compareButton.textContent = t("square.compare_button", { n });
      compareButton.disabled = n < COMPARE_MIN || n > COMPARE_MAX;
      compareHint.textContent = n < COMPARE_MIN ? t("square.compare_hint", { min: COMPARE_MIN, max: COMPARE_MAX }) : "";
      for (const [id, c] of cards) c.pick.disabled = !picked.has(id) && n >= COMPARE_MAX;
    }

    function onPick(id, on) {
      if (on) picked.add(id);
      else picked.delete(id);
      updateCompare();
    }

    async function load() {
      const mine = ++asked;
      try {
        const page = await api("/v1/catalog/models", { query: apiQuery(filters) });
        if (mine === asked) show(page);
      } catch (err) {
        if (mine === asked) results.replaceChildren(errorBox(err));
      }
    }

    /** The same question again, only to update the figures on the cards already shown. */
    async function refreshLive() {
      const mine = asked;
      try {
        const page = await api("/v1/catalog/models", { query: apiQuery(filters) });
        if (mine !== asked) return;
        for (const m of page.data) cards.get(m.id)?.update(m);
        stale.textContent = "";
      } catch (err) {
        // Not an alert over the page: the cards stay readable, they are only as old as the last answer.
        stale.textContent = t("square.live_stale", { error: err.message });
      }
    }

    function show(page) {
      cards = new Map(page.data.map((m) => [m.id, card(m, onPick)]));
      const first = page.total ? page.offset + 1 : 0;
      const last = page.offset + page.data.length;
      summary.textContent = page.total > page.data.length ? t("square.showing", { first, last, total: page.total }) : t(page.total === 1 ? "square.count_one" : "square.count", { n: page.total });
      if (page.data.length === 0) {
        results.replaceChildren(
          alertBox("info", page.total ? t("square.past_end") : t("square.empty")),
          h("button", { type: "button", class: "secondary", onclick: clearFilters }, t("square.clear")),
        );
      } else {
        results.replaceChildren(h("div", { class: "grid model-grid" }, [...cards.values()].map((c) => c.view)));
      }
      const move = (offset) => () => apply({ offset: Math.max(0, offset) });
      fill(
        pager,
        page.offset > 0 ? h("button", { type: "button", class: "secondary", onclick: move(page.offset - PAGE_SIZE) }, t("square.previous")) : null,
        last < page.total ? h("button", { type: "button", class: "secondary", onclick: move(page.offset + PAGE_SIZE) }, t("square.next")) : null,
      );
      updateCompare();
    }

    /** Change some filters (any change but paging goes back to the first page), remember them, ask again. */
    function apply(changes) {
      Object.assign(filters, { offset: 0 }, changes);
      writeFilters(filters);
      load();
    }

    function clearFilters() {
      search.value = "";
      maxPrice.value = "";
      free.checked = false;
      for (const s of [task, tag, provider]) s.value = "";
      sort.value = "name";
      apply({ q: "", task: "", tag: "", provider: "", free: "", max_price: "", sort: "name" });
    }

    const typed = (key, input) => () => {
      clearTimeout(typing);
      typing = setTimeout(() => apply({ [key]: input.value }), TYPING_MS);
    };
    search.addEventListener("input", typed("q", search));
    maxPrice.addEventListener("input", typed("max_price", maxPrice));
    task.addEventListener("change", () => apply({ task: task.value }));
    tag.addEventListener("change", () => apply({ tag: tag.value }));
    provider.addEventListener("change", () => apply({ provider: provider.value }));
    sort.addEventListener("change", () => apply({ sort: sort.value }));
    free.addEventListener("change", () => apply({ free: free.checked ? "1" : "" }));

    const form = h(
      "form",
      { class: "card filters", role: "search", "aria-label": t("square.filters"), onsubmit: (e) => (e.preventDefault(), clearTimeout(typing), apply({ q: search.value, max_price: maxPrice.value })) },
      h("div", { class: "filters-search" }, field(t("square.search"), search).field),
      h(
        "div",
        { class: "row" },
        field(t("square.task"), task).field,
        field(t("square.tag"), tag).field,
        field(t("square.provider"), provider).field,
        field(t("square.max_price"), maxPrice).field,
        field(t("square.sort"), sort).field,
        h("label", { class: "check" }, free, t("square.free_only")),
      ),
    );
    main.append(form, summary, stale, results, pager);
    await load();
    const timer = setInterval(refreshLive, REFRESH_MS);
    return () => {
      clearInterval(timer);
      clearTimeout(typing);
      asked += 1; // an answer still on its way finds nobody to show it to
    };
  },
};
