"""DER++ against a re-statement of its reference step, on the same tiny model, weights and batches.

The re-statement below is written from neu-spiral/SparCL `main_sparse_train_w_data_gradient_efficient.py`
(`--replay_method derpp`: the step at :286-401, 442-477), its `utils/buffer.py` (mammoth's reservoir buffer:
`reservoir` :12-26, `add_data` :65-87, `get_data` :89-109) and `datasets/seq_cifar10.py` (the training transform
:61-66, re-applied to buffer draws through `get_transform()` :101-105: ToPILImage, RandomCrop(padding), flip,
ToTensor, Normalize with the CIFAR-10 mean/std); and, for the mammoth variant, mammoth `models/derpp.py:32-58`
(no class mask, replay as soon as the buffer is non-empty). It uses torchvision's PIL functions, not the
strategy's helpers; the random draws (reservoir slots, buffer choices, crop offsets and flips) are the ones the
strategy made, read back and fed to the re-statement, so the two runs see the same randomness.

Checked: the loss of every step, the gradients of every trained parameter at the first replay step, the
parameters after six steps, predictions, and what the buffer holds (the un-augmented inputs, labels, and the
logits at insertion time). Also: replay starts at the second experience (SparCL's `t > 0`, :303) or, as mammoth,
as soon as the buffer is non-empty; through the trainer the buffer never holds an augmented image.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn

from cl.models.backbones import Backbone
from cl.engine.errors import ConfigError
from cl.engine.stream import StreamInfo
from cl.engine.strategy import Batch
from strategies.derpp import DERpp, DeviceAugment

pytestmark = pytest.mark.unit

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2615)  # seq_cifar10.py:65-66
PAD, SIZE, N_CLASSES = 2, 8, 4
ALPHA, BETA, LR = 0.3, 0.7, 0.1


# --- the re-statement ------------------------------------------------------------------------------------
def ref_transform(example: torch.Tensor, top: int, left: int, flip: bool) -> torch.Tensor:
    """seq_cifar10 get_transform(): ToPILImage, RandomCrop(size, padding) at (top, left), flip, ToTensor, Normalize."""
    img = TF.pad(TF.to_pil_image(example), PAD)  # RandomCrop pads with fill 0 first
    img = TF.crop(img, top, left, SIZE, SIZE)
    if flip:
        img = TF.hflip(img)
    return TF.normalize(TF.to_tensor(img), MEAN, STD)


class RefBuffer:
    """utils/buffer.py Buffer(mode='reservoir'): examples, labels, logits; one sample at a time."""

    def __init__(self, size):
        self.size, self.num_seen = size, 0

    def add_data(self, examples, labels, logits, rands):
        if not hasattr(self, "examples"):
            self.examples = torch.zeros(self.size, *examples.shape[1:])
            self.labels = torch.zeros(self.size, dtype=torch.int64)
            self.logits = torch.zeros(self.size, *logits.shape[1:])
        for i in range(examples.shape[0]):
            # reservoir(): num_seen < size -> num_seen; else rand = randint(0, num_seen + 1), kept if rand < size
            index = self.num_seen if self.num_seen < self.size else (rands[i] if rands[i] < self.size else -1)
            self.num_seen += 1
            if index >= 0:
                self.examples[index] = examples[i]
                self.labels[index] = labels[i]
                self.logits[index] = logits[i]

    def get_data(self, choice, params):
        x = torch.stack([ref_transform(self.examples[c], int(t), int(l), bool(f))
                         for c, (t, l, f) in zip(choice.tolist(), params)])
        return x, self.labels[choice], self.logits[choice]


def ref_step(model, opt, buf, x_aug, y, raw, t, draws, rands, use_cl_mask, replay_from_first):
    outputs = model(TF.normalize(x_aug, MEAN, STD))  # the dataset's TRANSFORM ends with Normalize
    if use_cl_mask:  # :347-352
        cur = list(range(t * 2, (t + 1) * 2))
        mask_add_on = torch.zeros_like(outputs)
        mask_add_on[:, [c for c in range(N_CLASSES) if c not in cur]] = float("-inf")
        ce = F.cross_entropy(outputs + mask_add_on, y, reduction="none")  # criterion(reduce=False), :754-755
    else:
        ce = F.cross_entropy(outputs, y, reduction="none")
    if buf.num_seen > 0 and (t > 0 or replay_from_first):  # :303 (mammoth derpp.py:40: buffer non-empty)
        (c1, p1), (c2, p2) = draws
        bx, _, bz = buf.get_data(c1, p1)  # :368-378
        ce = ce + ALPHA * F.mse_loss(model(bx), bz, reduction="none").mean(-1)
        bx, by, _ = buf.get_data(c2, p2)  # :380-388
        ce = ce + BETA * F.cross_entropy(model(bx), by, reduction="none")
    loss = ce.mean()  # :442
    opt.zero_grad()
    loss.backward()
    opt.step()
    buf.add_data(raw, y, outputs.data, rands)  # :477, after the step, logits from before it
    return loss.detach()


# --- the shared setting ----------------------------------------------------------------------------------
def tiny_backbone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten())
    return Backbone(net, name="tiny", arch="tiny", feature_dim=16, input_size=SIZE, in_chans=3, normalize="cifar10",
                    weights_id="random", pretrained=False)


class Exp:
    def __init__(self, classes):
        self.classes = classes


def batches(seed=0):
    """Six batches of four: three of classes {0, 1}, three of {2, 3}; raw uint8 levels, and an augmented copy."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(6):
        raw = torch.randint(0, 256, (4, 3, SIZE, SIZE), generator=g).float() / 255
        y = torch.tensor([0, 1, 1, 0]) + (2 if k >= 3 else 0)
        x = torch.roll(raw, 1, dims=-1).flip(-1)  # any augmentation: both sides get the same x
        out.append((k // 3, x, y, raw))
    return out


def run_strategy(cl_mask, replay_first, buffer_size=6):
    s = DERpp(buffer_size=buffer_size, alpha=ALPHA, beta=BETA, cl_mask=cl_mask, replay_first_experience=replay_first)
    info = StreamInfo("t", "class_il", N_CLASSES, 2, list(range(N_CLASSES)), input_shape=(3, SIZE, SIZE),
                      classes_per_experience=[[0, 1], [2, 3]])
    s.setup(tiny_backbone(), info)
    s.augment = DeviceAugment("crop_flip", PAD)
    model0 = nn.Sequential(copy.deepcopy(s.backbone.model), copy.deepcopy(s.head))  # the same initial weights
    rec = {"slots": [], "choices": [], "params": []}
    slots, sample_index, augment = s.buffer.slots, s.buffer.sample_index, s.augment

    def rec_slots(n):
        out = slots(n)
        rec["slots"][-1].append(out.clone())
        return out

    def rec_choice(n):
        out = sample_index(n)
        rec["choices"][-1].append(out.clone())
        return out

    def rec_augment(x, gen):
        out = augment(x, gen)
        off, flips = augment.last
        rec["params"][-1].append([(int(a), int(b), bool(f)) for (a, b), f in zip(off.tolist(), flips.tolist())])
        return out

    s.buffer.slots, s.buffer.sample_index, s.augment = rec_slots, rec_choice, rec_augment
    opt = torch.optim.SGD([p for p in s.parameters() if p.requires_grad], lr=LR)
    s.train()
    losses, grads = [], None
    current = -1
    for t, x, y, raw in batches():
        if t != current:
            s.observe_classes(Exp([2 * t, 2 * t + 1]))
            current = t
        for key in rec:
            rec[key].append([])
        loss = s.train_step(Batch(x, y, raw=raw))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grads is None and rec["choices"][-1]:
            grads = [p.grad.clone() for p in list(s.backbone.model.parameters()) + list(s.head.parameters())]
        s.before_optimizer_step()
        opt.step()
        s.after_optimizer_step()
        losses.append(loss.detach())
    return s, model0, rec, losses, grads


def run_reference(model, rec, buffer_size, cl_mask, replay_first):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    buf = RefBuffer(buffer_size)
    losses, grads = [], None
    for k, (t, x, y, raw) in enumerate(batches()):
        draws = list(zip(rec["choices"][k], rec["params"][k]))
        slots = rec["slots"][k][0].tolist()
        rands = [v if v >= 0 else buffer_size for v in slots]  # the strategy's draws as the reference's rand
        replaying = buf.num_seen > 0 and (t > 0 or replay_first)
        assert len(draws) == (2 if replaying else 0)

        loss = ref_step(model, opt, buf, x, y, raw, t, draws, rands, cl_mask, replay_first)
        if replaying and grads is None:  # SGD's step leaves .grad as the step's gradient
            grads = [p.grad.clone() for p in model.parameters()]
        losses.append(loss)
    return buf, losses, grads


@pytest.mark.parametrize("variant", ["sparcl", "mammoth"])
def test_derpp_step_matches_the_reference(variant):
    cl_mask, replay_first = (True, False) if variant == "sparcl" else (False, True)
    s, model, rec, losses, grads = run_strategy(cl_mask, replay_first)
    buf, ref_losses, ref_grads = run_reference(model, rec, 6, cl_mask, replay_first)

    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-5, atol=1e-6)
    assert grads is not None and ref_grads is not None
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    ours = list(s.backbone.model.parameters()) + list(s.head.parameters())
    for p, r in zip(ours, model.parameters()):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6)
    for p, r in zip(s.backbone.model.buffers(), model[0].buffers()):  # BN running statistics
        torch.testing.assert_close(p.float(), r.float(), rtol=1e-5, atol=1e-6)

    # the buffer: same slots, the raw inputs, labels, and the logits at insertion time
    assert s.buffer.seen == buf.num_seen == 24
    torch.testing.assert_close(s.buffer.x, buf.examples, rtol=0, atol=0)
    assert torch.equal(s.buffer.y, buf.labels)
    torch.testing.assert_close(s.buffer.logits, buf.logits, rtol=1e-5, atol=1e-6)
    raws = torch.cat([raw for *_, raw in batches()])
    for row in s.buffer.x:  # every stored image is one of the un-augmented inputs, never the augmented x
        assert bool((raws == row).flatten(1).all(1).any())

    x = torch.rand(5, 3, SIZE, SIZE)
    s.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(s.predict(x), model(TF.normalize(x, MEAN, STD)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("replay_first,first_replay_step", [(False, 3), (True, 1)])
def test_replay_starts_where_the_reference_starts(replay_first, first_replay_step):
    """SparCL (and its DER++ baseline): from the first batch of the second experience (`t > 0`, :303); mammoth:
    from the second batch on, once the buffer holds something (models/derpp.py:40)."""
    _, _, rec, _, _ = run_strategy(True, replay_first)
    replayed = [len(c) == 2 for c in rec["choices"]]
    assert replayed == [k >= first_replay_step for k in range(6)]


@pytest.mark.e2e
def test_through_the_trainer_the_buffer_holds_only_raw_images():
    from cl.engine.trainer import Trainer, TrainerConfig
    from test_batch_extras import crop_flip_stream  # a Split stream of 8 px images with crop_flip

    stream, images = crop_flip_stream((10, 7))
    s = DERpp(buffer_size=12, replay_first_experience=True)
    s.setup(tiny_backbone(), stream.info)
    Trainer(TrainerConfig(epochs=3, batch_size=4, progress=False, device="cpu", lr=0.05)).fit(stream, s)
    assert s.augment.kind == "crop_flip" and s.augment.pad == 4  # the stream's transform, re-applied on draws
    assert s.buffer.seen == 3 * 17 and len(s.buffer) == 12
    raw = images.float() / 255
    for row, label in zip(s.buffer.x, s.buffer.y):
        match = (raw == row).flatten(1).all(1).nonzero().flatten()
        assert match.numel() >= 1  # an exact, un-augmented training image ...
        assert int(stream[0].train.dataset.targets[int(match[0])]) == int(label)  # ... with its label


def test_unsupported_training_transforms_are_refused():
    class Pilot:
        train, augment = True, "pilot"

    with pytest.raises(ConfigError, match="crop_flip"):
        DeviceAugment.of(Pilot())
    assert DeviceAugment.of(object()).kind == "none"  # no transform declared: draws are used as stored
