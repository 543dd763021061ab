// The one connection to the server: gRPC-web in binary protobuf, to the origin that served
// this page (so no CORS is involved), with the caller's access token added to every call
// except the four that work without one.

import { type Interceptor, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { ApplicationService } from "./gen/crm/v1/application_pb.js";
import { AuthService } from "./gen/crm/v1/auth_pb.js";
import { PaymentService } from "./gen/crm/v1/payment_pb.js";
import { problemOf } from "./errors.js";

/** Methods that take no access token (they are how one gets one). */
const PUBLIC = new Set(["Register", "Login", "Refresh", "Logout"]);

export interface TokenSource {
  /** A valid access token, refreshed first when it is about to expire; null if signed out. */
  current(): Promise<string | null>;
  /** Called when the server says the access token has expired: refresh now. */
  expired(): Promise<boolean>;
}

let tokens: TokenSource | null = null;

export function useTokens(source: TokenSource): void {
  tokens = source;
}

const bearer: Interceptor = (next) => async (req) => {
  if (req.service.typeName === AuthService.typeName && PUBLIC.has(req.method.name)) {
    return next(req);
  }
  const token = tokens ? await tokens.current() : null;
  if (token) req.header.set("authorization", `Bearer ${token}`);
  if (req.stream) return next(req);
  try {
    return await next(req);
  } catch (err) {
    // An access token can expire between our check and the server's (clock skew, a
    // suspended laptop): refresh once and repeat the call. Unary calls only; streams
    // reconnect on their own.
    if (tokens && problemOf(err).reason === "TOKEN_EXPIRED" && (await tokens.expired())) {
      const fresh = await tokens.current();
      if (fresh) req.header.set("authorization", `Bearer ${fresh}`);
      return next(req);
    }
    throw err;
  }
};

const transport = createGrpcWebTransport({
  baseUrl: window.location.origin,
  useBinaryFormat: true,
  interceptors: [bearer],
});

export const authApi = createClient(AuthService, transport);
export const applicationsApi = createClient(ApplicationService, transport);
export const paymentsApi = createClient(PaymentService, transport);

/** A fresh idempotency key (a UUID v4) for one attempt of one action. */
export function newIdempotencyKey(): string {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  // randomUUID exists only in secure contexts; an http:// deployment still gets 122 random bits.
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}
