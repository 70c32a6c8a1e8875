"""CPU kernels for `PanelCSRMatrix` and the function `sparse_linear` that dispatches to them.

Two backends compute the same thing:
- "c": csrc/sparse_kernels.c (vectorised; own thread pool, and PyTorch's OpenMP team for small calls), compiled once
  with the system C compiler for this machine (-O3 -march=native, and -fopenmp where PyTorch's OpenMP runtime is GNU
  libgomp: `_shares_pytorch_libgomp`) and cached under $SPARSEARCH_CACHE (default ~/.cache/sparsearch, as for data);
  called through ctypes on tensor data pointers, so no build step needs torch. Chosen by measurement: 1.1 to 2.4x faster
  than the numba version of the same algorithm on 4096x4096 (benchmarks/results/runtime_kernels.md).
- "numba": the same algorithm in numba, used when no C compiler is available.
Set SPARSEARCH_KERNEL_BACKEND=c|numba to force one. Both use up to `torch.get_num_threads()` threads; the C
kernels run calls below a millisecond or so on PyTorch's OpenMP team where they share its libgomp (that team is
already running between PyTorch's ops) and other calls on their own thread pool (which copes with a busy machine:
see csrc/sparse_kernels.c), and each layer on one thread when they measure that to be faster for that layer and batch
size (a busy machine).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sparsearch.kernels.format import PanelCSRMatrix, activation_bits_code

_SOURCE = Path(__file__).with_name("csrc") / "sparse_kernels.c"
_BACKENDS = ("c", "numba")
# Multiply-adds (or copied elements) per extra thread: below this, waking a second thread costs more than
# it saves, and on a busy machine a parallel region can wait milliseconds for a descheduled thread. Inside a
# PyTorch model the cost is also indirect: a woken helper takes the core of PyTorch's own (spinning) OpenMP
# worker, and the model's next parallel op waits for it. All-MiniLM-L6-v2 at 90%, one sentence per call: 1.54x the
# dense model with this grain (its layers then run on one thread up to about 33 tokens) against 1.47x with 1 << 16,
# which parallelised calls whose kernels alone were faster on two threads (benchmarks/runtime_parallel_grain.py).
PARALLEL_GRAIN = 1 << 19
# The same where the C library runs small calls on PyTorch's OpenMP team (`_CBackend.openmp`): its second thread is
# already running, so a call pays for it from fewer multiply-adds on. MiniLM at 90%, one sentence per call
# (benchmarks/runtime_parallel_grain.py, two runs): 1.89x and 1.88x the dense model with the team and 2^16, 1.81x and
# 1.88x with the team and 2^19, 1.77x and 1.77x on the pool with 2^19 (the default before), 1.81x and 1.79x on one
# thread. Calls of OPENMP_MAX_WORK or more use the pool whatever the build (the constant of csrc/sparse_kernels.c).
OPENMP_GRAIN = 1 << 16
OPENMP_MAX_WORK = 1 << 22
# int8 at batch 1 reads column bitmaps (a cost per 64 columns) instead of indices (a cost per non-zero) from this
# density on. Measured on 4096x4096, one thread (bitmap int8 against the index loop, float32): 1.24x faster at 90%
# sparsity, 0.81x at 95%, 0.98x at 97%: the bitmap's fixed cost per word wins only when words hold enough weights.
BITMAP_MIN_DENSITY = 0.08
# The same for float32 weights (one masked expand and FMA per 16 columns instead of three loads per non-zero, see
# csrc/sparse_kernels.c). Bitmap time over index-loop time, batch 1, 4096x4096 and the MiniLM and GPT-2 shapes, one
# and two threads (medians of interleaved calls, 2026-11-30): density 0.1: 1.10-1.47; 0.12: 1.12-1.62; 0.15:
# 0.91-1.09; 0.2: 0.73-0.91; 0.3: 0.64-1.09 (one outlier; the others 0.64-0.71); 0.5: 0.47-0.99.
FLOAT_BITMAP_MIN_DENSITY = 0.18


# Activations the kernels apply to a layer's outputs in the same call (`sparse_linear(..., activation=)`); the
# position is the code csrc/sparse_kernels.c knows them by. "gelu" is erf GELU (`F.gelu`), "gelu_tanh" its tanh
# approximation (`F.gelu(approximate="tanh")`, GPT-2's); both agree with PyTorch's to about 1e-6.
ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh")


def activation_code(activation: str | None) -> int:
    """The kernels' code of `activation` (one of ACTIVATIONS); ValueError naming the allowed ones otherwise."""
    if activation is not None and (not isinstance(activation, str) or activation not in ACTIVATIONS):
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return ACTIVATIONS.index(activation)


