"""Build recap_kernels: the Python package plus, when their sources exist, the C++ extensions.

Build knobs (environment variables, all printed when the build starts):

  RECAP_KERNELS_BUILD_CPU   1 (default) | 0     build the CPU C++ extension recap_kernels._C
  RECAP_KERNELS_BUILD_CUDA  auto (default) | 1 | 0
                            auto: build the CUDA kernels when torch is a CUDA build and nvcc is found
                            1: fail with instructions when they cannot be built; 0: skip
  TORCH_CUDA_ARCH_LIST      default "8.0;9.0+PTX": machine code for sm_80 and sm_90, PTX for newer GPUs
  RECAP_KERNELS_DEBUG       1: -O0 -g (-lineinfo for CUDA)
  RECAP_KERNELS_VEC_REPORT  1: print g++'s vectorization report (-fopt-info-vec-optimized) for the CPU kernels
  RECAP_KERNELS_PTXAS_REPORT 1: print ptxas's resource report (-Xptxas -v: registers, spills) for the CUDA kernels
  MAX_JOBS                  parallel compile jobs (ninja); defaults to the number of cores

The CPU kernels are compiled for baseline x86-64 and carry AVX2 and AVX-512 clones of their loops
that the loader picks from at run time (csrc/cpu/multi_tensor.h), so a wheel built here runs on
any x86-64 CPU; no -march=native. They are compiled with -ffp-contract=off (nvcc: -fmad=false): the
update math must round exactly as torch's fused kernels do (csrc/include/recap_kernels/adam_math.h).

The CUDA kernels follow the operation order of the fused CUDA Adam of the torch they are built
against, and that of its fused CUDA Adagrad where it has one (torch >= 2.12; the CPU kernel's order
otherwise): recap_kernels/_torch_numerics.py reads both from torch's installed headers, and the build
records them in _build_info.json (cuda_adam_order, cuda_adagrad_order). Compiler warnings
are errors for our sources; ptxas warns of register spills, and bench/ptxas_report.py (which reads
the RECAP_KERNELS_PTXAS_REPORT=1 output) fails on any spill in our kernels. Not every ptxas warning
is an error: CUDA's own float-division slow path spills 4 bytes on sm_90, outside our control.

Build with the torch that will run the kernels: ``pip install --no-build-isolation -e .``.
The build writes ``recap_kernels/_build_info.json`` so ``python -m recap_kernels info`` reports what
this build contains, not what the running machine could build.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
BUILD_INFO = os.path.join(ROOT, "recap_kernels", "_build_info.json")
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
LIMITED_API = "cp310"  # the oldest Python of pyproject.toml's requires-python
LIMITED_API_HEX = "0x030A0000"


def _project_version() -> str:
    """The version, from pyproject.toml (its one place); recorded in _build_info.json."""
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        match = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.MULTILINE)
    return match.group(1) if match else "0+unknown"


def _knob(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).strip().lower()
    if value not in allowed:
        sys.exit(f"setup.py: {name}={value!r} is not one of {allowed}")
    return value


def _find_cuda_home() -> str | None:
    """The CUDA toolkit root: CUDA_HOME/CUDA_PATH, else the standard install location.

    The ``nvcc`` on PATH may be a wrapper script (it is on our CI machines), from which torch's own
    guess of CUDA_HOME (dirname of dirname of nvcc) is wrong, so the standard location comes first.
    """
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        home = os.path.dirname(os.path.dirname(real))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def _torch_numerics():
    """recap_kernels/_torch_numerics.py, loaded by path: the package itself is not importable before it
    is built. It says which operation orders torch's fused CUDA kernels use."""
    spec = importlib.util.spec_from_file_location("_torch_numerics", os.path.join(ROOT, "recap_kernels",
                                                                                  "_torch_numerics.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sources(*patterns: str) -> list[str]:
    found: list[str] = []
    for pattern in patterns:
        found.extend(sorted(glob.glob(os.path.join(CSRC, pattern))))
    return [os.path.relpath(f, ROOT) for f in found]


def _extensions_and_info():
    build_cpu = _knob("RECAP_KERNELS_BUILD_CPU", "1", ("0", "1")) == "1"
    build_cuda = _knob("RECAP_KERNELS_BUILD_CUDA", "auto", ("auto", "0", "1"))
    debug = _knob("RECAP_KERNELS_DEBUG", "0", ("0", "1")) == "1"
    vec_report = _knob("RECAP_KERNELS_VEC_REPORT", "0", ("0", "1")) == "1"
    ptxas_report = _knob("RECAP_KERNELS_PTXAS_REPORT", "0", ("0", "1")) == "1"

    import torch

    info = {
        "version": _project_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_extension": False,
        "cuda_extension": False,
        "cuda_archs": [],
        "notes": [],
    }
    cpu_sources = _sources("ops.cpp", "common/*.cpp", "cpu/*.cpp")
    cuda_sources = _sources("cuda/*.cu")
    if not build_cpu:
        info["notes"].append("C++ extension skipped (RECAP_KERNELS_BUILD_CPU=0)")
        return [], {}, info
    if not cpu_sources:
        info["notes"].append("no C++ sources in csrc/: pure-Python build")
        return [], {}, info

    from torch.utils import cpp_extension

    cuda_home = _find_cuda_home()
    want_cuda = bool(cuda_sources) and build_cuda != "0"
    if want_cuda and (torch.version.cuda is None or cuda_home is None):
        why = "torch is a CPU-only build" if torch.version.cuda is None else "nvcc not found"
        if build_cuda == "1":
            sys.exit(f"setup.py: RECAP_KERNELS_BUILD_CUDA=1 but {why}; install the CUDA toolkit matching "
                     f"torch.version.cuda={torch.version.cuda} and set CUDA_HOME to its root")
        info["notes"].append(f"CUDA kernels skipped: {why}")
        want_cuda = False

    cxx = ["-O0", "-g"] if debug else ["-O3", "-g0"]  # -g0: no debug info in the wheel (Python adds -g)
    cxx += ["-std=c++20", "-Wall", "-Wextra", "-Werror"]
    # No FMA contraction the source does not spell out; no errno from sqrt and no FP traps assumed
    # (each would keep g++ from vectorizing some loops: sqrt calls, if-converting selects); none of
    # the three changes a result. -fopenmp: at::parallel_for is inline and
    # runs on torch's OpenMP threads only when compiled with OpenMP (else on one thread); the
    # libgomp.so.1 it links is the one torch has already loaded.
    cxx += ["-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
    if vec_report:
        cxx += ["-fopt-info-vec-optimized"]
    extra = {"cxx": cxx}
    info["cxx_flags"] = cxx
    info["cpu_kernels"] = "x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA) and baseline clones, picked at load time"
    info["max_jobs"] = os.environ.get("MAX_JOBS", "all cores")
    sources = list(cpu_sources)
    ext_cls = cpp_extension.CppExtension
    if want_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        info["cuda_archs"] = os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";")
        numerics = _torch_numerics()
        opmath = numerics.torch_cuda_adam_opmath()
        info["cuda_adam_order"] = "opmath" if opmath else "double"
        fused_adagrad = numerics.torch_cuda_fused_adagrad()
        info["cuda_adagrad_order"] = "torch-cuda" if fused_adagrad else "cpu"
        nvcc = ["-O0", "-g", "-lineinfo"] if debug else ["-O3"]
        nvcc += [
            "-std=c++20",
            "--fmad=false",  # no FMA the source does not spell out (Note [Operation order], adam_math.h)
            f"-DRECAP_KERNELS_TORCH_CUDA_ADAM_OPMATH={int(opmath)}",
            # Note [CUDA Adagrad order] in adagrad_math.h: torch's fused CUDA Adagrad's order, or the CPU one
            f"-DRECAP_KERNELS_TORCH_CUDA_FUSED_ADAGRAD={int(fused_adagrad)}",
            "--Werror", "all-warnings",
            # -Wno-unused-parameter: torch's c10/cuda allocator headers have some (nvcc's host pass
            # does not treat them as system headers).
            "-Xcompiler", "-Wall,-Wextra,-Wno-unused-parameter,-Werror",
            "-Xptxas", "--warn-on-spills",  # bench/ptxas_report.py fails on a spill in our kernels
        ]
        if ptxas_report:
            nvcc += ["-Xptxas", "-v"]
        extra["nvcc"] = nvcc
        info["nvcc_flags"] = nvcc
        sources += cuda_sources
        ext_cls = cpp_extension.CUDAExtension
        info["cuda_extension"] = True
    info["cpu_extension"] = True
    ext = ext_cls(
        name="recap_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(CSRC, "include")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        # The sources include only torch/library.h and ATen headers, and Python.h for the entry
        # point, so the module is built against Python's limited API: one wheel per torch, not per Python.
        define_macros=[("Py_LIMITED_API", LIMITED_API_HEX)],
        py_limited_api=True,
    )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass, info


ext_modules, cmdclass, build_info = _extensions_and_info()
print("recap_kernels build: " + json.dumps(build_info), flush=True)
with open(BUILD_INFO, "w") as f:
    json.dump(build_info, f, indent=2)

options = {"bdist_wheel": {"py_limited_api": LIMITED_API}} if ext_modules else {}
setup(ext_modules=ext_modules, cmdclass=cmdclass, options=options)
