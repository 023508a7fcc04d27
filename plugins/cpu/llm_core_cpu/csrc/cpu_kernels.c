/* Native kernels of the llm-core CPU backend.
 *
 * Built at run time by llm_core_cpu/native.py (gcc -O3 -march=native -pthread) and called
 * through ctypes with raw pointers. Activations are fp32 or bf16 (dtype code 0 or 1); every
 * kernel computes in fp32 and rounds to bf16 (round to nearest even) where the HAL contract says
 * a value is rounded. Rows may be strided (the last dimension is contiguous): strides are in
 * elements.
 *
 * Work is shared by a small pool of helper threads that never makes the caller wait for a
 * helper that has not started: the caller claims chunks of a job itself, helpers claim the
 * rest when they are running, and the caller waits only for chunks a helper has begun. On an
 * idle machine that is an ordinary fork/join; on a busy one (more runnable threads than
 * cores) an OpenMP join waits a whole scheduler time slice for a preempted worker, measured
 * at 8-16 ms per call here, while this degrades to the single-thread speed.
 *
 * llm_run() replays a recorded list of kernel calls (a captured decode step) with no Python in
 * between: see struct llm_record.
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LLM_AVX2 1
#else
#define LLM_AVX2 0
#endif

enum { DT_F32 = 0, DT_BF16 = 1 };

static int g_threads = 1;

int32_t llm_simd_width(void) { return LLM_AVX2 ? 8 : 1; }

/* ------------------------------------------------------------------------------------------ */
/* scalar conversions                                                                         */
/* ------------------------------------------------------------------------------------------ */

static inline float bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* the value an fp32 result has once stored in dtype dt */
static inline float round_dt(float f, int dt) { return dt == DT_BF16 ? bf2f(f2bf(f)) : f; }

static inline size_t esize(int dt) { return dt == DT_BF16 ? 2 : 4; }

/* ------------------------------------------------------------------------------------------ */
/* vector helpers                                                                              */
/* ------------------------------------------------------------------------------------------ */

#if LLM_AVX2
static inline __m256 load_bf16x8(const uint16_t* p) {
    __m128i h = _mm_loadu_si128((const __m128i*)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline __m128i f32x8_to_bf16(__m256 x) {
    __m256i u = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    __m256i q = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
    r = _mm256_blendv_epi8(r, q, nan);
    r = _mm256_srli_epi32(r, 16);
    __m256i packed = _mm256_packus_epi32(r, r); /* per 128-bit lane */
    packed = _mm256_permute4x64_epi64(packed, 0xD8);
    return _mm256_castsi256_si128(packed);
}

static inline float hsum8(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* exp(x) for fp32 lanes, Cephes polynomial (about 1 ulp); x is clamped to [-88.4, 88.4]. */
static inline __m256 exp8(__m256 x) {
    const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-88.3762626647949f);
    x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f),
                                                _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx),
                                                   _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

/* n values of dtype dt at src into fp32 dst */
static void to_f32(const void* src, int dt, float* dst, int64_t n) {
    if (dt == DT_F32) {
        memcpy(dst, src, (size_t)n * 4);
        return;
    }
    const uint16_t* s = (const uint16_t*)src;
    int64_t i = 0;
#if LLM_AVX2
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load_bf16x8(s + i));
#endif
    for (; i < n; i++) dst[i] = bf2f(s[i]);
}

/* n fp32 values into dtype dt at dst (rounded to nearest even for bf16) */
static void from_f32(const float* src, void* dst, int dt, int64_t n) {
    if (dt == DT_F32) {
        memcpy(dst, src, (size_t)n * 4);
        return;
    }
    uint16_t* d = (uint16_t*)dst;
    int64_t i = 0;
#if LLM_AVX2
    for (; i + 8 <= n; i += 8) _mm_storeu_si128((__m128i*)(d + i), f32x8_to_bf16(_mm256_loadu_ps(src + i)));
#endif
    for (; i < n; i++) d[i] = f2bf(src[i]);
}

static float dot_f32(const float* a, const float* b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if LLM_AVX2
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8)
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    s = hsum8(_mm256_add_ps(acc0, acc1));
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y[i] += a * x[i] */
static void axpy_f32(float a, const float* x, float* y, int64_t n) {
    int64_t i = 0;
#if LLM_AVX2
    __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] += a * x[i];
}

/* ------------------------------------------------------------------------------------------ */
/* work sharing                                                                               */
/* ------------------------------------------------------------------------------------------ */

typedef void (*chunk_fn)(void* ctx, int64_t chunk);

#define POOL_MAX 63
#define CLOSED 0xFFFFFFFFu
#define SPINS 20000 /* about 0.1-0.5 ms of polling before a helper sleeps */

static struct {
    /* generation << 32 | next unclaimed chunk; CLOSED while the job's fields change */
    _Atomic uint64_t word;
    _Atomic int64_t done; /* chunks finished */
    _Atomic int32_t wake; /* futex word, bumped when a job is published */
    _Atomic int32_t sleepers;
    _Atomic(chunk_fn) fn;
    _Atomic(void*) ctx;
    _Atomic int64_t n;
    int helpers;
    pthread_mutex_t lock; /* helper creation */
} pool = {.word = CLOSED, .lock = PTHREAD_MUTEX_INITIALIZER};

static inline void cpu_relax(void) {
#if LLM_AVX2
    _mm_pause();
#endif
}

/* Claim and run one chunk of job ``gen``; 0 when none is left (or the job is over). Once a
 * claim succeeds the job's fields are stable: the caller cannot close the job before this
 * chunk is counted done. */
static int pool_run_one(uint32_t gen) {
    uint64_t w = atomic_load_explicit(&pool.word, memory_order_acquire);
    for (;;) {
        uint32_t idx = (uint32_t)w;
        if ((uint32_t)(w >> 32) != gen || idx == CLOSED ||
            (int64_t)idx >= atomic_load_explicit(&pool.n, memory_order_relaxed))
            return 0;
        if (atomic_compare_exchange_weak_explicit(&pool.word, &w, w + 1, memory_order_acq_rel,
                                                  memory_order_acquire)) {
            chunk_fn fn = atomic_load_explicit(&pool.fn, memory_order_relaxed);
            fn(atomic_load_explicit(&pool.ctx, memory_order_relaxed), idx);
            atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
            return 1;
        }
    }
}

