"""convert() keeps outputs, picks sparse only where faster, and sparse files round-trip or fail loudly."""

import pytest
import torch
from torch import nn

from sparsearch.runtime import SparseLinear, convert_with_report, load_sparse, read_sparse_file, save_sparse


def build_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10))


def prune(model, sparsity):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                threshold = module.weight.abs().flatten().kthvalue(int(sparsity * module.weight.numel())).values
                module.weight.mul_(module.weight.abs() > threshold)
    return model


@pytest.fixture(scope="module")
def converted():
    model = prune(build_mlp(), 0.95)
    fast, report = convert_with_report(model, batch_sizes=(64,), min_speedup=1.0)
    return model, fast, report


@pytest.fixture(scope="module")
def all_sparse():
    """Every layer sparse whatever the timings say (a tiny min_speedup), for the storage tests."""
    model = prune(build_mlp(), 0.95)
    fast, report = convert_with_report(model, batch_sizes=(1,), min_speedup=1e-9, repeats=1)
    assert len(report.sparse_layers) == 3
    return model, fast, report


def test_converted_model_matches_the_masked_model(converted):
    model, fast, _ = converted
    x = torch.randn(33, 784)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    assert isinstance(model[0], nn.Linear)  # convert copies unless inplace=True


def test_report_explains_every_linear_layer(converted):
    _, fast, report = converted
    assert [d.name for d in report.layers] == ["0", "2", "4"]
    for decision in report.layers:
        assert decision.density == pytest.approx(0.05, abs=0.01)
        assert isinstance(fast.get_submodule(decision.name), SparseLinear) == decision.sparse
        assert decision.reason and 64 in decision.dense_ms
    for decision in report.layers:  # sparse exactly where the measured speed-up reached min_speedup
        assert decision.sparse == (decision.speedup[64] >= 1.0)
    assert "| 0 | Linear | 1024x784 |" in report.to_markdown()


def test_dense_layers_and_unsupported_layers_stay_dense_and_are_reported():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv3d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    with pytest.warns(UserWarning, match="Conv3d"):
        fast, report = convert_with_report(model, batch_sizes=(8,))
    assert isinstance(fast[2], nn.Linear)
    by_name = {d.name: d for d in report.layers}
    assert "density" in by_name["2"].reason and not by_name["2"].sparse
    assert "no sparse kernel for Conv3d" in by_name["0"].reason


def test_sparse_file_round_trip_is_small_and_exact(all_sparse, tmp_path):
    model, fast, _ = all_sparse
    path = tmp_path / "model.safetensors"
    size = save_sparse(fast, path)
    dense_bytes = sum(p.numel() * 4 for p in model.parameters())
    nnz = sum(m.nnz for m in fast.modules() if isinstance(m, SparseLinear))
    assert size < 0.15 * dense_bytes
    assert size / nnz < 8  # 6 bytes per non-zero plus biases, dense layers and segment counts
    loaded = load_sparse(path, build_mlp(seed=7))
    x = torch.randn(5, 784)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fast(x), rtol=0, atol=0)


def test_truncated_file_is_rejected(all_sparse, tmp_path):
    _, fast, _ = all_sparse
    path = tmp_path / "model.safetensors"
    save_sparse(fast, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        read_sparse_file(path)


def test_flipped_byte_is_rejected_not_loaded(all_sparse, tmp_path):
    _, fast, _ = all_sparse
    path = tmp_path / "model.safetensors"
    save_sparse(fast, path)
    data = bytearray(path.read_bytes())
    data[-1000] ^= 0x40  # inside the tensor data, past the header
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_sparse(path, build_mlp())


def test_wrong_architecture_and_non_sparse_files_are_rejected(all_sparse, tmp_path):
    _, fast, _ = all_sparse
    path = tmp_path / "model.safetensors"
    save_sparse(fast, path)
    other = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 10))
    with pytest.raises(ValueError, match="shape"):
        load_sparse(path, other)
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(plain))
    with pytest.raises(ValueError, match="not a sparsearch sparse model file"):
        read_sparse_file(plain)
    with pytest.raises(ValueError, match="does not exist"):
        read_sparse_file(tmp_path / "missing.safetensors")


def test_converted_model_passes_the_input_gradient_of_the_original(all_sparse):
    model, fast, _ = all_sparse
    x = torch.randn(2, 784, requires_grad=True)
    x_fast = x.detach().clone().requires_grad_()
    model(x).square().sum().backward()
    fast(x_fast).square().sum().backward()
    torch.testing.assert_close(x_fast.grad, x.grad, rtol=1e-4, atol=1e-5)


def test_convert_rejects_bad_arguments():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        convert_with_report("model")
    with pytest.raises(ValueError, match="batch_sizes"):
        convert_with_report(build_mlp(), batch_sizes=(0,))
    with pytest.raises(ValueError, match="max_density"):
        convert_with_report(build_mlp(), max_density=2.0)


def test_layers_run_dense_are_still_stored_by_their_nonzeros(tmp_path):
    """A Linear kept dense for speed and a pruned conv still take ~6 bytes per non-zero on disk."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.Flatten(), nn.Linear(64 * 4 * 4, 512))
    with torch.no_grad():
        for weight in (model[0].weight, model[2].weight):
            weight.mul_(torch.rand_like(weight) > 0.9)
    with pytest.warns(UserWarning, match="Conv2d"):
        kept_dense, report = convert_with_report(model, batch_sizes=(1,), max_density=0.0)
    assert not report.sparse_layers
    path = tmp_path / "dense_run.safetensors"
    size = save_sparse(kept_dense, path)
    nnz = int((model[0].weight != 0).sum() + (model[2].weight != 0).sum())
    assert size < 6 * nnz + 4 * (64 + 512) + 4096  # values + indices, biases, segment counts and header
    loaded = load_sparse(path, nn.Sequential(nn.Conv2d(3, 64, 3), nn.Flatten(), nn.Linear(64 * 4 * 4, 512)))
    assert isinstance(loaded[2], nn.Linear)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_a_model_that_is_one_sparse_layer_saves_and_loads(tmp_path):
    """A bare SparseLinear / SparseConv2d was written with keys '.values', '.bias' and could not be loaded back
    (load_sparse failed with "unexpected ['bias']"); its keys are now those of its state_dict, and loading returns
    the replacement (a model that is one layer has no parent to be replaced in)."""
    from safetensors import safe_open

    from sparsearch.runtime.conv import SparseConv2d

    torch.manual_seed(0)
    linear, conv = nn.Linear(64, 32), nn.Conv2d(8, 16, 3)
    with torch.no_grad():
        for layer in linear, conv:
            layer.weight.mul_(torch.rand_like(layer.weight) < 0.1)
    for layer, fresh, sparse, x in (
            (linear, nn.Linear(64, 32), SparseLinear.from_linear(linear), torch.randn(3, 64)),
            (conv, nn.Conv2d(8, 16, 3), SparseConv2d.from_conv(conv), torch.randn(2, 8, 9, 9))):
        path = tmp_path / f"{type(layer).__name__}.safetensors"
        save_sparse(sparse, path)
        with safe_open(str(path), framework="pt") as handle:
            assert "values" in handle.keys() and "bias" in handle.keys()
        for target in (fresh, sparse):  # a dense model of the architecture, and one already sparse
            loaded = load_sparse(path, target)
            assert type(loaded) is type(sparse)
            torch.testing.assert_close(loaded(x), layer(x).detach(), rtol=1e-5, atol=1e-5)
