// Staff views: the live application list, one application (status change, billing), and the
// program catalog for admins.

import { applicationsApi, newIdempotencyKey, paymentsApi } from "./api.js";
import { clear, field, h, setText } from "./dom.js";
import { isCanceled, problemOf } from "./errors.js";
import { millis, money, parseSom, somInput, time } from "./format.js";
import { type Application, ApplicationEventKind, ApplicationStatus, type Program } from "./gen/crm/v1/application_pb.js";
import { type Key, lang } from "./i18n.js";
import { Notice, type View, busy, sleep, value } from "./ui.js";

const STATUSES = [
  ApplicationStatus.NEW,
  ApplicationStatus.IN_REVIEW,
  ApplicationStatus.ACCEPTED,
  ApplicationStatus.REJECTED,
  ApplicationStatus.WITHDRAWN,
];

/** The transitions the server allows (api.md); nothing else is offered. */
const NEXT: Record<ApplicationStatus, ApplicationStatus[]> = {
  [ApplicationStatus.UNSPECIFIED]: [],
  [ApplicationStatus.NEW]: [ApplicationStatus.IN_REVIEW, ApplicationStatus.WITHDRAWN],
  [ApplicationStatus.IN_REVIEW]: [ApplicationStatus.ACCEPTED, ApplicationStatus.REJECTED, ApplicationStatus.WITHDRAWN],
  [ApplicationStatus.ACCEPTED]: [],
  [ApplicationStatus.REJECTED]: [],
  [ApplicationStatus.WITHDRAWN]: [],
};

function statusKey(s: ApplicationStatus): Key {
  return `status.APPLICATION_STATUS_${ApplicationStatus[s]}` as Key;
}

function statusBadge(s: ApplicationStatus): HTMLElement {
  return h("span", { class: `badge s-${ApplicationStatus[s].toLowerCase()}`, "data-status": ApplicationStatus[s], i18n: statusKey(s) });
}

function programTitle(p: Program): string {
  return { uz: p.titleUz, ru: p.titleRu, en: p.titleEn }[lang()] || p.titleEn || p.code;
}

async function loadPrograms(signal: AbortSignal): Promise<Program[]> {
  const res = await applicationsApi.listPrograms({ includeInactive: true }, { signal });
  return res.programs;
}

// ---------------------------------------------------------------------------------------------
// The list