static void futex_wait(_Atomic int32_t* addr, int32_t seen) {
#ifdef __linux__
    syscall(SYS_futex, (int32_t*)addr, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
#else
    (void)addr, (void)seen;
    sched_yield();
#endif
}

static void futex_wake_all(_Atomic int32_t* addr) {
#ifdef __linux__
    syscall(SYS_futex, (int32_t*)addr, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0);
#else
    (void)addr;
#endif
}

static void* pool_helper(void* arg) {
    (void)arg;
    uint32_t seen = (uint32_t)(atomic_load(&pool.word) >> 32);
    for (;;) {
        uint64_t w = 0;
        int found = 0;
        for (int i = 0; i < SPINS && !found; i++) {
            w = atomic_load_explicit(&pool.word, memory_order_acquire);
            found = (uint32_t)(w >> 32) != seen && (uint32_t)w != CLOSED;
            if (!found) cpu_relax();
        }
        if (!found) {
            int32_t ticket = atomic_load(&pool.wake);
            atomic_fetch_add(&pool.sleepers, 1);
            w = atomic_load(&pool.word); /* a job published before we registered? */
            if ((uint32_t)(w >> 32) == seen || (uint32_t)w == CLOSED) futex_wait(&pool.wake, ticket);
            atomic_fetch_sub(&pool.sleepers, 1);
            continue;
        }
        seen = (uint32_t)(w >> 32);
        while (pool_run_one(seen)) {
        }
    }
    return NULL;
}

static void pool_reset_after_fork(void) {
    pool.helpers = 0; /* the child has none of the parent's threads */
    atomic_store(&pool.word, CLOSED);
    pthread_mutex_init(&pool.lock, NULL);
}

static void pool_start(int helpers) {
    pthread_mutex_lock(&pool.lock);
    if (pool.helpers == 0) pthread_atfork(NULL, NULL, pool_reset_after_fork);
    while (pool.helpers < helpers && pool.helpers < POOL_MAX) {
        pthread_t tid;
        if (pthread_create(&tid, NULL, pool_helper, NULL) != 0) break;
        pthread_detach(tid);
        pool.helpers++;
    }
    pthread_mutex_unlock(&pool.lock);
}

/* Run fn(ctx, 0 .. n-1), each chunk exactly once, on the caller and the running helpers.
 * Not reentrant: one job at a time (kernels are called from one thread, as ctypes does). */
static void parallel_for(chunk_fn fn, void* ctx, int64_t n, int threads) {
    if (threads <= 1 || n <= 1) {
        for (int64_t i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    if (pool.helpers < threads - 1) pool_start(threads - 1);
    uint32_t gen = (uint32_t)(atomic_load(&pool.word) >> 32) + 1;
    atomic_store_explicit(&pool.fn, fn, memory_order_relaxed);
    atomic_store_explicit(&pool.ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&pool.n, n, memory_order_relaxed);
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    atomic_store(&pool.word, (uint64_t)gen << 32); /* publish (seq_cst: before the load below) */
    if (atomic_load(&pool.sleepers) > 0) {
        atomic_fetch_add(&pool.wake, 1);
        futex_wake_all(&pool.wake);
    }
    while (pool_run_one(gen)) {
    }
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < n) cpu_relax();
    atomic_store_explicit(&pool.word, ((uint64_t)gen << 32) | CLOSED, memory_order_release);
}

void llm_set_threads(int32_t n) { g_threads = n > 0 ? n : 1; }

/* A second per-thread buffer, for helpers called while the first is in use. */
static float* scratch_b(int64_t n) {
    static __thread float* buf = NULL;
    static __thread int64_t cap = 0;
    if (n > cap) {
        free(buf);
        cap = n > 4096 ? n : 4096;
        buf = (float*)malloc((size_t)cap * sizeof(float));
    }
    return buf;
}

/* A per-thread scratch buffer of at least ``n`` floats (kept between calls). */
static float* scratch(int64_t n) {
    static __thread float* buf = NULL;
    static __thread int64_t cap = 0;
    if (n > cap) {
        free(buf);
        cap = n > 4096 ? n : 4096;
        buf = (float*)malloc((size_t)cap * sizeof(float));
    }
    return buf;
}

/* ------------------------------------------------------------------------------------------ */
/* linear: y (T, N) = x (T, K) @ w (N, K)^T + bias                                             */
/* ------------------------------------------------------------------------------------------ */

/* One token, one weight row read straight from memory: the batch-1 decode case. Rows are
 * consecutive in memory and read one after the other, so each thread streams one sequential
 * range (what the hardware prefetcher follows best; software prefetching measured slower);
 * four accumulators hide the FMA latency. */
static float dot_row_1tok(const float* x, const void* w, int dt, int64_t K) {
    int64_t k = 0;
    float s = 0.0f;
#if LLM_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    if (dt == DT_BF16) {
        const uint16_t* wr = (const uint16_t*)w;
        for (; k + 32 <= K; k += 32) {
            a0 = _mm256_fmadd_ps(load_bf16x8(wr + k), _mm256_loadu_ps(x + k), a0);
            a1 = _mm256_fmadd_ps(load_bf16x8(wr + k + 8), _mm256_loadu_ps(x + k + 8), a1);
            a2 = _mm256_fmadd_ps(load_bf16x8(wr + k + 16), _mm256_loadu_ps(x + k + 16), a2);
            a3 = _mm256_fmadd_ps(load_bf16x8(wr + k + 24), _mm256_loadu_ps(x + k + 24), a3);
        }
        for (; k + 8 <= K; k += 8)
            a0 = _mm256_fmadd_ps(load_bf16x8(wr + k), _mm256_loadu_ps(x + k), a0);
    } else {
        const float* wr = (const float*)w;
        for (; k + 32 <= K; k += 32) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k), _mm256_loadu_ps(x + k), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 8), _mm256_loadu_ps(x + k + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 16), _mm256_loadu_ps(x + k + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 24), _mm256_loadu_ps(x + k + 24), a3);
        }
        for (; k + 8 <= K; k += 8)
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k), _mm256_loadu_ps(x + k), a0);
    }
    s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
    if (dt == DT_BF16) {
        const uint16_t* wr = (const uint16_t*)w;
        for (; k < K; k++) s += bf2f(wr[k]) * x[k];
    } else {
        const float* wr = (const float*)w;
        for (; k < K; k++) s += wr[k] * x[k];
    }
    return s;
}

/* One weight row against NT tokens (x rows K apart), the row read from memory once and
 * converted in registers: the small-batch decode case. Rows stream one after the other (several
 * concurrent row streams defeat the hardware prefetcher: 3-4x slower from DRAM), and the k loop
 * is unrolled U times so NT * U >= 8 independent accumulators keep both FMA pipes busy despite
 * the 4-cycle FMA latency. */
#if LLM_AVX2
#define DEF_ROW_TILE(NT, U)                                                                    \
    static void row_tile_##NT(const float* x, const void* w, int dt, int64_t K, float* out) {  \
        __m256 acc[U][NT];                                                                     \
        for (int u = 0; u < U; u++)                                                            \
            for (int t = 0; t < NT; t++) acc[u][t] = _mm256_setzero_ps();                      \
        int64_t k = 0;                                                                         \
        if (dt == DT_BF16) {                                                                   \
            const uint16_t* wb = (const uint16_t*)w;                                           \
            for (; k + 8 * U <= K; k += 8 * U)                                                 \
                for (int u = 0; u < U; u++) {                                                  \
                    __m256 wv = load_bf16x8(wb + k + 8 * u);                                   \
                    for (int t = 0; t < NT; t++)                                               \
                        acc[u][t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * K + k + 8 * u), \
                                                    acc[u][t]);                                \
                }                                                                              \
        } else {                                                                               \
            const float* wf = (const float*)w;                                                 \
            for (; k + 8 * U <= K; k += 8 * U)                                                 \
                for (int u = 0; u < U; u++) {                                                  \
                    __m256 wv = _mm256_loadu_ps(wf + k + 8 * u);                               \
                    for (int t = 0; t < NT; t++)                                               \
                        acc[u][t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * K + k + 8 * u), \
                                                    acc[u][t]);                                \
                }                                                                              \
        }                                                                                      \
        for (int t = 0; t < NT; t++) {                                                         \
            __m256 v = acc[0][t];                                                              \
            for (int u = 1; u < U; u++) v = _mm256_add_ps(v, acc[u][t]);                       \
            float s = hsum8(v);                                                                \
            for (int64_t j = k; j < K; j++)                                                    \
                s += (dt == DT_BF16 ? bf2f(((const uint16_t*)w)[j]) : ((const float*)w)[j]) *  \
                     x[t * K + j];                                                             \
            out[t] = s;                                                                        \
        }                                                                                      \
    }
