"""SparseLinear under torch.compile and torch.export: one operator node per layer (no graph breaks), same outputs."""

import copy
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from test_runtime_training import TiedAttentionModel
from torch import nn

from sparsearch.kernels.format import PanelCSRMatrix
from sparsearch.kernels.modules import SparseLinear
from sparsearch.kernels.ops import panel_csr_linear
from sparsearch.runtime import for_training

# TorchInductor compiles the graph's C++ on this machine (torch.export needs no compiler)
needs_cxx = pytest.mark.skipif(not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")),
                               reason="torch.compile's CPU backend needs a C++ compiler (g++, c++ or $CXX)")


def attention_model_with_sparse_mlp() -> tuple[nn.Module, nn.Module]:
    """(the masked model, a copy whose MLP is one float32 and one int8 SparseLinear)."""
    torch.manual_seed(0)
    model = TiedAttentionModel().eval()
    with torch.no_grad():
        for layer in model.mlp[0], model.mlp[2]:
            layer.weight.mul_(torch.rand(layer.weight.shape) < 0.1)
    sparse = copy.deepcopy(model)
    sparse.mlp[0] = SparseLinear(PanelCSRMatrix.from_dense(model.mlp[0].weight), model.mlp[0].bias)
    sparse.mlp[2] = SparseLinear(PanelCSRMatrix.from_dense(model.mlp[2].weight).quantize(), model.mlp[2].bias)
    return model, sparse


@pytest.mark.parametrize(("activation_bits", "code"), [(8, 8), (16, 16), ("auto", 0)])
def test_an_exported_int8_layer_keeps_its_activation_bits(activation_bits, code):
    """activation_bits is an argument of the operator ("auto" as 0): an exported one-row call computes as the eager
    layer does."""
    torch.manual_seed(0)
    weight = torch.randn(64, 300) * (torch.rand(64, 300) < 0.1)
    layer = SparseLinear(PanelCSRMatrix.from_dense(weight).quantize(activation_bits=activation_bits))
    x = torch.randn(1, 300)
    with torch.no_grad():
        exported = torch.export.export(layer, (x,))
        nodes = [node for node in exported.graph.nodes if node.target is torch.ops.sparsearch.panel_csr_linear.default]
        # the 14th argument; left out of the graph where it is the schema's default (16)
        assert [node.args[13] if len(node.args) > 13 else 16 for node in nodes] == [code]
        torch.testing.assert_close(exported.module()(x), layer(x), rtol=0, atol=0)


@needs_cxx
def test_a_compiled_model_is_one_graph_and_computes_what_eager_does():
    """fullgraph=True fails on any graph break; before the operator, each layer broke the graph 5 to 10 times.
    One token (the batch-1 kernels, int8 bitmap included) and a batch of sequences, with dynamic shapes."""
    model, sparse = attention_model_with_sparse_mlp()
    compiled = torch.compile(sparse, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for shape in ((1, 1), (3, 9), (2, 5)):
            tokens = torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(sum(shape)))
            expected = sparse(tokens)
            torch.testing.assert_close(compiled(tokens), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(expected, model(tokens), rtol=0, atol=0.05)  # int8 layer: close, not equal


def test_an_exported_program_holds_one_operator_per_layer():
    _, sparse = attention_model_with_sparse_mlp()
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        exported = torch.export.export(sparse, (tokens,))
        nodes = [node for node in exported.graph.nodes if node.target is torch.ops.sparsearch.panel_csr_linear.default]
        assert len(nodes) == 2
        torch.testing.assert_close(exported.module()(tokens), sparse(tokens), rtol=1e-5, atol=1e-5)


@needs_cxx
def test_compiled_training_falls_back_to_the_autograd_function_and_matches_eager():
    """The operator is inference-only; with gradients wanted the layer runs its autograd Function (a graph break,
    not an error), so a compiled training step gives eager's gradients."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():
        for layer in model[0], model[2]:
            layer.weight.mul_(torch.rand(layer.weight.shape) < 0.2)
    eager, _ = for_training(model)
    compiled_twin = copy.deepcopy(eager)
    compiled = torch.compile(compiled_twin)
    x, target = torch.randn(16, 32), torch.randint(0, 8, (16,))
    for net in (eager, compiled):
        F.cross_entropy(net(x), target).backward()
    for name in ("0.values", "2.values", "0.bias"):
        torch.testing.assert_close(compiled_twin.get_parameter(name).grad, eager.get_parameter(name).grad,
                                   rtol=1e-5, atol=1e-6)


def test_the_operator_refuses_inputs_that_want_gradients():
    """It has no autograd formula: a call that would need one fails at once instead of losing the gradient."""
    matrix = PanelCSRMatrix.from_dense(torch.randn(4, 8) * (torch.rand(4, 8) < 0.5))
    bias = torch.randn(4, requires_grad=True)

    def call(x, bias=None):
        return panel_csr_linear(x, matrix.values, matrix.col_indices, matrix.segment_nnz, matrix.segment_ptr,
                                matrix.row_nnz_prefix, None, None, None, bias, 4, 8, matrix.panel_width)

    for x, given_bias in ((torch.randn(2, 8, requires_grad=True), None), (torch.randn(2, 8), bias)):
        with pytest.raises(RuntimeError, match="has no gradient"):
            call(x, given_bias)
        with torch.no_grad():
            assert call(x, given_bias).shape == (2, 4)


def test_the_operator_refuses_values_of_another_dtype():
    matrix = PanelCSRMatrix.from_dense(torch.randn(4, 8) * (torch.rand(4, 8) < 0.5))
    with pytest.raises(TypeError, match=r"torch\.float32 values here, got torch\.float64"):
        panel_csr_linear(torch.randn(2, 8), matrix.values.double(), matrix.col_indices, matrix.segment_nnz,
                         matrix.segment_ptr, matrix.row_nnz_prefix, None, None, None, None, 4, 8, matrix.panel_width)


def test_the_operator_refuses_arrays_that_do_not_fit_together():
    weight = torch.randn(4, 8) * (torch.rand(4, 8, generator=torch.Generator().manual_seed(0)) < 0.5)
    matrix = PanelCSRMatrix.from_dense(weight)
    arrays = dict(values=matrix.values, col_indices=matrix.col_indices, segment_nnz=matrix.segment_nnz,
                  segment_ptr=matrix.segment_ptr, row_nnz_prefix=matrix.row_nnz_prefix)
    x = torch.randn(2, 8)

    def call(**changes):
        given = {**arrays, **changes}
        return panel_csr_linear(x, given["values"], given["col_indices"], given["segment_nnz"], given["segment_ptr"],
                                given["row_nnz_prefix"], None, None, None, None, 4, 8, matrix.panel_width)

    torch.testing.assert_close(call(), x @ weight.t(), rtol=1e-5, atol=1e-5)  # the arrays as built
    with pytest.raises(ValueError, match=r"col_indices: torch\.int64"):
        call(col_indices=matrix.col_indices.to(torch.int64))
    with pytest.raises(ValueError, match="segment_ptr ends at"):
        call(values=matrix.values[:-1].contiguous(), col_indices=matrix.col_indices[:-1].contiguous())
    with pytest.raises(ValueError, match="row_nnz_prefix"):
        call(row_nnz_prefix=matrix.row_nnz_prefix[:-1])
