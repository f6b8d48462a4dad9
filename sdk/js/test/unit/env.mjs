// A minimal browser for the tracker's unit tests: window and document events, cookies,
// localStorage, location, navigator and a scripted fetch that records every request.
//
// The tracker reads these globals when it runs (never at import time), so each test installs a
// fresh browser and creates fresh tracker instances; several instances on one browser are several
// tabs of the same site (they share cookies and localStorage, as real tabs do).

export class MemoryStorage {
  constructor() {
    this.map = new Map();
  }
  get length() {
    return this.map.size;
  }
  key(i) {
    return [...this.map.keys()][i] ?? null;
  }
  getItem(k) {
    return this.map.has(k) ? this.map.get(k) : null;
  }
  setItem(k, v) {
    this.map.set(k, String(v));
  }
  removeItem(k) {
    this.map.delete(k);
  }
  clear() {
    this.map.clear();
  }
}

const realSetTimeout = setTimeout;

// The tracker's timers (a minute-long flush interval, say) must not keep the test process alive.
globalThis.setTimeout = (f, ms, ...args) => {
  const t = realSetTimeout(f, ms, ...args);
  t.unref?.();
  return t;
};

/** Installs a fresh fake browser on globalThis and returns its controls. */
export function installBrowser({ storage = true } = {}) {
  const windowListeners = {};
  const documentListeners = {};
  const cookies = new Map();
  const requests = [];
  let respond = () => ({ status: 200, body: { accepted: 1, duplicates: 0, rejected: [] } });

  globalThis.__VERSION__ = "test";
  globalThis.window = globalThis;
  globalThis.addEventListener = (type, f) => (windowListeners[type] ||= []).push(f);
  const ls = new MemoryStorage();
  Object.defineProperty(globalThis, "localStorage", {
    configurable: true,
    get() {
      if (!storage) throw new Error("SecurityError: storage is disabled");
      return ls;
    },
  });
  globalThis.location = {
    href: "https://shop.example/p?x=1",
    origin: "https://shop.example",
    pathname: "/p",
    search: "?x=1",
    protocol: "https:",
  };
  globalThis.navigator = { userAgent: "test-agent", language: "en-GB" };
  globalThis.document = {
    title: "Test page",
    referrer: "https://ref.example/",
    readyState: "complete",
    visibilityState: "visible",
    hidden: false,
    currentScript: null,
    querySelectorAll: () => [],
    addEventListener: (type, f) => (documentListeners[type] ||= []).push(f),
    get cookie() {
      return [...cookies].map(([k, v]) => `${k}=${v}`).join("; ");
    },
    set cookie(text) {
      const [pair, ...attrs] = text.split("; ");
      const [name, value] = pair.split("=");
      const maxAge = attrs.find((a) => a.startsWith("max-age="));
      if (maxAge && Number(maxAge.slice(8)) <= 0) cookies.delete(name);
      else cookies.set(name, value);
    },
  };
  globalThis.fetch = async (url, init) => {
    const request = { url, init, body: JSON.parse(init.body), at: Date.now() };
    requests.push(request);
    const r = await respond(request);
    request.status = r === "network" ? 0 : r.status;
    if (r === "network") throw new TypeError("Failed to fetch");
    return new Response(JSON.stringify(r.body ?? {}), { status: r.status, headers: r.headers });
  };

  return {
    storage: ls,
    cookies,
    requests,
    /** Sets how the server answers: (request) => ({status, body, headers}) or "network". */
    respond(f) {
      respond = f;
    },
    /** Every event sent so far, in order. */
    sent() {
      return requests.flatMap((r) => r.body.batch);
    },
    /** messageId -> number of successful (2xx) requests that carried it. */
    delivered() {
      const counts = new Map();
      for (const r of requests)
        if (r.status >= 200 && r.status < 300) for (const e of r.body.batch) counts.set(e.messageId, (counts.get(e.messageId) || 0) + 1);
      return counts;
    },
    fire(type, event = {}) {
      (windowListeners[type] || []).forEach((f) => f({ type, ...event }));
    },
    fireDocument(type) {
      (documentListeners[type] || []).forEach((f) => f({ type }));
    },
  };
}

export const sleep = (ms) => new Promise((r) => realSetTimeout(r, ms));

/** Waits until `cond()` is true (polling), failing after `ms`. */
export async function until(cond, ms = 3000, what = "condition") {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}
