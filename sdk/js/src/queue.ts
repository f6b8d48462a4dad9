/**
 * The persistent event queue, one per tab, so that two open tabs never send the same event.
 *
 * A single queue shared by all tabs of a site would need an atomic read-modify-write that
 * localStorage does not have: two tabs flushing at once would both read and send the same events.
 * So every page instance ("tab") owns its own queue under `<prefix><tabId>` and sends only the
 * events in it; no other tab writes that key while the owner is alive.
 *
 * Events must not be lost when a page goes away with events still queued (network down, or the
 * last flush still in flight), so a queue can change hands. On `pagehide` the owner marks it
 * released; a tab that never said goodbye (crash, killed process) stops refreshing its heartbeat
 * `h`. The next page of the site, or another open tab when it sees the release in a `storage`
 * event, adopts released and stale queues: it moves their events into its own queue and deletes
 * their keys. Adoption runs under a Web Lock where the browser has them (secure contexts), so two
 * tabs never adopt the same queue; without Web Locks a race within the same millisecond is still
 * possible, and the server's messageId deduplication absorbs it.
 *
 * A request in flight holds a lease on its events (`l`, the time it times out). Leased events are
 * skipped by flushes (of this tab, or of the tab that adopted the queue after this page died with
 * a keepalive request in flight) until the lease ends; then they are sent again with the same
 * messageId, which the server drops if the first request did arrive.
 */

import type { Store } from "./store.js";

/** An event as sent: a Segment-style call with at least a messageId and a timestamp. */
export interface KEvent {
  type: string;
  messageId: string;
  timestamp: string;
  [field: string]: unknown;
}

/** A queued event and, while a request carrying it is in flight, the time its lease ends. */
export interface Entry {
  e: KEvent;
  l?: number;
}

/** The stored form of a queue: heartbeat, released flag, entries. */
interface Saved {
  h: number;
  r?: 1;
  q: Entry[];
}

export interface Queue {
  push(e: KEvent): void;
  /** Entries queued, leased or not. */
  size(): number;
  /** Leases up to `max` unleased events of at most `maxBytes` of JSON for `ms` milliseconds. */
  lease(max: number, maxBytes: number, ms: number): KEvent[];
  /** Removes events (delivered, or rejected for good). */
  done(ids: string[]): void;
  /** Ends the lease of events whose request failed, so that a later flush sends them again. */
  retry(ids: string[]): void;
  /** The page is going away: other tabs may adopt the queue. */
  release(): void;
  /** The page is back (back-forward cache): the queue is this tab's again, if still there. */
  claim(): void;
  /** Moves the events of released and stale queues of other tabs into this one. */
  adopt(): Promise<void>;
  clear(): void;
}

export function createQueue(store: Store, prefix: string, tab: string, cap: number, staleMs: number): Queue {
  const key = prefix + tab;
  let released: 1 | undefined;
  const load = (k: string): Saved | null => {
    try {
      return JSON.parse(store.get(k)!);
    } catch {
      return null;
    }
  };
  const read = (): Entry[] => load(key)?.q || [];
  const write = (q: Entry[]) =>
    q.length ? store.set(key, JSON.stringify({ h: Date.now(), r: released, q: q.slice(-cap) })) : store.del(key);
  const has = (ids: string[]) => (en: Entry) => ids.indexOf(en.e.messageId) >= 0;
  const adoptNow = () => {
    const now = Date.now();
    const taken: string[] = [];
    let q = read();
    for (const k of store.keys()) {
      if (k.indexOf(prefix) || k == key) continue;
      const s = load(k);
      if (!s || s.r || now - s.h > staleMs) {
        if (s) q = q.concat(s.q);
        taken.push(k);
      }
    }
    if (!taken.length) return;
    q.sort((a, b) => (a.e.timestamp < b.e.timestamp ? -1 : a.e.timestamp > b.e.timestamp ? 1 : 0));
    // Write the merged queue before deleting the adopted ones: a crash in between duplicates (and
    // the server deduplicates) rather than loses.
    write(q);
    taken.forEach(store.del);
  };
  return {
    push(e) {
      const q = read();
      q.push({ e });
      write(q);
    },
    size: () => read().length,
    lease(max, maxBytes, ms) {
      const now = Date.now();
      const q = read();
      const out: KEvent[] = [];
      let bytes = 0;
      for (const en of q) {
        if (out.length >= max) break;
        if (en.l! > now) continue;
        const n = JSON.stringify(en.e).length;
        if (out.length && bytes + n > maxBytes) break;
        bytes += n;
        en.l = now + ms;
        out.push(en.e);
      }
      if (out.length) write(q);
      return out;
    },
    done(ids) {
      write(read().filter((en) => !has(ids)(en)));
    },
    retry(ids) {
      const q = read();
      q.filter(has(ids)).forEach((en) => delete en.l);
      write(q);
    },
    release() {
      released = 1;
      write(read());
    },
    claim() {
      released = undefined;
      write(read());
    },
    adopt() {
      const locks = typeof navigator == "object" && navigator.locks;
      return locks
        ? locks.request(prefix + "adopt", { ifAvailable: true }, (lock) => lock && adoptNow()).then(
            () => {},
            () => adoptNow(),
          )
        : Promise.resolve(adoptNow());
    },
    clear() {
      store.del(key);
    },
  };
}
