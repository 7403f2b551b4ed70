"""The RobustBench source architectures (cl/models/backbones_robustbench.py): the reference's exact key names and shapes
at full size (built on the meta device, no allocation), checkpoint round trips in RobustBench's layout at test
size, one-line errors; and EcoTTA's memory saving against CoTTA on WRN-28's real depth and partitioning."""
import pytest
import torch

from cl.engine.errors import BackboneError
from cl.engine.stream import StreamInfo

pytestmark = pytest.mark.unit


def _build(arch, tmp_path=None, **kw):
    from cl.models.backbones_robustbench import build_robustbench

    cfg = {"arch": arch, "n_classes": 10, "input_size": 16, "pretrained": False, "normalize": "none", **kw}
    if tmp_path is not None:
        cfg.update(pretrained=True, model_dir=str(tmp_path))
    return build_robustbench(cfg)


def test_full_size_architectures_have_the_reference_keys_and_shapes():
    from cl.models.backbones_robustbench import CifarResNeXt, WideResNet, _resnet50

    with torch.device("meta"):
        wrn, rx, r50 = WideResNet(28, 10, 10), CifarResNeXt(29, 4, 32, 100), _resnet50(1000)
    sd = {k: tuple(v.shape) for k, v in wrn.state_dict().items()}
    assert sum(p.numel() for p in wrn.parameters()) == 36_479_194  # WRN-28-10
    assert sd["conv1.weight"] == (16, 3, 3, 3) and sd["fc.weight"] == (10, 640) and sd["bn1.weight"] == (640,)
    assert sd["block1.layer.0.convShortcut.weight"] == (160, 16, 1, 1) and "block1.layer.1.convShortcut.weight" not in sd
    assert sd["block3.layer.3.conv2.weight"] == (640, 640, 3, 3) and len(wrn.blocks()) == 12
    sd = {k: tuple(v.shape) for k, v in rx.state_dict().items()}
    assert sd["conv_1_3x3.weight"] == (64, 3, 3, 3) and sd["stage_1.0.conv_reduce.weight"] == (128, 64, 1, 1)
    assert sd["stage_1.0.conv_conv.weight"] == (128, 32, 3, 3)  # 4 groups (cardinality) of 32 channels
    assert sd["stage_3.2.conv_expand.weight"] == (1024, 512, 1, 1) and sd["classifier.weight"] == (100, 1024)
    assert sd["stage_2.0.downsample.0.weight"] == (512, 256, 1, 1) and len(rx.blocks()) == 9
    assert sum(p.numel() for p in r50.parameters()) == 25_557_032 and len(r50.blocks()) == 16


@pytest.mark.parametrize("arch,dataset,name,extra,kw", [
    ("wrn-28-10", "cifar10-c", "Standard", {}, {"widen_factor": 1}),
    ("resnext-29-32x4d", "cifar100-c", "Hendrycks2020AugMix_ResNeXt",
     {"mu": torch.full((1, 3, 1, 1), 0.5), "sigma": torch.full((1, 3, 1, 1), 0.5)},
     {"cardinality": 2, "base_width": 4, "normalize": "inception"}),
])
def test_checkpoint_round_trip_in_robustbench_layout(tmp_path, arch, dataset, name, extra, kw):
    src = _build(arch, **kw)
    state = {f"module.{k}": v for k, v in src.model.state_dict().items()} | extra  # DataParallel-saved, as released
    folder = tmp_path / {"cifar10-c": "cifar10", "cifar100-c": "cifar100"}[dataset] / "corruptions"
    folder.mkdir(parents=True)
    torch.save({"state_dict": state}, folder / f"{name}.pt")
    bb = _build(arch, tmp_path, dataset=dataset, robustbench_name=name, **kw)
    assert bb.is_classifier and bb.weights_id == f"robustbench:{dataset}/corruptions/{name}"
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(bb(x), src(x))
    if arch == "wrn-28-10":  # a checkpoint of another architecture: one line naming the configs
        with pytest.raises(BackboneError, match="does not match architecture 'resnext-29-32x4d'.*resnext29-augmix.yaml"):
            _build("resnext-29-32x4d", tmp_path, dataset=dataset, robustbench_name=name)
    else:  # normalisation buffers that disagree with backbone.normalize
        with pytest.raises(BackboneError, match="set backbone.normalize"):
            _build(arch, tmp_path, dataset=dataset, robustbench_name=name, **{**kw, "normalize": "none"})