DEF_ROW_TILE(2, 4)
DEF_ROW_TILE(3, 3)
DEF_ROW_TILE(4, 2)
DEF_ROW_TILE(5, 2)
DEF_ROW_TILE(6, 2)
DEF_ROW_TILE(7, 1)
DEF_ROW_TILE(8, 1)
#endif

/* out[t] = w . x[t] for the nt (1..8) token rows of x */
static void row_tokens(const float* x, int64_t nt, const void* w, int dt, int64_t K, float* out) {
    switch (LLM_AVX2 ? nt : 0) {
#if LLM_AVX2
    case 2: row_tile_2(x, w, dt, K, out); return;
    case 3: row_tile_3(x, w, dt, K, out); return;
    case 4: row_tile_4(x, w, dt, K, out); return;
    case 5: row_tile_5(x, w, dt, K, out); return;
    case 6: row_tile_6(x, w, dt, K, out); return;
    case 7: row_tile_7(x, w, dt, K, out); return;
    case 8: row_tile_8(x, w, dt, K, out); return;
#endif
    default:
        for (int64_t t = 0; t < nt; t++) out[t] = dot_row_1tok(x + t * K, w, dt, K);
    }
}

static inline void store_out(void* y, int64_t ldy, int dt, int64_t t, int64_t n, float v,
                             const float* bias);

/* Rows [n0, n1) of y for all T tokens: each weight row streams from memory once and meets the
 * tokens eight at a time while it is in L1. */
static void linear_stream(const float* x, int64_t T, const void* w, int dt, int64_t K,
                          int64_t n0, int64_t n1, void* y, int64_t ldy, const float* bias) {
    size_t wes = esize(dt);
    float acc[8];
    for (int64_t n = n0; n < n1; n++) {
        const char* row = (const char*)w + n * K * wes;
        for (int64_t t0 = 0; t0 < T; t0 += 8) {
            int64_t nt = T - t0 < 8 ? T - t0 : 8;
            row_tokens(x + t0 * K, nt, row, dt, K, acc);
            for (int64_t t = 0; t < nt; t++) store_out(y, ldy, dt, t0 + t, n, acc[t], bias);
        }
    }
}

/* 2 fp32 weight rows x 4 tokens, the register tile of the prefill case. */
static void tile_f32_2x4(const float* w, int64_t K, const float* x, int64_t K_x, float out[2][4]) {
    int64_t k = 0;
#if LLM_AVX2
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c02 = _mm256_setzero_ps(),
           c03 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps(),
           c12 = _mm256_setzero_ps(), c13 = _mm256_setzero_ps();
    const float *x0 = x, *x1 = x + K_x, *x2 = x + 2 * K_x, *x3 = x + 3 * K_x;
    const float *w0 = w, *w1 = w + K;
    for (; k + 8 <= K; k += 8) {
        __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k);
        __m256 t = _mm256_loadu_ps(x0 + k);
        c00 = _mm256_fmadd_ps(v0, t, c00);
        c10 = _mm256_fmadd_ps(v1, t, c10);
        t = _mm256_loadu_ps(x1 + k);
        c01 = _mm256_fmadd_ps(v0, t, c01);
        c11 = _mm256_fmadd_ps(v1, t, c11);
        t = _mm256_loadu_ps(x2 + k);
        c02 = _mm256_fmadd_ps(v0, t, c02);
        c12 = _mm256_fmadd_ps(v1, t, c12);
        t = _mm256_loadu_ps(x3 + k);
        c03 = _mm256_fmadd_ps(v0, t, c03);
        c13 = _mm256_fmadd_ps(v1, t, c13);
    }
    out[0][0] = hsum8(c00); out[0][1] = hsum8(c01); out[0][2] = hsum8(c02); out[0][3] = hsum8(c03);
    out[1][0] = hsum8(c10); out[1][1] = hsum8(c11); out[1][2] = hsum8(c12); out[1][3] = hsum8(c13);
#else
    for (int r = 0; r < 2; r++)
        for (int t = 0; t < 4; t++) out[r][t] = 0.0f;
#endif
    for (int r = 0; r < 2; r++)
        for (int t = 0; t < 4; t++) {
            float s = 0.0f;
            for (int64_t j = k; j < K; j++) s += w[r * K + j] * x[t * K_x + j];
            out[r][t] += s;
        }
}

static inline void store_out(void* y, int64_t ldy, int dt, int64_t t, int64_t n, float v,
                             const float* bias) {
    if (bias) v += bias[n];
    if (dt == DT_BF16)
        ((uint16_t*)y)[t * ldy + n] = f2bf(v);
    else
        ((float*)y)[t * ldy + n] = v;
}

#define LIN_ROWS 8    /* weight rows converted per block (kept in L1/L2) */
#define LIN_TOKENS 64 /* tokens per pass over a weight block (their fp32 copy stays in L2) */
#define LIN_STREAM_TOKENS 8 /* up to this many tokens, rows stream once (row_tokens) */
#define LIN_PANEL_TOKENS 128 /* up to this many, the weight-broadcast kernel (panel_tile) */

/* The prefill GEMM: a 6-token x 16-output register tile in broadcast form (BLIS's AVX2 shape:
 * 12 accumulators, two weight vectors, one broadcast). The weights of a 16-row block are packed
 * once, transposed to fp32 (K x 16, in L2), and the tokens into 6-row panels (K x 6); every
 * k step is then 2 loads, 6 broadcasts and 12 FMAs with no horizontal sums. */
#define GEMM_MR 6
#define GEMM_NR 16

#if LLM_AVX2
static void gemm_tile(const float* a /* K x 6 */, const float* b /* K x 16 */, int64_t K,
                      float c[GEMM_MR][GEMM_NR]) {
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(),
           c11 = _mm256_setzero_ps(), c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(),
           c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps(), c40 = _mm256_setzero_ps(),
           c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++, a += GEMM_MR, b += GEMM_NR) {
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8), t;
        t = _mm256_broadcast_ss(a + 0);
        c00 = _mm256_fmadd_ps(t, b0, c00);
        c01 = _mm256_fmadd_ps(t, b1, c01);
        t = _mm256_broadcast_ss(a + 1);
        c10 = _mm256_fmadd_ps(t, b0, c10);
        c11 = _mm256_fmadd_ps(t, b1, c11);
        t = _mm256_broadcast_ss(a + 2);
        c20 = _mm256_fmadd_ps(t, b0, c20);
        c21 = _mm256_fmadd_ps(t, b1, c21);
        t = _mm256_broadcast_ss(a + 3);
        c30 = _mm256_fmadd_ps(t, b0, c30);
        c31 = _mm256_fmadd_ps(t, b1, c31);
        t = _mm256_broadcast_ss(a + 4);
        c40 = _mm256_fmadd_ps(t, b0, c40);
        c41 = _mm256_fmadd_ps(t, b1, c41);
        t = _mm256_broadcast_ss(a + 5);
        c50 = _mm256_fmadd_ps(t, b0, c50);
        c51 = _mm256_fmadd_ps(t, b1, c51);
    }
    _mm256_storeu_ps(c[0], c00); _mm256_storeu_ps(c[0] + 8, c01);
    _mm256_storeu_ps(c[1], c10); _mm256_storeu_ps(c[1] + 8, c11);
    _mm256_storeu_ps(c[2], c20); _mm256_storeu_ps(c[2] + 8, c21);
    _mm256_storeu_ps(c[3], c30); _mm256_storeu_ps(c[3] + 8, c31);
    _mm256_storeu_ps(c[4], c40); _mm256_storeu_ps(c[4] + 8, c41);
    _mm256_storeu_ps(c[5], c50); _mm256_storeu_ps(c[5] + 8, c51);
}
#endif

