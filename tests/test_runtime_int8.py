"""int8 sparse weights (a float32 scale per segment): kernels, 8- and 16-bit batch-1 inputs, convert, files, corrupted
files."""

import copy
import io
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sparsearch.kernels.cpu import get_backend, uses_bitmap
from sparsearch.runtime import (
    PanelCSRMatrix,
    SparseLinear,
    convert_with_report,
    load_sparse,
    save_sparse,
    sparse_linear,
    to_int8,
)


def sparse_weight(rows=300, cols=1500, sparsity=0.9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    return weight * (torch.rand(rows, cols, generator=generator) >= sparsity)


@pytest.mark.parametrize("backend", ["c", "numba"])
@pytest.mark.parametrize("batch", [1, 5, 11, 20, 64, 100])
def test_int8_kernels_compute_with_the_dequantised_weights(backend, batch):
    weight = sparse_weight()
    q = PanelCSRMatrix.from_dense(weight).quantize(16)  # the default ("auto") takes 8 bits for these inputs
    q.validate()
    assert q.values.dtype == torch.int8 and q.scales.shape == q.segment_nnz.shape
    dequantised = q.to_dense()
    assert not dequantised[weight == 0].any()  # zeros stay zero (a tiny weight may round to zero)
    step = (weight - dequantised).abs().max()
    assert 0 < step <= weight.abs().max() / 254 + 1e-6  # rounding to half a step of the largest scale at most
    x, bias = torch.randn(batch, 1500), torch.randn(300)
    # batch 1 (C, AVX-512 VNNI) rounds x to int16 with one scale: each output moves by at most
    # max|x| / 65534 * sum of its row's |weights|
    atol = 1e-3 + x.abs().max().item() / 65534 * dequantised.abs().sum(1).max().item()
    torch.testing.assert_close(sparse_linear(x, q, bias, backend=backend), F.linear(x, dequantised, bias),
                               rtol=1e-4, atol=atol)


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
    entries["0"]["int8_scales"] = "row"
    save_file({k: handle_tensor for k, handle_tensor in _reload(path).items()}, str(tmp_path / "groups.safetensors"),
              metadata={**metadata, "sparse_entries": json.dumps(entries)})
    with pytest.raises(ValueError, match="int8 scales per 'row'"):
        load_sparse(tmp_path / "groups.safetensors", fresh())
    del entries["0"]["int8_scales"]
    entries["0"]["int8_group_size"] = 32  # the earlier layout: a scale per 32 stored non-zeros
    save_file({k: handle_tensor for k, handle_tensor in _reload(path).items()}, str(tmp_path / "old.safetensors"),
              metadata={**metadata, "sparse_entries": json.dumps(entries)})
    with pytest.raises(ValueError, match=r"scales per 32 stored non-zeros.*convert the model again"):
        load_sparse(tmp_path / "old.safetensors", fresh())


def _reload(path):
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def _x16(x):
    """x rounded as the int8 batch-1 kernel reads it: int16 with one scale per call."""
    scale = x.abs().max() / 32767
    return torch.round(x / scale) * scale


def _x8(x):
    """x rounded as the int8 batch-1 kernel reads it with activation_bits=8: int8 with one scale per call."""
    scale = x.abs().max() / 127
    return torch.round(x / scale) * scale


def _x_auto(x):
    """x rounded as the kernel reads it with activation_bits="auto": to 8 bits if that moves it by at most 2% of its
    norm, else to 16."""
    return _x8(x) if (x - _x8(x)).norm() <= 0.02 * x.norm() else _x16(x)


def _bitmap_kernel_runs(matrix):
    return get_backend().name == "c" and get_backend().isa == "avx512-vnni-bitmap" and uses_bitmap(matrix)


@pytest.mark.parametrize(("rows", "cols", "panel_width", "sparsity"), [
    (7, 1, None, 0.0), (9, 63, None, 0.5), (9, 64, None, 0.9), (9, 65, None, 0.9), (12, 130, 65, 0.3),
    (20, 1500, 7, 0.5), (16, 3000, 2000, 0.0), (33, 4100, None, 0.9), (10, 700, 100, 0.97)])
@pytest.mark.parametrize("activation_bits", [16, 8, "auto"])
def test_int8_batch_1_handles_word_tails_panels_and_empty_rows(rows, cols, panel_width, sparsity, activation_bits):
    """The batch-1 int8 kernel walks 64-column bitmap words: widths around a word, panels ending mid-word, panels of
    more than 16 words (an integer flush block), all-zero and dense rows; with 16- and 8-bit inputs."""
    weight = sparse_weight(rows, cols, sparsity, seed=cols)
    weight[0] = 0
    weight[-1] = torch.randn(cols)
    q = PanelCSRMatrix.from_dense(weight, panel_width).quantize(activation_bits)
    dequantised = q.to_dense()
    x, bias = torch.randn(1, cols), torch.randn(rows)
    got = sparse_linear(x, q, bias)
    # exact up to float rounding against the input rounded as the AVX-512 VNNI bitmap kernel reads it; the other
    # kernels (sparser matrices, other builds) compute with x as is
    rounded = {16: _x16, 8: _x8, "auto": _x_auto}[activation_bits]
    expected = F.linear(x if not _bitmap_kernel_runs(q) else rounded(x), dequantised, bias)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * (1 + dequantised.abs().sum(1).max().item()))
    assert got[0, 0] == bias[0]


