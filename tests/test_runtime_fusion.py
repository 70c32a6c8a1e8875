"""Activations computed by the sparse layer before them (sparse_linear(activation=), SparseLinear, convert's fusion
and the sparse file): the same numbers as the separate activation, on every path, and never applied twice."""

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from runtime_support import sparsify
from torch import nn

from sparsearch.kernels.format import PanelCSRMatrix
from sparsearch.kernels.modules import FusedActivation, SparseLinear
from sparsearch.runtime import convert_with_report, load_sparse, read_sparse_file, save_sparse, sparse_linear, to_int8
from sparsearch.runtime.storage import write_sparse_file

REFERENCE = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda y: F.gelu(y, approximate="tanh")}
FORCE = {"batch_sizes": (4,), "min_speedup": 1e-9, "repeats": 1}


def sparse_weight(rows=300, cols=200, density=0.2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=generator) * (torch.rand(rows, cols, generator=generator) < density)


@pytest.mark.parametrize("backend", ["c", "numba"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
def test_sparse_linear_applies_the_activation_as_pytorch_does(backend, activation):
    """One row (the batch-1 kernels), partial and whole batch tiles, several tiles, a strided input (another path)."""
    weight, bias = sparse_weight(), torch.randn(300)
    matrix = PanelCSRMatrix.from_dense(weight)
    for rows in (1, 5, 33, 130):
        x = torch.randn(rows, 200) * 3
        expected = REFERENCE[activation](F.linear(x, weight, bias))
        got = sparse_linear(x, matrix, bias, backend=backend, activation=activation)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=3e-5)
    strided = torch.randn(200, 7).t()
    torch.testing.assert_close(sparse_linear(strided, matrix, bias, backend=backend, activation=activation),
                               REFERENCE[activation](F.linear(strided, weight, bias)), rtol=1e-5, atol=3e-5)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_the_kernels_gelu_is_as_close_to_float64_as_pytorchs(activation):
    """The activation alone (an identity matrix) over [-12, 12], rows of 1, 7 and 40: within 1e-6 of the float64
    GELU, as PyTorch's own float32 GELU is."""
    matrix = PanelCSRMatrix.from_dense(torch.eye(64))
    x = torch.linspace(-12, 12, 64 * 500).reshape(-1, 64)
    exact = REFERENCE[activation](x.double()).float()
    for rows in (1, 7, 40):
        got = torch.cat([sparse_linear(chunk, matrix, activation=activation) for chunk in x.split(rows)])
        assert float((got - exact).abs().max()) <= 1e-6
    assert float((REFERENCE[activation](x) - exact).abs().max()) <= 1e-6


def test_int8_layers_apply_it_too_and_bad_activations_are_refused():
    weight = sparse_weight()
    int8 = PanelCSRMatrix.from_dense(weight).quantize()
    for rows in (1, 9):
        x = torch.randn(rows, 200)
        torch.testing.assert_close(sparse_linear(x, int8, activation="gelu"), F.gelu(sparse_linear(x, int8)),
                                   rtol=1e-5, atol=1e-5)
    for bad in ("silu", "GELU", 2):
        with pytest.raises(ValueError, match=r"activation must be one of \(None, 'relu', 'gelu', 'gelu_tanh'\)"):
            sparse_linear(torch.randn(1, 200), int8, activation=bad)
        with pytest.raises(ValueError, match="activation must be one of"):
            SparseLinear(int8, activation=bad)
    with pytest.raises(ValueError, match="fusion_key must be an int, given with an activation"):
        SparseLinear(int8, fusion_key=3)


def test_a_trainable_layer_with_an_activation_has_the_dense_gradients():
    weight, bias = sparse_weight(40, 30, 0.3), torch.randn(40)
    layer = SparseLinear(PanelCSRMatrix.from_dense(weight), bias, trainable=True, activation="gelu")
    dense_weight = weight.clone().requires_grad_(True)
    x = torch.randn(6, 30, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_(True)
    layer(x).square().sum().backward()
    F.gelu(F.linear(x_dense, dense_weight, bias)).square().sum().backward()
    torch.testing.assert_close(x.grad, x_dense.grad, rtol=1e-4, atol=1e-5)
    values_grad = dataclasses.replace(layer.matrix, values=layer.values.grad).to_dense()  # at the non-zeros
    torch.testing.assert_close(values_grad, dense_weight.grad * (weight != 0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="applies 'gelu' itself"):
        layer.to_dense_linear()


class TwoLayerMLP(nn.Module):
    """A model not built from nn.Sequential: a GELU and a ReLU module, each after a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.act, self.down, self.out_act = nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_act(self.down(self.act(self.up(x))))


def test_convert_fuses_each_activation_into_the_layer_before_it(tmp_path):
    model = sparsify(TwoLayerMLP())
    x = torch.randn(4, 32)
    fast, report = convert_with_report(model, x, **FORCE)
    assert isinstance(fast.act, FusedActivation) and isinstance(fast.out_act, FusedActivation)
    assert (fast.up.activation, fast.down.activation) == ("gelu", "relu")
    assert report.fused_activations == ["act (gelu) into up", "out_act (relu) into down"]
    assert "Activations computed by the sparse layer before them" in report.to_markdown()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
        for rows in (1, 9):  # the batch-1 kernels too
            y = torch.randn(rows, 32)
            torch.testing.assert_close(fast(y), model(y), rtol=1e-4, atol=1e-5)
        # anything but its own layer's output gets the original activation: nothing is skipped or applied twice
        h = torch.randn(3, 64)
        torch.testing.assert_close(fast.act(h), F.gelu(h))
        torch.testing.assert_close(fast.act(fast.act(fast.up(x))), F.gelu(F.gelu(model.up(x))), rtol=1e-4, atol=1e-5)
        up = fast.up(x)  # one layer output given to it twice: activated once each time
        torch.testing.assert_close(fast.act(up) + fast.act(up), 2 * F.gelu(model.up(x)), rtol=1e-4, atol=1e-5)
    in_place_copy = copy.deepcopy(model)
    in_place, in_place_report = convert_with_report(in_place_copy, x, inplace=True, **FORCE)
    assert in_place is in_place_copy and isinstance(in_place.act, FusedActivation)
    assert in_place_report.model_timing is not None  # against the original rebuilt unfused from the replaced layers
    with torch.no_grad():
        torch.testing.assert_close(in_place(x), model(x), rtol=1e-4, atol=1e-5)
    unfused, plain = convert_with_report(model, x, fuse_activations=False, **FORCE)
    assert isinstance(unfused.act, nn.GELU) and unfused.up.activation is None and plain.fused_activations == []
    # saved and loaded into a fresh dense instance: fused again, same outputs
    save_sparse(fast, tmp_path / "m.safetensors")
    loaded = load_sparse(tmp_path / "m.safetensors", TwoLayerMLP())
    assert isinstance(loaded.act, FusedActivation) and loaded.up.activation == "gelu"
    assert loaded.up.fusion_key == loaded.act.fusion_key != fast.up.fusion_key
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fast(x), rtol=0, atol=0)
    int8 = to_int8(fast)
    with torch.no_grad():
        torch.testing.assert_close(int8(x), model(x), rtol=0, atol=0.1)


class ResidualUse(nn.Module):
    """The Linear's output is used before the activation as well: fusing would change the residual."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.act = nn.Linear(16, 16), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        return self.act(h) + h


class SharedActivation(nn.Module):
    """One activation module after two layers: no single layer can compute it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.act = nn.Linear(16, 16), nn.Linear(16, 16), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.a(x)) + self.act(self.b(x))


class DropoutBetween(nn.Module):
    """Dropout between the Linear and the activation: the same tensor in eval mode, not in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.dropout, self.act = nn.Linear(16, 16), nn.Dropout(0.5), nn.GELU()
        self.inner, self.inplace = nn.Linear(16, 16), nn.ReLU(inplace=True)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.ReLU(inplace=True))  # returns the Linear's output object

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(x)
        self.inplace(h)  # relies on the in-place update
        return self.act(self.dropout(self.linear(self.block(h))))


def test_an_output_passed_on_by_another_module_is_not_fused_and_an_inplace_relu_is():
    x = torch.randn(4, 16)
    model = sparsify(DropoutBetween())
    fast, report = convert_with_report(model, x, **FORCE)
    assert report.fused_activations == ["inplace (relu) into inner", "block.1 (relu) into block.0"]
    assert isinstance(fast.act, nn.GELU) and fast.linear.activation is None
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_layer_whose_output_is_used_elsewhere_or_a_shared_activation_is_not_fused():
    x = torch.randn(4, 16)
    model = sparsify(ResidualUse())
    fast, report = convert_with_report(model, x, **FORCE)
    assert isinstance(fast.act, nn.GELU) and fast.linear.activation is None and report.fused_activations == []
    assert report.fusion_check.startswith("not fused into the sparse layers before them: with 1 fused the outputs "
                                          "differed from the original's")
    shared = sparsify(SharedActivation())
    fast_shared, report_shared = convert_with_report(shared, x, **FORCE)
    assert isinstance(fast_shared.act, nn.ReLU) and report_shared.fused_activations == []
    assert report_shared.fusion_check == ""
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast_shared(x), shared(x), rtol=1e-4, atol=1e-5)


def test_a_model_reverted_to_dense_keeps_its_activation_modules(monkeypatch):
    """When the whole converted model is slower, every layer goes back to dense and the fusion is undone."""
    import importlib

    from test_runtime_convert_safety import scripted_timings

    convert_module = importlib.import_module("sparsearch.runtime.convert")
    # alone: both layers 2x; the whole model: 0.5x the original
    monkeypatch.setattr(convert_module, "paired_speedup", scripted_timings([2.0, 2.0, 0.5]))
    model = sparsify(TwoLayerMLP())
    x = torch.randn(4, 32)
    fast, report = convert_with_report(model, x, batch_sizes=(4,), repeats=1)
    assert report.sparse_layers == [] and report.fused_activations == []
    assert isinstance(fast.act, nn.GELU) and isinstance(fast.out_act, nn.ReLU) and isinstance(fast.up, nn.Linear)


def test_a_file_whose_fusion_does_not_fit_the_model_is_refused(tmp_path):
    model = sparsify(TwoLayerMLP())
    fast, _ = convert_with_report(model, torch.randn(4, 32), **FORCE)
    path = tmp_path / "m.safetensors"
    save_sparse(fast, path)
    tensors, matrices, entries = read_sparse_file(path)
    assert entries["up"]["activation"] == "gelu" and entries["up"]["fused_activation"] == "act"

    def rewritten(**changes):
        tensors_out = dict(tensors)
        for prefix, matrix in matrices.items():
            for array in ("values", "col_indices", "segment_nnz"):
                tensors_out[f"{prefix}.{array}"] = getattr(matrix, array)
        changed = json.loads(json.dumps(entries))
        changed["up"].update(changes)
        target = tmp_path / f"changed{len(list(tmp_path.iterdir()))}.safetensors"
        write_sparse_file(tensors_out, changed, target)
        return target

    with pytest.raises(ValueError, match=r"computes 'gelu' for the module 'out_act', but the model's ReLU there "
                                         r"computes 'relu'"):
        load_sparse(rewritten(fused_activation="out_act"), TwoLayerMLP())
    with pytest.raises(ValueError, match="computes the activation module 'missing', which the model lacks"):
        load_sparse(rewritten(fused_activation="missing"), TwoLayerMLP())
    with pytest.raises(ValueError, match=r"sparse entry 'up' is invalid: activation='swish'"):
        load_sparse(rewritten(activation="swish"), TwoLayerMLP())
    with pytest.raises(ValueError, match=r"sparse entry 'up' is invalid: activation=None"):
        load_sparse(rewritten(activation=None), TwoLayerMLP())
    # the file itself is untouched by the refusals: it still loads
    with torch.no_grad():
        torch.testing.assert_close(load_sparse(path, TwoLayerMLP())(torch.ones(2, 32)), fast(torch.ones(2, 32)))


def test_a_traced_fused_model_applies_each_activation_once():
    """torch.export (as torch.compile) traces the layer as its operator: the activation is then a node of its own,
    applied once, not skipped."""
    model = sparsify(TwoLayerMLP())
    x = torch.randn(4, 32)
    fast, _ = convert_with_report(model, x, **FORCE)
    with torch.no_grad():
        exported = torch.export.export(fast, (x,))
        targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
        assert targets.count(torch.ops.aten.gelu.default) == 1 and targets.count(torch.ops.aten.relu.default) == 1
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-4, atol=1e-5)


