// Create an account: a new organization on the free tier, able to call the free models at once. On an
// invite-only server the code comes from the operator, often inside a link (#/signup?invite=CODE).
import { api } from "../api.js";
import { field, h } from "../dom.js";
import { t } from "../i18n.js";
import { alertBox, errorBox } from "../ui.js";

export default {
  title: "auth.signup_title",
  render(main, ctx) {
    const mode = ctx.config?.signup;
    const card = h("section", { class: "card auth-card" }, h("h1", {}, t("auth.signup_title")));
    main.append(card);
    if (mode === "closed") {
      card.append(alertBox("info", t("auth.signup_closed")), h("p", {}, h("a", { href: "#/signin" }, t("auth.signin"))));
      return;
    }
    const inputs = {
      email: h("input", { type: "email", autocomplete: "email", required: true }),
      password: h("input", { type: "password", autocomplete: "new-password", required: true, minlength: 8 }),
      name: h("input", { type: "text", autocomplete: "name" }),
      organization: h("input", { type: "text", autocomplete: "organization" }),
      invite_code: h("input", { type: "text", autocomplete: "off", required: mode === "invite", value: ctx.params.get("invite") || "" }),
    };
    const message = h("div", { "aria-live": "polite" });
    const form = h(
      "form",
      { onsubmit: submit },
      mode === "invite" ? alertBox("info", t("auth.signup_invite")) : null,
      field(t("auth.email"), inputs.email).field,
      field(t("auth.password"), inputs.password, t("auth.password_hint")).field,
      field(t("auth.name"), inputs.name).field,
      field(t("auth.organization"), inputs.organization).field,
      mode === "invite" ? field(t("auth.invite_code"), inputs.invite_code).field : null,
      h("button", { type: "submit" }, t("auth.signup")),
    );
    card.append(form, message, h("p", {}, `${t("auth.have_account")} `, h("a", { href: "#/signin" }, t("auth.signin"))));

    async function submit(event) {
      event.preventDefault();
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      message.replaceChildren();
      const body = { email: inputs.email.value.trim(), password: inputs.password.value };
      for (const name of ["name", "organization", "invite_code"]) {
        const value = inputs[name].value.trim();
        if (value) body[name] = value;
      }
      try {
        await api("/v1/auth/signup", { method: "POST", body });
        await ctx.refresh("square");
      } catch (err) {
        message.append(errorBox(err));
        button.disabled = false;
      }
    }
  },
};
