/**
 * Storage: first-party cookies and localStorage, with an in-memory fallback.
 *
 * localStorage is what lets queued events survive a reload, a crash or a navigation, but it may be
 * missing (sandboxed iframes, disabled storage) or full. A write that fails moves that key to
 * memory, so the tracker keeps working for the life of the page instead of losing events or
 * throwing into the host site. Nothing probes storage up front: when consent is required, not even
 * a test key may be written before the visitor agrees.
 */

export interface Store {
  get(key: string): string | null;
  set(key: string, value: string): void;
  del(key: string): void;
  /** Every key, in localStorage and in memory (used to find other tabs' queues). */
  keys(): string[];
}

/** A random RFC 4122 version 4 UUID (`crypto.randomUUID` needs a secure context; this does not). */
export function uuid(): string {
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 15) | 64;
  b[8] = (b[8] & 63) | 128;
  let s = "";
  for (let i = 0; i < 16; i++) s += (i == 4 || i == 6 || i == 8 || i == 10 ? "-" : "") + (b[i] + 256).toString(16).slice(1);
  return s;
}

export function createStore(): Store {
  const mem: Record<string, string> = {};
  const ls = (): Storage | null => {
    try {
      return localStorage;
    } catch {
      return null;
    }
  };
  return {
    get: (k) => (k in mem ? mem[k] : ls()?.getItem(k) ?? null),
    set(k, v) {
      try {
        ls()!.setItem(k, v);
        delete mem[k];
      } catch {
        mem[k] = v;
      }
    },
    del(k) {
      delete mem[k];
      try {
        ls()!.removeItem(k);
      } catch {
        // Nothing stored there.
      }
    },
    keys() {
      const out = Object.keys(mem);
      const s = ls();
      try {
        for (let i = 0; s && i < s.length; i++) out.push(s.key(i)!);
      } catch {
        // Storage became unreadable: memory keys only.
      }
      return out;
    },
  };
}

export function getCookie(name: string): string | null {
  try {
    const m = document.cookie.match("(?:^|; )" + name + "=([^;]*)");
    return m && decodeURIComponent(m[1]);
  } catch {
    return null;
  }
}

/** Sets (or, with `days` 0, deletes) a first-party cookie on `path=/`. */
export function setCookie(name: string, value: string, days: number, domain?: string): void {
  try {
    document.cookie =
      name +
      "=" +
      encodeURIComponent(value) +
      "; path=/; max-age=" +
      days * 86400 +
      "; SameSite=Lax" +
      (domain ? "; domain=" + domain : "") +
      (location.protocol == "https:" ? "; Secure" : "");
  } catch {
    // Cookies are blocked: localStorage still carries the id.
  }
}
