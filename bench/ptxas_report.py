"""ptxas's resource report for the CUDA kernels: registers, stack and spills per kernel and arch.

    python bench/ptxas_report.py            # rebuilds in place with RECAP_KERNELS_PTXAS_REPORT=1
    python bench/ptxas_report.py BUILD.LOG  # reads the output of such a build

Prints one row per (kernel, arch) and exits 1 when any of our kernels uses local memory: a register
spill, or a stack frame (an array indexed at run time, such as a vector loop that was not unrolled).
CUDA's own library routines, such as the float-division slow path, are listed apart: their code is
not ours. The build needs no GPU: it runs wherever the extension compiles (CI, a laptop
with the CUDA toolkit). bench/README.md keeps a copy of the table.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENTRY = re.compile(r"ptxas info\s+: Compiling entry function '(\S+)' for '(sm_\d+)'")
_FUNCTION = re.compile(r"ptxas info\s+: Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s+: Used (\d+) registers")
_SPILL_WARNING = re.compile(r"ptxas (?:warning|error)\s*: Registers are spilled to local memory in function '(\S+)'")


@dataclass
class Kernel:
    name: str
    arch: str
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0


def demangled(symbol: str) -> str:
    """A short readable name: ``adam_kernel<BFloat16Storage, amsgrad, decoupled>`` from the mangled one."""
    try:
        full = subprocess.run(["c++filt", symbol], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return symbol
    full = re.sub(r"\(anonymous namespace\)::|recap_kernels::(cuda::)?", "", full)
    return re.sub(r"\(.*\)$", "", full)


def parse(log: str) -> tuple[list[Kernel], list[str]]:
    """Our kernels (entry functions) and the other functions ptxas reported spilling."""
    kernels: list[Kernel] = []
    current: Kernel | None = None
    foreign_spills = []
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = Kernel(m.group(1), m.group(2))
            kernels.append(current)
        elif (m := _FRAME.search(line)) and current is not None:
            current.stack, current.spill_stores, current.spill_loads = (int(x) for x in m.groups())
        elif (m := _USED.search(line)) and current is not None:
            current.registers = int(m.group(1))
        elif m := _SPILL_WARNING.search(line):
            if not any(k.name == m.group(1) for k in kernels):
                foreign_spills.append(m.group(1))
    return kernels, sorted(set(foreign_spills))


def build_log() -> str:
    env = {**os.environ, "RECAP_KERNELS_PTXAS_REPORT": "1", "RECAP_KERNELS_BUILD_CUDA": "1"}
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-v", "-e", ROOT]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the build failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout + done.stderr


def main(argv: list[str]) -> int:
    log = open(argv[0]).read() if argv else build_log()
    kernels, foreign = parse(log)
    if not kernels:
        print("no ptxas report in the log (was it built with RECAP_KERNELS_PTXAS_REPORT=1 and CUDA?)")
        return 1
    print(f"{'kernel':<58} {'arch':<6} {'regs':>4} {'stack':>5} {'spill st/ld':>11}")
    spilled = []
    for k in sorted(kernels, key=lambda k: (demangled(k.name), k.arch)):
        print(f"{demangled(k.name):<58} {k.arch:<6} {k.registers:>4} {k.stack:>5} "
              f"{k.spill_stores:>5}/{k.spill_loads:<5}")
        if k.spill_stores or k.spill_loads or k.stack:
            spilled.append(k)
    for name in foreign:
        print(f"not ours, spills: {demangled(name)} (CUDA's own routine)")
    if spilled:
        print(f"FAIL: {len(spilled)} of our kernel builds use local memory (spills or a stack frame)")
        return 1
    print(f"OK: {len(kernels)} kernel builds, no spills and no stack frame in our kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
