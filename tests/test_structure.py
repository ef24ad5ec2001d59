"""The package's shape: no import cycle (function-level imports included), no mode imports
the trainer, speed-only choices stay in the runtime layer, and recipes import only from the
package."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ddpm"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Every ddpm module `path` imports, anywhere in the file (`from ddpm import x` counts as
    ddpm.x when that is a module, else as ddpm)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("ddpm"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ddpm"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                is_module = (ROOT / name.replace(".", "/")).with_suffix(".py").exists() or (
                    ROOT / name.replace(".", "/")
                ).is_dir()
                names.add(name if is_module else node.module)
    return names


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path) & set(modules) - {name} for name, path in modules.items()}


def test_no_import_cycle():
    graph, done, stack = _graph(), set(), []

    def visit(name: str) -> None:
        if name in stack:
            raise AssertionError(
                "import cycle: " + " -> ".join([*stack[stack.index(name) :], name])
            )
        if name in done:
            return
        stack.append(name)
        for imported in sorted(graph[name]):
            visit(imported)
        stack.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert len(done) > 40


def test_only_the_cli_imports_the_trainer():
    """... and the ahead-of-time compiler (--mode=compile), which compiles the trainer's own
    train step."""
    importers = sorted(name for name, imports in _graph().items() if "ddpm.train" in imports)
    assert importers == ["ddpm.aot", "ddpm.cli"]


def test_modes_do_not_import_each_other():
    modes = {"ddpm.train", "ddpm.generate", "ddpm.editing", "ddpm.evaluate", "ddpm.sweep"}
    allowed = {("ddpm.editing", "ddpm.generate"), ("ddpm.evaluate", "ddpm.generate")}
    graph = _graph()
    sideways = {(m, i) for m in modes for i in graph[m] & modes} - allowed
    assert not sideways, sideways


def test_speed_only_choices_live_in_the_runtime_layer():
    """conv_grad_chunk appears only where it is implemented (ddpm/runtime.py) and configured
    (the schema and its validation); models never mention it."""
    mentions = sorted(
        str(p.relative_to(ROOT))
        for p in PACKAGE.rglob("*.py")
        if "conv_grad_chunk" in p.read_text()
    )
    assert mentions == ["ddpm/config/schema.py", "ddpm/config/validation.py", "ddpm/runtime.py"]
    for path in (PACKAGE / "models").glob("*.py"):
        assert "custom_vjp" not in path.read_text(), path


def test_recipes_import_only_from_the_package():
    for path in (ROOT / "configs").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] in ("ddpm", "ml_collections"), (path, node.module)
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] == "ml_collections" for a in node.names), path


def test_validation_reads_what_a_run_derives_in_one_call():
    """Config validation reads the run's derived values (input shape, stage-1 factor,
    distillation length) in one call, `runs.derive`, after its field checks; runs.py, what a
    run derives, never imports validation."""
    tree = ast.parse((PACKAGE / "config" / "validation.py").read_text())
    calls = [
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "runs"
    ]
    assert calls == ["derive"]
    assert "ddpm.config.validation" not in _graph()["ddpm.config.runs"]
