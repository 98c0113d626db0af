// English and Chinese, each language's strings in one file (i18n/en.js, i18n/zh.js). t("square.title") looks
// the key up in the current language, then in English; "{name}" placeholders are filled from `vars`.
import en from "../i18n/en.js";
import zh from "../i18n/zh.js";

const STRINGS = { en, zh };
const STORAGE_KEY = "tokenmill.lang";
let current = pickInitial();

function pickInitial() {
  const saved = localStorage.getItem(STORAGE_KEY);
  if (saved && STRINGS[saved]) return saved;
  return (navigator.language || "en").toLowerCase().startsWith("zh") ? "zh" : "en";
}

export function getLang() {
  return current;
}

export const LANGUAGES = [
  ["en", "English"],
  ["zh", "中文"],
];

export function setLang(lang) {
  if (!STRINGS[lang]) return;
  current = lang;
  localStorage.setItem(STORAGE_KEY, lang);
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
}

export function t(key, vars) {
  let text = STRINGS[current][key] ?? en[key] ?? key;
  if (vars) for (const [name, value] of Object.entries(vars)) text = text.replaceAll(`{${name}}`, String(value));
  return text;
}

document.documentElement.lang = current === "zh" ? "zh-CN" : "en";
