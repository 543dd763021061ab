// Applicant views: their invoices, paying one, and the payment's live status.
//
// Paying leaves the page: CreatePayment (with a fresh idempotency key per click) returns the
// provider's checkout link, and the provider sends the payer back to `return_url`, which is
// this page at `#/invoices/<invoice id>/return`. That route finds the invoice's newest payment
// and shows `#/payments/<payment id>`, the status view fed by WatchPayment. Before leaving,
// the current history entry is replaced by that status view too, so the browser's Back
// button from the provider's page also lands there.

import { newIdempotencyKey, paymentsApi } from "./api.js";
import { clear, field, h, setText } from "./dom.js";
import { isCanceled, problemOf } from "./errors.js";
import { millis, money, time } from "./format.js";
import { type Invoice, InvoiceStatus, type Payment, PaymentStatus, Provider } from "./gen/crm/v1/payment_pb.js";
import type { Key } from "./i18n.js";
import { currentUser } from "./session.js";
import { Notice, type View, busy, sleep } from "./ui.js";

const PROVIDERS = [Provider.PAYME, Provider.CLICK, Provider.UZUM];
const FINAL = new Set([PaymentStatus.PAID, PaymentStatus.CANCELLED, PaymentStatus.FAILED, PaymentStatus.REFUNDED]);

const providerKey = (p: Provider) => `provider.PROVIDER_${Provider[p]}` as Key;
const invoiceStatusKey = (s: InvoiceStatus) => `status.INVOICE_STATUS_${InvoiceStatus[s]}` as Key;
const paymentStatusKey = (s: PaymentStatus) => `status.PAYMENT_STATUS_${PaymentStatus[s]}` as Key;

export function invoicesView(): View {
  const ctrl = new AbortController();
  const notice = new Notice();
  const list = h("div", { class: "invoices" });
  let invoices: Invoice[] = [];

  function render(): void {
    clear(list);
    if (invoices.length === 0) {
      list.append(h("p", { class: "empty", i18n: "me.empty" }));
      return;
    }
    for (const inv of invoices) list.append(invoiceCard(inv));
  }

  function invoiceCard(inv: Invoice): HTMLElement {
    const status = InvoiceStatus[inv.status];
    const card = h(
      "article",
      { class: "card invoice", "data-invoice-id": inv.id, "data-status": status },
      h(
        "header",
        { class: "row" },
        h("h2", {}, inv.description || "—"),
        h("span", { class: `badge s-${status.toLowerCase()}`, i18n: invoiceStatusKey(inv.status) }),
      ),
      h("p", { class: "amount" }, money(inv.amountTiyin)),
      h("p", { class: "muted" }, time(inv.createdAt)),
    );
    if (inv.status === InvoiceStatus.PAID) {
      card.append(h("p", { class: "muted", i18n: "me.paidAt", args: { time: time(inv.paidAt) } }));
    }
    if (inv.status !== InvoiceStatus.UNPAID) return card;

    const select = h(
      "select",
      { name: "provider" },
      PROVIDERS.map((p) => h("option", { value: String(p), i18n: providerKey(p) })),
    );
    const pay = h("button", { type: "submit", i18n: "me.pay" });
    const form = h("form", { class: "pay", "data-form": "pay" }, field("me.provider", select), pay);
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      notice.clear();
      void busy(pay, async () => {
        try {
          const payment = await paymentsApi.createPayment(
            {
              invoiceId: inv.id,
              provider: Number(select.value) as Provider,
              returnUrl: `${location.origin}/#/invoices/${inv.id}/return`,
            },
            // A fresh key per click: the server already answers a second click with the same
            // pending payment, and a key is never reused for a different request.
            { signal: ctrl.signal, headers: { "idempotency-key": newIdempotencyKey() } },
          );
          notice.show("me.redirecting");
          history.replaceState(null, "", `#/payments/${payment.id}`);
          location.assign(payment.checkoutUrl);
        } catch (err) {
          notice.fail(err, form);
        }
      });
    });
    card.append(form);
    return card;
  }

  async function load(): Promise<void> {
    try {
      const res = await paymentsApi.listInvoices({ pageSize: 100 }, { signal: ctrl.signal });
      invoices = res.invoices;
      render();
    } catch (err) {
      notice.fail(err);
    }
  }

  const refresh = h("button", { type: "button", class: "secondary", i18n: "me.refresh" });
  refresh.addEventListener("click", () => void busy(refresh, load));
  void load();

  const me = currentUser();
  const root = h(
    "section",
    { class: "me" },
    h("header", { class: "row" }, h("h1", { i18n: "me.title" }), refresh),
    h("p", { class: "muted" }, h("span", { i18n: "me.id" }), " ", h("code", { "data-user-id": me?.id ?? "" }, me?.id ?? "")),
    notice.el,
    list,
  );
  return { root, relabel: render, dispose: () => ctrl.abort() };
}

