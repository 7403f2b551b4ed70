"""Text-prompt classifiers for union-label (X-TAIL) streams, shared by `mora` and the `finetune` baseline.

Why a helper: in the union-label setting a class is its name, so the classifier is CLIP's text embedding of
`prompt_template.format(name)` for every class of every dataset, and the label space is that whole union from the
first experience on (X-TAIL gives no dataset id and evaluates future datasets zero-shot). `union_label_head`
therefore also unmasks every class (`seen_mask` all true): nothing is "unseen" when the names are known.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cl.engine.errors import ConfigError


def require_clip(backbone, strategy: str) -> None:
    """A union-label classifier needs a text tower: a one-line error naming the fix otherwise."""
    if not hasattr(backbone, "encode_text"):
        raise ConfigError(f"strategy '{strategy}' on a union_label scenario needs a CLIP backbone with a text tower "
                          f"(source: open_clip), got '{getattr(backbone, 'name', type(backbone).__name__)}': "
                          f"use backbone=clip-tiny or backbone=clip-vit-b16")


def class_prompts(info) -> list[str]:
    """One prompt per global class id, from `StreamInfo.class_names` and each class's dataset template
    (`extra["prompt_templates"]`, else the scenario's single `prompt_template`)."""
    if not info.class_names or len(info.class_names) != info.n_classes:
        raise ConfigError("a union_label stream needs one class name per class (scenario datasets' class_names)")
    extra = info.extra or {}
    templates = extra.get("prompt_templates") or [extra.get("prompt_template", "a photo of a {}.")] * info.n_classes
    return [template.format(name) for template, name in zip(templates, info.class_names)]


def encode_prompts(backbone, prompts: list[str], chunk: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings [len(prompts), d]; gradients flow when enabled (chunked for big unions)."""
    parts = [backbone.encode_text(prompts[i: i + chunk]) for i in range(0, len(prompts), chunk)]
    return F.normalize(torch.cat(parts).float(), dim=-1)


class TextHead(nn.Module):
    """CLIP's zero-shot classifier as a trainable head: logits = scale * cos(image feature, class weight).

    Initialised from the normalised prompt embeddings and CLIP's (exponentiated) logit scale, so before any
    training it predicts exactly what zero-shot CLIP predicts."""

    def __init__(self, text_embeddings: torch.Tensor, logit_scale: float):
        super().__init__()
        self.weight = nn.Parameter(text_embeddings.detach().clone())
        self.register_buffer("scale", torch.tensor(float(logit_scale)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(features.float(), dim=-1) @ F.normalize(self.weight, dim=-1).T


@torch.no_grad()
def union_label_head(strategy) -> TextHead:
    """The text-embedding head over all union classes for `strategy` (after `Strategy.setup`); unmasks them all."""
    backbone, info = strategy.backbone, strategy.info
    require_clip(backbone, strategy.name)
    was_training = backbone.training
    backbone.eval()
    emb = encode_prompts(backbone, class_prompts(info))
    backbone.train(was_training)
    strategy.seen_mask.fill_(True)  # the union label space is known from the start (X-TAIL's protocol)
    return TextHead(emb, float(backbone.logit_scale))
