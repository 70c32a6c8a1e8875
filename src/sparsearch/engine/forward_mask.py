"""Forward-only masking: keep dense weights in the parameters and compute with a masked copy.

SR-STE and progressive gradient flow train dense weights while the forward pass uses ``W * m`` (or
``W * (m + (1 - m) * beta)``). Reparametrisation (``torch.nn.utils.parametrize``) would rename the
state-dict keys (``weight`` -> ``parametrizations.weight.original``); instead each masked Linear/Conv module
gets an instance-level ``forward`` that calls the layer's own functional form with the effective weight.
``model.state_dict()`` keys stay unchanged and hold the *dense* weights while training; ``bake()`` (run
automatically after step ``total_steps`` when that is set) zeros the masked weights, so the trained weights are
truly sparse, and ``finalize()`` bakes and restores the modules' own forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparsearch.engine.sparsifier import SPARSIFIABLE_MODULES, Sparsifier


class DenseWeightSparsifier(Sparsifier):
    """Base for algorithms that mask only the forward pass; override ``forward_weight``."""

    masks_weights = False
    #: when set, the mask is baked into the weights right after this optimizer step (the end of training)
    total_steps: int | None = None

    def forward_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The weight the forward pass uses for parameter ``name`` (default: hard mask, straight-through)."""
        mask = self.masks[name]
        return weight + (weight * mask - weight).detach()

    def on_attach(self) -> None:
        for name, (module, leaf) in self._owners.items():
            if leaf != "weight" or not isinstance(module, SPARSIFIABLE_MODULES):
                raise ValueError(
                    f"{type(self).__name__} masks the forward pass of Linear/Conv weights only; {name!r} is the "
                    f"{leaf!r} of a {type(module).__name__}"
                )
            module.forward = self._masked_forward(name, module)

    def _masked_forward(self, name: str, module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        if isinstance(module, nn.Linear):

            def forward(inputs: torch.Tensor) -> torch.Tensor:
                return F.linear(inputs, self.forward_weight(name, module.weight), module.bias)

        else:

            def forward(inputs: torch.Tensor) -> torch.Tensor:
                return module._conv_forward(inputs, self.forward_weight(name, module.weight), module.bias)

        return forward

    def _post_step_hook(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        super()._post_step_hook(optimizer, args, kwargs)
        if self.total_steps is not None and self.step == self.total_steps:
            self.bake()

    @torch.no_grad()
    def bake(self) -> None:
        """Zero the dense weights where the current mask is zero (the saved weights become sparse)."""
        for name, mask in self.masks.items():
            self.params[name].mul_(mask)

    def detach(self) -> None:
        for module, _ in self._owners.values():
            module.__dict__.pop("forward", None)
        super().detach()
