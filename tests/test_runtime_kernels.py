"""Sparse kernels agree with the dense masked computation for any shape, sparsity pattern and input layout."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsearch.kernels import cpu
from sparsearch.runtime import PanelCSRMatrix, sparse_linear, sparse_matmul_t

BACKENDS = ["c", "numba"]


def masked_weight(rows, cols, sparsity, seed, empty_row, dense_row):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    weight *= torch.rand(rows, cols, generator=generator) >= sparsity
    if rows and empty_row:
        weight[0] = 0
    if rows > 1 and dense_row:
        weight[-1] = torch.randn(cols, generator=generator)
    return weight


def make_input(batch_shape, cols, layout, seed):
    generator = torch.Generator().manual_seed(seed + 1)
    if layout == "transposed" and len(batch_shape) == 1:
        return torch.randn(cols, *batch_shape, generator=generator).t()
    if layout == "strided":
        return torch.randn(*batch_shape, 2 * cols, generator=generator)[..., ::2]
    return torch.randn(*batch_shape, cols, generator=generator)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(0, 40),
    cols=st.integers(0, 300),
    sparsity=st.sampled_from([0.0, 0.5, 0.9, 0.98, 1.0]),
    panel_width=st.sampled_from([None, 1, 7, 64]),
    batch_shape=st.sampled_from([(), (0,), (1,), (2,), (9,), (28,), (40,), (57,), (70,), (131,), (3, 5), (2, 0, 4),
                                 (3, 50)]),
    layout=st.sampled_from(["contiguous", "transposed", "strided"]),
    with_bias=st.booleans(),
    empty_row=st.booleans(),
    dense_row=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_sparse_linear_matches_dense_masked_linear(backend, rows, cols, sparsity, panel_width, batch_shape,
                                                   layout, with_bias, empty_row, dense_row, seed):
    weight = masked_weight(rows, cols, sparsity, seed, empty_row, dense_row)
    bias = torch.randn(rows) if with_bias else None
    matrix = PanelCSRMatrix.from_dense(weight, panel_width)
    x = make_input(batch_shape, cols, layout, seed)
    got = sparse_linear(x, matrix, bias, backend=backend)
    expected = F.linear(x, weight, bias)
    assert got.shape == expected.shape
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, cols**0.5))


def test_format_round_trips_exact_nonzeros():
    weight = masked_weight(50, 2500, 0.9, seed=3, empty_row=True, dense_row=True)
    matrix = PanelCSRMatrix.from_dense(weight)
    matrix.validate()
    assert matrix.panels == 3  # 2500 columns -> panels of at most 1024
    assert matrix.nnz == int((weight != 0).sum())
    assert torch.equal(matrix.to_dense(), weight)
    assert matrix.storage_bytes == 6 * matrix.nnz + 2 * matrix.panels * 50


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_layer_uses_all_threads_and_stays_correct(backend):
    weight = masked_weight(600, 2100, 0.8, seed=5, empty_row=False, dense_row=False)
    matrix = PanelCSRMatrix.from_dense(weight)
    x = torch.randn(130, 2100)
    torch.testing.assert_close(sparse_linear(x, matrix, backend=backend), F.linear(x, weight),
                               rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias_form", ["float64", "strided", "parameter"])
@pytest.mark.parametrize("batch_shape", [(), (1,), (1, 16), (70,)])
def test_any_bias_tensor_gives_the_dense_result(backend, bias_form, batch_shape):
    """The kernels read the bias by pointer: one that is not float32 or not contiguous is converted first, and one
    that requires a gradient (a trainable layer's, called under no_grad) is read as it is."""
    weight = masked_weight(48, 96, 0.9, seed=11, empty_row=True, dense_row=False)
    matrix = PanelCSRMatrix.from_dense(weight)
    values = torch.randn(96)
    bias = {"float64": values[:48].double(), "strided": values[::2],
            "parameter": torch.nn.Parameter(values[:48].clone())}[bias_form]
    x = torch.randn(*batch_shape, 96)
    with torch.no_grad():
        got = sparse_linear(x, matrix, bias, backend=backend)
        expected = F.linear(x, weight, bias.float())
    assert not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("panel_width", [None, 7, 100, 700])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_float32_bitmap_kernel_agrees_with_the_index_loop(monkeypatch, panel_width, density):
    """Batch 1 from FLOAT_BITMAP_MIN_DENSITY on reads column bitmaps (with AVX-512): the same products as the index
    loop, partial last words and several panels included; inf and NaN at a weight's column propagate, at a column
    without weights they are never read (as in the index loop)."""
    if not cpu.get_backend("c").float_bitmap:
        pytest.skip("the float32 bitmap kernel needs AVX-512")
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(67, 1500, generator=generator) * (torch.rand(67, 1500, generator=generator) < density)
    weight[:, 5] = 0  # a column with no weights at all
    weight[3] = 0  # and an empty row
    bitmap, loop = PanelCSRMatrix.from_dense(weight, panel_width), PanelCSRMatrix.from_dense(weight, panel_width)
    assert cpu.uses_bitmap(bitmap)
    x, bias = torch.randn(1500, generator=generator), torch.randn(67, generator=generator)
    bitmap_y = sparse_linear(x, bitmap, bias, backend="c")  # its layer is built (and kept) with the default rule
    monkeypatch.setattr(cpu, "FLOAT_BITMAP_MIN_DENSITY", 2.0)  # the second one's layer is built without its bitmap
    loop_y = sparse_linear(x, loop, bias, backend="c")
    assert ctypes_layer(bitmap).bitmap and not ctypes_layer(loop).bitmap
    torch.testing.assert_close(bitmap_y, loop_y, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(bitmap_y, F.linear(x, weight, bias), rtol=1e-4, atol=1e-3)
    special = x.clone()
    special[5] = float("nan")  # no weight reads it
    column = int(weight[0].nonzero()[0])
    special[column] = float("inf")
    for y in (sparse_linear(special, bitmap, bias, backend="c"), sparse_linear(special, loop, bias, backend="c")):
        assert torch.isinf(y[0]) or torch.isnan(y[0])  # inf times the weight (NaN where +inf and -inf meet)
        reads_column = weight[:, column] != 0
        assert torch.isfinite(y[~reads_column]).all()


def ctypes_layer(matrix: PanelCSRMatrix) -> object:
    """The C descriptor the backend built for `matrix` (see _CBackend._layer)."""
    return matrix.__dict__["_c_layer"][0]


def test_the_operator_refuses_a_bitmap_of_the_wrong_size_and_survives_a_wrong_one():
    from sparsearch.kernels.ops import panel_csr_linear

    weight = torch.randn(20, 300) * (torch.rand(20, 300) < 0.5)
    m = PanelCSRMatrix.from_dense(weight)
    args = (m.values, m.col_indices, m.segment_nnz, m.segment_ptr, m.row_nnz_prefix, None)
    x = torch.randn(1, 300)
    with torch.no_grad():
        torch.testing.assert_close(panel_csr_linear(x, *args, m.bitmap, None, None, 20, 300, m.panel_width),
                                   F.linear(x, weight), rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match=r"bitmap of torch.int64 x 99, expected contiguous torch.int64 x 100"):
            panel_csr_linear(x, *args, m.bitmap[:99], None, None, 20, 300, m.panel_width)
        # every bit set: each segment claims 300 weights; the kernel stops at the end of the values it was given
        all_set = torch.full_like(m.bitmap, -1)
        assert panel_csr_linear(x, *args, all_set, None, None, 20, 300, m.panel_width).shape == (1, 20)


def test_bad_inputs_raise_clear_errors():
    matrix = PanelCSRMatrix.from_dense(torch.eye(4))
    with pytest.raises(ValueError, match="in_features=4"):
        sparse_linear(torch.randn(2, 5), matrix)
    with pytest.raises(TypeError, match="float64"):
        sparse_linear(torch.randn(2, 4, dtype=torch.float64), matrix)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        sparse_linear([[1.0] * 4], matrix)
    # a bias of another size was read past its end (or partly ignored) before it was checked
    for bad_bias, shown in ((torch.randn(3), r"\(3,\)"), (torch.randn(2, 4), r"\(2, 4\)"), ([0.0] * 4, "list")):
        with pytest.raises(ValueError, match=rf"bias must be a tensor of shape \(4,\).*{shown}"):
            sparse_linear(torch.randn(2, 4), matrix, bad_bias)
        with pytest.raises(ValueError, match=rf"bias must be a tensor of shape \(4,\).*{shown}"):
            sparse_matmul_t(matrix, torch.randn(4, 2), bad_bias)
    with pytest.raises(ValueError, match="panel_width"):
        PanelCSRMatrix.from_dense(torch.eye(4), panel_width=0)
    with pytest.raises(ValueError, match="2-D"):
        PanelCSRMatrix.from_dense(torch.ones(4))
    with pytest.raises(ValueError, match="unknown kernel backend"):
        sparse_linear(torch.randn(2, 4), matrix, backend="cuda")


def test_validate_rejects_inconsistent_arrays():
    matrix = PanelCSRMatrix.from_dense(torch.eye(4))
    bad_index = PanelCSRMatrix.from_arrays((4, 4), 4, matrix.values, torch.full((4,), 9, dtype=torch.uint16),
                                           matrix.segment_nnz)
    with pytest.raises(ValueError, match="column index out of range"):
        bad_index.validate()
    bad_count = PanelCSRMatrix.from_arrays((4, 4), 4, matrix.values[:3], matrix.col_indices[:3],
                                           matrix.segment_nnz)
    with pytest.raises(ValueError, match="sums to 4 non-zeros but 3"):
        bad_count.validate()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [0, 1, 5, 64, 70])
def test_batch_minor_layout_matches_dense(backend, batch):
    weight = masked_weight(90, 1500, 0.9, seed=batch, empty_row=True, dense_row=True)
    bias = torch.randn(90)
    matrix = PanelCSRMatrix.from_dense(weight, panel_width=512)
    xt = torch.randn(1500, batch)
    torch.testing.assert_close(sparse_matmul_t(matrix, xt, bias, backend=backend), weight @ xt + bias[:, None],
                               rtol=1e-4, atol=1e-3)


def _child_result(queue, matrix, inputs):
    # only the sparse kernels run in the child: torch's own OpenMP ops can hang after a fork; a small call (which the
    # parent ran on OpenMP) and a large one (the pool)
    queue.put([sparse_linear(x, matrix, threads=2).tolist() for x in inputs])


def test_thread_pool_is_correct_from_concurrent_callers_and_after_fork():
    """The C kernels' threads (own pool, OpenMP team): callers in several Python threads at once, and a forked child
    (which must not wait for the parent's OpenMP team: GNU libgomp is not fork-safe)."""
    import multiprocessing
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    weight = torch.randn(512, 1024) * (torch.rand(512, 1024) > 0.8)
    matrix = PanelCSRMatrix.from_dense(weight)
    inputs = [torch.randn(batch, 1024) for batch in (1, 64, 1, 200, 64, 3, 1, 128)]
    sparse_linear(inputs[0], matrix, threads=2)  # a small call: on PyTorch's OpenMP team before forking, if built so
    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(lambda x: sparse_linear(x, matrix, threads=2), inputs * 3))
    for x, y in zip(inputs * 3, outputs, strict=True):
        torch.testing.assert_close(y, F.linear(x, weight), rtol=1e-4, atol=1e-4)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_result, args=(queue, matrix, inputs[:2]))
    child.start()
    results = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    for x, result in zip(inputs[:2], results, strict=True):
        torch.testing.assert_close(torch.tensor(result), F.linear(x, weight), rtol=1e-4, atol=1e-4)