def apply_activation(y: torch.Tensor, code: int) -> torch.Tensor:
    """PyTorch's own version of the kernels' activation `code` (for the paths that do not fuse it)."""
    if code == 1:
        return F.relu(y)
    if code >= 2:
        return F.gelu(y, approximate="tanh" if code == 3 else "none")
    return y


def uses_bitmap(matrix: PanelCSRMatrix) -> bool:
    """Whether the batch-1 kernel reads this matrix's column bitmaps (where the C library was built with the bitmap
    kernel for its value type, see BITMAP_MIN_DENSITY and FLOAT_BITMAP_MIN_DENSITY)."""
    return matrix.density >= (BITMAP_MIN_DENSITY if matrix.is_int8 else FLOAT_BITMAP_MIN_DENSITY)


def _cpu_fingerprint() -> str:
    """Identifies the instruction set the cached library was built for (it is compiled with -march=native)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text(errors="replace").splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("flags", "model name", "Features"))}))
    return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    root = Path(os.environ.get("SPARSEARCH_CACHE") or Path.home() / ".cache" / "sparsearch").expanduser()
    return root / "kernels"


def _shares_pytorch_libgomp() -> bool:
    """Whether PyTorch's OpenMP runtime is GNU libgomp under its plain soname, already loaded: a library built with
    -fopenmp then binds to that same runtime, so its parallel regions run on PyTorch's team. (Where a wheel bundles a
    renamed copy, libgomp-<hash>.so.1, -fopenmp code would start a second team of spinning threads: not used there.)"""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return False
    names = {Path(line.split()[-1]).name for line in maps.read_text(errors="replace").splitlines() if "/" in line}
    return "libgomp.so.1" in names and "parallel backend: OpenMP" in torch.__config__.parallel_info()


def _compile_library() -> Path:
    """Compile the C kernels for this machine once; concurrent processes race safely via atomic rename."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    source = _SOURCE.read_bytes()
    # extra flags after -march=native, e.g. "-mno-avx512f" to build (and test) the AVX2 or scalar code paths, or
    # "-fno-openmp" to keep every call on the kernels' own pool
    extra = os.environ.get("SPARSEARCH_KERNEL_CFLAGS", "").split()
    openmp = ["-fopenmp"] if _shares_pytorch_libgomp() else []
    candidates = [["-O3", "-march=native", *openmp, *extra, "-pthread"], ["-O3", "-march=native", *extra, "-pthread"],
                  ["-O3", *extra, "-pthread"]]
    flag_sets = [flags for i, flags in enumerate(candidates) if flags not in candidates[:i]]
    key = hashlib.sha256(source + compiler.encode() + _cpu_fingerprint().encode()
                         + " ".join(openmp + extra).encode()).hexdigest()[:16]
    target = _cache_dir() / f"sparse_kernels_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in flag_sets:
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        command = [compiler, *flags, "-fPIC", "-shared", "-o", str(tmp_path), str(_SOURCE)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            os.replace(tmp_path, target)
            return target
        tmp_path.unlink(missing_ok=True)
        errors.append(f"{' '.join(command)}:\n{done.stderr.strip()}")
    raise RuntimeError("compiling the sparse kernels failed:\n" + "\n".join(errors))


class _SparseLayer(ctypes.Structure):
    """`sparse_layer` of csrc/sparse_kernels.c: a matrix's sizes and array addresses, passed as one pointer."""

    _fields_ = [("rows", ctypes.c_int64), ("panels", ctypes.c_int64), ("panel_width", ctypes.c_int64),
                ("cols", ctypes.c_int64), ("seg_ptr", ctypes.c_void_p), ("row_nnz_prefix", ctypes.c_void_p),
                ("col_indices", ctypes.c_void_p), ("values", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("bitmap", ctypes.c_void_p), ("segment_sums", ctypes.c_void_p), ("activation_bits", ctypes.c_int64)]


class _CBackend:
    name = "c"

    def __init__(self) -> None:
        lib = ctypes.CDLL(str(_compile_library()))
        i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.panel_csr_linear.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64,
                                         ptr, ptr, c_int]
        lib.panel_csr_sddmm.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64, ptr, c_int]
        for fn in (lib.panel_csr_linear, lib.panel_csr_sddmm):
            fn.restype = None
        lib.panel_csr_matvec_isa.restype = ctypes.c_char_p
        self.isa = lib.panel_csr_matvec_isa().decode()  # the vector code the int8 batch-1 kernel was built with
        self.float_bitmap = bool(lib.panel_csr_float_bitmap())  # float32 batch 1 can read bitmaps (AVX-512)
        lib.panel_csr_allow_openmp.argtypes = [c_int]
        lib.sparse_layer_forward.argtypes = [ptr, ptr, ptr, i64, ptr, c_int, c_int]
        lib.sparse_layer_forward.restype = None
        lib.panel_csr_set_grains.argtypes = [i64, i64]
        lib.panel_csr_set_grains.restype = None
        lib.panel_csr_threads_for.argtypes = [i64, c_int]
        lib.panel_csr_threads_for.restype = c_int
        lib.panel_csr_set_grains(PARALLEL_GRAIN, OPENMP_GRAIN)
        self._lib = lib

    @property
    def openmp(self) -> bool:
        """Whether small calls run on PyTorch's OpenMP team (built with -fopenmp, allowed, not in a forked child)."""
        return bool(self._lib.panel_csr_uses_openmp())

    def allow_openmp(self, allowed: bool) -> None:
        """Let small calls use PyTorch's OpenMP team (True, the default) or keep every call on the kernels' own pool
        (False): for comparing the two."""
        self._lib.panel_csr_allow_openmp(int(allowed))

    def _layer(self, m: PanelCSRMatrix) -> int:
        """Address of m's `sparse_layer` descriptor (csrc/sparse_kernels.c), built on first use and kept with m
        (whose arrays it points into; a matrix never changes its arrays, a copy or unpickled one builds its own)."""
        cached = m.__dict__.get("_c_layer")
        if cached is None:
            bitmap = uses_bitmap(m) and (self.isa == "avx512-vnni-bitmap" if m.is_int8 else self.float_bitmap)
            layer = _SparseLayer(*m.kernel_args[:3], m.cols, *m.kernel_args[3:8],
                                 m.bitmap.data_ptr() if bitmap else None,
                                 m.segment_sums.data_ptr() if bitmap and m.is_int8 else None,
                                 activation_bits_code(m.activation_bits))
            # setdefault: threads building it at once all use the one stored, which m keeps alive
            cached = m.__dict__.setdefault("_c_layer", (layer, ctypes.addressof(layer)))
        return cached[1]

    def forward(self, m: PanelCSRMatrix, bias: torch.Tensor | None, x: torch.Tensor, batch: int,
                max_threads: int, activation: int = 0) -> torch.Tensor:
        """y = act(x W^T + b) (contiguous, x's leading shape) for x holding `batch` rows of m.cols floats, any
        strides, `activation` a code of ACTIVATIONS; the library picks up to max_threads threads (see _threads_for)."""
        y = _empty_output(x.shape, m.shape[0])
        if not x.is_contiguous():
            if batch > 1:
                threads = min(_threads_for(m.nnz * batch, self), max_threads)
                return apply_activation(self.linear(m, bias, x, batch, threads, y), activation)
            x = x.contiguous()
        # one pointer for the matrix, the thread rule in C: the fewest conversions ctypes makes per call
        self._lib.sparse_layer_forward(self._layer(m), None if bias is None else bias.data_ptr(), x.data_ptr(), batch,
                                       y.data_ptr(), max_threads, activation)
        return y

    def linear(self, m: PanelCSRMatrix, bias: torch.Tensor | None, x: torch.Tensor, batch: int, threads: int,
               y: torch.Tensor) -> torch.Tensor:
        """y (contiguous, `batch` rows of m.rows floats) = x W^T + b for x holding `batch` rows of m.cols floats:
        contiguous with any number of dimensions (read in place: no reshape, it costs microseconds per call), or any
        strides."""
        bias_ptr = None if bias is None else bias.data_ptr()
        if x.is_contiguous():
            # the kernel transposes x into its own per-thread scratch (no X^T, Y^T buffers to allocate per call)
            self._lib.panel_csr_linear(*m.kernel_args, bias_ptr, x.data_ptr(), m.cols, None, 0, batch, m.cols,
                                       None, y.data_ptr(), threads)
            return y
        x2 = x.reshape(batch, m.cols)
        if x2.stride(0) == 1 and x2.stride(1) >= batch:  # already X^T (e.g. the transpose of a contiguous tensor)
            yt = torch.empty(m.rows, batch, dtype=torch.float32)
            self._lib.panel_csr_linear(*m.kernel_args, bias_ptr, None, 0, x2.data_ptr(), x2.stride(1), batch,
                                       m.cols, yt.data_ptr(), y.data_ptr(), threads)
            return y
        x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
        self._lib.panel_csr_linear(*m.kernel_args, bias_ptr, x2.data_ptr(), x2.stride(0), None, 0, batch, m.cols,
                                   None, y.data_ptr(), threads)
        return y

    def matmul_t(self, m: PanelCSRMatrix, bias: torch.Tensor | None, xt: torch.Tensor,
                 threads: int) -> torch.Tensor:
        """Y^T [rows, batch] from X^T [cols, batch] (rows contiguous), no transposes."""
        yt = torch.empty(m.rows, xt.shape[1], dtype=torch.float32)
        self._lib.panel_csr_linear(*m.kernel_args, None if bias is None else bias.data_ptr(), None, 0,
                                   xt.data_ptr(), xt.stride(0), xt.shape[1], m.cols, yt.data_ptr(), None, threads)
        return yt

    def shifted_matmul_t(self, m: PanelCSRMatrix, bias: torch.Tensor | None, x: torch.Tensor, ldx: int,
                         batch: int, out: torch.Tensor) -> None:
        """out[n] (rows x batch) = W X_n^T for each image n of x, where X_n^T's column j is the `batch` floats at
        x[n].flatten()[col * ldx:] (rows overlap: the convolutions' virtual columns, see runtime/conv.py).

        x and out must be contiguous float32 with x[n] holding every address the matrix reads."""
        images = x.shape[0]
        x_step, out_step = x.stride(0) * 4, out.stride(0) * 4  # bytes per image
        x_ptr, out_ptr = x.data_ptr(), out.data_ptr()
        bias_ptr = None if bias is None else bias.data_ptr()
        threads = _threads_for(m.nnz * batch, self)
        kernel, args = self._lib.panel_csr_linear, m.kernel_args
        for n in range(images):
            kernel(*args, bias_ptr, None, 0, x_ptr + n * x_step, ldx, batch, m.cols, out_ptr + n * out_step, None,
                   threads)

    def sddmm(self, m: PanelCSRMatrix, x: torch.Tensor, g: torch.Tensor, threads: int) -> torch.Tensor:
        """For every stored non-zero (i, j), in storage order: sum over the rows b of g[b, i] x[b, j] (x: [batch,
        cols], g: [batch, rows], both with unit column stride)."""
        grad = torch.empty(m.nnz, dtype=torch.float32)
        self._lib.panel_csr_sddmm(*m.kernel_args[:6], x.data_ptr(), x.stride(0), g.data_ptr(), g.stride(0),
                                  x.shape[0], m.cols, grad.data_ptr(), threads)
        return grad


