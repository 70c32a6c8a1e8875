"""Sparse convolutions: SparseConv1d/2d compute what nn.Conv1d/2d do, `convert` takes convolutions of models that
are not ours (residual block with BatchNorm, the package's 1-D CNN trained on MNIST-1D), and files round-trip."""

import pytest
import torch
import torch.nn.functional as F
from runtime_support import sparsify
from torch import nn

from sparsearch.data import load_dataset
from sparsearch.models import build_model
from sparsearch.runtime import SparseConv1d, SparseConv2d, convert_with_report, load_sparse, save_sparse

FORCE = {"min_speedup": 1e-9, "repeats": 1}  # sparse wherever allowed, whatever the timing




CONV2D_CASES = [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 3, "stride": 2, "padding": 1},
    {"kernel_size": (3, 2), "stride": (2, 3), "padding": (2, 0), "dilation": (1, 2)},
    {"kernel_size": 4, "padding": "same", "dilation": 2, "bias": False},  # asymmetric 'same' padding
    {"kernel_size": 3, "padding": "valid", "stride": 3},
    {"kernel_size": 3, "padding": 2, "padding_mode": "reflect"},
    {"kernel_size": 3, "padding": 1, "padding_mode": "circular", "stride": 2},
    {"kernel_size": 5, "padding": 2, "padding_mode": "replicate", "dilation": 2},
    {"kernel_size": 3, "padding": 1, "groups": 4},
    {"kernel_size": 1},
    {"kernel_size": 1, "stride": 2},
]


def _one_dim(case: dict) -> dict:
    return {k: v[-1] if isinstance(v, tuple) else v for k, v in case.items()}


@pytest.mark.parametrize("case", CONV2D_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dims", [1, 2])
def test_sparse_conv_matches_torch(case, dims):
    torch.manual_seed(0)
    conv_type, sparse_type = (nn.Conv1d, SparseConv1d) if dims == 1 else (nn.Conv2d, SparseConv2d)
    conv = sparsify(conv_type(8, 12, **(_one_dim(case) if dims == 1 else case)), 0.7)
    sparse = sparse_type.from_conv(conv)
    spatial = [(13,), (7,), (5,)] if dims == 1 else [(11, 13), (7, 9), (5, 6)]
    for batch, size in zip((1, 3, None), spatial, strict=True):  # None: unbatched input
        x = torch.randn(*(() if batch is None else (batch,)), 8, *size)
        with torch.no_grad():
            expected = conv(x)
            torch.testing.assert_close(sparse(x), expected, rtol=1e-4, atol=1e-5)
    functional = F.conv1d if dims == 1 else F.conv2d
    assert functional is not None and sparse.nnz == int((conv.weight != 0).sum())


def test_depthwise_all_zero_and_dense_weights_are_exact():
    torch.manual_seed(1)
    x = torch.randn(2, 6, 9, 9)
    depthwise = sparsify(nn.Conv2d(6, 6, 3, padding=1, groups=6), 0.5)
    zero = nn.Conv2d(6, 4, 3)
    with torch.no_grad():
        zero.weight.zero_()
    full = nn.Conv2d(6, 4, 3, stride=2)  # no zeros at all
    for conv in (depthwise, zero, full):
        with torch.no_grad():
            torch.testing.assert_close(SparseConv2d.from_conv(conv)(x), conv(x), rtol=1e-4, atol=1e-5)


def test_wide_layer_needs_several_panels_and_stays_exact():
    """64 channels of 34x34 padded maps are 73,984 virtual columns: more than one uint16 panel."""
    torch.manual_seed(2)
    conv = sparsify(nn.Conv2d(64, 16, 3, padding=1), 0.9)
    sparse = SparseConv2d.from_conv(conv)
    x = torch.randn(2, 64, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), conv(x), rtol=1e-4, atol=1e-5)
    matrix, _ = sparse._virtual_matrix(34, 34)
    assert matrix.panels == 2


