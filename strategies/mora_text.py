"""MoRA's rank-1 experts on a Hugging Face language model, for the `text` kind (classification streams).

The layer is the same `RankOneExperts` as on CLIP (strategies/mora.py); only where it goes differs. Hugging Face
models keep q/k/v/out and the FFN's in/out projections as plain `nn.Linear`s, so each is wrapped in place, found
by its qualified name. The suffixes per model family (`config.model_type`) are in `TEXT_TARGETS`; an unknown
family falls back to BERT's names, and a backbone where nothing matches is a one-line error.
"""
from __future__ import annotations

import re

from torch import nn

from cl.engine.errors import ConfigError

# target -> regex on the qualified module name (anchored at the end). BERT-style: BertModel, MiniLM, RoBERTa;
# BERT's FFN-out ("layer.N.output.dense") must not catch the attention output ("attention.output.dense").
_BERT = {"q": r"attention\.self\.query", "k": r"attention\.self\.key", "v": r"attention\.self\.value",
         "o": r"attention\.output\.dense", "ffn_in": r"intermediate\.dense", "ffn_out": r"layer\.\d+\.output\.dense"}
TEXT_TARGETS: dict[str, dict[str, str]] = {
    "bert": _BERT,
    "roberta": _BERT,
    "mpnet": {"q": r"attention\.attn\.q", "k": r"attention\.attn\.k", "v": r"attention\.attn\.v",
              "o": r"attention\.attn\.o", "ffn_in": r"intermediate\.dense", "ffn_out": r"layer\.\d+\.output\.dense"},
    # LLaMA-style decoders: the gated FFN's gate and up projections are both "FFN in"
    "llama": {"q": r"self_attn\.q_proj", "k": r"self_attn\.k_proj", "v": r"self_attn\.v_proj",
              "o": r"self_attn\.o_proj", "ffn_in": r"mlp\.(gate|up)_proj", "ffn_out": r"mlp\.down_proj"},
}


def model_family(model: nn.Module) -> str:
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "model_type"):
            return str(cfg.model_type)
    return "bert"


def add_text_experts(model: nn.Module, targets, make_layer) -> list[nn.Module]:
    """Wraps every Linear of `model` whose name ends with one of the chosen targets' patterns with
    `make_layer(linear)`; returns the new layers in model order."""
    table = TEXT_TARGETS.get(model_family(model), _BERT)
    pattern = re.compile(r"(^|\.)(" + "|".join(table[t] for t in targets) + r")$")
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.search(name)]
    if not found:
        raise ConfigError(f"mora: strategy.targets {list(targets)} match no Linear of the text backbone "
                          f"(family {model_family(model)!r}): add its layer names to TEXT_TARGETS in "
                          "strategies/mora_text.py")
    layers = []
    for name, lin in found:
        parent_name, _, child = name.rpartition(".")
        layer = make_layer(lin)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        layers.append(layer)
    return layers
