"""The package's import layering, read from its own source with `ast`: no import cycle, and no module
imports one in a layer above it. Every import counts, function-level ones included; only imports
under `if TYPE_CHECKING:` (annotations, never executed) are left out.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "clipcap"
HARNESS = PACKAGE.parent / "clipcap_bench"  # the benchmark harness: beside the library, never inside it

# Lowest first; this list is where the layering is written down. A module may import modules of its own
# layer and of the layers below. An entry names a module or a package (and everything in it);
# "clipcap" is the package's own __init__.
LAYERS = [
    ("clipcap.arrays", "clipcap.quoting", "clipcap.serving.http_limits", "clipcap.decoding_options", "clipcap.image_formats"),
    ("clipcap.serving.form",),
    ("clipcap.config",),
    ("clipcap.hub",),
    ("clipcap.tokenizer", "clipcap.images", "clipcap.mappers", "clipcap.model"),
    ("clipcap.formats",),
    ("clipcap.runtimes",),
    ("clipcap.decoding", "clipcap.captioner", "clipcap.serving.config", "clipcap"),
    ("clipcap.export",),
    ("clipcap.training", "clipcap.bulk", "clipcap.serving", "clipcap.cli",
     "clipcap.serving.oip", "clipcap.serving.front", "clipcap.serving.ray_serve"),
]
# Builders' dependencies that the on-disk formats must not need.
NOT_IN_FORMATS = ("onnx", "onnxruntime", "tensorrt", "torch.onnx", "openvino", "nncf")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(path: Path) -> set[str]:
    """Every absolute module name `path` imports (`from a.b import c` gives a.b.c when that is a module)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return names


def internal_imports(path: Path) -> set[str]:
    return {name for name in imported_names(path) if name in MODULES} - {module_name(path)}


def layer_of(module: str) -> int:
    matches = [(len(entry), index) for index, entries in enumerate(LAYERS) for entry in entries
               if module == entry or (entry != "clipcap" and module.startswith(entry + "."))]
    if not matches:
        pytest.fail(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return max(matches)[1]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


GRAPH = {module: internal_imports(path) for module, path in MODULES.items()}


def test_the_table_covers_every_module():
    assert len(MODULES) > 20  # the walk found the package
    for module in MODULES:
        layer_of(module)


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_from_a_lower_layer_to_a_higher_one():
    upward = sorted(f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
                    for module, targets in GRAPH.items() for target in targets
                    if layer_of(target) > layer_of(module))
    assert not upward, "\n".join(upward)


def test_formats_need_no_builder():
    for module, path in MODULES.items():
        if module.startswith("clipcap.formats"):
            builders = {name for name in imported_names(path)
                        if any(name == banned or name.startswith(banned + ".") for banned in NOT_IN_FORMATS)}
            assert not builders, f"{module} imports {sorted(builders)}"


def public_imports_only(path: Path) -> list[str]:
    """The clipcap names `path` imports that are not public (a module or a name starting with `_`)."""
    private = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "clipcap":
            names = [*node.module.split("."), *(alias.name for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [part for alias in node.names if alias.name.split(".")[0] == "clipcap"
                     for part in alias.name.split(".")]
        else:
            continue
        private += [f"{path.name}: {'.'.join(names)}" for name in names if name.startswith("_")][:1]
    return private


def test_the_library_never_imports_the_harness():
    assert HARNESS.is_dir()
    users = sorted(f"{module} imports {name}" for module, path in MODULES.items() for name in imported_names(path)
                   if name.split(".")[0] == "clipcap_bench")
    assert not users, "\n".join(users)


def test_the_harness_uses_only_the_public_api():
    files = sorted(HARNESS.rglob("*.py"))
    assert len(files) > 10
    private = [name for path in files for name in public_imports_only(path)]
    assert not private, "\n".join(private)


def test_the_checks_see_what_they_check(tmp_path):
    """The walker sees function-level imports and skips TYPE_CHECKING ones; the cycle finder finds cycles."""
    assert "clipcap.formats.model_bundle" in GRAPH["clipcap.cli"]  # imported inside a function
    assert "clipcap.config" not in GRAPH["clipcap.runtimes.base"]  # annotation-only import
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    planted = tmp_path / "planted.py"
    planted.write_text("from clipcap.runtimes.onnx_runtime import _private\nimport clipcap._hidden\nimport clipcap.images\n")
    assert len(public_imports_only(planted)) == 2
