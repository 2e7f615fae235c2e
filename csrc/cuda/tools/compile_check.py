"""Compile every CUDA kernel of csrc/cuda without a GPU and check what ptxas and the SASS say.

    python csrc/cuda/tools/compile_check.py [--arch 80 90] [--json PATH]

For each arch, each kernel source (flash_fwd.cu, flash_bwd.cu) is compiled with
nvcc alone (no torch) to a cubin with `-Xptxas=-v`; every kernel must have
0 bytes of spill stores/loads and no stack frame, and every attention kernel
must use tensor cores (HMMA instructions in `cuobjdump -sass`).  The torch
bindings a CUDA build compiles (binding_cuda.cpp, and csrc/cpu/binding.cpp with
ATTNFAST_WITH_CUDA) are compiled with torch's headers (`-c`, no link) so that
API drift shows up without a CUDA build of torch.  Exit status 0 when all
hold; the table goes to stdout, the full record to --json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
CUDA_DIR = HERE.parent
SOURCES = ("flash_fwd.cu", "flash_bwd.cu")
# The bindings as a CUDA build of attnfast._C compiles them: (source, extra flags).
BINDINGS = ((CUDA_DIR / "binding_cuda.cpp", []),
            (CUDA_DIR.parent / "cpu" / "binding.cpp",
             ["-DATTNFAST_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"]))
ATTENTION_KERNELS = ("flash_fwd_kernel", "flash_bwd_kernel")  # must run on tensor cores


def find_nvcc():
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


def cuda_include():
    """The CUDA toolkit's include folder (cuda_runtime.h, cuda_bf16.h), or None."""
    nvcc = find_nvcc()
    cands = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    if nvcc:
        cands.append(str(Path(nvcc).resolve().parent.parent))
    for c in cands:
        if c and (Path(c) / "include" / "cuda_runtime.h").exists():
            return str(Path(c) / "include")
    return None


def find_cuobjdump():
    exe = shutil.which("cuobjdump")
    if exe:
        return exe
    try:  # the triton wheel ships one
        import triton

        cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(cand) if cand.exists() else None
    except ImportError:
        return None


def demangle(names):
    exe = shutil.which("c++filt")
    if not exe or not names:
        return {n: n for n in names}
    out = subprocess.run([exe], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def short_name(pretty):
    """'void attnfast::cuda::flash_fwd_kernel<__half, attnfast::cuda::FwdTraits<64, 64, 8>, true>(...)'
    -> 'flash_fwd_kernel<half, FwdTraits<64, 64, 8>, true>'"""
    s = pretty.split("(")[0].replace("void ", "").replace("attnfast::cuda::", "")
    return s.replace("__nv_bfloat16", "bf16").replace("__half", "half")


PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+a?)'")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_USED = re.compile(r"Used (\d+) registers")


