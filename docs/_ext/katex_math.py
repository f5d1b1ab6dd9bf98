"""MkDocs hook: every formula is typeset at build time by KaTeX, so the built site shows math
with no JavaScript and no network.

``pymdownx.arithmatex`` (``generic: true``) turns ``$...$`` into ``<span class="arithmatex">\\(...\\)</span>``
and ``$$...$$`` into ``<div class="arithmatex">\\[...\\]</div>``. This hook sends the TeX of each
page to KaTeX (``katex_render.js``, run by Node.js) and puts the HTML it returns in their place;
KaTeX's stylesheet and fonts are copied into the site under ``katex/``. KaTeX is pinned by
``package.json`` and ``package-lock.json`` beside this file: install it from the repository root with

    npm ci --prefix docs/_ext

A formula KaTeX cannot parse fails the build, naming the page; input KaTeX accepts but LaTeX would
not is a warning, which fails a ``--strict`` build. Without Node.js or KaTeX the build fails and
says how to install them, rather than ship raw TeX.
"""

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import get_plugin_logger
from mkdocs.structure.files import File

log = get_plugin_logger("katex_math")

HERE = Path(__file__).resolve().parent
KATEX = HERE / "node_modules" / "katex"
RENDERER = HERE / "katex_render.js"
INSTALL = "npm ci --prefix docs/_ext"  # run from the repository root; needs Node.js and npm
SITE_FOLDER = "katex"  # where the site gets KaTeX's stylesheet and fonts
STYLESHEET = f"{SITE_FOLDER}/katex.min.css"

# arithmatex's generic output: the TeX, HTML-escaped, inside \( \) or \[ \] (or a bare
# \begin{...}...\end{...} environment, which arithmatex passes as a block)
MATH = re.compile(r'<(span|div) class="arithmatex">(.*?)</\1>', re.S)
WRAPS = {"span": ("\\(", "\\)"), "div": ("\\[", "\\]")}
# KaTeX's output holds each formula twice: its visual HTML, and MathML (with the TeX in an annotation)
# for screen readers. The theme's search indexes the visual text alone ("xd∈[0,1]"), once.
SEARCH_EXCLUDE = [("<math ", "<math data-search-exclude ")]


def katex_missing():
    """Why KaTeX cannot run here, with the fix; None when it can."""
    if shutil.which("node") is None:
        return (
            "Node.js is not installed, and the formulas of the documentation are typeset at build time "
            f"by KaTeX, which runs on Node.js: install Node.js and npm (e.g. apt-get install nodejs npm), "
            f"then run `{INSTALL}` from the repository root."
        )
    if not (KATEX / "package.json").is_file():
        return (
            f"KaTeX is not installed in {KATEX.parent}, and the formulas of the documentation are "
            f"typeset at build time by KaTeX: run `{INSTALL}` from the repository root."
        )
    return None


def on_config(config):
    arithmatex = config.mdx_configs.get("pymdownx.arithmatex")
    if "pymdownx.arithmatex" not in config.markdown_extensions or not (arithmatex or {}).get("generic"):
        raise PluginError("katex_math: enable pymdownx.arithmatex with generic: true in mkdocs.yml")
    problem = katex_missing()
    if problem:
        raise PluginError(problem)
    if STYLESHEET not in config.extra_css:
        config.extra_css.insert(0, STYLESHEET)
    return config


def on_files(files, config):
    # KaTeX's stylesheet and the fonts it names (url(fonts/...)), from the installed package
    dist = KATEX / "dist"
    assets = [dist / "katex.min.css", *sorted((dist / "fonts").iterdir())]
    for asset in assets:
        uri = f"{SITE_FOLDER}/{asset.relative_to(dist).as_posix()}"
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


def render(formulas, where):
    """HTML of each (tex, display) formula, rendered by KaTeX in one Node.js process."""
    request = {"formulas": [{"tex": tex, "display": display} for tex, display in formulas], "options": {}}
    try:
        done = subprocess.run(
            ["node", str(RENDERER)], input=json.dumps(request), capture_output=True,
            text=True, encoding="utf-8", cwd=HERE, timeout=300, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise PluginError(f"katex_math: could not run KaTeX for {where}: {error}") from error
    if done.returncode != 0:
        hint = katex_missing() or f"is KaTeX installed (`{INSTALL}`)?"
        raise PluginError(f"katex_math: KaTeX failed on {where} ({hint}):\n{done.stderr.strip()}")
    results = json.loads(done.stdout)["results"]
    errors = [f"  {tex!r}: {result['error']}" for (tex, _), result in zip(formulas, results) if "error" in result]
    if errors:
        raise PluginError(f"KaTeX cannot typeset {len(errors)} formula(s) of {where}:\n" + "\n".join(errors))
    for (tex, _), result in zip(formulas, results):
        for warning in result["warnings"]:
            log.warning(f"{where}: {tex!r}: {warning}")
    rendered = []
    for result in results:
        markup = result["html"]
        for plain, excluded in SEARCH_EXCLUDE:
            markup = markup.replace(plain, excluded)
        rendered.append(markup)
    return rendered


def on_page_content(content, page, config, files):
    found = list(MATH.finditer(content))
    if not found:
        return content
    formulas = [tex_of(match.group(1), match.group(2)) for match in found]
    rendered = iter(render(formulas, page.file.src_uri))
    return MATH.sub(lambda match: f'<{match.group(1)} class="arithmatex">{next(rendered)}</{match.group(1)}>', content)
