/* CPU kernels for sparsearch.runtime: y = W x + b with W in column-panelled CSR.
 *
 * Layout: W (rows x cols) is cut into column panels of `panel_width` columns. Segment (p, i) holds the
 * non-zeros of row i inside panel p: values[seg_ptr[p*rows+i] .. seg_ptr[p*rows+i+1]) with column indices
 * local to the panel (uint16, so any layer width works). Panels keep the slice of the activations that a
 * panel touches inside the L2 cache.
 *
 * Batched kernel: works on transposed activations X^T (cols x batch, row stride ldx) and writes Y^T
 * (rows x batch, row stride ldy), so every non-zero w_ij becomes a broadcast FMA over a contiguous run of the
 * batch. 64 floats of the batch are kept in registers at a time. Threads take nnz-balanced row chunks.
 * When the kernel transposes the input itself, it stores X^T as batch tiles of 64 (tile t: cols x 64,
 * contiguous): with a plain cols x batch layout and batch > 64 the 256 bytes a tile reads from each 1 KB row
 * (batch 256) fall into a quarter of the L2 cache sets, and a panel's activations no longer stay in L2.
 * Written with GCC/Clang vector extensions so it compiles for any target; built with -march=native it uses
 * AVX2/FMA (or AVX-512, NEON) on the machine that builds it.
 */
#include <stdint.h>
#include <string.h>

typedef float vec8 __attribute__((vector_size(32), aligned(4)));

/* Work is cut into this many nnz-balanced row chunks per thread and handed out dynamically, so a thread that
 * the OS deschedules (other jobs on the same cores) delays only its current chunk, not a fixed half. */
#define CHUNKS_PER_THREAD 8

/* Rows [first, last) for chunk t of n so that each thread gets about the same number of non-zeros. */
static void balanced_rows(const int64_t* row_nnz_prefix, int64_t rows, int t, int n, int64_t* first,
                          int64_t* last) {
    int64_t total = row_nnz_prefix[rows];
    int64_t targets[2] = {total * t / n, total * (t + 1) / n};
    int64_t bounds[2];
    for (int side = 0; side < 2; side++) {
        int64_t lo = 0, hi = rows;
        while (lo < hi) {
            int64_t mid = (lo + hi) / 2;
            if (row_nnz_prefix[mid] < targets[side]) lo = mid + 1; else hi = mid;
        }
        bounds[side] = lo;
    }
    *first = bounds[0];
    *last = (t == n - 1) ? rows : bounds[1];
}

#define DEFINE_TILE(NV)                                                                                 \
    static inline void tile_##NV(const float* values, const uint16_t* cols, int64_t k0, int64_t k1,     \
                                 const float* xt, int64_t ldx, float* y, int accumulate, float init) { \
        vec8 acc[NV];                                                                                   \
        for (int v = 0; v < NV; v++) {                                                                  \
            if (accumulate) memcpy(&acc[v], y + 8 * v, sizeof(vec8));                                   \
            else acc[v] = (vec8){init, init, init, init, init, init, init, init};                       \
        }                                                                                               \
        for (int64_t k = k0; k < k1; k++) {                                                             \
            const float w = values[k];                                                                  \
            const float* x = xt + (int64_t)cols[k] * ldx;                                               \
            for (int v = 0; v < NV; v++) acc[v] += w * *(const vec8*)(x + 8 * v);                       \
        }                                                                                               \
        for (int v = 0; v < NV; v++) memcpy(y + 8 * v, &acc[v], sizeof(vec8));                         \
    }
DEFINE_TILE(1) DEFINE_TILE(2) DEFINE_TILE(3) DEFINE_TILE(4)
DEFINE_TILE(5) DEFINE_TILE(6) DEFINE_TILE(7) DEFINE_TILE(8)