export function applicationsView(): View {
  const ctrl = new AbortController();
  const notice = new Notice();
  const rows = new Map<string, Application>();
  /** Ids that arrived through the stream, highlighted until the list is reloaded. */
  const fresh = new Set<string>();
  let programs: Program[] = [];
  let nextPageToken = "";
  let listing = 0;

  const statusSelect = h(
    "select",
    { name: "status" },
    h("option", { value: "0", i18n: "apps.any" }),
    STATUSES.map((s) => h("option", { value: String(s), i18n: statusKey(s) })),
  );
  const programSelect = h("select", { name: "program_code" }, h("option", { value: "", i18n: "apps.any" }));
  const sourceInput = h("input", { name: "source", placeholder: "bot1", size: 8 });
  const searchInput = h("input", { name: "query", type: "search", placeholder: "apps.search" });
  const filters = h(
    "form",
    { class: "filters", role: "search" },
    field("apps.status", statusSelect),
    field("apps.program", programSelect),
    field("apps.source", sourceInput),
    field("apps.search", searchInput),
  );
  const live = h("span", { class: "live off", "data-live": "off", i18n: "apps.offline" });
  const tbody = h("tbody");
  const more = h("button", { type: "button", class: "secondary", i18n: "apps.more", hidden: true });
  const table = h(
    "table",
    { class: "list" },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        h("th", { i18n: "apps.name" }),
        h("th", { i18n: "apps.phone" }),
        h("th", { i18n: "apps.program" }),
        h("th", { i18n: "apps.source" }),
        h("th", { i18n: "apps.status" }),
        h("th", { i18n: "apps.created" }),
      ),
    ),
    tbody,
  );
  const empty = h("p", { class: "empty", i18n: "apps.empty", hidden: true });

  const current = () => ({
    status: Number(statusSelect.value) as ApplicationStatus,
    programCode: programSelect.value,
    source: sourceInput.value.trim(),
    query: searchInput.value.trim(),
  });

  /** The server's filters, applied to events from the stream (which is unfiltered). */
  function matches(app: Application): boolean {
    const f = current();
    const q = f.query.toLowerCase();
    return (
      (f.status === ApplicationStatus.UNSPECIFIED || app.status === f.status) &&
      (!f.programCode || app.programCode === f.programCode) &&
      (!f.source || app.source === f.source) &&
      (!q || app.fullName.toLowerCase().includes(q) || app.phone.includes(q))
    );
  }

  function render(): void {
    const programName = new Map(programs.map((p) => [p.code, programTitle(p)]));
    const shown = [...rows.values()].filter(matches).sort((a, b) => millis(b.createdAt) - millis(a.createdAt));
    tbody.replaceChildren(
      ...shown.map((app) =>
        h(
          "tr",
          {
            "data-id": app.id,
            class: fresh.has(app.id) ? "fresh" : undefined,
            tabindex: 0,
            on: {
              click: () => (location.hash = `#/applications/${app.id}`),
              keydown: (e) => {
                if ((e as KeyboardEvent).key === "Enter") location.hash = `#/applications/${app.id}`;
              },
            },
          },
          h("td", { class: "name" }, app.fullName),
          h("td", {}, app.phone),
          h("td", {}, app.programCode ? (programName.get(app.programCode) ?? app.programCode) : "—"),
          h("td", {}, app.source),
          h("td", {}, statusBadge(app.status)),
          h("td", {}, time(app.createdAt)),
        ),
      ),
    );
    empty.hidden = shown.length > 0;
    more.hidden = !nextPageToken;
  }

  async function list(reset: boolean): Promise<void> {
    const mine = ++listing;
    const f = current();
    try {
      const res = await applicationsApi.listApplications(
        {
          pageSize: 50,
          pageToken: reset ? "" : nextPageToken,
          status: f.status,
          programCode: f.programCode || undefined,
          source: f.source || undefined,
          query: f.query || undefined,
        },
        { signal: ctrl.signal },
      );
      if (mine !== listing) return; // the filters changed meanwhile
      if (reset) {
        rows.clear();
        fresh.clear();
      }
      for (const app of res.applications) rows.set(app.id, app);
      nextPageToken = res.nextPageToken;
      render();
    } catch (err) {
      notice.fail(err);
    }
  }

  function setLive(on: boolean): void {
    live.dataset.live = on ? "on" : "off";
    live.className = `live ${on ? "on" : "off"}`;
    setText(live, on ? "apps.live" : "apps.offline");
  }

  /** WatchApplications for as long as the view is open; on a break, waits, re-lists, resumes. */
  async function watch(): Promise<void> {
    let delay = 1_000;
    while (!ctrl.signal.aborted) {
      try {
        const stream = applicationsApi.watchApplications(
          { status: ApplicationStatus.UNSPECIFIED },
          { signal: ctrl.signal, onHeader: () => setLive(true) },
        );
        for await (const event of stream) {
          delay = 1_000;
          const app = event.application;
          if (!app) continue;
          if (event.kind === ApplicationEventKind.CREATED) fresh.add(app.id);
          rows.set(app.id, app);
          render();
        }
      } catch (err) {
        if (isCanceled(err) || ctrl.signal.aborted) return;
        const problem = problemOf(err);
        if (problem.reason !== "UNAVAILABLE" && problem.reason !== "network") notice.fail(err);
        if (problem.retryAfter) delay = problem.retryAfter * 1000;
      }
      setLive(false);
      await sleep(delay, ctrl.signal);
      delay = Math.min(delay * 2, 15_000);
      if (!ctrl.signal.aborted) await list(true); // catch up on what the break missed
    }
  }

  let typing: number | undefined;
  filters.addEventListener("input", (e) => {
    e.preventDefault();
    window.clearTimeout(typing);
    render(); // instant, from what is loaded; the server's answer follows
    typing = window.setTimeout(() => void list(true), 300);
  });
  filters.addEventListener("submit", (e) => e.preventDefault());
  more.addEventListener("click", () => void busy(more, () => list(false)));

  void (async () => {
    try {
      programs = await loadPrograms(ctrl.signal);
      programSelect.append(...programs.map((p) => h("option", { value: p.code }, `${p.code} — ${programTitle(p)}`)));
    } catch (err) {
      notice.fail(err);
    }
  })();
  void watch();
  void list(true);

  const root = h(
    "section",
    { class: "applications" },
    h("header", { class: "row" }, h("h1", { i18n: "apps.title" }), live),
    filters,
    notice.el,
    table,
    empty,
    more,
  );
  return {
    root,
    relabel: render,
    dispose: () => ctrl.abort(),
  };
}

