"""The encoders of matched size, which SDPA each attention encoder runs (and a check
that it really does), the long-range recall model, and the kernels torch runs for
each recurrent layer."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTION = ("attention-attnfast", "attention-torch")
RECURRENT = ("rnn", "lstm", "gru")
ENCODERS = ATTENTION + RECURRENT
VARIANTS = ("matched-hidden", "matched-params")
MODES = ("fwd", "fwdbwd")
GATES = {"rnn": 1, "lstm": 4, "gru": 3}            # weight blocks per recurrent layer
RNN_CLASS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


# ---------------------------------------------------------------------------
# Encoders of matched size
# ---------------------------------------------------------------------------
def attention_layer(d_model, nhead, ff):
    return nn.TransformerEncoderLayer(d_model, nhead, ff, dropout=0.0, batch_first=True)


def recurrent_params(kind, d_in, hidden):
    """Parameters of one torch recurrent layer: gates x (W_ih, W_hh, b_ih, b_hh)."""
    return GATES[kind] * (hidden * d_in + hidden * hidden + 2 * hidden)


def hidden_for_params(kind, d_in, target):
    """Hidden size whose parameter count is closest to `target`."""
    g = GATES[kind]
    h = (-(d_in + 2) + math.sqrt((d_in + 2) ** 2 + 4 * target / g)) / 2    # root of g*(h^2 + (d_in+2) h) = P
    return min((max(1, math.floor(h)), math.ceil(h)), key=lambda c: abs(recurrent_params(kind, d_in, c) - target))


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@dataclass
class SpeedModel:
    name: str            # row id: "attention-attnfast", "lstm/matched-params", ...
    encoder: str         # one of ENCODERS
    variant: str         # "matched-hidden", "matched-params" (attention: the reference of both)
    hidden: int
    params: int
    module: nn.Module

    def forward(self, x):
        out = self.module(x)
        return out if self.encoder in ATTENTION else out[0]


def speed_models(plan, device, dtype):
    torch.manual_seed(0)
    att = attention_layer(plan.d_model, plan.nhead, plan.ff).to(device, dtype)   # one module, two SDPA routes
    target = n_params(att)
    models = [SpeedModel(name, name, "matched-hidden", plan.d_model, target, att) for name in ATTENTION]
    for variant in VARIANTS:
        for kind in RECURRENT:
            h = plan.d_model if variant == "matched-hidden" else hidden_for_params(kind, plan.d_model, target)
            m = RNN_CLASS[kind](plan.d_model, h, batch_first=True).to(device, dtype)
            assert n_params(m) == recurrent_params(kind, plan.d_model, h)
            models.append(SpeedModel(f"{kind}/{variant}", kind, variant, h, n_params(m), m))
    return models


def label(name):
    if "/" not in name:
        return name
    kind, variant = name.split("/")
    return f"{kind} ({'params' if variant == 'matched-params' else 'hidden'})"


# ---------------------------------------------------------------------------
# SDPA routing: which attention runs, and a check that it really runs
# ---------------------------------------------------------------------------
def attnfast_route(encoder):
    """(enter, exit) that put F.scaled_dot_product_attention on this encoder's backend."""
    if encoder == "attention-attnfast":
        import attnfast

        return attnfast.patch, attnfast.unpatch
    return (lambda: None), (lambda: None)


@contextlib.contextmanager
def fastpath_off():
    old = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(old)


@contextlib.contextmanager
def count_sdpa_calls():
    """Count calls of torch.nn.functional.scaled_dot_product_attention (whatever it is now) in the block."""
    counts = {"sdpa": 0}
    inner = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        counts["sdpa"] += 1
        return inner(*args, **kwargs)

    F.scaled_dot_product_attention = counting
    try:
        yield counts
    finally:
        F.scaled_dot_product_attention = inner


