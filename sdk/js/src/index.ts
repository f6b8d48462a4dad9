/**
 * The ES module build (`/sdk/kairos.mjs`): `import kairos from ".../sdk/kairos.mjs"`, then
 * `kairos.init({ writeKey })`. `createKairos` makes independent instances (tests, several sources).
 */

import { createKairos } from "./tracker.js";

export { createKairos };
export type { Kairos, Options, Props, User } from "./tracker.js";
export { template } from "./widget.js";
export type { RecItem, RenderContext, Template } from "./widget.js";
export { fromGa4 } from "./datalayer.js";

export const kairos = createKairos();
export default kairos;
