"""SparCL against a re-statement of its reference steps, on the same tiny model, weights and batches.

Written from neu-spiral/SparCL: the training step `main_sparse_train_w_data_gradient_efficient.py:286-460`
(current-class mask :347-352, per-sample CE averaged :442, gradient masking :447-455, step, weight masks :460),
`prune_utils/retrain.py` (`apply_masks` :132-139, `apply_masks_on_grads_efficient` :149-155,
`apply_masks_on_grads_mix` :157-189, `update_mask` :240-397), `prune_utils/utils_pr.py` (`weight_pruning`
irregular :119-146, `weight_growing` irregular :370-440) and the data removal (forgetting statistics :624-668,
sorting :671-700, removal :881-942). Percentiles are numpy's, as the reference computes them; the strategy uses an
exact top-k instead, so the layer sizes here (288 and 648 weights) are ones where the two keep the same count
(a documented difference: `docs/forgetting_and_sparsity.md`). Random choices (regrown positions) are read back
from the strategy and fed to the re-statement.

The DER++ part of the loss is checked in tests/test_reference_derpp.py; here the steps are of the first
experience (no replay), and the last test runs SparCL through the trainer: example ids from `Batch.index`, full
batches only (`drop_last`).
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl.models.backbones import Backbone
from cl.engine.stream import StreamInfo
from cl.engine.strategy import Batch
from strategies.sparcl import SparCL

pytestmark = pytest.mark.unit

LR = 0.2


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1, bias=False)  # 288 weights
        self.conv2 = nn.Conv2d(8, 9, 3, padding=1, bias=False)  # 648 weights

    def forward(self, x):
        return F.relu(self.conv2(F.relu(self.conv1(x))))


class TinyRes(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)  # the stem stays dense
        self.layer1 = nn.Sequential(Block())

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.layer1(F.relu(self.conv1(x))), 2).flatten(1)


MASKED = ["layer1.0.conv1.weight", "layer1.0.conv2.weight"]


def setup(**kw):
    torch.manual_seed(0)
    bb = Backbone(TinyRes(), name="tiny", arch="tiny", feature_dim=36, input_size=8, in_chans=3, normalize="none",
                  weights_id="random", pretrained=False)
    init = copy.deepcopy(bb.model)  # before the strategy's initial prune
    info = StreamInfo("t", "class_il", 4, 2, [0, 1, 2, 3], input_shape=(3, 8, 8),
                      classes_per_experience=[[0, 1], [2, 3]])
    s = SparCL(buffer_size=8, sparsity=0.75, gradient_sparsity=0.8, gradient_sample_frequency=2, **kw)
    s.setup(bb, info)
    s.current_mask[[0, 1]] = True
    s.experiences_seen += 1
    return s, init


# --- re-statement ---------------------------------------------------------------------------------------
def ref_prune(weight: torch.Tensor, grad, ratio: float, lmd: float = 0.5) -> np.ndarray:
    """utils_pr.weight_pruning, irregular: keep |W| + lmd |grad| strictly above the numpy percentile."""
    imp = np.abs(weight.detach().numpy())
    if grad is not None:
        imp = imp + lmd * np.abs(grad.detach().numpy())
    return (imp > np.percentile(imp, ratio * 100)).astype(np.float32)


def ref_grad_mix(grad: torch.Tensor, wmask: np.ndarray, gradient_sparse: float) -> tuple[torch.Tensor, np.ndarray]:
    """retrain.apply_masks_on_grads_mix: grad *= weight mask; zero |grad| under the percentile; mask = grad != 0."""
    g = grad * torch.from_numpy(wmask)
    a = np.abs(g.numpy())
    g[torch.from_numpy(a < np.percentile(a, gradient_sparse * 100))] = 0
    return g, (g.numpy() != 0).astype(np.float32)


def test_initial_prune_gradient_masks_and_steps_match_the_reference():
    s, init = setup()
    ref = nn.Sequential(init, copy.deepcopy(s.head))
    params = dict(ref[0].named_parameters())
    # --sp-prune-before-retrain: magnitude prune of the random initialisation, then apply_masks
    wmasks = {n: ref_prune(params[n], None, 0.75) for n in MASKED}
    with torch.no_grad():
        for n in MASKED:
            params[n].mul_(torch.from_numpy(wmasks[n]))
    for i, n in enumerate(MASKED):
        assert np.array_equal(s.wmask(i).numpy().astype(np.float32), wmasks[n])

    opt = torch.optim.SGD([p for p in s.parameters() if p.requires_grad], lr=LR)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
    g = torch.Generator().manual_seed(1)
    gmasks = {}
    s.train()
    for batch_idx in range(5):
        x, y = torch.rand(6, 3, 8, 8, generator=g), torch.tensor([0, 1, 1, 0, 1, 0])
        loss = s.train_step(Batch(x, y, raw=x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        s.before_optimizer_step()
        opt.step()
        s.after_optimizer_step()

        out = ref(x)
        add = torch.zeros_like(out)
        add[:, [2, 3]] = float("-inf")  # cl_mask: the classes outside the current task
        ref_loss = F.cross_entropy(out + add, y, reduction="none").mean()
        ref_opt.zero_grad()
        ref_loss.backward()
        with torch.no_grad():
            for n in MASKED:
                if batch_idx % 2 == 0:  # :450-451 sampling batch: mix
                    params[n].grad, gmasks[n] = ref_grad_mix(params[n].grad, wmasks[n], 0.8)
                else:  # :453 efficient: the stored gradient mask only
                    params[n].grad.mul_(torch.from_numpy(gmasks[n]))
        grads = {n: params[n].grad.clone() for n in MASKED}
        ref_opt.step()
        with torch.no_grad():  # prune_apply_masks after the step (:460)
            for n in MASKED:
                params[n].mul_(torch.from_numpy(wmasks[n]))

        torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
        for i, n in enumerate(MASKED):
            assert np.array_equal(s.gmask(i).numpy().astype(np.float32), gmasks[n])
            torch.testing.assert_close(s._weights[i].grad, grads[n], rtol=1e-5, atol=1e-7)
        for p, r in zip(list(s.backbone.model.parameters()) + list(s.head.parameters()), ref.parameters()):
            torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6)

    # TDM at the next epoch boundary (update_mask :295-397): prune to 0.76 by |W| + 0.5 |last grad| (the last
    # batch's masked gradient, never zeroed), regrow zeros up to 0.75; regrown weights start at zero.
    s.begin_epoch(1, 10)  # at 10 epochs per experience the schedule's second phase (0.76 / 0.75) starts at 1
    for i, n in enumerate(MASKED):
        pruned = ref_prune(params[n], params[n].grad, 0.76)
        with torch.no_grad():
            params[n].mul_(torch.from_numpy(pruned))
        w1d = (params[n].detach().numpy() * 1.0).reshape(-1)
        zeros = np.where(w1d == 0)[0]
        num_added = int(np.size(zeros) - 0.75 * np.size(w1d))  # weight_growing :401
        ours = s.wmask(i).numpy().reshape(-1)
        grown = np.where(ours & (pruned.reshape(-1) == 0))[0]  # the strategy's random choice, read back
        assert len(grown) == num_added > 0 and set(grown) <= set(zeros)
        w1d[grown] = -1  # update_init_method "zero": marks the grown positions, the weights stay 0
        ref_mask = (w1d != 0)
        assert np.array_equal(ours, ref_mask)
        torch.testing.assert_close(s._weights[i].detach(), params[n].detach(), rtol=0, atol=0)
        assert int((s._weights[i] == 0).sum()) == round(0.76 * w1d.size)


def test_gradient_mask_excludes_zero_gradients_as_the_reference():
    """When fewer than 20 % of the entries have a gradient (dead units), the reference's mask is `grad != 0`
    (retrain.py:185-189): no zero-gradient position joins it, whatever the top-k would pick."""
    s, _ = setup()
    w = s._weights[1]
    g = torch.zeros_like(w)
    alive = s.wmask(1).flatten().nonzero().flatten()[:20]  # 20 of 648 entries: under 20 %
    g.view(-1)[alive] = torch.linspace(1, 2, 20)
    w.grad = g.clone()
    s._batch_in_epoch = 0  # a sampling batch
    s.flops.add = lambda *a, **k: None  # no step was run, so no FLOP probe either
    s.before_optimizer_step()
    _, ref_mask = ref_grad_mix(g, s.wmask(1).numpy().astype(np.float32), 0.8)
    assert np.array_equal(s.gmask(1).numpy().astype(np.float32), ref_mask) and int(s.gmask(1).sum()) == 20


# --- dynamic data removal --------------------------------------------------------------------------------
def ref_removal(history, n_examples, npresentations, remove_n, remove_epoch, freq):
    """:624-668 forgetting statistics, :671-700 sort, :922-929 removal of the first remove_n / (E_r / f)."""
    stats = {}
    for idx, correct in history:
        for j, c in zip(idx, correct):
            stats.setdefault(j, [[], [], []])[1].append(int(c))
    unlearned, first_learned = {}, {}
    for j, st in stats.items():
        acc = np.array(st[1][:npresentations])
        trans = acc[1:] - acc[:-1]
        unlearned[j] = np.where(trans == -1)[0] + 2 if len(np.where(trans == -1)[0]) > 0 else []
        first_learned[j] = np.where(acc == 1)[0][0] if len(np.where(acc == 1)[0]) > 0 else np.nan
    order, values = [], []
    for j in unlearned:
        order.append(j)
        values.append(npresentations if np.isnan(first_learned[j]) else len(unlearned[j]))
    ordered = np.array(order)[np.argsort(values)]
    remove = ordered[0:int(remove_n / (int(remove_epoch) / freq))]
    return np.setdiff1d(np.arange(n_examples), remove)


def test_data_removal_matches_the_reference():
    s, _ = setup(remove_n=12, remove_data_epoch=20, mask_update_freq=5)

    class Seen(list):
        pass

    class Exp:
        train = [(torch.zeros(3, 8, 8, dtype=torch.uint8), i % 2) for i in range(10)]

    view = s.training_data(Seen([Exp()]))
    s.begin_epoch(0, 50)
    rng = np.random.RandomState(3)
    # five epochs of presentations; forgetting counts chosen without ties at the removal boundary
    pattern = {0: "11111", 1: "10101", 2: "00000", 3: "11011", 4: "01111", 5: "10100", 6: "11110", 7: "01010",
               8: "10010", 9: "00001"}
    history = []
    for e in range(5):
        if e:
            s.begin_epoch(e, 50)
        order = rng.permutation(10)
        for chunk in np.array_split(order, 3):
            correct = torch.tensor([pattern[int(j)][e] == "1" for j in chunk])
            y = torch.tensor([int(j) % 2 for j in chunk])
            z = F.one_hot(torch.where(correct, y, 1 - y), 4).float()
            s._idx = view.base_index(torch.as_tensor(chunk))
            s.after_forward(Batch(z, y), z)
            history.append((chunk.tolist(), correct.tolist()))
    s.begin_epoch(5, 50)  # the first removal epoch: 12 / (20 / 5) = 3 examples (0, 4, 9: never forgotten)
    expected = ref_removal(history, 10, 50, remove_n=12, remove_epoch=20, freq=5)
    assert view.keep.tolist() == expected.tolist() and len(expected) == 7


# --- through the trainer ---------------------------------------------------------------------------------
@pytest.mark.e2e
def test_trainer_gives_sparcl_example_ids_and_only_full_batches():
    from cl.engine.trainer import Trainer, TrainerConfig
    from test_batch_extras import crop_flip_stream

    stream, _ = crop_flip_stream((10, 7))
    s = SparCL(buffer_size=8, sparsity=0.75, remove_fraction=0.3, gradient_sample_frequency=2)
    torch.manual_seed(0)
    s.setup(Backbone(TinyRes(), name="tiny", arch="tiny", feature_dim=36, input_size=8, in_chans=3,
                     normalize="none", weights_id="random", pretrained=False), stream.info)
    seen = []
    after_forward = s.after_forward

    def spy(batch, z):
        seen.append((int(s.experiences_seen), s._idx.clone(), batch.y.clone(), set(s._view.keep.tolist())))
        after_forward(batch, z)

    s.after_forward = spy
    Trainer(TrainerConfig(epochs=3, batch_size=4, progress=False, device="cpu", lr=0.05)).fit(stream, s)
    # 3 epochs: one removal, at epoch 1, of int(0.3 n) examples: 10 -> 7 (experience 0), 7 -> 5 (experience 1)
    assert [len(keep) for *_, keep in seen] == [10, 10, 7, 7, 7, 5, 5]
    for exp, idx, y, keep in seen:
        assert len(y) == 4  # drop_last: only full batches, so the mask update's last gradient is a full batch's
        targets = torch.as_tensor(stream[exp - 1].train.targets)
        assert torch.equal(targets[idx], y)  # Batch.index, mapped back to the full set, names the right example
        assert set(idx.tolist()) <= keep  # removed examples are never trained on again
