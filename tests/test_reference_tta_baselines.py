"""Reference-step tests for the CTTA baselines: source, BN adapt and TENT, each against a minimal re-statement of
its reference code written from reading it (DequanWang/tent e9e926a; qinenergy/cotta c212a20 carries the same
tent.py and norm.py and its cifar10c.py/imagenetc.py `setup_*`), on the same tiny BN network, weights and batches.
Compared: the returned prediction, the loss, the gradients of the trained parameters, every parameter after each
step. The re-statements configure a deep copy of the network as the reference does; they call nothing in
strategies/.
"""
import copy

import pytest
import torch
import torch.nn as nn

from cl.models.backbones import Backbone
from cl.engine.stream import StreamInfo
from cl.app.testbeds.synthetic_c import SmallResNet

pytestmark = pytest.mark.unit

ATOL = 1e-5


def _backbone(seed: int = 0) -> Backbone:
    """A tiny BN ResNet with non-trivial BN state (running statistics far from a batch's, affine not 1/0), so a
    wrong choice of statistics or of trained parameters shows in the numbers."""
    torch.manual_seed(seed)
    model = SmallResNet(5, 3, (4, 8))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    bb = Backbone(model, name="tiny", arch="small-bn-resnet", feature_dim=5, input_size=8, in_chans=3,
                  normalize="none", weights_id="test", pretrained=True)
    bb.is_classifier = True
    return bb


def _setup(strategy, bb):
    strategy.setup(bb, StreamInfo(name="t", kind="tta", n_classes=5, n_experiences=1, class_order=list(range(5))))
    return strategy


def _batches(n=3, b=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b, 3, 8, 8, generator=g) * (1 + k) - 0.3 * k for k in range(n)]  # shifting "domains"


def _entropy(logits):  # tent.py:42-45 softmax_entropy
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def test_source_is_the_eval_mode_model_and_never_changes():
    """cifar10c.py:53-57 / imagenetc.py:61-65 `setup_source`: model.eval(); the prediction is model(x)."""
    from strategies.source import Source

    bb = _backbone()
    ref = copy.deepcopy(bb.model).eval()
    s = _setup(Source(), bb)
    for x in _batches():
        with torch.no_grad():
            want = ref(x)
        assert torch.allclose(s.adapt(x), want, atol=ATOL)
    for (name, p), q in zip(s.backbone.model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(p, q), name  # running statistics included: nothing updates


def test_bn_adapt_normalises_each_batch_with_its_own_statistics():
    """norm.py:7-26, 48-65 `Norm(model)` with its defaults (eps 1e-5, momentum 0.1, reset_stats False, no_stats
    False): every BatchNorm2d in train mode, the prediction model(x); the running statistics it updates are never
    read (train mode)."""
    from strategies.bn_adapt import BNAdapt

    bb = _backbone()
    ref = copy.deepcopy(bb.model)
    for m in ref.modules():  # norm.py:50-56
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.eps, m.momentum = 1e-5, 0.1
    s = _setup(BNAdapt(), bb)
    eval_model = copy.deepcopy(_backbone().model).eval()
    for x in _batches():
        with torch.no_grad():
            want = ref(x)
            assert not torch.allclose(want, eval_model(x), atol=1e-3)  # batch statistics matter on this network
        assert torch.allclose(s.adapt(x), want, atol=ATOL)
    # each batch on its own: a sub-batch is normalised with its own statistics, not the earlier batches'
    x = _batches()[0]
    with torch.no_grad():
        assert torch.allclose(s.adapt(x[:4]), ref(x[:4]), atol=ATOL)
    assert all(not p.requires_grad for p in s.backbone.parameters())


def _reference_tent(model: nn.Module, optim: str, lr: float):
    """tent.py:96-110 `configure_model` and 64-80 `collect_params`; the optimiser of `setup_optimizer`
    (cifar10c.py:93-117 with cfgs/tent.yaml: Adam, beta 0.9, wd 0; qinenergy/cotta imagenet/imagenetc.py:101-123
    with cfgs/10orders/tent/*.yaml: SGD, momentum 0.9, dampening 0, wd 0, nesterov True)."""
    model.train()
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(True)
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
    params = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d)
              for n, p in m.named_parameters() if n in ("weight", "bias")]
    if optim == "adam":
        opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, dampening=0, weight_decay=0.0, nesterov=True)
    return params, opt


