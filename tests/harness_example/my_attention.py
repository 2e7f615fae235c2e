"""A project's own attention: key tiles of 16 with an online softmax, SDPA's signature."""
import math

import torch

TILE = 16


def my_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if dropout_p:
        raise NotImplementedError("no dropout")
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    Lq, Lk = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qf, kf, vf = q.float(), k.float(), v.float()
    m = torch.full(q.shape[:-1] + (1,), float("-inf"), device=q.device)
    den = torch.zeros(q.shape[:-1] + (1,), device=q.device)
    acc = torch.zeros(q.shape[:-1] + (v.shape[-1],), device=q.device)
    rows = torch.arange(Lq, device=q.device)[:, None]
    for start in range(0, Lk, TILE):
        s = scale * qf @ kf[..., start:start + TILE, :].transpose(-1, -2)
        cols = torch.arange(start, min(start + TILE, Lk), device=q.device)[None, :]
        if attn_mask is not None:
            part = attn_mask[..., start:start + TILE]
            s = s.masked_fill(~part, float("-inf")) if part.dtype == torch.bool else s + part.float()
        if is_causal:
            s = s.masked_fill(cols > rows, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        safe = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - safe)
        alpha = torch.exp(m - safe)
        den = den * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + p @ vf[..., start:start + TILE, :]
        m = m_new
    out = torch.where(den > 0, acc / den.clamp_min(1e-30), torch.zeros_like(acc))  # rows with no key: 0
    return out.to(q.dtype)
