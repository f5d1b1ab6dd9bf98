// MathJax settings for pymdownx.arithmatex in generic mode: it wraps $...$ and $$...$$ in
// elements of class "arithmatex" with \( \) and \[ \] delimiters; MathJax typesets only those.
// MathJax itself comes from a CDN (see mkdocs.yml); offline, the TeX source stays readable.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex"
  }
};
