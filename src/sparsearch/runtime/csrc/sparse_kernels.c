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
 * shared counter (see "Thread pool" below: why not OpenMP).
 * When the kernel transposes the input itself, it stores X^T as batch tiles of 64 (tile t: cols x 64,
 * contiguous): with a plain cols x batch layout and batch > 64 the 256 bytes a tile reads from each 1 KB row
 * (batch 256) fall into a quarter of the L2 cache sets, and a panel's activations no longer stay in L2.
 * Written with GCC/Clang vector extensions so it compiles for any target; built with -march=native it uses
 * AVX2/FMA (or AVX-512, NEON) on the machine that builds it.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef float vec8 __attribute__((vector_size(32), aligned(4)));
/* 16 floats: one AVX-512 register (two AVX2 ones elsewhere); for batch tiles of 32 or more it took 1.2-1.6x less
 * time than 8-float vectors at batch 64 and 256 on the benchmark machine, and more at batch 16, hence both. */
typedef float vec16 __attribute__((vector_size(64), aligned(4)));

/* Work is cut into this many nnz-balanced row chunks per thread and handed out dynamically, so a thread that
 * the OS deschedules (other jobs on the same cores) delays only its current chunk, not a fixed half. */
#define CHUNKS_PER_THREAD 16

/* ---- Thread pool ----------------------------------------------------------------------------------------
 * Why not OpenMP: on a CPU shared with other busy processes, an OpenMP parallel region ends with a barrier that
 * waits for every thread of the team, including one the OS has not scheduled at all during the region, and
 * its threads spin while they wait, taking the CPU from the thread being waited for. With one competing busy
 * process on 2 cores, that made the 4096x4096 kernel at batch 64 13x slower (dense F.linear: 2.4x slower).
 * Here the calling thread always works, helper threads join when the OS runs them and sleep (no spinning) when
 * there is no work, and the caller waits only for chunks a helper has actually started, never for a helper
 * that has not shown up. Chunks are claimed from one atomic word that also holds the job's generation, so a
 * helper that wakes up late can never take a chunk of a job that has finished. */
/* Weights are float32 values, or int8 values q with one float32 scale per GROUP_SIZE consecutive stored non-zeros
 * (group-quantised, GQSA-style: a group holds neighbouring non-zeros of a row, so one scale fits them): the
 * weight of non-zero k is q[k] * scales[k / GROUP_SIZE]. 1 + 2 + 4/32 bytes per non-zero instead of 6. */
#define GROUP_SHIFT 5
#define WEIGHT(k) (q ? (float)q[k] * scales[(k) >> GROUP_SHIFT] : values[k])

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

/* fork() copies only the calling thread: the child starts with no helpers and fresh locks. */
static void before_fork(void) { pthread_mutex_lock(&pool.lock); }
static void after_fork_parent(void) { pthread_mutex_unlock(&pool.lock); }
static void after_fork_child(void) {
    pthread_mutex_init(&pool.lock, NULL);
    pthread_mutex_init(&pool.job, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.helpers = 0;
}
static pthread_once_t fork_handlers_once = PTHREAD_ONCE_INIT;
static void install_fork_handlers(void) { pthread_atfork(before_fork, after_fork_parent, after_fork_child); }

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
    pthread_once(&fork_handlers_once, install_fork_handlers);
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
    static inline void tile_##NV(const float* values, const int8_t* q, const float* scales, const uint16_t* cols, int64_t k0, int64_t k1,     \
                                 const float* xt, int64_t ldx, float* y, int accumulate, float init) { \
        vec8 acc[NV];                                                                                   \
        for (int v = 0; v < NV; v++) {                                                                  \
            if (accumulate) memcpy(&acc[v], y + 8 * v, sizeof(vec8));                                   \
            else acc[v] = (vec8){init, init, init, init, init, init, init, init};                       \
        }                                                                                               \
        for (int64_t k = k0; k < k1; k++) {                                                             \
            const float w = WEIGHT(k);                                                                  \
            const float* x = xt + (int64_t)cols[k] * ldx;                                               \
            for (int v = 0; v < NV; v++) acc[v] += w * *(const vec8*)(x + 8 * v);                       \
        }                                                                                               \
        for (int v = 0; v < NV; v++) memcpy(y + 8 * v, &acc[v], sizeof(vec8));                         \
    }