/* Token panels of width W: xp[p] = tokens W*p .. W*p+W-1 of x (T x K) as K x W, zero-padded
 * past T; returns the panels' buffer (malloc'ed, the caller frees it). GEMM_MR wide for the
 * prefill GEMM, PANEL_TOKENS wide for the weight-broadcast kernel. */
static float* pack_tokens(const float* x, int64_t T, int64_t K, int64_t W) {
    int64_t panels = (T + W - 1) / W;
    float* xp = (float*)malloc((size_t)(panels * W * K) * sizeof(float));
    for (int64_t p = 0; p < panels; p++) {
        float* dst = xp + p * K * W;
        for (int64_t i = 0; i < W; i++) {
            int64_t t = p * W + i;
            for (int64_t k = 0; k < K; k++) dst[k * W + i] = t < T ? x[t * K + k] : 0.0f;
        }
    }
    return xp;
}

/* Weight rows n .. n+15 (zero past N) as K x 16 fp32. */
static void pack_rows(const void* w, int dt, int64_t K, int64_t n, int64_t N, float* wp) {
    float* row = scratch_b(K);
    for (int64_t r = 0; r < GEMM_NR; r++) {
        if (n + r < N)
            to_f32((const char*)w + (n + r) * K * esize(dt), dt, row, K);
        for (int64_t k = 0; k < K; k++) wp[k * GEMM_NR + r] = n + r < N ? row[k] : 0.0f;
    }
}

/* Batched decode, LIN_STREAM_TOKENS < T <= LIN_PANEL_TOKENS: the GEMM tile with the roles
 * swapped. The tokens are packed once per call into 16-token panels (K x 16); a block of 6
 * weight rows is converted to fp32 in one sequential stream (rows are contiguous: one stream
 * for the prefetcher) into an L1 buffer, and each k step broadcasts one weight per row against
 * two token vectors: 2 loads, 6 broadcasts, 12 FMAs, as in the prefill tile, but with no
 * transposed weight panel to build (which costs as much as the FMAs at 16 tokens). */
#define PANEL_ROWS 6
#define PANEL_TOKENS 16

#if LLM_AVX2
static void panel_tile(const float* w /* 6 rows, K apart */, const float* a /* K x 16 */,
                       int64_t K, float c[PANEL_ROWS][PANEL_TOKENS]) {
    __m256 acc[PANEL_ROWS][2];
    for (int r = 0; r < PANEL_ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++, a += PANEL_TOKENS) {
        __m256 a0 = _mm256_loadu_ps(a), a1 = _mm256_loadu_ps(a + 8);
        for (int r = 0; r < PANEL_ROWS; r++) {
            __m256 t = _mm256_broadcast_ss(w + r * K + k);
            acc[r][0] = _mm256_fmadd_ps(t, a0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(t, a1, acc[r][1]);
        }
    }
    for (int r = 0; r < PANEL_ROWS; r++) {
        _mm256_storeu_ps(c[r], acc[r][0]);
        _mm256_storeu_ps(c[r] + 8, acc[r][1]);
    }
}
#endif

typedef struct {
    const float* xf; /* (T, K) fp32 */
    const float* xp; /* token panels for the panel or GEMM path, or NULL */
    const void* w;
    const float* bias; /* (N,) fp32 or NULL */
    void* y;
    int64_t T, K, N, ldy, rows; /* rows per chunk */
    int dt;
} linear_job;

static void linear_chunk(void* p, int64_t chunk) {
    const linear_job* j = (const linear_job*)p;
    int64_t K = j->K, T = j->T;
    int64_t n0 = chunk * j->rows, n1 = n0 + j->rows < j->N ? n0 + j->rows : j->N;
    size_t wes = esize(j->dt);
    if (T == 1) {
        for (int64_t n = n0; n < n1; n++)
            store_out(j->y, j->ldy, j->dt, 0, n,
                      dot_row_1tok(j->xf, (const char*)j->w + n * K * wes, j->dt, K), j->bias);
        return;
    }
    if (T <= LIN_STREAM_TOKENS) {
        linear_stream(j->xf, T, j->w, j->dt, K, n0, n1, j->y, j->ldy, j->bias);
        return;
    }
#if LLM_AVX2
    if (j->xp && T <= LIN_PANEL_TOKENS) {
        float* wb = scratch(PANEL_ROWS * K);
        float c[PANEL_ROWS][PANEL_TOKENS];
        for (int64_t n = n0; n < n1; n += PANEL_ROWS) {
            int64_t rows = n1 - n < PANEL_ROWS ? n1 - n : PANEL_ROWS;
            to_f32((const char*)j->w + n * K * wes, j->dt, wb, rows * K);
            if (rows < PANEL_ROWS) memset(wb + rows * K, 0, (size_t)((PANEL_ROWS - rows) * K) * 4);
            for (int64_t p = 0; p * PANEL_TOKENS < T; p++) {
                panel_tile(wb, j->xp + p * K * PANEL_TOKENS, K, c);
                int64_t nt = T - p * PANEL_TOKENS < PANEL_TOKENS ? T - p * PANEL_TOKENS : PANEL_TOKENS;
                for (int64_t r = 0; r < rows; r++)
                    for (int64_t t = 0; t < nt; t++)
                        store_out(j->y, j->ldy, j->dt, p * PANEL_TOKENS + t, n + r, c[r][t], j->bias);
            }
        }
        return;
    }
    if (j->xp) { /* rows come in multiples of 16 except at the very end */
        float* wp = scratch(K * GEMM_NR);
        float c[GEMM_MR][GEMM_NR];
        for (int64_t n = n0; n < n1; n += GEMM_NR) {
            pack_rows(j->w, j->dt, K, n, j->N, wp);
            int64_t nr = n1 - n < GEMM_NR ? n1 - n : GEMM_NR;
            for (int64_t p = 0; p * GEMM_MR < T; p++) {
                gemm_tile(j->xp + p * K * GEMM_MR, wp, K, c);
                int64_t mr = T - p * GEMM_MR < GEMM_MR ? T - p * GEMM_MR : GEMM_MR;
                for (int64_t i = 0; i < mr; i++)
                    for (int64_t r = 0; r < nr; r++)
                        store_out(j->y, j->ldy, j->dt, p * GEMM_MR + i, n + r, c[i][r], j->bias);
            }
        }
        return;
    }
#endif
    float* wb = scratch(LIN_ROWS * K);
    for (int64_t tc = 0; tc < T; tc += LIN_TOKENS) {
        int64_t tn = T - tc < LIN_TOKENS ? T - tc : LIN_TOKENS;
        const float* xc = j->xf + tc * K;
        for (int64_t n = n0; n < n1; n += LIN_ROWS) {
            int64_t rows = n1 - n < LIN_ROWS ? n1 - n : LIN_ROWS;
            to_f32((const char*)j->w + n * K * wes, j->dt, wb, rows * K);
            /* Token tiles outside, row pairs inside: a tile's 4 rows of x stay in L1 while
             * every row of the weight block (also in L1) passes over them. */
            int64_t t = 0;
            float acc[2][4];
            for (; t + 4 <= tn; t += 4) {
                int64_t r = 0;
                for (; r + 2 <= rows; r += 2) {
                    tile_f32_2x4(wb + r * K, K, xc + t * K, K, acc);
                    for (int i = 0; i < 2; i++)
                        for (int k = 0; k < 4; k++)
                            store_out(j->y, j->ldy, j->dt, tc + t + k, n + r + i, acc[i][k], j->bias);
                }
                for (; r < rows; r++)
                    for (int k = 0; k < 4; k++)
                        store_out(j->y, j->ldy, j->dt, tc + t + k, n + r,
                                  dot_f32(wb + r * K, xc + (t + k) * K, K), j->bias);
            }
            for (; t < tn; t++)
                for (int64_t r = 0; r < rows; r++)
                    store_out(j->y, j->ldy, j->dt, tc + t, n + r, dot_f32(wb + r * K, xc + t * K, K),
                              j->bias);
        }
    }
}

void llm_linear(const void* x, int64_t ldx, int64_t T, int64_t K, const void* w, int64_t N,
                const void* bias, void* y, int64_t ldy, int32_t dt) {
    float* xf = (float*)malloc((size_t)(T * K + (bias ? N : 0)) * sizeof(float));
    for (int64_t t = 0; t < T; t++) to_f32((const char*)x + t * ldx * esize(dt), dt, xf + t * K, K);
    float* bf = NULL;
    if (bias) {
        bf = xf + T * K;
        to_f32(bias, dt, bf, N);
    }
    int threads = (double)N * K * (T > 4 ? T : 1) < 65536.0 ? 1 : g_threads;
    float* xp = NULL;
    int64_t unit = LIN_ROWS;
#if LLM_AVX2
    if (T > LIN_STREAM_TOKENS) {
        int panel = T <= LIN_PANEL_TOKENS;
        xp = pack_tokens(xf, T, K, panel ? PANEL_TOKENS : GEMM_MR);
        unit = panel ? PANEL_ROWS : GEMM_NR;
    }
#endif
    /* About eight chunks per thread: a helper that starts late still takes a share. */
    int64_t rows = N / (8 * threads);
    rows = rows < unit ? unit : (rows / unit) * unit;
    linear_job job = {xf, xp, w, bf, y, T, K, N, ldy, rows, dt};
    parallel_for(linear_chunk, &job, (N + rows - 1) / rows, threads);
    free(xp);
    free(xf);
}

/* ------------------------------------------------------------------------------------------ */
/* rms_norm (optionally fused with the residual add)                                          */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    const void *x, *res, *w;
    void *y, *s_out;
    int64_t ldx, ldr, ldy, lds, H, rows_per_chunk, T;
    float eps;
    int dt;
} rms_job;

