// Renders TeX formulas to HTML with KaTeX, for docs/_ext/katex_math.py (the MkDocs hook that
// calls it once per page with math). Input on stdin, JSON:
//   {"formulas": [{"tex": "...", "display": true|false}, ...], "options": {...KaTeX options}}
// Output on stdout, JSON: {"version": "0.x.y", "results": [{"html": "...", "warnings": [...]}
// or {"error": "..."}, ...]}, one result per formula, in order.
"use strict";

const katex = require("katex");

function render(formula, options) {
  const warnings = [];
  try {
    const html = katex.renderToString(formula.tex, {
      ...options,
      displayMode: Boolean(formula.display),
      throwOnError: true,
      // input that KaTeX accepts but LaTeX would not: reported, and a warning fails a --strict build
      strict: (errorCode, message) => {
        warnings.push(`${errorCode}: ${message}`);
        return "ignore";
      },
    });
    return { html, warnings };
  } catch (error) {
    return { error: String(error && error.message ? error.message : error) };
  }
}

const chunks = [];
process.stdin.on("data", (chunk) => chunks.push(chunk));
process.stdin.on("end", () => {
  const request = JSON.parse(Buffer.concat(chunks).toString("utf8"));
  const options = request.options || {};
  const results = request.formulas.map((formula) => render(formula, options));
  process.stdout.write(JSON.stringify({ version: katex.version, results }));
});
