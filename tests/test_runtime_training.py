"""Training through the sparse kernels: gradients equal those of the masked dense layer, and training a trainable
`SparseLinear` follows masked dense training step for step."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparsearch.runtime import PanelCSRMatrix, SparseLinear, for_training, sparse_linear, sparse_linear_values_grad

BACKENDS = ["c", "numba"]


def masked_weight(rows: int, cols: int, sparsity: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    return weight * (torch.rand(rows, cols, generator=generator) >= sparsity)


def values_at_pattern(matrix: PanelCSRMatrix, dense: torch.Tensor) -> torch.Tensor:
    """The entries of a dense [rows, cols] tensor at the matrix's non-zeros, in its storage order."""
    positions = PanelCSRMatrix.from_arrays(matrix.shape, matrix.panel_width,
                                           torch.arange(1, matrix.nnz + 1, dtype=torch.float32),
                                           matrix.col_indices, matrix.segment_nnz).to_dense()
    order = positions[positions > 0].to(torch.int64) - 1  # storage index of each non-zero, in row-major order
    picked = torch.empty(matrix.nnz)
    picked[order] = dense[positions > 0]
    return picked


def laid_out(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as a contiguous tensor, rows inside a wider buffer, or the transpose of a contiguous one."""
    if layout == "strided rows":
        wide = torch.zeros(tensor.shape[0], tensor.shape[1] + 5)
        wide[:, 2:2 + tensor.shape[1]] = tensor
        return wide[:, 2:2 + tensor.shape[1]]
    return tensor.t().contiguous().t() if layout == "transposed" else tensor


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), batch=st.integers(0, 140),
       sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]), panel_width=st.sampled_from([None, 1, 7, 64]),
       layout=st.sampled_from(["contiguous", "strided rows", "transposed"]), seed=st.integers(0, 10_000))
def test_values_gradient_and_transposed_product_match_dense(backend, rows, cols, batch, sparsity, panel_width,
                                                            layout, seed):
    weight = masked_weight(rows, cols, sparsity, seed)
    matrix = PanelCSRMatrix.from_dense(weight, panel_width)
    generator = torch.Generator().manual_seed(seed + 1)
    x = laid_out(torch.randn(batch, cols, generator=generator), layout)
    grad_output = laid_out(torch.randn(batch, rows, generator=generator), layout)
    dense_grad = grad_output.t() @ x  # dL/dW of y = x W^T
    torch.testing.assert_close(sparse_linear_values_grad(x, grad_output, matrix, backend=backend),
                               values_at_pattern(matrix, dense_grad), rtol=1e-4, atol=1e-4)
    transposed = matrix.transposed()
    transposed.validate()
    assert torch.equal(transposed.to_dense(), weight.t())
    torch.testing.assert_close(sparse_linear(grad_output, transposed, backend=backend), grad_output @ weight,
                               rtol=1e-4, atol=1e-4)


def test_transposed_follows_values_changed_in_place():
    matrix = PanelCSRMatrix.from_dense(masked_weight(30, 2100, 0.8, 0))  # several panels
    first = matrix.transposed()
    matrix.values.mul_(-2)
    again = matrix.transposed()
    assert again is first  # the structure is derived once
    assert torch.equal(again.to_dense(), matrix.to_dense().t())


@pytest.mark.parametrize("shape", [(5, 53), (2, 70, 53), (1, 53)])
def test_trainable_sparse_linear_gradients_match_masked_dense(shape):
    torch.manual_seed(0)
    dense = nn.Linear(53, 37)
    with torch.no_grad():
        dense.weight.mul_(torch.rand(37, 53) < 0.3)
    layer = SparseLinear.from_linear(dense, trainable=True)
    assert layer.trainable and isinstance(layer.values, nn.Parameter)
    x = torch.randn(*shape, requires_grad=True)
    x_sparse = x.detach().clone().requires_grad_()
    grad_output = torch.randn(*shape[:-1], 37)
    (dense(x) * grad_output).sum().backward()
    (layer(x_sparse) * grad_output).sum().backward()
    torch.testing.assert_close(x_sparse.grad, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.values.grad, values_at_pattern(layer.matrix, dense.weight.grad),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad)


def test_training_follows_masked_dense_training_step_for_step():
    """Adam on a two-layer network, the pattern fixed: the sparse kernels' run and the masked dense run (mask applied
    to the gradients) reach the same weights and losses; the sparse layers keep their pattern."""
    torch.manual_seed(0)
    masks = [torch.rand(256, 1100) < 0.1, torch.rand(10, 256) < 0.5]
    dense = nn.Sequential(nn.Linear(1100, 256), nn.ReLU(), nn.Linear(256, 10))
    with torch.no_grad():
        for layer, mask in zip((dense[0], dense[2]), masks, strict=True):
            layer.weight.mul_(mask)
    sparse = nn.Sequential(SparseLinear.from_linear(dense[0], trainable=True), nn.ReLU(),
                           SparseLinear.from_linear(dense[2], trainable=True))
    pattern = [layer.matrix.col_indices.clone() for layer in (sparse[0], sparse[2])]
    dense_opt = torch.optim.Adam(dense.parameters(), lr=1e-2)
    sparse_opt = torch.optim.Adam(sparse.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(96, 1100, generator=data)
        target = torch.randint(0, 10, (96,), generator=data)
        losses = []
        for model, opt in ((dense, dense_opt), (sparse, sparse_opt)):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), target)
            loss.backward()
            if model is dense:
                for layer, mask in zip((dense[0], dense[2]), masks, strict=True):
                    layer.weight.grad.mul_(mask)
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    layers = zip((dense[0], dense[2]), (sparse[0], sparse[2]), masks, pattern, strict=True)
    for layer, sparse_layer, mask, cols in layers:
        torch.testing.assert_close(sparse_layer.matrix.to_dense(), layer.weight.detach(), rtol=1e-4, atol=1e-5)
        assert torch.equal(sparse_layer.matrix.col_indices, cols)
        assert bool((sparse_layer.matrix.to_dense()[~mask] == 0).all())


def test_inference_layer_passes_gradients_to_its_input_only():
    layer = SparseLinear.from_linear(nn.Linear(20, 8))
    assert not layer.trainable and not layer.values.requires_grad
    x = torch.randn(3, 20, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.matrix.to_dense().sum(0).expand(3, 20))
    assert layer.values.grad is None


def test_training_bad_input_is_refused():
    int8 = PanelCSRMatrix.from_dense(masked_weight(8, 20, 0.5, 0)).quantize()
    with pytest.raises(ValueError, match="int8 SparseLinear cannot be trainable"):
        SparseLinear(int8, trainable=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        SparseLinear(int8)(torch.randn(2, 20, requires_grad=True))
    with pytest.raises(ValueError, match="int8 values have no gradient"):
        sparse_linear_values_grad(torch.randn(2, 20), torch.randn(2, 8), int8)
    with pytest.raises(ValueError, match="cannot be transposed"):
        int8.transposed()
    with pytest.raises(ValueError, match=r"one shape, got \(8, 20\) and \(8, 21\)"):
        PanelCSRMatrix.from_mask(torch.randn(8, 20), torch.ones(8, 21, dtype=torch.bool))
    matrix = PanelCSRMatrix.from_dense(masked_weight(8, 20, 0.5, 0))
    with pytest.raises(ValueError, match="leading shape"):
        sparse_linear_values_grad(torch.randn(2, 20), torch.randn(3, 8), matrix)
    layer = SparseLinear(matrix, trainable=True)
    layer.values.data = layer.values.data.clone()  # replaced, not updated in place: the kernels would not see it
    with pytest.raises(RuntimeError, match="in place"):
        layer(torch.randn(2, 20))
    with torch.no_grad(), pytest.raises(RuntimeError, match="in place"):  # inference too: no stale outputs
        layer(torch.randn(2, 20))
    with pytest.raises(RuntimeError, match=r"\.double\(\)"):
        SparseLinear(PanelCSRMatrix.from_dense(masked_weight(8, 20, 0.5, 0))).double()(torch.randn(2, 20))


class TiedAttentionModel(nn.Module):
    """Not one of ours: a head tied to the embedding, nn.MultiheadAttention, a residual MLP with BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
        self.norm = nn.BatchNorm1d(64)
        self.head = nn.Linear(64, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = h + self.mlp(h)
        return self.head(self.norm(h.transpose(1, 2)).transpose(1, 2))


def test_for_training_trains_a_model_not_ours_like_its_masked_dense_twin():
    torch.manual_seed(0)
    model = TiedAttentionModel()
    masks = {}
    with torch.no_grad():
        for name in ("mlp.0", "mlp.2", "attn.out_proj"):
            layer = model.get_submodule(name)
            masks[name] = torch.rand(layer.weight.shape) < 0.2
            layer.weight.mul_(masks[name])
    trainable, report = for_training(model)
    kept = {d.name: d for d in report.layers}
    assert isinstance(trainable.mlp[0], SparseLinear) and isinstance(trainable.mlp[2], SparseLinear)
    assert not kept["head"].sparse and "tied" in kept["head"].reason
    assert not kept["attn.out_proj"].sparse and "MultiheadAttention" in kept["attn.out_proj"].reason
    assert trainable.head.weight is trainable.embed.weight  # the tie holds in the copy
    assert isinstance(model.mlp[0], nn.Linear)  # the original is untouched
    dense_opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparse_opt = torch.optim.SGD(trainable.parameters(), lr=0.1, momentum=0.9)
    data = torch.Generator().manual_seed(1)
    for _ in range(4):
        tokens = torch.randint(0, 50, (8, 12), generator=data)
        losses = []
        for net, opt in ((model, dense_opt), (trainable, sparse_opt)):
            opt.zero_grad()
            loss = F.cross_entropy(net(tokens).reshape(-1, 50), tokens.roll(1, 1).reshape(-1))
            loss.backward()
            if net is model:
                for name in ("mlp.0", "mlp.2"):
                    model.get_submodule(name).weight.grad.mul_(masks[name])
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    torch.testing.assert_close(trainable.mlp[2].matrix.to_dense(), model.mlp[2].weight.detach(), rtol=1e-4,
                               atol=1e-5)


def test_for_training_refuses_bad_arguments():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        for_training("model")
    with pytest.raises(ValueError, match="max_density"):
        for_training(nn.Linear(3, 3), max_density=1.5)
    _, report = for_training(nn.Sequential(nn.Linear(8, 8)))  # no zeros: stays dense, and says why
    assert not report.layers[0].sparse and "max_density" in report.layers[0].reason


def test_a_bare_layer_is_returned_as_its_replacement():
    """A bare nn.Linear used to be reported sparse by convert and returned unchanged (it has no parent to be
    replaced in); convert and for_training now return the replacement, named "" in the report."""
    from sparsearch.runtime import convert_with_report

    layer = nn.Linear(512, 512)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(512, 512) < 0.05)
    trainable, report = for_training(layer)
    assert isinstance(trainable, SparseLinear) and trainable.trainable and report.sparse_layers == [""]
    x = torch.randn(3, 512)
    converted, report = convert_with_report(layer, x, batch_sizes=(3,), min_speedup=1e-9, repeats=1)
    assert isinstance(converted, SparseLinear) and report.sparse_layers == [""]
    torch.testing.assert_close(converted(x), layer(x).detach(), rtol=1e-4, atol=1e-5)
    assert isinstance(layer, nn.Linear)  # the original stays as it was


