/* CPU kernels for sparsearch.runtime: y = W x + b with W in column-panelled CSR.
 *
 * Layout: W (rows x cols) is cut into column panels of `panel_width` columns. Segment (p, i) holds the
 * non-zeros of row i inside panel p: values[seg_ptr[p*rows+i] .. seg_ptr[p*rows+i+1]) with column indices
 * local to the panel (uint16, so any layer width works). Panels keep the slice of the activations that a
 * panel touches inside the L2 cache.
 *
 * Batched kernel: works on transposed activations X^T (cols x batch, row stride ldx) and writes Y^T
 * (rows x batch, row stride ldy), so every non-zero w_ij becomes a broadcast FMA over a contiguous run of the
 * batch. 64 floats of the batch are kept in registers at a time. Threads take nnz-balanced row chunks from a
 * shared counter, for small calls on PyTorch's OpenMP team and otherwise on the library's own pool (see "Thread pool"
 * below).
 * When the kernel transposes the input itself, it stores X^T as batch tiles of 64 (tile t: cols x 64,
 * contiguous): with a plain cols x batch layout and batch > 64 the 256 bytes a tile reads from each 1 KB row
 * (batch 256) fall into a quarter of the L2 cache sets, and a panel's activations no longer stay in L2.
 * Written with GCC/Clang vector extensions so it compiles for any target; built with -march=native it uses
 * AVX2/FMA (or AVX-512, NEON) on the machine that builds it.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef float vec8 __attribute__((vector_size(32), aligned(4)));
/* 16 floats: one AVX-512 register (two AVX2 ones elsewhere); for batch tiles of 32 or more it took 1.2-1.6x less
 * time than 8-float vectors at batch 64 and 256 on the benchmark machine, and more at batch 16, hence both. */
typedef float vec16 __attribute__((vector_size(64), aligned(4)));

/* ---- Activations fused into a layer's output -------------------------------------------------------------
 * y = act(x W^T + b) in one call: a transformer's feed-forward layer is followed by GELU, and as a separate PyTorch
 * op that was another pass over the layer's output, another allocation and another dispatch; here it is a pass over
 * each chunk's outputs while they are in L1. all-MiniLM-L6-v2 at 90%, one sentence per call: 2.04x-2.05x the dense
 * model fused, 1.93x unfused, in the same rounds (medians of five processes, benchmarks/results/runtime_targets.md).
 * Codes: the positions in sparsearch.kernels.cpu.ACTIVATIONS. Written with GCC's generic vectors, so the
 * AVX-512, AVX2 and scalar builds share the code. */
#define ACT_NONE 0
#define ACT_RELU 1
#define ACT_GELU 2       /* x/2 (1 + erf(x / sqrt 2)), PyTorch's GELU (approximate="none") */
#define ACT_GELU_TANH 3  /* x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GELU(approximate="tanh"), GPT-2's */
typedef int32_t vec16i __attribute__((vector_size(64), aligned(4)));

static inline vec16 splat16(float v) { return (vec16){0} + v; }
/* a where mask (a comparison's lanes: -1 or 0), else b; a NaN compares false, so where it is "a" it stays */
static inline vec16 select16(vec16i mask, vec16 a, vec16 b) {
    return (vec16)(((vec16i)a & mask) | ((vec16i)b & ~mask));
}
/* e^v, v clamped to [-87, 88] (no overflow, no denormal), as 2^n e^r, |r| <= ln(2)/2, e^r by Cephes' expf polynomial:
 * relative error about 1e-7 */
static inline vec16 exp16(vec16 v) {
    v = select16(v < -87.0f, splat16(-87.0f), v);
    v = select16(v > 88.0f, splat16(88.0f), v);
    const vec16 shifter = splat16(12582912.0f);  /* 1.5 * 2^23: adding it rounds to the nearest integer */
    vec16 t = v * 1.44269504088896341f + shifter;
    vec16i n = (vec16i)t - (vec16i)shifter;
    vec16 nf = t - shifter;
    vec16 r = v - nf * 0.693359375f + nf * 2.12194440e-4f;  /* ln 2 in two parts */
    vec16 p = splat16(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * (vec16)((n + 127) << 23);
}
/* erf by Abramowitz and Stegun 7.1.26 (absolute error <= 1.5e-7), the approximation PyTorch's vectorised erf uses */
static inline vec16 erf16(vec16 x) {
    vec16i sign = (vec16i)x & (int32_t)0x80000000;
    vec16 a = (vec16)((vec16i)x & 0x7FFFFFFF);
    vec16 t = 1.0f / (1.0f + 0.3275911f * a);
    vec16 p = splat16(1.061405429f);
    p = p * t - 1.453152027f;
    p = p * t + 1.421413741f;
    p = p * t - 0.284496736f;
    p = p * t + 0.254829592f;
    vec16 y = 1.0f - p * t * exp16(-a * a);
    return (vec16)((vec16i)y | sign);
}
static inline vec16 activate16(vec16 x, int activation) {
    switch (activation) {
        case ACT_RELU: return select16(x < 0.0f, splat16(0.0f), x);
        case ACT_GELU: return 0.5f * x * (1.0f + erf16(x * 0.70710678118654752f));
        /* x (1 + tanh u) / 2 = x sigmoid(2u) = x / (1 + e^(-2u)) */
        case ACT_GELU_TANH: return x / (1.0f + exp16(-1.5957691216057308f * (x + 0.044715f * x * x * x)));
        default: return x;
    }
}
/* y[0, n) = act(y[0, n)) */
static void apply_activation(float* y, int64_t n, int activation) {
    if (activation == ACT_NONE) return;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) *(vec16*)(y + i) = activate16(*(const vec16*)(y + i), activation);
    if (i < n) {  /* the last few through a whole vector */
        vec16 tail = {0};
        memcpy(&tail, y + i, (size_t)(n - i) * sizeof(float));
        tail = activate16(tail, activation);
        memcpy(y + i, &tail, (size_t)(n - i) * sizeof(float));
    }
}

/* Work is cut into this many nnz-balanced row chunks per thread and handed out dynamically, so a thread that
 * the OS deschedules (other jobs on the same cores) delays only its current chunk, not a fixed half. */
#define CHUNKS_PER_THREAD 16


/* ---- Thread pool ----------------------------------------------------------------------------------------
 * Why not OpenMP for every call (small calls do use it, see run_chunks): on a CPU shared with other busy processes,
 * an OpenMP parallel region ends with a barrier that waits for every thread of the team, including one the OS has
 * not scheduled at all during the region, and its threads spin while they wait, taking the CPU from the thread being
 * waited for. With one competing busy process on 2 cores, that made the 4096x4096 kernel at batch 64 13x slower
 * (dense F.linear: 2.4x slower).
 * Here the calling thread always works, helper threads join when the OS runs them and sleep (no spinning) when
 * there is no work, and the caller waits only for chunks a helper has actually started, never for a helper
 * that has not shown up. Chunks are claimed from one atomic word that also holds the job's generation, so a
 * helper that wakes up late can never take a chunk of a job that has finished. */
/* Weights are float32 values, or int8 values q with one float32 scale per segment (the non-zeros of one row inside
 * one column panel): the weight of non-zero k of segment s is q[k] * scales[s]. The code below reads the scale of
 * the segment it works on into `scale`. 1 + 2 bytes per non-zero (+ 4 per segment) instead of 6. */
#define WEIGHT(k) (q ? (float)q[k] * scale : values[k])
#define ALWAYS_INLINE __attribute__((always_inline))

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

typedef void (*chunk_fn)(const void* ctx, int64_t chunk, int64_t chunks);

#define MAX_HELPERS 255
#define GEN_SHIFT 42
#define CHUNKS_SHIFT 21
#define FIELD_MASK ((1LL << 21) - 1)

static struct {
    pthread_mutex_t lock, job;  /* job: held by the one caller using the pool (others run serially) */
    pthread_cond_t wake, done;
    int helpers;               /* helper threads started so far */
    int allowed;               /* helpers that may join the current job (threads - 1) */
    atomic_int joined;         /* helpers that joined the current job */
    uint64_t generation;       /* bumped per job, under lock */
    atomic_llong claim;        /* generation << 42 | chunks << 21 | next chunk */
    atomic_llong finished;     /* chunks finished in the current job */
    chunk_fn fn;
    const void* ctx;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .job = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER,
            .done = PTHREAD_COND_INITIALIZER};

/* fork() copies only the calling thread: the child starts with no helpers and fresh locks, and without OpenMP (GNU
 * libgomp is not fork-safe: a region in the child waits for the parent's team forever). */
