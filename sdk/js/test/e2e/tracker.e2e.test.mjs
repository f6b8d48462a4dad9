// The tracker in headless Chromium against a real `kairos serve`: delivery exactly once, outages,
// page hide, two tabs, consent and write keys.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Kairos, eventually, launchBrowser, recordBatches, sleep, snippetPage, startSite } from "./harness.mjs";

let kairos;
let site;
let browser;
/** Fast retries, so outages resolve within the test's patience. */
const fast = { retryBase: 200, retryMax: 1000 };

before(async () => {
  kairos = new Kairos();
  await kairos.start();
  site = await startSite({
    "/": snippetPage(kairos, { flushAt: 5, flushInterval: 200, ...fast }),
    "/lazy": snippetPage(kairos, { flushAt: 100, flushInterval: 600000, ...fast }),
    "/consent": snippetPage(kairos, { requireConsent: true, flushInterval: 100 }),
    "/locked": snippetPage(kairos, { writeKey: "locked", flushInterval: 100, ...fast }),
    "/next": snippetPage(kairos, { flushInterval: 100, ...fast }),
  });
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await site?.close();
  await kairos?.close();
});

/** Opens `path` of the site in a fresh context; waits until the tracker replaced the stub. */
async function open(path, context) {
  context ||= await browser.newContext();
  const page = await context.newPage();
  page.on("pageerror", (e) => console.log("page error:", e.message));
  await page.goto(site.url + path);
  await page.waitForFunction(() => !Array.isArray(window.kairos));
  return { context, page, anonymousId: await page.evaluate(() => kairos.user().anonymousId) };
}

test("events arrive exactly once, with the ids the tracker gave them", async () => {
  const context = await browser.newContext();
  const batches = recordBatches(context);
  const { page, anonymousId } = await open("/", context);
  await page.evaluate(() => {
    kairos.page();
    for (const id of ["1", "2", "3"]) kairos.track("product_view", { product_id: id });
    kairos.track("add_to_cart", { product_id: "3" });
    kairos.identify("e2e-user-1", { plan: "test" });
    kairos.track("product_view", { product_id: "4" });
  });
  await eventually(async () => (await kairos.counters("user_id=e2e-user-1")).product_views == 4, 15000, "4 product views");
  const counters = await kairos.counters("user_id=e2e-user-1");
  assert.equal(counters.page_views, 1);
  assert.equal(counters.add_to_carts, 1);
  const merged = await kairos.get(`/v1/profiles?anonymous_id=${anonymousId}`);
  assert.equal(merged.key, "u:e2e-user-1", "identify stitched the anonymous profile to the user");
  const events = batches.events();
  assert.equal(events.length, 7);
  assert.ok(events.every((e) => e.anonymousId == anonymousId && e.messageId && e.context.sessionId));
  assert.equal(new Set(events.map((e) => e.context.sessionId)).size, 1, "one session");
  assert.equal(events.at(-1).userId, "e2e-user-1");
  for (const [id, n] of batches.delivered()) assert.equal(n, 1, `${id} delivered ${n} times`);
  assert.equal(batches.delivered().size, 7);
  await context.close();
});

test("network down (requests aborted), then back: the queued events arrive once", async () => {
  const context = await browser.newContext();
  const batches = recordBatches(context);
  const { page, anonymousId } = await open("/", context);
  const kill = (route) => route.abort("internetdisconnected");
  await context.route("**/v1/batch", kill);
  await page.evaluate(() => {
    for (let i = 0; i < 7; i++) kairos.track("product_view", { product_id: String(10 + i) });
  });
  await eventually(() => batches.requests.filter((r) => r.status === 0).length >= 2, 15000, "two failed attempts");
  assert.equal((await kairos.counters(`anonymous_id=${anonymousId}`)).product_views ?? 0, 0);
  await context.unroute("**/v1/batch", kill);
  await eventually(async () => (await kairos.counters(`anonymous_id=${anonymousId}`)).product_views == 7, 15000, "7 views after the outage");
  await sleep(1500);
  assert.equal((await kairos.counters(`anonymous_id=${anonymousId}`)).product_views, 7, "and not more");
  for (const [id, n] of batches.delivered()) assert.equal(n, 1, `${id} delivered ${n} times`);
  await context.close();
});

test("server stopped, then restarted on the same port: the queued events arrive once", async () => {
  const context = await browser.newContext();
  const batches = recordBatches(context);
  const { page, anonymousId } = await open("/", context);
  await kairos.stop();
  await page.evaluate(() => {
    for (let i = 0; i < 6; i++) kairos.track("product_view", { product_id: String(20 + i) });
  });
  await eventually(() => batches.requests.some((r) => r.status === 0), 15000, "a refused connection");
  await sleep(500);
  await kairos.start();
  await eventually(async () => (await kairos.counters(`anonymous_id=${anonymousId}`)).product_views == 6, 20000, "6 views after the restart");
  await sleep(1500);
  assert.equal((await kairos.counters(`anonymous_id=${anonymousId}`)).product_views, 6);
  for (const [id, n] of batches.delivered()) assert.equal(n, 1, `${id} delivered ${n} times`);
  await context.close();
});

