"""Fixtures shared by the one-shot pruning tests: a tiny GPT-2 and BERT trained on standard-library text."""

import pytest
from oneshot_support import make_tiny_bert, make_tiny_gpt2, stdlib_texts


@pytest.fixture(scope="module")
def texts():
    return stdlib_texts()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, texts):
    return make_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), texts)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, texts):
    return make_tiny_bert(tmp_path_factory.mktemp("bert"), texts)
