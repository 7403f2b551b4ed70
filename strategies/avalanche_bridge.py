"""Avalanche's classic strategies (`strategy=avalanche/<name>`) running inside clbench's stream.

clbench keeps the stream, class order, evaluation, result file and cost columns; Avalanche keeps its own training
loop, optimiser and plugins (replay buffers, regularisers, GEM's QP, iCaRL's herding and NCM classifier). Per
experience:

    exp  ->  an Avalanche experience (same samples, global labels, x float in [0, 1] at the backbone's size)
    avalanche_strategy.train(that experience)        # Avalanche's epochs, mini-batches and plugins
    predict(x) = the Avalanche model in eval mode     # logits over all info.n_classes global ids

Avalanche's loop gets the trainer's optimisation settings (`OPTIM_FIELDS`: epochs, batch sizes, optimizer, lr,
momentum, weight decay) from `trainer_cfg`, handed over before `setup`; the strategy configs hold only Avalanche's
own hyperparameters (and the shared `train:` block the trainer reads, configs/strategy/avalanche/_base.yaml).

The model Avalanche trains is the clbench backbone plus a linear head over all `n_classes` (Avalanche's examples
use a fixed-size head as well); iCaRL gets the same pieces as its `feature_extractor` and `classifier`.
Avalanche is imported only here and only when a strategy is built (`pip install -e .[avalanche]`).

Known departures: Avalanche's internal state (buffers, importances) is not part of `state_dict`, so a resumed run
restarts it empty; `trainer.limit_train_batches` does not reach Avalanche's loop (Avalanche trains full epochs).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cl.engine.errors import ConfigError, MissingExtraError
from cl.engine.interop import avalanche_dataset, describe_benchmark
from cl.engine.strategy import Strategy


def import_avalanche():
    """Avalanche's modules, or a one-line error naming the extra to install."""
    try:
        import avalanche.training.supervised as supervised  # noqa: F401
    except ImportError as e:  # pragma: no cover - the extra is installed in CI
        raise MissingExtraError(f"strategy avalanche/* needs avalanche-lib ({e}): pip install -e .[avalanche]") from e
    return supervised


def _net_class():
    """`_Net` with Avalanche's `BaseModel` mixed in when Avalanche is importable (LFL requires it)."""
    from avalanche.models import BaseModel

    class AvalancheNet(_Net, BaseModel):
        def get_features(self, x: torch.Tensor) -> torch.Tensor:
            return self.backbone(x)

    return AvalancheNet


