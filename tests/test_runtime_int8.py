"""int8 sparse weights (a float32 scale per 32 stored non-zeros): kernels, convert, files, corrupted files."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sparsearch.runtime import (
    PanelCSRMatrix,
    SparseLinear,
    convert_with_report,
    load_sparse,
    save_sparse,
    sparse_linear,
)
from sparsearch.runtime.format import INT8_GROUP_SIZE


def sparse_weight(rows=300, cols=1500, sparsity=0.9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    return weight * (torch.rand(rows, cols, generator=generator) >= sparsity)


@pytest.mark.parametrize("backend", ["c", "numba"])
@pytest.mark.parametrize("batch", [1, 5, 64, 100])
def test_int8_kernels_compute_with_the_dequantised_weights(backend, batch):
    weight = sparse_weight()
    q = PanelCSRMatrix.from_dense(weight).quantize()
    q.validate()
    assert q.values.dtype == torch.int8 and q.scales.numel() == -(-q.nnz // INT8_GROUP_SIZE)
    dequantised = q.to_dense()
    assert not dequantised[weight == 0].any()  # zeros stay zero (a tiny weight may round to zero)
    step = (weight - dequantised).abs().max()
    assert 0 < step <= weight.abs().max() / 254 + 1e-6  # rounding to half a step of the largest scale at most
    x, bias = torch.randn(batch, 1500), torch.randn(300)
    torch.testing.assert_close(sparse_linear(x, q, bias, backend=backend), F.linear(x, dequantised, bias),
                               rtol=1e-4, atol=1e-3)


def test_int8_files_are_half_the_size_and_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1500, 300), nn.ReLU(), nn.Linear(300, 10))
    with torch.no_grad():
        model[0].weight.copy_(sparse_weight())
    x = torch.randn(4, 1500)
    fp32, _ = convert_with_report(model, x, batch_sizes=(4,), min_speedup=1e-9, repeats=1)
    int8, report = convert_with_report(model, x, batch_sizes=(4,), min_speedup=1e-9, repeats=1, int8=True)
    assert isinstance(int8[0], SparseLinear) and int8[0].matrix.is_int8 and "int8" in report.layers[0].reason
    fp32_size = save_sparse(fp32, tmp_path / "fp32.safetensors")
    int8_size = save_sparse(int8, tmp_path / "q.safetensors")
    assert int8_size < 0.65 * fp32_size
    fresh = nn.Sequential(nn.Linear(1500, 300), nn.ReLU(), nn.Linear(300, 10))
    loaded = load_sparse(tmp_path / "q.safetensors", fresh)
    assert loaded[0].matrix.is_int8
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), int8(x))
        assert (int8(x) - model(x)).abs().max() < 5e-2 * max(1.0, float(model(x).abs().max()))


def test_corrupted_or_inconsistent_int8_files_are_refused(tmp_path):
    layer = SparseLinear(PanelCSRMatrix.from_dense(sparse_weight(40, 200)).quantize())
    model = nn.Sequential(layer)
    path = tmp_path / "q.safetensors"
    save_sparse(model, path)
    fresh = lambda: nn.Sequential(nn.Linear(200, 40))  # noqa: E731
    flipped = bytearray(path.read_bytes())
    flipped[-5] ^= 0xFF  # inside the last tensor's data
    (tmp_path / "flipped.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_sparse(tmp_path / "flipped.safetensors", fresh())
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    crc = json.loads(metadata["crc32"])
    tensors.pop("0.scales")
    crc.pop("0.scales")
    save_file(tensors, str(tmp_path / "no_scales.safetensors"), metadata={**metadata, "crc32": json.dumps(crc)})
    with pytest.raises(ValueError, match="lacks the int8 scales"):
        load_sparse(tmp_path / "no_scales.safetensors", fresh())
    entries = json.loads(metadata["sparse_entries"])
    entries["0"]["int8_group_size"] = 16
    save_file({k: handle_tensor for k, handle_tensor in _reload(path).items()}, str(tmp_path / "groups.safetensors"),
              metadata={**metadata, "sparse_entries": json.dumps(entries)})
    with pytest.raises(ValueError, match="int8 groups of 16"):
        load_sparse(tmp_path / "groups.safetensors", fresh())


def _reload(path):
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}
