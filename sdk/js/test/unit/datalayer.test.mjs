// The GA4 dataLayer bridge: mapping and the push hook.
import assert from "node:assert/strict";
import { test } from "node:test";

import { installBrowser, until } from "./env.mjs";
import { bridge, fromGa4 } from "../../build/datalayer.js";
import { createKairos } from "../../build/tracker.js";

const items = [
  { item_id: "SKU_1", item_name: "Boots", item_category: "Shoes", item_brand: "Acme", price: 59.9, quantity: 2, index: 0, item_list_name: "Related" },
  { item_name: "no id: skipped" },
];

test("GA4 e-commerce events become Kairos events", () => {
  assert.deepEqual(fromGa4("view_item", { ecommerce: { currency: "EUR", items } }), [
    [
      "product_view",
      { product_id: "SKU_1", name: "Boots", category: "Shoes", brand: "Acme", variant: undefined, price: 59.9, quantity: 2, currency: "EUR", position: 0, list: "Related" },
    ],
  ]);
  assert.equal(fromGa4("select_item", { ecommerce: { items } })[0][0], "click");
  assert.equal(fromGa4("add_to_cart", { ecommerce: { items } })[0][0], "add_to_cart");
  assert.equal(fromGa4("remove_from_cart", { ecommerce: { items } })[0][0], "remove_from_cart");
  const [[name, purchase]] = fromGa4("purchase", { ecommerce: { transaction_id: "T1", value: 119.8, currency: "EUR", tax: 1, shipping: 2, items } });
  assert.equal(name, "purchase");
  assert.equal(purchase.order_id, "T1");
  assert.equal(purchase.revenue, 119.8);
  assert.deepEqual(purchase.products.map((p) => p.product_id), ["SKU_1"]);
  assert.deepEqual(fromGa4("search", { search_term: "red boots" }), [["search", { query: "red boots" }]]);
  assert.equal(fromGa4("begin_checkout", { ecommerce: { items } })[0][0], "checkout_started");
  // gtag's flat parameters (no `ecommerce` wrapper), numeric ids.
  assert.equal(fromGa4("view_item", { items: [{ item_id: 42 }] })[0][1].product_id, "42");
  // Unknown or incomplete events are ignored rather than sent to be rejected.
  assert.deepEqual(fromGa4("gtm.js", {}), []);
  assert.deepEqual(fromGa4("purchase", { ecommerce: { items: [] } }), []);
  assert.deepEqual(fromGa4("search", {}), []);
});

test("the bridge replays earlier pushes, hooks later ones and keeps push working", () => {
  installBrowser();
  window.dataLayer = [{ event: "view_item", ecommerce: { items: [{ item_id: "a" }] } }, { event: "gtm.dom" }];
  let gtmSaw = 0;
  const gtmPush = window.dataLayer.push;
  window.dataLayer.push = function (...a) {
    gtmSaw += a.length;
    return gtmPush.apply(this, a);
  };
  const tracked = [];
  bridge("dataLayer", (e, p) => tracked.push([e, p.product_id]));
  window.dataLayer.push({ event: "add_to_cart", ecommerce: { items: [{ item_id: "b" }] } });
  (function gtag() {
    window.dataLayer.push(arguments);
  })("event", "select_item", { items: [{ item_id: "c" }] });
  assert.deepEqual(tracked, [["product_view", "a"], ["add_to_cart", "b"], ["click", "c"]]);
  assert.equal(gtmSaw, 2, "the previous push (GTM's) still sees every push");
  assert.equal(window.dataLayer.length, 4);
});

test("init({dataLayer: true}) sends bridged events through the tracker", async () => {
  const b = installBrowser();
  window.dataLayer = [{ event: "view_item", ecommerce: { items: [{ item_id: "p1", price: 3 }] } }];
  const k = createKairos();
  k.init({ writeKey: "wk", endpoint: "https://k.example", widgets: false, flushAt: 2, dataLayer: true });
  window.dataLayer.push({ event: "purchase", ecommerce: { transaction_id: "o1", value: 3, items: [{ item_id: "p1" }] } });
  await until(() => b.sent().length == 2);
  assert.deepEqual(b.sent().map((e) => [e.event, e.properties.product_id ?? e.properties.order_id]), [["product_view", "p1"], ["purchase", "o1"]]);
});
