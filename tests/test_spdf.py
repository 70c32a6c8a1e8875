"""SPDF: sparse while pre-training (embeddings and tied head dense), every weight trains once fine-tuning starts."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import sparsearch as sa

GPT2_MATMULS = r"\.(c_attn|c_proj|c_fc)\.weight$"


def _gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config)


def _steps(model, optimizer, n):
    generator = torch.Generator().manual_seed(1)
    for _ in range(n):
        batch = torch.randint(0, 50, (4, 16), generator=generator)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_pretraining_is_sparse_and_fine_tuning_revives_the_pruned_weights():
    model = _gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    spdf = sa.SPDF(0.75, include=GPT2_MATMULS, seed=0)
    sparsifier = spdf.pretrain(model, optimizer)
    masks = {name: mask.clone() for name, mask in sparsifier.masks.items()}
    assert len(masks) == 8 and all(".h." in name for name in masks)
    _steps(model, optimizer, 5)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert not params[name].detach()[~mask].any()
        assert abs(1 - mask.float().mean().item() - 0.75) < 0.01
    assert bool((model.transformer.wte.weight != 0).all())  # the (tied) embedding stays dense
    spdf.finetune()
    _steps(model, optimizer, 5)
    for name, mask in masks.items():
        revived = (params[name].detach()[~mask] != 0).float().mean().item()
        assert revived > 0.9, name  # the pruned positions now train


def test_phases_must_come_in_order():
    spdf = sa.SPDF(0.5, include=GPT2_MATMULS)
    with pytest.raises(RuntimeError, match="needs a pre-trained model first"):
        spdf.finetune()
    spdf.pretrain(_gpt2())
    with pytest.raises(RuntimeError, match="already called"):
        spdf.pretrain(_gpt2())
