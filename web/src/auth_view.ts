// Sign in (staff and applicants) and registration (applicants).

import { authApi } from "./api.js";
import { field, h } from "./dom.js";
import { signedIn } from "./session.js";
import { Notice, type View, busy, value } from "./ui.js";

export function authView(mode: "signin" | "register", ended: boolean): View {
  const notice = new Notice();
  if (ended) notice.show("auth.sessionEnded", {}, "error");

  const tabs = h(
    "nav",
    { class: "tabs" },
    h("a", { href: "#/login", i18n: "auth.signin", "aria-current": mode === "signin" ? "page" : undefined }),
    h("a", { href: "#/register", i18n: "auth.register", "aria-current": mode === "register" ? "page" : undefined }),
  );

  const submit = h("button", {
    type: "submit",
    i18n: mode === "signin" ? "auth.submitSignin" : "auth.submitRegister",
  });
  const form =
    mode === "signin"
      ? h(
          "form",
          { class: "card", "data-form": "signin" },
          field("auth.login", h("input", { name: "login", autocomplete: "username", required: true })),
          field(
            "auth.password",
            h("input", { name: "password", type: "password", autocomplete: "current-password", required: true }),
          ),
          submit,
        )
      : h(
          "form",
          { class: "card", "data-form": "register" },
          field("auth.fullName", h("input", { name: "full_name", autocomplete: "name", required: true })),
          field(
            "auth.phone",
            h("input", { name: "phone", type: "tel", autocomplete: "tel", placeholder: "+998901234567", required: true }),
          ),
          field("auth.email", h("input", { name: "email", type: "email", autocomplete: "email" })),
          field(
            "auth.password",
            h("input", { name: "password", type: "password", autocomplete: "new-password", minlength: 8, required: true }),
          ),
          submit,
        );

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    notice.clear();
    void busy(submit, async () => {
      try {
        if (mode === "signin") {
          signedIn(await authApi.login({ login: value(form, "login"), password: value(form, "password") }));
        } else {
          const email = value(form, "email");
          signedIn(
            await authApi.register({
              fullName: value(form, "full_name"),
              phone: value(form, "phone"),
              email: email || undefined,
              password: value(form, "password"),
            }),
          );
        }
      } catch (err) {
        notice.fail(err, form);
      }
    });
  });

  const root = h("section", { class: "auth" }, h("p", { class: "intro", i18n: "auth.intro" }), tabs, notice.el, form);
  return { root };
}