def test_bert_feed_forward_gelu_is_fused_and_survives_save_and_load(tmp_path):
    pytest.importorskip("transformers")
    from test_runtime_transformers import tiny_bert

    from sparsearch.runtime.hf import convert_transformers, load_transformers, save_transformers

    model = tiny_bert()
    fast, _, report = convert_transformers(model, **FORCE)
    assert report.fused_activations == [f"encoder.layer.{i}.intermediate.intermediate_act_fn (gelu) into "
                                        f"encoder.layer.{i}.intermediate.dense" for i in (0, 1)]
    save_transformers(fast, tmp_path / "out", report=report)
    loaded, _ = load_transformers(tmp_path / "out")
    assert isinstance(loaded.encoder.layer[1].intermediate.intermediate_act_fn, FusedActivation)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(fast(input_ids=ids).last_hidden_state, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, expected, rtol=1e-4, atol=1e-4)


def test_a_model_not_ours_with_attention_batchnorm_and_a_tied_head_fuses_its_mlp():
    from test_runtime_training import TiedAttentionModel

    torch.manual_seed(0)
    model = TiedAttentionModel().eval()
    with torch.no_grad():
        for layer in model.mlp[0], model.mlp[2]:
            layer.weight.mul_(torch.rand(layer.weight.shape) < 0.1)
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    fast, report = convert_with_report(model, tokens, **FORCE)
    assert report.fused_activations == ["mlp.1 (gelu) into mlp.0"]
    assert isinstance(fast.mlp[1], FusedActivation) and fast.head.weight is fast.embed.weight
    with torch.no_grad():
        for shape in ((1, 1), (3, 9)):
            x = torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(sum(shape)))
            torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
