"""The layering of ARCHITECTURE.md: each subpackage of tta imports only from the
layers below it, and no module grows past ~350 lines without saying why."""

from __future__ import annotations

import ast
from pathlib import Path

import tta

ROOT = Path(tta.__file__).resolve().parent

#: Layer of each top-level part of tta (a part may import from lower layers and
#: from its own layer's other parts only where listed as the same number).
LAYERS = {
    "paths": 0, "_registry": 0, "_warn": 0, "_host_memory": 0, "_checks": 0,
    "corruptions": 1, "augment": 1,
    "models": 2,
    "methods": 3,
    "data": 4,
    "bench": 5,
}
MAX_LINES = 350


def _part(module: str) -> str | None:
    """The top-level part of a dotted module name inside tta (None outside)."""
    parts = module.split(".")
    if parts[0] != "tta" or len(parts) < 2:
        return None
    return parts[1]


def _imports(path: Path) -> list[str]:
    """Absolute names of the tta modules ``path`` imports (relative ones resolved)."""
    # the package the module is in (for a package's __init__, the package itself)
    package = ["tta", *path.relative_to(ROOT).with_suffix("").parts][:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.append(module)
            # `from .. import corruptions` names a part by the imported name
            if node.module is None:
                names += [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return [n for n in names if n == "tta" or n.startswith("tta.")]


def test_no_part_of_tta_imports_from_a_layer_above_it() -> None:
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        if path == ROOT / "__init__.py":  # the public facade re-exports every layer
            continue
        own = path.relative_to(ROOT).parts[0].removesuffix(".py")
        assert own in LAYERS, f"{path}: part {own!r} has no layer in LAYERS (and ARCHITECTURE.md)"
        for name in _imports(path):
            other = _part(name)
            if other is None:
                # `import tta` / `tta.wrap`: the facade, which is the methods layer
                other = "methods"
            if other in LAYERS and LAYERS[other] > LAYERS[own]:
                upward.append(f"{path.relative_to(ROOT)} imports {name} ({other} is above {own})")
    assert not upward, "\n".join(upward)


def test_modules_over_the_size_limit_say_why() -> None:
    long = []
    for path in sorted(ROOT.rglob("*.py")):
        lines = path.read_text().splitlines()
        if len(lines) <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if f"over {MAX_LINES} lines" not in doc:
            long.append(f"{path.relative_to(ROOT)}: {len(lines)} lines, and its docstring does not say why")
    assert not long, "\n".join(long)
