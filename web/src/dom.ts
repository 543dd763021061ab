// A tiny DOM helper: elements built from data, text always set as text (never as HTML, so
// nothing the API returns can become markup), and translated strings that follow the
// language switch. An element with `i18n` keeps its key in `data-i18n` (and its arguments in
// `data-i18n-args`); `relabel()` rewrites all of them in place.

import { type Args, type Key, isKey, t } from "./i18n.js";

type Child = Node | string | null | undefined | false | Child[];

export interface Props {
  /** Text from the dictionary. */
  i18n?: Key;
  args?: Args;
  /** Placeholder: a dictionary key, or literal text. */
  placeholder?: string;
  /** Label (aria-label) from the dictionary. */
  label?: Key;
  class?: string;
  on?: Partial<Record<keyof HTMLElementEventMap, (event: Event) => void>>;
  [attribute: string]: unknown;
}

export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  props: Props = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    switch (name) {
      case "i18n":
        el.dataset.i18n = value as string;
        break;
      case "args":
        el.dataset.i18nArgs = JSON.stringify(value);
        break;
      case "placeholder":
        // A dictionary key is translated; anything else (an example number) is shown as is.
        if (isKey(value as string)) el.dataset.i18nPlaceholder = value as string;
        else el.setAttribute("placeholder", value as string);
        break;
      case "label":
        el.dataset.i18nLabel = value as string;
        break;
      case "on":
        for (const [event, handler] of Object.entries(value as Props["on"] & object)) {
          el.addEventListener(event, handler as EventListener);
        }
        break;
      case "value":
        (el as HTMLInputElement).value = String(value);
        break;
      case "checked":
      case "selected":
      case "disabled":
      case "required":
      case "readOnly":
        (el as unknown as Record<string, boolean>)[name] = Boolean(value);
        break;
      default:
        el.setAttribute(name === "class" ? "class" : name, value === true ? "" : String(value));
    }
  }
  append(el, children);
  relabel(el);
  return el;
}

function append(el: Element, children: Child[]): void {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child);
  }
}

/** Re-applies the dictionary to `root` and everything under it. */
export function relabel(root: Element): void {
  const all = [root, ...root.querySelectorAll("[data-i18n],[data-i18n-placeholder],[data-i18n-label]")];
  for (const el of all) {
    if (!(el instanceof HTMLElement)) continue;
    const args = el.dataset.i18nArgs ? (JSON.parse(el.dataset.i18nArgs) as Args) : {};
    if (el.dataset.i18n) el.textContent = t(el.dataset.i18n as Key, args);
    if (el.dataset.i18nPlaceholder) {
      el.setAttribute("placeholder", t(el.dataset.i18nPlaceholder as Key));
    }
    if (el.dataset.i18nLabel) el.setAttribute("aria-label", t(el.dataset.i18nLabel as Key));
  }
}

/** Changes the key (and arguments) of a translated element. */
export function setText(el: HTMLElement, key: Key, args?: Args): void {
  el.dataset.i18n = key;
  if (args) el.dataset.i18nArgs = JSON.stringify(args);
  else delete el.dataset.i18nArgs;
  el.textContent = t(key, args);
}

export function clear(el: Element): void {
  el.replaceChildren();
}

/** A labelled form field. */
export function field(label: Key, input: HTMLElement): HTMLLabelElement {
  return h("label", { class: "field" }, h("span", { i18n: label }), input);
}
