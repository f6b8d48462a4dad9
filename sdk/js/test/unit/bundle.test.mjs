// The shipped bundles: the size budget, and the snippet's queue stub replayed by kairos.js.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { gzipSync } from "node:zlib";

import { installBrowser, until } from "./env.mjs";

const dist = new URL("../../dist/", import.meta.url);
const BUDGET = 6 * 1024;

test(`kairos.js and kairos.mjs are at most ${BUDGET} bytes minified and gzipped`, () => {
  for (const file of ["kairos.js", "kairos.mjs"]) {
    const code = readFileSync(new URL(file, dist));
    const gz = gzipSync(code, { level: 9 }).length;
    console.log(`${file}: ${code.length} bytes minified, ${gz} bytes gzipped (budget ${BUDGET})`);
    assert.ok(gz <= BUDGET, `${file} is ${gz} bytes gzipped`);
  }
});

test("the snippet's stub keeps calls made before kairos.js loads, in order", async () => {
  const b = installBrowser();
  // The one-line snippet of the README.
  window.kairos = window.kairos || [];
  "init page track identify alias reset optIn optOut flush render".split(" ").forEach(function (m) {
    kairos[m] =
      kairos[m] ||
      function () {
        kairos.push([m].concat([].slice.call(arguments)));
      };
  });
  kairos.init({ writeKey: "wk", endpoint: "https://k.example", widgets: false, flushAt: 3 });
  kairos.page();
  kairos.identify("u1");
  kairos.track("product_view", { product_id: "9" });
  assert.equal(b.requests.length, 0);
  // Evaluate the classic-script bundle as a browser would.
  new Function(readFileSync(new URL("kairos.js", dist), "utf8"))();
  assert.ok(!Array.isArray(window.kairos), "the stub is replaced");
  await until(() => b.sent().length == 3);
  assert.deepEqual(b.sent().map((e) => e.type), ["page", "identify", "track"]);
  assert.equal(b.sent()[2].userId, "u1");
  assert.equal(b.requests[0].url, "https://k.example/v1/batch");
  // Loading kairos.js again does not replace the running tracker.
  const running = window.kairos;
  new Function(readFileSync(new URL("kairos.js", dist), "utf8"))();
  assert.equal(window.kairos, running);
});
