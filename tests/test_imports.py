"""Who may import whom: the core runs without Ray or DeepSpeed, a config loads without the registries' heavy
libraries, and braid_ray's modules import only downwards in one declared layer order (so, in no circle)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

CORE = [p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
        for p in sorted((ROOT / "braid_ray").rglob("*.py"))
        if "distributed" not in p.parts and p.name != "__init__.py"]


def test_core_modules_import_neither_ray_nor_deepspeed() -> None:
    assert "braid_ray.config" in CORE and "braid_ray.pipeline" in CORE
    code = ("import importlib, sys\n"
            f"for m in {['braid_ray'] + CORE!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in ('ray', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_loading_a_config_imports_no_heavy_library() -> None:
    """Validating a YAML (sequence and image presets, the sweep files) needs only PyYAML: registry names are
    declared in config.py, so no registry (torch, pandas, pyarrow) and no Ray is imported."""
    presets = sorted(str(p) for p in (ROOT / "configs").glob("*.yaml"))
    sweeps = sorted(str(p) for p in (ROOT / "configs" / "sweeps").glob("*.yaml"))
    code = ("import sys\n"
            "from braid_ray.config import load_config\n"
            "from braid_ray.sweep.spec import load_sweep\n"
            f"for p in {presets!r}: load_config(p)\n"
            f"for p in {sweeps!r}: load_sweep(p)\n"
            "print(sorted(m for m in ('torch', 'pandas', 'pyarrow', 'ray', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert presets and sweeps and out.stdout.strip() == "[]", out.stdout + out.stderr


# Bottom to top; a module may import its own layer and those below. The most specific prefix names a module's
# layer. `farm-studio look` draws these floors, with two files placed apart from their folder: images/stages.py
# (the image pipeline's stages, beside the sequence ones; like them they get their Ray runners from the pipeline)
# and distributed/tune.py (the Ray Tune driver of a sweep, above the sweep's own modules; ``pipeline.sweep`` runs
# the upstream stages and then calls it).
LAYERS: list[tuple[str, ...]] = [
    ("braid_ray", "braid_ray.config", "braid_ray.methods", "braid_ray.rundir", "braid_ray.devices"),
    ("braid_ray.data", "braid_ray.diffusion", "braid_ray.models"),
    ("braid_ray.reward", "braid_ray.eval", "braid_ray.oracles"),
    ("braid_ray.finetune", "braid_ray.baselines"),
    ("braid_ray.images",),  # Stable Diffusion pieces of the core
    ("braid_ray.distributed",),  # Ray / DeepSpeed adapters of the core
    ("braid_ray.stages", "braid_ray.images.stages"),
    ("braid_ray.evaluate",),
    ("braid_ray.sweep",),
    ("braid_ray.distributed.tune",),
    ("braid_ray.pipeline",),
    ("braid_ray.cli",),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """The layer of the longest prefix in LAYERS that names ``module`` or a package above it."""
    best = max(((len(p), i) for i, names in enumerate(LAYERS) for p in names
                if module == p or module.startswith(p + ".")), default=None)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[1]


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (annotations only: never imported at run time)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imports_of(source: str, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The ``modules`` that ``module`` (whose code is ``source``) imports, at module level or inside functions;
    ``from pkg import mod`` counts as importing ``pkg.mod``, and the bare ``braid_ray`` root is not counted."""
    package = module if is_package else module.rpartition(".")[0]
    tree = ast.parse(source)
    skip = _type_checking_only(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in modules and m not in (module, "braid_ray")}


def import_graph() -> dict[str, set[str]]:
    paths = sorted((ROOT / "braid_ray").rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p.read_text(), module_name(p), p.name == "__init__.py", modules)
            for p in paths}


def test_braid_ray_imports_only_downwards_in_the_layer_order() -> None:
    graph = import_graph()
    assert len(graph) > 50 and "braid_ray.data.tasks" in graph["braid_ray.oracles"]
    upward = sorted(f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
                    for m, deps in graph.items() for d in deps if layer(d) > layer(m))
    assert upward == []


def test_braid_ray_has_no_import_circle() -> None:
    """Within a layer imports are free, so circles are looked for apart from the layer order."""
    graph = import_graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        for dep in sorted(graph[module]):
            if circle := visit(dep, path + [module]):
                return circle
        done.add(module)
        return None

    circles = [c for m in sorted(graph) if (c := visit(m, []))]
    assert circles == [], " -> ".join(circles[0])


def test_the_layer_check_has_teeth() -> None:
    """Imports inside functions and relative imports are seen; those under TYPE_CHECKING are not."""
    source = ("from typing import TYPE_CHECKING\n"
              "if TYPE_CHECKING:\n    from braid_ray.pipeline import run\n"
              "def f():\n    from braid_ray import stages\n    from ..data import tasks\n")
    modules = {"braid_ray.pipeline", "braid_ray.stages", "braid_ray.data.tasks", "braid_ray.data"}
    found = imports_of(source, "braid_ray.finetune.example", False, modules)
    assert found == {"braid_ray.stages", "braid_ray.data", "braid_ray.data.tasks"}
    assert layer("braid_ray.stages") > layer("braid_ray.finetune.example") > layer("braid_ray.data.tasks")
    assert layer("braid_ray.images.stages") > layer("braid_ray.distributed.images") > layer("braid_ray.images.zero")