class _NumbaBackend:
    name = "numba"

    def __init__(self) -> None:
        from sparsearch.kernels import _numba_kernels

        self._kernels = _numba_kernels

    def _threads(self, threads: int) -> int:
        import numba

        count = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
        numba.set_num_threads(count)
        return count

    def forward(self, m: PanelCSRMatrix, bias: torch.Tensor | None, x: torch.Tensor, batch: int,
                max_threads: int, activation: int = 0) -> torch.Tensor:
        threads = min(_threads_for(m.nnz * batch, self), max_threads)
        y = _empty_output(x.shape, m.rows)
        if batch > 1:
            return apply_activation(self.linear(m, bias, x, batch, threads, y), activation)
        self.matvec(m, bias, x if x.is_contiguous() else x.contiguous(), y, threads)
        return apply_activation(y, activation)

    def linear(self, m: PanelCSRMatrix, bias: torch.Tensor | None, x: torch.Tensor, batch: int, threads: int,
               y: torch.Tensor) -> torch.Tensor:
        xt = x.reshape(batch, m.cols).t().contiguous()
        yt = torch.empty(m.rows, batch, dtype=torch.float32)
        self._kernels.matmul_t(m.rows, m.panel_width, m.segment_ptr.numpy(), m.row_nnz_prefix.numpy(),
                               m.col_indices.numpy(), m.float_values.numpy(), _bias_array(bias, m.rows),
                               xt.numpy(), yt.numpy(), self._threads(threads))
        return y.copy_(yt.t().reshape(y.shape))

    def matmul_t(self, m: PanelCSRMatrix, bias: torch.Tensor | None, xt: torch.Tensor,
                 threads: int) -> torch.Tensor:
        y = torch.empty(xt.shape[1], m.rows, dtype=torch.float32)
        return self.linear(m, bias, xt.t(), xt.shape[1], threads, y).t().contiguous()

    def matvec(self, m: PanelCSRMatrix, bias: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor,
               threads: int) -> None:
        self._kernels.matvec(m.rows, m.panel_width, m.segment_ptr.numpy(), m.row_nnz_prefix.numpy(),
                             m.col_indices.numpy(), m.float_values.numpy(), _bias_array(bias, m.rows),
                             x.reshape(-1).numpy(), y.reshape(-1).numpy(), self._threads(threads))

    def sddmm(self, m: PanelCSRMatrix, x: torch.Tensor, g: torch.Tensor, threads: int) -> torch.Tensor:
        grad = torch.empty(m.nnz, dtype=torch.float32)
        self._kernels.sddmm(m.rows, m.panel_width, m.segment_ptr.numpy(), m.row_nnz_prefix.numpy(),
                            m.col_indices.numpy(), x.t().contiguous().numpy(), g.t().contiguous().numpy(),
                            grad.numpy(), self._threads(threads))
        return grad


