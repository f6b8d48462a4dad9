// Unit tests of the tracker (build/ is the TypeScript output, `tsc -p .`), in a fake browser.
import assert from "node:assert/strict";
import { test } from "node:test";

import { installBrowser, sleep, until } from "./env.mjs";
import { createKairos } from "../../build/tracker.js";

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
const quiet = { widgets: false, flushInterval: 60_000, retryBase: 10, retryMax: 40 };

function tab(options = {}) {
  const k = createKairos();
  k.init({ writeKey: "wk", endpoint: "https://kairos.example/", ...quiet, ...options });
  return k;
}

const queueKeys = (b) => [...b.storage.map.keys()].filter((k) => k.startsWith("kairos.q."));

test("batches by count: one request with messageId, ids, session and the write key", async () => {
  const b = installBrowser();
  const k = tab({ flushAt: 3 });
  k.track("product_view", { product_id: "1" });
  k.track("product_view", { product_id: "2" });
  assert.equal(b.requests.length, 0, "below flushAt nothing is sent");
  k.track("add_to_cart", { product_id: "2" });
  await until(() => b.requests.length == 1);
  const [r] = b.requests;
  assert.equal(r.url, "https://kairos.example/v1/batch");
  assert.equal(r.init.keepalive, true);
  assert.equal(r.init.credentials, "omit");
  assert.equal(r.init.headers["Content-Type"], "text/plain", "a CORS simple request: no preflight");
  assert.equal(r.body.writeKey, "wk");
  assert.ok(Date.parse(r.body.sentAt));
  const events = r.body.batch;
  assert.deepEqual(events.map((e) => e.event), ["product_view", "product_view", "add_to_cart"]);
  assert.equal(new Set(events.map((e) => e.messageId)).size, 3);
  for (const e of events) {
    assert.match(e.messageId, UUID);
    assert.match(e.anonymousId, UUID);
    assert.match(e.context.sessionId, UUID);
    assert.equal(e.type, "track");
    assert.equal(e.context.page.path, "/p");
    assert.equal(e.context.library.name, "kairos.js");
    assert.ok(Date.parse(e.timestamp));
  }
  assert.equal(new Set(events.map((e) => e.anonymousId)).size, 1);
  await until(() => queueKeys(b).length == 0, 1000, "queue emptied after the 200");
});

test("batches by time: flushInterval after the first event", async () => {
  const b = installBrowser();
  const k = tab({ flushAt: 100, flushInterval: 30 });
  k.page();
  k.track("search", { query: "boots" });
  assert.equal(b.requests.length, 0);
  await until(() => b.requests.length == 1);
  assert.deepEqual(b.sent().map((e) => e.type), ["page", "track"]);
});

test("calls made before init are kept and sent with their own time", async () => {
  const b = installBrowser();
  const k = createKairos();
  k.track("early", { n: 1 });
  const early = Date.now();
  await sleep(20);
  k.init({ writeKey: "wk", endpoint: "https://kairos.example", ...quiet, flushAt: 1 });
  await until(() => b.sent().length == 1);
  const [e] = b.sent();
  assert.equal(e.event, "early");
  assert.ok(Math.abs(Date.parse(e.timestamp) - early) < 15, "the call's time, not the send time");
});

test("identify stitches the anonymous id to the user; ids survive a reload", async () => {
  const b = installBrowser();
  const k = tab({ flushAt: 1 });
  k.track("product_view", { product_id: "1" });
  k.identify("user-7", { email: "a@b.c" });
  k.track("product_view", { product_id: "2" });
  await until(() => b.sent().length == 3);
  const [anon, identify, known] = b.sent();
  assert.equal(anon.userId, undefined);
  assert.equal(identify.type, "identify");
  assert.equal(identify.userId, "user-7");
  assert.equal(identify.anonymousId, anon.anonymousId, "identify carries both ids: the server merges them");
  assert.deepEqual(identify.traits, { email: "a@b.c" });
  assert.equal(known.userId, "user-7");
  assert.equal(known.anonymousId, anon.anonymousId);
  assert.equal(b.cookies.get("kairos_aid"), anon.anonymousId);
  assert.equal(b.storage.getItem("kairos.aid"), anon.anonymousId);

  const reloaded = tab({ flushAt: 1 });
  assert.deepEqual(reloaded.user(), { anonymousId: anon.anonymousId, userId: "user-7", sessionId: known.context.sessionId });
  // The cookie alone (localStorage cleared) or localStorage alone (cookie cleared) keeps the id.
  b.storage.removeItem("kairos.aid");
  assert.equal(tab().user().anonymousId, anon.anonymousId);
  b.cookies.delete("kairos_aid");
  assert.equal(tab().user().anonymousId, anon.anonymousId);
});