def test_a_trained_model_saves_and_loads_for_inference_and_for_more_training(tmp_path):
    """After training on the kernels: `save_sparse` writes the non-zeros (the trained values), `load_sparse` gives an
    inference model computing the same; `state_dict` round-trips into another `for_training` copy (in place, so
    the kernels read the loaded values)."""
    from sparsearch.runtime import load_sparse, save_sparse

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(200, 300) < 0.1)
    trainable, _ = for_training(model)
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        trainable(torch.randn(16, 300)).square().mean().backward()
        optimizer.step()
    x = torch.randn(4, 300)
    expected = trainable(x).detach()
    save_sparse(trainable, tmp_path / "trained.safetensors")
    loaded = load_sparse(tmp_path / "trained.safetensors", nn.Sequential(nn.Linear(300, 200), nn.ReLU(),
                                                                        nn.Linear(200, 10)))
    assert isinstance(loaded[0], SparseLinear) and not loaded[0].trainable
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)
    again, _ = for_training(model)  # the untrained weights, same pattern
    again.load_state_dict(trainable.state_dict())
    torch.testing.assert_close(again(x).detach(), expected, rtol=1e-5, atol=1e-6)


def test_from_mask_keeps_kept_weights_that_are_exactly_zero():
    weight = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 4.0]])
    mask = torch.tensor([[True, True, False], [False, False, True]])
    matrix = PanelCSRMatrix.from_mask(weight, mask)
    assert matrix.nnz == 3  # the kept zero at (0, 0) is stored; from_dense would drop it
    assert torch.equal(matrix.to_dense(), weight * mask)


