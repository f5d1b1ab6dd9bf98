"""The documentation site: every ``>>>`` example in docs/ runs, the math pages show only executed
code, the command-line options the tutorials name exist, and ``mkdocs build --strict`` succeeds
with a site that loads nothing from another host and shows every formula typeset by KaTeX."""

import argparse
import doctest
import importlib.util
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from pyro_vae.cli import parser

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
# docs/_ext holds the build's extensions and KaTeX's stylesheet and fonts, whose README is not a page
PAGES = sorted(p for p in DOCS.rglob("*.md") if p.relative_to(DOCS).parts[0] != "_ext")
MATH_PAGES = sorted((DOCS / "math").glob("*.md"))
OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def page_id(path):
    return str(path.relative_to(DOCS))


@pytest.fixture
def one_thread():
    """The examples are tiny: one thread is faster on a shared machine, and the same everywhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# pages whose examples train or draw for seconds: the fast lane leaves them out
SLOW_PAGES = {"math/elbo.md", "math/estimators.md"}


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if page_id(p) in SLOW_PAGES else p for p in PAGES], ids=page_id)
def test_examples_run(path, one_thread):
    result = doctest.testfile(str(path), module_relative=False, optionflags=OPTIONFLAGS, encoding="utf-8")
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {page_id(path)} failed (details above)"


@pytest.mark.parametrize("path", PAGES, ids=page_id)
def test_no_fence_is_read_as_expected_output(path):
    # doctest's expected output runs to the next blank line: a closing ``` right after an
    # example would be expected output, so every example block ends with a blank line
    examples = doctest.DocTestParser().get_examples(path.read_text(encoding="utf-8"))
    bad = [e.lineno + 1 for e in examples if "```" in e.want or "```" in e.source]
    assert not bad, f"{page_id(path)}: leave a blank line before the closing ``` of the example at line(s) {bad}"


@pytest.mark.parametrize("path", PAGES, ids=page_id)
def test_python_blocks_are_doctests(path):
    # Python meant to run is a doctest; anything else is a shell command in a ```bash block
    blocks = [(lang, body) for lang, body in FENCE.findall(path.read_text(encoding="utf-8")) if lang in ("python", "py", "pycon")]
    unexecuted = [body.splitlines()[0] for _, body in blocks if ">>>" not in body]
    assert not unexecuted, f"{page_id(path)}: Python blocks without >>> prompts are never run: {unexecuted}"


@pytest.mark.parametrize("path", MATH_PAGES, ids=page_id)
def test_math_pages_compute_their_numbers(path):
    text = path.read_text(encoding="utf-8")
    assert len(doctest.DocTestParser().get_examples(text)) >= 3, f"{page_id(path)} needs at least 3 examples"
    code_blocks = [lang for lang, body in FENCE.findall(text) if lang not in ("python", "text", "bash")]
    assert not code_blocks, f"{page_id(path)}: code blocks in languages the tests do not check: {code_blocks}"


def cli_options():
    options = set()
    for action in parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                options.update(o for a in sub._actions for o in a.option_strings)
    return options


def test_options_of_documented_commands_exist():
    # every option written after "pyro-vae <command>" (or "pyro_vae.cli <command>") in a shell block
    command = re.compile(r"(?:pyro-vae|pyro_vae\.cli)\s+(\w+)([^#;&|\n]*)")
    named = set()
    for path in PAGES:
        for lang, body in FENCE.findall(path.read_text(encoding="utf-8")):
            if lang in ("bash", "sh", "console"):
                for _, rest in command.findall(body.replace("\\\n", " ")):
                    named.update(re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest))
    assert named, "no pyro-vae command lines found: is the pattern wrong?"
    unknown = sorted(named - cli_options())
    assert not unknown, f"options in the docs' pyro-vae commands that pyro-vae does not have: {unknown}"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site, built once with ``mkdocs build --strict`` for the tests of the built pages."""
    # the docs extra installs them all (pykatex typesets the formulas): .ci/run installs it, so on
    # CI their absence is a failure, not a skip
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "pymdownx", "pykatex"):
        if importlib.util.find_spec(module) is None:
            (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{module} is not installed (pip install '.[docs]')")
    out = tmp_path_factory.mktemp("docs") / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    if done.returncode != 0:
        pytest.fail(f"mkdocs build --strict failed:\n{done.stdout}{done.stderr}")
    (out.parent / "build.log").write_text(done.stdout + done.stderr, encoding="utf-8")
    return out


def built_pages(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 20, f"only {len(pages)} pages built"
    return pages


@pytest.mark.slow
def test_site_builds_strict(site):
    for page in ("index.html", "math/elbo/index.html", "api/model/index.html", "tutorials/train-cli/index.html"):
        assert (site / page).is_file(), page
    # the API pages are generated from the docstrings, with no Sphinx roles left over
    api = (site / "api" / "model" / "index.html").read_text(encoding="utf-8")
    assert "pyro_vae.model.VAE" in api and ":class:" not in api
    # signatures get their own block (separate_signature), formatted by ruff or black
    assert "doc-signature" in api, "no separate signature block on the API page"
    log = (site.parent / "build.log").read_text(encoding="utf-8")
    assert "requires either Black or Ruff" not in log, "signatures are not formatted: pip install '.[docs]' (ruff)"


# what an element loads from its attribute: a page that names another host here needs the network
LOADS = {"script": ("src",), "img": ("src", "srcset"), "source": ("src", "srcset"), "iframe": ("src",),
         "embed": ("src",), "object": ("data",), "audio": ("src",), "video": ("src", "poster"),
         "track": ("src",), "input": ("src",), "image": ("href", "xlink:href"), "use": ("href", "xlink:href")}
LINK_LOADS = {"stylesheet", "icon", "shortcut", "apple-touch-icon", "preload", "prefetch", "modulepreload",
              "preconnect", "dns-prefetch", "manifest", "mask-icon"}
REMOTE = re.compile(r"^\s*(?:https?:)?//", re.I)
CSS_REMOTE = re.compile(r"""(?:url\(\s*['"]?|@import\s+['"])\s*(?:https?:)?//""", re.I)


class RemoteLoads(HTMLParser):
    """Every script, stylesheet, font, image or frame an HTML page would fetch from another host."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.found, self.in_style = [], False

    def handle_starttag(self, tag, attrs):
        attrs = {name: value or "" for name, value in attrs}
        names = LOADS.get(tag, ())
        if tag == "link" and LINK_LOADS & set(attrs.get("rel", "").lower().split()):
            names = ("href", "imagesrcset")
        for name in names:
            if REMOTE.search(attrs.get(name, "")) or any(REMOTE.search(u) for u in attrs.get(name, "").split(",")[1:]):
                self.found.append(f"<{tag} {name}={attrs[name]!r}>")
        if CSS_REMOTE.search(attrs.get("style", "")):
            self.found.append(f"<{tag} style={attrs['style']!r}>")
        self.in_style = tag == "style"

    def handle_endtag(self, tag):
        self.in_style = False

    def handle_data(self, data):
        if self.in_style and CSS_REMOTE.search(data):
            self.found.append(f"<style> {CSS_REMOTE.search(data).group(0)}...")


@pytest.mark.slow
def test_site_loads_nothing_from_another_host(site):
    # offline readers get the whole site: no CDN scripts, web fonts, remote stylesheets or images
    # (links in the text to other sites are fine: <a href> is not a load)
    remote = {}
    for page in built_pages(site):
        parser = RemoteLoads()
        parser.feed(page.read_text(encoding="utf-8"))
        if parser.found:
            remote[str(page.relative_to(site))] = parser.found
    for css in site.rglob("*.css"):
        hits = CSS_REMOTE.findall(css.read_text(encoding="utf-8"))
        if hits:
            remote[str(css.relative_to(site))] = hits
    assert not remote, f"the built site loads from other hosts: {remote}"
    # the KaTeX stylesheet and its fonts are in the site, where the pages link them from
    assert (site / "katex" / "katex.min.css").is_file()
    fonts = {f.name for f in (site / "katex" / "fonts").iterdir()}
    named = set(re.findall(r"url\(fonts/([^)]+)\)", (site / "katex" / "katex.min.css").read_text(encoding="utf-8")))
    assert named and named <= fonts, f"fonts named by katex.min.css missing from the site: {sorted(named - fonts)}"


class VisibleText(HTMLParser):
    """The text a reader sees, less code (where TeX is quoted on purpose) and the TeX source KaTeX
    keeps in its MathML <annotation> for screen readers and copying, which is not displayed."""

    HIDDEN = {"code", "pre", "script", "style", "annotation", "template"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth, self.parts = 0, []

    def handle_starttag(self, tag, attrs):
        if tag in self.HIDDEN:
            self.depth += 1

    def handle_endtag(self, tag):
        if tag in self.HIDDEN and self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if not self.depth:
            self.parts.append(data)


@pytest.mark.slow
def test_no_raw_tex_in_rendered_text(site):
    raw = {}
    for page in built_pages(site):
        parser = VisibleText()
        parser.feed(page.read_text(encoding="utf-8"))
        text = "".join(parser.parts)
        hits = [text[max(0, m.start() - 30):m.end() + 30] for m in re.finditer(r"\\[()\[\]]|\$\$", text)]
        if hits:
            raw[str(page.relative_to(site))] = hits[:3]
    assert not raw, f"raw TeX delimiters in the text of the built pages (untypeset math?): {raw}"


@pytest.mark.slow
def test_math_is_typeset_by_katex(site):
    pages = {p: (site / p.relative_to(DOCS).with_suffix("") / "index.html") for p in MATH_PAGES}
    assert pages
    for source, page in pages.items():
        text = page.read_text(encoding="utf-8")
        assert text.count('class="katex"') >= 3, f"{page_id(source)}: no formulas typeset by KaTeX"
        if "$$" in source.read_text(encoding="utf-8"):
            assert 'class="katex-display"' in text, f"{page_id(source)}: its display formulas are not typeset"
    # every formula arithmatex found, on every page, holds KaTeX's output and not TeX
    for page in built_pages(site):
        text = page.read_text(encoding="utf-8")
        formulas = re.findall(r'<(?:span|div) class="arithmatex">(.{0,40})', text)
        untypeset = [f for f in formulas if not f.startswith(('<span class="katex"', '<span class="katex-display"'))]
        assert not untypeset, f"{page.relative_to(site)}: formulas not typeset: {untypeset[:3]}"
    # and the pages link the stylesheet that lays KaTeX's HTML out, with its fonts
    elbo = (site / "math" / "elbo" / "index.html").read_text(encoding="utf-8")
    assert re.search(r'<link[^>]+href="(?:\.\./)+katex/katex\.min\.css"', elbo), "KaTeX stylesheet not linked"
    # of the KaTeX release that typeset the pages: it styles the line boxes of every formula, whose
    # classes KaTeX renames between releases (0.16's "base" and "strut" are 0.19's "katex-base", ...)
    css = (site / "katex" / "katex.min.css").read_text(encoding="utf-8")
    line_box = re.compile(r'<span class="katex-html" aria-hidden="true"><span class="([\w-]+)"><span class="([\w-]+)"')
    boxes = set(line_box.findall(elbo))
    assert boxes, "no KaTeX line boxes found on math/elbo"
    unstyled = {c for pair in boxes for c in pair if not re.search(rf"\.{c}(?![\w-])", css)}
    assert not unstyled, f"classes of KaTeX's output that the site's katex.min.css does not style: {sorted(unstyled)}"