@pytest.mark.parametrize("optim,lr,extra,steps", [("adam", 1e-2, {}, 1),                 # CIFAR (lr raised: visible moves)
                                                  ("sgd", 5e-2, {"nesterov": True}, 1),  # ImageNet-C, Nesterov
                                                  ("adam", 1e-2, {}, 2)])                # OPTIM.STEPS 2
def test_tent_matches_the_reference_forward_and_adapt(optim, lr, extra, steps):
    """tent.py:48-61 `forward_and_adapt`: outputs = model(x); loss = entropy(outputs).mean(0); backward; step;
    zero_grad; return outputs (computed before the step); `Tent.forward` (tent.py:26-33) repeats it `steps`
    times and returns the last outputs. Three batches, continual (no reset)."""
    from strategies.tent import Tent

    bb = _backbone()
    ref = copy.deepcopy(bb.model)
    params, opt = _reference_tent(ref, optim, lr)
    s = _setup(Tent(optim=optim, lr=lr, momentum=0.9, steps=steps, **extra), bb)
    if optim == "sgd":
        assert s.optimizer.param_groups[0]["nesterov"] is True
    trained = {n for n, p in s.backbone.model.named_parameters() if p.requires_grad}
    bn_affine = {f"{mn}.{pn}" for mn, m in s.backbone.model.named_modules() if isinstance(m, nn.BatchNorm2d)
                 for pn in ("weight", "bias")}
    assert trained == bn_affine  # only BN affine trains
    start = {n: p.detach().clone() for n, p in s.backbone.model.named_parameters()}
    for x in _batches():
        for _ in range(steps):
            outputs = ref(x)
            loss = _entropy(outputs).mean(0)
            loss.backward()
            grads = [p.grad.clone() for p in params]
            opt.step()
            opt.zero_grad()
        pred = s.adapt(x)
        assert torch.allclose(pred, outputs.detach(), atol=ATOL)  # the prediction from before the step
        assert torch.allclose(_entropy(pred).mean(), loss.detach(), atol=ATOL)  # the loss it minimised
        got = [p.grad for p in s.backbone.model.parameters() if p.requires_grad]
        assert all(torch.allclose(a, b, atol=ATOL) for a, b in zip(got, grads))
        for (name, p), q in zip(s.backbone.model.named_parameters(), ref.parameters()):
            assert torch.allclose(p, q, atol=ATOL), name
    moved = {n for n, p in s.backbone.model.named_parameters() if not torch.equal(p, start[n])}
    assert moved == bn_affine  # every BN affine moved, nothing else did


def test_tent_uses_batch_statistics_not_the_source_ones():
    """configure_model (tent.py:102-109) drops the running statistics: the first prediction is the train-mode
    (batch-statistics) output of the untouched model, not its eval-mode output."""
    from strategies.tent import Tent

    bb = _backbone()
    eval_model = copy.deepcopy(bb.model).eval()
    batch_model = copy.deepcopy(bb.model).train()
    s = _setup(Tent(), bb)
    x = _batches()[0]
    with torch.no_grad():
        want = batch_model(x)
        assert not torch.allclose(want, eval_model(x), atol=1e-3)
    assert torch.allclose(s.adapt(x), want, atol=ATOL)


def test_tent_imagenet_preset_sets_nesterov(compose, tmp_path):
    """configs/experiment/tent_imagenetc.yaml: the ImageNet reference's SGD (lr 2.5e-4, momentum 0.9, Nesterov,
    cfgs/10orders/tent/tent0.yaml + imagenetc.py:117-123); the CIFAR presets keep Adam lr 1e-3 (cfgs/tent.yaml)."""
    from strategies.tent import Tent

    cfg = compose("experiment=tent_imagenetc", f"data_root={tmp_path}")
    st = {k: v for k, v in cfg["strategy"].items() if k != "name"}
    assert (st["optim"], st["lr"], st["momentum"], st["nesterov"]) == ("sgd", 0.00025, 0.9, True)
    s = _setup(Tent(**st), _backbone())
    g = s.optimizer.param_groups[0]
    assert isinstance(s.optimizer, torch.optim.SGD) and g["nesterov"] and g["dampening"] == 0 and g["weight_decay"] == 0
    for name in ("tent_cifar10c", "tent_cifar100c"):
        st = compose(f"experiment={name}", f"data_root={tmp_path}")["strategy"]
        assert (st["optim"], st["lr"], st["nesterov"]) == ("adam", 0.001, False)
