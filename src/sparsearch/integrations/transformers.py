"""A ``transformers.TrainerCallback`` that trains any sparsifier inside ``transformers.Trainer``.

trainer = Trainer(model, args, train_dataset=data,
                  callbacks=[SparsifierCallback(lambda total: sa.RigL(0.9, total_steps=total))])
trainer.train()                                   # checkpoints hold the sparsifier's state
trainer.train(resume_from_checkpoint=True)        # masks, step and random state restored
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from sparsearch.engine.sparsifier import Sparsifier
from sparsearch.integrations import STATE_FILE, SparsifierSpec, make_sparsifier, unwrap_optimizer
from sparsearch.io import read_sparsifier_state, save_sparsifier_state

CHECKPOINT_PREFIX = "checkpoint"  # transformers' own folder name: <output_dir>/checkpoint-<global_step>


class SparsifierCallback(TrainerCallback):
    """Attach ``sparsifier`` (or ``factory(max_steps)``) when training starts; save and restore its state with
    the trainer's checkpoints. ``max_steps`` counts optimizer steps, so with ``gradient_accumulation_steps``
    the schedule is in accumulated steps."""

    def __init__(self, sparsifier: SparsifierSpec) -> None:
        self.spec = sparsifier
        self.sparsifier: Sparsifier | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = kwargs["model"], kwargs.get("optimizer")
        if optimizer is None:
            raise RuntimeError("the Trainer passed no optimizer to on_train_begin; cannot attach the sparsifier")
        if self.sparsifier is not None:
            self.sparsifier.detach()  # a second train() call on the same trainer
        self.sparsifier = make_sparsifier(self.spec, state.max_steps)
        resumed = None
        if state.global_step > 0:
            path = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{state.global_step}" / STATE_FILE
            if not path.is_file():
                raise FileNotFoundError(
                    f"resuming at step {state.global_step}, but the checkpoint has no sparsifier state {str(path)!r}"
                )
            resumed = read_sparsifier_state(path, self.sparsifier)
        self.sparsifier.attach(model, unwrap_optimizer(optimizer), state=resumed)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.sparsifier is not None:
            folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{state.global_step}"
            save_sparsifier_state(self.sparsifier, folder / STATE_FILE)