def test_a_deep_copied_matrix_computes_from_its_own_arrays():
    import copy

    weight = torch.randn(64, 128) * (torch.rand(64, 128) > 0.9)
    matrix = PanelCSRMatrix.from_dense(weight)
    x = torch.randn(3, 128)
    sparse_linear(x, matrix)  # caches the kernel arguments (data pointers)
    clone = copy.deepcopy(matrix)
    matrix.values.zero_()  # the source changes; the copy must not follow it
    torch.testing.assert_close(sparse_linear(x, clone), F.linear(x, weight), rtol=1e-4, atol=1e-4)


def test_small_calls_on_pytorchs_openmp_team_compute_what_the_pool_does():
    """Where the library is built on PyTorch's libgomp, calls below OPENMP_MAX_WORK run on PyTorch's OpenMP team: the
    same results as on the kernels' own pool, float32 and int8, batch 1 and batches around a vector."""
    from sparsearch.kernels.cpu import get_backend

    backend = get_backend("c")
    if not backend.openmp:
        pytest.skip("the C library was built without OpenMP here (PyTorch's libgomp not shared)")
    weight = masked_weight(700, 1500, 0.9, seed=3, empty_row=True, dense_row=True)
    matrices = (PanelCSRMatrix.from_dense(weight), PanelCSRMatrix.from_dense(weight).quantize(),
                PanelCSRMatrix.from_dense(weight).quantize(activation_bits=8))
    inputs = [torch.randn(batch, 1500, generator=torch.Generator().manual_seed(batch)) for batch in (1, 11, 33)]
    results = {}
    try:
        for allowed in (True, False):
            backend.allow_openmp(allowed)
            results[allowed] = [sparse_linear(x, m, backend="c", threads=2) for m in matrices for x in inputs]
    finally:
        backend.allow_openmp(True)
    for got, expected in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[True][1], F.linear(inputs[1], weight), rtol=1e-4, atol=1e-3)


