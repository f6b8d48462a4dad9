/**
 * The recommendation widget: `<div data-kairos-slot="for_you" data-k="8"></div>` renders a list
 * from `GET /v1/recommendations` and reports what the visitor saw and clicked.
 *
 * Attributes: `data-kairos-slot` (the scenario: for_you, similar, bought_together, trending,
 * recently_viewed), `data-k`, `data-item-id` (similar, bought_together), `data-category`
 * (trending), and `data-params` (more query parameters, e.g. "max_per_category=2").
 *
 * - An impression (`rec_impression` with the list's `rec_id`) is recorded only once at least half
 *   of the slot has actually been on screen (IntersectionObserver), once per list shown.
 * - A click on an element with `data-kairos-item` inside a slot records `rec_click` with the
 *   `rec_id`, the item and its position; the capture-phase listener runs before a link navigates,
 *   and the flush on `pagehide` delivers it.
 * - When the visitor's behaviour changes (a product view, click, cart change, purchase, search or
 *   identify), the event is flushed at once and every slot asks again once the server accepted it
 *   (the API reads its own writes, so the answer already reflects the event). A list that comes
 *   back unchanged is left alone, keeping its impression.
 * - `template(items, context)` returning an HTML string or a Node replaces the default rendering;
 *   clickable elements carry `data-kairos-item="<id>"`.
 */

import type { KEvent } from "./queue.js";
import type { Internal } from "./tracker.js";

export interface RecItem {
  id: string;
  score: number;
  title?: string;
  url?: string;
  image?: string;
  categories?: string[];
  price?: number;
  currency?: string;
  [field: string]: unknown;
}

export interface RenderContext {
  scenario: string;
  /** How the list was made (`session_knn+affinity`, `trending`, ...). */
  strategy: string;
  recId: string;
  slot: HTMLElement;
}

export type Template = (items: RecItem[], context: RenderContext) => string | Node;

/** What a slot shows: the list's rec_id, scenario, ids, and the rec_id already counted as seen. */
interface Shown {
  r: string;
  s: string;
  ids: string[];
  seen?: string;
}

const BEHAVIOUR = /^(product_view|click|add_to_cart|remove_from_cart|purchase|search|rec_click)$/;

const changesBehaviour = (e: KEvent) => e.type == "identify" || e.type == "alias" || BEHAVIOUR.test(e.event as string);

const esc = (v: unknown) => String(v ?? "").replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";");

/** The default rendering: a row of linked cards. */
export const template: Template = (items) =>
  '<div class="kairos-recs">' +
  items
    .map(
      (i) =>
        '<a class="kairos-item" data-kairos-item="' +
        esc(i.id) +
        '" href="' +
        esc(/^(https?:|\/)/.test(i.url || "") ? i.url : "#") +
        '">' +
        (i.image ? '<img src="' + esc(i.image) + '" alt="">' : "") +
        '<span class="kairos-title">' +
        esc(i.title || i.id) +
        "</span>" +
        (i.price != null ? '<span class="kairos-price">' + esc(i.price.toFixed(2) + " " + (i.currency || "")) + "</span>" : "") +
        "</a>",
    )
    .join("") +
  "</div>";

/** Starts the widget; returns the function that (re-)renders the slots under a root. */
export function widgets(k: Internal): (root?: ParentNode) => void {
  const shown = new WeakMap<Element, Shown>();
  /** The latest request of each slot: an older answer arriving late must not replace a newer one. */
  const latest = new WeakMap<Element, number>();
  let requests = 0;
  const slots = (root: ParentNode = document) => root.querySelectorAll<HTMLElement>("[data-kairos-slot]");
  const seen = (el: Element) => {
    const s = shown.get(el);
    if (s && s.seen != s.r && !document.hidden) {
      s.seen = s.r;
      k.track("rec_impression", { rec_id: s.r, scenario: s.s, product_ids: s.ids, slot: (el as HTMLElement).dataset.kairosSlot });
    }
  };
  const io =
    typeof IntersectionObserver == "function" &&
    new IntersectionObserver((entries) => entries.forEach((en) => en.isIntersecting && seen(en.target)), { threshold: 0.5 });

  const load = async (el: HTMLElement) => {
    const d = el.dataset;
    const u = k.user();
    const q = new URLSearchParams({ scenario: d.kairosSlot || "for_you", k: d.k || "8" });
    const add = (name: string, v?: string) => v && q.set(name, v);
    add("user_id", u.userId);
    add("anonymous_id", u.anonymousId);
    add("item_id", d.itemId);
    add("category", d.category);
    const n = ++requests;
    latest.set(el, n);
    try {
      const res = await fetch(k.o.endpoint + "/v1/recommendations?" + q + (d.params ? "&" + d.params : ""), { credentials: "omit" });
      if (!res.ok) return;
      const rec: { rec_id: string; scenario: string; strategy: string; items: RecItem[] } = await res.json();
      if (latest.get(el) != n) return;
      const ids = rec.items.map((i) => i.id);
      if (shown.get(el)?.ids.join() === ids.join()) return;
      shown.set(el, { r: rec.rec_id, s: rec.scenario, ids });
      const out = (k.o.template || template)(rec.items, { scenario: rec.scenario, strategy: rec.strategy, recId: rec.rec_id, slot: el });
      if (typeof out == "string") el.innerHTML = out;
      else el.replaceChildren(out);
      el.setAttribute("data-kairos-rec-id", rec.rec_id);
      // Observing anew makes the observer report the current visibility of the new list.
      if (io) {
        io.unobserve(el);
        io.observe(el);
      }
    } catch {
      // The slot keeps what it showed (the site's fallback content, or the previous list).
    }
  };

  const render = (root?: ParentNode) => slots(root).forEach(load);

  addEventListener(
    "click",
    (e) => {
      const item = (e.target as Element).closest?.("[data-kairos-item]");
      const el = item?.closest("[data-kairos-slot]");
      const s = el && shown.get(el);
      if (!s) return;
      const id = item!.getAttribute("data-kairos-item")!;
      k.track("rec_click", { rec_id: s.r, scenario: s.s, product_id: id, position: s.ids.indexOf(id) });
    },
    true,
  );
  document.addEventListener("visibilitychange", () => !document.hidden && slots().forEach((el) => io && (io.unobserve(el), io.observe(el))));
  k.tracked.push((e) => changesBehaviour(e) && slots().length && k.flush());
  k.sent.push((batch) => batch.some(changesBehaviour) && render());
  if (document.readyState == "loading") document.addEventListener("DOMContentLoaded", () => render());
  else render();
  return render;
}
