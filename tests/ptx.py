"""Triton kernels compiled for sm_90 without a GPU, for the tests that read what the GPU would run.

The tests' own process runs Triton under its interpreter, so the compilation runs in a child process
without ``TRITON_INTERPRET``: :func:`run` runs a script there, from the repository root (it imports this
checkout's kernels), and returns the JSON the script prints last; the script counts instructions with
:func:`op_counts`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def op_counts(kernel, signature: dict, constexprs: dict, ops: tuple[str, ...], num_warps: int) -> dict[str, int]:
    """How many PTX instructions of each of ``ops`` (by prefix) ``kernel`` compiles to for sm_90, with
    ``enable_fp_fusion=False`` as the kernels are launched."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=kernel, signature={**signature, **{k: "constexpr" for k in constexprs}},
                                    constexprs=constexprs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": num_warps, "enable_fp_fusion": False}).asm["ptx"]
    instructions = [line.split()[0] for line in ptx.splitlines() if line.strip() and not line.strip().startswith("//")]
    return {op: sum(i.startswith(op) for i in instructions) for op in ops}


def run(script: str) -> dict:
    """``script``'s last line of output, as JSON, from a child process without the Triton interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])