def test_int8_batch_1_keeps_non_finite_inputs_as_float_arithmetic_does():
    q = PanelCSRMatrix.from_dense(sparse_weight(40, 300, 0.5)).quantize()
    same_pattern = PanelCSRMatrix.from_arrays(q.shape, q.panel_width, q.float_values, q.col_indices, q.segment_nnz)
    x = torch.randn(1, 300)
    x[0, 5] = float("inf")
    got = sparse_linear(x, q)
    assert got.isinf().any() and got.isfinite().any()  # rows with a non-zero in column 5, and the others
    torch.testing.assert_close(got, sparse_linear(x, same_pattern), equal_nan=True)


def test_int8_scales_follow_each_segment():
    """One scale per segment: a segment of small weights keeps its precision next to one of large weights."""
    weight = sparse_weight(8, 200, 0.5)
    weight[:4] *= 1000.0
    q = PanelCSRMatrix.from_dense(weight, panel_width=100).quantize()
    assert q.scales.shape == (2, 8)
    small = weight[4:]
    assert (q.to_dense()[4:] - small).abs().max() <= small.abs().max() / 254 + 1e-6


def test_bitmap_marks_exactly_the_non_zeros():
    weight = sparse_weight(11, 300, 0.8)
    matrix = PanelCSRMatrix.from_dense(weight, panel_width=130)
    words = -(-130 // 64)
    bits = matrix.bitmap.view(11, matrix.panels, words)
    mask = torch.zeros(11, matrix.panels * words * 64, dtype=torch.bool)
    for bit in range(64):
        set_here = ((bits >> bit) & 1).bool()  # [rows, panels, words]
        for panel in range(matrix.panels):
            mask[:, panel * words * 64 + bit: (panel + 1) * words * 64: 64] = set_here[:, panel]
    by_panel = mask.view(11, matrix.panels, words * 64)[:, :, :130].reshape(11, -1)[:, :300]
    assert torch.equal(by_panel, weight != 0)


def test_segment_sums_add_each_segments_values():
    """segment_sums[row * panels + panel]: the sum of the int8 values of that row within that panel."""
    weight = sparse_weight(5, 2500, 0.7)
    q = PanelCSRMatrix.from_dense(weight, panel_width=2000).quantize()
    sums = q.segment_sums.view(5, q.panels)
    values = q.values.to(torch.int64)
    start = 0
    for panel in range(q.panels):
        for row in range(5):
            count = int(q.segment_nnz[panel, row])
            assert int(sums[row, panel]) == int(values[start:start + count].sum())
            start += count
    with pytest.raises(ValueError, match="int8"):
        _ = PanelCSRMatrix.from_dense(weight).segment_sums


@pytest.mark.parametrize("activation_bits", [16, 8])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_bitmap_kernel_is_exact_at_its_overflow_bound(sign, activation_bits):
    """The widest panel (65535 columns, 1024 bitmap words) full of |q| = 127 times the largest x: the int32 lane sums
    reach 2.12e9 of 2.15e9, and the result still equals the float64 product."""
    cols = 65535
    weight = torch.full((3, cols), sign)
    weight[1] *= -1
    weight[2, ::2] = 0  # a row at 50% density too
    matrix = PanelCSRMatrix.from_dense(weight, panel_width=cols).quantize(activation_bits)
    x = torch.ones(1, cols)
    y = sparse_linear(x, matrix)
    expected = weight.double().sum(dim=1)
    assert torch.allclose(y[0].double(), expected, rtol=1e-6), (y, expected)


@pytest.mark.parametrize(("cflags", "isa"), [("-mno-avx512f", "scalar"), ("-mno-avx512f -mno-avx2", "scalar")])
def test_kernels_built_without_avx512_compute_the_same(tmp_path, cflags, isa):
    """The C kernels compile and agree without AVX-512 (the int8 bitmap kernel needs AVX-512 VBMI2 + VNNI, the float32
    one AVX-512F: a float32 matrix dense enough for it computes with the index loop), fused activations included."""
    import os
    import subprocess
    import sys

    script = (
        "import torch, torch.nn.functional as F\n"
        "from sparsearch.runtime import PanelCSRMatrix, sparse_linear\nfrom sparsearch.kernels import cpu as kernels\n"
        f"assert kernels.get_backend().isa == {isa!r}, kernels.get_backend().isa\n"
        "assert not kernels.get_backend().float_bitmap\n"
        "g = torch.Generator().manual_seed(0)\n"
        "w = torch.randn(70, 1500, generator=g) * (torch.rand(70, 1500, generator=g) > 0.9)\n"
        "half = torch.randn(70, 1500, generator=g) * (torch.rand(70, 1500, generator=g) > 0.5)\n"
        "matrices = (PanelCSRMatrix.from_dense(w), PanelCSRMatrix.from_dense(w).quantize(),\n"
        "            PanelCSRMatrix.from_dense(half))\n"
        "for m in matrices:\n"
        "    for batch in (1, 5, 70):\n"
        "        x = torch.randn(batch, 1500, generator=g)\n"
        "        torch.testing.assert_close(sparse_linear(x, m), F.linear(x, m.to_dense()), rtol=1e-4, atol=1e-3)\n"
        # the fused activations' generic-vector code, as AVX2 or scalar code
        "        for act, f in (('gelu', F.gelu), ('gelu_tanh', lambda y: F.gelu(y, approximate='tanh'))):\n"
        "            torch.testing.assert_close(sparse_linear(x, m, activation=act), f(F.linear(x, m.to_dense())),\n"
        "                                       rtol=1e-4, atol=1e-3)\n"
    )
    env = {**os.environ, "SPARSEARCH_KERNEL_CFLAGS": cflags, "SPARSEARCH_CACHE": str(tmp_path),
           "SPARSEARCH_KERNEL_BACKEND": "c"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_8_bit_activations_are_faithful_and_kept_by_files(tmp_path):
    """activation_bits=8: one-row outputs within the 8-bit input's rounding of the 16-bit ones, several rows unchanged
    (float32 inputs), and the choice survives save/load and pickling."""
    weight = sparse_weight()
    q16 = PanelCSRMatrix.from_dense(weight).quantize(16)
    q8 = q16.quantize(8)
    assert (q16.activation_bits, q8.activation_bits) == (16, 8) and q8.values is q16.values
    x = torch.randn(1, 1500)
    y16, y8 = sparse_linear(x, q16), sparse_linear(x, q8)
    assert F.cosine_similarity(y16, y8).item() > 0.9999
    # each output moves by at most half a step of the 8-bit input times its row's |weights|
    bound = x.abs().max().item() / 254 * q16.to_dense().abs().sum(1).max().item()
    assert (y16 - y8).abs().max().item() <= bound + 1e-3
    batch = torch.randn(7, 1500)
    torch.testing.assert_close(sparse_linear(batch, q8), sparse_linear(batch, q16))
    model = nn.Sequential(SparseLinear(q8))
    save_sparse(model, tmp_path / "a8.safetensors")
    loaded = load_sparse(tmp_path / "a8.safetensors", nn.Sequential(nn.Linear(1500, 300, bias=False)))
    assert loaded[0].matrix.activation_bits == 8
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), y8)
    buffer = io.BytesIO()
    torch.save(q8, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False).activation_bits == 8
    assert copy.deepcopy(q8).activation_bits == 8
    assert to_int8(nn.Sequential(SparseLinear(PanelCSRMatrix.from_dense(weight))), 8)[0].matrix.activation_bits == 8


