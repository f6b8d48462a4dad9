/**
 * When to try again after a failed request.
 *
 * Exponential backoff with "equal jitter": the delay doubles per consecutive failure up to a cap,
 * and half of it is random, so that thousands of browsers that lost the server at the same moment
 * do not come back in lockstep. A `Retry-After` from the server (429 when its log is overloaded) is
 * a floor: the tracker never retries sooner than asked.
 */

/** Delay in ms before retry number `attempt` (0 = first retry). */
export function backoff(attempt: number, base: number, max: number, random: () => number = Math.random): number {
  const d = Math.min(max, base * 2 ** Math.min(attempt, 30));
  return d / 2 + (random() * d) / 2;
}

/** A `Retry-After` header (seconds or an HTTP date) in ms from `now`; 0 when absent or past. */
export function retryAfter(value: string | null | undefined, now: number = Date.now()): number {
  if (!value) return 0;
  const s = +value;
  if (s >= 0) return s * 1000;
  const t = Date.parse(value);
  return t > now ? t - now : 0;
}

/** Whether a response status (0 = no response) means the same request may succeed later. */
export function retryable(status: number): boolean {
  return !status || status == 408 || status == 429 || status >= 500;
}
