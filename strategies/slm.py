"""SLM (Peng et al., ICLR'24): DTKR retrieval of task slots in a frozen sentence encoder's space (JARe merges
the retrieved slots' low-rank weight increments). This file holds the retriever (keys, their per-task
training, and the retrieval); see docs/text_and_slm.md for what is not wired yet.

Reference (Pbihao/SLM, vectordb + SLM-bert/models/retriever.py): query split into `groups` chunks, keys
`[groups, pool, d/groups]` orthogonally initialised, `slots_per_task` slots per task; key loss =
-mean cos(query chunk, its top-k keys) on the task's data only; retrieval averages cos over the batch and
groups (per batch, the reference default) or per sample, takes top-K and weights w_j = s_j / sum s.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TaskKeys(nn.Module):
    def __init__(self, dim: int, n_tasks: int, slots_per_task: int = 4, groups: int = 6, top_k: int = 4):
        super().__init__()
        if dim % groups:
            raise ValueError(f"query dim {dim} is not divisible by groups={groups}")
        self.groups, self.slots, self.top_k = groups, slots_per_task, top_k
        keys = torch.empty(groups, n_tasks * slots_per_task, dim // groups)
        for g in range(groups):
            nn.init.orthogonal_(keys[g])
        self.keys = nn.Parameter(keys)

    def sim(self, q: torch.Tensor) -> torch.Tensor:
        """cos sim `[B, groups, pool]`."""
        qg = F.normalize(q.view(q.shape[0], self.groups, -1), dim=-1)
        return torch.einsum("bgd,gpd->bgp", qg, F.normalize(self.keys, dim=-1))

    def task_slots(self, t: int) -> slice:
        return slice(t * self.slots, (t + 1) * self.slots)

    def train_task(self, queries: torch.Tensor, t: int, epochs: int = 3, lr: float = 1e-3, bs: int = 4,
                   dropout: float = 0.25) -> None:
        """Stage 1: only task t's slots move; loss -mean cos to the top-k of them (random key dropout)."""
        opt = torch.optim.AdamW([self.keys], lr=lr, weight_decay=0.01)
        sl = self.task_slots(t)
        k = min(self.top_k, self.slots)
        for _ in range(epochs):
            for i in range(0, len(queries), bs):
                s = self.sim(queries[i:i + bs])[:, :, sl]
                s = s.masked_fill(torch.rand_like(s) < dropout, -2.0) if self.slots > k else s
                loss = -s.topk(k, dim=-1).values.clamp_min(-1).mean()
                opt.zero_grad()
                loss.backward()
                self.keys.grad[:, :sl.start].zero_(); self.keys.grad[:, sl.stop:].zero_()
                torch.nn.utils.clip_grad_norm_([self.keys], 0.1)
                opt.step()

    @torch.no_grad()
    def retrieve(self, q: torch.Tensor, n_seen_tasks: int, per_sample: bool = False):
        """Top-K slot ids and weights: `[K]` (per batch) or `[B, K]` (per sample)."""
        s = self.sim(q).mean(1)
        s[:, n_seen_tasks * self.slots:] = -100.0
        s = s if per_sample else s.mean(0, keepdim=True)
        v, idx = s.topk(self.top_k, dim=-1)
        w = v / v.sum(-1, keepdim=True)
        return (idx, w) if per_sample else (idx[0], w[0])