def test_auto_activation_bits_take_8_bits_unless_the_input_loses_over_2_percent(tmp_path):
    """activation_bits="auto" (the default): an input whose 8-bit rounding error is at most 2% of its norm is computed
    as the 8-bit kernel computes it, one with a larger outlier as the 16-bit kernel does, on either side of 2%; the
    choice is made per call, and "auto" survives save/load."""
    weight = sparse_weight(300, 1500, 0.9)
    fp32 = PanelCSRMatrix.from_dense(weight)
    auto, q8, q16 = fp32.quantize(), fp32.quantize(8), fp32.quantize(16)
    assert auto.activation_bits == "auto"
    if not _bitmap_kernel_runs(auto):
        pytest.skip("the 8/16-bit input choice belongs to the AVX-512 VNNI bitmap kernel, not built here")
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(1, 1500, generator=generator)
    seen = set()
    for outlier in (0.0, 7.0, 8.5, 10.5, 12.0, 30.0):  # larger outliers: larger 8-bit steps for every feature
        x = base.clone()
        if outlier:
            x[0, 11] = outlier
        loss = float((x - _x8(x)).norm() / x.norm())
        if abs(loss - 0.02) < 1e-3:
            continue  # too close to call in float32 sums of a different order
        expected = q8 if loss <= 0.02 else q16
        other = q16 if loss <= 0.02 else q8
        got = sparse_linear(x, auto)
        assert torch.equal(got, sparse_linear(x, expected)), (outlier, loss)
        assert not torch.equal(got, sparse_linear(x, other)), (outlier, loss)
        seen.add(loss <= 0.02)
    assert seen == {True, False}  # both sides of the threshold were exercised
    model = nn.Sequential(SparseLinear(auto))
    save_sparse(model, tmp_path / "auto.safetensors")
    loaded = load_sparse(tmp_path / "auto.safetensors", nn.Sequential(nn.Linear(1500, 300, bias=False)))
    assert loaded[0].matrix.activation_bits == "auto"
    assert "8 or 16 bits, chosen per input" in repr(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(base), sparse_linear(base, q8), rtol=0, atol=0)


