"""The package's layering, as ARCHITECTURE.md states it: every import inside ``esmjax`` (lazy ones
in function bodies included) points to the same layer or one below, packages of one rank do not
import each other, and the module graph has no cycle."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "esmjax"

# Lowest first. A module belongs to the first entry that is a prefix of its dotted name.
LAYERS: list[tuple[str, ...]] = [
    ("esmjax.errors",),
    ("esmjax.config",),
    ("esmjax.parallel",),
    ("esmjax.models",),
    ("esmjax.io",),
    ("esmjax.data",),
    ("esmjax.inference",),  # a job reads built datasets (inference.inputs -> data.source)
    ("esmjax.evaluate",),
    ("esmjax.train",),
    ("esmjax.commands",),
    ("esmjax.cli",),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def home(name: str) -> tuple[int, str]:
    """(rank, package) of a dotted module name."""
    for rank, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if name == p or name.startswith(p + "."):
                return rank, p
    if name == "esmjax":
        return -1, "esmjax"
    raise AssertionError(f"{name} is in no layer: add it to ARCHITECTURE.md and LAYERS")


def imports(path: Path) -> set[str]:
    """Every esmjax module that ``path`` imports, anywhere in the file."""
    me = module_name(path)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("esmjax")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this package
                base = me.split(".")[
                    : len(me.split(".")) - node.level + (path.name == "__init__.py")
                ]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("esmjax"):
                continue
            for a in node.names:  # `from esmjax.io import checkpoint` imports a module
                sub = f"{mod}.{a.name}"
                out.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists() else mod)
    out.discard(me)
    return out


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}
GRAPH = {m: imports(p) for m, p in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_downward(module):
    rank, pkg = home(module)
    for target in sorted(GRAPH[module]):
        t_rank, t_pkg = home(target)
        assert t_rank <= rank, f"{module} (layer {pkg}) imports {target} from a layer above"
        if t_rank == rank:
            assert t_pkg == pkg, f"{module} imports {target}: packages of one rank stay apart"


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if t not in MODULES:
                continue
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_the_check_can_fail():
    """The checks see lazy imports and upward imports (guards against a parser that finds
    nothing)."""
    assert "esmjax.train.loop" in GRAPH["esmjax.commands.train"]  # a lazy import in main()
    assert home("esmjax.commands.train")[0] > home("esmjax.train.loop")[0]
    assert sum(len(v) for v in GRAPH.values()) > 100


def test_commands_do_not_import_each_other():
    """A command is argv -> options -> one library call: what two commands share (checks,
    options, start-up) lives in the library, not in a module of ``esmjax.commands``."""
    for module in sorted(m for m in MODULES if m.startswith("esmjax.commands.")):
        siblings = sorted(
            t for t in GRAPH[module] if t == "esmjax.commands" or t.startswith("esmjax.commands.")
        )
        assert not siblings, f"{module} imports {siblings}: move what they share into the library"
