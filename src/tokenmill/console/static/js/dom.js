// Building DOM without HTML strings: every text goes in as a text node, so a model description, a chat reply
// or an organization name can never become markup (no innerHTML anywhere in the console).

/**
 * h("button", {class: "primary", onclick: fn, "aria-label": "Copy"}, "Copy")
 * Props: `class`, `text`, `on<event>` handlers, `dataset` (object), boolean `disabled`/`checked`/... and any
 * other attribute. Children: nodes, strings (as text), numbers, arrays of those, null/false (skipped).
 */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "text") el.textContent = String(value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "value") el.value = value;
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Replace everything inside `el` with `children`. */
export function fill(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

let uid = 0;
/** A unique id for pairing a <label for> with its input. */
export function newId(prefix = "f") {
  uid += 1;
  return `${prefix}-${uid}`;
}

/** A labelled form field: returns {field, input}. `input` is the control itself (input, select, textarea). */
export function field(label, control, hint) {
  const id = control.id || newId();
  control.id = id;
  const field = h("div", { class: "field" }, h("label", { for: id }, label), control, hint ? h("small", { class: "hint" }, hint) : null);
  return { field, input: control };
}

/** <select> with [value, label] options. */
export function select(options, props = {}) {
  return h("select", props, options.map(([value, label]) => h("option", { value }, label)));
}

/**
 * A table: columns = [{label, cell: row => node|string, class?}], rows = array. Its wrapper scrolls sideways
 * on narrow screens, so it is a focusable, named region (keyboard users can scroll it too).
 */
export function table(columns, rows, { caption, empty, label } = {}) {
  const head = h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", class: c.class }, c.label))));
  const body = h(
    "tbody",
    {},
    rows.length === 0 && empty
      ? h("tr", {}, h("td", { colspan: columns.length, class: "empty" }, empty))
      : rows.map((row) => h("tr", {}, columns.map((c) => h("td", { class: c.class }, c.cell(row))))),
  );
  return h(
    "div",
    { class: "table-wrap", tabindex: 0, role: "region", "aria-label": caption || label || null },
    h("table", {}, caption ? h("caption", {}, caption) : null, head, body),
  );
}
