"""MkDocs hook: every formula is typeset at build time by KaTeX, so the built site shows math
with no JavaScript and no network.

``pymdownx.arithmatex`` (``generic: true``) turns ``$...$`` into ``<span class="arithmatex">\\(...\\)</span>``
and ``$$...$$`` into ``<div class="arithmatex">\\[...\\]</div>``. This hook gives the TeX of each
formula to KaTeX, run in-process by the ``pykatex`` package (the ``docs`` extra: KaTeX 0.16.22 on
the QuickJS engine, no Node.js), and puts the HTML it returns in their place; KaTeX's stylesheet
and fonts of the same release, kept in ``katex/`` beside this file, are copied into the site
under ``katex/``.

A formula KaTeX cannot parse fails the build, naming the page and the formula, and so does input
KaTeX accepts but LaTeX would not (KaTeX's ``strict: "error"``), rather than ship raw or
non-LaTeX TeX.
"""

import html
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

try:
    import pykatex
except ImportError:  # reported by on_config, with the fix
    pykatex = None

ASSETS = Path(__file__).resolve().parent / "katex"  # KaTeX 0.16.22's stylesheet and fonts
SITE_FOLDER = "katex"  # where the site gets KaTeX's stylesheet and fonts
STYLESHEET = f"{SITE_FOLDER}/katex.min.css"

# arithmatex's generic output: the TeX, HTML-escaped, inside \( \) or \[ \] (or a bare
# \begin{...}...\end{...} environment, which arithmatex passes as a block)
MATH = re.compile(r'<(span|div) class="arithmatex">(.*?)</\1>', re.S)
WRAPS = {"span": ("\\(", "\\)"), "div": ("\\[", "\\]")}
# KaTeX's output holds each formula twice: its visual HTML, and MathML (with the TeX in an annotation)
# for screen readers. The theme's search indexes the visual text alone ("xd∈[0,1]"), once.
SEARCH_EXCLUDE = [("<math ", "<math data-search-exclude ")]


def on_config(config):
    arithmatex = config.mdx_configs.get("pymdownx.arithmatex")
    if "pymdownx.arithmatex" not in config.markdown_extensions or not (arithmatex or {}).get("generic"):
        raise PluginError("katex_math: enable pymdownx.arithmatex with generic: true in mkdocs.yml")
    if pykatex is None:
        raise PluginError(
            "pykatex is not installed, and the formulas of the documentation are typeset at build time "
            "by KaTeX, which it runs: pip install '.[docs]' from the repository root."
        )
    if STYLESHEET not in config.extra_css:
        config.extra_css.insert(0, STYLESHEET)
    return config


def on_files(files, config):
    # KaTeX's stylesheet and the fonts it names (url(fonts/...))
    for asset in [ASSETS / "katex.min.css", *sorted((ASSETS / "fonts").iterdir())]:
        uri = f"{SITE_FOLDER}/{asset.relative_to(ASSETS).as_posix()}"
        files.append(File.generated(config, uri, abs_src_path=str(asset)))
    return files


def tex_of(tag, body):
    """The TeX of one arithmatex element and whether it is display math."""
    tex = html.unescape(body).strip()
    opening, closing = WRAPS[tag]
    if tex.startswith(opening) and tex.endswith(closing):
        tex = tex[len(opening):-len(closing)]
    elif not (tag == "div" and tex.startswith("\\begin{")):
        raise PluginError(f"katex_math: unexpected arithmatex output {body!r}: is arithmatex configured with other delimiters?")
    return tex, tag == "div"


def typeset(tex, display):
    """KaTeX's HTML (and MathML) of one formula; raises pykatex.ParseError on TeX it rejects."""
    markup = pykatex.renderToString(tex, displayMode=display, throwOnError=True, strict="error")
    for plain, excluded in SEARCH_EXCLUDE:
        markup = markup.replace(plain, excluded)
    return markup


def render(formulas, where):
    """HTML of each (tex, display) formula; every formula KaTeX rejects is named in one error."""
    rendered, errors = [], []
    for tex, display in formulas:
        try:
            rendered.append(typeset(tex, display))
        except pykatex.ParseError as error:
            errors.append(f"  {tex!r}: {error}")
    if errors:
        raise PluginError(f"KaTeX cannot typeset {len(errors)} formula(s) of {where}:\n" + "\n".join(errors))
    return rendered


def on_page_content(content, page, config, files):
    found = list(MATH.finditer(content))
    if not found:
        return content
    formulas = [tex_of(match.group(1), match.group(2)) for match in found]
    rendered = iter(render(formulas, page.file.src_uri))
    return MATH.sub(lambda match: f'<{match.group(1)} class="arithmatex">{next(rendered)}</{match.group(1)}>', content)
