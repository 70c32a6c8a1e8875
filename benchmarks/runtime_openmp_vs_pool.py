"""Why the kernels run on their own thread pool: the previous OpenMP build against the current one, quiet and
next to one competing busy process, on the 4096x4096 layer at 90% sparsity.

The OpenMP version is the C source at commit c275508 (read with `git show`, compiled here with -fopenmp), called
with the same arrays. Candidates per round: dense `F.linear`, OpenMP kernel (2 threads), current kernel (2
threads, which may choose one thread per layer by measurement), current kernel on one thread.
Run: python benchmarks/runtime_openmp_vs_pool.py (about 2 minutes; needs git and gcc)
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from runtime_common import interleaved_times, machine, write_results
from runtime_contention import BusyProcess, weight_at

from sparsearch.runtime import PanelCSRMatrix, sparse_linear

OPENMP_COMMIT = "c275508"
SOURCE = "src/sparsearch/kernels/csrc/sparse_kernels.c"


def openmp_library(workdir: Path) -> ctypes.CDLL:
    repo = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "-C", str(repo), "show", f"{OPENMP_COMMIT}:{SOURCE}"], check=True,
                            capture_output=True, text=True).stdout
    (workdir / "omp.c").write_text(source)
    subprocess.run(["gcc", "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-o", str(workdir / "omp.so"),
                    str(workdir / "omp.c")], check=True)
    lib = ctypes.CDLL(str(workdir / "omp.so"))
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.panel_csr_linear.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64, ptr, ptr,
                                     c_int]
    lib.panel_csr_matvec.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, c_int]
    return lib


def openmp_linear(lib: ctypes.CDLL, m: PanelCSRMatrix, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    batch = x.shape[0]
    if batch == 1:
        y = torch.empty(m.rows)
        lib.panel_csr_matvec(*m.kernel_args[:-1], bias.data_ptr(), x.data_ptr(), y.data_ptr(), 2)
        return y
    xt, yt, y = torch.empty(m.cols, batch), torch.empty(m.rows, batch), torch.empty(batch, m.rows)
    lib.panel_csr_linear(*m.kernel_args[:-1], bias.data_ptr(), x.data_ptr(), x.stride(0), xt.data_ptr(), batch, batch,
                         m.cols, yt.data_ptr(), y.data_ptr(), 2)
    return y


def main() -> None:
    torch.set_num_threads(2)
    info = machine()
    weight, bias = weight_at(0.9), torch.randn(4096)
    matrix = PanelCSRMatrix.from_dense(weight)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lib = openmp_library(Path(tmp))
        for batch in (1, 64, 256):
            x = torch.randn(batch, 4096)
            expected = F.linear(x, weight, bias)
            torch.testing.assert_close(openmp_linear(lib, matrix, bias, x).reshape(batch, -1), expected,
                                       rtol=1e-4, atol=1e-3)
            fns = {"dense": lambda x=x: F.linear(x, weight, bias),
                   "openmp": lambda x=x: openmp_linear(lib, matrix, bias, x),
                   "pool": lambda x=x: sparse_linear(x, matrix, bias),
                   "one_thread": lambda x=x: sparse_linear(x, matrix, bias, threads=1)}
            for condition in ("quiet", "busy"):
                load = [round(v, 2) for v in os.getloadavg()]
                if condition == "busy":
                    with BusyProcess():
                        med, _ = interleaved_times(fns, min_rounds=5, max_rounds=30, budget_s=3.0)
                else:
                    med, _ = interleaved_times(fns, min_rounds=5, max_rounds=30, budget_s=3.0)
                row = {"batch": batch, "condition": condition, "load_average_before": load,
                       "ms": {k: v * 1e3 for k, v in med.items()},
                       "speedup": {k: med["dense"] / v for k, v in med.items() if k != "dense"}}
                rows.append(row)
                print(row, flush=True)
    lines = ["4096x4096 at 90% sparsity, fp32, 2 threads; speed-up over dense `F.linear` (median / median, "
             "interleaved) in the same condition.\n",
             "| batch | condition | load avg before | dense ms | OpenMP (c275508) | own pool (now) | one thread |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["speedup"]
        lines.append(f"| {r['batch']} | {r['condition']} | {r['load_average_before'][0]} | {r['ms']['dense']:.2f} | "
                     f"{s['openmp']:.2f}x | {s['pool']:.2f}x | {s['one_thread']:.2f}x |")
    write_results("runtime_openmp_vs_pool", {"machine": info, "results": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