/* Batch columns that do not fill a vector of 8: plain scalar accumulation. */
static inline void tile_tail(const float* values, const uint16_t* cols, int64_t k0, int64_t k1,
                             const float* xt, int64_t ldx, float* y, int width, int accumulate, float init) {
    float acc[8];
    for (int c = 0; c < width; c++) acc[c] = accumulate ? y[c] : init;
    for (int64_t k = k0; k < k1; k++) {
        const float w = values[k];
        const float* x = xt + (int64_t)cols[k] * ldx;
        for (int c = 0; c < width; c++) acc[c] += w * x[c];
    }
    for (int c = 0; c < width; c++) y[c] = acc[c];
}

#define BATCH_TILE 64

/* Y^T rows [first, last) = W X^T (+ bias) for all batch columns. X^T is either cols x batch with row stride ldx
 * (tiled = 0) or tiled: batch tile b0 is a contiguous cols x width block at xt + b0 * ncols. */
static void rows_matmul_t(int64_t first, int64_t last, int64_t rows, int64_t panels, int64_t panel_width,
                          const int64_t* seg_ptr, const uint16_t* cols, const float* values, const float* bias,
                          const float* xt, int64_t ldx, int tiled, int64_t ncols, int64_t batch, float* yt,
                          int64_t ldy) {
    for (int64_t b0 = 0; b0 < batch; b0 += BATCH_TILE) {
        int64_t width = batch - b0 < BATCH_TILE ? batch - b0 : BATCH_TILE;
        int vectors = (int)(width / 8);
        int tail = (int)(width % 8);
        const float* tile = tiled ? xt + b0 * ncols : xt + b0;
        int64_t ld_tile = tiled ? width : ldx;
        for (int64_t p = 0; p < panels; p++) {
            const int64_t* seg = seg_ptr + p * rows;
            const float* x = tile + p * panel_width * ld_tile;
            int accumulate = p > 0;
            for (int64_t i = first; i < last; i++) {
                float init = bias ? bias[i] : 0.0f;
                float* y = yt + i * ldy + b0;
                int64_t k0 = seg[i], k1 = seg[i + 1];
                switch (vectors) {
                    case 8: tile_8(values, cols, k0, k1, x, ld_tile, y, accumulate, init); break;
                    case 7: tile_7(values, cols, k0, k1, x, ld_tile, y, accumulate, init); break;
                    case 6: tile_6(values, cols, k0, k1, x, ld_tile, y, accumulate, init); break;
                    case 5: tile_5(values, cols, k0, k1, x, ld_tile, y, accumulate, init); break;
                    case 4: tile_4(values, cols, k0, k1, x, ld_tile, y, accumulate, init); break;
                    case 3: tile_3(values, cols, k0, k1, x, ld_tile, y, accumulate, init); break;
                    case 2: tile_2(values, cols, k0, k1, x, ld_tile, y, accumulate, init); break;
                    case 1: tile_1(values, cols, k0, k1, x, ld_tile, y, accumulate, init); break;
                    default: break;
                }
                if (tail)
                    tile_tail(values, cols, k0, k1, x + 8 * vectors, ld_tile, y + 8 * vectors, tail, accumulate,
                              init);
            }
        }
    }
}

/* dst[c, r] = src[r, c] for r in [r0, r1), c in [c0, c1), in blocks of 8 rows x 64 columns: the 8 source rows
 * are read as 8 sequential streams, which fit the 8 ways of an L1 set even when the row stride is a power of two
 * (32 rows 4 KB apart, the previous block shape, land in one set and evict each other: the full Linear of a
 * 98%-sparse 1024x1024 layer at batch 64 took about twice as long with it on the benchmark machine). */
#define TR_ROWS 8
#define TR_COLS 64
static void transpose_block(int64_t r0, int64_t r1, int64_t c0, int64_t c1, const float* src, int64_t lds,
                            float* dst, int64_t ldd) {
    for (int64_t rb = r0; rb < r1; rb += TR_ROWS)
        for (int64_t cb = c0; cb < c1; cb += TR_COLS) {
            int64_t re = rb + TR_ROWS < r1 ? rb + TR_ROWS : r1, ce = cb + TR_COLS < c1 ? cb + TR_COLS : c1;
            for (int64_t c = cb; c < ce; c++)
                for (int64_t r = rb; r < re; r++) dst[c * ldd + r] = src[r * lds + c];
        }
}