static void rms_chunk(void* p, int64_t chunk) {
    const rms_job* j = (const rms_job*)p;
    int64_t H = j->H, t0 = chunk * j->rows_per_chunk;
    int64_t t1 = t0 + j->rows_per_chunk < j->T ? t0 + j->rows_per_chunk : j->T;
    size_t es = esize(j->dt);
    float* buf = scratch(3 * H);
    float *s = buf, *r = buf + H, *wf = buf + 2 * H;
    to_f32(j->w, j->dt, wf, H);
    for (int64_t t = t0; t < t1; t++) {
        to_f32((const char*)j->x + t * j->ldx * es, j->dt, s, H);
        if (j->res) {
            to_f32((const char*)j->res + t * j->ldr * es, j->dt, r, H);
            for (int64_t i = 0; i < H; i++) s[i] = round_dt(s[i] + r[i], j->dt);
            from_f32(s, (char*)j->s_out + t * j->lds * es, j->dt, H);
        }
        float ss = dot_f32(s, s, H);
        float inv = 1.0f / sqrtf(ss / (float)H + j->eps);
        for (int64_t i = 0; i < H; i++) s[i] = round_dt(s[i] * inv, j->dt) * wf[i];
        from_f32(s, (char*)j->y + t * j->ldy * es, j->dt, H);
    }
}

void llm_rms_norm(const void* x, int64_t ldx, const void* res, int64_t ldr, const void* w,
                  void* y, int64_t ldy, void* s_out, int64_t lds, int64_t T, int64_t H,
                  float eps, int32_t dt) {
    int threads = T * H >= 262144 ? g_threads : 1;
    int64_t rows = T / (4 * threads) > 1 ? T / (4 * threads) : 1;
    rms_job job = {x, res, w, y, s_out, ldx, ldr, ldy, lds, H, rows, T, eps, dt};
    parallel_for(rms_chunk, &job, (T + rows - 1) / rows, threads);
}

/* ------------------------------------------------------------------------------------------ */
/* rotary embedding, in place                                                                 */
/* ------------------------------------------------------------------------------------------ */

static void rotate_heads(void* base, int64_t ld, int64_t t, int64_t heads, int64_t D,
                         const float* cs, int64_t R, int neox, int dt, float* buf) {
    int64_t half = R / 2;
    const float *c = cs, *sn = cs + half;
    size_t es = esize(dt);
    for (int64_t h = 0; h < heads; h++) {
        char* p = (char*)base + (t * ld + h * D) * es;
        to_f32(p, dt, buf, R);
        if (neox) {
            for (int64_t i = 0; i < half; i++) {
                float a = buf[i], b = buf[i + half];
                buf[i] = a * c[i] - b * sn[i];
                buf[i + half] = b * c[i] + a * sn[i];
            }
        } else {
            for (int64_t i = 0; i < half; i++) {
                float a = buf[2 * i], b = buf[2 * i + 1];
                buf[2 * i] = a * c[i] - b * sn[i];
                buf[2 * i + 1] = b * c[i] + a * sn[i];
            }
        }
        from_f32(buf, p, dt, R);
    }
}

typedef struct {
    const int64_t* pos;
    void *q, *k;
    const float* cos_sin;
    int64_t ldq, hq, ldk, hk, R, D, rows_per_chunk, T;
    int neox, dt;
} rotary_job;

static void rotary_chunk(void* p, int64_t chunk) {
    const rotary_job* j = (const rotary_job*)p;
    int64_t t0 = chunk * j->rows_per_chunk;
    int64_t t1 = t0 + j->rows_per_chunk < j->T ? t0 + j->rows_per_chunk : j->T;
    float* buf = scratch(j->R);
    for (int64_t t = t0; t < t1; t++) {
        const float* cs = j->cos_sin + j->pos[t] * j->R;
        rotate_heads(j->q, j->ldq, t, j->hq, j->D, cs, j->R, j->neox, j->dt, buf);
        rotate_heads(j->k, j->ldk, t, j->hk, j->D, cs, j->R, j->neox, j->dt, buf);
    }
}

void llm_rotary(const int64_t* pos, void* q, int64_t ldq, int64_t hq, void* k, int64_t ldk,
                int64_t hk, const float* cos_sin, int64_t R, int64_t D, int32_t neox, int64_t T,
                int32_t dt) {
    int threads = T >= 64 ? g_threads : 1;
    int64_t rows = T / (4 * threads) > 1 ? T / (4 * threads) : 1;
    rotary_job job = {pos, q, k, cos_sin, ldq, hq, ldk, hk, R, D, rows, T, neox, dt};
    parallel_for(rotary_chunk, &job, (T + rows - 1) / rows, threads);
}

/* ------------------------------------------------------------------------------------------ */
/* KV cache write: token t goes to slot slots[t] (skipped when < 0); same dtype as the cache   */
/* ------------------------------------------------------------------------------------------ */

