/**
 * The Kairos browser tracker: identity, consent, events, batching and delivery.
 *
 * Design, in the order an event sees it:
 *
 * - Calls made before `init`, or before consent when consent is required, wait in memory (at most
 *   100, keeping their time) and nothing is written to cookies or storage until then; they run
 *   in order once the tracker may track, or are dropped by `optOut`.
 * - Identity is first-party: an anonymous id in a cookie (readable across subdomains with
 *   `cookieDomain`) and in localStorage (which survives cookie clearing by some browsers), a user
 *   id after `identify`, and a session id that rotates after 30 minutes without events. Every event
 *   carries `context.sessionId`, so the server never has to guess sessions.
 * - Every event gets a `messageId` when it is created, stays the same on every retry, and is what
 *   the server deduplicates on: delivery is at least once on the wire and exactly once in Kairos.
 * - Events go to this tab's persistent queue (see queue.ts for why per tab) and are sent in
 *   batches: when `flushAt` events wait or `flushInterval` ms after the first one.
 * - Requests are `fetch` with `keepalive`, so a request started as the page goes away completes;
 *   the body is `text/plain` with the write key inside, which makes it a CORS "simple request"
 *   (no preflight round trip) and lets `navigator.sendBeacon` carry the same body where keepalive
 *   fetch is missing.
 * - On `visibilitychange` to hidden and on `pagehide` everything queued is sent at once (never on
 *   `unload`, which disables the back-forward cache).
 * - Failures: no response, 408, 429 and 5xx are retried with exponential backoff and jitter, never
 *   sooner than a `Retry-After`; any other status (validation errors, unknown write key, origin not
 *   allowed) is final and the events are dropped with a console warning, as are events the server
 *   rejected one by one in a 200 answer. Coming back `online` retries at once.
 */

import { bridge } from "./datalayer.js";
import { createQueue, type KEvent, type Queue } from "./queue.js";
import { backoff, retryable, retryAfter } from "./retry.js";
import { createStore, getCookie, setCookie, uuid, type Store } from "./store.js";
import { widgets, type Template } from "./widget.js";

declare const __VERSION__: string;

export type Props = Record<string, unknown>;

export interface Options {
  /** The source's public write key (`[[ingest.sources]]` in the Kairos configuration). */
  writeKey: string;
  /** Base URL of the Kairos node; default: where kairos.js was loaded from, else this page's origin. */
  endpoint?: string;
  /** Send when this many events wait (default 20). */
  flushAt?: number;
  /** ...or this many ms after an event was queued (default 1000). */
  flushInterval?: number;
  /** Events kept while the server cannot be reached; the oldest are dropped beyond (default 1000). */
  maxQueueSize?: number;
  /** JSON bytes per request; keepalive requests of a page share a 64 KiB budget (default 30000). */
  maxBatchBytes?: number;
  /** First retry delay in ms, doubled per failure (default 1000)... */
  retryBase?: number;
  /** ...up to this (default 60000). */
  retryMax?: number;
  /** Request timeout in ms; also how long an in-flight event is reserved (default 10000). */
  timeout?: number;
  /** Inactivity after which a new session starts, in ms (default 30 minutes). */
  sessionTimeout?: number;
  /** A queue of a closed or crashed tab without heartbeat for this long is adopted (default 5 min). */
  staleQueue?: number;
  /** Track only after `optIn()` (default false: track unless `optOut()` was called). */
  requireConsent?: boolean;
  /** Read GA4 e-commerce events from `window.dataLayer` (true) or the named array (default false). */
  dataLayer?: boolean | string;
  /** Domain of the anonymous-id cookie, e.g. ".example.com" to share it across subdomains. */
  cookieDomain?: string;
  /** Prefix of cookie and storage keys (default "kairos"). */
  prefix?: string;
  /** Render `[data-kairos-slot]` elements (default true). */
  widgets?: boolean;
  /** Replaces the widget's default rendering. */
  template?: Template;
}

export type Settings = Required<Omit<Options, "cookieDomain" | "template">> & Pick<Options, "cookieDomain" | "template">;

export interface User {
  anonymousId?: string;
  userId?: string;
  sessionId?: string;
}

/** What the widget needs from the tracker. */
export interface Internal {
  o: Settings;
  user(): User;
  track(event: string, properties?: Props): void;
  flush(): Promise<void>;
  /** Called with each batch the server accepted. */
  sent: ((batch: KEvent[]) => void)[];
  /** Called with each event queued. */
  tracked: ((e: KEvent) => void)[];
}

export interface Kairos {
  init(options: Options): void;
  page(name?: string | Props, properties?: Props): void;
  track(event: string, properties?: Props): void;
  identify(userId: string, traits?: Props): void;
  alias(userId: string, previousId?: string): void;
  reset(): void;
  optIn(): void;
  optOut(): void;
  /** Sends queued events now; resolves when this round of requests has finished. */
  flush(): Promise<void>;
  /** (Re-)renders the recommendation slots under `root` (default: the whole document). */
  render(root?: ParentNode): void;
  user(): User;
}

