"""QuickSelection: the strongest inputs of a SET-trained denoising autoencoder are the informative ones."""

from __future__ import annotations

import pytest
import torch

import sparsearch as sa
from sparsearch.algorithms.quickselection import er_sparsity


def _structured_and_constant(n=1000, seed=0):
    """Columns 0-9 and 20-29 constant, columns 10-19 ten correlated mixtures of 4 latent factors."""
    generator = torch.Generator().manual_seed(seed)
    signal = torch.randn(n, 4, generator=generator) @ torch.randn(4, 10, generator=generator)
    constant = torch.full((n, 10), 3.0)
    return torch.cat([constant, signal, constant - 1], dim=1)


def test_informative_features_are_selected_over_constant_ones():
    torch.set_num_threads(1)
    x = _structured_and_constant(n=2000)
    selection = sa.quickselection(x, hidden=100, epochs=10, seed=0)
    assert sorted(selection.top(10).tolist()) == list(range(10, 20))
    constant = torch.cat([torch.arange(10), torch.arange(20, 30)])
    assert selection.strength[10:20].min() > selection.strength[constant].max()
    assert selection.train_flops > 0 and selection.seconds > 0


def test_the_autoencoder_is_sparse_with_set_er_density():
    assert er_sparsity(784, 1000, 13) == pytest.approx(1 - 13 * 1784 / 784000)
    assert er_sparsity(10, 10, 13) == 0.0  # too small to be sparse: dense


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 31}, "k=31 features cannot be selected from 30; use 1 <= k <= 30"),
        ({"k": 0}, "k=0 features cannot be selected from 30"),
        ({"noise": 1.5}, "noise must be in [0, 1)"),
        ({"hidden": 0}, "hidden (0)"),
    ],
)
def test_bad_settings_are_refused_before_training(kwargs, message):
    with pytest.raises(ValueError) as error:
        sa.quickselection(_structured_and_constant(n=20), **kwargs)
    assert message in str(error.value)


def test_a_matrix_without_samples_is_refused():
    with pytest.raises(ValueError, match=r"at least 2 samples, got \(1, 5\)"):
        sa.quickselection(torch.zeros(1, 5))
