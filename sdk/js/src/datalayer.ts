/**
 * The dataLayer bridge: GA4 e-commerce events that a site already pushes for Google Tag Manager
 * become Kairos events, so a shop with a GA4 e-commerce setup needs no extra tracking code.
 *
 * Both shapes GA4 uses are understood: `dataLayer.push({event: "view_item", ecommerce: {...}})`
 * and `gtag("event", "view_item", {...})`, which pushes its `arguments` object. Entries pushed
 * before the tracker loaded are replayed once; later pushes are seen by wrapping `push` (chained,
 * so GTM, which wraps it too, keeps working whichever loads first).
 */

type Props = Record<string, unknown>;
/** GA4 payloads are untyped JSON written by site code. */
type Any = any;

/** GA4 event names whose items map one-to-one onto a Kairos product event. */
const PER_ITEM: Record<string, string> = {
  view_item: "product_view",
  select_item: "click",
  add_to_cart: "add_to_cart",
  remove_from_cart: "remove_from_cart",
  add_to_wishlist: "add_to_wishlist",
};

const product = (i: Any, currency: unknown): Props => ({
  product_id: String(i.item_id ?? i.id),
  name: i.item_name,
  category: i.item_category,
  brand: i.item_brand,
  variant: i.item_variant,
  price: i.price,
  quantity: i.quantity,
  currency: i.currency ?? currency,
  position: i.index,
  list: i.item_list_name,
});

/** The Kairos events (`[name, properties]`) that one GA4 event stands for; none when unknown. */
export function fromGa4(name: string, params: Any): [string, Props][] {
  const ec = params?.ecommerce || params || {};
  const c = ec.currency;
  const items: Props[] = (Array.isArray(ec.items) ? ec.items : [])
    .filter((i: Any) => i && (i.item_id ?? i.id) != null)
    .map((i: Any) => product(i, c));
  if (PER_ITEM[name]) return items.map((p) => [PER_ITEM[name], p]);
  if (name == "purchase" && items.length)
    return [["purchase", { order_id: ec.transaction_id, revenue: ec.value, currency: c, tax: ec.tax, shipping: ec.shipping, coupon: ec.coupon, products: items }]];
  if (name == "begin_checkout" && items.length) return [["checkout_started", { value: ec.value, currency: c, products: items }]];
  const query = params?.search_term ?? ec.search_term;
  if ((name == "search" || name == "view_search_results") && query) return [["search", { query: String(query) }]];
  return [];
}

/** Sends the GA4 e-commerce events of `window[name]` (past and future pushes) through `track`. */
export function bridge(name: string, track: (event: string, properties: Props) => void): void {
  const w = window as Any;
  const dl: Any[] = (w[name] = w[name] || []);
  const handle = (m: Any) => {
    if (!m || typeof m != "object") return;
    const gtag = m[0] == "event";
    const n = gtag ? m[1] : m.event;
    if (typeof n == "string") fromGa4(n, gtag ? m[2] : m).forEach(([e, p]) => track(e, p));
  };
  dl.forEach(handle);
  const push = dl.push;
  dl.push = function (...args: Any[]) {
    args.forEach(handle);
    return push.apply(dl, args);
  };
}