void llm_cache_write(const void* key, int64_t ldk, const void* val, int64_t ldv, void* kc,
                     void* vc, const int64_t* slots, int64_t T, int64_t W, int32_t dt) {
    size_t es = esize(dt), row = (size_t)W * es;
    for (int64_t t = 0; t < T; t++) {
        int64_t s = slots[t];
        if (s < 0) continue;
        memcpy((char*)kc + s * row, (const char*)key + t * ldk * es, row);
        memcpy((char*)vc + s * row, (const char*)val + t * ldv * es, row);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* paged attention, decode: one query token per sequence                                      */
/* ------------------------------------------------------------------------------------------ */

static void softmax_inplace(float* s, int64_t n, float* sum_out) {
    float m = -INFINITY;
    int nan = 0;
    for (int64_t i = 0; i < n; i++) {
        m = s[i] > m ? s[i] : m;
        nan |= s[i] != s[i];
    }
    if (nan) { /* NaN propagates, as in the reference (the clamped exp below would hide it) */
        for (int64_t i = 0; i < n; i++) s[i] = NAN;
        *sum_out = NAN;
        return;
    }
    int64_t i = 0;
    float sum = 0.0f;
#if LLM_AVX2
    __m256 vm = _mm256_set1_ps(m), acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), vm));
        _mm256_storeu_ps(s + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum8(acc);
#endif
    for (; i < n; i++) {
        s[i] = expf(s[i] - m);
        sum += s[i];
    }
    *sum_out = sum;
}

#if LLM_AVX2
static inline __m256 load_kv8(const char* p, int dt) {
    return dt == DT_BF16 ? load_bf16x8((const uint16_t*)p) : _mm256_loadu_ps((const float*)p);
}

/* The scores of three query heads (q + h * D) against four key rows (k + i * D), D % 8 == 0:
 * twelve independent accumulators share each load (one FMA chain per 64-wide dot left the
 * loop waiting on FMA latency). */
static void dots_3x4(const float* q, const float* k, int64_t D, float out[3][4]) {
    __m256 c[3][4];
    for (int h = 0; h < 3; h++)
        for (int i = 0; i < 4; i++) c[h][i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
        __m256 q0 = _mm256_loadu_ps(q + d), q1 = _mm256_loadu_ps(q + D + d),
               q2 = _mm256_loadu_ps(q + 2 * D + d);
        for (int i = 0; i < 4; i++) {
            __m256 kv = _mm256_loadu_ps(k + i * D + d);
            c[0][i] = _mm256_fmadd_ps(q0, kv, c[0][i]);
            c[1][i] = _mm256_fmadd_ps(q1, kv, c[1][i]);
            c[2][i] = _mm256_fmadd_ps(q2, kv, c[2][i]);
        }
    }
    for (int h = 0; h < 3; h++) {
        __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(c[h][0], c[h][1]), _mm256_hadd_ps(c[h][2], c[h][3]));
        _mm_storeu_ps(out[h], _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
    }
}

/* Three query heads' weighted sums of value rows, 32 dimensions (d0 .. d0 + 31) at a time:
 * acc[h] += sum over pos in [lo, hi) of p[h][pos - lo] * V[pos][d0 ..], the twelve sums held
 * in registers across all positions (accumulating in memory, one head and row at a time, made
 * the loop wait on its stores). Each value row is read from the cache and converted in
 * registers. */
static void v_accum_3x32(const float* p0, const float* p1, const float* p2, const char* vc,
                         const int32_t* table, int64_t lo, int64_t hi, int64_t bs,
                         int64_t pos_stride, int64_t head_off, int dt, float* a0, float* a1,
                         float* a2) {
    size_t es = esize(dt);
    __m256 c[3][4];
    for (int h = 0; h < 3; h++)
        for (int v = 0; v < 4; v++) c[h][v] = _mm256_setzero_ps();
    for (int64_t pos = lo; pos < hi;) {
        int64_t blk = table[pos / bs], off = pos % bs;
        int64_t end = pos - off + bs < hi ? pos - off + bs : hi;
        const char* vp = vc + ((blk * bs + off) * pos_stride + head_off) * es;
        for (; pos < end; pos++, vp += pos_stride * es) {
            __m256 w0 = _mm256_broadcast_ss(p0 + pos - lo), w1 = _mm256_broadcast_ss(p1 + pos - lo),
                   w2 = _mm256_broadcast_ss(p2 + pos - lo);
            for (int v = 0; v < 4; v++) {
                __m256 x = load_kv8(vp + 8 * v * es, dt);
                c[0][v] = _mm256_fmadd_ps(w0, x, c[0][v]);
                c[1][v] = _mm256_fmadd_ps(w1, x, c[1][v]);
                c[2][v] = _mm256_fmadd_ps(w2, x, c[2][v]);
            }
        }
    }
    for (int v = 0; v < 4; v++) {
        _mm256_storeu_ps(a0 + 8 * v, c[0][v]);
        _mm256_storeu_ps(a1 + 8 * v, c[1][v]);
        _mm256_storeu_ps(a2 + 8 * v, c[2][v]);
    }
}
#endif

typedef struct {
    const void *q, *kc, *vc;
    void* out;
    const int32_t *tables, *row_seq, *row_lens;
    const int64_t* tiles; /* tile i is rows [tiles[i], tiles[i + 1]) */
    int64_t ldq, Hq, Hkv, D, bs, ldt, window, ldo, max_len;
    float scale;
    int dt;
} attn_job;

/* Query rows per work item in prefill: each cached key and value row is converted to fp32 once
 * per tile (not once per query row) and used by its G x ATTN_TILE query heads. */
#define ATTN_TILE 8