def test_a_copied_or_pickled_layer_computes_on_its_own_arrays():
    """copy.deepcopy cloned a trainable layer's values apart from its matrix (refused at the next call), and a
    pickled matrix (torch.save of a whole model) carried the cached data pointers of the arrays it was saved from."""
    import io

    layer = nn.Linear(40, 24)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.2)
    trainable, _ = for_training(nn.Sequential(layer))
    inference = nn.Sequential(SparseLinear.from_linear(layer))
    x = torch.randn(5, 40)
    for model in (trainable, inference):
        model(x), model(x[:1])  # caches the kernel arguments before copying
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        for twin in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
            matrix, values = twin[0].matrix, twin[0].values
            assert values.data_ptr() == matrix.values.data_ptr() != model[0].values.data_ptr()
            assert matrix.kernel_args[3:7] == tuple(a.data_ptr() for a in (
                matrix.segment_ptr, matrix.row_nnz_prefix, matrix.col_indices, matrix.values))
            torch.testing.assert_close(twin(x), layer(x), rtol=1e-5, atol=1e-5)
    twin = copy.deepcopy(trainable)
    torch.optim.SGD(twin.parameters(), lr=0.5).zero_grad()
    twin(x).sum().backward()
    torch.optim.SGD(twin.parameters(), lr=0.5).step()
    torch.testing.assert_close(twin(x), twin[0].to_dense_linear()(x), rtol=1e-5, atol=1e-5)  # trained copy
    torch.testing.assert_close(trainable(x), layer(x), rtol=1e-5, atol=1e-5)  # the original did not move


