"""Compile the Triton kernels' tuning configs for sm80 and sm90 without a GPU.

    python -m attnfast.triton_kernels.compile_check [--kinds fwd,rows,dkdv] [--archs 80,86,90]
        [--heads 64,128,256] [--masks none,bool] [--dtype bf16] [--first] [--json FILE]
        [--sass] [--windowed 0|1] [--pointers]
    python -m attnfast.triton_kernels.compile_check --variants [--archs 90] [--first] [--json FILE]

For every entry of attention.TUNING that the autotuner may pick on that GPU
class, Triton compiles the kernel for the target (ptxas ships with triton) and
ptxas reports registers and spills.  A config fails when its shared memory
exceeds the device's per-block limit where it is listed first (the config
taken without autotuning must launch; the autotuner skips later ones that do
not); register spills are reported (they cost speed, which only the autotuner
on a GPU can weigh).
--sass: static counts of SASS opcodes (cuobjdump): wgmma (HGMMA) against mma.sync (HMMA),
MUFU.EX2, FMUL/FFMA/FADD, LDSM, TMA loads; sass_counts() serves for any compiled kernel.
--variants: every kernel that the additive and top-k launchers (additive.py,
topk.py) start for typical GPU shapes, with the very arguments, block sizes
and warps of those launches (captured on CPU tensors instead of launched).
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
from .common import DOT_IEEE, DOT_NATIVE, MASK_BOOL, MASK_FLOAT, MASK_NONE

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
        if name in ("Blocks", "BlocksT", "CuQ", "CuK", "UsedK"):
            ty = "*i32"
        elif name == "Mask":
            ty = {0: f"*{dtype}", 1: "*i1", 2: f"*{dtype}"}[mask_kind]
        elif name in ("Lse", "DLse"):  # the saved lse: float64 for float32 inputs
            ty = "*fp64" if dtype == "fp32" else "*fp32"
        elif name in ("Delta", "DMask"):
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


def _ptxas(compiled, arch):
    """(registers, spill bytes) that ptxas reports for a compiled kernel."""
    from triton.backends.nvidia.compiler import get_ptxas

    gpu_name = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu_name}", f.name, "-o", "/dev/null"],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    return regs, sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))


# SASS opcodes counted by --sass (static counts in the kernel's code): wgmma (HGMMA) against
# the pre-Hopper mma.sync (HMMA), the exp2 unit (MUFU.EX2), the float ops around the scores, the
# shared-memory fragment loads (LDSM), and the TMA loads (UTMALDG).
SASS_OPS = ("HGMMA", "HMMA", "MUFU.EX2", "FMUL", "FFMA", "FADD", "FMNMX", "LDSM", "LDGSTS", "UTMALDG")


def sass_counts(compiled, arch):
    """{opcode: count} of a compiled kernel's SASS (cuobjdump, shipped with triton, beside ptxas)."""
    import os

    from triton.backends.nvidia.compiler import get_ptxas

    tool = os.path.join(os.path.dirname(get_ptxas(arch).path), "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ops = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass, flags=re.M)
    counts = {op: sum(1 for o in ops if o == op or o.startswith(op + ".")) for op in SASS_OPS}
    counts["instructions"] = len(ops)
    return counts


def compile_one(kind, arch, cfg, head, dtype="bf16", mask_kind=0, windowed=True, sass=False, desc=True):
    """Compile one config; returns a dict with shared bytes, registers, spills, seconds (and the
    SASS counts with `sass`).  desc: the loop's row tiles through tensor descriptors where the
    launcher takes them (16-bit inputs on sm90 and later, common.use_descriptors); False: pointer
    loads."""
    fn = KERNELS[kind]
    bm, bn, warps, stages = cfg
    sig, attrs = _signature(fn, _DTYPE[dtype], mask_kind)
    consts = dict(E=head, Ev=head, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=head, BLOCK_DV=head,
                  SUM_M=A.GPU_CELL[0], SUM_N=A.GPU_CELL[1], MASK_KIND=mask_kind, WINDOWED=windowed,
                  DOT=(DOT_IEEE if dtype == "fp32" else DOT_NATIVE).value, DROPOUT=False, VARLEN=False,
                  USED_K=False)
    consts.update(DESC=A.DESC_ROWS if desc and arch >= 90 and dtype != "fp32" else 0)  # as _Launch.descriptors
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
    regs, spills = _ptxas(compiled, arch)
    shared = compiled.metadata.shared
    fits = shared <= SHARED_LIMIT[arch]
    out = dict(kind=kind, arch=arch, config=list(cfg), head=head, dtype=dtype, mask_kind=mask_kind,
               windowed=windowed, desc=bool(consts["DESC"]) and min(bm, bn if kind == "dkdv" else bm) >= A.DESC_ROWS,
               shared=shared, registers=regs, spill_bytes=spills, fits=fits,
               seconds=round(time.time() - t0, 1))
    if sass:
        out["sass"] = sass_counts(compiled, arch)
    return out


_TT = {"float32": "fp32", "float64": "fp64", "bfloat16": "bf16", "float16": "fp16", "int32": "i32",
       "int64": "i64", "bool": "i1"}


def variant_launches(first=False):
    """[(name, kernel, args, kwargs)] of the launches the additive, top-k and split-KV launchers make
    (float32 additive at Da = Ev = 64 and 128; top-k in bfloat16 and float32, E = 64,
    top_k 64 (candidate buffer) and 1000 (threshold search); bool masks, causal).
    first: Da = 64 and bfloat16 only (each kernel once)."""
    import torch

    from . import additive, attention, topk

    calls = []

    def capture(name):
        def wrap(kernel):
            class Grid:
                def __getitem__(self, grid):
                    return lambda *args, **kwargs: calls.append((f"{name} {kernel.fn.__name__}", kernel, args, kwargs))
            return Grid()
        return wrap

    B, H, L = 1, 2, 2048
    mask = (torch.rand(L, L) > 0.5).expand(B, H, L, L)
    for D in (64,) if first else (64, 128):
        qp, kp, v = (torch.randn(B, H, L, D) for _ in range(3))
        va = torch.randn(H, D)
        out, lse = additive.additive_fwd(qp, kp, va, v, mask, True, launch=capture(f"additive D{D}"))
        additive.additive_bwd(out, qp, kp, va, v, mask, True, out, lse, lse, launch=capture(f"additive D{D}"))
    for dtype in (torch.bfloat16,) if first else (torch.bfloat16, torch.float32):
        q, k, v = (torch.randn(B, H, L, 64, dtype=dtype) for _ in range(3))
        for top_k in (64, 1000):
            name = f"topk {str(dtype)[6:]} k{top_k}"
            out, lse, idx = topk.topk_fwd(q, k, v, mask, True, 0.125, top_k, launch=capture(name))
            topk.topk_bwd(out, q, k, v, mask, 0.125, out, lse, idx, lse, launch=capture(name))
    # The split-KV kernel of short queries (one query row, GQA 4/1, causal).
    for dtype in (torch.bfloat16,) if first else (torch.bfloat16, torch.float32):
        for D in (128,) if first else (64, 128):
            q, k, v = torch.randn(1, 4, 1, D, dtype=dtype), torch.randn(1, 1, L, D, dtype=dtype), \
                torch.randn(1, 1, L, D, dtype=dtype)
            lens = torch.full((1,), L, dtype=torch.int32)
            attention.split_fwd(q, k, v, lens, None, 0.125, -1, 0, 8,
                                launch=capture(f"split-kv {str(dtype)[6:]} D{D}"))
            # A paged cache read in place: pools (pages, Hkv, page, D), block table (1, L / page);
            # pages of 16 (key tiles of 16, one page each), 256 (tiles inside pages) and 40 (a gather).
            for page in (16, 256, 40):
                n = L // page
                table = torch.arange(n, dtype=torch.int32).view(1, -1)
                pool = lambda t: t[:, :, :n * page].reshape(1, n, page, D).transpose(0, 1).contiguous()  # noqa: E731
                attention.split_fwd(q, pool(k), pool(v), lens, None, 0.125, -1, 0, 8, block_table=table,
                                    launch=capture(f"split-kv paged{page} {str(dtype)[6:]} D{D}"))
                if page == 256:  # a prefill over the pages: query blocks of SPLIT_BLOCK_M rows
                    attention.split_fwd(torch.randn(1, 4, 128, D, dtype=dtype), pool(k), pool(v), lens, None, 0.125,
                                        -1, 0, 1, block_table=table,
                                        launch=capture(f"split-kv paged{page} prefill {str(dtype)[6:]} D{D}"))
    return calls


def compile_launch(kernel, args, kwargs, arch):
    """Compile one captured launch for `arch`: pointers typed by their tensors (16-byte
    aligned), ints i32 (i64 past 2^31), floats fp32; the kernel's constexpr parameters as given."""
    import torch

    sig, consts, attrs = {}, {}, {}
    values = dict(zip(kernel.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k in kernel.arg_names})
    for i, prm in enumerate(kernel.params):
        val = values[prm.name]
        if prm.is_constexpr:
            sig[prm.name], consts[prm.name] = "constexpr", val
        elif isinstance(val, torch.Tensor):
            sig[prm.name] = "*" + _TT[str(val.dtype)[6:]]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(val, bool):
            sig[prm.name] = "i1"
        elif isinstance(val, int):
            sig[prm.name] = "i32" if -2**31 <= val < 2**31 else "i64"
        else:
            sig[prm.name] = "fp32"
    t0 = time.time()
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": kwargs.get("num_warps", 4),
                                       "num_stages": kwargs.get("num_stages", 3)})
    regs, spills = _ptxas(compiled, arch)
    shared = compiled.metadata.shared
    return dict(arch=arch, shared=shared, registers=regs, spill_bytes=spills, fits=shared <= SHARED_LIMIT[arch],
                seconds=round(time.time() - t0, 1))


