"""The documentation site: every ``>>>`` example in docs/ runs, the math pages show only executed
code, the command-line options the tutorials name exist, and ``mkdocs build --strict`` succeeds."""

import argparse
import doctest
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_vae.cli import parser

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
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


@pytest.mark.parametrize("path", PAGES, ids=page_id)
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


def test_site_builds_strict(tmp_path):
    for module in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python", "pymdownx"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install '.[docs]')")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for page in ("index.html", "math/elbo/index.html", "api/model/index.html", "tutorials/train-cli/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    # the API pages are generated from the docstrings, with no Sphinx roles left over
    api = (tmp_path / "site" / "api" / "model" / "index.html").read_text(encoding="utf-8")
    assert "pyro_vae.model.VAE" in api and ":class:" not in api
