"""Builders shared by the one-shot pruning tests: real text and tiny randomly initialised transformers.

Nothing is downloaded: the text is the docstrings of a few standard-library modules, and the tokenizers are
trained on it in a fraction of a second with ``tokenizers``.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast


def stdlib_texts() -> list[str]:
    """Docstrings of a few standard-library modules and their public members (about 90 KB of English)."""
    texts = []
    for module in (json, argparse, collections, textwrap, inspect):
        texts.append(module.__doc__ or "")
        texts.extend(inspect.getdoc(member) or "" for name, member in vars(module).items() if not name.startswith("_"))
    return [text for text in texts if text.strip()]


def make_tiny_gpt2(directory: Path, texts: list[str], seed: int = 0) -> Path:
    """A 2-block, 64-wide GPT-2 (Conv1D layers) with a byte-level BPE tokenizer, saved to ``directory``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(wrapped), n_positions=64, n_embd=64, n_layer=2, n_head=2,
        bos_token_id=wrapped.eos_token_id, eos_token_id=wrapped.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    wrapped.save_pretrained(directory)
    return directory


def make_tiny_bert(directory: Path, texts: list[str], seed: int = 0) -> Path:
    """A 2-layer, 64-wide BERT encoder with a WordPiece tokenizer adding [CLS]/[SEP], saved to ``directory``."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]"))],
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(wrapped), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(directory)
    wrapped.save_pretrained(directory)
    return directory


@torch.no_grad()
def capture_layer_inputs(model: torch.nn.Module, layer_names: list[str], windows: torch.Tensor) -> dict:
    """Run the whole model on ``windows`` and return each named layer's input as [tokens, in_features]."""
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = [
        modules[name].register_forward_hook(
            lambda _m, inputs, _o, name=name: captured.__setitem__(name, inputs[0].reshape(-1, inputs[0].shape[-1]))
        )
        for name in layer_names
    ]
    try:
        model.eval()
        model(input_ids=windows, attention_mask=torch.ones_like(windows))
    finally:
        for handle in handles:
            handle.remove()
    return captured


def single_torch_thread() -> Iterator[None]:
    """Run with one torch thread: on a shared 2-core machine extra threads make these tiny matmuls crawl."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
