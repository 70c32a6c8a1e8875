"""A Lightning callback that trains any sparsifier inside ``lightning.pytorch.Trainer``.

trainer = L.Trainer(max_steps=1000, callbacks=[SparsifierCallback(lambda total: sa.RigL(0.9, total_steps=total))])
trainer.fit(module)                               # checkpoints hold the sparsifier's state
trainer.fit(module, ckpt_path="last.ckpt")        # masks, step and random state restored
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from sparsearch.engine.sparsifier import Sparsifier
from sparsearch.integrations import SparsifierSpec, make_sparsifier, unwrap_optimizer


class SparsifierCallback(pl.Callback):
    """Attach ``sparsifier`` (or ``factory(estimated optimizer steps)``) when training starts, to the module
    and its single optimizer; its state travels in Lightning's checkpoints (``state_dict``/``load_state_dict``)
    and is applied on resume. ``accumulate_grad_batches`` is handled: the sparsifier counts optimizer steps."""

    def __init__(self, sparsifier: SparsifierSpec) -> None:
        self.spec = sparsifier
        self.sparsifier: Sparsifier | None = None
        self._resumed: dict[str, Any] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # here the optimizer exists and, on resume, the weights and optimizer state are already restored
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"SparsifierCallback needs exactly one optimizer, the module has {len(trainer.optimizers)}"
            )
        if self.sparsifier is not None:
            self.sparsifier.detach()
        self.sparsifier = make_sparsifier(self.spec, int(trainer.estimated_stepping_batches))
        self.sparsifier.attach(pl_module, unwrap_optimizer(trainer.optimizers[0]), state=self._resumed)
        self._resumed = None

    def state_dict(self) -> dict[str, Any]:
        if self.sparsifier is None or self.sparsifier.model is None:
            return {}
        return {"config": self.sparsifier.config(), **self.sparsifier.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._resumed = {key: value for key, value in state_dict.items() if key != "config"}
