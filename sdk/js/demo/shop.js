// The Kairos demo shop, served by `kairos serve --demo` at /demo.
//
// One HTML page serves every /demo/... path; this script renders the view the path names (home,
// category, search, product, cart, checkout). Each view is a real page load, like a classic shop,
// so the tracker's flush on page hide runs on every navigation. All tracking goes through the
// tracker: page views with kairos.page(), product and cart events as GA4 e-commerce pushes to
// window.dataLayer (the tracker's bridge turns them into Kairos events, as it would on a shop with
// a Google Tag Manager setup), and identify at checkout. Every shelf marked ✦ is a widget slot.
"use strict";

(function () {
  const view = document.getElementById("view");
  const path = location.pathname.replace(/\/+$/, "");
  const query = new URLSearchParams(location.search);
  const dataLayer = (window.dataLayer = window.dataLayer || []);

  const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";");
  const money = (price, currency) =>
    price == null ? "" : new Intl.NumberFormat("en", { style: "currency", currency: currency || "EUR" }).format(price);
  const itemUrl = (id) => "/demo/item/" + encodeURIComponent(id);
  const categoryUrl = (name) => "/demo/category/" + encodeURIComponent(name);
  const api = (url) => fetch(url).then((r) => (r.ok ? r.json() : Promise.reject(new Error(url + ": " + r.status))));

  // A poster generated from the item id: the demo catalogue has titles but no images.
  const hue = (id) => {
    let h = 7;
    for (const c of String(id)) h = (h * 31 + c.charCodeAt(0)) >>> 0;
    return h % 360;
  };
  const poster = (item, size) =>
    `<div class="poster ${size || ""}" style="--h:${hue(item.id)}"><span>${esc(item.title || item.id)}</span></div>`;
  const genres = (item, n) => esc((item.categories || []).slice(0, n || 2).join(" · "));

  // GA4 e-commerce item, as a shop's tag setup would push it.
  const ga4Item = (item, quantity) => ({
    item_id: item.id,
    item_name: item.title,
    item_category: (item.categories || [])[0],
    price: item.price,
    quantity: quantity || 1,
  });

  // --- Cart, kept in localStorage ---------------------------------------------------------------
  const cart = {
    load() {
      try {
        return JSON.parse(localStorage.getItem("demo.cart")) || [];
      } catch {
        return [];
      }
    },
    save(list) {
      localStorage.setItem("demo.cart", JSON.stringify(list));
      document.getElementById("cart-count").textContent = list.reduce((n, l) => n + l.quantity, 0);
    },
    add(item) {
      const list = cart.load();
      const line = list.find((l) => l.id === item.id);
      if (line) line.quantity += 1;
      else list.push({ id: item.id, title: item.title, price: item.price, currency: item.currency, categories: item.categories, quantity: 1 });
      cart.save(list);
      dataLayer.push({ event: "add_to_cart", ecommerce: { currency: item.currency, value: item.price, items: [ga4Item(item)] } });
    },
    remove(id) {
      const list = cart.load();
      const line = list.find((l) => l.id === id);
      cart.save(list.filter((l) => l.id !== id));
      if (line) dataLayer.push({ event: "remove_from_cart", ecommerce: { currency: line.currency, items: [ga4Item(line, line.quantity)] } });
    },
  };

  // --- The widget's template (overrides the default rendering) ----------------------------------
  const recCard = (item) =>
    `<a class="card" href="${esc(item.url || itemUrl(item.id))}" data-kairos-item="${esc(item.id)}">` +
    `${poster(item)}<span class="title">${esc(item.title || item.id)}</span>` +
    `<span class="meta">${genres(item)}</span><span class="price">${money(item.price, item.currency)}</span></a>`;
  // Also shows, next to the shelf's title, how Kairos made the list (e.g. the cold-start fallback
  // "trending", then "session_knn+affinity" once the visitor has done something).
  const template = (items, context) => {
    const note = context.slot.closest(".shelf")?.querySelector("h2 small");
    if (note) note.textContent = `${context.scenario} \u00b7 ${context.strategy}`;
    return items.length ? `<div class="row">${items.map(recCard).join("")}</div>` : `<p class="empty">Nothing here yet: look around a bit.</p>`;
  };

  const shelf = (title, scenario, attrs, note) =>
    `<section class="shelf"><h2><span class="spark">&#10022;</span> ${title} <small>${note || scenario}</small>` +
    `<em class="live" hidden></em></h2><div class="slot" data-kairos-slot="${scenario}" data-k="8" ${attrs || ""}>` +
    `<div class="row">${'<div class="card ghost"></div>'.repeat(6)}</div></div></section>`;

  // Shows, next to a shelf's title, how long after the last click it was re-rendered.
  let lastClick = 0;
  const watchShelves = () => {
    document.querySelectorAll("[data-kairos-slot]").forEach((slot) => {
      new MutationObserver(() => {
        const badge = slot.parentElement.querySelector(".live");
        if (!badge || !slot.dataset.kairosRecId) return;
        const since = performance.now() - lastClick;
        if (lastClick && since < 10000) {
          badge.textContent = `updated ${Math.round(since)} ms after your click`;
          badge.hidden = false;
          slot.classList.remove("flash");
          void slot.offsetWidth;
          slot.classList.add("flash");
        }
      }).observe(slot, { attributes: true, attributeFilter: ["data-kairos-rec-id"] });
    });
  };

  // --- Views --------------------------------------------------------------------------------------
  const gridCard = (item, quick) =>
    `<article class="card${quick ? " quick" : ""}" data-id="${esc(item.id)}">` +
    (quick ? `<button class="open" type="button">` : `<a class="open" href="${itemUrl(item.id)}">`) +
    `${poster(item)}<span class="title">${esc(item.title || item.id)}</span><span class="meta">${genres(item)}</span>` +
    (quick ? "</button>" : "</a>") +
    `<span class="actions"><span class="price">${money(item.price, item.currency)}</span>` +
    `<button class="add" type="button">Add to cart</button></span>` +
    (quick ? `<a class="details" href="${itemUrl(item.id)}">Details &rarr;</a>` : "") +
    `</article>`;

  // A grid of items; `quick` cards record a product view in place instead of navigating.
  const grid = (el, items, quick) => {
    el.innerHTML = items.length ? items.map((i) => gridCard(i, quick)).join("") : `<p class="empty">No items found.</p>`;
    el.querySelectorAll(".card").forEach((card, n) => {
      const item = items[n];
      card.querySelector(".add").addEventListener("click", () => {
        lastClick = performance.now();
        cart.add(item);
        card.classList.add("added");
      });
      card.querySelector(".open").addEventListener("click", () => {
        lastClick = performance.now();
        if (quick) {
          card.classList.add("seen");
          dataLayer.push({ event: "view_item", ecommerce: { currency: item.currency, value: item.price, items: [ga4Item(item)] } });
        } else {
          dataLayer.push({ event: "select_item", ecommerce: { items: [ga4Item(item)] } });
        }
      });
    });
  };

  const chips = (el, categories, current, onPick) => {
    el.innerHTML = categories
      .slice(0, 14)
      .map((c) => `<button type="button" class="chip${c.name === current ? " on" : ""}" data-name="${esc(c.name)}">${esc(c.name)}</button>`)
      .join("");
    el.querySelectorAll(".chip").forEach((b) => b.addEventListener("click", () => onPick(b.dataset.name)));
  };

  function home() {
    view.innerHTML =
      `<section class="hero"><h1>Recommendations that follow you, live.</h1>` +
      `<p>Open three titles of one genre below and watch <b>Recommended for you</b> change within a second. ` +
      `Nothing is precomputed: each click is an event, and the next answer of Kairos already knows it.</p></section>` +
      shelf("Recommended for you", "for_you", `data-params="exclude_viewed=true"`) +
      `<section class="shelf browse"><h2>Browse <small id="browse-genre"></small></h2><div id="chips" class="chips"></div>` +
      `<div id="grid" class="grid"></div></section>` +
      shelf("Trending now", "trending");
    const pick = (category) => {
      api(`/v1/items?limit=12&category=${encodeURIComponent(category || "")}`).then((page) => {
        const current = category || page.categories[0]?.name;
        if (!category && current) return pick(current);
        document.getElementById("browse-genre").textContent = current || "";
        chips(document.getElementById("chips"), page.categories, current, pick);
        grid(document.getElementById("grid"), page.items, true);
      });
    };
    pick(query.get("category"));
  }

  function category(name) {
    document.title = `${name} · Kairos demo shop`;
    view.innerHTML =
      `<nav class="crumbs"><a href="/demo/">Home</a> / ${esc(name)}</nav><h1>${esc(name)}</h1>` +
      shelf(`Trending in ${esc(name)}`, "trending", `data-category="${esc(name)}"`) +
      `<section class="shelf"><h2>Most popular</h2><div id="grid" class="grid"></div></section>`;
    api(`/v1/items?limit=24&category=${encodeURIComponent(name)}`).then((page) => grid(document.getElementById("grid"), page.items));
  }

  function search(q) {
    view.innerHTML =
      `<nav class="crumbs"><a href="/demo/">Home</a> / Search</nav><h1>Results for &ldquo;${esc(q)}&rdquo;</h1>` +
      `<div id="grid" class="grid"></div>` +
      shelf("Recommended for you", "for_you");
    document.querySelector(".search input").value = q;
    if (q) dataLayer.push({ event: "search", search_term: q });
    api(`/v1/items?limit=24&q=${encodeURIComponent(q)}`).then((page) => grid(document.getElementById("grid"), page.items));
  }

  function product(id) {
    view.innerHTML =
      `<nav class="crumbs"><a href="/demo/">Home</a> / <span id="crumb"></span></nav>` +
      `<section id="product" class="product"></section>` +
      shelf("Similar", "similar", `data-item-id="${esc(id)}"`, "people who viewed this also viewed") +
      shelf("Bought together", "bought_together", `data-item-id="${esc(id)}"`, "carted and bought with it") +
      shelf("Recommended for you", "for_you");
    api(`/v1/items/${encodeURIComponent(id)}`).then(
      (item) => {
        document.title = `${item.title || item.id} · Kairos demo shop`;
        const cats = item.categories || [];
        document.getElementById("crumb").innerHTML = cats[0]
          ? `<a href="${categoryUrl(cats[0])}">${esc(cats[0])}</a> / ${esc(item.title || id)}`
          : esc(item.title || id);
        document.getElementById("product").innerHTML =
          `${poster(item, "big")}<div class="info"><h1>${esc(item.title || id)}</h1>` +
          `<p class="chips">${cats.map((c) => `<a class="chip" href="${categoryUrl(c)}">${esc(c)}</a>`).join("")}</p>` +
          `<p class="big-price">${money(item.price, item.currency)}</p>` +
          `<p><button id="add" class="primary" type="button">Add to cart</button></p>` +
          `<p class="stats">${Math.round(item.stats?.views || 0)} recent views &middot; ${Math.round(item.stats?.purchases || 0)} recent purchases</p></div>`;
        document.getElementById("add").addEventListener("click", (e) => {
          lastClick = performance.now();
          cart.add(item);
          e.target.textContent = "Added \u2713";
        });
        dataLayer.push({ event: "view_item", ecommerce: { currency: item.currency, value: item.price, items: [ga4Item(item)] } });
      },
      () => {
        document.getElementById("product").innerHTML = `<p class="empty">No item ${esc(id)} in the catalogue.</p>`;
      },
    );
  }

  function cartView() {
    const list = cart.load();
    const total = list.reduce((s, l) => s + (l.price || 0) * l.quantity, 0);
    view.innerHTML =
      `<nav class="crumbs"><a href="/demo/">Home</a> / Cart</nav><h1>Your cart</h1>` +
      (list.length
        ? `<table class="lines">${list
            .map(
              (l) =>
                `<tr><td>${poster(l, "tiny")}</td><td><a href="${itemUrl(l.id)}">${esc(l.title || l.id)}</a></td>` +
                `<td>&times; ${l.quantity}</td><td>${money((l.price || 0) * l.quantity, l.currency)}</td>` +
                `<td><button class="remove" type="button" data-id="${esc(l.id)}">Remove</button></td></tr>`,
            )
            .join("")}</table><p class="total">Total ${money(total, list[0].currency)}</p>` +
          `<p><a class="primary" href="/demo/checkout">Checkout</a></p>`
        : `<p class="empty">Your cart is empty.</p>`) +
      shelf("You may also like", "for_you", `data-params="exclude_cart=true"`);
    view.querySelectorAll(".remove").forEach((b) =>
      b.addEventListener("click", () => {
        cart.remove(b.dataset.id);
        location.reload();
      }),
    );
  }

  function checkout() {
    const list = cart.load();
    if (!list.length) {
      view.innerHTML = `<h1>Checkout</h1><p class="empty">Your cart is empty. <a href="/demo/">Continue shopping</a></p>`;
      return;
    }
    const total = list.reduce((s, l) => s + (l.price || 0) * l.quantity, 0);
    view.innerHTML =
      `<nav class="crumbs"><a href="/demo/">Home</a> / <a href="/demo/cart">Cart</a> / Checkout</nav><h1>Checkout</h1>` +
      `<form id="checkout" class="checkout"><label>Email <input name="email" type="email" required value="shopper@example.com"></label>` +
      `<label>Name <input name="name" required value="Demo Shopper"></label>` +
      `<p class="total">${list.length} item(s), total ${money(total, list[0].currency)}</p>` +
      `<button class="primary" type="submit">Place order</button></form>`;
    document.getElementById("checkout").addEventListener("submit", (e) => {
      e.preventDefault();
      const form = new FormData(e.target);
      kairos.identify(String(form.get("email")), { name: form.get("name") });
      dataLayer.push({
        event: "purchase",
        ecommerce: {
          transaction_id: "demo-" + Date.now(),
          value: Math.round(total * 100) / 100,
          currency: list[0].currency || "EUR",
          items: list.map((l) => ga4Item(l, l.quantity)),
        },
      });
      cart.save([]);
      view.innerHTML =
        `<section class="hero"><h1>Thank you!</h1><p>Your order is placed (nothing will ship: this is a demo). ` +
        `Kairos now knows you as <b>${esc(form.get("email"))}</b>: your anonymous history was merged into that profile.</p></section>` +
        shelf("Recommended for you", "for_you");
      watchShelves();
      kairos.render();
    });
  }

  // --- Start --------------------------------------------------------------------------------------
  cart.save(cart.load());
  api("/v1/items?limit=1").then((page) => {
    document.getElementById("genres").innerHTML = page.categories
      .slice(0, 7)
      .map((c) => `<a href="${categoryUrl(c.name)}">${esc(c.name)}</a>`)
      .join("");
  });

  const [, , section, ...rest] = path.split("/");
  const arg = decodeURIComponent(rest.join("/"));
  if (section === "item" && arg) product(arg);
  else if (section === "category" && arg) category(arg);
  else if (section === "search") search(query.get("q") || "");
  else if (section === "cart") cartView();
  else if (section === "checkout") checkout();
  else home();
  watchShelves();

  kairos.init({ writeKey: "demo", dataLayer: true, template });
  kairos.page();

  addEventListener("load", () => {
    const who = kairos.user && kairos.user();
    if (!who || !who.anonymousId) return;
    const profile = who.userId ? `user_id=${encodeURIComponent(who.userId)}` : `anonymous_id=${encodeURIComponent(who.anonymousId)}`;
    document.getElementById("whoami").innerHTML =
      `You are <code>${esc(who.userId || who.anonymousId)}</code>, session <code>${esc(who.sessionId || "")}</code>. ` +
      `<a href="/v1/profiles?${profile}">Your profile as Kairos sees it</a>.`;
  });
})();