static int openmp_usable = 1;
static void before_fork(void) { pthread_mutex_lock(&pool.lock); }
static void after_fork_parent(void) { pthread_mutex_unlock(&pool.lock); }
static void after_fork_child(void) {
    openmp_usable = 0;
    pthread_mutex_init(&pool.lock, NULL);
    pthread_mutex_init(&pool.job, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.helpers = 0;
}
/* at load, not at the pool's first use: a process whose layers only ever ran on OpenMP must still mark its child */
__attribute__((constructor)) static void install_fork_handlers(void) {
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}

/* Claim and run chunks of the job whose claim word carries generation `gen`; returns when none are left. */
static void work_on(uint64_t gen, int is_caller) {
    for (;;) {
        long long word = atomic_load(&pool.claim);
        if ((uint64_t)(word >> GEN_SHIFT) != (gen & ((1ULL << 21) - 1))) return;
        long long chunks = (word >> CHUNKS_SHIFT) & FIELD_MASK, next = word & FIELD_MASK;
        if (next >= chunks) return;
        if (!atomic_compare_exchange_weak(&pool.claim, &word, word + 1)) continue;
        /* the job cannot finish (and fn/ctx cannot change) before this chunk is counted */
        pool.fn(pool.ctx, next, chunks);
        if (atomic_fetch_add(&pool.finished, 1) + 1 == chunks && !is_caller) {
            pthread_mutex_lock(&pool.lock);
            pthread_cond_signal(&pool.done);
            pthread_mutex_unlock(&pool.lock);
        }
    }
}

static void* helper_main(void* unused) {
    (void)unused;
    uint64_t seen = 0;
    pthread_mutex_lock(&pool.lock);
    seen = pool.generation;
    for (;;) {
        while (pool.generation == seen) pthread_cond_wait(&pool.wake, &pool.lock);
        seen = pool.generation;
        int allowed = pool.allowed;
        pthread_mutex_unlock(&pool.lock);
        if (atomic_fetch_add(&pool.joined, 1) < allowed) work_on(seen, 0);
        pthread_mutex_lock(&pool.lock);
    }
    return NULL;
}

/* Run fn(ctx, c, chunks) for c in [0, chunks) on the caller and up to threads - 1 helpers. */
static void run_parallel(chunk_fn fn, const void* ctx, int64_t chunks, int threads) {
    if (threads <= 1 || chunks <= 1 || chunks > FIELD_MASK || pthread_mutex_trylock(&pool.job) != 0) {
        for (int64_t c = 0; c < chunks; c++) fn(ctx, c, chunks);
        return;
    }
    if (threads - 1 > MAX_HELPERS) threads = MAX_HELPERS + 1;
    pthread_mutex_lock(&pool.lock);
    while (pool.helpers < threads - 1) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, helper_main, NULL) != 0) break;
        pthread_detach(thread);
        pool.helpers++;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    pool.allowed = threads - 1;
    atomic_store(&pool.joined, 0);
    atomic_store(&pool.finished, 0);
    uint64_t gen = ++pool.generation;
    atomic_store(&pool.claim, (long long)((gen & ((1ULL << 21) - 1)) << GEN_SHIFT) | (chunks << CHUNKS_SHIFT));
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    work_on(gen, 1);
    /* wait for chunks that helpers started: a short spin (they are usually almost done), then sleep */
    for (int spin = 0; spin < 4000 && atomic_load(&pool.finished) < chunks; spin++) CPU_RELAX();
    if (atomic_load(&pool.finished) < chunks) {
        pthread_mutex_lock(&pool.lock);
        while (atomic_load(&pool.finished) < chunks) pthread_cond_wait(&pool.done, &pool.lock);
        pthread_mutex_unlock(&pool.lock);
    }
    pthread_mutex_unlock(&pool.job);
}

/* ---- Small calls on PyTorch's OpenMP team -----------------------------------------------------------------
 * Built with -fopenmp only where PyTorch's own libgomp is loaded under its plain soname (sparsearch/kernels/cpu.py),
 * so the library binds to that runtime and its regions run on PyTorch's team, whose workers spin for a while after
 * each of PyTorch's ops. Inside a model, a layer between two PyTorch ops then finds its second thread running, where
 * the pool's helper must be woken (26 to 94 us median on the benchmark VM, a tenth of a small layer's call or more)
 * and then shares a core with that spinning worker. A region ends with a barrier that waits for every thread of the
 * team, started or not, which is what makes OpenMP slow next to a busy process (see the pool's comment): so only
 * calls below OPENMP_MAX_WORK multiply-adds (a millisecond or so) use it, and for those the per-layer choice between
 * one thread and two (below) still falls back to one thread when the machine is busy; larger calls, where a wake-up
 * costs little, keep the pool. */
#define OPENMP_MAX_WORK (1LL << 22)
#if defined(_OPENMP)
static void run_openmp(chunk_fn fn, const void* ctx, int64_t chunks, int threads) {
    atomic_llong next = 0;
#pragma omp parallel num_threads(threads)
    for (;;) {
        long long chunk = atomic_fetch_add(&next, 1);
        if (chunk >= chunks) break;
        fn(ctx, chunk, chunks);
    }
}
#endif

static int openmp_allowed = 1;
/* 1 if small calls run on PyTorch's OpenMP team (built with -fopenmp, not in a forked child, allowed). */
int panel_csr_uses_openmp(void) {
#if defined(_OPENMP)
    return openmp_usable && openmp_allowed;
#else
    return 0;
#endif
}
/* Let small calls use PyTorch's OpenMP team (1, the default) or keep every call on the pool (0): for comparisons. */
void panel_csr_allow_openmp(int allowed) { openmp_allowed = allowed != 0; }

/* Run the chunks of a call of `work` multiply-adds: on OpenMP if it is small (see above), else on the pool. */
static void run_chunks(chunk_fn fn, const void* ctx, int64_t chunks, int threads, double work) {
#if defined(_OPENMP)
    if (threads > 1 && chunks > 1 && work < (double)OPENMP_MAX_WORK && panel_csr_uses_openmp()) {
        run_openmp(fn, ctx, chunks, threads);
        return;
    }
#else
    (void)work;
#endif
    run_parallel(fn, ctx, chunks, threads);
}

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

/* A row's non-zeros as broadcast FMAs over NV vectors (of LANES floats) of the batch tile, with U independent sets of
 * accumulators (non-zeros k, k+1, ..., k+U-1 go to different sets, summed at the end): with one set every FMA waits
 * for the previous one (4 cycles), and a tile of one or two vectors, the sentence-sized batches of a transformer, was
 * bound by that latency. Against one set, old and new kernels in one run (benchmarks/results/runtime_small_layers.md,
 * 90%, MiniLM and GPT-2 shapes): 1.13-1.37x faster at 8 to 16 rows (one 16-float vector, 4 sets; it replaced two
 * 8-float vectors), within +-6% at 32 rows (2 sets); at 24 rows (3 vectors of 8) and 64 (4 of 16) two sets were
 * 5-20% slower in a side-by-side build, so those keep one.
 * Accumulators are loaded, initialised and stored as whole vectors: with memcpy and a per-lane init, GCC (which prefers
 * 256-bit moves on this CPU) wrote each 16-float vector as two halves and read it back whole, a failed store-to-load
 * forward per row; direct vector accesses made the calls 1.05-1.31x faster at 11 to 33 rows on the MiniLM and GPT-2
 * shapes (90%, one thread, old and new builds interleaved; 8 rows use 8-float vectors and were unchanged). */
/* int8 is a compile-time constant in every caller (rows_matmul_t instantiates its body for float32 and for int8):
 * with the weight's type tested per non-zero, the float32 loop carried a test and branch per non-zero and loaded the
 * weight into a register before broadcasting it. int8 weights are turned into scaled floats INT8_BLOCK at a time
 * (one vector conversion per 16) in a buffer on the stack, and the float32 loop runs on that buffer: converting and
 * scaling each weight where it is broadcast cost four more instructions per non-zero. Time of int8 over float32, the
 * same layers in one process (MiniLM shapes at 90%, 11 to 33 rows, one thread, two runs per build): 1.06-1.10
 * (geometric means) against 1.18-1.19 before; float32 unchanged (new over old 0.996 and 0.998); a block of 256 measured
 * the same as 64; the same blocks converted by GCC's vectorised loop (up to 15 scalar conversions at the end)
 * 1.12-1.14. */
#define INT8_BLOCK 64
#if defined(__AVX512F__)
/* The first `left` of 16 lanes (none if left <= 0, all if left >= 16): the mask of a loop's last, partial vector. */
static inline ALWAYS_INLINE __mmask16 first_lanes(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
}
#endif
static inline ALWAYS_INLINE void dequantise_block(const int8_t* q, int64_t n, float scale, float* w) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    /* 16 at a time with a masked load at the end: a segment of a small layer holds a few dozen non-zeros, and
     * GCC's vectorised loop finished them with up to 15 scalar conversions */
    const __m512 s = _mm512_set1_ps(scale);
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 live = first_lanes(n - j);
        __m128i bytes = _mm_maskz_loadu_epi8(live, q + j);
        _mm512_store_ps(w + j, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), s));
    }