static void attn_chunk(void* p, int64_t item) {
    const attn_job* j = (const attn_job*)p;
    int64_t Hkv = j->Hkv, D = j->D, bs = j->bs, G = j->Hq / Hkv;
    size_t es = esize(j->dt);
    int64_t r0 = j->tiles[item / Hkv], nr = j->tiles[item / Hkv + 1] - r0, g = item % Hkv;
    int64_t first[ATTN_TILE], lens[ATTN_TILE], lo = INT64_MAX, hi = 0;
    for (int64_t r = 0; r < nr; r++) {
        int64_t L = j->row_lens[r0 + r];
        first[r] = j->window > 0 && L > j->window ? L - j->window : 0;
        lens[r] = L;
        lo = first[r] < lo ? first[r] : lo;
        hi = L > hi ? L : hi;
    }
    int64_t span = hi - lo, QH = nr * G; /* query heads in the tile: (row, head) pairs */
    const int32_t* table = j->tables + (j->row_seq ? j->row_seq[r0] : r0) * j->ldt;
    float* buf = scratch(QH * span + 2 * QH * D + D + QH + span + 7 * D);
    float *sc = buf, *qf = sc + QH * span, *acc = qf + QH * D, *row = acc + QH * D;
    float* sum = row + D;
    for (int64_t r = 0; r < nr; r++)
        for (int64_t h = 0; h < G; h++) {
            float* qh = qf + (r * G + h) * D;
            to_f32((const char*)j->q + ((r0 + r) * j->ldq + (g * G + h) * D) * es, j->dt, qh, D);
            for (int64_t i = 0; i < D; i++) qh[i] *= j->scale;
        }
#if LLM_AVX2
    if (D % 8 == 0) {
        /* four key rows at a time (converted once into kb) against three query heads at a
         * time; every head of the tile is scored at every position of the tile's range, and
         * each row's softmax reads only the positions it sees */
        float* kb = sum + QH + span + 3 * D;
        for (int64_t pos = lo; pos < hi;) {
            int64_t blk = table[pos / bs], off = pos % bs;
            int64_t end = pos - off + bs < hi ? pos - off + bs : hi;
            const char* kp = (const char*)j->kc + ((blk * bs + off) * Hkv + g) * D * es;
            while (pos < end) {
                int64_t m = end - pos < 4 ? end - pos : 4;
                for (int64_t i = 0; i < 4; i++)
                    to_f32(kp + (i < m ? i : 0) * Hkv * D * es, j->dt, kb + i * D, D);
                for (int64_t qh = 0; qh < QH; qh += 3) {
                    float o[3][4];
                    if (qh + 3 <= QH)
                        dots_3x4(qf + qh * D, kb, D, o);
                    else /* fewer than three heads left: one by one */
                        for (int64_t h = qh; h < QH; h++)
                            for (int64_t i = 0; i < m; i++)
                                o[h - qh][i] = dot_f32(qf + h * D, kb + i * D, D);
                    for (int64_t h = 0; h < 3 && qh + h < QH; h++)
                        for (int64_t i = 0; i < m; i++) sc[(qh + h) * span + pos - lo + i] = o[h][i];
                }
                pos += m;
                kp += m * Hkv * D * es;
            }
        }
    } else
#endif
    for (int64_t pos = lo; pos < hi;) { /* block by block */
        int64_t blk = table[pos / bs], off = pos % bs;
        int64_t end = pos - off + bs < hi ? pos - off + bs : hi;
        const char* kp = (const char*)j->kc + ((blk * bs + off) * Hkv + g) * D * es;
        for (; pos < end; pos++, kp += Hkv * D * es) {
            to_f32(kp, j->dt, row, D);
            for (int64_t r = 0; r < nr; r++)
                if (pos >= first[r] && pos < lens[r])
                    for (int64_t h = 0; h < G; h++)
                        sc[(r * G + h) * span + pos - lo] = dot_f32(qf + (r * G + h) * D, row, D);
        }
    }
    for (int64_t r = 0; r < nr; r++)
        for (int64_t h = 0; h < G; h++)
            softmax_inplace(sc + (r * G + h) * span + first[r] - lo, lens[r] - first[r],
                            &sum[r * G + h]);
    memset(acc, 0, (size_t)(QH * D) * sizeof(float));
#if LLM_AVX2
    if (D % 32 == 0) {
        /* per row, the value rows it sees, for three of its query heads and 32 dimensions at
         * a time (a head of zero probabilities pads the last group; its sums are dropped) */
        float *zeros = sum + QH, *pad = zeros + span;
        memset(zeros, 0, (size_t)span * sizeof(float));
        for (int64_t r = 0; r < nr; r++) {
            int64_t n = lens[r] - first[r];
            if (n <= 0) continue;
            for (int64_t h0 = 0; h0 < G; h0 += 3) {
                const float* pp[3];
                float* ap[3];
                for (int64_t k = 0; k < 3; k++) {
                    int64_t qh = r * G + h0 + k;
                    int valid = h0 + k < G;
                    pp[k] = valid ? sc + qh * span + first[r] - lo : zeros;
                    ap[k] = valid ? acc + qh * D : pad + k * D;
                }
                for (int64_t d0 = 0; d0 < D; d0 += 32)
                    v_accum_3x32(pp[0], pp[1], pp[2], (const char*)j->vc, table, first[r],
                                 lens[r], bs, Hkv * D, g * D + d0, j->dt, ap[0] + d0,
                                 ap[1] + d0, ap[2] + d0);
            }
        }
    } else
#endif
        for (int64_t pos = lo; pos < hi;) {
            int64_t blk = table[pos / bs], off = pos % bs;
            int64_t end = pos - off + bs < hi ? pos - off + bs : hi;
            const char* vp = (const char*)j->vc + ((blk * bs + off) * Hkv + g) * D * es;
            for (; pos < end; pos++, vp += Hkv * D * es) {
                to_f32(vp, j->dt, row, D);
                for (int64_t r = 0; r < nr; r++)
                    if (pos >= first[r] && pos < lens[r])
                        for (int64_t h = 0; h < G; h++)
                            axpy_f32(sc[(r * G + h) * span + pos - lo], row,
                                     acc + (r * G + h) * D, D);
            }
        }
    for (int64_t r = 0; r < nr; r++)
        for (int64_t h = 0; h < G; h++) {
            float* a = acc + (r * G + h) * D;
            float inv = 1.0f / sum[r * G + h];
            for (int64_t i = 0; i < D; i++) a[i] *= inv;
            from_f32(a, (char*)j->out + ((r0 + r) * j->ldo + (g * G + h) * D) * es, j->dt, D);
        }
}

/* Attention of R query rows over the paged cache. Row r (Hq heads of D at q + r * ldq) reads
 * the block table of sequence row_seq[r] (r itself when row_seq is NULL) and attends to its
 * positions [start, row_lens[r]), start = row_lens[r] - window when a window is set. Decode
 * passes one row per sequence with row_lens = seq_lens; causal prefill passes one row per new
 * token with row_lens = its position + 1. A work item is a tile of up to ATTN_TILE consecutive
 * rows of one sequence and one KV head: each cached key and value row is converted to fp32 once
 * per tile and used by every query head of its GQA group in every row of the tile. */
void llm_attention(const void* q, int64_t ldq, const void* kc, const void* vc, int64_t R,
                   int64_t Hq, int64_t Hkv, int64_t D, int64_t bs, const int32_t* tables,
                   int64_t ldt, const int32_t* row_seq, const int32_t* row_lens, float scale,
                   int64_t window, void* out, int64_t ldo, int32_t dt) {
    int64_t max_len = 1, work = 0, ntiles = 0;
    int64_t* tiles = (int64_t*)malloc((size_t)(R + 1) * sizeof(int64_t));
    for (int64_t r = 0; r < R; r++) {
        max_len = row_lens[r] > max_len ? row_lens[r] : max_len;
        work += row_lens[r];
        int same = row_seq && r > 0 && row_seq[r] == row_seq[r - 1];
        if (!same || r - tiles[ntiles - 1] == ATTN_TILE) tiles[ntiles++] = r;
    }
    tiles[ntiles] = R;
    int threads = work * Hq * D >= 65536 ? g_threads : 1;
    attn_job job = {q, kc, vc, out, tables, row_seq, row_lens, tiles, ldq, Hq, Hkv, D, bs, ldt,
                    window, ldo, max_len, scale, dt};
    parallel_for(attn_chunk, &job, ntiles * Hkv, threads);
    free(tiles);
}

/* ------------------------------------------------------------------------------------------ */
/* activations, gathers, conversion                                                           */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    const void* x;
    void* y;
    int64_t ldx, ldy, I, rows_per_chunk, T;
    int dt;
} silu_job;