def parse_ptxas(text):
    """{mangled: dict(registers, stack, spill_stores, spill_loads)} from `-Xptxas=-v` output."""
    out, cur = {}, None
    for line in text.splitlines():
        m = PTXAS_ENTRY.search(line)
        if m:
            cur = out.setdefault(m.group(1), {})
            continue
        if cur is None:
            continue
        m = PTXAS_FRAME.search(line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = PTXAS_USED.search(line)
        if m:
            cur["registers"] = int(m.group(1))
    return out


def sass_counts(cuobjdump, cubin):
    """{mangled: {"HMMA": n, "LDSM": n, "instructions": n}} from the SASS."""
    text = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    out, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Function : (\w+)", line)
        if m:
            cur = out.setdefault(m.group(1), {"HMMA": 0, "LDSM": 0, "instructions": 0})
            continue
        if cur is not None and re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+\S", line):
            cur["instructions"] += 1
            if re.search(r"\bHMMA\.", line):
                cur["HMMA"] += 1
            if re.search(r"\bLDSM\.", line):
                cur["LDSM"] += 1
    return out


def compile_kernels(nvcc, cuobjdump, source, arch, workdir):
    cubin = Path(workdir) / f"{Path(source).stem}_sm{arch}.cubin"
    cmd = [nvcc, "-O3", "-std=c++17", "-cubin", f"-arch=sm_{arch}", "-lineinfo", "-Xptxas=-v",
           "-Xptxas=--warn-on-spills", f"-I{CUDA_DIR}", str(CUDA_DIR / source), "-o", str(cubin)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        return dict(source=source, arch=arch, ok=False, error=(r.stderr or r.stdout)[-4000:], seconds=secs)
    info = parse_ptxas(r.stderr + r.stdout)
    sass = sass_counts(cuobjdump, cubin) if cuobjdump else {}
    names = demangle(sorted(info))
    kernels = []
    for mangled, row in sorted(info.items(), key=lambda kv: names[kv[0]]):
        name = short_name(names[mangled])
        row = dict(kernel=name, **row, **sass.get(mangled, {}))
        problems = []
        if row.get("spill_stores", 0) or row.get("spill_loads", 0):
            problems.append("spills")
        if row.get("stack", 0):
            problems.append("stack frame")
        if any(name.startswith(k) for k in ATTENTION_KERNELS):
            if cuobjdump is None:
                problems.append("no cuobjdump: tensor-core use unchecked")
            elif row.get("HMMA", 0) == 0:
                problems.append("no HMMA in SASS")
        row["problems"] = problems
        kernels.append(row)
    warnings = [ln for ln in (r.stderr + r.stdout).splitlines() if "warning" in ln.lower()]
    return dict(source=source, arch=arch, ok=not any(k["problems"] for k in kernels) and bool(kernels),
                kernels=kernels, warnings=warnings, seconds=round(secs, 1))


def compile_binding(workdir):
    """The torch bindings against torch's headers: -c, no link."""
    try:
        from torch.utils import cpp_extension
    except ImportError:
        return dict(ok=False, error="torch is not importable")
    cxx = shutil.which("c++") or shutil.which("g++")
    inc = cuda_include()
    if inc is None:
        return dict(ok=False, error="CUDA headers (cuda_runtime.h) not found: set CUDA_HOME")
    incs = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{inc}", f"-I{CUDA_DIR}",
                                                                 f"-I{sysconfig.get_paths()['include']}"]
    # A CPU build of torch ships c10/cuda's headers but not the one its CMake
    # generates; its whole content is this macro, so a stand-in lets the
    # binding compile against the headers (a CUDA build of torch has the real one).
    stub = None
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in cpp_extension.include_paths()):
        stub = Path(workdir) / "stub_include"
        (stub / "c10/cuda/impl").mkdir(parents=True, exist_ok=True)
        (stub / "c10/cuda/impl/cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        incs.append(f"-I{stub}")
    files, t0 = [], time.perf_counter()
    for src, flags in BINDINGS:
        obj = Path(workdir) / f"{src.stem}.o"
        cmd = [cxx, "-std=c++20", "-O0", "-fPIC", "-Wall", "-Wno-unknown-pragmas", *flags, "-c", str(src),
               "-o", str(obj)] + incs
        r = subprocess.run(cmd, capture_output=True, text=True)
        files.append(dict(source=src.name, flags=flags, ok=r.returncode == 0,
                          error=None if r.returncode == 0 else (r.stderr or r.stdout)[-4000:],
                          warnings=[ln for ln in r.stderr.splitlines() if "warning" in ln.lower()]))
    return dict(ok=all(f["ok"] for f in files), seconds=round(time.perf_counter() - t0, 1),
                stubbed_cmake_macros=stub is not None, files=files,
                error="\n".join(f["error"] for f in files if f["error"]) or None,
                warnings=[w for f in files for w in f["warnings"]])


def table(results):
    head = f"{'arch':<6} {'kernel':<62} {'regs':>4} {'stack':>5} {'spill':>5} {'HMMA':>5} {'LDSM':>5}  status"
    lines = [head, "-" * len(head)]
    for res in results:
        if not res.get("kernels"):
            lines.append(f"sm_{res['arch']:<3} {res['source']}: FAILED\n{res.get('error', '')}")
            continue
        for k in res["kernels"]:
            spill = k.get("spill_stores", 0) + k.get("spill_loads", 0)
            status = "ok" if not k["problems"] else ", ".join(k["problems"])
            lines.append(f"sm_{res['arch']:<3} {k['kernel'][:62]:<62} {k.get('registers', '?'):>4} "
                         f"{k.get('stack', 0):>5} {spill:>5} {k.get('HMMA', '-'):>5} {k.get('LDSM', '-'):>5}  {status}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["80", "90"], help="SM versions (default: 80 90)")
    ap.add_argument("--json", type=Path, default=None, help="write the full record here")
    ap.add_argument("--no-binding", action="store_true", help="skip the torch binding compile")
    a = ap.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("compile_check: nvcc not found (PATH or CUDA_HOME)", file=sys.stderr)
        return 2
    cuobjdump = find_cuobjdump()
    with tempfile.TemporaryDirectory() as work:
        jobs = [(src, arch) for arch in a.arch for src in SOURCES]
        with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
            futs = [pool.submit(compile_kernels, nvcc, cuobjdump, src, arch, work) for src, arch in jobs]
            binding = None if a.no_binding else pool.submit(compile_binding, work)
            results = [f.result() for f in futs]
            binding = None if binding is None else binding.result()
    print(table(results))
    ok = all(r["ok"] for r in results)
    if binding is not None:
        print()
        for f in binding.get("files", []):
            print(f"binding {' '.join([f['source'], *f['flags'][:1]])} with torch headers (-c): "
                  f"{'ok' if f['ok'] else 'FAILED'}")
        print(f"({binding['seconds']} s)" if binding["ok"] else binding["error"])
        ok &= binding["ok"]
    nvcc_version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    record = dict(ok=ok, nvcc=nvcc_version, cuobjdump=bool(cuobjdump), results=results, binding=binding)
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(record, indent=1) + "\n")
    n = sum(len(r.get("kernels", [])) for r in results)
    print(f"\n{n} kernels compiled for sm_{', sm_'.join(a.arch)}: {'all clean' if ok else 'PROBLEMS'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