class _Net(nn.Module):
    """backbone + linear head: the nn.Module Avalanche optimises."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# The trainer's settings Avalanche's own loop runs with (read from `trainer_cfg`, never from the strategy config).
OPTIM_FIELDS = ("epochs", "batch_size", "eval_batch_size", "optimizer", "lr", "momentum", "weight_decay")


class AvalancheStrategy(Strategy):
    """Base of the bridge: subclasses name the Avalanche class and its hyperparameters."""

    supports = ("class_il", "task_il", "domain_il")
    uses_sgd = False
    avalanche_class = "Naive"
    # config field -> Avalanche keyword
    strategy_fields: tuple[str, ...] = ()

    def __init__(self, **hparams: Any):
        missing = [f for f in self.strategy_fields if f not in hparams]
        unknown = [k for k in hparams if k not in self.strategy_fields]
        if unknown:
            trainer = f" (the trainer's: set trainer.{unknown[0]})" if unknown[0] in OPTIM_FIELDS else ""
            raise ConfigError(f"strategy {self.name} has no field {unknown[0]!r}{trainer}: its fields are "
                              f"{', '.join(self.strategy_fields) or 'none'}")
        if missing:
            raise ConfigError(f"strategy {self.name} needs {missing[0]!r}: set it in configs/strategy/{self.name}.yaml")
        super().__init__(**hparams)
        self.av = None  # the Avalanche strategy, built on the first experience (it needs the device)

    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        # What Avalanche's loop will run with, recorded beside the strategy's own values (result: strategy_info).
        self.hparams.update({k: getattr(self.trainer_cfg, k) for k in OPTIM_FIELDS})
        import_avalanche()  # here, so that its import time is not counted as the first experience's training time
        self.head = nn.Linear(backbone.feature_dim, info.n_classes)
        self.net = _net_class()(backbone, self.head)

    # --- building the Avalanche strategy ---------------------------------------------------------
    def make_optimizer(self, params) -> torch.optim.Optimizer:
        h = self.hparams
        if h["optimizer"] in ("adam", "adamw"):
            cls = torch.optim.Adam if h["optimizer"] == "adam" else torch.optim.AdamW
            return cls(params, lr=h["lr"], weight_decay=h["weight_decay"])
        return torch.optim.SGD(params, lr=h["lr"], momentum=h["momentum"], weight_decay=h["weight_decay"])

    def template_kwargs(self) -> dict:
        return {k: self.hparams[k] for k in self.strategy_fields}

    def build_avalanche(self, device: torch.device):
        supervised = import_avalanche()
        from avalanche.training.plugins import EvaluationPlugin

        h = self.hparams
        cls = getattr(supervised, self.avalanche_class)
        common = dict(train_mb_size=h["batch_size"], train_epochs=h["epochs"], eval_mb_size=h["eval_batch_size"],
                      device=device, evaluator=EvaluationPlugin())  # no loggers: clbench evaluates
        return cls(model=self.net, optimizer=self.make_optimizer(self.net.parameters()),
                   criterion=nn.CrossEntropyLoss(), **common, **self.template_kwargs())

    # --- the trainer's hooks -----------------------------------------------------------------------
    def avalanche_experience(self, exp):
        from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
        from avalanche.benchmarks.scenarios.supervised import with_classes_timeline

        task = exp.task_id if self.info.kind == "task_il" else 0
        data = avalanche_dataset(exp.train, task, self.backbone.input_size, self.backbone.in_chans)
        bench = describe_benchmark(with_classes_timeline(benchmark_from_datasets(train=[data])),
                                   self.info.classes_per_experience)
        av_exp = bench.train_stream[0]
        av_exp.current_experience = exp.index
        av_exp.benchmark = bench  # nc_benchmark's experiences carry it; iCaRL reads it
        return av_exp

    def fit_experience(self, exp, loader, device) -> None:
        if self.av is None:
            self.av = self.build_avalanche(device)
        self.av.train(self.avalanche_experience(exp), num_workers=0)
        self.eval()

    def eval_model(self) -> nn.Module:
        return self.av.model if self.av is not None else self.net

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id=None) -> torch.Tensor:
        model = self.eval_model()
        model.eval()
        return model(x).float()


class AvalancheNaive(AvalancheStrategy):
    name = "avalanche/naive"
    avalanche_class = "Naive"


class AvalancheEWC(AvalancheStrategy):
    name = "avalanche/ewc"
    avalanche_class = "EWC"
    strategy_fields = ("ewc_lambda", "mode", "decay_factor")


class AvalancheSI(AvalancheStrategy):
    name = "avalanche/si"
    avalanche_class = "SynapticIntelligence"
    strategy_fields = ("si_lambda", "eps")


class AvalancheLwF(AvalancheStrategy):
    name = "avalanche/lwf"
    avalanche_class = "LwF"
    strategy_fields = ("alpha", "temperature")


class AvalancheReplay(AvalancheStrategy):
    name = "avalanche/replay"
    avalanche_class = "Replay"
    strategy_fields = ("mem_size",)


class AvalancheGEM(AvalancheStrategy):
    name = "avalanche/gem"
    avalanche_class = "GEM"
    strategy_fields = ("patterns_per_exp", "memory_strength")


class AvalancheAGEM(AvalancheStrategy):
    name = "avalanche/agem"
    avalanche_class = "AGEM"
    strategy_fields = ("patterns_per_exp", "sample_size")


class AvalancheGDumb(AvalancheStrategy):
    name = "avalanche/gdumb"
    avalanche_class = "GDumb"
    strategy_fields = ("mem_size",)


class AvalancheDER(AvalancheStrategy):
    name = "avalanche/der"
    avalanche_class = "DER"
    strategy_fields = ("mem_size", "batch_size_mem", "alpha", "beta")


class AvalancheLFL(AvalancheStrategy):
    name = "avalanche/lfl"
    avalanche_class = "LFL"
    strategy_fields = ("lambda_e",)


class AvalancheICaRL(AvalancheStrategy):
    """iCaRL: Avalanche trains backbone + head with its distillation loss and classifies with class means (NCM)."""

    name = "avalanche/icarl"
    avalanche_class = "ICaRL"
    # Class-incremental by construction: Avalanche's ICaRL grows its class-mean table by each experience's classes,
    # so a domain-incremental stream (the same classes again) gave 40 logits for 10 classes (found by
    # scripts/benchmark.py); run.py now refuses the pair at start instead.
    supports = ("class_il", "task_il")
    strategy_fields = ("memory_size", "fixed_memory")

    def build_avalanche(self, device: torch.device):
        supervised = import_avalanche()
        from avalanche.training.plugins import EvaluationPlugin

        h = self.hparams
        return supervised.ICaRL(
            feature_extractor=self.backbone, classifier=self.head,
            optimizer=self.make_optimizer(self.net.parameters()), memory_size=h["memory_size"],
            buffer_transform=None, fixed_memory=h["fixed_memory"], train_mb_size=h["batch_size"],
            train_epochs=h["epochs"], eval_mb_size=h["eval_batch_size"], device=device,
            evaluator=EvaluationPlugin())
