// The embeddings playground: a tiny semantic search. The query and the sentences go out in ONE
// /v1/embeddings call (one bill, one round trip); the ranking by cosine similarity happens here, as a
// user's own code would do it.
import { api } from "../api.js";
import { field, h, table } from "../dom.js";
import { number } from "../format.js";
import { t } from "../i18n.js";
import { alertBox, errorBox, loading, pageHeader } from "../ui.js";

// The example stays English in every language: the built-in MiniLM model was trained on English text.
const EXAMPLE_QUERY = "A kitten resting on a rug";
const EXAMPLE_SENTENCES = [
  "The cat sits on the mat",
  "Stock markets fell sharply",
  "A puppy sleeps on the sofa",
  "The train leaves at noon",
].join("\n");

function cosine(a, b) {
  let dot = 0;
  let na = 0;
  let nb = 0;
  for (let i = 0; i < a.length; i += 1) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return na && nb ? dot / Math.sqrt(na * nb) : 0;
}

/** The score as text (so it never depends on seeing the bar) and a bar for the eye. */
function scoreCell(score) {
  const width = `${Math.max(0, Math.min(1, score)) * 100}%`;
  return h(
    "div",
    { class: "score" },
    h("span", { class: "score-value" }, score.toFixed(3)),
    h("span", { class: "score-bar", "aria-hidden": "true" }, h("span", { style: `width: ${width}` })),
  );
}

export default {
  title: "embeddings.title",
  async render(main, ctx) {
    main.append(pageHeader(t("embeddings.title")), loading());
    let models;
    try {
      models = (await api("/v1/catalog/models", { query: { task: "embedding", limit: 100 } })).data;
    } catch (err) {
      main.lastChild.replaceWith(errorBox(err));
      return;
    }
    main.lastChild.remove();
    if (models.length === 0) {
      main.append(alertBox("info", t("embeddings.no_models")));
      return;
    }
    const wanted = ctx.params.get("model");
    const model = h(
      "select",
      {},
      models.map((m) => h("option", { value: m.id, selected: m.id === wanted }, `${m.display_name} (${m.id})`)),
    );
    const query = h("input", { type: "text", value: EXAMPLE_QUERY });
    const sentences = h("textarea", { rows: 6, value: EXAMPLE_SENTENCES });
    const button = h("button", { type: "submit" }, t("embeddings.rank"));
    const results = h("div", { class: "stack", role: "status", "aria-live": "polite" });

    async function rank(event) {
      event.preventDefault();
      const lines = sentences.value.split("\n").map((s) => s.trim()).filter(Boolean);
      const text = query.value.trim();
      results.replaceChildren();
      if (!text || lines.length === 0) return results.append(alertBox("error", t("embeddings.need_input")));
      button.disabled = true;
      results.append(h("p", { class: "muted" }, t("embeddings.ranking")));
      try {
        const answer = await api("/v1/embeddings", { method: "POST", body: { model: model.value, input: [text, ...lines] } });
        const vectors = [...answer.data].sort((a, b) => a.index - b.index).map((d) => d.embedding);
        const ranked = lines.map((sentence, i) => ({ sentence, score: cosine(vectors[0], vectors[i + 1]) }));
        ranked.sort((a, b) => b.score - a.score);
        results.replaceChildren(
          h("h2", {}, t("embeddings.results")),
          table(
            [
              { label: t("embeddings.col_rank"), cell: (r) => String(ranked.indexOf(r) + 1), class: "num" },
              { label: t("embeddings.col_sentence"), cell: (r) => r.sentence },
              { label: t("embeddings.col_score"), cell: (r) => scoreCell(r.score), class: "score-col" },
            ],
            ranked,
            { caption: t("embeddings.caption", { query: text }) },
          ),
          h("p", { class: "muted" }, t("embeddings.tokens", { tokens: number(answer.usage.total_tokens) })),
        );
      } catch (err) {
        results.replaceChildren(errorBox(err));
      } finally {
        button.disabled = false;
      }
    }

    main.lastChild.after(
      h("p", { class: "muted" }, t("embeddings.intro")),
      h(
        "form",
        { class: "card stack", onsubmit: rank },
        field(t("embeddings.model"), model).field,
        field(t("embeddings.query"), query).field,
        field(t("embeddings.sentences"), sentences, t("embeddings.sentences_hint")).field,
        h("div", { class: "row" }, button),
      ),
      results,
    );
  },
};