#else
    for (int64_t j = 0; j < n; j++) w[j] = (float)q[j] * scale;
#endif
}
#define DEFINE_TILE(NAME, VT, LANES, NV, U)                                                             \
    static inline ALWAYS_INLINE void NAME##_span(const float* w, const uint16_t* cols, int64_t n,               \
                                                 const float* xt, int64_t ldx, VT acc[U][NV]) {             \
        int64_t k = 0;                                                                                  \
        for (; k + U <= n; k += U)                                                                      \
            for (int u = 0; u < U; u++) {                                                               \
                const float* x = xt + (int64_t)cols[k + u] * ldx;                                       \
                for (int v = 0; v < NV; v++) acc[u][v] += w[k + u] * *(const VT*)(x + LANES * v);       \
            }                                                                                           \
        for (; k < n; k++) {                                                                            \
            const float* x = xt + (int64_t)cols[k] * ldx;                                               \
            for (int v = 0; v < NV; v++) acc[0][v] += w[k] * *(const VT*)(x + LANES * v);               \
        }                                                                                               \
    }                                                                                                   \
    static inline ALWAYS_INLINE void NAME(const float* values, const int8_t* q, float scale, const uint16_t* cols,   \
                                          int64_t k0, int64_t k1, const float* xt, int64_t ldx, float* y,          \
                                          int accumulate, float init, const int int8) {                           \
        VT acc[U][NV];                                                                                  \
        for (int v = 0; v < NV; v++) {                                                                  \
            acc[0][v] = accumulate ? *(const VT*)(y + LANES * v) : (VT){0} + init;                       \
            for (int u = 1; u < U; u++) acc[u][v] = (VT){0};                                            \
        }                                                                                               \
        if (int8) {                                                                                     \
            float w[INT8_BLOCK] __attribute__((aligned(64)));                                           \
            for (int64_t kb = k0; kb < k1; kb += INT8_BLOCK) {                                          \
                int64_t n = k1 - kb < INT8_BLOCK ? k1 - kb : INT8_BLOCK;                                \
                dequantise_block(q + kb, n, scale, w);                                                  \
                NAME##_span(w, cols + kb, n, xt, ldx, acc);                                             \
            }                                                                                           \
        } else {                                                                                        \
            NAME##_span(values + k0, cols + k0, k1 - k0, xt, ldx, acc);                                 \
        }                                                                                               \
        for (int u = 1; u < U; u++)                                                                     \
            for (int v = 0; v < NV; v++) acc[0][v] += acc[u][v];                                        \
        for (int v = 0; v < NV; v++) *(VT*)(y + LANES * v) = acc[0][v];                                \
    }
DEFINE_TILE(tile_1, vec8, 8, 1, 4) DEFINE_TILE(tile_3, vec8, 8, 3, 1)
DEFINE_TILE(tile16_1, vec16, 16, 1, 4) DEFINE_TILE(tile16_2, vec16, 16, 2, 2)
DEFINE_TILE(tile16_3, vec16, 16, 3, 1) DEFINE_TILE(tile16_4, vec16, 16, 4, 1)

/* Batch columns that do not fill a vector of 8: plain scalar accumulation. */
static inline ALWAYS_INLINE void tile_tail(const float* values, const int8_t* q, float scale, const uint16_t* cols,
                                           int64_t k0, int64_t k1, const float* xt, int64_t ldx, float* y, int width,
                                           int accumulate, float init, const int int8) {
    float acc[8];
    for (int c = 0; c < width; c++) acc[c] = accumulate ? y[c] : init;
    for (int64_t k = k0; k < k1; k++) {
        const float w = int8 ? (float)q[k] * scale : values[k];
        const float* x = xt + (int64_t)cols[k] * ldx;
        for (int c = 0; c < width; c++) acc[c] += w * x[c];
    }
    for (int c = 0; c < width; c++) y[c] = acc[c];
}

/* Tried for batch 256 (4096x4096, 90%, 2 threads, same quiet run): tiles of 128 (8 vectors), and software
 * prefetch of the X^T rows 4 or 8 non-zeros ahead; medians 17.6-18.5 ms against 18.6 ms for this code, within
 * the run's spread, so neither was kept. */
#define BATCH_TILE 64

/* Y^T rows [first, last) = W X^T (+ bias) for all batch columns. X^T is either cols x batch with row stride ldx
 * (tiled = 0) or tiled: batch tile b0 is a contiguous cols x width block at xt + b0 * ncols. */
static inline ALWAYS_INLINE void rows_matmul_t_body(
        int64_t first, int64_t last, int64_t rows, int64_t panels, int64_t panel_width, const int64_t* seg_ptr,
        const uint16_t* cols, const float* values, const int8_t* q, const float* scales, const float* bias,
        const float* xt, int64_t ldx, int tiled, int64_t ncols, int64_t batch, float* yt, int64_t ldy,
        const int int8) {
    for (int64_t b0 = 0; b0 < batch; b0 += BATCH_TILE) {
        int64_t width = batch - b0 < BATCH_TILE ? batch - b0 : BATCH_TILE;
        int vectors = (int)(width / 8);
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
                const float scale = scales ? scales[p * rows + i] : 1.0f;
                int done = 0;  /* batch columns of this tile handled so far */
                if (width >= 32) {
                    done = (int)(width / 16) * 16;
                    switch (width / 16) {
                        case 4: tile16_4(values, q, scale, cols, k0, k1, x, ld_tile, y, accumulate, init, int8); break;
                        case 3: tile16_3(values, q, scale, cols, k0, k1, x, ld_tile, y, accumulate, init, int8); break;
                        default: tile16_2(values, q, scale, cols, k0, k1, x, ld_tile, y, accumulate, init, int8); break;
                    }
                    if (width - done >= 8) {
                        tile_1(values, q, scale, cols, k0, k1, x + done, ld_tile, y + done, accumulate, init, int8);
                        done += 8;
                    }
                } else {
                    done = vectors * 8;
                    switch (vectors) {
                        case 3: tile_3(values, q, scale, cols, k0, k1, x, ld_tile, y, accumulate, init, int8); break;
                        case 2: tile16_1(values, q, scale, cols, k0, k1, x, ld_tile, y, accumulate, init, int8); break;
                        case 1: tile_1(values, q, scale, cols, k0, k1, x, ld_tile, y, accumulate, init, int8); break;
                        default: break;
                    }
                }
                int tail = (int)(width - done);
                if (tail)
                    tile_tail(values, q, scale, cols, k0, k1, x + done, ld_tile, y + done, tail, accumulate,
                              init, int8);
            }
        }
    }
}

static void rows_matmul_t(int64_t first, int64_t last, int64_t rows, int64_t panels, int64_t panel_width,
                          const int64_t* seg_ptr, const uint16_t* cols, const float* values, const int8_t* q,
                          const float* scales, const float* bias, const float* xt, int64_t ldx, int tiled,
                          int64_t ncols, int64_t batch, float* yt, int64_t ldy) {
    if (q)
        rows_matmul_t_body(first, last, rows, panels, panel_width, seg_ptr, cols, values, q, scales, bias, xt, ldx,
                           tiled, ncols, batch, yt, ldy, 1);
    else
        rows_matmul_t_body(first, last, rows, panels, panel_width, seg_ptr, cols, values, NULL, NULL, bias, xt, ldx,
                           tiled, ncols, batch, yt, ldy, 0);
}

/* dst[c, r] = src[r, c] for r in [r0, r1), c in [c0, c1), in blocks of `block_rows` rows x 64 columns. For the
 * input (source rows may be a power of two apart, e.g. 16 KB) 8 rows: 8 sequential streams fit the 8 ways of an
 * L1 set (32 rows 4 KB apart, an earlier block shape, evicted each other: a 98%-sparse 1024x1024 Linear at batch
 * 64 took about twice as long). For the output (source rows only batch floats apart) 16 rows, so that each
 * 64-byte line of the destination is written whole, once, instead of half at a time; with 8 rows the 4096x4096
 * Linear at batch 64 took 47% longer than the same kernel without transposes on one thread. */
#define TR_COLS 64
/* Inputs with fewer elements than this are transposed on the calling thread only (see panel_csr_linear). */
#define SERIAL_TRANSPOSE_ELEMENTS 32768
static void transpose_block(int64_t r0, int64_t r1, int64_t c0, int64_t c1, const float* src, int64_t lds,
                            float* dst, int64_t ldd, int64_t block_rows) {
    for (int64_t rb = r0; rb < r1; rb += block_rows)
        for (int64_t cb = c0; cb < c1; cb += TR_COLS) {
            int64_t re = rb + block_rows < r1 ? rb + block_rows : r1, ce = cb + TR_COLS < c1 ? cb + TR_COLS : c1;
            for (int64_t c = cb; c < ce; c++)
                for (int64_t r = rb; r < re; r++) dst[c * ldd + r] = src[r * lds + c];
        }
}

