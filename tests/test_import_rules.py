"""The layering rules of docs/architecture.md, checked on the source and at run time.

* The schedulers, the simulator, the routing policy and the configs never import JAX,
  the engine or the model: the simulator runs the same policy objects without them
  (and importing JAX is slow). Checked statically (every import statement, including
  the ones inside functions) and in a fresh interpreter.
* The engine does not import the simulator; the server and the router do not import
  each other.
* The attention kernels never import fbjax: they are a library of their own.
* No module imports another module's private (``_``-prefixed) names.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
FBJAX = REPO_ROOT / "fbjax"
KERNELS = REPO_ROOT / "kernels" / "fbjax_kernels"

PURE_PACKAGES = ("sched", "sim", "routing", "profiling/store.py", "profiling/vidur.py",
                 "config.py", "traces.py", "metrics.py", "resources.py", "catalog.py")
FORBIDDEN_IN_PURE = ("jax", "jaxlib", "flax", "fbjax.engine", "fbjax.model", "fbjax_kernels",
                     "fbjax.serve", "fbjax.router")


def _files(*parts: str) -> list[Path]:
    out = []
    for part in parts:
        path = FBJAX / part
        out += [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))
    return out


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, module, names)`` of every import statement in ``path``, absolute names."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(path.parents[len(path.relative_to(REPO_ROOT).parts)
                                                   - 1]).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            out.append((node.lineno, module, [alias.name for alias in node.names]))
    return out


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _violations(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{p.relative_to(REPO_ROOT)}:{line} imports {module}"
            for p in paths for line, module, _ in _imports(p) if _under(module, forbidden)]


def test_pure_side_imports_no_jax_engine_or_model():
    assert _violations(_files(*PURE_PACKAGES), FORBIDDEN_IN_PURE) == []


def test_engine_does_not_import_the_simulator():
    assert _violations(_files("engine"), ("fbjax.sim", "fbjax.replay")) == []


def test_server_and_router_do_not_import_each_other():
    """What they share (error bodies, the listening socket) lives in ``fbjax.web``."""
    assert _violations(_files("serve"), ("fbjax.router",)) == []
    assert _violations(_files("router"), ("fbjax.serve",)) == []


def test_kernels_never_import_fbjax():
    paths = sorted(KERNELS.rglob("*.py"))
    assert paths
    assert _violations(paths, ("fbjax",)) == []


def test_no_private_names_imported_across_modules():
    found = []
    for path in sorted(FBJAX.rglob("*.py")) + sorted(KERNELS.rglob("*.py")):
        for line, module, names in _imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and _under(module, ("fbjax", "fbjax_kernels")):
                found.append(f"{path.relative_to(REPO_ROOT)}:{line} {module} {private}")
    assert found == []


def test_rule_checker_sees_imports_inside_functions(tmp_path):
    """The static check must be able to fail: an import hidden in a function counts."""
    path = FBJAX / "sched" / "_probe_for_test.py"
    path.write_text("def f():\n    import jax\n    from fbjax.engine import runner\n")
    try:
        assert len(_violations([path], FORBIDDEN_IN_PURE)) == 2
    finally:
        path.unlink()


@pytest.mark.parametrize("modules", [
    ("fbjax.sched.vllm", "fbjax.sched.sarathi", "fbjax.sched.fairbatching",
     "fbjax.sched.latency", "fbjax.sched.registry", "fbjax.sched.kv_cache",
     "fbjax.profiling.store", "fbjax.profiling.vidur", "fbjax.config", "fbjax.traces",
     "fbjax.metrics", "fbjax.sim.simulator", "fbjax.sim.cluster", "fbjax.sim.protocol",
     "fbjax.routing.policy", "fbjax.routing.dispatch"),
])
def test_pure_side_runs_without_jax(modules):
    probe = f"""
import sys
for name in {modules!r}:
    __import__(name)
leaked = sorted(m for m in sys.modules
                if m.split(".")[0] in ("jax", "jaxlib", "flax")
                or m.startswith(("fbjax.engine", "fbjax.model")))
assert not leaked, "imported by the scheduler side: " + ", ".join(leaked[:5])
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ok"