DEFINE_TILE(1) DEFINE_TILE(2) DEFINE_TILE(3)

#define DEFINE_TILE16(NV)                                                                               \
    static inline void tile16_##NV(const float* values, const int8_t* q, const float* scales, const uint16_t* cols, int64_t k0, int64_t k1,   \
                                   const float* xt, int64_t ldx, float* y, int accumulate, float init) { \
        vec16 acc[NV];                                                                                  \
        for (int v = 0; v < NV; v++) {                                                                  \
            if (accumulate) memcpy(&acc[v], y + 16 * v, sizeof(vec16));                                 \
            else for (int e = 0; e < 16; e++) acc[v][e] = init;                                         \
        }                                                                                               \
        for (int64_t k = k0; k < k1; k++) {                                                             \
            const float w = WEIGHT(k);                                                                  \
            const float* x = xt + (int64_t)cols[k] * ldx;                                               \
            for (int v = 0; v < NV; v++) acc[v] += w * *(const vec16*)(x + 16 * v);                     \
        }                                                                                               \
        for (int v = 0; v < NV; v++) memcpy(y + 16 * v, &acc[v], sizeof(vec16));                       \
    }
DEFINE_TILE16(2) DEFINE_TILE16(3) DEFINE_TILE16(4)

/* Batch columns that do not fill a vector of 8: plain scalar accumulation. */
static inline void tile_tail(const float* values, const int8_t* q, const float* scales, const uint16_t* cols, int64_t k0, int64_t k1,
                             const float* xt, int64_t ldx, float* y, int width, int accumulate, float init) {
    float acc[8];
    for (int c = 0; c < width; c++) acc[c] = accumulate ? y[c] : init;
    for (int64_t k = k0; k < k1; k++) {
        const float w = WEIGHT(k);
        const float* x = xt + (int64_t)cols[k] * ldx;
        for (int c = 0; c < width; c++) acc[c] += w * x[c];
    }
    for (int c = 0; c < width; c++) y[c] = acc[c];
}

#define BATCH_TILE 64

/* Y^T rows [first, last) = W X^T (+ bias) for all batch columns. X^T is either cols x batch with row stride ldx
 * (tiled = 0) or tiled: batch tile b0 is a contiguous cols x width block at xt + b0 * ncols. */
static void rows_matmul_t(int64_t first, int64_t last, int64_t rows, int64_t panels, int64_t panel_width,
                          const int64_t* seg_ptr, const uint16_t* cols, const float* values, const int8_t* q,
                          const float* scales, const float* bias,
                          const float* xt, int64_t ldx, int tiled, int64_t ncols, int64_t batch, float* yt,
                          int64_t ldy) {
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
                int done = 0;  /* batch columns of this tile handled so far */
                if (width >= 32) {
                    done = (int)(width / 16) * 16;
                    switch (width / 16) {
                        case 4: tile16_4(values, q, scales, cols, k0, k1, x, ld_tile, y, accumulate, init); break;
                        case 3: tile16_3(values, q, scales, cols, k0, k1, x, ld_tile, y, accumulate, init); break;
                        default: tile16_2(values, q, scales, cols, k0, k1, x, ld_tile, y, accumulate, init); break;
                    }
                    if (width - done >= 8) {
                        tile_1(values, q, scales, cols, k0, k1, x + done, ld_tile, y + done, accumulate, init);
                        done += 8;
                    }
                } else {
                    done = vectors * 8;
                    switch (vectors) {
                        case 3: tile_3(values, q, scales, cols, k0, k1, x, ld_tile, y, accumulate, init); break;
                        case 2: tile_2(values, q, scales, cols, k0, k1, x, ld_tile, y, accumulate, init); break;
                        case 1: tile_1(values, q, scales, cols, k0, k1, x, ld_tile, y, accumulate, init); break;
                        default: break;
                    }
                }
                int tail = (int)(width - done);
                if (tail)
                    tile_tail(values, q, scales, cols, k0, k1, x + done, ld_tile, y + done, tail, accumulate,
                              init);
            }
        }
    }
}

/* dst[c, r] = src[r, c] for r in [r0, r1), c in [c0, c1), in blocks of `block_rows` rows x 64 columns. For the
 * input (source rows may be a power of two apart, e.g. 16 KB) 8 rows: 8 sequential streams fit the 8 ways of an
 * L1 set (32 rows 4 KB apart, an earlier block shape, evicted each other: a 98%-sparse 1024x1024 Linear at batch
 * 64 took about twice as long). For the output (source rows only batch floats apart) 16 rows, so that each
 * 64-byte line of the destination is written whole, once, instead of half at a time; with 8 rows the 4096x4096
 * Linear at batch 64 took 47% longer than the same kernel without transposes on one thread. */
