"""Compile the Triton kernels' tuning configs for sm80 and sm90 without a GPU.

    python -m attnfast.triton_kernels.compile_check [--kinds fwd,rows,dkdv] [--archs 80,86,90]
        [--heads 64,128,256] [--masks none,bool] [--dtype bf16] [--first] [--json FILE]

For every entry of attention.TUNING that the autotuner may pick on that GPU
class, Triton compiles the kernel for the target (ptxas ships with triton) and
ptxas reports registers and spills.  A config fails when its shared memory
exceeds the device's per-block limit where it is listed first (the config
taken without autotuning must launch; the autotuner skips later ones that do
not); register spills are reported (they cost speed, which only the autotuner
on a GPU can weigh).
Needs triton's CUDA backend (any triton wheel for Linux x86-64 has it).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget

from . import attention as A

SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024}  # opt-in shared memory per block
KERNELS = {"fwd": A._fwd_kernel, "rows": A._bwd_rows_kernel, "dkdv": A._bwd_dkdv_kernel}
_DTYPE = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
_UNIT_STRIDES = {"sqd", "skd", "svd", "smn", "sod", "sdd"}


def _signature(fn, dtype, mask_kind):
    """Triton types of the kernel's arguments as a launch with contiguous
    last dimensions would see them: pointers and row strides divisible by 16,
    unit strides (Triton makes an int argument equal to 1 a constant) left to
    the caller."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in ("Blocks", "BlocksT"):
            ty = "*i32"
        elif name == "Mask":
            ty = {0: f"*{dtype}", 1: "*i1", 2: f"*{dtype}"}[mask_kind]
        elif name in ("Lse", "DLse", "Delta", "DMask"):
            ty = "*fp32"
        elif name in ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"):
            ty = f"*{dtype}"
        elif name in ("scale", "p_drop"):
            ty = "fp32"
        else:
            ty = "i32"
        sig[name] = ty
        if ty.startswith("*") or (name.startswith("s") and name not in _UNIT_STRIDES and ty == "i32"
                                  and name not in ("scale", "seed_lo", "seed_hi")):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_one(kind, arch, cfg, head, dtype="bf16", mask_kind=0, windowed=True):
    """Compile one config; returns a dict with shared bytes, registers, spills, seconds."""
    from triton.backends.nvidia.compiler import get_ptxas

    fn = KERNELS[kind]
    bm, bn, warps, stages = cfg
    sig, attrs = _signature(fn, _DTYPE[dtype], mask_kind)
    consts = dict(E=head, Ev=head, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=head, BLOCK_DV=head,
                  SUM_M=A.GPU_CELL[0], SUM_N=A.GPU_CELL[1], MASK_KIND=mask_kind, WINDOWED=windowed,
                  DOT=A.DOT_IEEE if dtype == "fp32" else A.DOT_NATIVE, DROPOUT=False)
    if kind == "rows":
        consts.update(HAS_DLSE=False, DELTA_PASS=False)
    if kind == "dkdv":
        consts.update(MASK_GRAD=False)
    consts.update({name: 1 for name in _UNIT_STRIDES if name in sig})
    for name in consts:
        sig[name] = "constexpr"
    t0 = time.time()
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
    gpu_name = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu_name}", f.name, "-o", "/dev/null"],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    shared = compiled.metadata.shared
    fits = shared <= SHARED_LIMIT[arch]
    return dict(kind=kind, arch=arch, config=list(cfg), head=head, dtype=dtype, mask_kind=mask_kind,
                shared=shared, registers=regs, spill_bytes=spills, fits=fits, seconds=round(time.time() - t0, 1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default="fwd,rows,dkdv")
    p.add_argument("--archs", default="80,86,90")
    p.add_argument("--heads", default="64,128,256")
    p.add_argument("--masks", default="none,bool")
    p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPE))
    p.add_argument("--first", action="store_true", help="only the first config of each table")
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args(argv)
    rows = []
    for kind in a.kinds.split(","):
        for arch in map(int, a.archs.split(",")):
            for head in map(int, a.heads.split(",")):
                for mask in a.masks.split(","):
                    mk = {"none": A.MASK_NONE, "bool": A.MASK_BOOL, "float": A.MASK_FLOAT}[mask]
                    table = A.TUNING[kind][A.gpu_class(arch)][head]
                    for i, cfg in enumerate(table[:1] if a.first else table):
                        r = compile_one(kind, arch, cfg, head, a.dtype, mk)
                        r["first"] = i == 0
                        r["ok"] = r["fits"] or i > 0
                        rows.append(r)
                        print(f"{kind:<5} sm{arch} D{head:<4} {mask:<5} {str(tuple(cfg)):<18} "
                              f"smem {r['shared']:>7} regs {r['registers']:>4} spill {r['spill_bytes']:>5} "
                              f"{'fits' if r['fits'] else 'too big'}{'' if r['ok'] else ' FAIL'} ({r['seconds']} s)", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(triton=triton.__version__, rows=rows), f, indent=1)
    bad = [r for r in rows if not r["ok"]]
    fit = sum(r["fits"] for r in rows)
    spill_free = sum(r["spill_bytes"] == 0 for r in rows)
    print(f"{fit}/{len(rows)} configs fit shared memory, {spill_free} without spills; "
          f"{len(bad)} first configs do not fit")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
