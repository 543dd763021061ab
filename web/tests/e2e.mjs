// The browser test: the real server binary on a fresh SQLite database, Debian's Chromium
// driven by playwright-core, and a bot and Payme played by this script.
//
//   staff signs in -> a bot submits over native gRPC -> the row appears live -> staff moves it
//   to IN_REVIEW with a note and bills the applicant; the applicant registers, pays with Payme
//   (the checkout page is faked in the browser: nothing leaves the machine), comes back, and
//   the page turns "Paid" without a reload when this script plays Payme's webhook calls.
//
// Environment: CRM_SERVER_BIN (default ../target/debug/crm-server, built if missing),
// CHROMIUM (default /usr/bin/chromium). Screenshots and the server log go to test-results/.

import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { chromium } from "playwright-core";
import { ApplicationService } from "../src/gen/crm/v1/application_pb.js";

const webDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const repoDir = path.resolve(webDir, "..");
const results = path.join(webDir, "test-results");
const serverBin = path.resolve(webDir, process.env.CRM_SERVER_BIN ?? "../target/debug/crm-server");
const chromiumBin = process.env.CHROMIUM ?? "/usr/bin/chromium";

const MERCHANT = "5e730e8e0b852a417aa49ceb";
const PAYME_KEY = "e2e-payme-test-key";
const CHECKOUT = "http://checkout.payme.test";
const STAFF = { email: "staff@e2e.test", password: "staff-password-e2e" };
const ADMIN = { email: "admin@e2e.test", password: "admin-password-e2e" };
const APPLICANT = { name: "Aziza Karimova", phone: "+998935550123", password: "applicant-pw-e2e" };
const AMOUNT_TIYIN = 150_000; // 1 500 so'm
/** Our idempotency keys: random UUIDs (v4). */
const UUID_V4 = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
/** The server's ids (time-ordered UUIDs). */
const ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

let step = "starting";
const log = (msg) => console.log(`  ${msg}`);
function begin(name) {
  step = name;
  console.log(`- ${name}`);
}

// ---------------------------------------------------------------------------------------------
// The server

const dataDir = mkdtempSync(path.join(tmpdir(), "crm-e2e-"));
const serverEnv = {
  PATH: process.env.PATH ?? "/usr/bin:/bin",
  DATABASE_URL: `sqlite://${dataDir}/crm.db?mode=rwc`,
  CRM_DATA_DIR: dataDir,
  LISTEN_ADDR: "127.0.0.1:0",
  LOG_FORMAT: "json",
  SECRET_KEY: "e2e-secret-key-that-is-long-enough-0123456789",
  // As the README tells operators: the app is served by the server itself, so its calls are
  // same-origin and CORS_ALLOWED_ORIGINS stays unset (it lists *other* origins only).
  PAYME_MERCHANT_ID: MERCHANT,
  PAYME_SECRET_KEY: PAYME_KEY,
  PAYME_CHECKOUT_URL: CHECKOUT,
};

function cli(args, extraEnv = {}) {
  const env = { ...serverEnv, ...extraEnv };
  return execFileSync(serverBin, args, { env, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] }).trim();
}

function startServer() {
  return new Promise((resolve, reject) => {
    const child = spawn(serverBin, ["serve"], { env: serverEnv, stdio: ["ignore", "ignore", "pipe"] });
    let logText = "";
    let found = false;
    const timer = setTimeout(() => reject(new Error(`the server did not log its address:\n${logText}`)), 30_000);
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (chunk) => {
      logText += chunk;
      if (found) return;
      for (const line of logText.split("\n")) {
        try {
          const addr = JSON.parse(line).local_addr;
          if (addr) {
            found = true;
            clearTimeout(timer);
            resolve({ child, origin: `http://${addr}`, log: () => logText });
            return;
          }
        } catch {
          // not a complete JSON line yet
        }
      }
    });
    child.on("exit", (code) => {
      if (!found) reject(new Error(`the server exited (${code}) before listening:\n${logText}`));
    });
  });
}