def _bias_array(bias: torch.Tensor | None, rows: int) -> np.ndarray:
    return np.zeros(rows, dtype=np.float32) if bias is None else bias.detach().numpy()


def _empty_output(shape: torch.Size, rows: int) -> torch.Tensor:
    """An uninitialised float32 output of x's leading shape and `rows` features. Sizes passed one by one: building
    the shape as a tuple and passing that took twice as long (about 5 us against 2 on the benchmark machine, per
    call of every layer)."""
    if len(shape) == 3:  # transformers' [batch, tokens, features]
        return torch.empty(shape[0], shape[1], rows, dtype=torch.float32)
    if len(shape) == 2:
        return torch.empty(shape[0], rows, dtype=torch.float32)
    return torch.empty(*shape[:-1], rows, dtype=torch.float32)


@cache
def get_backend(name: str | None = None) -> _CBackend | _NumbaBackend:
    """The kernel backend: `name`, else $SPARSEARCH_KERNEL_BACKEND, else C with a numba fallback."""
    requested = name or os.environ.get("SPARSEARCH_KERNEL_BACKEND")
    if requested is not None and requested not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {requested!r}; choose one of {_BACKENDS}")
    if requested == "numba":
        return _NumbaBackend()
    try:
        return _CBackend()
    except (RuntimeError, OSError) as error:
        if requested == "c":
            raise
        warnings.warn(f"sparsearch: C kernels unavailable ({error}); using the slower numba kernels",
                      RuntimeWarning, stacklevel=2)
        return _NumbaBackend()


