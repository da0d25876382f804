"""The wheel: ``pip wheel`` builds one with the compiled extension, and it works once installed.

The build runs on a copy of the source tree (the working tree's ``_build_info.json`` and
extension stay as they are), with the CUDA kernels switched off so the test stays near half a
minute on two cores. The wheel is installed into a fresh virtual environment that sees this
environment's torch through a ``.pth`` line (a venv made from a venv's python would see the base
interpreter's packages, not this one's), and a smoke step runs from a directory outside the
source tree, so ``import recap_kernels`` can only find the installed wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from recap_kernels import _ext

ROOT = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                 "_build_info.json", ".pytest_cache", "gpu-wheels", "results")

SMOKE = textwrap.dedent("""
    import json, os, sys
    import torch
    import recap_kernels
    from recap_kernels import _ext, optim

    here = os.path.dirname(recap_kernels.__file__)
    assert here.startswith(sys.prefix), f"recap_kernels imported from {here}, not the wheel in {sys.prefix}"
    module, why = _ext.load()
    assert module is not None, why
    ok, reason = recap_kernels.available_backends("cpu")["cpu"]
    assert ok, reason

    p = torch.randn(1000, requires_grad=True)
    ref = p.detach().clone().requires_grad_()
    ours, theirs = optim.AdamW([p], backend="cpu", weight_decay=0.1), torch.optim.AdamW([ref], weight_decay=0.1)
    for step in range(3):
        g = torch.randn(1000)
        p.grad, ref.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(p, ref)
    assert ours.backends_used() == {"cpu"}
    print(json.dumps({"extension": module.__file__, "build": _ext.build_info()}))
""")


def _run(cmd, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.skipif(not _ext.build_info().get("cpu_extension"),
                    reason="this install was built without the C++ extension (RECAP_KERNELS_BUILD_CPU=0)")
def test_wheel_contains_the_extension_and_runs_from_a_fresh_venv(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=IGNORED)
    env = {**os.environ, "RECAP_KERNELS_BUILD_CUDA": "0", "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count()))}
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index", "-w", str(dist),
          str(source)], env=env, cwd=tmp_path)
    (wheel,) = dist.glob("recap_kernels-*.whl")
    assert "abi3" in wheel.name, f"{wheel.name}: the extension is built for Python's limited API"
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("recap_kernels/_C") and n.endswith(".so") for n in names), names
    assert "recap_kernels/_build_info.json" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # torch (and pip) from this environment, after the venv's own site-packages in sys.path.
    Path(purelib, "parent-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--target", purelib, str(wheel)])

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RECAP_KERNELS_SKIP_EXTENSION")}
    smoke = _run([python, "-c", SMOKE], cwd=outside, env=clean_env)
    assert str(venv) in smoke.stdout and '"cpu_extension": true' in smoke.stdout, smoke.stdout
    info = _run([python, "-m", "recap_kernels", "info"], cwd=outside, env=clean_env)
    assert "cpu extension" in info.stdout and str(venv) in info.stdout, info.stdout
    assert torch.__version__ in info.stdout
