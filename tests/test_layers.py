"""The package's floors, and that imports only go down them.

    app      the `msdiff` command, job files, generation runs, the web page
    world    the procedural world: a client of everything below
    bench    benchmarks, their runner and scores
    train    training
    data     training data
    settings settings, loading, input checks, tiny random models, previews
    method   resampler, layout, attention, adapter, subjects, repaint, pipelines

Every import counts, including those inside functions (they run too, only later).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "msdiffusion"
METHOD = {
    "resampler",
    "layout",
    "attention",
    "adapter",
    "subjects",
    "pipelines",
    "repaint",
    "boxes",
    "release",
    "weight_files",
    "atomic",
}
SETTINGS = {"errors", "settings", "loading", "checks", "tiny", "preview"}
FLOORS = ["method", "settings", "data", "train", "bench", "world", "app"]


def floor(module: str) -> str:
    parts = module.split(".")[1:]  # without "msdiffusion"
    if not parts or parts == ["__main__"]:
        return (
            "method" if not parts else "app"
        )  # the package's lazy exports are the method's; `python -m` is the command
    if parts[0] in METHOD:
        return "method"
    if parts[0] in SETTINGS:
        return "settings"
    assert parts[0] in FLOORS, f"{module}: a module on no floor; add it to tests/test_layers.py's table"
    return parts[0]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("msdiffusion", *path.relative_to(PACKAGE).with_suffix("").parts))
        found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target, *(f"{target}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in known and c != name}
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_imports_only_go_down_the_floors():
    wrong = []
    for name, targets in graph().items():
        for target in targets:
            if FLOORS.index(floor(target)) > FLOORS.index(floor(name)):
                wrong.append(f"{name} ({floor(name)}) imports {target} ({floor(target)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_circles():
    edges = graph()
    # a package's own __init__ is imported by its modules implicitly; an edge to it is not a circle of code
    edges = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in edges.items()}
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                circles.append(" -> ".join(stack[stack.index(target) :] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not circles, "\n".join(circles)


def test_only_the_loader_names_the_world_below_it():
    """The world is a client: below it, only `loading` knows its name and where its weights lie."""
    named = []
    for name, path in modules().items():
        if floor(name) in ("world", "app") or name == "msdiffusion.loading":
            continue
        if "msdiff-world" in path.read_text() or any(
            t.startswith("msdiffusion.world") for t in imports(name, path, set(modules()))
        ):
            named.append(name)
    assert not named, named


def test_the_method_imports_no_application_code():
    method = {name: targets for name, targets in graph().items() if floor(name) == "method"}
    assert method and all(floor(target) == "method" for targets in method.values() for target in targets), method