/* dst[c, r] = src[r, c] for c in [c0, c1), r in [0, write_rows), with src rows from `valid_rows` on read as zeros
 * (the padding of a batch tile), in 8x8 blocks transposed in registers (three rounds of shuffles): for the small
 * batches of sentence inputs the element-wise transpose_block took about as long as the multiply itself
 * (384x384 at 90%, 33 rows: transposes 30% and 16% of the time with no non-zeros at all, measured with perf). */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define HAVE_SHUFFLEVECTOR 1
#endif
#endif
#if defined(HAVE_SHUFFLEVECTOR)
static inline void transpose8(vec8* v) {
    vec8 t[8], u[8];
    for (int k = 0; k < 8; k += 2) {
        t[k] = __builtin_shufflevector(v[k], v[k + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[k + 1] = __builtin_shufflevector(v[k], v[k + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int k = 0; k < 8; k += 4)
        for (int h = 0; h < 2; h++) {
            u[k + h * 2] = __builtin_shufflevector(t[k + h], t[k + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
            u[k + h * 2 + 1] = __builtin_shufflevector(t[k + h], t[k + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    for (int j = 0; j < 4; j++) {
        v[j] = __builtin_shufflevector(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        v[j + 4] = __builtin_shufflevector(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}
#endif

static void transpose_rows(const float* src, int64_t lds, int64_t valid_rows, int64_t write_rows, int64_t c0,
                           int64_t c1, float* dst, int64_t ldd) {
    for (int64_t r = 0; r < write_rows; r += 8) {
        int64_t c = c0;
#if defined(HAVE_SHUFFLEVECTOR)
        if (r + 8 <= write_rows)
            for (; c + 8 <= c1; c += 8) {
                vec8 v[8];
                for (int k = 0; k < 8; k++) {
                    if (r + k < valid_rows) memcpy(&v[k], src + (r + k) * lds + c, sizeof(vec8));
                    else v[k] = (vec8){0, 0, 0, 0, 0, 0, 0, 0};
                }
                transpose8(v);
                for (int j = 0; j < 8; j++) memcpy(dst + (c + j) * ldd + r, &v[j], sizeof(vec8));
            }
#endif
        int64_t re = r + 8 < write_rows ? r + 8 : write_rows;
        for (; c < c1; c++)
            for (int64_t k = r; k < re; k++) dst[c * ldd + k] = k < valid_rows ? src[k * lds + c] : 0.0f;
    }
}

/* ---- One thread or all: chosen per layer by measurement ---------------------------------------------------
 * The pool never waits for a helper that has not started, but it does wait for a chunk a helper has started
 * and then lost its core to another process; on a machine with more runnable processes than cores that costs
 * a scheduler time slice per call, and one thread is faster. So each layer (keyed by its values array and a
 * batch-size bucket) keeps its last SAMPLES times per unit of work with one thread and with all, runs the mode
 * whose median is lower (a median: a single preempted call must not decide), and re-measures the other every
 * EXPLORE_EVERY calls (EXPLORE_EVERY_FAR when one is twice as fast), or as soon as its newest sample is older
 * than STALE_NS (timings from another load, e.g. taken while `convert` decided, must not hold for long), so it
 * follows the load as it comes and goes. Keys live in a small direct-mapped table: a collision only means a layer re-learns its timings. */
#define STATS_SLOTS 512
#define SAMPLES 5
#define MIN_SAMPLES 3
#define EXPLORE_EVERY 16
#define EXPLORE_EVERY_FAR 64
#define STALE_NS 2e8
typedef struct {
    const void* key;
    int64_t bucket;
    float ns_per_work[2][SAMPLES]; /* [0]: one thread, [1]: all threads; a ring of the latest samples */
    uint32_t count[2];
    uint32_t calls;           /* since the last call in the other mode */
    double last_ns[2];        /* when each mode was last measured */
} mode_stats;
static mode_stats stats_table[STATS_SLOTS];
static pthread_mutex_t stats_lock = PTHREAD_MUTEX_INITIALIZER;

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}

static int64_t batch_bucket(int64_t batch) {
    int64_t bucket = 0;
    while (batch > 1 && bucket < 12) { batch = (batch + 1) / 2; bucket++; }
    return bucket;
}

static float median_of(const float* samples, uint32_t count) {
    float sorted[SAMPLES];
    uint32_t n = count < SAMPLES ? count : SAMPLES;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t j = i;
        for (; j > 0 && sorted[j - 1] > samples[i]; j--) sorted[j] = sorted[j - 1];
        sorted[j] = samples[i];
    }
    return sorted[n / 2];
}

/* The number of threads for this call of the layer `key`; *slot receives its statistics slot (or -1). */
static int choose_threads(const void* key, int64_t batch, int threads, int* slot) {
    *slot = -1;
    if (threads <= 1) return 1;
    int64_t bucket = batch_bucket(batch);
    int index = (int)((((uintptr_t)key >> 6) ^ (uintptr_t)bucket * 0x9E3779B1u) % STATS_SLOTS);
    pthread_mutex_lock(&stats_lock);
    mode_stats* st = &stats_table[index];
    if (st->key != key || st->bucket != bucket) {
        memset(st, 0, sizeof(*st));
        st->key = key;
        st->bucket = bucket;
    }
    int parallel;
    if (st->count[0] < MIN_SAMPLES || st->count[1] < MIN_SAMPLES) {
        parallel = st->count[1] <= st->count[0];  /* learning: alternate */
    } else {
        float serial_ns = median_of(st->ns_per_work[0], st->count[0]);
        float parallel_ns = median_of(st->ns_per_work[1], st->count[1]);
        int best = parallel_ns <= serial_ns;
        float ratio = best ? serial_ns / parallel_ns : parallel_ns / serial_ns;
        uint32_t every = ratio > 2.0f ? EXPLORE_EVERY_FAR : EXPLORE_EVERY;
        int stale = now_ns() - st->last_ns[!best] > STALE_NS && st->calls >= 4;
        parallel = (++st->calls >= every || stale) ? !best : best;
        if (parallel != best) st->calls = 0;
    }
    pthread_mutex_unlock(&stats_lock);
    *slot = index;
    return parallel ? threads : 1;
}

static void record_time(int slot, const void* key, int64_t batch, int parallel, double ns, double work) {
    if (slot < 0 || work <= 0.0) return;
    pthread_mutex_lock(&stats_lock);
    mode_stats* st = &stats_table[slot];
    if (st->key == key && st->bucket == batch_bucket(batch)) {
        st->ns_per_work[parallel][st->count[parallel] % SAMPLES] = (float)(ns / work);
        st->count[parallel]++;
        st->last_ns[parallel] = now_ns();
    }
    pthread_mutex_unlock(&stats_lock);
}

/* Arguments of one call, shared by its chunks. */
typedef struct {
    int64_t rows, panels, panel_width, ldx_in, ldx, batch, ncols;
    const int64_t *seg_ptr, *row_nnz_prefix;
    const uint16_t* cols;
    const float *values, *scales, *bias, *x;
    const int8_t* q;
    float *xt, *yt, *y;
    const uint64_t* bitmap;  /* matvec: per-segment column bitmaps, or NULL */
    const int32_t* segment_sums;  /* matvec with bitmap: per segment (row-major), the sum of its q, see
                                   * PanelCSRMatrix.segment_sums */
    const uint8_t *xq_hi, *xq_lo;  /* matvec, int8 with bitmap: x quantised (see quantise_input; 8 bits
                                    * leave xq_lo NULL), x_scale per unit */
    float x_scale;
    int64_t ldy;  /* row stride of yt: batch, or the padded batch when the kernel transposes x itself */
    int tiled;    /* X^T is the kernel's own padded, tiled copy of x */
    int activation;  /* ACT_*: applied to each chunk's rows of Y^T while they are in the cache */
} linear_args;

/* Width of a batch tile as stored in the kernel's own X^T and Y^T scratch: rounded up to whole vectors (8 floats up
 * to 16, then 16) and padded with zeros, so that a batch such as 11 or 33 runs one vector pass over a row's
 * non-zeros instead of a vector pass plus a scalar pass for the last 3 or 1 columns (the scalar pass cost more than
 * the vector one: 384x384 at 90%, 11 rows, one thread, the whole call took 88 us before, 27 us after, same run).
 * 17 to 24 rows are padded to 32 (two 16-float vectors, two sets of accumulators) rather than 24 (three 8-float
 * vectors, one set: each FMA waited for the last): 1.11x-1.25x faster at 17 to 24 rows on the MiniLM and GPT-2
 * shapes at 90% (one thread, old and new builds interleaved), although a third of the lanes then compute zeros. */
static int64_t padded_width(int64_t width) {
    return width > 16 ? (width + 15) / 16 * 16 : (width + 7) / 8 * 8;
}

/* The batch as stored in the padded scratch: whole tiles of BATCH_TILE, then the last tile padded. */
static int64_t padded_batch(int64_t batch) {
    return batch / BATCH_TILE * BATCH_TILE + (batch % BATCH_TILE ? padded_width(batch % BATCH_TILE) : 0);
}

/* Per-thread scratch for X^T and Y^T, kept between calls: allocating them per call (torch.empty twice from
 * Python) was a fixed cost that mattered for small layers at small batches. Grown as needed, never shrunk. */
static _Thread_local float* scratch_data;
static _Thread_local size_t scratch_floats;
static float* thread_scratch(size_t floats) {
    if (floats > scratch_floats) {
        free(scratch_data);
        size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
        scratch_data = aligned_alloc(64, bytes);
        scratch_floats = scratch_data ? floats : 0;
    }
    return scratch_data;
}

static void transpose_chunk(const void* ctx, int64_t chunk, int64_t chunks) {
    const linear_args* a = ctx;
    int64_t col_blocks = (a->ncols + 31) / 32;
    for (int64_t cb = col_blocks * chunk / chunks; cb < col_blocks * (chunk + 1) / chunks; cb++) {
        int64_t c0 = cb * 32, c1 = c0 + 32 < a->ncols ? c0 + 32 : a->ncols;
        for (int64_t b0 = 0; b0 < a->batch; b0 += BATCH_TILE) {
            int64_t width = a->batch - b0 < BATCH_TILE ? a->batch - b0 : BATCH_TILE, padded = padded_width(width);
            transpose_rows(a->x + b0 * a->ldx_in, a->ldx_in, width, padded, c0, c1, a->xt + b0 * a->ncols, padded);
        }
    }
}

static void linear_chunk(const void* ctx, int64_t chunk, int64_t chunks) {
    const linear_args* a = ctx;
    int64_t first, last;
    balanced_rows(a->row_nnz_prefix, a->rows, (int)chunk, (int)chunks, &first, &last);
    rows_matmul_t(first, last, a->rows, a->panels, a->panel_width, a->seg_ptr, a->cols, a->values, a->q, a->scales,
                  a->bias, a->xt,
                  a->ldx, a->tiled, a->ncols, a->tiled ? padded_batch(a->batch) : a->batch, a->yt, a->ldy);
    apply_activation(a->yt + first * a->ldy, (last - first) * a->ldy, a->activation);
    if (!a->y) return;
    if (a->batch <= BATCH_TILE)  /* few Y rows: the dst lines stay in L1 between the two 8-row halves */
        transpose_rows(a->yt + first * a->ldy, a->ldy, last - first, last - first, 0, a->batch, a->y + first, a->rows);
    else
        transpose_block(first, last, 0, a->batch, a->yt, a->ldy, a->y, a->rows, 16);
}

/* ---- Batch 1 (matrix-vector) ------------------------------------------------------------------------------
 * Compute-bound, not bandwidth-bound, on the benchmark machine (Xeon @2.8 GHz, 2 cores, AVX-512; timed with
 * benchmarks/results/runtime_int8.md, "batch-1 cost"): this scalar loop takes 0.7-1.0 ns per non-zero on one
 * thread (2-2.8 cycles: three loads per non-zero, index, value and x[index], on two load ports), about the same
 * whether the weights sit in L3 (4096x4096 at 90%: 10 MB) or stream from DRAM (16384x16384: 161 MB), i.e. 6-10
 * GB/s where dense F.linear streams 24.5 GB/s on two threads. AVX-512 gathers do not help here: 0.65 ns per
 * gathered element (16-wide; 1.3 ns 8-wide) against 0.57 ns for scalar loads in a standalone loop, so float32
 * stays scalar (with four sums for instruction-level parallelism); int8 uses the bitmap kernel below. */
static void matvec_chunk(const void* ctx, int64_t chunk, int64_t chunks) {
    const linear_args* a = ctx;
    int64_t first, last;
    balanced_rows(a->row_nnz_prefix, a->rows, (int)chunk, (int)chunks, &first, &last);
    const int64_t rows = a->rows, *seg_ptr = a->seg_ptr;
    const uint16_t* cols = a->cols;
    const float *values = a->values, *scales = a->scales, *x = a->x;
    const int8_t* q = a->q;
    for (int64_t i = first; i < last; i++) {
        float total;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        for (int64_t p = 0; p < a->panels; p++) {
            const float* xp = x + p * a->panel_width;
            int64_t k = seg_ptr[p * rows + i], end = seg_ptr[p * rows + i + 1];
            const float scale = scales ? scales[p * rows + i] : 1.0f;
            for (; k + 4 <= end; k += 4) {
                s0 += WEIGHT(k) * xp[cols[k]];
                s1 += WEIGHT(k + 1) * xp[cols[k + 1]];
                s2 += WEIGHT(k + 2) * xp[cols[k + 2]];
                s3 += WEIGHT(k + 3) * xp[cols[k + 3]];
            }
            for (; k < end; k++) s0 += WEIGHT(k) * xp[cols[k]];
        }
        total = (s0 + s1) + (s2 + s3);
        a->y[i] = total + (a->bias ? a->bias[i] : 0.0f);
    }
}

/* int8 bitmap kernel. The scalar loop above costs 0.8-1.1 ns per non-zero on one thread here: three loads per
 * non-zero (index, value, x[index]) on two load ports, and AVX-512 gathers do not help on this CPU (measured
 * 0.65 ns per gathered element vs 0.57 for scalar loads, 1.3 for 8-wide gathers). So for int8 weights each
 * segment also has a column bitmap (one 64-bit word per 64 columns, PanelCSRMatrix.bitmap, derived on load):
 * a word's int8 values are expanded into their column lanes with one vpexpandb and multiplied with x loaded
 * contiguously, a cost per 64 columns instead of per non-zero (about 8 cycles per word measured, i.e. 0.47 ns per
 * non-zero at 90% sparsity, where the scalar loop needs 0.6-1.1). x is quantised once per call to int16 with one
 * scale (|error| <= max|x| / 65534, far below the int8 weights' own) and stored as the high and low bytes of
 * x16 + 32768; vpdpbusd sums 4 products of unsigned x bytes and signed q per int32 lane, and each segment's sum
 * is made exact in int64 and scaled once. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI2__) && defined(__AVX512VNNI__)
#define MATVEC_BITMAP 1

/* Word w of the segment: its n non-zeros (a load of 64 values, masked to n at the end of the array, then the
 * register form of vpexpandb: the memory form measured slower here) into their column lanes, times x's high and
 * low bytes. The offset of 32768 in x is undone once per segment with the segment's sum of q, which does not
 * depend on x (PanelCSRMatrix.segment_sums, one int32 per segment; the 16 lanes' sums per window of 16 words it
 * replaced cost 0.63 bytes per non-zero at 90% sparsity, where the bitmap costs 1.25 and the values 1), instead of a third
 * vpdpbusd per word (ones times q). No overflow: a lane sums at most 4 products per word, |product| <= 255 * 127,
 * and a segment has at most 1024 words (MAX_PANEL_WIDTH 65535), so the 16 lanes of hi0 + hi1 sum to at most
 * 16 * 4 * 1024 * 32385 < 2^31.
 * Tried: software prefetch of the bitmaps and values 4 rows ahead; int8 over float32 1.78x against 1.65x (4096x4096 at
 * 90%, a 64 MB dense layer between calls, medians of 5 alternating runs, 4 of 5 pairs in its favour), then in
 * benchmarks/runtime_int8.py 1.42x, 1.57x and 1.83x in three runs against 1.65x, 1.65x and 1.59x without: within
 * this machine's spread, so not kept. 256-bit expands and dot products (two per word, in case the 512-bit ones lowered
 * the clock of both cores): 1.18x-1.45x against 1.69x-2.02x for this code, one and two threads, same harness. */
static inline ALWAYS_INLINE __m512i expand_word(uint64_t mask, const int8_t** q, const int8_t* q_end) {
    int n = __builtin_popcountll(mask);
    __m512i q8 = _mm512_maskz_expand_epi8(mask, *q + 64 <= q_end ? _mm512_loadu_si512(*q)
                                                                : _mm512_maskz_loadu_epi8(_bzhi_u64(~0ULL, n), *q));
    *q += n;
    return q8;
}
#define BITMAP_WORD(w, acc_hi, acc_lo)                                                                         \
    do {                                                                                                       \
        __m512i q8_ = expand_word(bits[w], &q, q_end);                                                         \
        acc_hi = _mm512_dpbusd_epi32(acc_hi, _mm512_loadu_si512(hi + 64 * (w)), q8_);                          \
        acc_lo = _mm512_dpbusd_epi32(acc_lo, _mm512_loadu_si512(lo + 64 * (w)), q8_);                          \
    } while (0)

/* With 8-bit activations (x quantised to one byte, offset 128; see quantise_input): one vpdpbusd per word instead of
 * two, and one load of x less. Four sets of accumulators, as one product per word would otherwise wait on vpdpbusd's
 * latency. The same bound holds: a segment's products sum to at most 65535 * 255 * 127 < 2^31 in magnitude. */
#define BITMAP_WORD8(w, acc) \
    (acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(xb + 64 * (w)), expand_word(bits[w], &q, q_end)))

static inline ALWAYS_INLINE int64_t segment_dot8(const uint64_t* bits, const int8_t* q, const int8_t* q_end,
                                                 const uint8_t* xb, int64_t words) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    int64_t w = 0;
    for (; w + 4 <= words; w += 4) {
        BITMAP_WORD8(w, a0);
        BITMAP_WORD8(w + 1, a1);
        BITMAP_WORD8(w + 2, a2);
        BITMAP_WORD8(w + 3, a3);
    }
    for (; w < words; w++) BITMAP_WORD8(w, a0);
    return (int64_t)_mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)));
}

static void matvec_chunk_bitmap(const void* ctx, int64_t chunk, int64_t chunks) {
    const linear_args* a = ctx;
    int64_t first, last;
    balanced_rows(a->row_nnz_prefix, a->rows, (int)chunk, (int)chunks, &first, &last);
    const int64_t rows = a->rows, words = (a->panel_width + 63) / 64;
    const int8_t* q_end = a->q + a->row_nnz_prefix[rows];
    for (int64_t i = first; i < last; i++) {
        float total = 0.0f;
        for (int64_t p = 0; p < a->panels; p++) {
            if (i + 1 < last) __builtin_prefetch(a->q + a->seg_ptr[p * rows + i + 1]);  /* the next row's values */
            const int8_t* q = a->q + a->seg_ptr[p * rows + i];
            const uint64_t* bits = a->bitmap + (i * a->panels + p) * words;
            if (!a->xq_lo) {  /* 8-bit activations: the sum of q * (x8 + 128), minus 128 times the sum of q */
                int64_t dot = segment_dot8(bits, q, q_end, a->xq_hi + p * words * 64, words) -
                              128 * (int64_t)a->segment_sums[i * a->panels + p];
                total += (float)dot * a->scales[p * rows + i];
                continue;
            }
            const uint8_t *hi = a->xq_hi + p * words * 64, *lo = a->xq_lo + p * words * 64;
            /* two sets of accumulators, for even and odd words: vpdpbusd has a latency of 5 cycles, and one set was
             * bound by it */
            __m512i hi0 = _mm512_setzero_si512(), lo0 = hi0, hi1 = hi0, lo1 = hi0;
            int64_t w = 0;
            for (; w + 2 <= words; w += 2) {  /* empty words too: no branch to mispredict, they add 0 */
                BITMAP_WORD(w, hi0, lo0);
                BITMAP_WORD(w + 1, hi1, lo1);
            }
            if (w < words) BITMAP_WORD(w, hi0, lo0);
            /* exact: sum of q * (x16 + 32768) over the segment, minus 32768 times the segment's sum of q */
            int64_t dot = 256 * (int64_t)_mm512_reduce_add_epi32(_mm512_add_epi32(hi0, hi1)) +
                          (int64_t)_mm512_reduce_add_epi32(_mm512_add_epi32(lo0, lo1)) -
                          32768 * (int64_t)a->segment_sums[i * a->panels + p];
            total += (float)dot * a->scales[p * rows + i];
        }
        a->y[i] = total * a->x_scale + (a->bias ? a->bias[i] : 0.0f);
    }
}

/* x as xq = round(x / scale), |xq| <= 2^(bits-1) - 1, with one scale per call, stored unsigned as vpdpbusd wants, in
 * panels padded to whole 64-column words: for 16 bits, the high and low bytes of xq + 32768 in hi and lo; for 8 bits
 * (the dynamic per-input activations of "W8A8" int8 inference), xq + 128 in hi. *bits is 16, 8, or 0 (ACTIVATION_AUTO):
 * 8 when rounding x to 8 bits moves it by at most AUTO_8BIT_ERROR of its norm, else 16; *bits is set to the bits used.
 * Returns the scale, or 0 if x is not finite (the caller then uses the CSR kernel, which propagates inf and NaN as
 * float arithmetic does). */
#define ACTIVATION_AUTO 0
/* 2%: the input keeps a cosine of at least 0.9998 with itself rounded. Gaussian inputs lose 0.8-1.2% at 768 to 4096
 * columns (max|x| / 127 steps against a norm sqrt(n) sigma), so they take the faster 8-bit kernel; an input with
 * outlier features loses more (1% of features 20x larger: ~6%, output cosine 0.9975 in benchmarks/runtime_int8.py)
 * and keeps 16 bits. */
#define AUTO_8BIT_ERROR 0.02f
static float quantise_input(const float* x, int64_t ncols, int64_t panels, int64_t panel_width, int* bits_used,
                            uint8_t* hi, uint8_t* lo) {
    /* 16 columns at a time (AVX-512 is there wherever this kernel is): the scalar loop called lrintf once per
     * column, 19 us a call at 4096 columns against 0.75 us now (best of 2000, same inputs, same bytes out), about 3%
     * of the 4096x4096 int8 product at 90% sparsity */
    const __m512 huge = _mm512_set1_ps(3.0e38f);
    __m512 top16 = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t j = 0; j < ncols; j += 16) {
        __mmask16 live = first_lanes(ncols - j);
        __m512 v = _mm512_abs_ps(_mm512_maskz_loadu_ps(live, x + j));
        bad |= _mm512_cmp_ps_mask(v, huge, _CMP_NLE_UQ);  /* inf or NaN */
        top16 = _mm512_max_ps(top16, v);
    }
    if (bad) return 0.0f;
    float top = _mm512_reduce_max_ps(top16);
    if (*bits_used == ACTIVATION_AUTO) {  /* one more pass: the 8-bit rounding's error against x's norm */
        float scale8 = top > 0 ? top / 127.0f : 1.0f;
        const __m512 inv8 = _mm512_set1_ps(1.0f / scale8), step = _mm512_set1_ps(scale8);
        __m512 error = _mm512_setzero_ps(), norm = error;
        for (int64_t j = 0; j < ncols; j += 16) {
            __mmask16 live = first_lanes(ncols - j);
            __m512 v = _mm512_maskz_loadu_ps(live, x + j);
            __m512 rounded = _mm512_mul_ps(_mm512_roundscale_ps(_mm512_mul_ps(v, inv8), _MM_FROUND_TO_NEAREST_INT |
                                                                                        _MM_FROUND_NO_EXC), step);
            __m512 d = _mm512_sub_ps(v, rounded);
            error = _mm512_fmadd_ps(d, d, error);
            norm = _mm512_fmadd_ps(v, v, norm);
        }
        *bits_used = _mm512_reduce_add_ps(error) <= AUTO_8BIT_ERROR * AUTO_8BIT_ERROR * _mm512_reduce_add_ps(norm)
                     ? 8 : 16;
    }
    const int bits = *bits_used, most = bits == 8 ? 127 : 32767;
    float scale = top > 0 ? top / (float)most : 1.0f, inverse = 1.0f / scale;
    const __m512 inv = _mm512_set1_ps(inverse);
    const __m512i lowest = _mm512_set1_epi32(-most), highest = _mm512_set1_epi32(most);
    const __m512i offset = _mm512_set1_epi32(most + 1), low_byte = _mm512_set1_epi32(255);
    int64_t padded = (panel_width + 63) / 64 * 64;
    for (int64_t p = 0; p < panels; p++) {
        int64_t valid = ncols - p * panel_width < panel_width ? ncols - p * panel_width : panel_width;
        for (int64_t j = 0; j < padded; j += 16) {
            __mmask16 live = first_lanes(valid - j);
            /* rounds to nearest even, as lrintf does in the default rounding mode */
            __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(live, x + p * panel_width + j), inv));
            v = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(v, lowest), highest), offset);
            if (bits == 8) {
                _mm_storeu_si128((__m128i*)(hi + p * padded + j), _mm512_cvtepi32_epi8(v));
            } else {
                _mm_storeu_si128((__m128i*)(hi + p * padded + j), _mm512_cvtepi32_epi8(_mm512_srli_epi32(v, 8)));
                _mm_storeu_si128((__m128i*)(lo + p * padded + j), _mm512_cvtepi32_epi8(_mm512_and_si512(v, low_byte)));
            }
        }
    }
    return scale;
}
#endif

