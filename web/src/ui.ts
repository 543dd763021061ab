// Shared pieces of the views: the error/notice box, field highlighting, busy buttons.

import { type Args, type Key } from "./i18n.js";
import { h } from "./dom.js";
import { type Problem, fieldLabel, isCanceled, isSessionEnd, message, problemOf } from "./errors.js";

/** A view: what it puts on the page, and how it stops (streams, timers) when left. */
export interface View {
  root: HTMLElement;
  /** Redraws what depends on the language beyond plain labels (money, dates). */
  relabel?(): void;
  dispose?(): void;
}

let sessionEnded: (() => void) | null = null;

/** What to do when a call shows that the session is gone (set by main.ts). */
export function onSessionEnded(fn: () => void): void {
  sessionEnded = fn;
}

/** A message box; empty until `show` or `fail`. */
export class Notice {
  readonly el = h("div", { class: "notice", role: "alert", hidden: true });

  show(key: Key, args?: Args, kind: "error" | "ok" = "ok"): void {
    this.el.hidden = false;
    this.el.className = `notice ${kind}`;
    this.el.replaceChildren(h("span", { i18n: key, args }));
  }

  clear(): void {
    this.el.hidden = true;
    this.el.replaceChildren();
    delete this.el.dataset.reason;
  }

  /** Shows a failed call as a readable sentence; marks the form's offending fields. */
  fail(err: unknown, form?: HTMLElement): Problem | null {
    if (isCanceled(err)) return null;
    const problem = problemOf(err);
    if (isSessionEnd(problem) && sessionEnded) {
      sessionEnded();
      return problem;
    }
    const { key, args } = message(problem);
    this.show(key, args, "error");
    this.el.dataset.reason = problem.reason;
    if (form) markFields(form, problem);
    if (problem.fields.length > 1) {
      this.el.append(
        h("ul", {}, problem.fields.map((f) => h("li", { i18n: "error.field", args: { field: fieldLabel(f.field) } }))),
      );
    }
    return problem;
  }
}

/** Highlights the inputs named by a BadRequest (inputs carry the API field name in `name`). */
export function markFields(form: HTMLElement, problem: Problem): void {
  form.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
  for (const f of problem.fields) {
    const last = f.field.split(".").pop() ?? f.field;
    const input = form.querySelector(`[name="${CSS.escape(last)}"]`);
    if (input) {
      input.setAttribute("aria-invalid", "true");
      input.setAttribute("title", f.description);
    }
  }
}

/** Disables `button` while `work` runs. */
export async function busy<T>(button: HTMLButtonElement, work: () => Promise<T>): Promise<T> {
  button.disabled = true;
  try {
    return await work();
  } finally {
    button.disabled = false;
  }
}

/** Waits `ms`, or less if `signal` aborts. */
export function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const id = window.setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      window.clearTimeout(id);
      resolve();
    });
  });
}

export function value(form: HTMLElement, name: string): string {
  const el = form.querySelector(`[name="${name}"]`) as HTMLInputElement | null;
  return el ? el.value.trim() : "";
}