/** `#/invoices/<id>/return`: the provider sent the payer back; show the newest payment. */
export function returnView(invoiceId: string): View {
  const ctrl = new AbortController();
  const notice = new Notice();
  void (async () => {
    try {
      const res = await paymentsApi.listPayments({ invoiceId, pageSize: 50 }, { signal: ctrl.signal });
      const newest = [...res.payments].sort((a, b) => millis(b.createdAt) - millis(a.createdAt))[0];
      if (newest) location.replace(`#/payments/${newest.id}`);
      else notice.show("pay.notFound", {}, "error");
    } catch (err) {
      notice.fail(err);
    }
  })();
  const root = h("section", {}, h("a", { href: "#/invoices", class: "back", i18n: "pay.back" }), notice.el);
  return { root, dispose: () => ctrl.abort() };
}

/** `#/payments/<id>`: the payment's status, live, until it is final. */
export function paymentView(id: string): View {
  const ctrl = new AbortController();
  const notice = new Notice();
  const badge = h("p", { class: "status", "data-status": "", role: "status", "aria-live": "polite" });
  const details = h("dl");
  const hint = h("p", { class: "muted" });
  const actions = h("div", { class: "actions" });
  let payment: Payment | null = null;

  function render(): void {
    if (!payment) return;
    const p = payment;
    const status = PaymentStatus[p.status];
    badge.dataset.status = status;
    badge.className = `status s-${status.toLowerCase()}`;
    setText(badge, paymentStatusKey(p.status));
    details.replaceChildren(
      h("dt", { i18n: "pay.amount" }),
      h("dd", {}, money(p.amountTiyin)),
      h("dt", { i18n: "pay.provider" }),
      h("dd", { i18n: providerKey(p.provider) }),
    );
    if (p.status === PaymentStatus.PAID) setText(hint, "pay.done");
    else if (p.status === PaymentStatus.PENDING) setText(hint, "pay.waiting");
    else hint.textContent = "";
    actions.replaceChildren();
    if (p.status === PaymentStatus.PENDING) {
      const cancel = h("button", { type: "button", class: "secondary", i18n: "pay.cancel" });
      cancel.addEventListener("click", () =>
        void busy(cancel, async () => {
          try {
            payment = await paymentsApi.cancelPayment({ id }, { signal: ctrl.signal });
            render();
          } catch (err) {
            notice.fail(err);
          }
        }),
      );
      actions.append(h("a", { href: p.checkoutUrl, class: "button", i18n: "pay.reopen" }), cancel);
    }
  }

  /** WatchPayment: the current state first, then each change; ends at a final status. */
  async function watch(): Promise<void> {
    let delay = 1_000;
    while (!ctrl.signal.aborted) {
      try {
        for await (const p of paymentsApi.watchPayment({ id }, { signal: ctrl.signal })) {
          delay = 1_000;
          notice.clear();
          payment = p;
          render();
        }
        if (payment && FINAL.has(payment.status)) return;
      } catch (err) {
        if (isCanceled(err) || ctrl.signal.aborted) return;
        const problem = problemOf(err);
        if (problem.reason === "NOT_FOUND" || problem.reason === "FORBIDDEN") {
          notice.fail(err);
          return;
        }
        // Throttled or cut off: say so, wait as told, and pick the stream up again.
        if (problem.reason !== "UNAVAILABLE" && problem.reason !== "network") notice.fail(err);
        if (problem.retryAfter) delay = problem.retryAfter * 1000;
      }
      await sleep(delay, ctrl.signal);
      delay = Math.min(delay * 2, 30_000);
    }
  }
  void watch();

  const root = h(
    "section",
    { class: "payment", "data-payment-id": id },
    h("a", { href: "#/invoices", class: "back", i18n: "pay.back" }),
    h("h1", { i18n: "pay.title" }),
    notice.el,
    badge,
    details,
    hint,
    actions,
  );
  return { root, relabel: render, dispose: () => ctrl.abort() };
}