def test_openmp_is_built_only_on_pytorchs_own_libgomp():
    """-fopenmp would otherwise bring a second OpenMP runtime, whose idle threads spin beside PyTorch's: in a fresh
    process, loading the kernels and running a small call maps no OpenMP runtime that PyTorch had not loaded."""
    import subprocess
    import sys

    script = (
        "from pathlib import Path\nimport torch\n"
        "from sparsearch.kernels import cpu\nfrom sparsearch.runtime import PanelCSRMatrix, sparse_linear\n"
        "runtimes = lambda: {l.split()[-1] for l in Path('/proc/self/maps').read_text().splitlines() "
        "if 'gomp' in l.split()[-1] or 'libomp' in l.split()[-1]}\n"
        "before = runtimes()\nbackend = cpu.get_backend('c')\n"
        "assert cpu._shares_pytorch_libgomp() or not backend.openmp\n"
        "m = PanelCSRMatrix.from_dense(torch.randn(300, 300) * (torch.rand(300, 300) > 0.9))\n"
        "sparse_linear(torch.randn(64, 300), m, threads=2)\n"
        "assert runtimes() == before, (before, runtimes())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_the_c_library_applies_the_python_thread_rule_at_any_grain():
    """sparse_layer_forward picks its threads in C from the grains set_grains pushes: the same count as _threads_for
    for every work size around the grains and OPENMP_MAX_WORK, and the same results at extreme grains."""
    from sparsearch.kernels import cpu

    backend = cpu.get_backend("c")
    defaults = cpu.PARALLEL_GRAIN, cpu.OPENMP_GRAIN
    weight = masked_weight(300, 700, 0.9, seed=5, empty_row=True, dense_row=True)
    matrices = (PanelCSRMatrix.from_dense(weight), PanelCSRMatrix.from_dense(weight).quantize(activation_bits=8))
    inputs = [torch.randn(batch, 700, generator=torch.Generator().manual_seed(batch)) for batch in (1, 9)]
    threads = torch.get_num_threads()
    results = []
    try:
        for grains in ((1 << 16, 1 << 12), (1, 1), (1 << 40, 1 << 40), defaults):
            cpu.set_grains(*grains)
            for most in (1, 2, 3):
                torch.set_num_threads(most)
                for work in (0, 1, 4095, 4096, 65535, 65536, 1 << 19, cpu.OPENMP_MAX_WORK - 1, cpu.OPENMP_MAX_WORK,
                             1 << 30):
                    assert backend._lib.panel_csr_threads_for(work, most) == cpu._threads_for(work, backend), \
                        (grains, most, work)
            torch.set_num_threads(threads)
            results.append([sparse_linear(x, m, backend="c") for m in matrices for x in inputs])
    finally:
        torch.set_num_threads(threads)
        cpu.set_grains(*defaults)
    for run in results[1:]:
        for got, expected in zip(run, results[0], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], F.linear(inputs[1], weight), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "64"])
def test_set_grains_refuses_what_is_not_a_positive_int(bad):
    from sparsearch.kernels import cpu

    before = cpu.PARALLEL_GRAIN, cpu.OPENMP_GRAIN
    with pytest.raises(ValueError, match=f"parallel grain must be a positive int.*got {bad!r}"):
        cpu.set_grains(bad, 1 << 16)
    with pytest.raises(ValueError, match=f"openmp grain must be a positive int.*got {bad!r}"):
        cpu.set_grains(1 << 19, bad)
    assert (cpu.PARALLEL_GRAIN, cpu.OPENMP_GRAIN) == before
