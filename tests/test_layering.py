"""pyssl's modules form layers: imports point only down, never in a cycle, and every
``__init__.py`` only re-exports.

The modules are parsed, not imported (an import cycle can hide behind import order, and a
function-level import is still a dependency), so the graph covers every ``import`` statement:
absolute and relative, at module level and inside functions.
"""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyssl")

# The parts of pyssl, bottom first: part -> (height, the modules and packages it is made of).
# A module may import its own part and any part of a lower height; a part never imports another
# part of its own height (losses, augment and momentum are independent of each other, so are
# models and data). A module belongs to the part of the longest name below that prefixes its own.
LAYERS = {
    # The compiled extension and what everything above builds on. distributed: the process-group
    # helpers (all-gather with gradients, Shuffle-BN's permutations) that losses and methods share.
    # reference: each op's eager formula, beside the op. _fallback: the ops' eager kernels where
    # the compiled extension is missing.
    "base": (
        0,
        [
            "pyssl._loader",
            "pyssl._extension",
            "pyssl._fallback",
            "pyssl.ops",
            "pyssl.reference",
            "pyssl.emulation",
            "pyssl.distributed",
        ],
    ),
    "losses": (1, ["pyssl.losses"]),
    # The pretext tasks' transforms and colour space are augmentations: tensor to tensor.
    "augment": (1, ["pyssl.augment", "pyssl.pretext", "pyssl.pretext.lab", "pyssl.pretext.transforms"]),
    "momentum": (1, ["pyssl.momentum"]),
    # The package itself: the kernel layer (import pyssl stays light; the rest is lazy).
    "package": (2, ["pyssl", "pyssl._version", "pyssl._lazy"]),
    "models": (3, ["pyssl.models", "pyssl.pretext.nets"]),
    "data": (3, ["pyssl.data"]),
    "methods": (4, ["pyssl.methods"]),
    # eval sits just below train: the trainer's kNN monitor uses its features and kNN classifier.
    # pretext.video: the name the mask propagation (an evaluation of video colorization) had.
    "eval": (5, ["pyssl.eval", "pyssl.pretext.video"]),
    # pretext.fit: a minimal training loop for quick checks of the pretext methods.
    # run_log: the trainer's logs (CSV, TensorBoard, progress) behind one interface.
    "train": (6, ["pyssl.train", "pyssl.run_log", "pyssl.pretext.fit"]),
    "config": (7, ["pyssl.config"]),
    # launch: the local worker processes of --nproc; plot: the pictures of a run directory.
    "cli": (8, ["pyssl.cli", "pyssl.__main__", "pyssl.demo", "pyssl.launch", "pyssl.plot"]),
}
# Data sets are decoded and resized with the kernels and augmentations only: no model, loss or
# schedule has a say in what the data is.
DATA_MAY_IMPORT = {"data", "base", "augment"}


def _module_files() -> dict[str, str]:
    modules = {}
    for root, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            parts = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[: -len(".py")].split(os.sep)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = _module_files()


def _parse(module: str) -> ast.Module:
    with open(MODULES[module]) as f:
        return ast.parse(f.read(), MODULES[module])


def _imports(module: str) -> set[str]:
    """The pyssl modules ``module`` imports (compiled extensions such as pyssl._C left out)."""
    package = module if MODULES[module].endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(_parse(module)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in MODULES else source)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: _imports(module) for module in MODULES}


def part_of(module: str) -> str:
    best = None
    for part, (_, prefixes) in LAYERS.items():
        for prefix in prefixes:
            matches = module == prefix or (prefix != "pyssl" and module.startswith(prefix + "."))
            if matches and (best is None or len(prefix) > len(best[1])):
                best = (part, prefix)
    assert best is not None, f"{module} is in no part of LAYERS: add it there"
    return best[0]


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    visiting, done = [], set()

    def visit(node):
        if node in visiting:
            return visiting[visiting.index(node) :] + [node]
        if node in done:
            return None
        visiting.append(node)
        for target in sorted(graph[node]):
            cycle = visit(target)
            if cycle:
                return cycle
        visiting.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return None


def test_the_graph_sees_every_kind_of_import():
    assert "pyssl.ops" in GRAPH["pyssl.momentum"]  # from pyssl import ops (a submodule)
    assert "pyssl.losses.infonce" in GRAPH["pyssl.losses"]  # from pyssl.losses.infonce import ...
    assert "pyssl.train" in GRAPH["pyssl.cli"]  # inside a function
    assert "pyssl._C" not in GRAPH["pyssl.emulation"]  # the compiled extension is no source module
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_has_a_part():
    for module in MODULES:
        part_of(module)


def test_no_import_cycles():
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down():
    wrong = []
    for module, targets in sorted(GRAPH.items()):
        part = part_of(module)
        height = LAYERS[part][0]
        for target in sorted(targets):
            target_part = part_of(target)
            if target_part == part:
                continue
            if LAYERS[target_part][0] >= height or (part == "data" and target_part not in DATA_MAY_IMPORT):
                wrong.append(f"{module} ({part}) imports {target} ({target_part})")
    assert not wrong, "imports that do not point down:\n" + "\n".join(wrong)


def _is_reexport(node: ast.stmt) -> bool:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return True
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
        return True  # a docstring
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and all(
        isinstance(t, ast.Name) and t.id == "__all__" for t in targets
    )


@pytest.mark.parametrize("module", sorted(m for m, path in MODULES.items() if path.endswith("__init__.py")))
def test_init_files_only_reexport(module):
    code = [f"line {node.lineno}" for node in _parse(module).body if not _is_reexport(node)]
    assert not code, f"{MODULES[module]} holds code ({', '.join(code)}): move it into a module of the package"
