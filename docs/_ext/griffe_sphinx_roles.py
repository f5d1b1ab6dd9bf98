"""Griffe extension for the API pages: turn the Sphinx markup of pyro-vae's docstrings into Markdown.

The docstrings are written with reStructuredText habits. ``double backticks`` already render as
code in Markdown; this extension handles the rest before mkdocstrings renders a docstring:

* ``:class:`~pyro_vae.likelihoods.Likelihood``` (also ``func``, ``meth``, ``data``, ``attr``,
  ``exc``, ``mod``, ``obj``) becomes a cross-reference to the API page of that object when it
  belongs to one of the ``documented`` modules (the option, set in mkdocs.yml: the modules that
  have an API page) and is public, and plain code otherwise (``pyro.infer.Trace_ELBO``,
  ``arviz.psislw``, a module without a page). A leading ``~`` shows only the last component, as
  in Sphinx.
* A line ending in ``::`` (a literal block follows) ends in ``:``; the indented block after it is
  already a Markdown code block.

Used from mkdocs.yml (``extensions:`` of the python handler); the file lives in docs/_ext/, which
mkdocs.yml excludes from the site.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|data|attr|exc|mod|obj):`(~?)([\w.]+)`")
LITERAL_BLOCK = re.compile(r"(?<=\S)::$", re.MULTILINE)


class SphinxRoles(griffe.Extension):
    def __init__(self, documented: list[str] | None = None) -> None:
        super().__init__()
        self.documented = tuple(documented or ())

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.path == "pyro_vae":
            self._walk(pkg, pkg)

    def _walk(self, obj: griffe.Object, pkg: griffe.Module) -> None:
        if obj.docstring is not None:
            obj.docstring.value = self._convert(obj.docstring.value, obj, pkg)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, pkg)

    def _convert(self, text: str, obj: griffe.Object, pkg: griffe.Module) -> str:
        def replace(match: re.Match) -> str:
            short, target = match.group(1) == "~", match.group(2)
            shown = target.rsplit(".", 1)[-1] if short else target
            path = self._canonical(target, obj, pkg)
            if path is not None and not self._has_page(path):
                path = None
            return f"[`{shown}`][{path}]" if path else f"`{shown}`"

        return LITERAL_BLOCK.sub(":", ROLE.sub(replace, text))

    def _has_page(self, path: str) -> bool:
        """Whether ``path`` is rendered on an API page: in a documented module, no private part."""
        in_module = any(path == m or path.startswith(m + ".") for m in self.documented)
        return in_module and not any(part.startswith("_") for part in path.split("."))

    @staticmethod
    def _canonical(target: str, obj: griffe.Object, pkg: griffe.Module) -> str | None:
        """The path of the pyro_vae object ``target`` names, seen from ``obj``; None if outside."""
        try:
            path = target if target.startswith("pyro_vae.") else obj.resolve(target)
        except Exception:  # noqa: BLE001  (a name griffe cannot resolve: keep it as code)
            return None
        if not path.startswith("pyro_vae."):
            return None
        try:
            found = pkg.modules_collection.get_member(path)
            return found.final_target.path if found.is_alias else found.path
        except Exception:  # noqa: BLE001  (unknown member or unresolvable alias: keep it as code)
            return None
