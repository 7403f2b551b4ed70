"""Joint training on everything seen so far: the upper bound.

At experience i the model is reset to its initial weights (backbone as loaded, fresh head) and trained
on the union of the training sets of experiences 0..i, so row i of the accuracy matrix is what i.i.d.
training on the same data gives. `reset: false` keeps training the previous model on the union instead
(the "cumulative" baseline).
"""
from __future__ import annotations


from torch.utils.data import ConcatDataset

from strategies.finetune import Finetune


class Joint(Finetune):
    name = "joint"

    def __init__(self, reset: bool = True, **hparams):
        super().__init__(reset=reset, **hparams)
        self.reset = reset

    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        # Plain tensors on the CPU; not a submodule, so never part of the checkpoint (rebuilt from config).
        self._initial = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()
                         if not k.endswith(("seen_mask", "current_mask", "experiences_seen"))}

    def training_data(self, seen):
        return ConcatDataset([e.train for e in seen])

    def begin_experience(self, exp):
        if self.reset:
            self.load_state_dict(self._initial, strict=False)
        return super().begin_experience(exp)
