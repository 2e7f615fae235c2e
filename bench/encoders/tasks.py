"""Long-range recall: a value token at position 0, distractors, a query token at
position `distance`; every encoder trains on it the same way, and is scored on
sequences it never saw, with the gradient norm that reaches position 0."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..common import progress as _progress_bar
from .models import ATTENTION, RecallModel, attnfast_route, n_params


@dataclass(frozen=True)
class TaskPlan:
    d_model: int
    nhead: int
    n_values: int                          # classes (chance = 1 / n_values)
    n_distractors: int
    distances: Tuple[int, ...]
    steps: int
    batch: int
    n_train: int
    n_eval: int
    n_grad: int                            # held-out sequences the gradient norms average over
    lr_attention: float
    lr_recurrent: float
    warmup: float = 0.1                    # fraction of the steps
    clip: float = 1.0                      # max global grad norm
    seed: int = 0
    threads: int = 1                       # training speed does not change the results; 1 thread never stalls

    @property
    def ff(self):
        return 2 * self.d_model

    @property
    def vocab(self):
        return self.n_values + self.n_distractors + 1



# ---------------------------------------------------------------------------
# Long-range recall
# ---------------------------------------------------------------------------
def recall_split(plan: TaskPlan, distance):
    """Train and held-out sequences (uint8 tokens, long labels); held-out rows found in train are dropped."""
    g = torch.Generator().manual_seed(plan.seed * 1_000_003 + distance)
    n = plan.n_train + plan.n_eval
    x = torch.randint(plan.n_values, plan.n_values + plan.n_distractors, (n, distance + 1), generator=g,
                      dtype=torch.uint8)
    y = torch.randint(0, plan.n_values, (n,), generator=g)
    x[:, 0] = y.to(torch.uint8)
    x[:, -1] = plan.vocab - 1                                  # the query token
    xtr, ytr, xev, yev = x[:plan.n_train], y[:plan.n_train], x[plan.n_train:], y[plan.n_train:]
    seen = {bytes(row) for row in xtr.numpy()}
    keep = torch.tensor([bytes(row) not in seen for row in xev.numpy()], dtype=torch.bool)
    return xtr, ytr, xev[keep], yev[keep], int((~keep).sum())



def grad_norms_at_input(model, x, y):
    """Mean over the batch of |d loss / d e[0]| and |d loss / d e[query]|, e = input embeddings."""
    model.train()
    e = model.emb(x.long()).detach().requires_grad_(True)
    loss = F.cross_entropy(model.encode(e), y, reduction="sum")   # sum: each row's grad is its own loss's
    (ge,) = torch.autograd.grad(loss, e)
    norms = ge.norm(dim=-1)                                         # (B, T)
    return norms[:, 0].mean().item(), norms[:, -1].mean().item()


def _lr_lambda(steps, warmup):
    wu = max(1, int(round(warmup * steps)))

    def f(s):
        if s < wu:
            return (s + 1) / wu
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - wu) / max(1, steps - wu))))

    return f


def train_recall(encoder, distance, plan: TaskPlan, split, device="cpu"):
    xtr, ytr, xev, yev, dropped = split
    torch.manual_seed(plan.seed)                 # same init for every distance, and for both attention routes
    model = RecallModel(encoder, plan).to(device)
    lr = plan.lr_attention if encoder in ATTENTION else plan.lr_recurrent
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(plan.steps, plan.warmup))
    batches = torch.Generator().manual_seed(plan.seed + 7919 * distance)   # same batches for every encoder
    xg, yg = xev[:plan.n_grad].to(device), yev[:plan.n_grad].to(device)
    n_threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(plan.threads)
    used_threads = torch.get_num_threads()
    enter, leave = attnfast_route(encoder)
    enter()
    try:
        g0_init, gq_init = grad_norms_at_input(model, xg, yg)
        pre_clip, step_s, losses = [], [], []
        t_start = time.perf_counter()
        for step in range(plan.steps):
            idx = torch.randint(0, xtr.shape[0], (plan.batch,), generator=batches)
            xb, yb = xtr[idx].to(device), ytr[idx].to(device)
            t0 = time.perf_counter()
            model.train()
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            pre_clip.append(float(nn.utils.clip_grad_norm_(model.parameters(), plan.clip)))
            opt.step()
            sched.step()
            step_s.append(time.perf_counter() - t0)
            losses.append(loss.item())
        train_s = time.perf_counter() - t_start
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, xev.shape[0], 128):
                xb = xev[i:i + 128].to(device)
                correct += int((model(xb).argmax(-1).cpu() == yev[i:i + 128]).sum())
        acc = correct / max(1, xev.shape[0])
        g0, gq = grad_norms_at_input(model, xg, yg)
    finally:
        leave()
        torch.set_num_threads(n_threads)
    tail = losses[-max(1, len(losses) // 10):]
    return dict(
        encoder=encoder, distance=distance, accuracy=acc, chance=1.0 / plan.n_values,
        grad_norm_pos0_init=g0_init, grad_norm_query_init=gq_init,
        grad_norm_pos0_trained=g0, grad_norm_query_trained=gq,
        final_train_loss=round(statistics.mean(tail), 4), steps=plan.steps, batch=plan.batch, lr=lr,
        params=n_params(model), clipped_fraction=round(sum(n > plan.clip for n in pre_clip) / len(pre_clip), 3),
        median_pre_clip_norm=round(statistics.median(pre_clip), 4), threads=used_threads,
        s_per_step=round(statistics.median(step_s), 5), train_s=round(train_s, 2),
        n_train=int(xtr.shape[0]), n_eval=int(xev.shape[0]), eval_dropped_as_seen_in_train=dropped)


def run_long_range(plan: TaskPlan, encoders, device="cpu", show_progress=True):
    jobs = [(d, e) for d in plan.distances for e in encoders]
    bar = _progress_bar(jobs, desc="encoders: long-range", unit="run") if show_progress else jobs
    rows, split, split_d = [], None, None
    for distance, encoder in bar:
        if split_d != distance:
            split, split_d = recall_split(plan, distance), distance
        rows.append(train_recall(encoder, distance, plan, split, device))
    return rows