/* float32 bitmap kernel: the same column bitmaps for float32 weights. Each 16 columns of a segment are one masked
 * expand of the next values (vexpandps, reading as many values as the mask has bits) and one FMA with x's 16 columns,
 * loaded under the same mask (columns without a weight are never read, so a panel's last partial word reads nothing
 * past x): a cost per 16 columns where the index loop above pays per non-zero. So it wins where words hold enough
 * weights: 1.09x-1.51x the index loop at 50% to 80% sparsity on 4096x4096 and the GPT-2 layers, quiet
 * (benchmarks/results/runtime_batch1_bitmap.md), and 1.10x-1.47x slower at 90% (FLOAT_BITMAP_MIN_DENSITY in cpu.py
 * holds the crossover the Python side applies). A segment never reads past the values of its row chunk, whatever the bitmap
 * says (an operator given an edited bitmap). */
#if defined(__AVX512F__)
#define MATVEC_BITMAP_F32 1
static void matvec_chunk_bitmap_f32(const void* ctx, int64_t chunk, int64_t chunks) {
    const linear_args* a = ctx;
    int64_t first, last;
    balanced_rows(a->row_nnz_prefix, a->rows, (int)chunk, (int)chunks, &first, &last);
    const int64_t rows = a->rows, words = (a->panel_width + 63) / 64;
    const float* values_end = a->values + a->row_nnz_prefix[rows];
    for (int64_t i = first; i < last; i++) {
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (int64_t p = 0; p < a->panels; p++) {
            const float* v = a->values + a->seg_ptr[p * rows + i];
            const uint64_t* bits = a->bitmap + (i * a->panels + p) * words;
            const float* xp = a->x + p * a->panel_width;
            for (int64_t w = 0; w < words; w++) {
                uint64_t word = bits[w];
                if (v + __builtin_popcountll(word) > values_end) break;
                const float* xw = xp + w * 64;
                for (int h = 0; h < 4; h += 2) {  /* two accumulators: one FMA chain was bound by its latency */
                    __mmask16 k0 = (__mmask16)(word >> (16 * h)), k1 = (__mmask16)(word >> (16 * h + 16));
                    __m512 w0 = _mm512_maskz_expandloadu_ps(k0, v);
                    v += __builtin_popcount(k0);
                    __m512 w1 = _mm512_maskz_expandloadu_ps(k1, v);
                    v += __builtin_popcount(k1);
                    acc0 = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(k0, xw + 16 * h), acc0);
                    acc1 = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(k1, xw + 16 * h + 16), acc1);
                }
            }
        }
        a->y[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + (a->bias ? a->bias[i] : 0.0f);
    }
}
#endif

