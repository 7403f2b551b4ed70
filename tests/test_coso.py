"""CoSO mechanisms: updates orthogonal to the stored subspace, the FD sketch and energy rule on hand-made
gradients with known spectra, exact vs fast subspaces, and an end-to-end run."""
import json

import torch

from cl.subspace import CoSOAdam, energy_rank, fd_shrink, top_subspace


def known_spectrum(m=12, n=9, sigmas=(3.0, 2.0, 1.0), seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    s = torch.zeros(min(m, n))
    s[:len(sigmas)] = torch.tensor(sigmas)
    return u[:, :len(s)] @ torch.diag(s) @ v[:, :len(s)].T, u


def test_energy_rule_on_a_known_spectrum():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14: cumsum 0.643, 0.929, 1.0
    assert energy_rank(s, 0.95) == 2
    assert energy_rank(s, 0.5) == 0
    assert energy_rank(s, 0.98) == 2


def test_fd_shrinks_by_the_next_singular_value():
    u, s = torch.eye(4), torch.tensor([4.0, 3.0, 1.0, 0.5])
    _, shrunk = fd_shrink(u, s, 2)
    assert torch.allclose(shrunk, torch.sqrt(torch.tensor([16.0 - 1, 9.0 - 1])))


def test_updates_stay_orthogonal_to_the_stored_subspace_and_sketch_grows_basis():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 9))
    basis, _ = torch.linalg.qr(torch.randn(12, 3))
    opt = CoSOAdam([{"params": [w], "subspace": True, "proj_rank": 4, "sketch_rank": 5}], lr=0.1,
                   bases={w: basis})
    before = w.detach().clone()
    for _ in range(5):
        w.grad = torch.randn(12, 9)
        opt.step()
    delta = w.detach() - before
    assert delta.abs().max() > 1e-3
    assert (basis.T @ delta).abs().max() < 1e-5
    sketch = opt.state[w]["sketch_u"]
    assert (basis.T @ sketch).abs().max() < 1e-5  # the sketch lives in the complement too


def test_sketch_of_a_known_gradient_keeps_its_directions_and_energy_picks_them():
    g, u = known_spectrum()
    w = torch.nn.Parameter(torch.zeros(12, 9))
    opt = CoSOAdam([{"params": [w], "subspace": True, "proj_rank": 2, "sketch_rank": 3}], lr=0.01)
    w.grad = g
    opt.step()
    s = opt.state[w]["sketch_s"]
    assert torch.allclose(s, torch.tensor([3.0, 2.0, 1.0]), atol=1e-5)  # sigma_4 = 0: no shrinkage
    k = energy_rank(s, 0.95)
    new = opt.state[w]["sketch_u"][:, :k]
    assert k == 2 and torch.allclose((u[:, :2].T @ new).abs(), torch.eye(2), atol=1e-5)


def test_fast_subspace_matches_exact_on_a_low_rank_gradient():
    g, _ = known_spectrum(m=64, n=48, sigmas=(5.0, 4.0, 3.0, 2.0))
    ue, se = top_subspace(g, 4, "exact")
    uf, sf = top_subspace(g, 4, "fast")
    assert torch.allclose(se[:4], sf[:4], atol=1e-4)
    assert torch.allclose((ue[:, :4].T @ uf[:, :4]).abs(), torch.eye(4), atol=1e-3)


def test_coso_runs_end_to_end(compose, run_quiet):
    cfg = compose("strategy=coso", "scenario=synthetic", "backbone=vit-tiny", "debug=fast",
                  "strategy.proj_rank=8", "strategy.sketch_rank=16", "strategy.lr=0.003", "strategy.fc_lr=0.01")
    path, _ = run_quiet(cfg)
    result = json.loads((path / "result.json").read_text()) if path.is_dir() else json.loads(path.read_text())
    assert result
