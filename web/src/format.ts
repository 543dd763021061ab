// Money and time as people read them, in the current language. Money stays integer tiyin
// (bigint) until it is printed: no floating point ever touches an amount.

import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { lang, locale } from "./i18n.js";

const CURRENCY = { uz: "so'm", ru: "сум", en: "UZS" } as const;

/** 150000n tiyin -> "1 500,00 so'm" (uz/ru) or "1,500.00 UZS" (en). */
export function money(tiyin: bigint): string {
  const negative = tiyin < 0n;
  const abs = negative ? -tiyin : tiyin;
  const whole = new Intl.NumberFormat(locale()).format(abs / 100n);
  const cents = (abs % 100n).toString().padStart(2, "0");
  const sep = lang() === "en" ? "." : ",";
  return `${negative ? "-" : ""}${whole}${sep}${cents} ${CURRENCY[lang()]}`;
}

/** "1500", "1 500,5", "1500.50" -> 150050n tiyin; null when it is not an amount. */
export function parseSom(input: string): bigint | null {
  const text = input.replace(/[\s\u00a0']/g, "").replace(",", ".");
  const m = /^(\d{1,13})(?:\.(\d{1,2}))?$/.exec(text);
  if (!m) return null;
  return BigInt(m[1]) * 100n + BigInt((m[2] ?? "0").padEnd(2, "0"));
}

/** Tiyin as an editable so'm string: 150050n -> "1500.50". */
export function somInput(tiyin: bigint): string {
  return `${tiyin / 100n}.${(tiyin % 100n).toString().padStart(2, "0")}`;
}

export function time(ts: Timestamp | undefined): string {
  if (!ts) return "—";
  return new Intl.DateTimeFormat(locale(), { dateStyle: "medium", timeStyle: "short" }).format(
    timestampDate(ts),
  );
}

/** Milliseconds since the epoch, for ordering. */
export function millis(ts: Timestamp | undefined): number {
  return ts ? Number(ts.seconds) * 1000 + Math.floor(ts.nanos / 1e6) : 0;
}