/* 1 if float32 batch-1 calls given a bitmap read it (built with AVX-512), else 0 (they use the index loop). */
int panel_csr_float_bitmap(void) {
#if defined(MATVEC_BITMAP_F32)
    return 1;
#else
    return 0;
#endif
}

/* Which matrix-vector code this library was compiled with (tests check that each one is exercised). */
const char* panel_csr_matvec_isa(void) {
#if defined(MATVEC_BITMAP)
    return "avx512-vnni-bitmap";
#else
    return "scalar";
#endif
}

/* y[batch, rows] = x W^T (+ bias). If x is given, or xt is NULL, x (batch x cols, row stride ldx_in) is first
 * transposed into the calling thread's scratch (X^T in padded batch tiles, then Y^T; xt, ldx and yt are ignored) and y must be
 * given; otherwise xt already holds X^T with row stride ldx and Y^T goes to yt (rows x batch). Each chunk
 * computes its rows of Y^T and writes them transposed into y (batch x rows, contiguous), unless y is NULL (the
 * caller wants Y^T). */
static void linear_with_activation(int64_t rows, int64_t panels, int64_t panel_width, const int64_t* seg_ptr,
                                   const int64_t* row_nnz_prefix, const uint16_t* cols, const void* values,
                                   const float* scales, const float* bias, const float* x, int64_t ldx_in, float* xt,
                                   int64_t ldx, int64_t batch, int64_t ncols, float* yt, float* y, int threads,
                                   int activation) {
    linear_args a = {.rows = rows, .panels = panels, .panel_width = panel_width, .ldx_in = ldx_in, .ldx = ldx,
                     .batch = batch, .ncols = ncols, .seg_ptr = seg_ptr, .row_nnz_prefix = row_nnz_prefix,
                     .cols = cols, .values = scales ? NULL : values, .scales = scales, .bias = bias, .x = x,
                     .q = scales ? values : NULL, .xt = xt, .yt = yt, .y = y, .activation = activation};
    a.ldy = batch;
    /* x may be NULL with xt NULL too when there are no columns (an empty tensor's data pointer) */
    a.tiled = x != NULL || xt == NULL;
    if (a.tiled) {  /* the kernel's own scratch, padded (see padded_width); xt and yt from the caller are ignored */
        int64_t stored = padded_batch(batch);
        float* scratch = thread_scratch((size_t)((ncols + rows) * stored));
        if (!scratch) abort();
        a.xt = scratch;
        a.yt = scratch + ncols * stored;
        a.ldy = stored;
    }
    int slot;
    threads = choose_threads(values, batch, threads, &slot);
    double start = now_ns();
    int64_t chunks = threads > 1 ? (int64_t)threads * CHUNKS_PER_THREAD : 1;
    double work = (double)row_nnz_prefix[rows] * (double)batch;
    if (a.tiled) {
        /* a small input is transposed by the caller alone: waking the pool costs more than the copy */
        int64_t col_blocks = (ncols + 31) / 32, elements = ncols * batch;
        run_chunks(transpose_chunk, &a, col_blocks < chunks ? col_blocks : chunks,
                   elements < SERIAL_TRANSPOSE_ELEMENTS ? 1 : threads, work);
    }
    run_chunks(linear_chunk, &a, chunks, threads, work);
    record_time(slot, values, batch, threads > 1, now_ns() - start, work);
}
void panel_csr_linear(int64_t rows, int64_t panels, int64_t panel_width, const int64_t* seg_ptr,
                      const int64_t* row_nnz_prefix, const uint16_t* cols, const void* values,
                      const float* scales, const float* bias, const float* x, int64_t ldx_in, float* xt, int64_t ldx,
                      int64_t batch, int64_t ncols, float* yt, float* y, int threads) {
    linear_with_activation(rows, panels, panel_width, seg_ptr, row_nnz_prefix, cols, values, scales, bias, x, ldx_in,
                           xt, ldx, batch, ncols, yt, y, threads, ACT_NONE);
}

