// Bundles the app into dist/ (app.js, app.css, index.html): the files the server embeds.
// Deterministic: same sources and lockfile, same bytes (the server test and CI compare them).
// index.html names each asset with `?v=<first 16 hex of its SHA-256>`, the same version the
// server computes, so browsers may cache the assets for good and still see every deploy.

import { createHash } from "node:crypto";
import { mkdir, readFile, rm, writeFile } from "node:fs/promises";
import * as esbuild from "esbuild";

const out = new URL("./dist/", import.meta.url);
await rm(out, { recursive: true, force: true });
await mkdir(out, { recursive: true });

const common = {
  bundle: true,
  minify: true,
  write: false,
  charset: "utf8",
  legalComments: "none",
  target: ["es2022", "chrome100", "firefox100", "safari15"],
  logLevel: "warning",
};

const [js, css] = await Promise.all([
  esbuild.build({ ...common, entryPoints: ["src/main.ts"], format: "esm", outfile: "dist/app.js" }),
  esbuild.build({ ...common, entryPoints: ["src/app.css"], outfile: "dist/app.css" }),
]);

const version = (bytes) => createHash("sha256").update(bytes).digest("hex").slice(0, 16);
const jsBytes = js.outputFiles[0].contents;
const cssBytes = css.outputFiles[0].contents;
const html = (await readFile(new URL("./src/index.html", import.meta.url), "utf8"))
  .replace("{{APP_JS_VERSION}}", version(jsBytes))
  .replace("{{APP_CSS_VERSION}}", version(cssBytes));

await writeFile(new URL("app.js", out), jsBytes);
await writeFile(new URL("app.css", out), cssBytes);
await writeFile(new URL("index.html", out), html);
console.log(`dist/: app.js ${jsBytes.length} B, app.css ${cssBytes.length} B, index.html ${html.length} B`);
