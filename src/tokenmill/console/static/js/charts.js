// A thin layer over the vendored Chart.js (window.Chart, loaded by index.html before the modules): stacked
// bar charts in the console's colours. The page keeps its own text alternative (an aria-label on the canvas
// and a data table), so a chart is never the only way to read a number.

// Okabe–Ito: told apart by people with colour-vision deficiencies, and mid-toned enough to stand out on the
// light and the dark background alike.
const PALETTE = ["#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#8f7f00", "#7f7f7f"];

export function colour(index) {
  return PALETTE[index % PALETTE.length];
}

/** The theme's colours as CSS variables hold them right now (they follow prefers-color-scheme). */
function theme() {
  const css = getComputedStyle(document.documentElement);
  const read = (name) => css.getPropertyValue(name).trim();
  return { text: read("--text"), muted: read("--muted"), border: read("--border"), surface: read("--surface") };
}

export function chartsAvailable() {
  return typeof window.Chart === "function";
}

/**
 * A bar chart stacked by series. `labels` are the x categories, `series` [{label, values}] one per stack
 * layer, `format(value)` how a y value reads (axis ticks and tooltips). Returns the Chart (call destroy()).
 */
export function stackedBars(canvas, { labels, series, yTitle, format = String }) {
  const colours = theme();
  const datasets = series.map((s, i) => ({
    label: s.label,
    data: s.values,
    backgroundColor: colour(i),
    borderColor: colours.surface,
    borderWidth: 1,
  }));
  return new window.Chart(canvas, {
    type: "bar",
    data: { labels, datasets },
    options: {
      responsive: true,
      maintainAspectRatio: false,
      animation: false, // the numbers matter, not the motion (and reduced-motion users are spared it)
      color: colours.text,
      interaction: { mode: "index", intersect: false },
      plugins: {
        legend: { position: "bottom", labels: { color: colours.text, boxWidth: 12 } },
        tooltip: { callbacks: { label: (item) => `${item.dataset.label}: ${format(item.parsed.y)}` } },
      },
      scales: {
        x: { stacked: true, ticks: { color: colours.muted, maxRotation: 60 }, grid: { display: false } },
        y: {
          stacked: true,
          beginAtZero: true,
          title: { display: Boolean(yTitle), text: yTitle, color: colours.muted },
          ticks: { color: colours.muted, callback: (value) => format(value) },
          grid: { color: colours.border },
        },
      },
    },
  });
}

/** Every UTC day from `start` to `end` (ISO dates, both inclusive): a day with no usage still gets a bar. */
export function daysBetween(start, end) {
  const days = [];
  for (let d = new Date(`${start}T00:00:00Z`); d <= new Date(`${end}T00:00:00Z`); d.setUTCDate(d.getUTCDate() + 1)) {
    days.push(d.toISOString().slice(0, 10));
  }
  return days;
}

/** Rows {date, model, ...} -> one series per model with `valueOf(row)` on each of `days` (0 where none). */
export function seriesByModel(rows, days, valueOf) {
  const index = new Map(days.map((day, i) => [day, i]));
  const byModel = new Map();
  for (const row of rows) {
    if (!byModel.has(row.model)) byModel.set(row.model, new Array(days.length).fill(0));
    const i = index.get(row.date);
    if (i !== undefined) byModel.get(row.model)[i] += valueOf(row);
  }
  return [...byModel.entries()].sort(([a], [b]) => a.localeCompare(b)).map(([label, values]) => ({ label, values }));
}