def test_resnet50_reads_normalize_model_wrapped_checkpoint(tmp_path):
    """RobustBench's Standard_R50 is torchvision's resnet50 inside normalize_model (keys model.*, normalize.*)."""
    from cl.models.backbones_robustbench import strip_normalizer

    from cl.models.backbones_robustbench import robustbench_state_dict

    with torch.device("meta"):
        bb = _build("resnet50", n_classes=1000)
    wrapped = {f"model.{k}": torch.zeros(v.shape) for k, v in list(bb.model.state_dict().items())[:4]}
    wrapped["normalize.mean"] = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    wrapped["normalize.std"] = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    (tmp_path / "imagenet" / "corruptions").mkdir(parents=True)
    torch.save(wrapped, tmp_path / "imagenet" / "corruptions" / "Standard_R50.pt")
    state = strip_normalizer(robustbench_state_dict(tmp_path, "imagenet-c", "Standard_R50"), "imagenet", "t")
    assert sorted(state) == sorted(list(bb.model.state_dict())[:4])  # conv1.weight, bn1.* : torchvision's names


def test_ecotta_parts_follow_the_reference_partition_and_meta_block():
    """K=5 on WRN-28: [2, 2, 2, 2, 4] blocks per part (Lily-Le/EcoTTA wideresnet28.py, citing Table 13); each meta
    network is ONE strided 3x3 conv -> BN -> ReLU on the part's input plus a BN on the part's output."""
    from strategies.ecotta import EcoTTA

    e = EcoTTA(num_parts=5)
    e.setup(_build("wrn-28-10", widen_factor=1), StreamInfo(name="t", kind="tta", n_classes=10, n_experiences=1,
                                                            class_order=list(range(10))))
    assert e.net.partition == [2, 2, 2, 2, 4]
    assert [len(p.original) for p in e.net.parts] == [2, 2, 2, 2, 4]
    convs = [(p.conv.in_channels, p.conv.out_channels, p.conv.stride[0], p.conv.kernel_size) for p in e.net.parts]
    assert convs == [(16, 16, 1, (3, 3)), (16, 16, 1, (3, 3)), (16, 32, 2, (3, 3)), (32, 32, 1, (3, 3)),
                     (32, 64, 2, (3, 3))]
    e40 = EcoTTA(num_parts=4)  # WRN-40-2 AugMix, the authors' sample code's model: K=4 [3, 3, 6, 6]
    e40.setup(_build("wrn-40-2", n_classes=100, normalize="inception"),
              StreamInfo(name="t", kind="tta", n_classes=100, n_experiences=1, class_order=list(range(100))))
    assert e40.net.partition == [3, 3, 6, 6] and len(e40.backbone.model.blocks()) == 18
    for p in e.net.parts:  # nothing else in a meta network
        assert sum(1 for m in p.modules() if m is not p and m is not p.original and not _inside(m, p.original)) == 3


def _inside(m, root):
    return any(m is x for x in root.modules())


def test_packed_relu_and_l1_give_autograd_gradients():
    from strategies.ecotta import PackedReLUs, _PackedL1

    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, 7, requires_grad=True)
    t = torch.randn(3, 5, 7, 7)
    w = torch.randn(3, 5, 7, 7)
    (torch.nn.functional.relu(x) * w).sum().backward()
    want = x.grad.clone()
    x.grad = None
    with PackedReLUs():
        (torch.nn.functional.relu(x) * w).sum().backward()
    assert torch.equal(x.grad, want)
    x.grad = None
    (x - t).abs().mean().backward()
    want = x.grad.clone()
    x.grad = None
    _PackedL1.apply(x, t).backward()
    assert torch.allclose(x.grad, want)