const DEFAULTS = {
  endpoint: "",
  flushAt: 20,
  flushInterval: 1000,
  maxQueueSize: 1000,
  maxBatchBytes: 30000,
  retryBase: 1000,
  retryMax: 60000,
  timeout: 10000,
  sessionTimeout: 1800000,
  staleQueue: 300000,
  requireConsent: false,
  dataLayer: false,
  prefix: "kairos",
  widgets: true,
};

/** Most events per request (the server's default limit is 500). */
const MAX_EVENTS = 100;

export function createKairos(defaultEndpoint?: string): Kairos {
  const tab = uuid();
  let o: Settings | undefined;
  let store: Store;
  let queue: Queue;
  let p = "";
  let aid: string | undefined;
  let uid: string | null | undefined;
  /** Calls waiting for init or consent. */
  let pending: (() => unknown)[] = [];
  /** The time of the call being replayed from `pending` (0: now). */
  let at = 0;
  let timer: ReturnType<typeof setTimeout> | undefined;
  let timerAt = 0;
  let busy: Promise<void> | undefined;
  let retryAt = 0;
  let attempt = 0;
  let render: (root?: ParentNode) => void = () => {};
  const sent: Internal["sent"] = [];
  const tracked: Internal["tracked"] = [];

  const consent = () => store.get(p + "consent");
  const allowed = () => !!o && (o.requireConsent ? consent() == "1" : consent() != "0");
  const waiting = () => !o || (o.requireConsent && consent() == null);

  /** Wraps an API call: deferred until init and consent; `always` calls run before consent. */
  const gate =
    <A extends unknown[]>(f: (...a: A) => unknown, always?: 1) =>
    (...a: A): void => {
      const t = Date.now();
      const go = (): unknown => {
        if (!o || (!always && waiting())) return pending.length < 100 && pending.push(go);
        at = t;
        try {
          if (always || allowed()) f(...a);
        } finally {
          at = 0;
        }
      };
      go();
    };

  const replay = () => {
    const calls = pending;
    pending = [];
    calls.forEach((g) => g());
  };

  const session = (t: number, touch?: 1): string | undefined => {
    let s: { i: string; t: number } | null = null;
    try {
      s = JSON.parse(store.get(p + "sid")!);
    } catch {
      // Unreadable: start a new session.
    }
    if (!touch) return s?.i;
    if (!s || t - s.t > o!.sessionTimeout) s = { i: uuid(), t };
    s.t = Math.max(s.t, t);
    store.set(p + "sid", JSON.stringify(s));
    return s.i;
  };

  const saveAid = () => {
    setCookie(o!.prefix + "_aid", aid!, 365, o!.cookieDomain);
    store.set(p + "aid", aid!);
  };

  const start = () => {
    aid = getCookie(o!.prefix + "_aid") || store.get(p + "aid") || uuid();
    saveAid();
    uid = store.get(p + "uid");
    queue.adopt().then(flush);
  };

  const send = (type: string, fields: Props) => {
    const t = at || Date.now();
    const e: KEvent = {
      type,
      messageId: uuid(),
      timestamp: new Date(t).toISOString(),
      anonymousId: aid,
      userId: uid || undefined,
      ...fields,
      context: {
        sessionId: session(t, 1),
        page: { path: location.pathname, url: location.href, search: location.search, title: document.title, referrer: document.referrer },
        userAgent: navigator.userAgent,
        locale: navigator.language,
        library: { name: "kairos.js", version: __VERSION__ },
      },
    };
    queue.push(e);
    tracked.forEach((f) => f(e));
    if (queue.size() >= o!.flushAt) flush();
    else schedule(o!.flushInterval);
  };

  /** Flushes in `ms`, unless a flush is already due sooner. */
  const schedule = (ms: number) => {
    const due = Date.now() + ms;
    if (timer && timerAt <= due) return;
    clearTimeout(timer);
    timerAt = due;
    timer = setTimeout(() => {
      timer = undefined;
      flush();
    }, ms);
  };

  const lease = () => (allowed() && Date.now() >= retryAt ? queue.lease(MAX_EVENTS, o!.maxBatchBytes, o!.timeout) : []);
  const ids = (batch: KEvent[]) => batch.map((e) => e.messageId);
  const url = () => o!.endpoint + "/v1/batch";
  const body = (batch: KEvent[]) => JSON.stringify({ batch, sentAt: new Date().toISOString(), writeKey: o!.writeKey });

  /** Sends one batch; true when the next one may follow at once. */
  const post = async (batch: KEvent[]): Promise<boolean> => {
    const ctl = new AbortController();
    const t = setTimeout(() => ctl.abort(), o!.timeout);
    let res: Response | undefined;
    try {
      res = await fetch(url(), {
        method: "POST",
        body: body(batch),
        keepalive: true,
        credentials: "omit",
        headers: { "Content-Type": "text/plain" },
        signal: ctl.signal,
      });
    } catch {
      // No response (offline, blocked, timed out): retried below.
    }
    clearTimeout(t);
    const status = res ? res.status : 0;
    if (retryable(status)) {
      queue.retry(ids(batch));
      retryAt = Date.now() + Math.max(retryAfter(res?.headers.get("Retry-After")), backoff(attempt++, o!.retryBase, o!.retryMax));
      return false;
    }
    attempt = 0;
    queue.done(ids(batch));
    res!.json().then(
      (r) => (status > 299 || r.rejected?.length) && console.warn("kairos: not accepted", status, r),
      () => {},
    );
    if (status < 300) sent.forEach((f) => f(batch));
    return true;
  };

  /** Sends batches while there are any; true when it stopped to back off after a failure. */
  const drain = async (): Promise<boolean> => {
    clearTimeout(timer);
    timer = undefined;
    for (;;) {
      if (Date.now() < retryAt) return true;
      const batch = lease();
      if (!batch.length) return false;
      if (!(await post(batch))) return true;
    }
  };

  function flush(): Promise<void> {
    if (!o) return Promise.resolve();
    busy ||= drain()
      .then((backingOff) => {
        // Events still queued: retry when the backoff ends, else (leased by a request in flight,
        // or queued meanwhile) look again after the flush interval.
        if (allowed() && queue.size()) schedule(backingOff ? Math.max(retryAt - Date.now(), 1) : o!.flushInterval);
      })
      .finally(() => (busy = undefined));
    return busy;
  }

  /** The page is hidden or going away: start every request now, as it may never run code again. */
  const hide = () => {
    const beacon = !("keepalive" in Request.prototype) && navigator.sendBeacon;
    let batch: KEvent[];
    while ((batch = lease()).length) {
      if (!beacon) post(batch);
      else if (!navigator.sendBeacon(url(), body(batch))) {
        queue.retry(ids(batch));
        break;
      }
    }
  };

  const track = gate((event: string, properties?: Props) => send("track", { event, properties }));

  const init = (options: Options) => {
    if (o) return;
    o = { ...DEFAULTS, endpoint: defaultEndpoint || location.origin, ...options };
    o.endpoint = o.endpoint.replace(/\/+$/, "");
    p = o.prefix + ".";
    store = createStore();
    queue = createQueue(store, p + "q.", tab, o.maxQueueSize, o.staleQueue);
    addEventListener("pagehide", () => {
      hide();
      queue.release();
    });
    addEventListener("pageshow", (e) => e.persisted && queue.claim());
    addEventListener("online", () => {
      retryAt = attempt = 0;
      flush();
    });
    addEventListener("storage", (e) => {
      if (allowed() && e.key?.indexOf(p + "q.") == 0 && /"r":1/.test(e.newValue || "")) queue.adopt().then(flush);
    });
    document.addEventListener("visibilitychange", () => document.visibilityState == "hidden" && hide());
    if (allowed()) start();
    if (o.dataLayer) bridge(o.dataLayer === true ? "dataLayer" : o.dataLayer, track);
    if (o.widgets) render = widgets({ o, user, track, flush, sent, tracked });
    replay();
  };

  function user(): User {
    return allowed() ? { anonymousId: aid, userId: uid || undefined, sessionId: session(0) } : {};
  }

  return {
    init,
    page: gate((name?: string | Props, properties?: Props) =>
      typeof name == "object" ? send("page", { properties: name }) : send("page", { name, properties }),
    ),
    track,
    identify: gate((userId: string, traits?: Props) => {
      uid = String(userId);
      store.set(p + "uid", uid);
      send("identify", { userId: uid, traits });
    }),
    alias: gate((userId: string, previousId?: string) => {
      send("alias", { previousId: previousId || uid || aid, userId: String(userId) });
      uid = String(userId);
      store.set(p + "uid", uid);
    }),
    reset: gate(() => {
      uid = null;
      store.del(p + "uid");
      store.del(p + "sid");
      aid = uuid();
      saveAid();
    }),
    optIn: gate(() => {
      if (consent() == "1") return;
      store.set(p + "consent", "1");
      start();
      replay();
    }, 1),
    optOut: gate(() => {
      store.set(p + "consent", "0");
      pending = [];
      queue.clear();
      ["aid", "uid", "sid"].forEach((k) => store.del(p + k));
      setCookie(o!.prefix + "_aid", "", 0, o!.cookieDomain);
      aid = uid = undefined;
    }, 1),
    flush,
    render: (root) => render(root),
    user,
  };
}