async function stopServer(server) {
  if (server.child.exitCode !== null) return;
  const exited = new Promise((resolve) => server.child.once("exit", resolve));
  server.child.kill("SIGTERM");
  const timeout = new Promise((resolve) => setTimeout(() => resolve("timeout"), 15_000));
  if ((await Promise.race([exited, timeout])) === "timeout") server.child.kill("SIGKILL");
}

// ---------------------------------------------------------------------------------------------
// Payme, as tests/api/payme.rs calls it

let rpcId = 1;
async function payme(origin, method, params) {
  const res = await fetch(`${origin}/webhooks/payme`, {
    method: "POST",
    headers: {
      "content-type": "application/json",
      authorization: `Basic ${Buffer.from(`Paycom:${PAYME_KEY}`).toString("base64")}`,
    },
    body: JSON.stringify({ method, params, id: rpcId++ }),
  });
  assert.equal(res.status, 200);
  const body = await res.json();
  assert.ok(!body.error, `${method} answered an error: ${JSON.stringify(body.error)}`);
  return body.result;
}

/** Decodes a Payme checkout link: `<base>/<base64 of m=..;ac.order_id=..;a=..;c=..>`. */
function decodeCheckout(url) {
  const encoded = decodeURIComponent(url.slice(CHECKOUT.length + 1));
  const fields = {};
  for (const pair of Buffer.from(encoded, "base64").toString("utf8").split(";")) {
    const eq = pair.indexOf("=");
    fields[pair.slice(0, eq)] = pair.slice(eq + 1);
  }
  return fields;
}

// ---------------------------------------------------------------------------------------------
// The browser

function watchPage(page, name, problems) {
  page.on("pageerror", (err) => problems.push(`${name}: uncaught ${err.message}`));
  page.on("console", (msg) => {
    // A CSP violation is reported on the console; any means the policy and the app disagree.
    if (/Content Security Policy|Refused to/i.test(msg.text())) problems.push(`${name}: ${msg.text()}`);
  });
}

async function noticeText(page) {
  const notice = page.locator(".notice:not([hidden])").first();
  await notice.waitFor({ timeout: 10_000 });
  return (await notice.innerText()).trim();
}

