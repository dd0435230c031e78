"""Imports run one way: config, then model, then pipeline, then the entry points; no module imports back."""
import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted(p for p in [*ROOT.glob("*.py"), *ROOT.glob("utils/*.py"), *ROOT.glob("misc/*.py")]
                 if p.name != "__init__.py")
ENTRY_POINTS = {"train", "sample", "finetune_decoder", "evaluate"}


def module_name(path):
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def project_imports(path, modules):
    """Project modules that `path` imports anywhere in its body (lazy imports inside functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in modules}
    return found


def test_no_import_cycles_and_no_library_module_imports_an_entry_point():
    modules = {module_name(p) for p in LIBRARY}
    graph = {module_name(p): project_imports(p, modules) for p in LIBRARY}
    for name, deps in graph.items():
        if name not in ENTRY_POINTS:
            assert not deps & ENTRY_POINTS, f"{name} imports the entry point(s) {deps & ENTRY_POINTS}"
    state = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import cycle: " + " -> ".join(trail + [name])
        state[name] = "open"
        for dep in sorted(graph[name]):
            visit(dep, trail + [name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])


def test_low_modules_import_nothing_above_them():
    code = ("import sys, utils.config, utils.vae, utils.checkpoint\n"
            "print(' '.join(m for m in sys.modules if m.split('.')[0] in ('dataset', 'transformer_flow', 'misc')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_no_code_moves_tensors_to_a_fixed_gpu():
    """Devices come from the caller (pick_device, a tensor's .device): no .cuda() and no bare device="cuda", which
    is whichever GPU is current rather than this rank's."""
    for path in [*LIBRARY, *ROOT.glob("bench/*.py"), *ROOT.glob("scripts/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            assert not (isinstance(node.func, ast.Attribute) and node.func.attr == "cuda"), f"{where}: .cuda()"
            for kw in node.keywords:
                bare = any(isinstance(n, ast.Constant) and n.value == "cuda" for n in ast.walk(kw.value))
                assert not (kw.arg == "device" and bare), f'{where}: device="cuda"'
