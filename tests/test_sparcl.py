"""SparCL masks reach the configured sparsity exactly; FLOP counting sees the layers actually run."""
import pytest
import torch
from torch import nn

from cl.flops import count_flops, sparse_flops
from strategies.sparcl import exact_mask, importance, sparsity_of


@pytest.mark.parametrize("sparsity", [0.75, 0.9, 0.95])
def test_exact_mask_reaches_sparsity_exactly(sparsity):
    torch.manual_seed(0)
    w = torch.randn(64, 32, 3, 3)
    mask = exact_mask(importance(w, torch.randn_like(w)), sparsity)
    assert sparsity_of([w * mask]) == pytest.approx(round(sparsity * w.numel()) / w.numel())
    kept = (w * mask).abs()
    assert kept[mask].min() > 0


def test_importance_uses_gradient():
    w = torch.tensor([1.0, 2.0])
    g = torch.tensor([4.0, 0.0])
    assert exact_mask(importance(w, g, lmd=0.5), 0.5).tolist() == [True, False]
    assert exact_mask(importance(w, None), 0.5).tolist() == [False, True]


def test_count_flops_linear_forward_backward():
    lin = nn.Linear(8, 4, bias=False)
    x = torch.randn(2, 8)
    fwd = count_flops(lambda: lin(x))
    assert fwd == 2 * 2 * 8 * 4
    train = count_flops(lambda: lin(x).sum())
    assert train == 2 * fwd  # forward + weight-grad (input needs no grad)
    assert sparse_flops(train, 0.25) == train // 4
