"""Triton kernels of attnfast (imported as attnfast.triton_kernels): the kernels, their
launchers and their torch ops, one module per attention family.

    common.py         shared by all: interpreter check, mask kinds and mask scoring, dot, launcher
    attention.py      softmax attention (FlashAttention-2): attnfast::triton_fwd / triton_bwd
    additive.py       additive (Bahdanau) attention: attnfast::triton_additive_fwd / _bwd
    topk.py           hard top-k attention: attnfast::triton_topk_fwd / _bwd
    compile_check.py  compiles the kernels for GPU targets without a GPU

Importing a family's module imports triton and registers its ops; attnfast imports
them only when the "triton" backend runs (attnfast/dispatch.py).
"""