def _threads_for(work: int, kernels: object = None) -> int:
    """Threads for a call of `work` multiply-adds on `kernels` (see PARALLEL_GRAIN and OPENMP_GRAIN; the C
    library's sparse_layer_forward applies the same rule itself)."""
    openmp = work < OPENMP_MAX_WORK and getattr(kernels, "openmp", False)
    return max(1, min(torch.get_num_threads(), work // (OPENMP_GRAIN if openmp else PARALLEL_GRAIN)))


def set_grains(parallel: int, openmp: int) -> None:
    """Set PARALLEL_GRAIN and OPENMP_GRAIN (multiply-adds per extra thread) for every backend, the C library's
    included: for experiments such as benchmarks/runtime_parallel_grain.py."""
    for name, value in (("parallel", parallel), ("openmp", openmp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} grain must be a positive int (multiply-adds per extra thread), got {value!r}")
    global PARALLEL_GRAIN, OPENMP_GRAIN
    PARALLEL_GRAIN, OPENMP_GRAIN = parallel, openmp
    try:
        library = get_backend("c")._lib  # one library per process: every _CBackend shares its settings
    except (RuntimeError, OSError):  # no C compiler: the numba backend reads the constants above
        return
    library.panel_csr_set_grains(parallel, openmp)


def sparse_linear(x: torch.Tensor, matrix: PanelCSRMatrix, bias: torch.Tensor | None = None,
                  backend: str | None = None, threads: int | None = None, activation: str | None = None
                  ) -> torch.Tensor:
    """y = x W^T + bias like `F.linear`, for any leading batch shape and any strides of x; y is contiguous.

    `threads` caps the threads (default: `torch.get_num_threads()`); the C kernels still run a layer on one
    thread when they measure that to be faster (a busy machine). `activation` (one of ACTIVATIONS) is applied to y
    in the same call, as `F.relu(y)`, `F.gelu(y)` or `F.gelu(y, approximate="tanh")` would be."""
    # the checks and the call stay lean: for a transformer's small layers at one sentence, Python costs per call
    # were a tenth of the model's time (about 40 us before reshapes and .detach() were removed from this path).
    # A near-empty 384x384 layer at 16 tokens, old and new code interleaved in one process: 12.4 us a call with the
    # output shape built as a tuple and `bias.requires_grad` tested, 10.7 us now (the C call alone: about 4)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype is not torch.float32:
        raise TypeError(f"sparse kernels compute in float32; got input dtype {x.dtype} (convert with .float())")
    if not x.is_cpu:
        raise ValueError(f"sparse kernels run on the CPU; got an input on {x.device}")
    shape = x.shape
    rows, cols = matrix.shape
    if not shape or shape[-1] != cols:
        raise ValueError(f"input's last dimension must be in_features={cols}, got shape {tuple(shape)}")
    # the kernels read the bias through its pointer (`rows` floats): any float32 contiguous tensor of that shape will
    # do, requires_grad or not
    if bias is not None:
        check_bias(bias, rows)
        if bias.dtype is not torch.float32 or not bias.is_contiguous():
            bias = bias.detach().to(torch.float32).contiguous()
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    code = activation_code(activation)
    elements = x.numel()
    if elements == 0 or rows == 0:
        return apply_activation(x.new_zeros((*shape[:-1], rows)) + (0 if bias is None else bias.detach()), code)
    most = torch.get_num_threads()
    return get_backend(backend).forward(matrix, bias, x, elements // cols, min(most, threads) if threads else most,
                                        code)


def check_bias(bias: object, rows: int) -> None:
    """Raise ValueError unless `bias` is a tensor of shape (rows,): the kernels read `rows` floats from its pointer
    whatever its size, so a shorter one would be read past its end (the sparse layers check theirs with this too)."""
    if not isinstance(bias, torch.Tensor) or bias.shape != (rows,):
        raise ValueError(f"bias must be a tensor of shape ({rows},) (out_features), got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")


def sparse_matmul_t(matrix: PanelCSRMatrix, xt: torch.Tensor, bias: torch.Tensor | None = None,
                    backend: str | None = None) -> torch.Tensor:
    """Y^T = W X^T (+ bias per row) for activations kept batch-minor: xt [in_features, batch] -> [out_features, batch].

    The layout the kernels work in, so no transposes are paid; chains of sparse layers (and comparisons with
    kernels that take this layout, such as sparselab.spmm) can use it directly.
    """
    if not isinstance(xt, torch.Tensor) or xt.dim() != 2 or xt.dtype != torch.float32:
        raise TypeError(f"xt must be a 2-D float32 tensor, got {getattr(xt, 'dtype', type(xt).__name__)} "
                        f"with shape {tuple(getattr(xt, 'shape', ()))}")
    if xt.shape[0] != matrix.cols:
        raise ValueError(f"xt's first dimension must be in_features={matrix.cols}, got shape {tuple(xt.shape)}")
    if bias is not None:
        check_bias(bias, matrix.rows)
        bias = bias.detach().to(torch.float32).contiguous()
    batch = xt.shape[1]
    if batch == 0 or matrix.rows == 0:
        return xt.new_zeros(matrix.rows, batch) + (0 if bias is None else bias[:, None])
    kernels = get_backend(backend)
    if batch == 1:  # a single column is a matrix-vector product: the memory-bound kernel is faster
        return kernels.forward(matrix, bias, xt.detach()[:, 0], 1, torch.get_num_threads()).unsqueeze(1)
    if xt.stride(1) != 1:
        xt = xt.contiguous()
    return kernels.matmul_t(matrix, bias, xt.detach(), _threads_for(matrix.nnz * batch, kernels))


def sparse_linear_values_grad(x: torch.Tensor, grad_output: torch.Tensor, matrix: PanelCSRMatrix,
                              backend: str | None = None) -> torch.Tensor:
    """The gradient of a loss with respect to `matrix.values` (float32, in their storage order) given x and
    grad_output = dL/dy of y = sparse_linear(x, matrix, bias): for each stored non-zero (i, j), the sum over every
    leading index of grad_output[..., i] * x[..., j]. Costs nnz x batch multiply-adds (the dense weight gradient:
    rows x cols x batch)."""
    if matrix.is_int8:
        raise ValueError("int8 values have no gradient here: train the float32 matrix and quantize afterwards")
    if x.shape[-1:] != (matrix.cols,) or grad_output.shape[-1:] != (matrix.rows,) \
            or x.shape[:-1] != grad_output.shape[:-1]:
        raise ValueError(f"x [..., {matrix.cols}] and grad_output [..., {matrix.rows}] must share their leading "
                         f"shape, got {tuple(x.shape)} and {tuple(grad_output.shape)}")
    x2 = x.detach().reshape(-1, matrix.cols).to(torch.float32)
    g2 = grad_output.detach().reshape(-1, matrix.rows).to(torch.float32)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    g2 = g2 if g2.stride(-1) == 1 else g2.contiguous()
    if x2.shape[0] == 0 or matrix.nnz == 0:
        return torch.zeros(matrix.nnz, dtype=torch.float32)
    return get_backend(backend).sddmm(matrix, x2, g2, _threads_for(matrix.nnz * x2.shape[0]))
