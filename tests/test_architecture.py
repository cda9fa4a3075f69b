"""The import contract: coe's packages form layers that only point down (ARCHITECTURE.md).

The graph is read from the syntax tree of every module under coe/, imports inside functions
included, so a lazy import cannot sneak past it. A wrong import fails here, with the edge named.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "coe"

# Bottom to top. A module may import from its own package, from any package in a lower layer,
# and from nothing above. Packages that share a layer are independent of each other.
LAYERS: list[tuple[str, ...]] = [
    ("types", "errors", "paths", "jsonl", "runtime", "redact"),
    ("engines", "models"),
    ("config",),
    ("cache",),
    ("router", "store", "requestlog"),
    ("prompts",),
    ("orchestrator",),
    ("gateway", "evals"),
    ("cluster",),
    ("bench",),
    ("cli",),
]
LAYER_OF = {package: level for level, names in enumerate(LAYERS) for package in names}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # the imported module, dotted
    names: tuple[str, ...]  # the name taken from it (a from-import), else ()
    line: int


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """The top-level component a module belongs to: coe.cache.group -> cache; coe -> coe."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "coe"


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def coe_imports(root: Path = ROOT) -> list[Import]:
    found = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = resolve(module, path.name == "__init__.py", node)
                for alias in node.names:
                    # `from coe import jsonl` imports the module coe.jsonl, not a name of coe.
                    folder = root.parent.joinpath(*target.split("."), alias.name)
                    if folder.is_dir() or folder.with_suffix(".py").is_file():
                        found.append(Import(module, f"{target}.{alias.name}", (), node.lineno))
                    else:
                        found.append(Import(module, target, (alias.name,), node.lineno))
            elif isinstance(node, ast.Import):
                found += [Import(module, a.name, (), node.lineno) for a in node.names]
    return [i for i in found if i.target == "coe" or i.target.startswith("coe.")]


def where(edge: Import) -> str:
    return f"{edge.module} (line {edge.line}) imports {edge.target}"


def test_every_package_has_a_layer() -> None:
    packages = {package_of(module_name(p)) for p in ROOT.rglob("*.py")} - {"coe"}
    assert sorted(packages - set(LAYER_OF)) == [], "add new packages to LAYERS (and the docs)"


def upward_imports(imports: list[Import]) -> list[str]:
    wrong = []
    for edge in imports:
        source, target = package_of(edge.module), package_of(edge.target)
        if source == target or (target == "coe" and set(edge.names) <= {"__version__"}):
            continue
        if source == "coe" or target == "coe" or LAYER_OF[target] >= LAYER_OF[source]:
            wrong.append(f"{where(edge)}: {source} may not depend on {target}")
    return wrong


def private_imports(imports: list[Import]) -> list[str]:
    return [
        f"{where(edge)}: takes {name}"
        for edge in imports
        if edge.target != edge.module
        for name in edge.names
        if name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
    ]


def test_imports_point_down() -> None:
    assert upward_imports(coe_imports()) == []


def package_cycles(imports: list[Import]) -> list[str]:
    """The packages that reach themselves through imports."""
    graph: dict[str, set[str]] = defaultdict(set)
    for edge in imports:
        source, target = package_of(edge.module), package_of(edge.target)
        if source != target:
            graph[source].add(target)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        nexts = graph[start] - seen
        return any(n == goal or reaches(n, goal, seen | {n}) for n in nexts)

    return sorted(p for p in list(graph) if reaches(p, p, set()))


def test_no_package_cycles() -> None:
    """Redundant with the layers while they hold; it names the loop if LAYERS is loosened."""
    assert package_cycles(coe_imports()) == []


def test_no_private_names_across_modules() -> None:
    assert private_imports(coe_imports()) == []


def test_the_checks_catch_what_issue_16_found(tmp_path: Path) -> None:
    """A tree with the old faults: engines -> cache (a lazy import, too), router -> store
    (same layer), and a private helper taken from another module."""
    root = tmp_path / "coe"
    files = {
        "__init__.py": "",
        "engines/__init__.py": "",
        "engines/pool.py": "from coe.cache.group import SlotGroup\n",
        "engines/remote.py": "def f():\n    from ..cache import plan\n",
        "cache/__init__.py": "",
        "cache/group.py": "from coe.engines.remote import _litellm\nSlotGroup = 1\n",
        "router/__init__.py": "",
        "router/base.py": "import coe.store.base\n",
        "store/__init__.py": "",
        "store/base.py": "",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    imports = coe_imports(root)
    assert upward_imports(imports) == [
        "coe.engines.pool (line 1) imports coe.cache.group: engines may not depend on cache",
        "coe.engines.remote (line 2) imports coe.cache: engines may not depend on cache",
        "coe.router.base (line 1) imports coe.store.base: router may not depend on store",
    ]
    assert package_cycles(imports) == ["cache", "engines"]
    assert private_imports(imports) == [
        "coe.cache.group (line 1) imports coe.engines.remote: takes _litellm"
    ]
