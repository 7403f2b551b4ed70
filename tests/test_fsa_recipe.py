"""FSA's training recipe and input pipelines as aresPanos/fsa@e151d89 sets them: the trainer's multistep schedule
(MultiStepLR stepped per epoch, cil_trainer.py:33-41, 159-167), the presets' per-dataset inputs (CIFAR-100 FSCIL:
LANCZOS to 224 and ImageNet mean/std, cifar100_fscil.py:55, 62-63, 161-165, 176-180; CUB-200 FSCIL:
Resize(256) + CenterCrop(224) and mean = std = 0.5, cub200.py:14, 21-22, 97-101, 127-131), drop-connect 0.2 and
BatchNorm momentum 0.01 (efficientnet_utils.py:483, 520; efficientnet.py:230)."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset
from torchvision import transforms as T

from cl.app.cli import compose_config
from cl.engine.errors import ConfigError
from cl.engine.strategy import Strategy
from cl.engine.stream import Experience, Stream, StreamInfo, eval_view
from cl.engine.trainer import Trainer, TrainerConfig, make_scheduler
from scenarios.datasets.cifar import CifarDataset
from scenarios.kinds.fscil import apply_resize, build_fscil
from scenarios.datasets.imagefolder import ImageFolderDataset

pytestmark = pytest.mark.unit


# --- the multistep schedule -------------------------------------------------------------------------------------
class Quadratic(Strategy):
    """One parameter, a constant-shaped loss: only the lr schedule matters."""

    def setup(self, backbone, info):
        super().setup(backbone, info)
        self.w = nn.Parameter(torch.ones(3))

    def begin_experience(self, exp):
        return [{"params": [self.w]}] if exp.index == 0 else []

    def train_step(self, batch):
        return self.w.pow(2).sum() + 0 * batch.x.sum()

    def predict(self, x, task_id=None):
        return torch.zeros(len(x), 2)


class Flat(nn.Module):
    input_size, in_chans, feature_dim = 2, 1, 4

    def forward(self, x):
        return x.flatten(1)


def test_multistep_lr_per_epoch_equals_torch_multisteplr_stepped_after_each_epoch():
    data = TensorDataset(torch.zeros(8, 1, 2, 2), torch.tensor([0, 1] * 4))
    stream = Stream([Experience(0, data, data, [0, 1], "class_il", task_id=0)],
                    StreamInfo("toy", "class_il", 2, 1, [0, 1], input_shape=(1, 2, 2), classes_per_experience=[[0, 1]]))
    strategy = Quadratic()
    strategy.setup(Flat(), stream.info)
    events = []
    cfg = TrainerConfig(epochs=7, batch_size=4, optimizer="adam", lr=0.1, scheduler="multistep",
                        milestones=[2, 4, 6], gamma=0.5, device="cpu", progress=False)
    Trainer(cfg, log=lambda event, **kw: events.append((event, kw))).fit(stream, strategy)
    lrs = [kw["lr"] for e, kw in events if e == "epoch_end"]
    # the reference's loop: train an epoch at the current lr, then scheduler.step() (cil_trainer.py:159-167)
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4, 6], gamma=0.5)
    expected = []
    for _ in range(7):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(expected)
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125])


def test_fsa_composes_the_reference_schedule():
    cfg = compose_config(["strategy=fsa", "scenario=synthetic-fscil"])
    tc = TrainerConfig.from_mapping(cfg["trainer"])
    assert (tc.optimizer, tc.lr, tc.batch_size, tc.epochs, tc.weight_decay) == ("adam", 0.005, 256, 200, 0.0)
    assert (tc.scheduler, tc.milestones, tc.gamma) == ("multistep", [50, 100, 150], 0.7)
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=tc.lr)
    sched = make_scheduler(opt, tc)
    lr_at = {}
    for epoch in range(tc.epochs):
        lr_at[epoch] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    for epoch, k in ((0, 0), (49, 0), (50, 1), (99, 1), (100, 2), (149, 2), (150, 3), (199, 3)):
        assert lr_at[epoch] == pytest.approx(0.005 * 0.7 ** k), epoch
    # other strategies keep their schedule; the new fields default to unused values
    other = TrainerConfig.from_mapping(compose_config(["strategy=finetune"])["trainer"])
    assert other.scheduler == "cosine" and other.milestones is None


@pytest.mark.parametrize("fields, message", [
    ({"scheduler": "multistep"}, "needs trainer.milestones"),
    ({"scheduler": "multistep", "milestones": [5, 5]}, "increasing"),
    ({"scheduler": "multistep", "milestones": [0, 5]}, ">= 1"),
    ({"scheduler": "multistep", "milestones": [5], "gamma": 0.0}, "gamma"),
    ({"milestones": "50,100"}, "list of integers"),
    ({"milestones": [50.5]}, "list of integers"),
])
def test_bad_schedules_are_one_line_errors(fields, message):
    with pytest.raises(ConfigError, match=message):
        TrainerConfig.from_mapping(fields)


# --- input pipelines --------------------------------------------------------------------------------------------
def cifar_pair(augment="none"):
    images = torch.from_numpy(np.random.RandomState(0).randint(0, 256, (4, 3, 32, 32), dtype=np.uint8))
    targets = np.array([0, 1, 0, 1])
    return (CifarDataset(images, targets, ["a", "b"], 224, train=True, augment=augment),
            CifarDataset(images, targets, ["a", "b"], 224, train=False, augment=augment))


def as_uint8(pil_image):
    return torch.from_numpy(np.array(pil_image)).permute(2, 0, 1)


def test_lanczos_resize_is_the_fsa_cifar_fscil_transform():
    train, test = cifar_pair()
    apply_resize((train, test), "lanczos")
    # cifar100_fscil.py:161-165 / 176-180 (before ToTensor + Normalize): Resize((224, 224), LANCZOS) of the PIL image
    reference = T.Resize((224, 224), interpolation=T.InterpolationMode.LANCZOS)
    for ds in (train, test, eval_view(train)):
        pil = Image.fromarray(ds.images[1].numpy().transpose(1, 2, 0))
        assert torch.equal(ds[1][0], as_uint8(reference(pil)))


def test_bilinear_crop_is_the_fsa_cub_fscil_transform(tmp_path):
    gen = np.random.RandomState(1)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(gen.randint(0, 256, (300, 400, 3), dtype=np.uint8)).save(tmp_path / split / cls / "x.png")
    train = ImageFolderDataset(tmp_path / "train", 224, train=True, augment="none")
    test = ImageFolderDataset(tmp_path / "test", 224, train=False, augment="none")
    apply_resize((train, test), "bilinear_crop")
    reference = T.Compose([T.Resize(256), T.CenterCrop(224)])  # cub200.py:97-101 / 127-131, default bilinear
    for ds in (train, test):
        with Image.open(ds.samples[0][0]) as im:
            assert torch.equal(ds[0][0], as_uint8(reference(im.convert("RGB"))))


def test_resize_needs_no_augmentation_and_an_image_reader():
    train, test = cifar_pair(augment="pilot")
    with pytest.raises(ConfigError, match="scenario.augment=none"):
        apply_resize((train, test), "lanczos")
    with pytest.raises(ConfigError, match="has no transform"):
        apply_resize((TensorDataset(torch.zeros(1)),), "lanczos")
    cfg = compose_config(["scenario=synthetic-fscil"])["scenario"]
    with pytest.raises(ConfigError, match="scenario.resize must be one of"):
        build_fscil({**cfg, "resize": "lanczoz"})
    with pytest.raises(ConfigError, match="has no transform"):
        build_fscil({**cfg, "resize": "lanczos"})


def test_presets_set_the_reference_inputs_and_efficientnet():
    from cl.models import backbones

    cifar = compose_config(["experiment=fsa_cifar100"])
    cub = compose_config(["experiment=fsa_cub200"])
    vit = compose_config(["experiment=fsa_cifar100-vit"])
    assert (cifar["scenario"]["resize"], cifar["scenario"]["augment"], cifar["backbone"]["normalize"]) == \
        ("lanczos", "none", "imagenet")
    assert (cub["scenario"]["resize"], cub["scenario"]["augment"], cub["backbone"]["normalize"]) == \
        ("bilinear_crop", "none", "inception")
    assert (vit["scenario"]["resize"], vit["scenario"]["augment"]) == ("lanczos", "none")
    for cfg in (cifar, cub, vit):
        assert (cfg["trainer"]["scheduler"], cfg["trainer"]["milestones"], cfg["trainer"]["gamma"]) == \
            ("multistep", [50, 100, 150], 0.7)
    for cfg in (cifar, cub):
        assert cfg["backbone"]["kwargs"] == {"drop_path_rate": 0.2, "bn_momentum": 0.01}
    bb = backbones.build({**cifar["backbone"], "pretrained": False})
    bns = [m for m in bb.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.01 for m in bns)
    assert torch.allclose(bb.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
