"""The package's folders are layers: each module imports only from its own layer or those below, and
no chain of imports (deferred ones included) comes back to where it started."""

import ast
from pathlib import Path

import rpn_cli

PACKAGE = Path(rpn_cli.__file__).parent
# Lowest first; errors and the packaged weights sit under everything, the public names over everything.
LAYERS = ["version", "errors", "weights", "model", "io", "inference", "evaluation", "training", "cli", "__main__", "__init__"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _imports() -> dict[str, set[str]]:
    """Every rpn_cli module and the rpn_cli modules it imports anywhere in its body."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.startswith("rpn_cli"):
                    module = node.module.removeprefix("rpn_cli").lstrip(".")
                else:
                    continue
                for alias in node.names:  # "from . import base" names a module
                    submodule = f"{module}.{alias.name}" if module else alias.name
                    found = (PACKAGE / submodule.replace(".", "/")).with_suffix(".py").is_file() or \
                        (PACKAGE / submodule.replace(".", "/") / "__init__.py").is_file()
                    targets.add(submodule if found else module or "__init__")
            elif isinstance(node, ast.Import):
                targets |= {a.name.removeprefix("rpn_cli.") for a in node.names if a.name.startswith("rpn_cli.")}
        graph[name] = targets - {name}
    return graph


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_every_import_points_down_the_layers():
    upward = [f"{module} imports {target}" for module, targets in _imports().items() for target in targets
              if _layer(target) > _layer(module)]
    assert upward == []


def test_no_import_cycle_even_through_deferred_imports():
    graph = _imports()
    state: dict[str, str] = {}
    cycles = []

    def visit(module, trail):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_layer_checker_sees_a_violation():
    # The oracle itself: the CLI does import the training loop, and the model does not import the CLI.
    graph = _imports()
    assert "training.loop" in graph["cli.train"]
    assert all(not target.startswith("cli") for target in graph["model.network"])
    assert _layer("cli.base") > _layer("model.spec")
