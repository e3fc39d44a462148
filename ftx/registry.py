"""Extension points as registries: the plugins of one kind are the modules of one
package, one module per plugin, named by its file (``ftx/objectives/orpo.py`` is
``objective=orpo``). Adding one is adding its module (and, where the kind is a
config group, its ``conf/<group>/NAME.yaml``); nothing else names it.

A plugin module states what the framework must know before it runs (which data an
objective learns from, which package a logger needs) as plain literals at its top,
``KIND = "preference"``. The registry reads them from the source without importing
the module, so the config checks stay fast and torch-free; the module is imported
when a run uses it. A module of the package that states none of the registry's
required facts is a helper (``objectives/base.py``), not a plugin.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any


class Registry:
    def __init__(self, package: str, kind: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
        """``package``: dotted name of the package holding the plugins; ``kind``: what
        one is called in messages; ``required``: the literals every plugin states
        (how a plugin is told from a helper); ``optional``: literals that default to None."""
        self.package, self.kind, self.required, self.optional = package, kind, required, optional

    @functools.cached_property
    def _facts(self) -> dict[str, dict[str, Any]]:
        directory = Path(importlib.util.find_spec(self.package).origin).parent
        found = {}
        for path in sorted(directory.glob("*.py")):
            if path.stem.startswith("_"):
                continue
            facts = _literals(path, self.required + self.optional)
            if all(name in facts for name in self.required):
                found[path.stem] = {name: facts.get(name) for name in self.required + self.optional}
        return found

    def names(self) -> list[str]:
        """Every plugin's name, sorted."""
        return sorted(self._facts)

    def fact(self, name: str, key: str) -> Any:
        """What plugin ``name`` states as ``key`` (None for an optional one it leaves out)."""
        return self._facts[self._known(name)][key]

    def load(self, name: str) -> ModuleType:
        """The plugin's module, imported."""
        return importlib.import_module(f"{self.package}.{self._known(name)}")

    def _known(self, name: str) -> str:
        if name not in self._facts:
            raise KeyError(f"no {self.kind} named {name!r}; there are: {', '.join(self.names())}")
        return name


def _literals(path: Path, names: tuple[str, ...]) -> dict[str, Any]:
    """The module-level ``NAME = <literal>`` assignments of a source file."""
    found = {}
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if isinstance(target, ast.Name) and target.id in names:
            found[target.id] = ast.literal_eval(node.value)
    return found
