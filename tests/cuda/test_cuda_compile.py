"""The CUDA C++ kernels compile without a GPU: nvcc for sm_80 and sm_90, no spills,
tensor-core instructions in the SASS, and the torch bindings against torch's headers.

Also the parsers of that check (on canned compiler output), the head-dim list the
extension exports, and the dispatch rule that decides which calls the CUDA kernels serve.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "csrc" / "cuda" / "tools" / "compile_check.py"


def _tool():
    spec = importlib.util.spec_from_file_location("compile_check", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cc = _tool()
HEADER = (ROOT / "csrc" / "cuda" / "flash.h").read_text()


def _header_head_dims(name):
    """The head dims of `using <name> = HeadDims<...>;` in flash.h, the one list of them."""
    body = HEADER.split(f"using {name} = HeadDims<")[1].split(">")[0]
    return tuple(int(x) for x in body.split(","))


def _expected_kernels():
    """Kernel instances flash_fwd.cu / flash_bwd.cu must hold, per arch."""
    fwd = {(dt, d, m) for dt in ("half", "bf16") for d in (64, 96, 128, 256) for m in ("true", "false")}
    bwd = {(dt, d, m) for dt in ("half", "bf16") for d in (64, 96, 128) for m in ("true", "false")}
    return fwd, bwd


@pytest.mark.skipif(cc.find_nvcc() is None, reason="nvcc not installed")
def test_every_kernel_compiles_clean_for_sm80_and_sm90(tmp_path):
    out = tmp_path / "cuda_compile.json"
    r = subprocess.run([sys.executable, str(TOOL), "--arch", "80", "90", "--json", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["ok"] and rec["cuobjdump"], rec
    assert rec["binding"]["ok"], rec["binding"]
    assert [f["source"] for f in rec["binding"]["files"]] == ["binding_cuda.cpp", "binding.cpp"], rec["binding"]
    fwd, bwd = _expected_kernels()
    for arch in ("80", "90"):
        kernels = [k for res in rec["results"] if res["arch"] == arch for k in res["kernels"]]
        names = [k["kernel"] for k in kernels]
        got_fwd = {(n.split("<")[1].split(",")[0], int(n.split("FwdTraits<")[1].split(",")[0]), n.split(", ")[-1][:-1])
                   for n in names if n.startswith("flash_fwd_kernel")}
        got_bwd = {(n.split("<")[1].split(",")[0], int(n.split("BwdTraits<")[1].split(",")[0]), n.split(", ")[-1][:-1])
                   for n in names if n.startswith("flash_bwd_kernel")}
        assert got_fwd == fwd, names
        assert got_bwd == bwd, names
        for k in kernels:
            assert k["spill_stores"] == 0 and k["spill_loads"] == 0 and k["stack"] == 0, k
            assert k["registers"] <= 255, k
            if k["kernel"].startswith(("flash_fwd_kernel", "flash_bwd_kernel")):
                assert k["HMMA"] > 0 and k["LDSM"] > 0, k


PTXAS_SAMPLE = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 592 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_80'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers, 352 bytes cmem[0]
"""

SASS_SAMPLE = """\
\tcode for sm_80
\t\tFunction : _Z3fooPf
\t.headerflags\t@"EF_CUDA_SM80 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM80)"
        /*0000*/                   MOV R1, c[0x0][0x28] ;                      /* 0x00000a0000017a02 */
        /*0010*/                   LDSM.16.M88.4 R4, [R2] ;                    /* 0x000000000204783b */
        /*0020*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;        /* 0x000000060408723c */
        /*0030*/                   EXIT ;                                      /* 0x000000000000794d */
\t\tFunction : _Z3barv
        /*0000*/                   MOV R1, c[0x0][0x28] ;                      /* 0x00000a0000017a02 */
        /*0010*/                   EXIT ;                                      /* 0x000000000000794d */
"""


def test_ptxas_report_parser_reads_spills_and_registers():
    info = cc.parse_ptxas(PTXAS_SAMPLE)
    assert info["_Z3fooPf"] == dict(stack=16, spill_stores=8, spill_loads=12, registers=255)
    assert info["_Z3barv"] == dict(stack=0, spill_stores=0, spill_loads=0, registers=10)


def test_sass_counter_finds_tensor_core_instructions(tmp_path, monkeypatch):
    class Done:
        stdout = SASS_SAMPLE

    monkeypatch.setattr(cc.subprocess, "run", lambda *a, **k: Done())
    counts = cc.sass_counts("cuobjdump", tmp_path / "x.cubin")
    assert counts["_Z3fooPf"] == {"HMMA": 1, "LDSM": 1, "instructions": 4}
    assert counts["_Z3barv"] == {"HMMA": 0, "LDSM": 0, "instructions": 2}