/* y[batch, rows] = x W^T (+ bias), the whole Linear in one parallel region (one barrier: after the input
 * transpose), because on shared cores every barrier can wait for a descheduled thread.
 * If x is given (batch x cols, row stride ldx_in) it is first transposed into the scratch xt (cols x batch
 * floats, in batch tiles; ldx is ignored); otherwise xt already holds X^T with row stride ldx. Each chunk
 * computes its rows of Y^T into the scratch yt (rows x batch) and writes them transposed into y (batch x rows,
 * contiguous), unless y is NULL (the caller wants Y^T). */
void panel_csr_linear(int64_t rows, int64_t panels, int64_t panel_width, const int64_t* seg_ptr,
                      const int64_t* row_nnz_prefix, const uint16_t* cols, const float* values,
                      const float* bias, const float* x, int64_t ldx_in, float* xt, int64_t ldx, int64_t batch,
                      int64_t ncols, float* yt, float* y, int threads) {
    int64_t chunks = threads > 1 ? (int64_t)threads * CHUNKS_PER_THREAD : 1;
    int64_t col_blocks = (ncols + 31) / 32;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        if (x) {
#pragma omp for schedule(static)
            for (int64_t cb = 0; cb < col_blocks; cb++) {
                int64_t c0 = cb * 32, c1 = c0 + 32 < ncols ? c0 + 32 : ncols;
                for (int64_t b0 = 0; b0 < batch; b0 += BATCH_TILE) {
                    int64_t width = batch - b0 < BATCH_TILE ? batch - b0 : BATCH_TILE;
                    transpose_block(0, width, c0, c1, x + b0 * ldx_in, ldx_in, xt + b0 * ncols, width);
                }
            }
        }
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t chunk = 0; chunk < chunks; chunk++) {
            int64_t first, last;
            balanced_rows(row_nnz_prefix, rows, chunk, chunks, &first, &last);
            rows_matmul_t(first, last, rows, panels, panel_width, seg_ptr, cols, values, bias, xt, ldx, x != 0,
                          ncols, batch, yt, batch);
            if (y) transpose_block(first, last, 0, batch, yt, batch, y, rows);
        }
    }
}

/* y[rows] = W x (+ bias) for a single contiguous input vector (memory-bound: bytes per non-zero matter). */
void panel_csr_matvec(int64_t rows, int64_t panels, int64_t panel_width, const int64_t* seg_ptr,
                      const int64_t* row_nnz_prefix, const uint16_t* cols, const float* values,
                      const float* bias, const float* x, float* y, int threads) {
    int64_t chunks = threads > 1 ? (int64_t)threads * CHUNKS_PER_THREAD : 1;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1)
    for (int64_t chunk = 0; chunk < chunks; chunk++) {
        int64_t first, last;
        balanced_rows(row_nnz_prefix, rows, chunk, chunks, &first, &last);
        for (int64_t i = first; i < last; i++) {
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
            for (int64_t p = 0; p < panels; p++) {
                const float* xp = x + p * panel_width;
                int64_t k = seg_ptr[p * rows + i], end = seg_ptr[p * rows + i + 1];
                for (; k + 4 <= end; k += 4) {
                    s0 += values[k] * xp[cols[k]];
                    s1 += values[k + 1] * xp[cols[k + 1]];
                    s2 += values[k + 2] * xp[cols[k + 2]];
                    s3 += values[k + 3] * xp[cols[k + 3]];
                }
                for (; k < end; k++) s0 += values[k] * xp[cols[k]];
            }
            y[i] = ((s0 + s1) + (s2 + s3)) + (bias ? bias[i] : 0.0f);
        }
    }
}

