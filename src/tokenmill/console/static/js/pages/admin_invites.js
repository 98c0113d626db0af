// Invite codes, for the operator: the list (GET /v1/admin/invites), creating one (POST: shown at once with
// a copy button and the sign-up link to send) and revoking one (POST .../revoke, behind an inline confirm).
import { api } from "../api.js";
import { field, fill, h, table } from "../dom.js";
import { dateTime, number } from "../format.js";
import { t } from "../i18n.js";
import { alertBox, copyButton, errorBox, loading, pageHeader } from "../ui.js";
import { section, stateBadge } from "../admin_common.js";

const MAX_USES = 10_000;
const MAX_DAYS = 365;

function status(invite) {
  if (invite.revoked_at !== null) return "revoked";
  if (invite.expires_at !== null && invite.expires_at * 1000 <= Date.now()) return "expired";
  if (invite.uses >= invite.max_uses) return "used_up";
  return "active";
}

function signupLink(code) {
  return `${location.origin}/#/signup?invite=${encodeURIComponent(code)}`;
}

export default {
  title: "admin.invites_title",
  async render(main) {
    const createdBox = h("div", {});
    const formMessage = h("div", { "aria-live": "polite" });
    const listMessage = h("div", { "aria-live": "polite" });
    const listBox = h("div", {}, loading());
    const note = h("input", { type: "text", maxlength: 200, autocomplete: "off" });
    const maxUses = h("input", { type: "number", min: 1, max: MAX_USES, step: 1, value: "1", required: true });
    const days = h("input", { type: "number", min: 1, max: MAX_DAYS, step: 1 });
    const form = h(
      "form",
      { class: "stack", onsubmit: create },
      h(
        "div",
        { class: "grid" },
        field(t("admin.invite_note"), note).field,
        field(t("admin.invite_max_uses"), maxUses).field,
        field(t("admin.invite_days"), days, t("admin.invite_days_hint")).field,
      ),
      h("div", { class: "row" }, h("button", { type: "submit" }, t("admin.create_invite"))),
    );
    main.append(
      pageHeader(t("admin.invites_title")),
      createdBox,
      section(t("admin.create_invite_title"), form, formMessage),
      h("section", { class: "page-section" }, h("h2", {}, t("admin.invites_list_title")), listMessage, listBox),
    );
    await loadList();

    async function loadList() {
      try {
        const invites = (await api("/v1/admin/invites")).data;
        fill(listBox, inviteTable(invites));
      } catch (err) {
        fill(listBox, errorBox(err));
      }
    }

    function inviteTable(invites) {
      const columns = [
        { label: t("admin.col_code"), cell: (i) => h("code", {}, i.code) },
        { label: t("admin.col_note"), cell: (i) => i.note || "—" },
        { label: t("admin.col_uses"), cell: (i) => `${number(i.uses)} / ${number(i.max_uses)}`, class: "num" },
        { label: t("admin.col_expires"), cell: (i) => (i.expires_at ? dateTime(i.expires_at) : t("admin.never")) },
        { label: t("admin.col_created"), cell: (i) => dateTime(i.created_at) },
        { label: t("admin.col_status"), cell: (i) => stateBadge(t(`admin.invite_${status(i)}`), status(i) === "active") },
        { label: t("admin.col_actions"), cell: (i) => (i.revoked_at === null ? revokeControl(i) : "—") },
      ];
      return table(columns, invites, { caption: t("admin.invites_caption"), empty: t("admin.invites_empty") });
    }

    function revokeControl(invite) {
      const box = h("div", { class: "row admin-inline" });
      const reset = () =>
        fill(
          box,
          h("button", { type: "button", class: "danger small", "aria-label": t("admin.revoke_invite_named", { code: invite.code }), onclick: ask }, t("admin.revoke")),
        );
      function ask() {
        const yes = h("button", { type: "button", class: "danger small", onclick: revoke }, t("admin.confirm_revoke"));
        fill(box, h("span", {}, t("admin.revoke_invite_question", { code: invite.code })), yes, h("button", { type: "button", class: "secondary small", onclick: reset }, t("common.cancel")));
        yes.focus();
      }
      async function revoke() {
        fill(listMessage);
        try {
          await api(`/v1/admin/invites/${encodeURIComponent(invite.id)}/revoke`, { method: "POST" });
          fill(listMessage, alertBox("success", t("admin.invite_revoked_done", { code: invite.code })));
          await loadList();
        } catch (err) {
          fill(listMessage, errorBox(err));
        }
      }
      reset();
      return box;
    }

    async function create(event) {
      event.preventDefault();
      fill(formMessage);
      const body = { note: note.value, max_uses: Number(maxUses.value) };
      if (days.value) body.expires_in_days = Number(days.value);
      try {
        const invite = await api("/v1/admin/invites", { method: "POST", body });
        showCreated(invite);
        note.value = "";
        await loadList();
      } catch (err) {
        fill(formMessage, errorBox(err));
      }
    }

    function showCreated(invite) {
      const link = signupLink(invite.code);
      const linkInput = h("input", { type: "text", readonly: true, value: link, class: "admin-link" });
      const box = h(
        "section",
        { class: "card page-section secret-box", tabindex: -1, "aria-labelledby": "invite-created-title" },
        h("h2", { id: "invite-created-title" }, t("admin.invite_created")),
        h("div", { class: "row admin-inline" }, h("span", {}, t("admin.invite_code")), h("code", { class: "invite-code" }, invite.code), copyButton(invite.code, t("admin.copy_code"))),
        h("div", { class: "row admin-inline" }, field(t("admin.signup_link"), linkInput).field, copyButton(link, t("admin.copy_link"))),
      );
      fill(createdBox, box);
      box.focus();
    }
  },
};
