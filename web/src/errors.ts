// What went wrong, in words. The server puts a stable reason in a google.rpc.ErrorInfo
// (domain "crm.v1") inside grpc-status-details-bin, field problems in a google.rpc.BadRequest,
// and the wait in google.rpc.RetryInfo plus a `retry-after` header. connect-web hands the
// details over as (type name, bytes); the three small messages are decoded here with
// @bufbuild/protobuf's wire reader, so no copy of the google.rpc protos is needed.

import { Code, ConnectError } from "@connectrpc/connect";
import { BinaryReader } from "@bufbuild/protobuf/wire";
import { type Args, type Key, isKey, t } from "./i18n.js";

export interface FieldProblem {
  field: string;
  description: string;
}

export interface Problem {
  /** The ErrorInfo reason, e.g. "RATE_LIMITED"; "network" or "unknown" when there is none. */
  reason: string;
  fields: FieldProblem[];
  /** Whole seconds to wait before trying again (RATE_LIMITED, IN_PROGRESS). */
  retryAfter?: number;
}

interface IncomingDetail {
  type: string;
  value: Uint8Array;
}

function decodeErrorInfo(bytes: Uint8Array): { reason: string; domain: string } {
  const r = new BinaryReader(bytes);
  let reason = "";
  let domain = "";
  while (r.pos < r.len) {
    const [no, wireType] = r.tag();
    if (no === 1) reason = r.string();
    else if (no === 2) domain = r.string();
    else r.skip(wireType); // metadata
  }
  return { reason, domain };
}

function decodeBadRequest(bytes: Uint8Array): FieldProblem[] {
  const r = new BinaryReader(bytes);
  const out: FieldProblem[] = [];
  while (r.pos < r.len) {
    const [no, wireType] = r.tag();
    if (no !== 1) {
      r.skip(wireType);
      continue;
    }
    const v = new BinaryReader(r.bytes());
    const violation = { field: "", description: "" };
    while (v.pos < v.len) {
      const [vno, vType] = v.tag();
      if (vno === 1) violation.field = v.string();
      else if (vno === 2) violation.description = v.string();
      else v.skip(vType);
    }
    out.push(violation);
  }
  return out;
}

/** RetryInfo.retry_delay (a google.protobuf.Duration), in whole seconds rounded up. */
function decodeRetryInfo(bytes: Uint8Array): number | undefined {
  const r = new BinaryReader(bytes);
  while (r.pos < r.len) {
    const [no, wireType] = r.tag();
    if (no !== 1) {
      r.skip(wireType);
      continue;
    }
    const d = new BinaryReader(r.bytes());
    let seconds = 0;
    let nanos = 0;
    while (d.pos < d.len) {
      const [dno, dType] = d.tag();
      if (dno === 1) seconds = Number(d.int64());
      else if (dno === 2) nanos = d.int32();
      else d.skip(dType);
    }
    return Math.ceil(seconds + nanos / 1e9);
  }
  return undefined;
}

export function problemOf(err: unknown): Problem {
  const e = ConnectError.from(err);
  const problem: Problem = { reason: "", fields: [] };
  for (const detail of e.details) {
    if (!("type" in detail)) continue;
    const d = detail as IncomingDetail;
    if (d.type === "google.rpc.ErrorInfo") {
      const info = decodeErrorInfo(d.value);
      if (info.domain === "crm.v1") problem.reason = info.reason;
    } else if (d.type === "google.rpc.BadRequest") {
      problem.fields.push(...decodeBadRequest(d.value));
    } else if (d.type === "google.rpc.RetryInfo") {
      problem.retryAfter ??= decodeRetryInfo(d.value);
    }
  }
  const header = Number.parseInt(e.metadata.get("retry-after") ?? "", 10);
  if (Number.isFinite(header)) problem.retryAfter = header;
  if (!problem.reason) {
    // No ErrorInfo: the request never got an answer from our server (offline, proxy, abort).
    problem.reason = e.code === Code.Unavailable || e.code === Code.Unknown ? "network" : "unknown";
  }
  return problem;
}

export function isCanceled(err: unknown): boolean {
  return err instanceof ConnectError ? err.code === Code.Canceled : (err as Error)?.name === "AbortError";
}

/** The sentence to show for a problem, in the current language; never a raw code. */
export function message(problem: Problem): { key: Key; args: Args } {
  const key = `error.${problem.reason}`;
  if (problem.reason === "RATE_LIMITED") {
    return { key: "error.RATE_LIMITED", args: { seconds: problem.retryAfter ?? 60 } };
  }
  if (problem.reason === "VALIDATION_FAILED" && problem.fields.length === 1) {
    return { key: "error.field", args: { field: fieldLabel(problem.fields[0].field) } };
  }
  return { key: isKey(key) ? key : "error.unknown", args: {} };
}

export function fieldLabel(field: string): string {
  // Nested names ("program.code") are labelled by their last part.
  const last = field.split(".").pop() ?? field;
  const key = `field.${last}`;
  return t(isKey(key) ? key : "field.other");
}

/** Whether the user must sign in again (the session is gone for good). */
export function isSessionEnd(problem: Problem): boolean {
  return ["REFRESH_TOKEN_INVALID", "TOKEN_INVALID", "AUTH_REQUIRED"].includes(problem.reason);
}