def test_bad_activation_bits_are_refused_and_files_checked(tmp_path):
    matrix = PanelCSRMatrix.from_dense(sparse_weight(40, 200))
    for bits in (4, 32, "8", True, "Auto"):
        with pytest.raises(ValueError, match=r"activation_bits must be one of \('auto', 16, 8\)"):
            matrix.quantize(bits)
    for bits in (8, "auto"):
        with pytest.raises(ValueError, match=f"16 for float32 values, got {bits!r}"):
            PanelCSRMatrix.from_arrays(matrix.shape, matrix.panel_width, matrix.values, matrix.col_indices,
                                       matrix.segment_nnz, activation_bits=bits).validate()
    model = nn.Sequential(nn.Linear(200, 40))
    with torch.no_grad():
        model[0].weight.copy_(sparse_weight(40, 200))
    for bits in (8, 16):
        with pytest.raises(ValueError, match=f"other than 'auto' only with int8=True; got {bits} with int8=False"):
            convert_with_report(model, torch.randn(2, 200), int8_activation_bits=bits)
    with pytest.raises(ValueError, match="activation_bits must be one of"):
        to_int8(model, activation_bits=12)
    # a file whose entry names bits this sparsearch does not compute with: refused, naming the value
    path = tmp_path / "q.safetensors"
    save_sparse(nn.Sequential(SparseLinear(matrix.quantize(8))), path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    entries = json.loads(metadata["sparse_entries"])
    assert entries["0"]["int8_activation_bits"] == 8
    for bad in (12, "8"):
        entries["0"]["int8_activation_bits"] = bad
        save_file(_reload(path), str(tmp_path / "bad.safetensors"),
                  metadata={**metadata, "sparse_entries": json.dumps(entries)})
        with pytest.raises(ValueError, match=f"int8_activation_bits {bad!r}"):
            load_sparse(tmp_path / "bad.safetensors", nn.Sequential(nn.Linear(200, 40)))
    del entries["0"]["int8_activation_bits"]  # files written before the option: 16-bit inputs
    save_file(_reload(path), str(tmp_path / "older.safetensors"),
              metadata={**metadata, "sparse_entries": json.dumps(entries)})
    older = load_sparse(tmp_path / "older.safetensors", nn.Sequential(nn.Linear(200, 40)))
    assert older[0].matrix.activation_bits == 16