#define TR_COLS 64
static void transpose_block(int64_t r0, int64_t r1, int64_t c0, int64_t c1, const float* src, int64_t lds,
                            float* dst, int64_t ldd, int64_t block_rows) {
    for (int64_t rb = r0; rb < r1; rb += block_rows)
        for (int64_t cb = c0; cb < c1; cb += TR_COLS) {
            int64_t re = rb + block_rows < r1 ? rb + block_rows : r1, ce = cb + TR_COLS < c1 ? cb + TR_COLS : c1;
            for (int64_t c = cb; c < ce; c++)
                for (int64_t r = rb; r < re; r++) dst[c * ldd + r] = src[r * lds + c];
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
} linear_args;

static void transpose_chunk(const void* ctx, int64_t chunk, int64_t chunks) {
    const linear_args* a = ctx;
    int64_t col_blocks = (a->ncols + 31) / 32;
    for (int64_t cb = col_blocks * chunk / chunks; cb < col_blocks * (chunk + 1) / chunks; cb++) {
        int64_t c0 = cb * 32, c1 = c0 + 32 < a->ncols ? c0 + 32 : a->ncols;
        for (int64_t b0 = 0; b0 < a->batch; b0 += BATCH_TILE) {
            int64_t width = a->batch - b0 < BATCH_TILE ? a->batch - b0 : BATCH_TILE;
            transpose_block(0, width, c0, c1, a->x + b0 * a->ldx_in, a->ldx_in, a->xt + b0 * a->ncols, width, 8);
        }
    }
}

static void linear_chunk(const void* ctx, int64_t chunk, int64_t chunks) {
    const linear_args* a = ctx;
    int64_t first, last;
    balanced_rows(a->row_nnz_prefix, a->rows, (int)chunk, (int)chunks, &first, &last);
    rows_matmul_t(first, last, a->rows, a->panels, a->panel_width, a->seg_ptr, a->cols, a->values, a->q, a->scales,
                  a->bias, a->xt,
                  a->ldx, a->x != 0, a->ncols, a->batch, a->yt, a->batch);
    if (a->y) transpose_block(first, last, 0, a->batch, a->yt, a->batch, a->y, a->rows, 16);
}

static void matvec_chunk(const void* ctx, int64_t chunk, int64_t chunks) {
    const linear_args* a = ctx;
    int64_t first, last;
    balanced_rows(a->row_nnz_prefix, a->rows, (int)chunk, (int)chunks, &first, &last);
    const int64_t rows = a->rows, *seg_ptr = a->seg_ptr;
    const uint16_t* cols = a->cols;
    const float *values = a->values, *scales = a->scales, *x = a->x;
    const int8_t* q = a->q;
    for (int64_t i = first; i < last; i++) {
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        for (int64_t p = 0; p < a->panels; p++) {
            const float* xp = x + p * a->panel_width;
            int64_t k = seg_ptr[p * rows + i], end = seg_ptr[p * rows + i + 1];
            for (; k + 4 <= end; k += 4) {
                s0 += WEIGHT(k) * xp[cols[k]];
                s1 += WEIGHT(k + 1) * xp[cols[k + 1]];
                s2 += WEIGHT(k + 2) * xp[cols[k + 2]];
                s3 += WEIGHT(k + 3) * xp[cols[k + 3]];
            }
            for (; k < end; k++) s0 += WEIGHT(k) * xp[cols[k]];
        }
        a->y[i] = ((s0 + s1) + (s2 + s3)) + (a->bias ? a->bias[i] : 0.0f);
    }
}

/* The int8 matrix-vector product without a per-weight scale: each row's run of non-zeros is cut at group
 * boundaries, summed in int8 x float, and scaled once per group. */
static void matvec_chunk_int8(const void* ctx, int64_t chunk, int64_t chunks) {
    const linear_args* a = ctx;
    int64_t first, last;
    balanced_rows(a->row_nnz_prefix, a->rows, (int)chunk, (int)chunks, &first, &last);
    const int64_t rows = a->rows, *seg_ptr = a->seg_ptr;
    const uint16_t* cols = a->cols;
    const int8_t* q = a->q;
    const float *scales = a->scales, *x = a->x;
    for (int64_t i = first; i < last; i++) {
        float total = 0.0f;
        for (int64_t p = 0; p < a->panels; p++) {
            const float* xp = x + p * a->panel_width;
            int64_t k = seg_ptr[p * rows + i], end = seg_ptr[p * rows + i + 1];
            while (k < end) {
                int64_t group_end = ((k >> GROUP_SHIFT) + 1) << GROUP_SHIFT;
                if (group_end > end) group_end = end;
                float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
                const float scale = scales[k >> GROUP_SHIFT];
                for (; k + 4 <= group_end; k += 4) {
                    s0 += (float)q[k] * xp[cols[k]];
                    s1 += (float)q[k + 1] * xp[cols[k + 1]];
                    s2 += (float)q[k + 2] * xp[cols[k + 2]];
                    s3 += (float)q[k + 3] * xp[cols[k + 3]];
                }
                for (; k < group_end; k++) s0 += (float)q[k] * xp[cols[k]];
                total += ((s0 + s1) + (s2 + s3)) * scale;
            }
        }
        a->y[i] = total + (a->bias ? a->bias[i] : 0.0f);
    }
}

/* y[batch, rows] = x W^T (+ bias). If x is given (batch x cols, row stride ldx_in) it is first transposed into
 * the scratch xt (cols x batch floats, in batch tiles; ldx is ignored); otherwise xt already holds X^T with row
 * stride ldx. Each chunk computes its rows of Y^T into the scratch yt (rows x batch) and writes them transposed
 * into y (batch x rows, contiguous), unless y is NULL (the caller wants Y^T). */
void panel_csr_linear(int64_t rows, int64_t panels, int64_t panel_width, const int64_t* seg_ptr,
                      const int64_t* row_nnz_prefix, const uint16_t* cols, const void* values,
                      const float* scales, const float* bias, const float* x, int64_t ldx_in, float* xt, int64_t ldx, int64_t batch,
                      int64_t ncols, float* yt, float* y, int threads) {
    linear_args a = {.rows = rows, .panels = panels, .panel_width = panel_width, .ldx_in = ldx_in, .ldx = ldx,
                     .batch = batch, .ncols = ncols, .seg_ptr = seg_ptr, .row_nnz_prefix = row_nnz_prefix,
                     .cols = cols, .values = scales ? NULL : values, .scales = scales, .bias = bias, .x = x,
                     .q = scales ? values : NULL, .xt = xt, .yt = yt, .y = y};
    int slot;
    threads = choose_threads(values, batch, threads, &slot);
    double start = now_ns();
    int64_t chunks = threads > 1 ? (int64_t)threads * CHUNKS_PER_THREAD : 1;
    if (x) {
        int64_t col_blocks = (ncols + 31) / 32;
        run_parallel(transpose_chunk, &a, col_blocks < chunks ? col_blocks : chunks, threads);
    }
    run_parallel(linear_chunk, &a, chunks, threads);
    record_time(slot, values, batch, threads > 1, now_ns() - start, (double)row_nnz_prefix[rows] * (double)batch);
}

/* y[rows] = W x (+ bias) for a single contiguous input vector (memory-bound: bytes per non-zero matter). */
void panel_csr_matvec(int64_t rows, int64_t panels, int64_t panel_width, const int64_t* seg_ptr,
                      const int64_t* row_nnz_prefix, const uint16_t* cols, const void* values,
                      const float* scales, const float* bias, const float* x, float* y, int threads) {
    linear_args a = {.rows = rows, .panels = panels, .panel_width = panel_width, .batch = 1, .seg_ptr = seg_ptr,
                     .row_nnz_prefix = row_nnz_prefix, .cols = cols, .values = scales ? NULL : values,
                     .scales = scales, .bias = bias, .x = x, .q = scales ? values : NULL, .y = y};
    int slot;
    threads = choose_threads(values, 1, threads, &slot);
    double start = now_ns();
    run_parallel(scales ? matvec_chunk_int8 : matvec_chunk, &a, threads > 1 ? (int64_t)threads * CHUNKS_PER_THREAD : 1,
                 threads);
    record_time(slot, values, 1, threads > 1, now_ns() - start, (double)row_nnz_prefix[rows]);
}
