// End-to-end harness: a real `kairos serve` child process, a separate "customer site" origin
// served by node, and Debian's headless Chromium driven by playwright-core.
//
// Kairos runs the debug binary the Rust test step just built (E2E_KAIROS_BIN to override; not
// KAIROS_*, which Kairos reads as configuration, and which the child does not inherit) on a free
// loopback port with a temporary data directory and the demo catalogue. The customer site is a
// second loopback origin, so the tracker talks to Kairos cross-origin, with CORS and write keys,
// exactly as on a real site (a page faked by Playwright's router would be a "public" page to
// Chromium's local-network-access checks, which block it from reaching loopback).

import { spawn } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import http from "node:http";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";

export const repo = resolve(dirname(fileURLToPath(import.meta.url)), "../../../..");
export const outDir = process.env.E2E_OUT || join(repo, "target/e2e");

/** The sources the e2e node knows: the default demo source, and one locked to another site. */
const CONFIG = `
[[ingest.sources]]
name = "demo"
write_key = "demo"
allowed_origins = ["http://localhost:*", "http://127.0.0.1:*"]

[[ingest.sources]]
name = "locked"
write_key = "locked"
allowed_origins = ["https://shop.example"]
`;

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `f` until it returns a truthy value; returns it, or throws after `ms`. */
export async function eventually(f, ms = 15000, what = "condition") {
  const end = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await f();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what} (last: ${last})`);
    await sleep(50);
  }
}

/** A Kairos node in a child process. */
export class Kairos {
  constructor() {
    this.dir = mkdtempSync(join(tmpdir(), "kairos-e2e-"));
    this.config = join(this.dir, "kairos.toml");
    writeFileSync(this.config, CONFIG);
    this.port = 0;
  }

  /** Starts (or restarts, on the same port and data directory) the node; resolves when ready. */
  async start() {
    const bin = process.env.E2E_KAIROS_BIN || join(repo, "target/debug/kairos");
    const listen = `127.0.0.1:${this.port}`;
    const args = ["serve", "--demo", "--listen", listen, "--data-dir", join(this.dir, "data"), "--config", this.config];
    // The demo catalogue: MovieLens when ../shared/data/movielens-small exists, else generated;
    // E2E_DEMO_DATA names another directory (a missing one forces the generated shop).
    if (process.env.E2E_DEMO_DATA) args.push("--demo-data", process.env.E2E_DEMO_DATA);
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("KAIROS_")));
    this.child = spawn(bin, args, { cwd: repo, stdio: ["ignore", "pipe", "pipe"], env: { ...env, RUST_LOG: "warn" } });
    this.exited = new Promise((r) => this.child.once("close", r));
    let stderr = "";
    this.child.stderr.on("data", (d) => (stderr += d));
    const url = await new Promise((ok, fail) => {
      let out = "";
      this.child.stdout.on("data", (d) => {
        out += d;
        const m = out.match(/kairos listening on (http:\/\/[^\s]+)/);
        if (m) ok(m[1]);
      });
      this.child.once("exit", (code) => fail(new Error(`kairos exited with ${code}: ${stderr}`)));
      this.child.once("error", (e) => fail(new Error(`cannot run ${bin} (build it with \`cargo build -p kairos\`): ${e.message}`)));
    });
    this.url = url;
    this.port = Number(new URL(url).port);
    await eventually(async () => (await fetch(url + "/readyz")).ok, 60000, "kairos ready");
    return this;
  }

  /** Graceful stop (SIGTERM: drain, snapshot, close the log). */
  async stop() {
    if (!this.child || this.child.exitCode !== null) return;
    this.child.kill("SIGTERM");
    await this.exited;
  }

  async get(path) {
    const r = await fetch(this.url + path);
    if (!r.ok) throw new Error(`${path}: ${r.status} ${await r.text()}`);
    return r.json();
  }

  /** A profile's counters (all zero for an unknown profile). */
  async counters(query) {
    const p = await this.get("/v1/profiles?" + query);
    return p.exists ? p.counters : {};
  }

  async close() {
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** A second origin playing the customer's site: serves `pages[path]` (HTML), 404 otherwise. */
export async function startSite(pages) {
  const server = http.createServer((req, res) => {
    const html = pages[new URL(req.url, "http://x").pathname];
    res.writeHead(html ? 200 : 404, { "content-type": "text/html; charset=utf-8" });
    res.end(html || "<!doctype html><title>not found</title>");
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return { url: `http://127.0.0.1:${server.address().port}`, close: () => new Promise((r) => server.close(r)) };
}

/** The README's snippet, loading the tracker from `kairos` and calling init with `options`. */
export function snippetPage(kairos, options, body = "", script = "") {
  return `<!doctype html><html><head><meta charset="utf-8"><title>Customer site</title>
<script>window.kairos=window.kairos||[];"init page track identify alias reset optIn optOut flush render".split(" ").forEach(function(m){kairos[m]=kairos[m]||function(){kairos.push([m].concat([].slice.call(arguments)))}});
kairos.init(${JSON.stringify({ writeKey: "demo", endpoint: kairos.url, ...options })});
${script}</script>
<script async src="${kairos.url}/sdk/kairos.js"></script></head><body>${body}</body></html>`;
}

export async function launchBrowser() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    // Playwright starts Chromium with a fresh temporary --user-data-dir of its own.
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
}

/**
 * Records every /v1/batch request of a browser context with the answer it got, so tests can
 * check that each messageId was delivered (2xx) exactly once across all tabs.
 */
export function recordBatches(context) {
  const requests = [];
  context.on("request", (req) => {
    if (!req.url().endsWith("/v1/batch") || req.method() != "POST") return;
    const entry = { events: JSON.parse(req.postData() || "{}").batch || [], status: null };
    requests.push(entry);
    // A request that got no answer (aborted, connection refused) resolves to null.
    req.response().then(
      (res) => (entry.status = res ? res.status() : 0),
      () => (entry.status = 0),
    );
  });
  return {
    requests,
    events: () => requests.flatMap((r) => r.events),
    /** messageId -> times delivered with a 2xx answer. */
    delivered() {
      const n = new Map();
      for (const r of requests) if (r.status >= 200 && r.status < 300) for (const e of r.events) n.set(e.messageId, (n.get(e.messageId) || 0) + 1);
      return n;
    },
  };
}

export function screenshotPath(name) {
  mkdirSync(outDir, { recursive: true });
  return join(outDir, name);
}
