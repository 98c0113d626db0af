// Pieces the provider page and the operator's pages share: money typed in currency units (the API takes
// integer micros), compact JSON for the audit log, a titled card, and one-time keys for idempotent writes.
import { h } from "./dom.js";
import { t } from "./i18n.js";

// Whole units up to 10^9 keep every amount the API accepts (10^15 micros at most) an exact integer in a JS
// number; parsing the decimal text digit by digit avoids 0.1 + 0.2 style float errors in money.
const UNITS = /^(\d{1,9})(?:\.(\d{0,6}))?$/;

/** "12.50" -> 12_500_000. Throws an Error with a readable message for anything else. */
export function parseUnits(text, { allowZero = true } = {}) {
  const match = UNITS.exec(String(text).trim());
  if (!match) throw new Error(t("admin.amount_invalid"));
  const micros = Number(match[1]) * 1e6 + Number((match[2] || "").padEnd(6, "0"));
  if (!allowZero && micros === 0) throw new Error(t("admin.amount_positive"));
  return micros;
}

/** 500_000 -> "0.5": the exact amount, as a value to put back into an input. */
export function unitsText(micros) {
  const whole = Math.floor(micros / 1e6);
  const fraction = String(micros % 1e6).padStart(6, "0").replace(/0+$/, "");
  return fraction ? `${whole}.${fraction}` : String(whole);
}

/** Compact one-line JSON for before/after values; undefined and null both read "null". */
export function compactJson(value) {
  return value === undefined ? "null" : JSON.stringify(value);
}

/** A card with an h2 (pages keep their headings in order: h1 from pageHeader, then these). */
export function section(title, ...children) {
  return h("section", { class: "card page-section" }, h("h2", {}, title), children);
}

/**
 * A fresh random key. crypto.randomUUID only exists in secure contexts (https or localhost), and a console
 * served over plain http on a LAN address is not one, so fall back to getRandomValues, which always exists.
 */
export function newUuid() {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** A status word shown as a badge: text always says the state, colour only repeats it. */
export function stateBadge(text, good) {
  return h("span", { class: `badge ${good === true ? "badge-ok" : good === false ? "badge-bad" : ""}` }, text);
}