def test_short_names():
    pretty = ("void attnfast::cuda::flash_fwd_kernel<__nv_bfloat16, attnfast::cuda::FwdTraits<64, 64, 8>, true>"
              "(attnfast::cuda::FwdParams)")
    assert cc.short_name(pretty) == "flash_fwd_kernel<bf16, FwdTraits<64, 64, 8>, true>"


# ---------------------------------------------------------------------------
# The head dims with kernels: one list in flash.h, exported by the extension.
# ---------------------------------------------------------------------------
def test_header_head_dims_are_the_compiled_kernels():
    fwd, bwd = _expected_kernels()
    assert _header_head_dims("FwdHeadDims") == tuple(sorted({d for _, d, _ in fwd}))
    assert _header_head_dims("BwdHeadDims") == tuple(sorted({d for _, d, _ in bwd}))


def test_extension_exports_the_cuda_head_dims():
    from attnfast import ops

    if ops._C is None:
        pytest.skip("attnfast._C is not built")
    got = ops._C.cuda_head_dims()
    assert type(got) is tuple and len(got) == 2 and all(type(d) is tuple for d in got), got
    assert all(type(x) is int for d in got for x in d), got
    lists = (_header_head_dims("FwdHeadDims"), _header_head_dims("BwdHeadDims"))
    with_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("attnfast::fwd", "CUDA")
    assert got == (lists if with_cuda else ((), ())), (got, with_cuda)


# ---------------------------------------------------------------------------
# Which calls the CUDA C++ kernels serve (dispatch.py), checked on CPU tensors:
# the rule looks only at dtypes, head dims, gradients and dropout.  The backend
# reads its head dims from the extension; here it is given flash.h's lists (what
# a CUDA build exports), whatever this build holds.
# ---------------------------------------------------------------------------
def _cuda_backend():
    from attnfast import dispatch

    return dispatch.CudaBackend(head_dims=(_header_head_dims("FwdHeadDims"), _header_head_dims("BwdHeadDims")))


def _plan(E=64, Ev=None, dtype=torch.bfloat16, grad=False, dropout_p=0.0):
    from attnfast._validate import prepare

    q = torch.randn(1, 2, 8, E, dtype=dtype, requires_grad=grad)
    k = torch.randn(1, 2, 8, E, dtype=dtype)
    v = torch.randn(1, 2, 8, Ev or E, dtype=dtype)
    return prepare(q, k, v, None, dropout_p, False, None, False)


def test_dispatch_head_dims_match_the_kernels():
    from attnfast import dispatch
    from attnfast.facts import FACTS

    fwd = _header_head_dims("FwdHeadDims")
    bwd = _header_head_dims("BwdHeadDims")
    assert dispatch.CudaBackend().head_dims == FACTS.cuda_head_dims
    assert FACTS.cuda_head_dims == ((fwd, bwd) if FACTS.cuda_kernels else ((), ()))


@pytest.mark.parametrize("kw, why", [
    (dict(), None),
    (dict(E=128, grad=True), None),
    (dict(E=256), None),
    (dict(E=256, grad=True), "forward and backward kernels for head dims (64, 96, 128), got 256"),
    (dict(E=80), "head dims (64, 96, 128, 256), got 80"),
    (dict(E=64, Ev=128), "equal query and value head dims"),
    (dict(dtype=torch.float32), "float16 and bfloat16"),
    (dict(dropout_p=0.1), "dropout is served by the Triton backend"),
])
def test_dispatch_cuda_refusals(kw, why):
    got = _cuda_backend().kernel_refuses(_plan(**kw))
    if why is None:
        assert got is None
    else:
        assert got is not None and why in got, got


@pytest.mark.parametrize("kw, why", [
    (dict(), None),
    (dict(E=128, grad=True), None),
    (dict(E=256, grad=True), "forward and backward kernels for head dims (64, 96, 128), got 256"),
    (dict(dtype=torch.float32), "float16 and bfloat16"),
    (dict(dropout_p=0.1), "dropout is served by the Triton backend"),
])
def test_dispatch_cuda_serves_packed_batches(kw, why):
    from attnfast.varlen import prepare_varlen

    E, dtype, grad = kw.get("E", 64), kw.get("dtype", torch.bfloat16), kw.get("grad", False)
    q = torch.randn(12, 2, E, dtype=dtype, requires_grad=grad)
    k, v = torch.randn(12, 1, E, dtype=dtype), torch.randn(12, 1, E, dtype=dtype)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    plan = prepare_varlen(q, k, v, cu, cu, 7, 7, None, True, "top_left", None, None, kw.get("dropout_p", 0.0))
    got = _cuda_backend().kernel_refuses(plan)
    if why is None:
        assert got is None
    else:
        assert got is not None and why in got, got


def test_no_grad_allows_forward_only_head_dims():
    plan = _plan(E=256, grad=True)
    with torch.no_grad():
        assert _cuda_backend().kernel_refuses(plan) is None
