// Who is signed in, and the password change (which signs out every other session of the user).
import { api } from "../api.js";
import { field, h } from "../dom.js";
import { t } from "../i18n.js";
import { alertBox, errorBox, pageHeader } from "../ui.js";

export default {
  title: "account.title",
  render(main, ctx) {
    const session = ctx.session;
    const profile = h(
      "dl",
      { class: "facts" },
      h("dt", {}, t("auth.email")),
      h("dd", {}, session?.user?.email ?? "—"),
      h("dt", {}, t("auth.name")),
      h("dd", {}, session?.user?.name ?? "—"),
      h("dt", {}, t("account.organization")),
      h("dd", {}, session?.organization?.name ?? "—"),
      h("dt", {}, t("account.tier")),
      h("dd", {}, session?.organization?.tier ?? "—"),
    );
    main.append(pageHeader(t("account.title")), h("section", { class: "card" }, h("h2", {}, t("account.profile")), profile));
    const section = h("section", { class: "card" }, h("h2", {}, t("account.change_password")));
    main.append(section);
    if (session?.kind !== "password") {
      section.append(alertBox("info", t("account.api_key_session")));
      return;
    }
    const current = h("input", { type: "password", autocomplete: "current-password", required: true });
    const next = h("input", { type: "password", autocomplete: "new-password", required: true, minlength: 8 });
    const message = h("div", { "aria-live": "polite" });
    const form = h(
      "form",
      { class: "stack", onsubmit: submit },
      field(t("account.current_password"), current).field,
      field(t("account.new_password"), next, t("auth.password_hint")).field,
      h("button", { type: "submit" }, t("account.change_password")),
    );
    section.append(form, message);

    async function submit(event) {
      event.preventDefault();
      message.replaceChildren();
      try {
        await api("/v1/auth/password", {
          method: "POST",
          body: { current_password: current.value, new_password: next.value },
        });
        form.reset();
        message.append(alertBox("success", t("account.password_changed")));
      } catch (err) {
        message.append(errorBox(err));
      }
    }
  },
};