// ---------------------------------------------------------------------------------------------
// One application

export function applicationView(id: string): View {
  const ctrl = new AbortController();
  const notice = new Notice();
  const body = h("div", { class: "detail" });
  let app: Application | null = null;

  function show(a: Application): void {
    app = a;
    clear(body);
    const answers = Object.entries(a.answers);
    body.append(
      h("h1", {}, a.fullName, " ", statusBadge(a.status)),
      h(
        "dl",
        {},
        row("apps.id", h("code", {}, a.id)),
        row("apps.phone", a.phone),
        row("apps.email", a.email ?? "—"),
        row("apps.telegram", a.telegramUsername ? `@${a.telegramUsername}` : a.telegramUserId?.toString() ?? "—"),
        row("apps.program", a.programCode ?? "—"),
        row("apps.language", a.language),
        row("apps.source", a.source),
        row("apps.created", time(a.createdAt)),
        row("apps.updated", time(a.updatedAt)),
        row("apps.note", a.note || "—"),
      ),
      answers.length
        ? h(
            "section",
            {},
            h("h2", { i18n: "apps.answers" }),
            h("dl", {}, answers.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
          )
        : "",
      statusForm(a),
      invoiceForm(a),
    );
  }

  function row(label: Key, content: string | Node): Node[] {
    return [h("dt", { i18n: label }), h("dd", {}, content)];
  }

  function statusForm(a: Application): HTMLElement {
    const next = NEXT[a.status];
    if (next.length === 0) return h("p", { class: "muted", i18n: "apps.final" });
    const select = h("select", { name: "status" }, next.map((s) => h("option", { value: String(s), i18n: statusKey(s) })));
    const note = h("textarea", { name: "note", rows: 2, maxlength: 2000, placeholder: "apps.notePlaceholder" });
    const save = h("button", { type: "submit", i18n: "apps.save" });
    const form = h(
      "form",
      { class: "card", "data-form": "status" },
      h("h2", { i18n: "apps.changeStatus" }),
      field("apps.newStatus", select),
      field("apps.note", note),
      save,
    );
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      notice.clear();
      void busy(save, async () => {
        try {
          const updated = await applicationsApi.updateApplicationStatus(
            { id: a.id, status: Number(select.value) as ApplicationStatus, note: note.value.trim() },
            { signal: ctrl.signal },
          );
          show(updated);
          notice.show("apps.saved");
        } catch (err) {
          notice.fail(err, form);
        }
      });
    });
    return form;
  }

  function invoiceForm(a: Application): HTMLElement {
    // One key per attempt: a retry after a lost answer replays the first result instead of
    // billing twice; a new key after any answer, so a corrected form is a new request.
    let key = newIdempotencyKey();
    const submit = h("button", { type: "submit", i18n: "invoice.submit" });
    const form = h(
      "form",
      { class: "card", "data-form": "invoice" },
      h("h2", { i18n: "invoice.create" }),
      field("invoice.payer", h("input", { name: "payer_user_id", required: true, spellcheck: "false" })),
      field("invoice.amount", h("input", { name: "amount_tiyin", inputmode: "decimal", required: true })),
      field("invoice.description", h("input", { name: "description", maxlength: 500 })),
      submit,
    );
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      notice.clear();
      const amount = parseSom(value(form, "amount_tiyin"));
      if (amount === null || amount <= 0n) {
        notice.show("invoice.badAmount", {}, "error");
        form.querySelector('[name="amount_tiyin"]')?.setAttribute("aria-invalid", "true");
        return;
      }
      void busy(submit, async () => {
        try {
          const invoice = await paymentsApi.createInvoice(
            {
              payerUserId: value(form, "payer_user_id"),
              applicationId: a.id,
              amountTiyin: amount,
              description: value(form, "description"),
            },
            { signal: ctrl.signal, headers: { "idempotency-key": key } },
          );
          key = newIdempotencyKey();
          form.reset();
          notice.show("invoice.created", { amount: money(invoice.amountTiyin) });
          notice.el.dataset.invoiceId = invoice.id;
        } catch (err) {
          const problem = notice.fail(err, form);
          if (problem && problem.reason !== "network" && problem.reason !== "UNAVAILABLE") key = newIdempotencyKey();
        }
      });
    });
    return form;
  }

  /** Follows the stream so a colleague's change shows up here too. */
  async function follow(): Promise<void> {
    while (!ctrl.signal.aborted) {
      try {
        for await (const event of applicationsApi.watchApplications({}, { signal: ctrl.signal })) {
          if (event.application?.id === id && app && event.application.status !== app.status) {
            show(event.application);
          }
        }
      } catch (err) {
        if (isCanceled(err) || ctrl.signal.aborted) return;
      }
      await sleep(5_000, ctrl.signal);
    }
  }

  void (async () => {
    try {
      show(await applicationsApi.getApplication({ id }, { signal: ctrl.signal }));
      void follow();
    } catch (err) {
      notice.fail(err);
    }
  })();

  const root = h(
    "section",
    { class: "application" },
    h("a", { href: "#/applications", class: "back", i18n: "apps.back" }),
    notice.el,
    body,
  );
  return {
    root,
    // Dates follow the language (a half-typed form starts over; switching is rare).
    relabel: () => app && show(app),
    dispose: () => ctrl.abort(),
  };
}