static void silu_chunk(void* p, int64_t chunk) {
    const silu_job* j = (const silu_job*)p;
    int64_t I = j->I, t0 = chunk * j->rows_per_chunk;
    int64_t t1 = t0 + j->rows_per_chunk < j->T ? t0 + j->rows_per_chunk : j->T;
    size_t es = esize(j->dt);
    float* buf = scratch(2 * I);
    for (int64_t t = t0; t < t1; t++) {
        to_f32((const char*)j->x + t * j->ldx * es, j->dt, buf, 2 * I);
        float *g = buf, *u = buf + I;
        int64_t i = 0;
#if LLM_AVX2
        const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
        for (; i + 8 <= I; i += 8) {
            __m256 gv = _mm256_loadu_ps(g + i);
            __m256 e = exp8(_mm256_sub_ps(zero, gv));
            __m256 sig = _mm256_div_ps(gv, _mm256_add_ps(one, e));
            _mm256_storeu_ps(g + i, _mm256_mul_ps(sig, _mm256_loadu_ps(u + i)));
        }
#endif
        for (; i < I; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        from_f32(g, (char*)j->y + t * j->ldy * es, j->dt, I);
    }
}

/* y (T, I) = silu(x[:, :I]) * x[:, I:2I] */
void llm_silu_mul(const void* x, int64_t ldx, void* y, int64_t ldy, int64_t T, int64_t I,
                  int32_t dt) {
    int threads = T * I >= 262144 ? g_threads : 1;
    int64_t rows = T / (4 * threads) > 1 ? T / (4 * threads) : 1;
    silu_job job = {x, y, ldx, ldy, I, rows, T, dt};
    parallel_for(silu_chunk, &job, (T + rows - 1) / rows, threads);
}

/* out[t] = table[ids[t]]; ids are int64 (id64 = 1) or int32 */
void llm_embedding(const void* ids, int32_t id64, const void* table, int64_t H, int64_t T,
                   void* out, int32_t dt) {
    size_t row = (size_t)H * esize(dt);
    for (int64_t t = 0; t < T; t++) {
        int64_t id = id64 ? ((const int64_t*)ids)[t] : ((const int32_t*)ids)[t];
        memcpy((char*)out + t * row, (const char*)table + id * row, row);
    }
}

/* out[b] = x[idx[b]] */
void llm_gather_rows(const void* x, int64_t ldx, const int64_t* idx, int64_t B, int64_t H,
                     void* out, int32_t dt) {
    size_t es = esize(dt);
    for (int64_t b = 0; b < B; b++)
        memcpy((char*)out + b * H * es, (const char*)x + idx[b] * ldx * es, (size_t)H * es);
}

/* n contiguous values from dtype sdt to ddt */
void llm_convert(const void* src, int32_t sdt, void* dst, int32_t ddt, int64_t n) {
    if (sdt == ddt) {
        memcpy(dst, src, (size_t)n * esize(sdt));
    } else if (sdt == DT_BF16) {
        to_f32(src, DT_BF16, (float*)dst, n);
    } else {
        from_f32((const float*)src, dst, DT_BF16, n);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* guided decoding                                                                            */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    float* x;
    const int32_t* mask;
    int64_t ldx, ldm, V, rows_per_chunk, B;
} bitmask_job;

/* One row: x[t] = -inf where bit t % 32 of mask[t / 32] is clear. Words of all ones (rows
 * without a grammar) are skipped and words of all zeros (most of a constrained row) filled,
 * without reading the logits; bits past V are never looked at. */
static void bitmask_row(float* x, const int32_t* mask, int64_t V) {
    int64_t full = V / 32;
    for (int64_t w = 0; w < full; w++) {
        uint32_t m = (uint32_t)mask[w];
        float* xw = x + 32 * w;
        if (m == 0xFFFFFFFFu) continue;
        if (m == 0) {
            for (int k = 0; k < 32; k++) xw[k] = -INFINITY;
            continue;
        }
#if LLM_AVX2
        const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        const __m256 ninf = _mm256_set1_ps(-INFINITY);
        for (int g = 0; g < 4; g++) {
            __m256i bit = _mm256_and_si256(_mm256_set1_epi32((int32_t)(m >> (8 * g))), lane_bit);
            __m256 clear = _mm256_castsi256_ps(_mm256_cmpeq_epi32(bit, _mm256_setzero_si256()));
            float* x8 = xw + 8 * g;
            _mm256_storeu_ps(x8, _mm256_blendv_ps(_mm256_loadu_ps(x8), ninf, clear));
        }
#else
        for (int k = 0; k < 32; k++)
            if (!((m >> k) & 1u)) xw[k] = -INFINITY;
#endif
    }
    if (V % 32) { /* the last, partial word */
        uint32_t m = (uint32_t)mask[full];
        for (int64_t t = 32 * full; t < V; t++)
            if (!((m >> (t % 32)) & 1u)) x[t] = -INFINITY;
    }
}

static void bitmask_chunk(void* p, int64_t chunk) {
    const bitmask_job* j = (const bitmask_job*)p;
    int64_t b0 = chunk * j->rows_per_chunk;
    int64_t b1 = b0 + j->rows_per_chunk < j->B ? b0 + j->rows_per_chunk : j->B;
    for (int64_t b = b0; b < b1; b++) bitmask_row(j->x + b * j->ldx, j->mask + b * j->ldm, j->V);
}

/* fp32 logits (B, V), rows ldx apart: logits[b, t] = -inf where bit t % 32 of
 * mask[b, t / 32] is clear; mask rows (at least ceil(V / 32) int32 words) ldm apart. */
void llm_token_bitmask(float* logits, int64_t ldx, const int32_t* mask, int64_t ldm, int64_t B,
                       int64_t V) {
    int threads = B * V >= 262144 ? g_threads : 1;
    int64_t rows = B / threads > 1 ? B / threads : 1;
    bitmask_job job = {logits, mask, ldx, ldm, V, rows, B};
    parallel_for(bitmask_chunk, &job, (B + rows - 1) / rows, threads);
}

/* ------------------------------------------------------------------------------------------ */
/* replay of a captured step                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* One recorded kernel call: pointers, integers and floats in the order of the kernel's own
 * parameters of each kind (the Python side packs them by the same argtypes). */
typedef struct {
    int64_t kind;
    void* p[8];
    int64_t i[12];
    double f[2];
} llm_record;

enum {
    K_LINEAR = 1,
    K_RMS_NORM,
    K_ROTARY,
    K_CACHE_WRITE,
    K_ATTENTION,
    K_SILU_MUL,
    K_EMBEDDING,
    K_GATHER_ROWS,
    K_CONVERT,
    K_TOKEN_BITMASK,
};

int64_t llm_record_size(void) { return (int64_t)sizeof(llm_record); }

int64_t llm_run(const llm_record* recs, int64_t n) {
    for (int64_t j = 0; j < n; j++) {
        const llm_record* r = recs + j;
        const int64_t* i = r->i;
        void* const* p = r->p;
        switch (r->kind) {
        case K_LINEAR:
            llm_linear(p[0], i[0], i[1], i[2], p[1], i[3], p[2], p[3], i[4], (int32_t)i[5]);
            break;
        case K_RMS_NORM:
            llm_rms_norm(p[0], i[0], p[1], i[1], p[2], p[3], i[2], p[4], i[3], i[4], i[5],
                         (float)r->f[0], (int32_t)i[6]);
            break;
        case K_ROTARY:
            llm_rotary((const int64_t*)p[0], p[1], i[0], i[1], p[2], i[2], i[3],
                       (const float*)p[3], i[4], i[5], (int32_t)i[6], i[7], (int32_t)i[8]);
            break;
        case K_CACHE_WRITE:
            llm_cache_write(p[0], i[0], p[1], i[1], p[2], p[3], (const int64_t*)p[4], i[2],
                            i[3], (int32_t)i[4]);
            break;
        case K_ATTENTION:
            llm_attention(p[0], i[0], p[1], p[2], i[1], i[2], i[3], i[4], i[5],
                          (const int32_t*)p[3], i[6], (const int32_t*)p[4], (const int32_t*)p[5],
                          (float)r->f[0], i[7], p[6], i[8], (int32_t)i[9]);
            break;
        case K_SILU_MUL:
            llm_silu_mul(p[0], i[0], p[1], i[1], i[2], i[3], (int32_t)i[4]);
            break;
        case K_EMBEDDING:
            llm_embedding(p[0], (int32_t)i[0], p[1], i[1], i[2], p[2], (int32_t)i[3]);
            break;
        case K_GATHER_ROWS:
            llm_gather_rows(p[0], i[0], (const int64_t*)p[1], i[1], i[2], p[2], (int32_t)i[3]);
            break;
        case K_CONVERT:
            llm_convert(p[0], (int32_t)i[0], p[1], (int32_t)i[1], i[2]);
            break;
        case K_TOKEN_BITMASK:
            llm_token_bitmask((float*)p[0], i[0], (const int32_t*)p[1], i[1], i[2], i[3]);
            break;
        default:
            return -(j + 1); /* unknown kind: the caller reports which record */
        }
    }
    return n;
}
