"""The layers of the package import only the layers below them (README, "Architecture")."""

import ast
from pathlib import Path

import mamlkit

ROOT = Path(mamlkit.__file__).parent

# Each layer and the mamlkit layers it may import (its own modules always).
ALLOWED = {
    "engine": set(),
    "models": {"engine"},
    "data": set(),
    "tasks": {"engine"},
    "config": {"engine"},
    "distributed": set(),
    "rl": {"engine", "models", "config", "distributed"},
    "training": {"engine", "config", "distributed"},
    "plots": {"training"},
    "compare": {"plots", "training", "experiments"},
    "experiments": {"engine", "models", "data", "tasks", "config", "distributed", "rl", "training", "plots"},
    "cli": {"config", "distributed", "experiments", "training", "compare"},
    "__init__": {"engine"},
    "__main__": {"cli"},
}


def layer_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_layers(path: Path) -> set[str]:
    """The top-level mamlkit modules ``path`` imports, lazy imports inside functions included."""
    package = path.relative_to(ROOT.parent).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                parts = [*base, *(node.module.split(".") if node.module else [])]
                if len(parts) == 1:  # ``from . import x`` at the package root: x is the layer
                    found.update(a.name for a in node.names)
                    continue
            else:
                parts = (node.module or "").split(".")
            if parts[0] == "mamlkit" and len(parts) > 1:
                found.add(parts[1])
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "mamlkit" and len(parts) > 1:
                    found.add(parts[1])
    return found


def test_every_module_imports_only_the_layers_below_it():
    files = [p for p in ROOT.rglob("*.py") if "presets" not in p.parts]
    assert len(files) > 30
    wrong = []
    for path in files:
        layer = layer_of(path)
        assert layer in ALLOWED, f"{path}: a new layer; add it to ALLOWED and to the README's Architecture section"
        extra = imported_layers(path) - ALLOWED[layer] - {layer}
        if extra:
            wrong.append(f"{path.relative_to(ROOT)} ({layer}) imports {sorted(extra)}")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_imports():
    """The checker itself: relative, absolute and lazy imports are all found."""
    exp = imported_layers(ROOT / "experiments" / "rl.py")
    assert {"rl", "training", "config", "engine", "plots"} <= exp
    assert imported_layers(ROOT / "cli.py") == {"config", "distributed", "experiments", "training", "compare"}
