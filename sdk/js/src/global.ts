/**
 * The classic-script build (`/sdk/kairos.js`), loaded with `async` after the one-line snippet.
 *
 * The snippet makes `window.kairos` an array whose methods push `[method, ...args]`, so calls made
 * before this file arrives are kept; here they are replayed in order on the real tracker, which
 * then replaces the stub. The endpoint defaults to the origin this file was loaded from, so a site
 * that loads it from its Kairos node needs no `endpoint` option.
 */

import { createKairos, type Kairos } from "./tracker.js";

type Stub = [keyof Kairos, ...unknown[]][];

const w = window as unknown as { kairos?: Kairos | Stub };
const stub = w.kairos;
if (!stub || Array.isArray(stub)) {
  const script = document.currentScript as HTMLScriptElement | null;
  const k = createKairos(script?.src ? new URL(script.src).origin : undefined);
  w.kairos = k;
  (stub || []).forEach(([method, ...args]) => (k[method] as (...a: unknown[]) => void)?.(...args));
}
