// Sign in with email and password, or with an API key (scripts' keys and the operator's admin key).
import { api } from "../api.js";
import { field, h } from "../dom.js";
import { t } from "../i18n.js";
import { alertBox, errorBox } from "../ui.js";

function passwordForm(ctx, message) {
  const email = h("input", { type: "email", name: "email", autocomplete: "username", required: true });
  const password = h("input", { type: "password", name: "password", autocomplete: "current-password", required: true });
  return h(
    "form",
    { onsubmit: (e) => submit(e, ctx, { email: email.value, password: password.value }, message) },
    field(t("auth.email"), email).field,
    field(t("auth.password"), password).field,
    h("button", { type: "submit" }, t("auth.signin")),
  );
}

function keyForm(ctx, message) {
  const key = h("input", { type: "password", name: "api_key", autocomplete: "off", required: true, placeholder: "sk-..." });
  return h(
    "form",
    { onsubmit: (e) => submit(e, ctx, { api_key: key.value.trim() }, message) },
    field(t("auth.api_key"), key).field,
    h("button", { type: "submit" }, t("auth.signin")),
  );
}

async function submit(event, ctx, body, message) {
  event.preventDefault();
  const button = event.target.querySelector("button[type=submit]");
  button.disabled = true;
  message.replaceChildren();
  try {
    await api("/v1/auth/login", { method: "POST", body });
    const next = new URLSearchParams(location.hash.split("?")[1] || "").get("next");
    await ctx.refresh(next || "");
  } catch (err) {
    message.append(errorBox(err));
    button.disabled = false;
  }
}

export default {
  title: "auth.signin_title",
  render(main, ctx) {
    const message = h("div", { "aria-live": "polite" });
    const panel = h("div");
    const tabs = [
      ["password", t("auth.with_password"), () => passwordForm(ctx, message)],
      ["key", t("auth.with_key"), () => keyForm(ctx, message)],
    ];
    const buttons = tabs.map(([id, label, build]) =>
      h(
        "button",
        {
          type: "button",
          role: "tab",
          id: `tab-${id}`,
          "aria-controls": "signin-panel",
          onclick: () => select(id, build),
        },
        label,
      ),
    );
    function select(id, build) {
      for (const button of buttons) button.setAttribute("aria-selected", String(button.id === `tab-${id}`));
      panel.replaceChildren(build());
      message.replaceChildren();
    }
    const signup = ctx.config?.signup !== "closed";
    main.append(
      h(
        "section",
        { class: "card auth-card" },
        h("h1", {}, t("auth.signin_title")),
        h("div", { class: "tabs", role: "tablist", "aria-label": t("auth.signin_title") }, buttons),
        h("div", { id: "signin-panel", role: "tabpanel" }, panel),
        message,
        signup
          ? h("p", {}, `${t("auth.no_account")} `, h("a", { href: "#/signup" }, t("auth.signup")))
          : alertBox("info", t("auth.signup_closed")),
      ),
    );
    select("password", tabs[0][2]);
  },
};
