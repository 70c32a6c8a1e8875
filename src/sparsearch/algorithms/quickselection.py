"""QuickSelection (Atashgahi et al., Machine Learning 2022): unsupervised feature selection with a sparse autoencoder.

A denoising autoencoder with one sigmoid hidden layer (input -> hidden -> input, linear output) is trained with
sparse evolutionary training (SET: Erdős–Rényi sparse layers with density epsilon * (n_in + n_out) /
(n_in * n_out), every epoch the fraction drop_fraction of the weakest connections replaced by random new ones) to
reconstruct each sample from a noisy copy (x + noise * N(0, 1), features standardised first). The strength of
input feature j is the sum of |w| over its connections to the hidden layer; the features with the largest
strength are selected. Informative inputs end up with many strong connections; an input that never varies
gets no gradient, so SET's drops remove its connections over the epochs.

Defaults follow the paper (hidden 1000, epsilon 13, noise 0.2, drop_fraction (the paper's zeta) 0.2, momentum 0.9,
weight decay 2e-4, batch 100) except the budget: the paper trains 100 epochs at learning rate 0.01; the default
here is 10 epochs at 0.05 (with 0.01, 10 epochs left the strengths dominated by the initial weights in our tests).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsearch.algorithms.dynamic import SET


@dataclass(frozen=True)
class FeatureSelection:
    """Feature strengths, the ranking (strongest first) and the cost of finding them."""

    strength: Tensor
    ranking: Tensor
    seconds: float
    train_flops: int

    def top(self, k: int) -> Tensor:
        """Indices of the ``k`` strongest features."""
        check_k(k, self.strength.numel())
        return self.ranking[:k]


def check_k(k: int, n_features: int) -> None:
    """Raise unless 1 <= k <= n_features."""
    if not isinstance(k, int) or not 1 <= k <= n_features:
        raise ValueError(f"k={k!r} features cannot be selected from {n_features}; use 1 <= k <= {n_features}")


def er_sparsity(n_in: int, n_out: int, epsilon: float) -> float:
    """SET's Erdős–Rényi sparsity of an n_in x n_out layer: 1 - epsilon (n_in + n_out) / (n_in n_out), at least 0."""
    return max(0.0, 1.0 - epsilon * (n_in + n_out) / (n_in * n_out))


def quickselection(
    x: Tensor,
    k: int | None = None,
    *,
    hidden: int = 1000,
    epsilon: float = 13.0,
    epochs: int = 10,
    batch_size: int = 100,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 2e-4,
    noise: float = 0.2,
    drop_fraction: float = 0.2,
    seed: int = 0,
) -> FeatureSelection:
    """Rank the features (columns) of ``x`` [samples, features] by QuickSelection; labels are not used.

    ``k``, if given, is only checked against the feature count (ask the result for ``top(k)``).
    """
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"x must be a [samples, features] matrix with at least 2 samples, got {tuple(x.shape)}")
    n_samples, n_features = x.shape
    if k is not None:
        check_k(k, n_features)
    if hidden < 1 or epochs < 1 or batch_size < 1 or epsilon <= 0:
        raise ValueError(
            f"hidden ({hidden}), epochs ({epochs}), batch_size ({batch_size}) and epsilon ({epsilon}) must be positive"
        )
    if not 0 <= noise < 1 or not 0 < drop_fraction < 1:
        raise ValueError(
            f"noise must be in [0, 1) and drop_fraction in (0, 1), got noise={noise}, drop_fraction={drop_fraction}"
        )
    started = time.perf_counter()
    data = x.detach().float()
    scale = data.std(0)
    data = (data - data.mean(0)) / torch.where(scale > 0, scale, torch.ones_like(scale))
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n_features, hidden), nn.Sigmoid(), nn.Linear(hidden, n_features))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = -(-n_samples // batch_size)
    sparsities = {
        "0.weight": er_sparsity(n_features, hidden, epsilon),
        "2.weight": er_sparsity(hidden, n_features, epsilon),
    }
    sparsifier = SET(
        update_every=steps_per_epoch, drop_fraction=drop_fraction, distribution=sparsities, seed=seed
    ).attach(model, optimizer)
    kept = sum(int(mask.sum()) for mask in sparsifier.masks.values())
    for _ in range(epochs):
        for rows in torch.randperm(n_samples, generator=generator).split(batch_size):
            clean = data[rows]
            noisy = clean + noise * torch.randn(clean.shape, generator=generator)
            loss = F.mse_loss(model(noisy), clean)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    sparsifier.finalize()
    strength = model[0].weight.detach().abs().sum(0)
    ranking = torch.argsort(strength, descending=True, stable=True)
    # 3 passes (forward, input gradient, weight gradient) of 2 FLOPs per kept weight, per sample seen
    train_flops = 3 * 2 * kept * n_samples * epochs
    return FeatureSelection(strength, ranking, time.perf_counter() - started, train_flops)
