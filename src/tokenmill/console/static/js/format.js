// Numbers as people read them, in the console's language. Money arrives from the API as integer micros
// (one millionth of a currency unit) and is shown without rounding it into something it is not.
import { getLang } from "./i18n.js";

function locale() {
  return getLang() === "zh" ? "zh-CN" : "en-US";
}

/** 12_500_000 -> "12.50"; amounts under a cent keep up to 6 decimals so a tiny charge never shows as 0. */
export function money(micros) {
  if (micros === null || micros === undefined) return "—";
  const units = micros / 1e6;
  const digits = Math.abs(units) >= 0.01 || units === 0 ? 2 : 6;
  return units.toLocaleString(locale(), { minimumFractionDigits: digits, maximumFractionDigits: Math.max(digits, 6) });
}

export function number(value, digits = 0) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  return Number(value).toLocaleString(locale(), { maximumFractionDigits: digits });
}

/** Unix seconds -> local date and time. */
export function dateTime(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  return new Date(seconds * 1000).toLocaleString(locale());
}

export function duration(ms) {
  if (ms === null || ms === undefined) return "—";
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}
