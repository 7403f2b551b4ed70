"""Fashion-MNIST-C's source model: EfficientNet-Lite0 (ImageNet weights) plus a linear head, fine-tuned once on
the scenario's declared clean source data and cached (the stream: scenarios/datasets/fashion_mnist_c.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from scenarios.datasets.fashion_mnist_c import SOURCE_DEFAULTS, _first_per_class, _upsample


# --- the source classifier --------------------------------------------------------------------------------
class _Classifier(torch.nn.Module):
    """EfficientNet-Lite body (a `Backbone`: normalisation and resize contract included) + a linear head."""

    def __init__(self, body, n_classes: int = 10):
        super().__init__()
        self.body = body
        self.fc = torch.nn.Linear(body.feature_dim, n_classes)

    def forward(self, x):
        return self.fc(self.body(x))


def _source_settings(cfg: Mapping[str, Any]) -> dict:
    src = {**SOURCE_DEFAULTS, **dict(cfg.get("finetune") or {})}
    return {"arch": str(cfg.get("arch", "tf_efficientnet_lite0")), "input_size": int(cfg["input_size"]),
            "normalize": str(cfg.get("normalize", "inception")), **{k: src[k] for k in SOURCE_DEFAULTS}}


def _train_source(settings: Mapping[str, Any], data_root: Path, root: str | None,
                  progress: bool) -> dict[str, torch.Tensor]:
    from tqdm.auto import tqdm

    from cl.models.backbones_efficientnet import build_efficientnet_lite
    from cl.engine.data import to_model_input
    from scenarios.datasets.fashion_mnist import load_fashion_mnist

    body = build_efficientnet_lite({"arch": settings["arch"], "input_size": settings["input_size"],
                                    "normalize": settings["normalize"]})
    model = _Classifier(body)
    data = load_fashion_mnist({"root": root}, data_root)
    idx = _first_per_class(data.train.targets, settings["train_per_class"])
    x = _upsample(data.train.images[idx].numpy())
    y = torch.as_tensor(data.train.targets[idx]).long()
    opt = torch.optim.Adam(model.parameters(), lr=float(settings["lr"]))
    g = torch.Generator().manual_seed(int(settings["seed"]))
    bs = int(settings["batch_size"])
    steps = int(settings["epochs"]) * ((len(y) + bs - 1) // bs)
    bar = tqdm(total=steps, desc="fashion-mnist-c: fine-tuning the EfficientNet-Lite source model once",
               unit="step", disable=not progress, leave=False)
    model.train()
    for _ in range(int(settings["epochs"])):
        for batch in torch.randperm(len(y), generator=g).split(bs):
            if len(batch) < 2:  # BatchNorm needs two samples
                continue
            inp = to_model_input(x[batch], settings["input_size"], 3, torch.device("cpu"))
            loss = F.cross_entropy(model(inp), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update(1)
    bar.close()
    return model.state_dict()


def build_source(cfg: Mapping[str, Any]):
    """Backbone source 'fashion-mnist-c': the fine-tuned EfficientNet-Lite0 classifier, trained once and cached."""
    from cl.models.backbones import Backbone
    from cl.models.backbones_efficientnet import build_efficientnet_lite
    from cl.engine.model_cache import cached_weights, load_weights
    from scenarios.datasets.registry import resolve_data_root

    settings = _source_settings(cfg)
    data_root = resolve_data_root(cfg.get("data_root"))
    cache_dir = Path(str(cfg.get("cache_dir") or data_root / "fashion-mnist-c-cache")).expanduser()
    path, key = cached_weights(cache_dir, "fashion-mnist-c-source", settings,
                               lambda: _train_source(settings, data_root, cfg.get("root"), True),
                               seed=int(settings["seed"]))
    body = build_efficientnet_lite({"arch": settings["arch"], "input_size": settings["input_size"],
                                    "normalize": settings["normalize"]})
    model = _Classifier(body)
    model.load_state_dict(load_weights(path), strict=True)
    # The body is a Backbone that normalises itself: the outer Backbone passes [0, 1] images through unchanged.
    bb = Backbone(model.eval(), name=str(cfg.get("name", "fashion-mnist-c-effnet-lite0")), arch=settings["arch"],
                  feature_dim=10, input_size=settings["input_size"], in_chans=3, normalize="none",
                  weights_id=f"fashion-mnist-c-trained:{key} from {body.weights_id}", pretrained=True)
    bb.is_classifier = True
    return bb
