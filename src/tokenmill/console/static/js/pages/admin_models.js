// Models & replicas, for the operator: the live view of GET /v1/admin/models (state, replicas, memory used
// against the budget, requests in flight, how long the last load took), read again every 5 seconds while the
// page is open, and load / unload / drain (POST /v1/admin/models/{id}/...), each answering the new state.
import { api } from "../api.js";
import { fill, h, table } from "../dom.js";
import { duration, number } from "../format.js";
import { t } from "../i18n.js";
import { alertBox, describeError, errorBox, loading, pageHeader } from "../ui.js";
import { stateBadge } from "../admin_common.js";

const REFRESH_MS = 5000;
const ACTIONS = ["load", "unload", "drain"];
const GOOD = { loaded: true, failed: false, stopped: false };

function bytes(n) {
  if (!n) return "0";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  const power = Math.min(units.length - 1, Math.floor(Math.log2(n) / 10));
  return `${number(n / 1024 ** power, power ? 1 : 0)} ${units[power]}`;
}

// Each replica's load, where it runs (a Ray node) and whether it is on its way out or restarting; under
// them the autoscaler's last decision.
function replicas(model) {
  if (model.replicas.length === 0) return model.last_scaling ? h("div", { class: "muted" }, model.last_scaling) : "—";
  const notes = (r) =>
    [r.draining ? t("admin.replica_draining") : null, r.healthy ? null : t("admin.replica_restarting"), r.node ? t("admin.replica_node", { node: r.node }) : null]
      .filter(Boolean)
      .map((note) => ` · ${note}`)
      .join("");
  return h(
    "div",
    {},
    h(
      "ul",
      { class: "replica-list" },
      model.replicas.map((r) =>
        h("li", {}, t("admin.replica_line", { index: r.index, running: r.running_seqs, waiting: r.waiting_seqs, kv: number(r.kv_cache_usage * 100, 1) }) + notes(r)),
      ),
    ),
    model.last_scaling ? h("div", { class: "muted" }, t("admin.last_scaling", { decision: model.last_scaling })) : null,
  );
}

export default {
  title: "admin.models_title",
  async render(main) {
    const controller = new AbortController();
    const summary = h("div", {});
    const listBox = h("div", {}, loading());
    const message = h("div", { "aria-live": "polite" });
    const updated = h("p", { class: "muted" });
    const busy = new Set(); // "model action" pairs running now: their buttons stay disabled across refreshes
    main.append(
      pageHeader(t("admin.models_title"), h("button", { type: "button", class: "secondary", onclick: refresh }, t("common.refresh"))),
      h("p", { class: "muted" }, t("admin.models_intro")),
      summary,
      message,
      h("section", { class: "page-section" }, h("h2", {}, t("admin.models_list_title")), updated, listBox),
    );
    await refresh();
    if (!summary.isConnected) return undefined; // left while the first read was on its way: start no timer
    const timer = setInterval(refresh, REFRESH_MS);
    return () => {
      clearInterval(timer);
      controller.abort();
    };

    async function refresh() {
      let view;
      try {
        view = await api("/v1/admin/models", { signal: controller.signal });
      } catch (err) {
        if (controller.signal.aborted) return;
        fill(listBox, errorBox(err));
        return;
      }
      const budget = view.memory_budget_bytes === null ? t("admin.no_budget") : bytes(view.memory_budget_bytes);
      fill(summary, h("p", {}, t("admin.memory_summary", { used: bytes(view.memory_used_bytes), budget })));
      // Rebuilding the table every few seconds would drop the keyboard focus: put it back on the same button.
      const focused = document.activeElement?.dataset?.action;
      fill(listBox, modelTable(view.data));
      if (focused) listBox.querySelector(`[data-action="${CSS.escape(focused)}"]`)?.focus();
      updated.textContent = t("admin.updated_at", { time: new Date().toLocaleTimeString() });
    }

    function modelTable(models) {
      const columns = [
        { label: t("admin.col_model"), cell: (m) => h("div", {}, h("code", {}, m.id), h("div", { class: "muted" }, t(`admin.task_${m.task}`, {}), m.pinned ? ` · ${t("admin.pinned")}` : "")) },
        { label: t("admin.col_state"), cell: (m) => h("div", {}, stateBadge(t(`admin.state_${m.state}`), GOOD[m.state] ?? null), m.reason ? h("div", { class: "muted" }, m.reason) : null) },
        { label: t("admin.col_replicas"), cell: replicas },
        { label: t("admin.col_memory"), cell: (m) => bytes(m.memory_bytes), class: "num" },
        { label: t("admin.col_in_flight"), cell: (m) => number(m.requests_in_flight), class: "num" },
        { label: t("admin.col_loads"), cell: (m) => number(m.num_loads), class: "num" },
        { label: t("admin.col_last_load"), cell: (m) => (m.last_load_s === null ? "—" : duration(m.last_load_s * 1000)), class: "num" },
        { label: t("admin.col_actions"), cell: actions },
      ];
      return table(columns, models, { caption: t("admin.models_caption"), empty: t("admin.models_empty") });
    }

    // Embedding models are served outside the chat fleet: the API has no load/unload for them.
    function actions(model) {
      if (model.task !== "chat") return "—";
      return h(
        "div",
        { class: "row admin-inline" },
        ACTIONS.map((action) => {
          const id = `${model.id} ${action}`;
          return h(
            "button",
            {
              type: "button",
              class: action === "load" ? "secondary small" : "danger small",
              dataset: { action: id },
              disabled: busy.has(id),
              "aria-label": t(`admin.${action}_named`, { model: model.id }),
              onclick: () => run(model.id, action),
            },
            t(`admin.${action}`),
          );
        }),
      );
    }

    async function run(model, action) {
      const id = `${model} ${action}`;
      busy.add(id);
      fill(message, alertBox("info", t("admin.action_running", { model, action: t(`admin.${action}`) })));
      await refresh();
      try {
        const after = await api(`/v1/admin/models/${encodeURIComponent(model)}/${action}`, { method: "POST", signal: controller.signal });
        fill(message, alertBox("success", t("admin.action_done", { model, action: t(`admin.${action}`), state: t(`admin.state_${after.state}`) })));
      } catch (err) {
        if (controller.signal.aborted) return;
        fill(message, alertBox("error", `${model}: ${describeError(err)}`));
      } finally {
        busy.delete(id);
      }
      await refresh();
    }
  },
};