test("alias and reset", async () => {
  const b = installBrowser();
  const k = tab({ flushAt: 1 });
  const anon = k.user().anonymousId;
  k.alias("user-1");
  await until(() => b.sent().length == 1);
  assert.deepEqual([b.sent()[0].type, b.sent()[0].previousId, b.sent()[0].userId], ["alias", anon, "user-1"]);
  const before = k.user();
  k.reset();
  const after = k.user();
  assert.equal(after.userId, undefined);
  assert.notEqual(after.anonymousId, before.anonymousId);
  assert.equal(after.sessionId, undefined, "a new session starts with the next event");
  k.track("x");
  await until(() => b.sent().length == 2);
  assert.notEqual(b.sent()[1].context.sessionId, before.sessionId);
});

test("a session ends after 30 minutes without events", async (t) => {
  const b = installBrowser();
  let now = Date.parse("2026-01-01T10:00:00Z");
  t.mock.method(Date, "now", () => now);
  const k = tab({ flushAt: 1 });
  const sid = () => b.sent().at(-1).context.sessionId;
  k.track("a");
  await until(() => b.sent().length == 1);
  const first = sid();
  now += 29 * 60_000;
  k.track("b");
  await until(() => b.sent().length == 2);
  assert.equal(sid(), first, "29 minutes of inactivity: same session");
  now += 29 * 60_000;
  k.track("c");
  await until(() => b.sent().length == 3);
  assert.equal(sid(), first, "activity extends the session");
  now += 30 * 60_000 + 1;
  k.track("d");
  await until(() => b.sent().length == 4);
  assert.notEqual(sid(), first, "over 30 minutes: a new session");
});

test("consent required: nothing is sent or stored before optIn; waiting calls go after it", async () => {
  const b = installBrowser();
  const k = tab({ requireConsent: true, flushAt: 1 });
  k.page();
  k.track("product_view", { product_id: "1" });
  k.identify("u-1");
  await sleep(50);
  assert.equal(b.requests.length, 0, "nothing sent");
  assert.equal(b.storage.length, 0, "nothing in localStorage");
  assert.equal(b.cookies.size, 0, "no cookie");
  assert.deepEqual(k.user(), {});
  k.optIn();
  await until(() => b.sent().length == 3);
  assert.deepEqual(b.sent().map((e) => e.type), ["page", "track", "identify"]);
  assert.equal(b.storage.getItem("kairos.consent"), "1");
  assert.ok(b.cookies.get("kairos_aid"));
  // The decision is remembered on the next page.
  const next = tab({ requireConsent: true, flushAt: 1 });
  next.track("again");
  await until(() => b.sent().length == 4);
});

test("optOut stops tracking and forgets the visitor", async () => {
  const b = installBrowser();
  const k = tab({ flushAt: 1 });
  k.track("before");
  await until(() => b.sent().length == 1);
  k.optOut();
  k.track("after");
  await sleep(30);
  assert.equal(b.sent().length, 1);
  assert.equal(b.cookies.get("kairos_aid"), undefined);
  assert.deepEqual([...b.storage.map.keys()], ["kairos.consent"]);
  assert.deepEqual(tab().user(), {}, "a later page does not track either");
});