def test_kernel_switch_trains_rigl_on_a_model_not_ours_like_masked_training(kernel_moves):
    """RigL on a model with a tied head, nn.MultiheadAttention and BatchNorm: between updates its MLP layers run on
    the kernels (the attention's out_proj, read by its parent, and the tied head stay masked), and the run matches
    masked training: losses to 1e-4, the same masks."""
    import sparsearch as sa
    from sparsearch.training import KernelSwitch

    def run(kernels: bool) -> tuple[list[float], dict]:
        torch.manual_seed(0)
        model = TiedAttentionModel()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        rigl = sa.RigL(0.9, update_every=4, total_steps=16, distribution="uniform").attach(model, optimizer)
        data, losses = torch.Generator().manual_seed(1), []
        with KernelSwitch(model, rigl, optimizer) if kernels else contextlib.nullcontext() as switch:
            for _ in range(16):
                if switch is not None:
                    switch.before_step()
                tokens = torch.randint(0, 50, (8, 12), generator=data)
                loss = F.cross_entropy(model(tokens).reshape(-1, 50), tokens.roll(1, 1).reshape(-1))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
        return losses, rigl.masks

    (masked, masked_masks), (kernels, kernel_masks) = run(False), run(True)
    assert kernel_moves and all(layers == ["mlp.0", "mlp.2"] for layers in kernel_moves)
    assert kernels == pytest.approx(masked, rel=1e-4)
    assert all(torch.equal(kernel_masks[name], mask) for name, mask in masked_masks.items())
