// The chat playground: one conversation with a chat model, streamed token by token from the public
// /v1/chat/completions, with what each reply cost. Everything the user typed lives in sessionStorage, so an
// expired session (sign-in, then back here) or a language switch loses nothing.
import { api, streamEvents } from "../api.js";
import { chatSamples, codePanel } from "../code_samples.js";
import { field, h } from "../dom.js";
import { duration, money, number } from "../format.js";
import { t } from "../i18n.js";
import { alertBox, errorBox, loading, pageHeader } from "../ui.js";

const STORAGE_KEY = "tokenmill.playground";
const DEFAULTS = { model: "", system: "", temperature: "0.7", top_p: "1", max_tokens: "256", seed: "", stop: "", draft: "" };
const MAX_STOP = 4;

function loadState() {
  let saved = {};
  try {
    saved = JSON.parse(sessionStorage.getItem(STORAGE_KEY) || "{}") || {};
  } catch {
    saved = {}; // a damaged entry is a fresh start, not a broken page
  }
  const state = { ...DEFAULTS, messages: [], ...saved };
  // A reply saved mid-stream (the page was left or reloaded) will never finish: say so, not "Generating…".
  for (const m of state.messages) if (m.role === "assistant" && !m.stats) m.stats = { interrupted: true };
  return state;
}

function saveState(state) {
  sessionStorage.setItem(STORAGE_KEY, JSON.stringify(state));
}

/** The form's parameters as API fields (blank ones left to the server's defaults), or {error}. */
function parameters(state) {
  const out = {};
  const float = (key) => state[key].trim() !== "" && (out[key] = Number(state[key]));
  float("temperature");
  float("top_p");
  if (state.max_tokens.trim() !== "") out.max_tokens = Number.parseInt(state.max_tokens, 10);
  if (state.seed.trim() !== "") out.seed = Number.parseInt(state.seed, 10);
  const stop = state.stop.split(/[\n,]/).map((s) => s.trim()).filter(Boolean);
  if (stop.length > MAX_STOP) return { error: t("playground.stop_too_many", { n: stop.length }) };
  if (stop.length) out.stop = stop;
  return { params: out };
}

/** The request body as the API (and the "View code" samples) see it, minus the streaming fields. */
function chatRequest(state, params, extraUser) {
  const messages = [];
  if (state.system.trim()) messages.push({ role: "system", content: state.system });
  for (const m of state.messages) if (m.content) messages.push({ role: m.role, content: m.content });
  if (extraUser) messages.push({ role: "user", content: extraUser });
  return { model: state.model, messages, ...params };
}

/** Exactly the server's rule (platform/pricing.py): ceil((in·p + out·c) / 1e6) micros. */
function costMicros(pricing, usage) {
  return Math.ceil((usage.prompt_tokens * pricing.input_micros_per_mtok + usage.completion_tokens * pricing.output_micros_per_mtok) / 1e6);
}

function statsText(stats) {
  if (!stats) return t("playground.generating");
  if (stats.stopped) return t("playground.stopped");
  if (stats.interrupted) return t("playground.interrupted");
  if (!stats.usage) return t("playground.usage_unknown");
  const { prompt_tokens: prompt, completion_tokens: completion } = stats.usage;
  const parts = [t("playground.tokens", { prompt: number(prompt), completion: number(completion) })];
  if (stats.tps != null) parts.push(t("playground.speed", { speed: number(stats.tps, 1) }));
  if (stats.ttft_ms != null) parts.push(t("playground.ttft", { ttft: duration(stats.ttft_ms) }));
  parts.push(stats.free ? t("playground.cost_free") : t("playground.cost", { cost: money(stats.cost_micros) }));
  return parts.join(" · ");
}

/** One message's bubble; `text` is the node a streamed reply grows (appendData: text, never markup). */
function bubble(message) {
  const text = document.createTextNode(message.content);
  const stats = message.role === "assistant" ? h("p", { class: "bubble-stats" }, statsText(message.stats)) : null;
  const label = t(message.role === "user" ? "playground.you" : "playground.assistant");
  const view = h("div", { class: `bubble bubble-${message.role}` }, h("span", { class: "bubble-role" }, label), h("div", { class: "bubble-text" }, text), stats);
  return { view, text, stats };
}