test("server errors and network failures are retried with backoff until accepted, once", async () => {
  const b = installBrowser();
  const answers = [{ status: 503 }, "network", { status: 500 }];
  b.respond(() => answers.shift() ?? { status: 200, body: { accepted: 2 } });
  const k = tab({ flushAt: 2, retryBase: 20, retryMax: 1000 });
  k.track("a");
  k.track("b");
  await until(() => b.requests.length == 4, 5000, "three failures then success");
  await sleep(100);
  assert.equal(b.requests.length, 4, "no request after the success");
  const ids = b.requests.map((r) => r.body.batch.map((e) => e.messageId).join());
  assert.equal(new Set(ids).size, 1, "every retry carries the same events and messageIds");
  const gaps = b.requests.slice(1).map((r, i) => r.at - b.requests[i].at);
  // Equal jitter: retry n waits between base*2^n/2 and base*2^n.
  gaps.forEach((g, n) => assert.ok(g >= 10 * 2 ** n - 2, `gap ${n} = ${g} ms`));
  await until(() => queueKeys(b).length == 0, 1000);
});

test("429 is retried no sooner than Retry-After", async () => {
  const b = installBrowser();
  let first = true;
  b.respond(() => (first ? ((first = false), { status: 429, headers: { "Retry-After": "1" } }) : { status: 200 }));
  const k = tab({ flushAt: 1, retryBase: 5 });
  k.track("a");
  await until(() => b.requests.length == 2, 3000);
  const gap = b.requests[1].at - b.requests[0].at;
  assert.ok(gap >= 995, `retried after ${gap} ms`);
});

test("validation errors are not retried", async () => {
  const b = installBrowser();
  b.respond((r) =>
    r.body.batch[0].event == "bad-request"
      ? { status: 400, body: { code: "malformed_json" } }
      : { status: 200, body: { accepted: 1, rejected: [{ index: 1, code: "missing_product_id" }] } },
  );
  const warn = console.warn;
  const warnings = [];
  console.warn = (...a) => warnings.push(a);
  try {
    const k = tab({ flushAt: 1 });
    k.track("bad-request");
    await until(() => b.requests.length == 1);
    await sleep(80);
    assert.equal(b.requests.length, 1, "400 is final");
    k.track("product_view", { product_id: "1" });
    await until(() => b.requests.length == 2);
    await sleep(80);
    assert.equal(b.requests.length, 2, "per-event rejections in a 200 are final too");
    assert.equal(queueKeys(b).length, 0);
    assert.equal(warnings.length, 2, "each drop is reported on the console");
  } finally {
    console.warn = warn;
  }
});

test("hiding the page sends everything at once with keepalive and releases the queue", async () => {
  const b = installBrowser();
  const k = tab({ flushAt: 100 });
  for (let i = 0; i < 5; i++) k.track("e" + i);
  b.fireDocument("visibilitychange");
  assert.equal(b.requests.length, 0, "visible: still batching");
  document.visibilityState = "hidden";
  b.fireDocument("visibilitychange");
  assert.equal(b.requests.length, 1, "the request starts synchronously in the handler");
  assert.equal(b.requests[0].body.batch.length, 5);
  assert.equal(b.requests[0].init.keepalive, true);
  await until(() => queueKeys(b).length == 0);
  document.visibilityState = "visible";
  k.track("last");
  b.respond(() => new Promise(() => {}));
  b.fire("pagehide", { persisted: false });
  assert.equal(b.requests.length, 2);
  // While the last request is in flight its event stays queued, leased, in a released queue that
  // the next page may adopt.
  const [key] = queueKeys(b);
  const saved = JSON.parse(b.storage.getItem(key));
  assert.equal(saved.r, 1);
  assert.ok(saved.q[0].l > Date.now(), "leased");
  // Back from the back-forward cache: the queue is this page's again.
  b.fire("pageshow", { persisted: true });
  assert.equal(JSON.parse(b.storage.getItem(key)).r, undefined);
});

test("a queue left by a closed page is adopted and sent once by the next page", async () => {
  const b = installBrowser();
  b.respond(() => "network");
  const old = tab({ flushAt: 1, retryBase: 10_000 });
  old.track("offline-1");
  old.track("offline-2");
  await until(() => b.requests[0]?.status === 0, 1000, "the first attempt failed");
  await sleep(10);
  b.fire("pagehide", { persisted: false });
  assert.equal(queueKeys(b).length, 1);
  b.requests.length = 0;
  b.respond(() => ({ status: 200 }));
  // A new page (the same tab navigating, or another tab) adopts the released queue.
  const next = tab({ flushAt: 1 });
  next.track("online");
  await until(() => b.sent().length >= 3);
  await sleep(50);
  const names = b.sent().map((e) => e.event);
  assert.deepEqual(names.sort(), ["offline-1", "offline-2", "online"]);
  assert.deepEqual(queueKeys(b), []);
});

