"""A contrastive warm-up of the tiny CLIP on a union-label stream's class names: a stand-in for CLIP pre-training.

Why: X-TAIL measures how a method keeps what a pre-trained CLIP already knows (zero-shot accuracy on datasets not
learned yet, and on the learned ones at the end). A randomly initialised CLIP knows nothing (its image features
collapse to one class), so on `synthetic-xtail` every method scores chance and no comparison means anything. This
module trains `clip-tiny` CLIP-style (symmetric image<->prompt cross-entropy, both towers) on the stream's TRAINING
images of every dataset for a few hundred steps and saves the weights as a plain safetensors file that
`backbone.weights=` loads. The evaluation uses the test images, which the warm-up never sees. This is a toy: the
"pre-trained" model has seen the very concepts of the stream, as real CLIP has seen most X-TAIL concepts.

    .venv/bin/python -m scenarios.xtail_warmup OUT.safetensors [steps]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def warm_up(steps: int = 300, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
            overrides: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The state dict of `clip-tiny` after `steps` contrastive steps on `synthetic-xtail`'s training images."""
    import scenarios
    from cl.backbones import build
    from cl.cli import compose_config
    from cl.clip_heads import class_prompts, encode_prompts
    from cl.data import to_model_input

    cfg = compose_config(["scenario=synthetic-xtail", "trainer.device=cpu", *overrides])
    torch.manual_seed(seed)
    stream = scenarios.build(cfg["scenario"])
    backbone = build(cfg["backbone"])
    prompts = class_prompts(stream.info)
    xs = torch.cat([torch.as_tensor(e.train.images) for e in stream])
    ys = torch.cat([torch.as_tensor(e.train.targets) for e in stream]).long()
    size = backbone.input_size
    opt = torch.optim.AdamW([p for p in backbone.clip.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    g = torch.Generator().manual_seed(seed)
    backbone.train()
    for _ in range(steps):
        idx = torch.randint(len(ys), (batch_size,), generator=g)
        x = to_model_input(xs[idx], size, 3, torch.device("cpu"))
        y = ys[idx]
        image = F.normalize(backbone(x).float(), dim=-1)
        text = encode_prompts(backbone, prompts)
        logits = backbone.logit_scale * image @ text.T
        # symmetric CLIP loss over the class prompts: image -> its prompt; prompt -> its images
        same = (y.unsqueeze(0) == torch.arange(len(prompts)).unsqueeze(1)).float()
        present = same.sum(1) > 0
        loss_t = -(same[present] / same[present].sum(1, keepdim=True) * F.log_softmax(logits.T[present], 1)).sum(1)
        loss = F.cross_entropy(logits, y) + loss_t.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return {k: v.detach().clone().contiguous() for k, v in backbone.clip.state_dict().items()}


def save_warm_clip(path: str | Path, steps: int = 300) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(warm_up(steps), str(tmp))
    tmp.replace(path)
    return path


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m scenarios.xtail_warmup OUT.safetensors [steps]")
    torch.set_num_threads(2)
    print(save_warm_clip(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 300))