def main_variants(archs, json_path, first):
    rows = []
    for name, kernel, args, kwargs in variant_launches(first):
        for arch in archs:
            r = dict(kind=name, **compile_launch(kernel, args, kwargs, arch))
            rows.append(r)
            print(f"{name:<44} sm{arch} smem {r['shared']:>7} regs {r['registers']:>4} spill {r['spill_bytes']:>5} "
                  f"{'fits' if r['fits'] else 'TOO BIG'} ({r['seconds']} s)", flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(triton=triton.__version__, rows=rows), f, indent=1)
    bad = [r for r in rows if not r["fits"]]
    print(f"{len(rows) - len(bad)}/{len(rows)} variant kernels compile and fit shared memory, "
          f"{sum(r['spill_bytes'] == 0 for r in rows)} without spills")
    return 1 if bad else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default="fwd,rows,dkdv")
    p.add_argument("--archs", default="80,86,90")
    p.add_argument("--heads", default="64,128,256")
    p.add_argument("--masks", default="none,bool")
    p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPE))
    p.add_argument("--first", action="store_true", help="only the first config of each table")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--variants", action="store_true", help="the additive and top-k kernels instead")
    p.add_argument("--sass", action="store_true", help="count SASS opcodes too (" + ", ".join(SASS_OPS) + ")")
    p.add_argument("--windowed", default="1", choices=["0", "1"],
                   help="compile the band (causal/window) variant (1, default) or the one without (0)")
    p.add_argument("--pointers", action="store_true",
                   help="pointer loads on sm90 too (as with ATTNFAST_TRITON_TMA=0)")
    a = p.parse_args(argv)
    if a.variants:
        return main_variants([int(x) for x in a.archs.split(",")], a.json, a.first)
    rows = []
    for kind in a.kinds.split(","):
        for arch in map(int, a.archs.split(",")):
            for head in map(int, a.heads.split(",")):
                for mask in a.masks.split(","):
                    mk = {"none": MASK_NONE, "bool": MASK_BOOL, "float": MASK_FLOAT}[mask].value
                    table = A.tuning_table(kind, arch, head, a.dtype == "fp32")
                    for i, cfg in enumerate(table[:1] if a.first else table):
                        r = compile_one(kind, arch, cfg, head, a.dtype, mk, a.windowed == "1", a.sass,
                                        not a.pointers)
                        r["first"] = i == 0
                        r["ok"] = r["fits"] or i > 0
                        rows.append(r)
                        print(f"{kind:<5} sm{arch} D{head:<4} {mask:<5} {str(tuple(cfg)):<18} "
                              f"smem {r['shared']:>7} regs {r['registers']:>4} spill {r['spill_bytes']:>5} "
                              f"{'fits' if r['fits'] else 'too big'}{'' if r['ok'] else ' FAIL'} ({r['seconds']} s)"
                              + ("".join(f" {k} {v}" for k, v in r["sass"].items()) if a.sass else ""), flush=True)
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
