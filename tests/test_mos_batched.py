"""MOS's (T+1)-pass inference batched across adapter sets (issue 10): the same scores as the sequential path on
the tiny stream, the same stored adapters afterwards (the reference pull still rewrites sets k >= 1 per test
batch), and a vectorised adapter equal to the per-set adapters."""
import copy

import pytest
import torch

import scenarios
import strategies
from cl.models import backbones
from cl.app.cli import compose_config
from cl.engine.data import to_model_input
from strategies.mos import StackedAdapters

pytestmark = pytest.mark.unit


def flat(adapters):
    return torch.cat([p.detach().flatten() for p in adapters.parameters()])


@pytest.fixture(scope="module")
def mos_three_sets():
    """MOS after three experiences, without training: three stored adapter sets, head and prototypes drawn at
    random (the equality under test does not depend on how they were learned)."""
    cfg = compose_config(["strategy=mos", "scenario=synthetic", "debug=fast", "trainer.progress=false",
                          "trainer.device=cpu"])
    torch.manual_seed(0)
    stream = scenarios.build(cfg["scenario"])
    mos = strategies.build(cfg["strategy"], backbones.build(cfg["backbone"]), stream.info, trainer=cfg["trainer"])
    with torch.no_grad():
        for t in range(3):
            mos.observe_classes(stream[t])
            mos.begin_experience(stream[t])
            for p in mos.cur_adapter.parameters():
                p.copy_(0.1 * torch.randn(p.shape))
            mos._store_adapter()
        mos.head.weight.normal_()
        mos.proto_head.weight.normal_()
    mos.eval()
    raw = torch.stack([torch.as_tensor(stream[i].test[j][0]) for i in range(3) for j in range(4)])
    bb = mos.backbone
    return mos, to_model_input(raw, bb.input_size, bb.in_chans, torch.device("cpu"))


def test_batched_eval_equals_the_sequential_passes_and_keeps_the_pull(mos_three_sets):
    mos, x = mos_three_sets
    stored = copy.deepcopy(mos.adapter_list.state_dict())
    before = [flat(a).clone() for a in mos.adapter_list]
    results = {}
    for batched in (False, True):
        mos.adapter_list.load_state_dict(stored)
        mos.h["batched_eval"] = batched
        scores = [mos.predict(x), mos.predict(x)]  # two test batches: the pull acts on each
        results[batched] = scores, [flat(a).clone() for a in mos.adapter_list]
    (seq, seq_sets), (bat, bat_sets) = results[False], results[True]
    for a, b in zip(seq, bat):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        assert torch.equal(a.argmax(1), b.argmax(1))
    for a, b in zip(seq_sets, bat_sets):
        assert torch.equal(a, b)  # sets k >= 1 pulled exactly as many times, with the same arithmetic
    assert torch.equal(seq_sets[0], before[0])  # set 0 never moves
    assert not torch.equal(seq_sets[2], before[2])  # the reference pull rewrote the stored set 2


def test_stacked_adapters_equal_each_set_on_its_chunk(mos_three_sets):
    mos, _ = mos_three_sets
    block = [mos.adapter_list[k][0] for k in range(3)]
    h = torch.randn(3 * 2, 5, block[0].dim)
    out = StackedAdapters(block)(h)
    ref = torch.cat([block[k](c) for k, c in enumerate(h.chunk(3))])
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