def test_sparse_conv_rejects_bad_input():
    conv = sparsify(nn.Conv2d(4, 8, 3), 0.5)
    sparse = SparseConv2d.from_conv(conv)
    with pytest.raises(ValueError, match=r"expects .*4.* got \(2, 3, 8, 8\)"):
        sparse(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        sparse(torch.randn(1, 4, 2, 2))
    with pytest.raises(TypeError, match="float32"):
        sparse(torch.randn(1, 4, 8, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="inference-only"):
        sparse(torch.randn(1, 4, 8, 8, requires_grad=True))
    with pytest.raises(TypeError, match=r"expected an nn\.Conv1d, got Conv2d"):
        SparseConv1d.from_conv(conv)
    with pytest.raises(AttributeError, match="to_dense_conv"):
        _ = sparse.weight
    restored = sparse.to_dense_conv()
    torch.testing.assert_close(restored.weight, conv.weight)


class ResidualBlock(nn.Module):
    """A ResNet basic block (not ours): conv-BN-ReLU-conv-BN, a strided 1x1 projection, residual add, then a head."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * channels)
        self.conv2 = nn.Conv2d(2 * channels, 2 * channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * channels)
        self.project = nn.Conv2d(channels, 2 * channels, 1, stride=2, bias=False)
        self.depthwise = nn.Conv2d(2 * channels, 2 * channels, 3, padding=1, groups=2 * channels)
        self.head = nn.Linear(2 * channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + self.project(x))
        return self.head(self.depthwise(y).mean(dim=(2, 3)))


def trained_block() -> ResidualBlock:
    """A few real optimisation steps (BatchNorm statistics included) on a fixed synthetic task, then pruned."""
    torch.manual_seed(3)
    block = ResidualBlock()
    x, target = torch.randn(64, 16, 12, 12), torch.randint(0, 10, (64,))
    optimizer = torch.optim.SGD(block.parameters(), lr=0.05)
    for _ in range(5):
        loss = F.cross_entropy(block(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return sparsify(block, 0.9)


def test_convert_takes_the_convolutions_of_a_residual_block_and_files_round_trip(tmp_path):
    block = trained_block()
    x = torch.randn(4, 16, 12, 12)
    fast, report = convert_with_report(block, x, batch_sizes=(2,), **FORCE)
    by_name = {d.name: d for d in report.layers}
    for name in ("conv1", "conv2", "project", "depthwise"):
        assert by_name[name].sparse and isinstance(fast.get_submodule(name), SparseConv2d), by_name[name].reason
    assert "matches the original" in report.output_check
    with torch.no_grad():
        torch.testing.assert_close(fast(x), block(x), rtol=1e-4, atol=1e-5)
    path = tmp_path / "block.safetensors"
    save_sparse(fast, path)
    loaded = load_sparse(path, ResidualBlock())
    assert isinstance(loaded.conv2, SparseConv2d) and isinstance(loaded.bn1, nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), block(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(load_sparse(path, fast)(x), block(x), rtol=1e-4, atol=1e-5)  # into converted


def test_convert_times_convolutions_and_explains_each_decision():
    """Without forcing, every convolution is timed on inputs of the size it saw; a layer with no zeros stays dense
    without timing; whatever the timings, the report names a reason and the converted model is exact."""
    block = trained_block()
    with torch.no_grad():
        block.conv2.weight.normal_()  # no zeros
    x = torch.randn(2, 16, 12, 12)
    fast, report = convert_with_report(block, x, batch_sizes=(1, 8), repeats=2)
    by_name = {d.name: d for d in report.layers}
    assert not by_name["conv2"].sparse and "max_density" in by_name["conv2"].reason
    for name in ("conv1", "project", "depthwise"):
        decision = by_name[name]
        assert set(decision.speedup) == {1, 8} and decision.reason
        assert isinstance(fast.get_submodule(name), SparseConv2d) == decision.sparse
    with torch.no_grad():
        torch.testing.assert_close(fast(x), block(x), rtol=1e-4, atol=1e-5)


def test_convolutions_stay_dense_without_a_sample_input_or_with_int8():
    block = trained_block()
    with pytest.warns(UserWarning, match="without a sample_input.*conv1 \\(Conv2d\\)"):
        fast, report = convert_with_report(block, batch_sizes=(2,), **FORCE)
    by_name = {d.name: d for d in report.layers}
    assert not by_name["conv1"].sparse and "input size" in by_name["conv1"].reason
    assert isinstance(fast.conv1, nn.Conv2d) and by_name["head"].sparse
    x = torch.randn(2, 16, 12, 12)
    _, report = convert_with_report(block, x, batch_sizes=(2,), int8=True, **FORCE)
    assert "int8 sparse convolutions" in {d.name: d for d in report.layers}["conv1"].reason


def test_convert_the_package_1d_cnn_trained_on_mnist1d(tmp_path):
    data = load_dataset("mnist1d", cache_dir=tmp_path, mnist1d_samples=600)
    model = build_model("cnn", (40,), 10, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(30):
        batch = slice(step * 16 % 400, step * 16 % 400 + 16)
        loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sparsify(model, 0.9)
    x = data.x_test[:32]
    fast, report = convert_with_report(model, x, batch_sizes=(4,), **FORCE)
    assert all(isinstance(fast.convs[i], SparseConv1d) for i in range(3)), report.to_markdown()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-5)
        path = tmp_path / "cnn.safetensors"
        save_sparse(fast, path)
        loaded = load_sparse(path, build_model("cnn", (40,), 10, seed=1))
        torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-5)
        assert (loaded(x).argmax(1) == expected.argmax(1)).all()


def test_loading_a_sparse_conv_into_a_different_layer_fails_clearly(tmp_path):
    conv = sparsify(nn.Sequential(nn.Conv2d(4, 8, 3)), 0.8)
    fast, _ = convert_with_report(conv, torch.randn(2, 4, 6, 6), batch_sizes=(2,), **FORCE)
    path = tmp_path / "conv.safetensors"
    save_sparse(fast, path)
    with pytest.raises(ValueError, match="weight shape \\(8, 4, 3, 3\\) but the model's Conv2d there has weight "
                                         "shape \\(8, 4, 5, 5\\)"):
        load_sparse(path, nn.Sequential(nn.Conv2d(4, 8, 5)))
    with pytest.raises(ValueError, match="has a bias but the model's Conv2d there has none"):
        load_sparse(path, nn.Sequential(nn.Conv2d(4, 8, 3, bias=False)))


def test_without_the_c_kernels_sparse_convs_run_dense_and_convert_keeps_them_dense(monkeypatch):
    import importlib

    from sparsearch.kernels import cpu as kernels
    from sparsearch.runtime import conv as conv_module

    convert_module = importlib.import_module("sparsearch.runtime.convert")  # the package exports a function "convert"

    numba = kernels.get_backend("numba")
    monkeypatch.setattr(conv_module, "get_backend", lambda: numba)
    monkeypatch.setattr(convert_module, "get_backend", lambda: numba)
    conv = sparsify(nn.Conv1d(4, 6, 3, stride=2, padding=1), 0.8)
    x = torch.randn(2, 4, 11)
    with pytest.warns(RuntimeWarning, match="runs as a dense convolution"), torch.no_grad():
        torch.testing.assert_close(SparseConv1d.from_conv(conv)(x), conv(x), rtol=1e-4, atol=1e-5)
    _, report = convert_with_report(nn.Sequential(conv), x, batch_sizes=(2,), **FORCE)
    assert "need the C kernels" in report.layers[0].reason
