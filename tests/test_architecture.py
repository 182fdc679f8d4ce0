"""docs/architecture.md against the tree: a map that names a missing module, or leaves a module
out, or puts a class in the wrong file, sends a reader (or a reviewer) to the wrong place."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "architecture.md"
MAPPED = ("jobs", "workers", "workers/models")
MODULE_PATH = re.compile(r"\b((?:jobs|workers|cutout|benchmarks|tests)/[\w/]+\.py)\b")
# In the table of workers/models/, a module is named by its file name alone: | `base.py` | ...
MODELS_ROW = re.compile(r"^\|\s*(`\w+\.py`(?:,\s*`\w+\.py`)*)\s*\|", re.MULTILINE)
# "`CrashGuard` in `workers/items.py`": the name is defined at the top of that module.
NAME_IN_MODULE = re.compile(r"`(\w+)` in `((?:jobs|workers|cutout)/[\w/]+\.py)`")


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _models_table_names(text: str) -> set[str]:
    return {f"workers/models/{name}" for cell in MODELS_ROW.findall(text)
            for name in re.findall(r"`(\w+\.py)`", cell)}


def _named_modules(text: str) -> set[str]:
    return set(MODULE_PATH.findall(text)) | _models_table_names(text)


def _modules_of_the_tree() -> set[str]:
    return {f"{folder}/{path.name}" for folder in MAPPED for path in (REPO / folder).glob("*.py")
            if path.name != "__init__.py"}


def _top_level_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def test_every_module_the_map_names_exists():
    missing = sorted(path for path in _named_modules(_doc()) if not (REPO / path).is_file())
    assert missing == [], f"docs/architecture.md names modules that do not exist: {missing}"


def test_every_module_of_jobs_and_workers_is_on_the_map():
    absent = sorted(_modules_of_the_tree() - _named_modules(_doc()))
    assert absent == [], f"modules missing from docs/architecture.md: {absent}"


def test_a_name_placed_in_a_module_is_defined_there():
    wrong = [f"{name} in {path}" for name, path in NAME_IN_MODULE.findall(_doc())
             if (REPO / path).is_file() and name not in _top_level_names(REPO / path)]
    assert wrong == [], f"docs/architecture.md puts names in the wrong module: {wrong}"


def test_the_checks_see_the_map():
    """The patterns above must match the document's actual form, or the checks pass vacuously."""
    text = _doc()
    assert len(_named_modules(text)) > 40
    assert "workers/models/base.py" in _models_table_names(text)
    assert NAME_IN_MODULE.findall(text)