async function main() {
  mkdirSync(results, { recursive: true });
  if (!existsSync(serverBin)) {
    begin(`building ${serverBin}`);
    execFileSync("cargo", ["build", "--bin", "crm-server"], { cwd: repoDir, stdio: "inherit" });
  }
  assert.ok(existsSync(chromiumBin), `${chromiumBin} is missing: apt-get install chromium`);

  begin("operator setup with the CLI: a staff account and bot1's token");
  cli(["user", "create", "--role", "staff", "--email", STAFF.email, "--full-name", "Staff Member"], {
    CRM_PASSWORD: STAFF.password,
  });
  cli(["user", "create", "--role", "admin", "--email", ADMIN.email, "--full-name", "Admin"], {
    CRM_PASSWORD: ADMIN.password,
  });
  const botToken = cli(["token", "create", "bot1"]);
  assert.match(botToken, /^[0-9a-f]{64}$/);

  const server = await startServer();
  const { origin } = server;
  log(`server at ${origin}`);
  const browser = await chromium.launch({
    executablePath: chromiumBin,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
  });
  const problems = [];
  const leaks = [];
  try {
    const newContext = async () => {
      const context = await browser.newContext({ locale: "en-US", viewport: { width: 1200, height: 860 } });
      // Nothing but our server is reached; the provider's checkout page is faked below.
      await context.route(
        (url) => url.origin !== origin,
        (route) => {
          leaks.push(route.request().url());
          return route.abort();
        },
      );
      return context;
    };

    // -------------------------------------------------------------------------------------
    begin("the page is served with its own CSP");
    const staffContext = await newContext();
    const staff = await staffContext.newPage();
    watchPage(staff, "staff", problems);
    const response = await staff.goto(`${origin}/`);
    assert.equal(response.status(), 200);
    const csp = response.headers()["content-security-policy"] ?? "";
    for (const directive of ["script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"]) {
      assert.ok(csp.includes(directive), `CSP lacks ${directive}: ${csp}`);
    }
    assert.ok(!csp.includes("unsafe-inline"), csp);

    begin("staff: a wrong password reads as a sentence, not a code");
    await staff.click('[data-lang="en"]');
    await staff.fill('[name="login"]', STAFF.email);
    await staff.fill('[name="password"]', "not-the-password");
    await staff.click('form[data-form="signin"] button[type="submit"]');
    const wrong = await noticeText(staff);
    assert.equal(wrong, "Wrong login or password.");

    begin("staff signs in and the list goes live");
    await staff.fill('[name="password"]', STAFF.password);
    await staff.click('form[data-form="signin"] button[type="submit"]');
    await staff.waitForURL(/#\/applications$/);
    await staff.locator('[data-live="on"]').waitFor({ timeout: 10_000 });
    await staff.evaluate(() => (window.__sameDocument = true));

    begin("a bot submits over native gRPC; the application appears without a reload");
    const bot = createClient(ApplicationService, createGrpcTransport({ baseUrl: origin }));
    const submitted = await bot.submitApplication(
      {
        fullName: "Dilnoza Rahimova",
        phone: "+998901112233",
        language: "uz",
        programCode: "CS-BSC",
        answers: { school: "Lyceum 1" },
      },
      { headers: { "x-service-token": botToken } },
    );
    const row = staff.locator(`tr[data-id="${submitted.id}"]`);
    await row.waitFor({ timeout: 10_000 });
    assert.match(await row.innerText(), /Dilnoza Rahimova/);
    assert.equal(await row.locator("[data-status]").getAttribute("data-status"), "NEW");
    assert.equal(await staff.evaluate(() => window.__sameDocument), true, "the staff page reloaded");
    await staff.screenshot({ path: path.join(results, "staff-list.png"), fullPage: true });
    log("saved test-results/staff-list.png");

    begin("staff opens it and moves it to IN_REVIEW with a note (only allowed moves offered)");
    await row.click();
    await staff.waitForURL(new RegExp(`#/applications/${submitted.id}$`));
    const statusSelect = staff.locator('form[data-form="status"] select[name="status"]');
    await statusSelect.waitFor();
    const offered = await statusSelect.locator("option").evaluateAll((os) => os.map((o) => o.textContent));
    assert.deepEqual(offered, ["In review", "Withdrawn"]);
    await statusSelect.selectOption({ label: "In review" });
    await staff.fill('form[data-form="status"] [name="note"]', "Documents checked");
    await staff.click('form[data-form="status"] button[type="submit"]');
    await staff.locator('h1 [data-status="IN_REVIEW"]').waitFor({ timeout: 10_000 });
    assert.equal(await noticeText(staff), "Status changed.");
    const after = await bot.getApplication({ id: submitted.id }, { headers: { "x-service-token": botToken } });
    assert.equal(after.status, 2 /* IN_REVIEW */);
    assert.equal(after.note, "Documents checked");

    // -------------------------------------------------------------------------------------
    begin("applicant: a bad phone reads as a field message; then registers");
    const applicantContext = await newContext();
    const applicant = await applicantContext.newPage();
    watchPage(applicant, "applicant", problems);
    await applicant.goto(`${origin}/#/register`);
    await applicant.click('[data-lang="en"]');
    await applicant.fill('[name="full_name"]', APPLICANT.name);
    await applicant.fill('[name="phone"]', "12345");
    await applicant.fill('[name="password"]', APPLICANT.password);
    await applicant.click('form[data-form="register"] button[type="submit"]');
    assert.equal(await noticeText(applicant), "Phone: please check this value.");
    assert.equal(await applicant.getAttribute('[name="phone"]', "aria-invalid"), "true");
    await applicant.fill('[name="phone"]', APPLICANT.phone);
    await applicant.click('form[data-form="register"] button[type="submit"]');
    await applicant.waitForURL(/#\/invoices$/);
    const userId = await applicant.locator("[data-user-id]").getAttribute("data-user-id");
    assert.match(userId ?? "", ID);

    begin("staff bills the applicant from the application page");
    await staff.fill('form[data-form="invoice"] [name="payer_user_id"]', userId);
    await staff.fill('form[data-form="invoice"] [name="amount_tiyin"]', "1500");
    await staff.fill('form[data-form="invoice"] [name="description"]', "Application fee");
    await staff.click('form[data-form="invoice"] button[type="submit"]');
    assert.equal(await noticeText(staff), "Invoice created: 1,500.00 UZS.");
    const invoiceId = await staff.locator(".notice[data-invoice-id]").getAttribute("data-invoice-id");
    await staff.screenshot({ path: path.join(results, "staff.png"), fullPage: true });
    log("saved test-results/staff.png");

    begin("the applicant pays with Payme: a fresh idempotency key, then the checkout link");
    await applicant.click('button:has-text("Refresh")');
    const card = applicant.locator(`[data-invoice-id="${invoiceId}"]`);
    await card.waitFor({ timeout: 10_000 });
    assert.equal(await card.getAttribute("data-status"), "UNPAID");
    let checkoutUrl = "";
    await applicantContext.route(`${CHECKOUT}/**`, (route) => {
      checkoutUrl = route.request().url();
      const back = decodeCheckout(checkoutUrl).c ?? "";
      return route.fulfill({
        contentType: "text/html",
        body: `<!doctype html><title>Payme (test)</title><h1>Payme test checkout</h1><a id="back" href="${back}">Return to the merchant</a>`,
      });
    });
    await card.locator('select[name="provider"]').selectOption({ label: "Payme" });
    const [create] = await Promise.all([
      applicant.waitForRequest((r) => r.url().endsWith("/crm.v1.PaymentService/CreatePayment")),
      card.locator('button[type="submit"]').click(),
    ]);
    assert.match((await create.allHeaders())["idempotency-key"] ?? "", UUID_V4);
    await applicant.waitForURL(`${CHECKOUT}/**`);
    const link = decodeCheckout(checkoutUrl);
    assert.equal(link.m, MERCHANT);
    assert.equal(link["ac.order_id"], invoiceId);
    assert.equal(link.a, String(AMOUNT_TIYIN));
    assert.equal(link.c, `${origin}/#/invoices/${invoiceId}/return`);
    const check = await payme(origin, "CheckPerformTransaction", {
      amount: AMOUNT_TIYIN,
      account: { order_id: invoiceId },
    });
    assert.equal(check.allow, true);

    begin("back from checkout: the session resumes through Refresh; the payment is pending");
    const refreshed = applicant.waitForResponse((r) => r.url().endsWith("/crm.v1.AuthService/Refresh"));
    await applicant.click("#back");
    assert.equal((await refreshed).status(), 200);
    await applicant.waitForURL(/#\/payments\/[0-9a-f-]{36}$/);
    await applicant.locator('.status[data-status="PENDING"]').waitFor({ timeout: 10_000 });
    await applicant.evaluate(() => (window.__sameDocument = true));

    begin("Payme creates and performs its transaction; the page shows Paid without a reload");
    const transaction = { id: `e2e-${Date.now()}`, time: Date.now(), amount: AMOUNT_TIYIN, account: { order_id: invoiceId } };
    assert.equal((await payme(origin, "CreateTransaction", transaction)).state, 1);
    assert.equal((await payme(origin, "PerformTransaction", { id: transaction.id })).state, 2);
    const status = applicant.locator('.status[data-status="PAID"]');
    await status.waitFor({ timeout: 10_000 });
    assert.equal((await status.innerText()).trim(), "Paid");
    assert.equal(await applicant.evaluate(() => window.__sameDocument), true, "the payment page reloaded");

    begin("the language switch relabels the page in place (ru, uz)");
    await applicant.click('[data-lang="ru"]');
    assert.equal((await status.innerText()).trim(), "Оплачено");
    assert.match(await applicant.locator("dd").first().innerText(), /1\s500,00 сум/);
    await applicant.click('[data-lang="uz"]');
    assert.equal((await status.innerText()).trim(), "To'landi");
    await applicant.click('[data-lang="en"]');
    await applicant.screenshot({ path: path.join(results, "applicant.png"), fullPage: true });
    log("saved test-results/applicant.png");

    // -------------------------------------------------------------------------------------
    begin("an admin edits the program catalog (UpsertProgram)");
    const adminContext = await newContext();
    const admin = await adminContext.newPage();
    watchPage(admin, "admin", problems);
    await admin.goto(`${origin}/#/login`);
    await admin.fill('[name="login"]', ADMIN.email);
    await admin.fill('[name="password"]', ADMIN.password);
    await admin.click('form[data-form="signin"] button[type="submit"]');
    await admin.waitForURL(/#\/applications$/);
    await admin.click('a[href="#/programs"]');
    const programRow = admin.locator('tr[data-code="CS-BSC"]');
    await programRow.locator("button").click();
    await admin.fill('form[data-form="program"] [name="title_en"]', "Computer Science (updated)");
    await admin.fill('form[data-form="program"] [name="application_fee_tiyin"]', "250000");
    await admin.click('form[data-form="program"] button[type="submit"]');
    assert.equal(await noticeText(admin), "Program saved.");
    await admin.locator('tr[data-code="CS-BSC"]:has-text("Computer Science (updated)")').waitFor();
    assert.match(await programRow.innerText(), /250,000\.00 UZS/);
    const catalog = await bot.listPrograms({}, { headers: { "x-service-token": botToken } });
    const edited = catalog.programs.find((p) => p.code === "CS-BSC");
    assert.equal(edited?.titleEn, "Computer Science (updated)");
    assert.equal(edited?.applicationFeeTiyin, 25_000_000n);
    await admin.screenshot({ path: path.join(results, "admin-programs.png"), fullPage: true });

    // -------------------------------------------------------------------------------------
    begin("a refresh token that no longer works sends the staff member back to sign-in");
    await staff.evaluate(() => sessionStorage.setItem("crm.refresh", "0".repeat(64)));
    await staff.reload();
    await staff.waitForURL(/#\/login$/);
    assert.equal(await noticeText(staff), "Your session has ended. Please sign in again.");

    begin("RATE_LIMITED reads as a sentence with the seconds to wait");
    let limited = "";
    for (let attempt = 0; attempt < 8 && !limited; attempt++) {
      await staff.fill('[name="login"]', STAFF.email);
      await staff.fill('[name="password"]', "still-not-the-password");
      await staff.click('form[data-form="signin"] button[type="submit"]');
      await staff.locator('.notice[data-reason]').waitFor();
      if ((await staff.locator(".notice").getAttribute("data-reason")) === "RATE_LIMITED") {
        limited = await noticeText(staff);
      }
    }
    assert.match(limited, /^Too many attempts\. Try again in \d+ s\.$/);

    assert.deepEqual(problems, [], "console errors or CSP violations");
    assert.deepEqual(leaks, [], "requests that would have left the machine");
  } finally {
    await browser.close().catch(() => {});
    await stopServer(server);
    writeFileSync(path.join(results, "server.log"), server.log());
  }
}

try {
  await main();
  rmSync(dataDir, { recursive: true, force: true });
  console.log("\ne2e: 1 passed, 0 failed");
} catch (err) {
  console.error(`\ne2e FAILED at step "${step}":\n${err?.stack ?? err}`);
  console.error(`(server log: ${path.join(results, "server.log")}; screenshots in ${results})`);
  console.log("\ne2e: 0 passed, 1 failed");
  process.exitCode = 1;
}
