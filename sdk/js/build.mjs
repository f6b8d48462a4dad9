// Builds the tracker bundles into dist/ (committed, so `cargo build` needs no npm):
//   dist/kairos.js   classic script (IIFE) for the async snippet
//   dist/kairos.mjs  ES module
// `node build.mjs --check` builds in memory and fails if dist/ differs (a stale bundle).
import { readFileSync, writeFileSync, mkdirSync } from "node:fs";
import { gzipSync } from "node:zlib";
import * as esbuild from "esbuild";

const here = new URL(".", import.meta.url).pathname;
const check = process.argv.includes("--check");
const { version } = JSON.parse(readFileSync(here + "package.json", "utf8"));

const bundles = [
  { entry: "src/global.ts", format: "iife", out: "dist/kairos.js" },
  { entry: "src/index.ts", format: "esm", out: "dist/kairos.mjs" },
];

let stale = [];
for (const b of bundles) {
  const result = await esbuild.build({
    absWorkingDir: here,
    entryPoints: [b.entry],
    bundle: true,
    minify: true,
    format: b.format,
    target: "es2020",
    legalComments: "none",
    define: { __VERSION__: JSON.stringify(version) },
    write: false,
    logLevel: "warning",
  });
  const code = Buffer.from(result.outputFiles[0].contents);
  const gz = gzipSync(code, { level: 9 }).length;
  console.log(`${b.out}: ${code.length} bytes minified, ${gz} bytes gzipped`);
  if (check) {
    let old = null;
    try {
      old = readFileSync(here + b.out);
    } catch {
      // Missing counts as stale.
    }
    if (!old || !old.equals(code)) stale.push(b.out);
  } else {
    mkdirSync(here + "dist", { recursive: true });
    writeFileSync(here + b.out, code);
  }
}
if (stale.length) {
  console.error(`stale: ${stale.join(", ")}; run \`npm run build\` in sdk/js and commit dist/`);
  process.exit(1);
}