export default {
  title: "playground.title",
  async render(main, ctx) {
    const state = loadState();
    main.append(pageHeader(t("playground.title")), loading());
    let models;
    try {
      models = (await api("/v1/catalog/models", { query: { task: "chat", limit: 100 } })).data;
    } catch (err) {
      main.lastChild.replaceWith(errorBox(err));
      return;
    }
    main.lastChild.remove();
    if (models.length === 0) {
      main.append(alertBox("info", t("playground.no_models")));
      return;
    }
    const byId = new Map(models.map((m) => [m.id, m]));
    const wanted = ctx.params.get("model");
    if (wanted && byId.has(wanted)) state.model = wanted;
    if (!byId.has(state.model)) state.model = models[0].id;
    saveState(state);

    let controller = null;
    const save = () => {
      saveState(state);
      if (!codeCard.hidden) showCode();
    };

    // --- settings: every change is saved at once ---
    const input = (key, props, tag = "input") => {
      const control = h(tag, { ...props, value: state[key], oninput: (e) => ((state[key] = e.target.value), save()) });
      return control;
    };
    const priceHint = h("small", { class: "hint", id: "model-price" });
    const showPrice = () => {
      const p = byId.get(state.model).pricing;
      priceHint.textContent = p.free ? t("playground.price_free") : t("playground.price", { input: p.input_per_1m, output: p.output_per_1m });
    };
    const modelSelect = h(
      "select",
      { "aria-describedby": "model-price", onchange: (e) => ((state.model = e.target.value), showPrice(), save()) },
      models.map((m) => h("option", { value: m.id, selected: m.id === state.model }, `${m.display_name} (${m.id})`)),
    );
    showPrice();
    const modelField = field(t("playground.model"), modelSelect).field;
    modelField.append(priceHint);
    const settings = h(
      "section",
      { class: "card stack playground-settings", "aria-labelledby": "pg-settings" },
      h("h2", { id: "pg-settings" }, t("playground.settings")),
      modelField,
      field(t("playground.system"), input("system", { rows: 4, placeholder: t("playground.system_placeholder") }, "textarea")).field,
      h(
        "div",
        { class: "param-grid" },
        field(t("playground.temperature"), input("temperature", { type: "number", min: 0, max: 2, step: 0.1, inputmode: "decimal" })).field,
        field(t("playground.top_p"), input("top_p", { type: "number", min: 0, max: 1, step: 0.05, inputmode: "decimal" })).field,
        field(t("playground.max_tokens"), input("max_tokens", { type: "number", min: 1, step: 1, inputmode: "numeric" })).field,
        field(t("playground.seed"), input("seed", { type: "number", step: 1, inputmode: "numeric" }), t("playground.seed_hint")).field,
      ),
      field(t("playground.stop"), input("stop", { rows: 2 }, "textarea"), t("playground.stop_hint")).field,
    );

    // --- the conversation: a log region screen readers follow as replies grow ---
    // tabindex: the log scrolls, so keyboard users must be able to focus it to scroll it.
    const log = h("div", { class: "chat-log", role: "log", tabindex: "0", "aria-live": "polite", "aria-label": t("playground.conversation") });
    const problems = h("div", { class: "chat-problems" });
    const showLog = () => {
      log.replaceChildren();
      if (state.messages.length === 0) log.append(h("p", { class: "muted" }, t("playground.empty")));
      for (const message of state.messages) log.append(bubble(message).view);
    };
    showLog();
    const composer = input("draft", { rows: 3, onkeydown: (e) => {
      // Enter sends, Shift+Enter is a new line; an IME composing Chinese also uses Enter, so leave it alone.
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        form.requestSubmit();
      }
    } }, "textarea");
    const sendButton = h("button", { type: "submit" }, t("playground.send"));
    const stopButton = h("button", { type: "button", class: "danger", disabled: true, onclick: () => controller?.abort() }, t("playground.stop_button"));
    const form = h(
      "form",
      { class: "stack", onsubmit: (e) => (e.preventDefault(), send()) },
      field(t("playground.message"), composer, t("playground.message_hint")).field,
      h("div", { class: "row" }, sendButton, stopButton),
    );
    const conversation = h(
      "section",
      { class: "card stack playground-chat", "aria-labelledby": "pg-conversation" },
      h("h2", { id: "pg-conversation" }, t("playground.conversation")),
      log,
      problems,
      form,
    );

    // --- "View code": the request as curl / Python / JavaScript ---
    const codeCard = h("section", { class: "card stack code-card", hidden: true, "aria-labelledby": "pg-code" });
    const codeButton = h("button", { type: "button", class: "secondary", "aria-expanded": "false", "aria-controls": "pg-code-card" }, t("playground.view_code"));
    codeCard.id = "pg-code-card";
    function showCode() {
      const { params, error } = parameters(state);
      codeCard.replaceChildren(h("h2", { id: "pg-code" }, t("playground.code_title")), h("p", { class: "muted" }, t("playground.code_hint")));
      if (error) return codeCard.append(alertBox("warning", error));
      const request = chatRequest(state, params, state.draft.trim() ? state.draft : state.messages.length ? "" : t("playground.sample_message"));
      codeCard.append(codePanel(chatSamples(`${location.origin}/v1`, request)));
    }
    codeButton.addEventListener("click", () => {
      codeCard.hidden = !codeCard.hidden;
      codeButton.setAttribute("aria-expanded", String(!codeCard.hidden));
      codeButton.textContent = t(codeCard.hidden ? "playground.view_code" : "playground.hide_code");
      if (!codeCard.hidden) showCode();
    });
    const clearButton = h("button", { type: "button", class: "secondary", onclick: () => {
      controller?.abort();
      state.messages = [];
      problems.replaceChildren();
      save();
      showLog();
    } }, t("playground.clear"));

    main.replaceChildren(pageHeader(t("playground.title"), codeButton, clearButton), h("div", { class: "playground" }, settings, conversation), codeCard);

    /** Runs `change`, keeping the log scrolled to the end if it was there (not if the user scrolled up). */
    function follow(change) {
      const atEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 48;
      change();
      if (atEnd) log.scrollTop = log.scrollHeight;
    }

    function setBusy(busy) {
      sendButton.disabled = busy;
      stopButton.disabled = !busy;
      log.setAttribute("aria-busy", String(busy));
    }

    async function send() {
      const content = state.draft;
      if (controller || !content.trim()) return;
      problems.replaceChildren();
      const { params, error } = parameters(state);
      if (error) return problems.append(alertBox("error", error));
      const request = { ...chatRequest(state, params, content), stream: true, stream_options: { include_usage: true } };
      const pricing = byId.get(state.model).pricing;
      if (state.messages.length === 0) log.replaceChildren();
      const asked = { role: "user", content };
      const reply = { role: "assistant", content: "", stats: null };
      state.messages.push(asked, reply);
      state.draft = composer.value = "";
      save();
      log.append(bubble(asked).view);
      const view = bubble(reply);
      log.append(view.view);
      log.scrollTop = log.scrollHeight;
      controller = new AbortController();
      setBusy(true);
      const started = performance.now();
      let first = null;
      let usage = null;
      try {
        for await (const chunk of streamEvents("/v1/chat/completions", request, { signal: controller.signal })) {
          if (chunk.usage) usage = chunk.usage;
          const delta = chunk.choices?.[0]?.delta?.content;
          if (!delta) continue;
          first ??= performance.now();
          reply.content += delta;
          follow(() => view.text.appendData(delta));
          saveState(state);
        }
        const ended = performance.now();
        const tokens = usage?.completion_tokens ?? 0;
        reply.stats = {
          usage,
          ttft_ms: first === null ? null : first - started,
          // Decode speed: the tokens after the first over the time they took (the first one's wait is the TTFT).
          tps: tokens > 1 && ended > first ? (tokens - 1) / ((ended - first) / 1000) : null,
          free: pricing.free,
          cost_micros: usage ? costMicros(pricing, usage) : null,
        };
      } catch (err) {
        if (reply.content === "" && err.name !== "AbortError") {
          // Nothing came back: take the question back into the box, so sending again is one key away.
          const at = state.messages.indexOf(asked);
          if (at >= 0) state.messages.splice(at, 2);
          state.draft = composer.value = content;
          showLog();
        } else {
          reply.stats = err.name === "AbortError" ? { stopped: true } : { interrupted: true };
        }
        if (err.name !== "AbortError") problems.append(errorBox(err));
      } finally {
        controller = null;
        save();
        if (view.stats.isConnected) follow(() => (view.stats.textContent = statsText(reply.stats)));
        setBusy(false);
        if (composer.isConnected) composer.focus();
      }
    }

    return () => controller?.abort();
  },
};
