// The widget's default template (the DOM behaviour is covered end to end in Chromium).
import assert from "node:assert/strict";
import { test } from "node:test";

import { template } from "../../build/widget.js";

test("the default template links items, marks them for click tracking and escapes", () => {
  const html = template(
    [
      { id: "1", score: 1, title: "Boots <b>", url: "/p/1", price: 9.5, currency: "EUR", image: "/i/1.jpg" },
      { id: 'x"y', score: 0.5, url: "javascript:alert(1)" },
    ],
    { scenario: "for_you", strategy: "trending", recId: "r", slot: null },
  );
  assert.match(html, /data-kairos-item="1" href="\/p\/1"/);
  assert.match(html, /Boots &#60;b&#62;/);
  assert.match(html, /9\.50 EUR/);
  assert.match(html, /<img src="\/i\/1\.jpg"/);
  assert.match(html, /data-kairos-item="x&#34;y" href="#"/, "no javascript: links");
  assert.doesNotMatch(html, /<b>/);
});
