"""The package's import graph points down the layers of shared/DESIGN.md, and modules stay small."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "lmforge"

LAYERS = {
    "common": 0,
    "config": 0,
    "tokenizer": 1,
    "model": 1,
    "data": 2,
    "multimodal": 2,
    "peft": 2,
    "quant": 2,
    "gguf_io": 2,  # GGUF files: model + tokenizer metadata; checkpoint.load_model reads .gguf through it
    "checkpoint": 3,
    "parallel": 3,  # tensor parallelism: used by infer and train (L4)
    "train": 4,
    "infer": 4,
    "eval": 5,
    "serve": 5,
    "rag": 5,
    "agent": 5,
    "recipes": 6,
    "cli": 7,
    "__main__": 7,
}
# Sideways imports allowed on top of "any layer below": (importer, imported).
ALLOWED_SIDEWAYS = {
    ("__main__", "cli"),  # `python -m lmforge` is the CLI itself
    ("rag", "eval"),  # rag scores with eval's metrics and asks eval's LocalLM/EndpointLM; registers its task type
    ("agent", "eval"),  # the python tool runs in eval's sandbox; agent eval reuses its metrics
    ("agent", "serve"),  # a local model speaks the server's tool-call format (serve/tools.py)
    ("agent", "rag"),  # the rag_search tool
    ("serve", "rag"),  # `serve --rag INDEX`: retrieval-augmented answers as a model name (serve/rag.py)
    ("config", "common"),
}  # the config loader builds on common's checked dataclasses
# serve may import anything below except train (DESIGN.md).
FORBIDDEN = {("serve", "train")}
# Modules allowed past the 500-line budget, with the reason.
SIZE_EXEMPT: dict[str, str] = {}
MAX_LINES = 500


def _component(module_path: Path) -> str:
    rel = module_path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imported_components(tree: ast.AST, module_path: Path) -> set[str]:
    found = set()
    rel_pkg = module_path.relative_to(PKG).parent.parts
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "lmforge" and len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != "lmforge":
                    continue
                if len(parts) > 1:
                    found.add(parts[1])
                else:
                    found.update(a.name for a in node.names)
            else:
                base = list(rel_pkg[: len(rel_pkg) - (node.level - 1)]) if node.level > 1 else list(rel_pkg)
                parts = base + ((node.module or "").split(".") if node.module else [])
                if parts:
                    found.add(parts[0])
                else:
                    found.update(a.name for a in node.names)
    return found


def test_every_component_has_a_layer():
    for path in PKG.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == PKG:
            continue
        assert _component(path) in LAYERS, f"{path} is in no layer; add it to DESIGN.md and LAYERS"


def test_imports_point_down_the_layers():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        if path.name == "__init__.py" and path.parent == PKG:
            continue  # the package root only re-exports lazily
        me = _component(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for other in _imported_components(tree, path):
            if other == me or other not in LAYERS:
                continue
            if (me, other) in FORBIDDEN:
                bad.append(f"{path.relative_to(PKG)} imports {other} (forbidden)")
            elif LAYERS[other] >= LAYERS[me] and (me, other) not in ALLOWED_SIDEWAYS:
                bad.append(f"{path.relative_to(PKG)} (L{LAYERS[me]} {me}) imports {other} (L{LAYERS[other]})")
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_recipes_do_not_import_each_other():
    bad = []
    for path in (PKG / "recipes").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and "recipes" in node.module.split("."):
                if not node.module.rsplit(".", 1)[-1].startswith("_"):  # private helpers are shared code
                    bad.append(f"{path.name} imports {node.module}")
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module and not node.module.startswith("_"):
                bad.append(f"{path.name} imports .{node.module}")
    assert not bad, "recipes import each other:\n" + "\n".join(bad)


def test_modules_stay_small():
    big = []
    for path in PKG.rglob("*.py"):
        n = len(path.read_text(encoding="utf-8").splitlines())
        rel = str(path.relative_to(PKG))
        if n > MAX_LINES and rel not in SIZE_EXEMPT:
            big.append(f"{rel}: {n} lines")
    assert not big, "modules over budget (split them or add an exemption with a reason):\n" + "\n".join(big)


def test_layering_checker_catches_a_violation(tmp_path):
    # The checker itself must be able to fail: an L1 module importing L4 is caught.
    fake = PKG / "model" / "_probe_fake.py"
    tree = ast.parse("from lmforge.infer import generate\nfrom ..train import x\n")
    comps = _imported_components(tree, fake)
    assert comps == {"infer", "train"}
    assert all(LAYERS[c] > LAYERS["model"] for c in comps)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(tree: ast.AST, path: Path, known: set[str]) -> set[str]:
    """lmforge modules `path` imports anywhere (function-level imports too: a lazy import still ties
    the two modules together). `from pkg import name` counts as pkg.name when that is a module."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lmforge."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module.startswith("lmforge"):
                continue
            for a in node.names:
                found.add(f"{module}.{a.name}" if f"{module}.{a.name}" in known else module)
    return {m for m in found if m in known and m != me}


def test_no_import_circles_between_modules():
    """Two modules that import each other (even lazily, inside a function) are one concern split in two
    or a shared piece that belongs in a third module. Package __init__ re-exports are not counted."""
    paths = {p: _module_name(p) for p in PKG.rglob("*.py")}
    known = set(paths.values())
    graph = {
        name: {
            m
            for m in _imported_modules(ast.parse(p.read_text(encoding="utf-8")), p, known)
            if not _is_package_init(m, paths)
        }
        for p, name in paths.items()
        if p.name != "__init__.py"
    }
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(
                    " -> ".join(stack[stack.index(nxt) :] + [node, nxt]) if nxt in stack else f"{node} -> {nxt}"
                )
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def _is_package_init(module: str, paths: dict) -> bool:
    return any(name == module and p.name == "__init__.py" for p, name in paths.items())
