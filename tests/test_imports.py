"""The core library must run without Ray or DeepSpeed; only braid_ray.distributed may import them."""

from __future__ import annotations

import subprocess
import sys

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
