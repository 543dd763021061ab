// The page: header (language switch, who is signed in), and a hash router that puts one view
// at a time in <main>. Routes:
//   #/login, #/register                   sign in / register
//   #/applications, #/applications/<id>   staff: the live list, one application
//   #/programs                            admins: the program catalog
//   #/invoices                            applicants: their invoices
//   #/invoices/<id>/return                back from a payment provider
//   #/payments/<id>                       a payment's live status

import { applicantRoutes } from "./routes.js";
import { h, relabel } from "./dom.js";
import { Role, type User } from "./gen/crm/v1/auth_pb.js";
import { LANGS, type Key, lang, onLangChange, setLang } from "./i18n.js";
import { authView } from "./auth_view.js";
import { currentUser, onSessionChange, resume, signOut } from "./session.js";
import { applicationView, applicationsView, programsView } from "./staff.js";
import { type View, onSessionEnded } from "./ui.js";

const main = document.getElementById("view") as HTMLElement;
const nav = document.getElementById("nav") as HTMLElement;
const who = document.getElementById("who") as HTMLElement;
const langs = document.getElementById("langs") as HTMLElement;

let view: View | null = null;
/** Where to go after signing in (e.g. the payment the payer came back to). */
let afterSignIn: string | null = null;
let sessionEnded = false;
/** Until the tab's session is resumed, session changes only redraw the header. */
let started = false;

const isStaff = (u: User | null) => u?.role === Role.STAFF || u?.role === Role.ADMIN;
const home = (u: User | null) => (isStaff(u) ? "#/applications" : "#/invoices");

function mount(next: View): void {
  view?.dispose?.();
  view = next;
  main.replaceChildren(next.root);
  main.focus({ preventScroll: true });
}

function route(): void {
  const user = currentUser();
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  const [section, id, action] = parts;

  if (!user) {
    if (section !== "login" && section !== "register") {
      if (parts.length > 0) afterSignIn = location.hash;
      location.replace("#/login"); // routes again through hashchange
      return;
    }
    mount(authView(section === "register" ? "register" : "signin", sessionEnded));
    return;
  }
  if (section === "login" || section === "register" || !section) {
    location.replace(home(user));
    return;
  }
  if (isStaff(user)) {
    if (section === "applications" && id) return mount(applicationView(id));
    if (section === "applications") return mount(applicationsView());
    if (section === "programs" && user.role === Role.ADMIN) return mount(programsView());
  }
  const applicant = applicantRoutes(section, id, action);
  if (applicant) return mount(applicant);
  location.replace(home(user));
}

function renderHeader(): void {
  const user = currentUser();
  const links: Array<[string, Key]> = [];
  if (isStaff(user)) links.push(["#/applications", "nav.applications"]);
  if (user?.role === Role.ADMIN) links.push(["#/programs", "nav.programs"]);
  if (user && !isStaff(user)) links.push(["#/invoices", "nav.invoices"]);
  nav.replaceChildren(...links.map(([href, key]) => h("a", { href, i18n: key })));
  who.replaceChildren();
  if (user) {
    const roleKey = `role.${Role[user.role] ? `ROLE_${Role[user.role]}` : "ROLE_APPLICANT"}` as Key;
    who.append(
      h("span", { class: "user", "data-role": Role[user.role] }, user.fullName, " · ", h("span", { i18n: roleKey })),
      h("button", { type: "button", class: "secondary", i18n: "nav.logout", on: { click: () => void signOut() } }),
    );
  }
}

function renderLangs(): void {
  langs.replaceChildren(
    ...LANGS.map((l) =>
      h(
        "button",
        {
          type: "button",
          class: "lang",
          "data-lang": l,
          "aria-pressed": String(l === lang()),
          on: { click: () => setLang(l) },
        },
        l.toUpperCase(),
      ),
    ),
  );
}

onLangChange(() => {
  renderLangs();
  relabel(document.body);
  view?.relabel?.();
});

onSessionChange((user, ended) => {
  if (ended) sessionEnded = true;
  renderHeader();
  if (!started) return;
  if (user) {
    const target = afterSignIn;
    afterSignIn = null;
    sessionEnded = false;
    if (target && target !== location.hash) location.hash = target;
    else route();
  } else {
    if (location.hash.startsWith("#/payments") || location.hash.startsWith("#/invoices/")) afterSignIn = location.hash;
    if (location.hash === "#/login") route();
    else location.replace("#/login");
  }
});

// A call refused for a dead session (revoked, or signed out elsewhere): back to sign-in.
onSessionEnded(() => {
  sessionEnded = true;
  void signOut();
});

window.addEventListener("hashchange", route);

async function start(): Promise<void> {
  document.documentElement.lang = lang();
  renderLangs();
  relabel(document.body);
  try {
    await resume();
  } catch {
    // Offline at load: show the sign-in page; the tab's session is still kept.
  }
  started = true;
  renderHeader();
  route();
}

void start();