def _check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def verify_routing(att_module, d_model, device, dtype):
    """Once, untimed: every attention encoder calls SDPA; attnfast's runs attnfast kernels only.

    Also records (not asserted) what torch's eval fast path does when it is left on:
    there SDPA is never called, which is why the benchmark switches it off.
    """
    from attnfast.patching import kernel_calls

    x = torch.randn(1, 16, d_model, device=device, dtype=dtype, requires_grad=True)
    found = {}
    for encoder in ATTENTION:
        enter, leave = attnfast_route(encoder)
        for mode in MODES:
            enter()
            try:
                with kernel_calls() as kc, count_sdpa_calls() as sc:
                    run_once(lambda t: att_module(t), x, mode)
            finally:
                leave()
            got = dict(sdpa_calls=sc["sdpa"], attnfast_fwd=kc["attnfast_fwd"], attnfast_bwd=kc["attnfast_bwd"],
                       torch_attention=kc["torch_attention"])
            found[f"{encoder} {mode}"] = got
            _check(got["sdpa_calls"] >= 1, f"{encoder} {mode}: F.scaled_dot_product_attention not called: {got}")
            if encoder == "attention-attnfast":
                _check(got["attnfast_fwd"] >= 1 and got["torch_attention"] == 0,
                       f"{encoder} {mode}: attnfast kernel not reached: {got}")
                _check(mode == "fwd" or got["attnfast_bwd"] >= 1, f"{encoder} {mode}: no attnfast backward: {got}")
            else:
                _check(got["attnfast_fwd"] == 0 and got["torch_attention"] >= 1,
                       f"{encoder} {mode}: expected torch's SDPA kernel: {got}")
    torch.backends.mha.set_fastpath_enabled(True)
    try:
        att_module.eval()
        with torch.no_grad(), count_sdpa_calls() as sc:
            att_module(x.detach())
    finally:
        torch.backends.mha.set_fastpath_enabled(False)
    found["attention-torch fwd, fast path left on (not used)"] = dict(sdpa_calls=sc["sdpa"])
    return found


def run_once(fn, x, mode, g=None):
    if mode == "fwd":
        with torch.no_grad():
            return fn(x)
    out = fn(x)
    out.backward(torch.ones_like(out) if g is None else g)
    return None



def sinusoid_positions(T, d):
    pos = torch.arange(T, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float32) / d)
    pe = torch.zeros(T, d)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe


INIT_NOTE = ("init: torch defaults, named: nn.Embedding N(0, 1); nn.RNN/LSTM/GRU weights and biases "
             "U(-1/sqrt(h), 1/sqrt(h)), plus 1 on the LSTM forget-gate input bias (the usual forget-bias 1, "
             "Jozefowicz et al. 2015: otherwise the cell halves its memory every step at init); "
             "nn.TransformerEncoderLayer: attention in-projection xavier_uniform, biases 0, the other Linear "
             "layers kaiming_uniform(a=sqrt(5)) with U(+-1/sqrt(fan_in)) biases, LayerNorm 1 and 0; "
             "head nn.Linear default; fixed sinusoidal positions (attention only)")


class RecallModel(nn.Module):
    def __init__(self, encoder, plan):
        super().__init__()
        d = plan.d_model
        self.encoder_name = encoder
        self.emb = nn.Embedding(plan.vocab, d)
        if encoder in ATTENTION:
            self.enc = attention_layer(d, plan.nhead, plan.ff)
        else:
            self.enc = RNN_CLASS[encoder](d, d, batch_first=True)
            if encoder == "lstm":
                with torch.no_grad():
                    self.enc.bias_ih_l0[d:2 * d] += 1.0             # gates i, f, g, o: f is the second block
        self.head = nn.Linear(d, plan.n_values)
        self._pe = torch.zeros(0, d)

    def encode(self, e):
        """Logits at the last (query) position from input embeddings e (B, T, d)."""
        if self.encoder_name in ATTENTION:
            T = e.shape[1]
            if self._pe.shape[0] < T:
                self._pe = sinusoid_positions(T, e.shape[2])
            h = self.enc(e + self._pe[:T].to(e))
        else:
            h = self.enc(e)[0]
        return self.head(h[:, -1])

    def forward(self, tokens):
        return self.encode(self.emb(tokens.long()))



# ---------------------------------------------------------------------------
# Kernel paths (what torch runs for each recurrent layer here)
# ---------------------------------------------------------------------------
def recurrent_kernel_paths(device):
    """Which ATen ops one fwd+bwd of each recurrent layer dispatches (L=8): fused layer or per-step ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.name())
            return func(*args, **(kwargs or {}))

    out = {}
    x = torch.randn(1, 8, 8, device=device, requires_grad=True)
    for kind, cls in RNN_CLASS.items():
        m = cls(8, 8, batch_first=True).to(device)
        with Ops() as ops:
            m(x)[0].sum().backward()
        fused = sorted({n for n in ops.names if any(s in n for s in ("rnn_layer", "cudnn_rnn", "_thnn_fused"))})
        out[kind] = dict(aten_ops_at_L8=len(ops.names), fused_kernels=fused)
    return out

