"""The layer rule (docs/decisions.md, "Layout"), checked on every import in the source tree:
top-level ones, ones inside functions, and ones under ``TYPE_CHECKING``.

mesh          the standard library, third-party packages and gen/ (``llorch.*``) only
catalog       mesh
provisioners  catalog, mesh
poolmanager   provisioners, catalog, mesh — never orchestrator
orchestrator  provisioners, catalog, mesh — never poolmanager
launch        anything; nothing imports it

And no package imports another package's servicer: wire converters live in ``<pkg>/convert.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FIRST_PARTY = ("mesh", "catalog", "provisioners", "poolmanager", "orchestrator", "launch")
MAY_IMPORT: dict[str, set[str]] = {
    "mesh": set(),
    "catalog": {"mesh"},
    "provisioners": {"catalog", "mesh"},
    "poolmanager": {"provisioners", "catalog", "mesh"},
    "orchestrator": {"provisioners", "catalog", "mesh"},
    "launch": set(FIRST_PARTY),
}


def imports_of(path: Path, package: str) -> list[tuple[int, str, list[str]]]:
    """Every import statement of ``path``: its line, the module it imports from (absolute;
    relative imports resolved against ``package``, the module's own package) and each name it
    may bring in as a module (``from catalog import servicer`` brings ``catalog.servicer``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, [alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = ".".join(p for p in (base, module) if p)
            names = [".".join(p for p in (module, alias.name) if p) for alias in node.names]
            found.append((node.lineno, module or names[0], [module, *names]))
    return found


def violations(root: Path) -> list[str]:
    """Each import under ``root`` that breaks the rule, as ``path:line: what``."""
    broken = []
    for layer in FIRST_PARTY:
        for path in sorted((root / layer).rglob("*.py")):
            relative = path.relative_to(root)
            parts = list(relative.with_suffix("").parts)
            package = ".".join(parts[:-1])
            for line, module, brought in imports_of(path, package):
                top = module.split(".")[0]
                if top not in FIRST_PARTY or top == layer:
                    continue
                where = f"{relative}:{line}"
                if top not in MAY_IMPORT[layer]:
                    broken.append(f"{where}: {layer} may not import {module}")
                elif layer != "launch" and any(".servicer" in f".{m}" for m in brought):
                    broken.append(f"{where}: {module} brings another package's servicer")
    return sorted(broken)


def test_the_source_tree_keeps_the_layer_rule() -> None:
    assert violations(ROOT) == []


def test_the_check_finds_each_kind_of_break(tmp_path: Path) -> None:
    """The check itself: a tree with one break of each kind reports each one."""
    for layer in FIRST_PARTY:
        (tmp_path / layer).mkdir()
        (tmp_path / layer / "__init__.py").write_text("")
    (tmp_path / "mesh" / "kernel.py").write_text(
        "import os\nimport grpc\nfrom llorch.common.v1 import common_pb2\n"
        "def later():\n    from launch.home import run_home\n"
    )
    (tmp_path / "catalog" / "servicer.py").write_text("from provisioners.gc import plan_gc\n")
    (tmp_path / "poolmanager" / "collector.py").write_text(
        "from catalog import servicer\nfrom catalog.convert import gc_policy_from_pb\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from orchestrator.service import Orchestrator\n"
    )
    (tmp_path / "orchestrator" / "app.py").write_text(
        "from . import service\nfrom .. import launch\n"
    )
    (tmp_path / "launch" / "home.py").write_text("from orchestrator.app import x\n")
    assert violations(tmp_path) == [
        "catalog/servicer.py:1: catalog may not import provisioners.gc",
        "mesh/kernel.py:5: mesh may not import launch.home",
        "orchestrator/app.py:2: orchestrator may not import launch",
        "poolmanager/collector.py:1: catalog brings another package's servicer",
        "poolmanager/collector.py:5: poolmanager may not import orchestrator.service",
    ]