@pytest.mark.e2e
def test_ecotta_saves_backward_memory_against_cotta_on_wrn28():
    """Bytes autograd keeps for backward in one whole adaptation step (saved_tensors_hooks, parameters excluded),
    WRN-28 at the real depth (12 blocks) with width factor 1 at 16 px, batch 8 (the ratio depends on depth and
    partitioning, not width: WRN-28-10 itself gave 0.365, docs/tta.md), and WRN-40 K=4 (the paper's "80 % less"
    case). CoTTA counts only its student's step (the anchor, teacher and views run under no_grad)."""
    from strategies.cotta import CoTTA
    from strategies.ecotta import EcoTTA, PackedReLUs
    from strategies.tta_base import SavedForBackward

    info = StreamInfo(name="t", kind="tta", n_classes=10, n_experiences=1, class_order=list(range(10)))
    x = torch.rand(8, 3, 16, 16)
    sizes = {}
    c = CoTTA(n_aug=2, ap=1.0)  # ap 1: the augmented views run too (no_grad: nothing saved for them)
    c.setup(_build("wrn-28-10", widen_factor=1), info)
    with SavedForBackward(c._resident_keys()) as saved:
        c.forward_and_adapt(x)
    sizes["cotta"] = saved.bytes
    with SavedForBackward(c._resident_keys()) as saved:
        student = c.backbone(x)  # the student's forward alone keeps the same bytes
    sizes["cotta_student_only"] = saved.bytes
    with SavedForBackward(c._resident_keys()) as saved, PackedReLUs():
        c.backbone(x)  # 1-bit ReLU masks do not help CoTTA: its ReLU outputs are the next conv's saved inputs
    sizes["cotta_packed_relu"] = saved.bytes
    del student
    # frozen_bn=source: the original keeps no activation, the architecture as the paper counts its memory;
    # frozen_bn=batch (the default, the community code's train mode) also keeps each frozen BN's input
    for k, mode, key in ((4, "source", "ecotta_k4"), (5, "source", "ecotta_k5"), (5, "batch", "ecotta_k5_batch")):
        e = EcoTTA(num_parts=k, frozen_bn=mode)
        e.setup(_build("wrn-28-10", widen_factor=1), info)
        e.warmed_up.fill_(True)
        with SavedForBackward(e._resident_keys()) as saved:
            e.forward_and_adapt(x)
        sizes[key] = saved.bytes
    info100 = StreamInfo(name="t", kind="tta", n_classes=100, n_experiences=1, class_order=list(range(100)))
    for name, s in (("cotta_wrn40", CoTTA(n_aug=2, ap=0.0)), ("ecotta_wrn40_k4", EcoTTA(num_parts=4, frozen_bn="source"))):
        s.setup(_build("wrn-40-2", widen_factor=1, n_classes=100), info100)  # the paper's 80 % case, K=4
        if name.startswith("ecotta"):
            s.warmed_up.fill_(True)
        with SavedForBackward(s._resident_keys()) as saved:
            s.forward_and_adapt(x[:4])
        sizes[name] = saved.bytes
    print("saved for backward, bytes:", sizes)
    assert sizes["ecotta_wrn40_k4"] < 0.3 * sizes["cotta_wrn40"]  # measured 0.222 (WRN-40-2 at 32 px: 0.215)
    assert sizes["cotta_student_only"] >= 0.99 * sizes["cotta"]
    assert sizes["cotta_packed_relu"] > 0.95 * sizes["cotta"]
    assert sizes["ecotta_k5"] < 0.45 * sizes["cotta"]  # measured 0.370 (K=5) and 0.319 (K=4)
    assert sizes["ecotta_k4"] < sizes["ecotta_k5"]
    assert sizes["ecotta_k5"] < sizes["ecotta_k5_batch"] < sizes["cotta"]
