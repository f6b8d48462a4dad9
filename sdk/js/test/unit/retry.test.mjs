// Backoff, Retry-After and which statuses are retried.
import assert from "node:assert/strict";
import { test } from "node:test";

import { backoff, retryAfter, retryable } from "../../build/retry.js";

test("backoff doubles per attempt up to the cap, with equal jitter", () => {
  assert.equal(backoff(0, 1000, 60000, () => 0), 500);
  assert.equal(backoff(0, 1000, 60000, () => 1), 1000);
  assert.equal(backoff(3, 1000, 60000, () => 1), 8000);
  assert.equal(backoff(10, 1000, 60000, () => 1), 60000);
  assert.equal(backoff(1000, 1000, 60000, () => 0), 30000, "no overflow on long outages");
  for (let i = 0; i < 100; i++) {
    const d = backoff(2, 1000, 60000);
    assert.ok(d >= 2000 && d <= 4000, String(d));
  }
});

test("Retry-After in seconds or as an HTTP date", () => {
  assert.equal(retryAfter("3"), 3000);
  assert.equal(retryAfter("0"), 0);
  assert.equal(retryAfter(null), 0);
  assert.equal(retryAfter(""), 0);
  const now = Date.parse("2026-01-01T00:00:00Z");
  assert.equal(retryAfter("Thu, 01 Jan 2026 00:00:05 GMT", now), 5000);
  assert.equal(retryAfter("Wed, 31 Dec 2025 23:59:00 GMT", now), 0);
  assert.equal(retryAfter("soon", now), 0);
});

test("only no response, 408, 429 and 5xx are retried", () => {
  for (const s of [0, 408, 429, 500, 502, 503]) assert.ok(retryable(s), String(s));
  for (const s of [200, 400, 401, 403, 404, 413, 415]) assert.ok(!retryable(s), String(s));
});
