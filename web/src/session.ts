// Who is signed in, and their tokens.
//
// - The access token (a JWT, valid ACCESS_TOKEN_EXPIRE_MINUTES) lives only in memory: a
//   script injected into the page could read any storage, and memory is the smallest target.
// - The refresh token is kept in sessionStorage. It has to outlive a page load, because paying
//   means leaving for the provider's page and coming back; sessionStorage survives that (and a
//   reload) but belongs to this one tab and is gone when the tab closes. It is not in
//   localStorage so that two tabs never share (and race to rotate) one refresh token, which
//   the server would take for reuse and answer by ending the session. Our gRPC-web API has no
//   cookies, so an httpOnly cookie is not an option; the page's CSP (scripts from our origin
//   only, no inline script) is what keeps foreign script away from it.
// - The access token is renewed through Refresh a minute before it expires (or at 80 % of a
//   short lifetime), and on demand when a call finds it stale. Each Refresh rotates the
//   refresh token. REFRESH_TOKEN_INVALID means the session is over: back to the sign-in page.

import { ConnectError } from "@connectrpc/connect";
import { authApi, useTokens } from "./api.js";
import { isCanceled, problemOf } from "./errors.js";
import type { AuthResponse, User } from "./gen/crm/v1/auth_pb.js";

const REFRESH_KEY = "crm.refresh";

let access: { token: string; expiresAt: number } | null = null;
let user: User | null = null;
let refreshing: Promise<boolean> | null = null;
let timer: number | undefined;
const listeners: Array<(user: User | null, ended: boolean) => void> = [];

export function currentUser(): User | null {
  return user;
}

/** Called with the new user on sign-in, and with null on sign-out (`ended`: not by choice). */
export function onSessionChange(fn: (user: User | null, ended: boolean) => void): void {
  listeners.push(fn);
}

export function signedIn(res: AuthResponse): void {
  const lifetime = Number(res.expiresIn) * 1000;
  access = { token: res.accessToken, expiresAt: Date.now() + lifetime };
  sessionStorage.setItem(REFRESH_KEY, res.refreshToken);
  const changed = user?.id !== res.user?.id;
  user = res.user ?? null;
  const lead = Math.min(60_000, lifetime * 0.2);
  schedule(lifetime - lead);
  if (changed) listeners.forEach((fn) => fn(user, false));
}

function schedule(delay: number): void {
  window.clearTimeout(timer);
  timer = window.setTimeout(() => void refresh(), Math.max(1_000, delay));
}

function end(ended: boolean): void {
  window.clearTimeout(timer);
  access = null;
  sessionStorage.removeItem(REFRESH_KEY);
  const had = user !== null;
  user = null;
  if (had || ended) listeners.forEach((fn) => fn(null, ended));
}

/**
 * Exchanges the refresh token for a new pair. One refresh at a time: concurrent callers share
 * it, since a second Refresh with the same token would look like reuse. Resolves false when
 * there is no session (any more).
 */
export function refresh(): Promise<boolean> {
  refreshing ??= (async () => {
    const token = sessionStorage.getItem(REFRESH_KEY);
    if (!token) return false;
    try {
      signedIn(await authApi.refresh({ refreshToken: token }));
      return true;
    } catch (err) {
      if (isCanceled(err)) return false;
      const problem = problemOf(err);
      if (problem.reason === "REFRESH_TOKEN_INVALID") {
        end(true);
        return false;
      }
      // Offline or throttled: keep the session and try again later.
      schedule((problem.retryAfter ?? 10) * 1000);
      if (err instanceof ConnectError && access && access.expiresAt > Date.now()) return true;
      throw err;
    } finally {
      refreshing = null;
    }
  })();
  return refreshing;
}

/** On page load: picks up the tab's session, if it has one. */
export async function resume(): Promise<boolean> {
  if (!sessionStorage.getItem(REFRESH_KEY)) return false;
  return refresh();
}

export async function signOut(): Promise<void> {
  const token = sessionStorage.getItem(REFRESH_KEY);
  end(false);
  if (token) {
    try {
      await authApi.logout({ refreshToken: token, allSessions: false });
    } catch {
      // The session is forgotten here either way; it expires on its own on the server.
    }
  }
}

useTokens({
  async current() {
    if (!access) return null;
    if (access.expiresAt - Date.now() < 10_000) {
      await refresh();
    }
    return access?.token ?? null;
  },
  expired: refresh,
});
