"""Build of attnfast and its compiled extension attnfast._C.

Environment:
  DEBUG=1                  build with -O0 -g (default -O3)
  ATTNFAST_SANITIZE=1      build the CPU sources with AddressSanitizer + UndefinedBehaviorSanitizer
                           (-O1 -g1; tools/asan_test.sh builds that way into build/asan/ and runs
                           the tests under it; the process needs the sanitizer runtimes preloaded)
  MAX_JOBS=N               parallel compile jobs (read by torch's BuildExtension)
  ATTNFAST_CUDA_ARCH_LIST  CUDA archs for csrc/cuda, "80;90" or "8.0;9.0" (default "80;90")
  NVCC_THREADS=N           nvcc --threads per compile job (default 2)
  ATTNFAST_NO_CUDA=1       skip the CUDA sources even where CUDA is available
  ATTNFAST_SKIP_EXT=1      install the Python package only, without attnfast._C (the Makefile
                           installs that way once, then builds the extension in place with
                           `setup.py build_ext --inplace`, incrementally)
"""
import glob
import os
import shutil
import sys

from setuptools import setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("DEBUG", "0") == "1"
SANITIZE = os.environ.get("ATTNFAST_SANITIZE", "0") == "1"


def rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def cuda_available_for_build():
    import torch

    if os.environ.get("ATTNFAST_NO_CUDA", "0") == "1":
        return False, "ATTNFAST_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch has no CUDA"
    if cpp_extension.CUDA_HOME is None or shutil.which("nvcc") is None and not os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    ):
        return False, "nvcc not found"
    if not rel("csrc/cuda/*.cu"):
        return False, "no CUDA sources"
    return True, "torch CUDA " + torch.version.cuda


opt = ["-O0", "-g"] if DEBUG else ["-O3"]
# -O1 -fno-omit-frame-pointer: usable report stacks at a bearable speed; -g1: file:line in
# them, and binding.cpp (all of torch's headers) compiles in 2/3 of the time of -g.
# -fno-sanitize-recover: undefined behaviour aborts like an ASan report instead of printing
# and carrying on, so the test run fails.  -fno-wrapv: Python's CFLAGS bring -fwrapv, which
# defines signed overflow and so hides an overflowing index computation from UBSan.
san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
       "-fno-sanitize-recover=undefined", "-fno-wrapv", "-g1", "-O1"] if SANITIZE else []
# -fopenmp: at::parallel_for is a header template that, in torch's OpenMP
# builds, expands to `#pragma omp parallel` inside this extension; without the
# flag it silently runs on one thread.  The extension then needs libgomp.so.1,
# which resolves to the copy torch has already loaded (same soname), so there
# is one OpenMP runtime.
omp = [] if sys.platform == "darwin" else ["-fopenmp"]
cxx_flags = opt + omp + ["-Wall", "-Wno-unknown-pragmas"] + san
sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
use_cuda, why = cuda_available_for_build()
ext_kwargs = dict(extra_compile_args={"cxx": cxx_flags}, extra_link_args=omp + san)
if use_cuda:
    archs = [a.replace(".", "") for a in os.environ.get("ATTNFAST_CUDA_ARCH_LIST", "80;90").split(";") if a]
    # Explicit -gencode flags: torch then adds none of its own (TORCH_CUDA_ARCH_LIST is ignored).
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    ext_kwargs["extra_compile_args"]["nvcc"] = opt + gencode + [
        "-lineinfo", "-Xptxas=--warn-on-spills",
        f"--threads={os.environ.get('NVCC_THREADS', '2')}",
    ]
    ext_kwargs["define_macros"] = [("ATTNFAST_WITH_CUDA", "1")]
    cuda_sources = rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
    ext = cpp_extension.CUDAExtension("attnfast._C", sources + cuda_sources, **ext_kwargs)
else:
    ext = cpp_extension.CppExtension("attnfast._C", sources, **ext_kwargs)
print(
    f"attnfast build: DEBUG={int(DEBUG)} SANITIZE={int(SANITIZE)} MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')} "
    f"cuda={'yes' if use_cuda else 'no'} ({why})" + (f" archs={';'.join(archs)}" if use_cuda else "")
)

setup(
    name="attnfast",
    version="0.1.0",
    description="Fused attention kernels for PyTorch (CPU C++, CUDA C++, Triton)",
    packages=["attnfast", "attnfast.triton_kernels", "attnfast.bench", "attnfast.bench.encoders"],
    package_dir={"attnfast": "attnfast", "attnfast.triton_kernels": "triton_kernels", "attnfast.bench": "bench"},
    py_modules=["attnfast_pytest"],  # the pytest plugin: top-level, so loading it imports nothing heavy
    ext_modules=[] if os.environ.get("ATTNFAST_SKIP_EXT", "0") == "1" else [ext],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    extras_require={"triton": ["triton>=3.6"]},
    entry_points={"pytest11": ["attnfast = attnfast_pytest"]},
)