test("two open tabs never send the same event", async () => {
  const b = installBrowser();
  let up = false;
  b.respond(() => (up ? { status: 200 } : "network"));
  const one = tab({ flushAt: 2, retryBase: 15, retryMax: 30 });
  const two = tab({ flushAt: 2, retryBase: 15, retryMax: 30 });
  for (let i = 0; i < 8; i++) (i % 2 ? one : two).track("e" + i);
  await until(() => b.requests.length >= 4, 1000, "both tabs tried while offline");
  up = true;
  // Both tabs keep retrying, and flush on demand too: still each event is delivered once.
  await Promise.all([one.flush(), two.flush(), one.flush()]);
  await until(() => b.delivered().size == 8, 3000, "all 8 events delivered");
  await sleep(100);
  for (const [id, n] of b.delivered()) assert.equal(n, 1, `event ${id} delivered ${n} times`);
  assert.deepEqual(queueKeys(b), []);
});

test("a live tab's queue is not adopted; a stale one (crashed tab) is", async (t) => {
  const b = installBrowser();
  b.respond(() => "network");
  let now = Date.now();
  t.mock.method(Date, "now", () => now);
  const crashed = tab({ flushAt: 1, retryBase: 60_000, staleQueue: 1000 });
  crashed.track("lost?");
  await until(() => b.requests.length == 1);
  b.respond(() => ({ status: 200 }));
  const other = tab({ flushAt: 1, staleQueue: 1000 });
  other.track("mine");
  await until(() => b.delivered().size == 1);
  await sleep(30);
  assert.equal(b.sent().at(-1).event, "mine", "the live queue stays with its tab");
  now += 1001;
  const later = tab({ flushAt: 1, staleQueue: 1000 });
  await later.flush();
  await until(() => b.delivered().size == 2);
  assert.equal(b.sent().at(-1).event, "lost?");
});

test("events in flight when a page died are re-sent only after their lease", async (t) => {
  const b = installBrowser();
  let now = Date.now();
  t.mock.method(Date, "now", () => now);
  b.respond(() => new Promise(() => {}));
  const dying = tab({ flushAt: 1, timeout: 5000 });
  dying.track("in-flight");
  await until(() => b.requests.length == 1);
  b.fire("pagehide", { persisted: false });
  b.respond(() => ({ status: 200 }));
  const next = tab({ flushAt: 1, timeout: 5000 });
  await next.flush();
  await sleep(30);
  assert.equal(b.requests.length, 1, "leased by the request in flight: not sent again yet");
  now += 5001;
  await next.flush();
  await until(() => b.delivered().size == 1);
  assert.equal(b.sent().at(-1).event, "in-flight", "same messageId: the server drops it if the first arrived");
  assert.equal(b.requests[1].body.batch[0].messageId, b.requests[0].body.batch[0].messageId);
});

test("the persistent queue is capped, oldest dropped", async () => {
  const b = installBrowser();
  b.respond(() => "network");
  const k = tab({ flushAt: 1000, maxQueueSize: 3 });
  for (let i = 0; i < 5; i++) k.track("e" + i);
  const [key] = queueKeys(b);
  assert.deepEqual(JSON.parse(b.storage.getItem(key)).q.map((en) => en.e.event), ["e2", "e3", "e4"]);
});

test("without localStorage the queue lives in memory", async () => {
  const b = installBrowser({ storage: false });
  const k = tab({ flushAt: 2 });
  k.track("a");
  k.track("b");
  await until(() => b.delivered().size == 2);
  assert.ok(b.cookies.get("kairos_aid"), "the cookie still carries the anonymous id");
  assert.equal(b.sent()[0].anonymousId, b.cookies.get("kairos_aid"));
});
