"""Shared fixtures: one torch thread for small models, and the one-shot tests' tiny GPT-2 and BERT."""

import pytest
import torch
from oneshot_support import make_tiny_bert, make_tiny_gpt2, stdlib_texts


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small models on a shared 2-core machine: one intra-op thread avoids oversubscription (10x slower).

    Use it per module: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kernel_moves(monkeypatch):
    """The layers (sorted names) of every move onto the sparse kernels (`on_kernels`) during the test, from the
    training loop and from the search's short training alike."""
    import sparsearch.search.methods as methods
    from sparsearch.training import loop

    moves: list[list[str]] = []
    original = loop.on_kernels

    def recording(model, layers, *args):
        moves.append(sorted(layers))
        return original(model, layers, *args)

    monkeypatch.setattr(loop, "on_kernels", recording)
    monkeypatch.setattr(methods, "on_kernels", recording)
    return moves


@pytest.fixture(scope="module")
def texts():
    return stdlib_texts()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, texts):
    return make_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), texts)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, texts):
    return make_tiny_bert(tmp_path_factory.mktemp("bert"), texts)