test("two open tabs, offline then online: every event is delivered once", async () => {
  const context = await browser.newContext();
  const batches = recordBatches(context);
  const kill = (route) => route.abort("internetdisconnected");
  await context.route("**/v1/batch", kill);
  const one = await open("/", context);
  const two = await open("/", context);
  assert.equal(one.anonymousId, two.anonymousId, "tabs of a site share the visitor id");
  for (let round = 0; round < 3; round++) {
    for (const tab of [one, two]) await tab.page.evaluate((r) => [0, 1, 2, 3, 4].forEach((i) => kairos.track("product_view", { product_id: `t${r}-${i}` })), round);
    await sleep(150);
  }
  await eventually(() => batches.requests.filter((r) => r.status === 0).length >= 4, 15000, "failed attempts from both tabs");
  await context.unroute("**/v1/batch", kill);
  // Both tabs also flush at will while delivering: still no event goes twice.
  await Promise.all([one.page.evaluate(() => kairos.flush()), two.page.evaluate(() => kairos.flush())]);
  await eventually(async () => (await kairos.counters(`anonymous_id=${one.anonymousId}`)).product_views == 30, 20000, "30 views");
  await sleep(1500);
  assert.equal((await kairos.counters(`anonymous_id=${one.anonymousId}`)).product_views, 30);
  assert.equal(batches.delivered().size, 30);
  for (const [id, n] of batches.delivered()) assert.equal(n, 1, `${id} delivered ${n} times`);
  await context.close();
});

test("events are flushed when the page is hidden or left", async () => {
  const context = await browser.newContext();
  const batches = recordBatches(context);
  const { page, anonymousId } = await open("/lazy", context);
  await page.evaluate(() => kairos.track("product_view", { product_id: "h1" }));
  await sleep(500);
  assert.equal(batches.requests.length, 0, "batching: nothing sent yet");
  // Another tab comes to the front: visibilitychange to hidden flushes.
  await page.evaluate(() => {
    Object.defineProperty(document, "visibilityState", { value: "hidden", configurable: true });
    document.dispatchEvent(new Event("visibilitychange"));
  });
  await eventually(async () => (await kairos.counters(`anonymous_id=${anonymousId}`)).product_views == 1, 10000, "flush on hidden");
  await page.evaluate(() => {
    Object.defineProperty(document, "visibilityState", { value: "visible", configurable: true });
    for (const id of ["h2", "h3", "h4"]) kairos.track("product_view", { product_id: id });
  });
  // Leaving the page: pagehide sends with keepalive, and the request outlives the page.
  await page.goto(site.url + "/next");
  await eventually(async () => (await kairos.counters(`anonymous_id=${anonymousId}`)).product_views == 4, 10000, "flush on pagehide");
  await sleep(1000);
  assert.equal((await kairos.counters(`anonymous_id=${anonymousId}`)).product_views, 4);
  await context.close();
});

test("where fetch has no keepalive, a hidden page's events go out with sendBeacon", async () => {
  const context = await browser.newContext();
  // A browser without keepalive fetch, and a count of the beacons the page sends.
  await context.addInitScript(() => {
    delete Request.prototype.keepalive;
    const send = navigator.sendBeacon.bind(navigator);
    window.beacons = 0;
    navigator.sendBeacon = (url, data) => {
      window.beacons += 1;
      return send(url, data);
    };
  });
  const { page, anonymousId } = await open("/lazy", context);
  assert.equal(await page.evaluate(() => "keepalive" in Request.prototype), false);
  await page.evaluate(() => kairos.track("product_view", { product_id: "b1" }));
  await sleep(300);
  assert.equal(await page.evaluate(() => window.beacons), 0, "batching: nothing sent yet");
  await page.evaluate(() => {
    Object.defineProperty(document, "visibilityState", { value: "hidden", configurable: true });
    document.dispatchEvent(new Event("visibilitychange"));
  });
  await eventually(async () => (await kairos.counters(`anonymous_id=${anonymousId}`)).product_views == 1, 10000, "beacon delivered");
  assert.equal(await page.evaluate(() => window.beacons), 1);
  await sleep(500);
  assert.equal((await kairos.counters(`anonymous_id=${anonymousId}`)).product_views, 1, "once");
  await context.close();
});

test("consent required and not given: nothing is sent or stored", async () => {
  const context = await browser.newContext();
  const batches = recordBatches(context);
  const page = await context.newPage();
  await page.goto(site.url + "/consent");
  await page.waitForFunction(() => !Array.isArray(window.kairos));
  await page.evaluate(() => {
    kairos.page();
    kairos.track("product_view", { product_id: "c1" });
  });
  await sleep(1200);
  assert.equal(batches.requests.length, 0, "no request");
  const stored = await page.evaluate(() => ({ ls: Object.keys(localStorage), cookie: document.cookie, user: kairos.user() }));
  assert.deepEqual(stored, { ls: [], cookie: "", user: {} });
  await page.evaluate(() => kairos.optIn());
  const anonymousId = await page.evaluate(() => kairos.user().anonymousId);
  await eventually(async () => (await kairos.counters(`anonymous_id=${anonymousId}`)).product_views == 1, 10000, "events after optIn");
  assert.equal((await kairos.counters(`anonymous_id=${anonymousId}`)).page_views, 1);
  await context.close();
});

test("a write key used from an origin it does not allow is refused, and not retried", async () => {
  const context = await browser.newContext();
  const batches = recordBatches(context);
  const { page, anonymousId } = await open("/locked", context);
  const warnings = [];
  page.on("console", (m) => m.type() == "warning" && warnings.push(m.text()));
  await page.evaluate(() => kairos.track("product_view", { product_id: "x" }));
  await eventually(() => batches.requests[0]?.status === 403, 10000, "403");
  await sleep(1500);
  assert.equal(batches.requests.length, 1, "403 is final");
  assert.ok(warnings.some((w) => w.includes("kairos")), "reported on the console");
  assert.deepEqual(await kairos.counters(`anonymous_id=${anonymousId}`), {});
  await context.close();
});
