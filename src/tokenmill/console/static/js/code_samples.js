// "View code": the request the playground is about to send, written as a script would send it (curl, the
// Python openai SDK, the openai npm package), so a user can leave the console with working code. The key is
// never the user's own: it is read from $TOKENMILL_API_KEY.
import { h } from "./dom.js";
import { t } from "./i18n.js";
import { copyButton } from "./ui.js";

/** A JSON value as a Python literal (JSON is Python except for true/false/null), indented like black. */
function python(value, indent = "") {
  const inner = `${indent}    `;
  if (value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) {
    if (value.length === 0) return "[]";
    return `[\n${value.map((v) => `${inner}${python(v, inner)},`).join("\n")}\n${indent}]`;
  }
  if (typeof value === "object") {
    const items = Object.entries(value).map(([k, v]) => `${inner}${JSON.stringify(k)}: ${python(v, inner)},`);
    return items.length ? `{\n${items.join("\n")}\n${indent}}` : "{}";
  }
  return JSON.stringify(value); // numbers, and strings (JSON escapes are valid Python escapes)
}

/** Single-quoted for a POSIX shell: the only character to escape inside '...' is ' itself. */
function shellQuote(text) {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

/**
 * The three samples for one chat request. `request` is the JSON body without `stream` (samples stream, as
 * the playground does); `baseUrl` ends in /v1.
 */
export function chatSamples(baseUrl, request) {
  const body = { ...request, stream: true };
  const curl = [
    `curl -N ${baseUrl}/chat/completions \\`,
    `  -H "Authorization: Bearer $TOKENMILL_API_KEY" \\`,
    `  -H "Content-Type: application/json" \\`,
    `  -d ${shellQuote(JSON.stringify(body, null, 2))}`,
  ].join("\n");
  const args = Object.entries(body)
    .map(([key, value]) => `    ${key}=${python(value, "    ")},`)
    .join("\n");
  const py = [
    "import os",
    "",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${JSON.stringify(baseUrl)}, api_key=os.environ["TOKENMILL_API_KEY"])`,
    "stream = client.chat.completions.create(",
    args,
    ")",
    "for chunk in stream:",
    "    if chunk.choices and chunk.choices[0].delta.content:",
    '        print(chunk.choices[0].delta.content, end="", flush=True)',
    "print()",
  ].join("\n");
  const js = [
    'import OpenAI from "openai";',
    "",
    `const client = new OpenAI({ baseURL: ${JSON.stringify(baseUrl)}, apiKey: process.env.TOKENMILL_API_KEY });`,
    `const stream = await client.chat.completions.create(${JSON.stringify(body, null, 2)});`,
    "for await (const chunk of stream) {",
    '  process.stdout.write(chunk.choices[0]?.delta?.content ?? "");',
    "}",
  ].join("\n");
  return [
    ["curl", "curl", curl],
    ["python", "Python", py],
    ["javascript", "JavaScript", js],
  ];
}

/** Tabs (one per language) over a <pre>, and a copy button for the visible sample. */
let lastTab = "curl"; // the language the user picked stays picked while the samples are rebuilt

export function codePanel(samples) {
  let current = samples.find((s) => s[0] === lastTab) || samples[0];
  const code = h("code", {});
  const pre = h("pre", { class: "code-sample", id: "code-sample-panel", role: "tabpanel", tabindex: "0" }, code);
  const tabs = samples.map((sample) =>
    h(
      "button",
      { type: "button", role: "tab", id: `code-tab-${sample[0]}`, "aria-controls": "code-sample-panel", onclick: () => show(sample) },
      sample[1],
    ),
  );
  function show(sample) {
    current = sample;
    lastTab = sample[0];
    for (const tab of tabs) tab.setAttribute("aria-selected", String(tab.id === `code-tab-${sample[0]}`));
    pre.setAttribute("aria-labelledby", `code-tab-${sample[0]}`);
    code.textContent = sample[2];
  }
  show(current);
  return h(
    "div",
    { class: "stack" },
    h("div", { class: "row code-tabs" }, h("div", { class: "tabs", role: "tablist", "aria-label": t("playground.code_title") }, tabs), copyButton(() => current[2])),
    pre,
  );
}
