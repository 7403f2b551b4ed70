"""CoSO's optimiser: Adam inside per-step SVD subspaces of gradients projected out of a historical basis, plus the
Frequent-Directions (FD) sketch of the task's gradients that grows that basis at task end (the energy rule).

Why a module of its own: the strategy only decides *which* weights and *which* historical bases; the linear
algebra (exact or fast subspaces, FD, energy rule) is tested here by hand-made gradients with known spectra.
"""
from __future__ import annotations

import math

import torch

SVD_MODES = ("exact", "fast")


def top_subspace(g: torch.Tensor, rank: int, mode: str = "exact", oversample: int = 10, niter: int = 2):
    """Leading left singular vectors and values of `g` (m x n, or a batch [L, m, n]), `rank` of them plus one.

    exact: `torch.linalg.svd` (the reference); fast: randomized `torch.svd_lowrank` (Halko et al.) with
    q = rank + 1 + oversample columns and `niter` power iterations, or the exact SVD where q would reach min(m, n)
    (a full-width random range is only a slower exact SVD). Both take a batch in one call.
    """
    if mode not in SVD_MODES:
        raise ValueError(f"svd mode '{mode}' unknown: use one of {', '.join(SVD_MODES)}")
    m, n = g.shape[-2:]
    k = min(rank, m, n)
    q = k + 1 + oversample
    if mode == "fast" and q < min(m, n):
        u, s, _ = torch.svd_lowrank(g, q=q, niter=niter)
    else:
        u, s, _ = torch.linalg.svd(g, full_matrices=False)
    return u[..., :k + 1], s[..., :k + 1]  # one extra value: the FD shrinkage needs sigma_{rank+1}


def fd_shrink(u: torch.Tensor, s: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequent Directions: keep `rank` directions, each sigma_i^2 reduced by sigma_{rank+1}^2 (0 if absent)."""
    floor = s[..., rank:rank + 1] ** 2 if s.shape[-1] > rank else torch.zeros_like(s[..., :1])
    shrunk = torch.sqrt(torch.clamp(s[..., :rank] ** 2 - floor, min=0))
    return u[..., :rank], shrunk


def project_out(g: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """G' = G - M (M^T G): removes the historical subspace's component from the gradient (rows = output dim)."""
    if basis is None or basis.numel() == 0:
        return g
    return g - basis @ (basis.T @ g)


def energy_rank(s: torch.Tensor, threshold: float) -> int:
    """k = #{i : cumsum(sigma_i^2 / sum sigma^2)_i < threshold} (the reference's task-end rule)."""
    energy = s ** 2
    total = energy.sum()
    if total <= 0:
        return 0
    return int((torch.cumsum(energy / total, 0) < threshold).sum())


class CoSOAdam(torch.optim.Optimizer):
    """AdamW for two kinds of groups.

    Subspace groups (`subspace=True`, 2-D weights): per step
        1. G' = G - M M^T G with M = `bases[p]` (historical subspace; empty on the first task);
        2. every `update_gap` steps: U, sigma = svd(G'); P = U[:, :proj_rank]; FD update of the sketch with
           `sketch_rank` directions (sketch <- FD(svd([decay * S, Q])));
        3. R = P^T G', Adam moments on R (proj_rank x n), W <- W - lr * P (m_hat / (sqrt(v_hat) + eps)),
           then decoupled weight decay. Moments are not reset when P changes (GaLore-style).
    Option (`project_p: True`, off by default; not in the reference, quinn-ch/CoSO coso/coso_projector.py:61-73
    uses P = U[:, :proj_rank] as it comes): P itself is projected out of M after each refresh. When G' has fewer
    than `proj_rank` non-zero singular values (a small batch's gradient, a late task), P's trailing columns are an
    arbitrary basis of G''s null space, which contains M; Adam scales their noise-level coordinates up to about
    |R| / eps, so the reference's steps leak into M (measured on vit-tiny: 2e-3 of the step's size); with the
    option they stay orthogonal to float precision.
    The SVDs of step 2 run batched: the weights of a group that share a shape (attn.proj of every block) are
    stacked into one [L, m, n] call, and their FD merges into another, in `exact` and `fast` mode alike.
    Plain groups: AdamW.
    The state keeps the sketch (`sketch_u`, `sketch_s`) for `CoSO.end_experience` to read.
    """

    def __init__(self, groups, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 bases: dict | None = None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, subspace=False, proj_rank=1,
                        sketch_rank=1, update_gap=1, decay=1.0, svd="exact", project_p=False)
        super().__init__(groups, defaults)
        self.bases = bases if bases is not None else {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = {}
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                g = p.grad.float()
                if group["subspace"]:
                    g = project_out(g, self.bases.get(p))
                grads[p] = g
            if group["subspace"]:
                # Also refresh early when P came from an all-zero gradient (a zero-initialised head's first step):
                # it spans nothing, and with update_gap > 1 it would block the weight for the whole gap.
                due = [p for p in params
                       if self.state[p]["step"] % group["update_gap"] == 0 or self.state[p].get("blank", False)]
                self._refresh([self.state[p] for p in due], [grads[p] for p in due], group)
                if group["project_p"]:  # P's trailing columns may span G''s null space, M included: keep steps out of M
                    for p in due:
                        self.state[p]["proj"] = project_out(self.state[p]["proj"], self.bases.get(p))
            for p in params:
                self._adam(p, grads[p], self.state[p], group)
        return loss

    @staticmethod
    def _adam(p: torch.Tensor, g: torch.Tensor, state: dict, group: dict) -> None:
        beta1, beta2 = group["betas"]
        if group["subspace"]:
            g = state["proj"].T @ g
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(g)
            state["exp_avg_sq"] = torch.zeros_like(g)
        state["step"] += 1
        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        update = m / (v.sqrt() + group["eps"])
        if group["subspace"]:
            update = state["proj"] @ update
        p.add_(update.to(p.dtype), alpha=-step_size)
        if group["weight_decay"] > 0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    @staticmethod
    def _refresh(states: list[dict], grads: list[torch.Tensor], group: dict) -> None:
        """New projections P from the G' and the FD sketch updates, batched over weights of one shape."""
        r1, r2, mode = group["proj_rank"], group["sketch_rank"], group["svd"]
        batches: dict[tuple, list[int]] = {}
        for i, (state, g) in enumerate(zip(states, grads)):
            batches.setdefault((tuple(g.shape), "sketch_u" in state), []).append(i)
        for (_, has_sketch), idx in batches.items():
            u, s = top_subspace(torch.stack([grads[i] for i in idx]), max(r1, r2), mode)
            qu, qs = fd_shrink(u, s, r2)
            if has_sketch:
                old = torch.stack([states[i]["sketch_u"] * states[i]["sketch_s"].unsqueeze(-2) for i in idx])
                both = torch.cat([group["decay"] * old, qu * qs.unsqueeze(-2)], dim=-1)
                qu, qs = fd_shrink(*top_subspace(both, r2, mode), r2)
            for j, i in enumerate(idx):
                states[i]["blank"] = bool(s[j, 0] <= 0)
                states[i]["proj"] = u[j, :, :r1].contiguous()
                states[i]["sketch_u"], states[i]["sketch_s"] = qu[j].contiguous(), qs[j].contiguous()