/* ---- Gradient of the stored values (training through the kernels) ---------------------------------------
 * For y = x W^T, dL/dW at a stored non-zero (i, j) is the sum over the batch of G[b, i] X[b, j] with G = dL/dy: a
 * sampled dense-dense product (SDDMM) costing nnz x batch multiply-adds, as the forward does, where the dense
 * gradient costs rows x cols x batch. x and G are transposed into the calling thread's scratch in the forward's
 * tiled layout (batch tiles of BATCH_TILE, zero-padded), so that each non-zero is one contiguous dot product of a row
 * of G^T with a row of X^T; X^T's panel slice stays in L2 as in the forward. Threads take nnz-balanced row chunks,
 * so every thread writes its own non-zeros' gradients (no atomics). */
static inline float sum8(vec8 v) {
#if defined(HAVE_SHUFFLEVECTOR)
    vec8 h = v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
    h += __builtin_shufflevector(h, h, 2, 3, 0, 1, 6, 7, 4, 5);
    return h[0] + h[1];
#else
    float total = 0.0f;
    for (int e = 0; e < 8; e++) total += v[e];
    return total;
#endif
}

static inline float sum16(vec16 v) {
#if defined(HAVE_SHUFFLEVECTOR)
    return sum8(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
#else
    float total = 0.0f;
    for (int e = 0; e < 16; e++) total += v[e];
    return total;
#endif
}

/* a . b over n floats, n a multiple of 8 (the padded tile width); two sums for instruction-level parallelism */
static inline float dot_padded(const float* a, const float* b, int64_t n) {
    vec8 s0 = {0}, s1 = {0};
    int64_t v = 0;
    for (; v + 16 <= n; v += 16) {
        s0 += *(const vec8*)(a + v) * *(const vec8*)(b + v);
        s1 += *(const vec8*)(a + v + 8) * *(const vec8*)(b + v + 8);
    }
    if (v < n) s0 += *(const vec8*)(a + v) * *(const vec8*)(b + v);
    return sum8(s0 + s1);
}

static void sddmm_chunk(const void* ctx, int64_t chunk, int64_t chunks) {
    const linear_args* a = ctx;  /* xt: tiled X^T (ncols rows), yt: tiled G^T (rows rows), y: the gradient */
    int64_t first, last;
    balanced_rows(a->row_nnz_prefix, a->rows, (int)chunk, (int)chunks, &first, &last);
    for (int64_t b0 = 0; b0 < a->batch; b0 += BATCH_TILE) {
        int64_t width = a->batch - b0 < BATCH_TILE ? a->batch - b0 : BATCH_TILE, padded = padded_width(width);
        const float *x_tile = a->xt + b0 * a->ncols, *g_tile = a->yt + b0 * a->rows;
        for (int64_t p = 0; p < a->panels; p++) {
            const int64_t* seg = a->seg_ptr + p * a->rows;
            const float* x_panel = x_tile + p * a->panel_width * padded;
            for (int64_t i = first; i < last; i++) {
                const float* g = g_tile + i * padded;
                if (padded == BATCH_TILE) {  /* a whole tile: G^T's row stays in registers across the non-zeros */
                    vec16 g0 = *(const vec16*)g, g1 = *(const vec16*)(g + 16), g2 = *(const vec16*)(g + 32),
                          g3 = *(const vec16*)(g + 48);
                    for (int64_t k = seg[i]; k < seg[i + 1]; k++) {
                        const float* xr = x_panel + (int64_t)a->cols[k] * BATCH_TILE;
                        vec16 s = g0 * *(const vec16*)xr + g1 * *(const vec16*)(xr + 16);
                        s += g2 * *(const vec16*)(xr + 32) + g3 * *(const vec16*)(xr + 48);
                        float d = sum16(s);
                        a->y[k] = b0 ? a->y[k] + d : d;
                    }
                    continue;
                }
                for (int64_t k = seg[i]; k < seg[i + 1]; k++) {
                    float d = dot_padded(g, x_panel + (int64_t)a->cols[k] * padded, padded);
                    a->y[k] = b0 ? a->y[k] + d : d;
                }
            }
        }
    }
}

/* grad[k] = sum over b of g[b, i] x[b, j] for every stored non-zero k = (i, j), in storage order; x: batch x ncols
 * (row stride ldx), g: batch x rows (row stride ldg), both float32. */
void panel_csr_sddmm(int64_t rows, int64_t panels, int64_t panel_width, const int64_t* seg_ptr,
                     const int64_t* row_nnz_prefix, const uint16_t* cols, const float* x, int64_t ldx, const float* g,
                     int64_t ldg, int64_t batch, int64_t ncols, float* grad, int threads) {
    int64_t stored = padded_batch(batch);
    float* scratch = thread_scratch((size_t)((ncols + rows) * stored));
    if (!scratch) abort();
    linear_args a = {.rows = rows, .panels = panels, .panel_width = panel_width, .batch = batch, .ncols = ncols,
                     .seg_ptr = seg_ptr, .row_nnz_prefix = row_nnz_prefix, .cols = cols, .x = x, .ldx_in = ldx,
                     .xt = scratch, .yt = scratch + ncols * stored, .y = grad};
    linear_args gt = {.batch = batch, .ncols = rows, .x = g, .ldx_in = ldg, .xt = a.yt};
    int64_t chunks = threads > 1 ? (int64_t)threads * CHUNKS_PER_THREAD : 1;
    for (int side = 0; side < 2; side++) {
        const linear_args* t = side ? &gt : &a;
        int64_t col_blocks = (t->ncols + 31) / 32, elements = t->ncols * batch;
        run_parallel(transpose_chunk, t, col_blocks < chunks ? col_blocks : chunks,
                     elements < SERIAL_TRANSPOSE_ELEMENTS ? 1 : threads);
    }
    run_parallel(sddmm_chunk, &a, chunks, threads);
}

/* y[rows] = W x (+ bias) for a single contiguous input vector. int8 weights with bitmaps (and this library built
 * with the bitmap kernel) quantise x per call to `activation_bits` (16, 8, or 0: chosen per input, see
 * quantise_input) bits; other paths compute with float x. */
void panel_csr_matvec(int64_t rows, int64_t panels, int64_t panel_width, const int64_t* seg_ptr,
                      const int64_t* row_nnz_prefix, const uint16_t* cols, const void* values,
                      const float* scales, const float* bias, const float* x, float* y, int threads,
                      const uint64_t* bitmap, const int32_t* segment_sums, int64_t ncols, int activation_bits,
                      int activation) {
    linear_args a = {.rows = rows, .panels = panels, .panel_width = panel_width, .batch = 1, .seg_ptr = seg_ptr,
                     .row_nnz_prefix = row_nnz_prefix, .cols = cols, .values = scales ? NULL : values,
                     .scales = scales, .bias = bias, .x = x, .q = scales ? values : NULL, .y = y};
    int slot;
    threads = choose_threads(values, 1, threads, &slot);
    double start = now_ns();
    chunk_fn fn = matvec_chunk;
    uint8_t* xq = NULL;
#if defined(MATVEC_BITMAP)
    if (bitmap && segment_sums && a.q) {
        size_t padded = (size_t)(panels * ((panel_width + 63) / 64) * 64);
        int bits = activation_bits == 8 || activation_bits == 16 ? activation_bits : ACTIVATION_AUTO;
        xq = aligned_alloc(64, (bits == 8 ? 1 : 2) * padded);
        if (xq && (a.x_scale = quantise_input(x, ncols, panels, panel_width, &bits, xq, xq + padded)) > 0) {
            a.xq_hi = xq;
            a.xq_lo = bits == 8 ? NULL : xq + padded;
            a.bitmap = bitmap;
            a.segment_sums = segment_sums;
            fn = matvec_chunk_bitmap;
        }
    }
#else
    (void)segment_sums;
    (void)ncols;
    (void)activation_bits;
#endif
#if defined(MATVEC_BITMAP_F32)
    if (bitmap && !a.q) {
        a.bitmap = bitmap;
        fn = matvec_chunk_bitmap_f32;
    }
#elif !defined(MATVEC_BITMAP)
    (void)bitmap;
#endif
    run_chunks(fn, &a, threads > 1 ? (int64_t)threads * CHUNKS_PER_THREAD : 1, threads, (double)row_nnz_prefix[rows]);
    apply_activation(y, rows, activation);  /* one row of outputs: cheaper here than per chunk */
    free(xq);
    record_time(slot, values, 1, threads > 1, now_ns() - start, (double)row_nnz_prefix[rows]);
}

/* ---- One call per layer ------------------------------------------------------------------------------------
 * A layer as the kernels read it, filled once per matrix by the Python side, so that a forward call passes one
 * pointer instead of the matrix's eleven sizes and arrays: ctypes converts every argument of every call (18 arguments
 * cost 6.0 us a call against 2.5 us for 6, empty C functions, median of 5000 calls on the benchmark machine), and a
 * transformer at one sentence makes dozens of such calls. The number of threads is chosen here too, by the rule of
 * sparsearch.kernels.cpu._threads_for with the grains it pushes (set_grains), and `activation` (ACT_*) is applied to
 * the outputs. */
typedef struct {
    int64_t rows, panels, panel_width, cols;
    const int64_t *seg_ptr, *row_nnz_prefix;
    const uint16_t* col_indices;
    const void* values;
    const float* scales;            /* int8 values: one scale per segment; else NULL */
    const uint64_t* bitmap;         /* batch-1 bitmap kernels (int8: with segment_sums), or NULL */
    const int32_t* segment_sums;
    int64_t activation_bits;
} sparse_layer;

static int64_t parallel_grain = 1 << 19, openmp_grain = 1 << 16;
void panel_csr_set_grains(int64_t parallel, int64_t openmp) {
    parallel_grain = parallel > 0 ? parallel : 1;
    openmp_grain = openmp > 0 ? openmp : 1;
}

/* Threads for a call of `work` multiply-adds, at most max_threads (tests compare it with the Python rule). */
int panel_csr_threads_for(int64_t work, int max_threads) {
    int64_t grain = work < OPENMP_MAX_WORK && panel_csr_uses_openmp() ? openmp_grain : parallel_grain;
    int64_t threads = work / grain;
    return threads < 1 ? 1 : threads < max_threads ? (int)threads : max_threads;
}

/* y (batch x rows, contiguous) = x W^T + bias for x holding `batch` contiguous rows of m->cols floats, on at most
 * max_threads threads. */
void sparse_layer_forward(const sparse_layer* m, const float* bias, const float* x, int64_t batch, float* y,
                          int max_threads, int activation) {
    int threads = panel_csr_threads_for(m->row_nnz_prefix[m->rows] * batch, max_threads);
    if (batch == 1)
        panel_csr_matvec(m->rows, m->panels, m->panel_width, m->seg_ptr, m->row_nnz_prefix, m->col_indices, m->values,
                         m->scales, bias, x, y, threads, m->bitmap, m->segment_sums, m->cols,
                         (int)m->activation_bits, activation);
    else
        linear_with_activation(m->rows, m->panels, m->panel_width, m->seg_ptr, m->row_nnz_prefix, m->col_indices,
                               m->values, m->scales, bias, x, m->cols, NULL, 0, batch, m->cols, NULL, y, threads,
                               activation);
}