// ---------------------------------------------------------------------------------------------
// The program catalog (admins)

const DEGREES = ["bachelor", "master", "phd"] as const;

export function programsView(): View {
  const ctrl = new AbortController();
  const notice = new Notice();
  let programs: Program[] = [];
  const tbody = h("tbody");
  const editor = h("div");

  function render(): void {
    tbody.replaceChildren(
      ...programs.map((p) =>
        h(
          "tr",
          { "data-code": p.code },
          h("td", {}, h("code", {}, p.code)),
          h("td", {}, programTitle(p)),
          h("td", {}, p.degree ? h("span", { i18n: `programs.degree.${p.degree}` as Key }) : "—"),
          h("td", {}, String(p.durationYears)),
          h("td", {}, money(p.tuitionFeeTiyin)),
          h("td", {}, money(p.applicationFeeTiyin)),
          h("td", { i18n: p.active ? "programs.active" : "programs.inactive" }),
          h("td", {}, String(p.sortOrder)),
          h("td", {}, h("button", { type: "button", class: "secondary", i18n: "programs.edit", on: { click: () => edit(p) } })),
        ),
      ),
    );
  }

  async function load(): Promise<void> {
    try {
      programs = await loadPrograms(ctrl.signal);
      render();
    } catch (err) {
      notice.fail(err);
    }
  }

  function edit(p: Program | null): void {
    notice.clear();
    const save = h("button", { type: "submit", i18n: "programs.save" });
    const cancel = h("button", { type: "button", class: "secondary", i18n: "programs.cancel", on: { click: () => clear(editor) } });
    const input = (name: string, v: string, extra: Record<string, unknown> = {}) => h("input", { name, value: v, ...extra });
    const form = h(
      "form",
      { class: "card grid", "data-form": "program" },
      field("programs.code", input("code", p?.code ?? "", { required: true, pattern: "[A-Z0-9-]{2,32}", readOnly: p !== null })),
      field("programs.titleUz", input("title_uz", p?.titleUz ?? "", { required: true })),
      field("programs.titleRu", input("title_ru", p?.titleRu ?? "", { required: true })),
      field("programs.titleEn", input("title_en", p?.titleEn ?? "", { required: true })),
      field(
        "programs.degree",
        h(
          "select",
          { name: "degree" },
          h("option", { value: "", i18n: "programs.degreeNone" }),
          DEGREES.map((d) => h("option", { value: d, selected: p?.degree === d, i18n: `programs.degree.${d}` as Key })),
        ),
      ),
      field("programs.years", input("duration_years", String(p?.durationYears ?? 4), { type: "number", min: 0, max: 10 })),
      field("programs.tuition", input("tuition_fee_tiyin", somInput(p?.tuitionFeeTiyin ?? 0n), { inputmode: "decimal" })),
      field("programs.fee", input("application_fee_tiyin", somInput(p?.applicationFeeTiyin ?? 0n), { inputmode: "decimal" })),
      field("programs.order", input("sort_order", String(p?.sortOrder ?? 0), { type: "number" })),
      h("label", { class: "check" }, h("input", { name: "active", type: "checkbox", checked: p?.active ?? true }), h("span", { i18n: "programs.active" })),
      h("div", { class: "actions" }, save, cancel),
    );
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      notice.clear();
      const tuition = parseSom(value(form, "tuition_fee_tiyin"));
      const fee = parseSom(value(form, "application_fee_tiyin"));
      if (tuition === null || fee === null) {
        notice.show("invoice.badAmount", {}, "error");
        return;
      }
      void busy(save, async () => {
        try {
          await applicationsApi.upsertProgram(
            {
              program: {
                code: value(form, "code"),
                titleUz: value(form, "title_uz"),
                titleRu: value(form, "title_ru"),
                titleEn: value(form, "title_en"),
                degree: value(form, "degree") || undefined,
                durationYears: Number(value(form, "duration_years")),
                tuitionFeeTiyin: tuition,
                applicationFeeTiyin: fee,
                active: (form.querySelector('[name="active"]') as HTMLInputElement).checked,
                sortOrder: Number(value(form, "sort_order")),
              },
            },
            { signal: ctrl.signal },
          );
          clear(editor);
          notice.show("programs.saved");
          await load();
        } catch (err) {
          notice.fail(err, form);
        }
      });
    });
    editor.replaceChildren(form);
  }

  void load();
  const root = h(
    "section",
    { class: "programs" },
    h(
      "header",
      { class: "row" },
      h("h1", { i18n: "programs.title" }),
      h("button", { type: "button", i18n: "programs.new", on: { click: () => edit(null) } }),
    ),
    notice.el,
    editor,
    h(
      "table",
      { class: "list" },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          ["programs.code", "apps.program", "programs.degree", "programs.years", "programs.tuition", "programs.fee", "programs.active", "programs.order"].map(
            (k) => h("th", { i18n: k as Key }),
          ),
          h("th"),
        ),
      ),
      tbody,
    ),
  );
  return { root, relabel: render, dispose: () => ctrl.abort() };
}
