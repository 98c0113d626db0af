// Prices, for the operator: every model's price per 1M tokens (GET /v1/admin/prices), edited in its own row
// or set for a model not listed yet (PUT /v1/admin/prices/{model}). 0 and 0 make a model free.
import { api } from "../api.js";
import { field, fill, h, table } from "../dom.js";
import { t } from "../i18n.js";
import { alertBox, errorBox, loading, pageHeader } from "../ui.js";
import { parseUnits, section, unitsText } from "../admin_common.js";

function priceInput(micros, label) {
  return h("input", { type: "text", inputmode: "decimal", autocomplete: "off", class: "price-edit", value: micros === undefined ? "" : unitsText(micros), "aria-label": label });
}

export default {
  title: "admin.prices_title",
  async render(main) {
    const listBox = h("div", {}, loading());
    const message = h("div", { "aria-live": "polite" });
    const newModel = h("input", { type: "text", maxlength: 200, required: true, autocomplete: "off" });
    const newInput = h("input", { type: "text", inputmode: "decimal", required: true, autocomplete: "off" });
    const newOutput = h("input", { type: "text", inputmode: "decimal", required: true, autocomplete: "off" });
    const addMessage = h("div", { "aria-live": "polite" });
    const addForm = h(
      "form",
      { class: "row", onsubmit: add },
      field(t("admin.col_model"), newModel).field,
      field(t("admin.input_price"), newInput).field,
      field(t("admin.output_price"), newOutput).field,
      h("button", { type: "submit" }, t("admin.set_price")),
    );
    main.append(
      pageHeader(t("admin.prices_title")),
      h("p", { class: "muted" }, t("admin.prices_intro")),
      h("section", { class: "page-section" }, h("h2", {}, t("admin.prices_list_title")), message, listBox),
      section(t("admin.add_price_title"), addForm, addMessage),
    );
    await loadList();

    async function loadList() {
      try {
        const prices = (await api("/v1/admin/prices")).data.sort((a, b) => a.model.localeCompare(b.model));
        fill(listBox, priceTable(prices));
      } catch (err) {
        fill(listBox, errorBox(err));
      }
    }

    function priceTable(prices) {
      const rows = prices.map((price) => ({ price, cells: viewCells(price) }));
      const columns = [
        { label: t("admin.col_model"), cell: (r) => r.cells.model },
        { label: t("admin.input_price"), cell: (r) => r.cells.input, class: "num" },
        { label: t("admin.output_price"), cell: (r) => r.cells.output, class: "num" },
        { label: t("admin.col_actions"), cell: (r) => r.cells.actions },
      ];
      return table(columns, rows, { caption: t("admin.prices_caption"), empty: t("admin.prices_empty") });
    }

    /** The cells of one row; Edit turns them into inputs in place, Save writes and shows the answer. */
    function viewCells(price) {
      const cells = { model: h("div", {}), input: h("div", {}), output: h("div", {}), actions: h("div", { class: "row admin-inline" }) };
      const show = () => {
        const p = price.pricing;
        fill(cells.model, h("code", {}, price.model), p.free ? [" ", h("span", { class: "badge badge-free" }, t("admin.free"))] : null);
        fill(cells.input, p.input_per_1m);
        fill(cells.output, p.output_per_1m);
        const edit = h("button", { type: "button", class: "secondary small", "aria-label": t("admin.edit_price_named", { model: price.model }), onclick: editRow }, t("admin.edit"));
        fill(cells.actions, edit);
        return edit;
      };
      const editRow = () => {
        const input = priceInput(price.pricing.input_micros_per_mtok, t("admin.input_price_of", { model: price.model }));
        const output = priceInput(price.pricing.output_micros_per_mtok, t("admin.output_price_of", { model: price.model }));
        fill(cells.input, input);
        fill(cells.output, output);
        const save = h("button", { type: "button", class: "small", "aria-label": t("admin.save_price_named", { model: price.model }), onclick: () => saveRow(input, output) }, t("common.save"));
        const cancel = h("button", { type: "button", class: "secondary small", onclick: () => show().focus() }, t("common.cancel"));
        fill(cells.actions, save, cancel);
        input.focus();
      };
      const saveRow = async (input, output) => {
        fill(message);
        try {
          price = await put(price.model, input.value, output.value);
          fill(message, alertBox("success", t("admin.price_saved", { model: price.model, input: price.pricing.input_per_1m, output: price.pricing.output_per_1m })));
          show().focus();
        } catch (err) {
          fill(message, errorBox(err));
        }
      };
      show();
      return cells;
    }

    async function put(model, inputText, outputText) {
      const body = {
        input_micros_per_mtok: parsed(inputText, t("admin.input_price")),
        output_micros_per_mtok: parsed(outputText, t("admin.output_price")),
      };
      return api(`/v1/admin/prices/${encodeURIComponent(model)}`, { method: "PUT", body });
    }

    function parsed(text, label) {
      try {
        return parseUnits(text);
      } catch (err) {
        throw new Error(`${label}: ${err.message}`);
      }
    }

    async function add(event) {
      event.preventDefault();
      fill(addMessage);
      try {
        const price = await put(newModel.value.trim(), newInput.value, newOutput.value);
        fill(addMessage, alertBox("success", t("admin.price_saved", { model: price.model, input: price.pricing.input_per_1m, output: price.pricing.output_per_1m })));
        await loadList();
      } catch (err) {
        fill(addMessage, errorBox(err));
      }
    }
  },
};
