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

/* Batch invariance. Every output y[t][n] is summed in one fixed order, whatever the number of
 * tokens T, the path that computes it (batch-1 GEMV, small batch, prefill), the register tile
 * it falls in and the thread that runs it, so a token's result never depends on the rest of
 * the batch:
 *   - eight fp32 lanes, each a chain of fused multiply-adds over the 8-wide blocks of k in
 *     "lane order": ascending, except that with bf16 weights each full 16-wide block is taken
 *     as k+0..3,8..11 then k+4..7,12..15 (the two halves one 32-byte load unpacks into);
 *   - the lanes summed by one tree, ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), which
 *     three horizontal adds and one add compute for four outputs at once (reduce4);
 *   - the last K % 8 products added one by one (fmaf), then the bias, then one rounding.
 * The tokens are stored in lane order once per call, and so are bf16 weight rows wherever a
 * path converts them first; every path then runs the same chains and differs only in how many
 * it interleaves. The scalar build (no AVX2) computes the same sums bit for bit. */
#define LIN_ROWS 8    /* weight rows per block (converted to fp32 in L1 where a path does) */
#define LIN_TOKENS 48 /* tokens per pass over a weight block (their fp32 copy stays in L2) */
#define LIN_DIRECT 3  /* tokens per register tile of the direct bf16 path */
/* bf16, up to this many tokens: weights converted in registers, groups of up to LIN_DIRECT
 * tokens meeting each group of four rows while it is in L1 (a speculative verification of
 * k + 1 tokens; converting the rows to an fp32 buffer first costs more up to here) */
#define LIN_DIRECT_TOKENS 16

static inline float tree8(const float* l) {
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

/* n values of dtype dt at src as fp32 in lane order: bf16 full 16-blocks permuted as
 * _mm256_unpack{lo,hi}_epi16 gives them, everything else in place. */
static void to_lanes(const void* src, int dt, float* dst, int64_t n) {
    if (dt == DT_F32) {
        memcpy(dst, src, (size_t)n * 4);
        return;
    }
    const uint16_t* s = (const uint16_t*)src;
    int64_t k = 0;
#if LLM_AVX2
    __m256i z = _mm256_setzero_si256();
    for (; k + 16 <= n; k += 16) {
        __m256i v = _mm256_loadu_si256((const __m256i*)(s + k));
        _mm256_storeu_ps(dst + k, _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v)));
        _mm256_storeu_ps(dst + k + 8, _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v)));
    }
#else
    for (; k + 16 <= n; k += 16)
        for (int i = 0; i < 8; i++) {
            int lo = i < 4 ? i : i + 4;
            dst[k + i] = bf2f(s[k + lo]);
            dst[k + 8 + i] = bf2f(s[k + lo + 4]);
        }
#endif
    for (; k < n; k++) dst[k] = bf2f(s[k]);
}

/* The sum of one weight row and one token, both fp32 in lane order, one product at a time:
 * the scalar build's kernel, and the AVX2 build's for the last N % 4 rows. */
static float dot_lanes(const float* w, const float* x, int64_t K) {
    float l[8] = {0};
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)
        for (int i = 0; i < 8; i++) l[i] = fmaf(w[k + i], x[k + i], l[i]);
    float s = tree8(l);
    for (; k < K; k++) s = fmaf(w[k], x[k], s);
    return s;
}

static inline void store_out(void* y, int64_t ldy, int dt, int64_t t, int64_t n, float v,
                             const float* bias) {
    if (bias) v += bias[n];
    if (dt == DT_BF16)
        ((uint16_t*)y)[t * ldy + n] = f2bf(v);
    else
        ((float*)y)[t * ldy + n] = v;
}

#if LLM_AVX2
/* The sums of four accumulators by the lane tree, one per lane of the result. */
static inline __m128 reduce4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

/* s[r] plus the products of k .. K-1 (fewer than 8, natural order) of row r (of four, fp32 or
 * bf16 per wdt, ldw apart) and token x, one by one. */
static __m128 tail4(__m128 s, const void* w, int wdt, int64_t ldw, const float* x, int64_t k,
                    int64_t K) {
    float v[4];
    _mm_storeu_ps(v, s);
    for (int r = 0; r < 4; r++)
        for (int64_t j = k; j < K; j++) {
            float wj = wdt == DT_BF16 ? bf2f(((const uint16_t*)w)[r * ldw + j])
                                      : ((const float*)w)[r * ldw + j];
            v[r] = fmaf(wj, x[j], v[r]);
        }
    return _mm_loadu_ps(v);
}

/* Four outputs of token t (rows n .. n+3): plus the bias, rounded to dt, stored. */
static inline void store4(void* y, int64_t ldy, int dt, int64_t t, int64_t n, __m128 v,
                          const float* bias) {
    if (bias) v = _mm_add_ps(v, _mm_loadu_ps(bias + n));
    if (dt == DT_BF16)
        _mm_storel_epi64((__m128i*)((uint16_t*)y + t * ldy + n),
                         f32x8_to_bf16(_mm256_zextps128_ps256(v)));
    else
        _mm_storeu_ps((float*)y + t * ldy + n, v);
}

/* R (4 or 8) weight rows, fp32 in lane order (ldw apart), x TT tokens (lane order, ldx apart):
 * one accumulator per output; out[g][t] holds rows 4g .. 4g+3 for token t, summed over the
 * first K - K % 8 products (the caller adds the rest with tail4). */
#define DEF_TILE(R, TT)                                                                          \
    static void tile_##R##x##TT(const float* w, int64_t ldw, const float* x, int64_t ldx,      \
                                int64_t K, __m128 out[2][LIN_DIRECT]) {                        \
        __m256 acc[R][TT];                                                                       \
        for (int r = 0; r < R; r++)                                                              \
            for (int t = 0; t < TT; t++) acc[r][t] = _mm256_setzero_ps();                        \
        int64_t k = 0;                                                                           \
        for (; k + 8 <= K; k += 8) { /* TT + 1 + R * TT registers: 16 for 4 x 3 */               \
            __m256 xv[TT];                                                                       \
            for (int t = 0; t < TT; t++) xv[t] = _mm256_loadu_ps(x + t * ldx + k);               \
            for (int r = 0; r < R; r++) {                                                        \
                __m256 wv = _mm256_loadu_ps(w + r * ldw + k);                                    \
                for (int t = 0; t < TT; t++) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);   \
            }                                                                                    \
        }                                                                                        \
        for (int g = 0; g < R / 4; g++)                                                          \
            for (int t = 0; t < TT; t++)                                                         \
                out[g][t] = reduce4(acc[4 * g][t], acc[4 * g + 1][t], acc[4 * g + 2][t],         \
                                    acc[4 * g + 3][t]);                                          \
    }
DEF_TILE(8, 1)
DEF_TILE(4, 1)
DEF_TILE(4, 2)
DEF_TILE(4, 3)

/* The same sums straight from R bf16 weight rows (K apart), each 32-byte load unpacked into
 * two fp32 vectors in registers: batch-1 decode and the smallest batches, where converting
 * the rows into a buffer first would cost more than the FMAs. R rows side by side give R * TT
 * independent chains (one row at a time left the loop waiting on FMA latency). */
#define DEF_BTILE(R, TT)                                                                         \
    static void btile_##R##x##TT(const uint16_t* w, const float* x, int64_t ldx, int64_t K,    \
                                 __m128 out[2][LIN_DIRECT]) {                                  \
        __m256 acc[R][TT];                                                                       \
        for (int r = 0; r < R; r++)                                                              \
            for (int t = 0; t < TT; t++) acc[r][t] = _mm256_setzero_ps();                        \
        const __m256i z = _mm256_setzero_si256();                                                \
        int64_t k = 0;                                                                           \
        for (; k + 16 <= K; k += 16)                                                             \
            for (int r = 0; r < R; r++) {                                                        \
                __m256i v = _mm256_loadu_si256((const __m256i*)(w + r * K + k));                 \
                __m256 lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v));                    \
                __m256 hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v));                    \
                for (int t = 0; t < TT; t++) {                                                   \
                    acc[r][t] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + t * ldx + k), acc[r][t]); \
                    acc[r][t] =                                                                  \
                        _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + t * ldx + k + 8), acc[r][t]);    \
                }                                                                                \
            }                                                                                    \
        if (k + 8 <= K) {                                                                        \
            for (int r = 0; r < R; r++) {                                                        \
                __m256 wv = load_bf16x8(w + r * K + k);                                          \
                for (int t = 0; t < TT; t++)                                                     \
                    acc[r][t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * ldx + k), acc[r][t]); \
            }                                                                                    \
            k += 8;                                                                              \
        }                                                                                        \
        for (int g = 0; g < R / 4; g++)                                                          \
            for (int t = 0; t < TT; t++)                                                         \
                out[g][t] = reduce4(acc[4 * g][t], acc[4 * g + 1][t], acc[4 * g + 2][t],         \
                                    acc[4 * g + 3][t]);                                          \
    }
DEF_BTILE(8, 1)
DEF_BTILE(4, 1)
DEF_BTILE(4, 2)
DEF_BTILE(4, 3)

typedef void (*tile_fn)(const float*, int64_t, const float*, int64_t, int64_t,
                        __m128[2][LIN_DIRECT]);
static const tile_fn TILES4[LIN_DIRECT] = {tile_4x1, tile_4x2, tile_4x3};
#endif

typedef struct {
    const float* xf; /* (T, K) fp32, lane order */
    const void* w;
    const float* bias; /* (N,) fp32 or NULL */
    void* y;
    int64_t T, K, N, ldy, rows; /* rows per chunk, a multiple of LIN_ROWS */
    int dt;
} linear_job;

/* Row n (fp32, lane order, at wl) for tokens t0 .. t1-1, one output at a time. */
static void linear_row(const linear_job* j, const float* wl, int64_t n, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++)
        store_out(j->y, j->ldy, j->dt, t, n, dot_lanes(wl, j->xf + t * j->K, j->K), j->bias);
}

static void linear_chunk(void* p, int64_t chunk) {
    const linear_job* j = (const linear_job*)p;
    int64_t K = j->K, T = j->T;
    int64_t n0 = chunk * j->rows, n1 = n0 + j->rows < j->N ? n0 + j->rows : j->N;
    size_t wes = esize(j->dt);
    float* wb = scratch(LIN_ROWS * K); /* a block of rows in lane order */
#if LLM_AVX2
    __m128 c[2][LIN_DIRECT];
    if (T == 1 || (j->dt == DT_BF16 && T <= LIN_DIRECT_TOKENS)) {
        /* weights straight from memory: eight rows side by side at batch 1, else four rows
         * with up to three tokens at a time (each output's sum is the same in every tile) */
        int64_t R = T == 1 ? 8 : 4, n = n0;
        for (; n + R <= n1; n += R) {
            const void* w = (const char*)j->w + n * K * wes;
            for (int64_t t0 = 0; t0 < T; t0 += LIN_DIRECT) {
                int64_t tt = T - t0 < LIN_DIRECT ? T - t0 : LIN_DIRECT;
                const float* xt = j->xf + t0 * K;
                if (j->dt == DT_BF16) {
                    if (T == 1) btile_8x1(w, xt, K, K, c);
                    else if (tt == 1) btile_4x1(w, xt, K, K, c);
                    else if (tt == 2) btile_4x2(w, xt, K, K, c);
                    else btile_4x3(w, xt, K, K, c);
                } else {
                    tile_8x1(w, K, xt, K, K, c);
                }
                for (int64_t g = 0; g < R / 4; g++)
                    for (int64_t u = 0; u < tt; u++) {
                        if (K & 7)
                            c[g][u] = tail4(c[g][u], (const char*)w + 4 * g * K * wes, j->dt, K,
                                            xt + u * K, K & ~7, K);
                        store4(j->y, j->ldy, j->dt, t0 + u, n + 4 * g, c[g][u], j->bias);
                    }
            }
        }
        for (; n < n1; n++) {
            to_lanes((const char*)j->w + n * K * wes, j->dt, wb, K);
            linear_row(j, wb, n, 0, T);
        }
        return;
    }
#endif
    for (int64_t tc = 0; tc < T; tc += LIN_TOKENS) {
        int64_t te = tc + LIN_TOKENS < T ? tc + LIN_TOKENS : T;
        for (int64_t n = n0; n < n1; n += LIN_ROWS) {
            int64_t block = n1 - n < LIN_ROWS ? n1 - n : LIN_ROWS;
            const float* wl = (const float*)j->w + n * K; /* fp32 rows are read in place */
            if (j->dt != DT_F32) {
                for (int64_t r = 0; r < block; r++)
                    to_lanes((const char*)j->w + (n + r) * K * wes, j->dt, wb + r * K, K);
                wl = wb;
            }
            int64_t r4 = 0;
#if LLM_AVX2
            /* four rows x three tokens: four weight and three token loads per 12 FMAs; the
             * block's rows stay in L1 while each group of tokens meets all of them */
            r4 = block / 4 * 4;
            for (int64_t t = tc; t < te;) {
                int64_t tt = te - t < LIN_DIRECT ? te - t : LIN_DIRECT;
                if (te - t == 4) tt = 2; /* 2 + 2, not 3 + 1 */
                for (int64_t r = 0; r < r4; r += 4) {
                    TILES4[tt - 1](wl + r * K, K, j->xf + t * K, K, K, c);
                    for (int64_t u = 0; u < tt; u++) {
                        if (K & 7)
                            c[0][u] = tail4(c[0][u], wl + r * K, DT_F32, K, j->xf + (t + u) * K,
                                            K & ~7, K);
                        store4(j->y, j->ldy, j->dt, t + u, n + r, c[0][u], j->bias);
                    }
                }
                t += tt;
            }
#endif
            for (int64_t r = r4; r < block; r++) linear_row(j, wl + r * K, n + r, tc, te);
        }
    }
}

void llm_linear(const void* x, int64_t ldx, int64_t T, int64_t K, const void* w, int64_t N,
                const void* bias, void* y, int64_t ldy, int32_t dt) {
    float* xf = (float*)malloc((size_t)(T * K + (bias ? N : 0)) * sizeof(float));
    for (int64_t t = 0; t < T; t++) to_lanes((const char*)x + t * ldx * esize(dt), dt, xf + t * K, K);
    float* bf = NULL;
    if (bias) {
        bf = xf + T * K;
        to_f32(bias, dt, bf, N);
    }
    int threads = (double)N * K * (T > 4 ? T : 1) < 65536.0 ? 1 : g_threads;
    /* About eight chunks per thread: a helper that starts late still takes a share. One thread
     * computes each output, so the split never changes a value. */
    int64_t rows = N / (8 * threads);
    rows = rows < LIN_ROWS ? LIN_ROWS : (rows / LIN_ROWS) * LIN_ROWS;
    linear_job job = {xf, w, bf, y, T, K, N, ldy, rows, dt};
    parallel_for(linear_chunk, &job, (N + rows - 1) / rows, threads);
    free(xf);
}

/* ------------------------------------------------------------------------------------------ */
/* rms_norm and gemma_rms_norm (optionally fused with the residual add)                       */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    const void *x, *res, *w;
    void *y, *s_out;
    int64_t ldx, ldr, ldy, lds, H, rows_per_chunk, T;
    float eps;
    int dt;
    int gemma; /* 1: y = s * inv * (1 + w), rounded once (Gemma); 0: round(s * inv) * w */
} rms_job;

static void rms_chunk(void* p, int64_t chunk) {
    const rms_job* j = (const rms_job*)p;
    int64_t H = j->H, t0 = chunk * j->rows_per_chunk;
    int64_t t1 = t0 + j->rows_per_chunk < j->T ? t0 + j->rows_per_chunk : j->T;
    size_t es = esize(j->dt);
    float* buf = scratch(3 * H);
    float *s = buf, *r = buf + H, *wf = buf + 2 * H;
    to_f32(j->w, j->dt, wf, H);
    if (j->gemma)
        for (int64_t i = 0; i < H; i++) wf[i] = 1.0f + wf[i];
    for (int64_t t = t0; t < t1; t++) {
        to_f32((const char*)j->x + t * j->ldx * es, j->dt, s, H);
        if (j->res) {
            to_f32((const char*)j->res + t * j->ldr * es, j->dt, r, H);
            for (int64_t i = 0; i < H; i++) s[i] = round_dt(s[i] + r[i], j->dt);
            from_f32(s, (char*)j->s_out + t * j->lds * es, j->dt, H);
        }
        float ss = dot_f32(s, s, H);
        float inv = 1.0f / sqrtf(ss / (float)H + j->eps);
        if (j->gemma)
            for (int64_t i = 0; i < H; i++) s[i] = s[i] * inv * wf[i];
        else
            for (int64_t i = 0; i < H; i++) s[i] = round_dt(s[i] * inv, j->dt) * wf[i];
        from_f32(s, (char*)j->y + t * j->ldy * es, j->dt, H);
    }
}

static void rms_norm(const void* x, int64_t ldx, const void* res, int64_t ldr, const void* w,
                     void* y, int64_t ldy, void* s_out, int64_t lds, int64_t T, int64_t H,
                     float eps, int32_t dt, int gemma) {
    int threads = T * H >= 262144 ? g_threads : 1;
    int64_t rows = T / (4 * threads) > 1 ? T / (4 * threads) : 1;
    rms_job job = {x, res, w, y, s_out, ldx, ldr, ldy, lds, H, rows, T, eps, dt, gemma};
    parallel_for(rms_chunk, &job, (T + rows - 1) / rows, threads);
}

/* y = round(s * rsqrt(mean(s^2) + eps)) * w, s = x or round(x + res) (then stored in s_out) */
void llm_rms_norm(const void* x, int64_t ldx, const void* res, int64_t ldr, const void* w,
                  void* y, int64_t ldy, void* s_out, int64_t lds, int64_t T, int64_t H,
                  float eps, int32_t dt) {
    rms_norm(x, ldx, res, ldr, w, y, ldy, s_out, lds, T, H, eps, dt, 0);
}

/* The Gemma convention: y = s * rsqrt(mean(s^2) + eps) * (1 + w) in fp32, rounded once. */
void llm_gemma_rms_norm(const void* x, int64_t ldx, const void* res, int64_t ldr, const void* w,
                        void* y, int64_t ldy, void* s_out, int64_t lds, int64_t T, int64_t H,
                        float eps, int32_t dt) {
    rms_norm(x, ldx, res, ldr, w, y, ldy, s_out, lds, T, H, eps, dt, 1);
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
    float scale, cap; /* cap: logits soft cap (cap * tanh(score / cap)), 0 for none */
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
    float* buf = scratch(QH * span + 2 * QH * D + D + QH + span + 10 * D);
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
                    else { /* one or two heads left: padded to three, so that a score is
                            * summed in the same order whichever tile its row falls in */
                        float* q3 = kb + 4 * D;
                        memset(q3, 0, (size_t)(3 * D) * sizeof(float));
                        memcpy(q3, qf + qh * D, (size_t)((QH - qh) * D) * sizeof(float));
                        dots_3x4(q3, kb, D, o);
                    }
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
    if (j->cap > 0.0f)
        for (int64_t r = 0; r < nr; r++)
            for (int64_t h = 0; h < G; h++) {
                float* s = sc + (r * G + h) * span + first[r] - lo;
                for (int64_t i = 0; i < lens[r] - first[r]; i++) s[i] = j->cap * tanhf(s[i] / j->cap);
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
 * per tile and used by every query head of its GQA group in every row of the tile. A row's
 * result never depends on the tile it falls in (each score and sum has one order), so it is
 * the same whatever the batch or the prefill chunk. cap > 0: logits soft-capped,
 * cap * tanh(score / cap), before the softmax. */
void llm_attention(const void* q, int64_t ldq, const void* kc, const void* vc, int64_t R,
                   int64_t Hq, int64_t Hkv, int64_t D, int64_t bs, const int32_t* tables,
                   int64_t ldt, const int32_t* row_seq, const int32_t* row_lens, float scale,
                   float cap, int64_t window, void* out, int64_t ldo, int32_t dt) {
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
                    window, ldo, max_len, scale, cap, dt};
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

/* Elementwise maps of rows: soft cap (a * tanh(x / a)) and scale (x * a), computed in fp32 and
 * rounded once. A work item is a run of at most MAP_COLS columns of one row, so a long row of
 * logits is shared by the threads too; each element is computed alone, whatever the split. */
#define MAP_COLS 16384
enum { MAP_SOFT_CAP = 0, MAP_SCALE = 1 };

typedef struct {
    const void* x;
    void* y;
    int64_t ldx, ldy, N, blocks;
    float a;
    int dt, op;
} map_job;

static void map_chunk(void* p, int64_t item) {
    const map_job* j = (const map_job*)p;
    int64_t t = item / j->blocks, c0 = (item % j->blocks) * MAP_COLS;
    int64_t n = j->N - c0 < MAP_COLS ? j->N - c0 : MAP_COLS;
    size_t es = esize(j->dt);
    float* buf = scratch(n);
    to_f32((const char*)j->x + (t * j->ldx + c0) * es, j->dt, buf, n);
    float a = j->a;
    if (j->op == MAP_SOFT_CAP)
        for (int64_t i = 0; i < n; i++) buf[i] = a * tanhf(buf[i] / a);
    else
        for (int64_t i = 0; i < n; i++) buf[i] *= a;
    from_f32(buf, (char*)j->y + (t * j->ldy + c0) * es, j->dt, n);
}

static void map_rows(const void* x, int64_t ldx, void* y, int64_t ldy, int64_t T, int64_t N,
                     float a, int32_t dt, int op) {
    if (T <= 0 || N <= 0) return;
    int64_t blocks = (N + MAP_COLS - 1) / MAP_COLS;
    int threads = T * N >= (op == MAP_SOFT_CAP ? 65536 : 262144) ? g_threads : 1;
    map_job job = {x, y, ldx, ldy, N, blocks, a, dt, op};
    parallel_for(map_chunk, &job, T * blocks, threads);
}

/* y (T, N) = cap * tanh(x / cap) */
void llm_soft_cap(const void* x, int64_t ldx, void* y, int64_t ldy, int64_t T, int64_t N,
                  float cap, int32_t dt) {
    map_rows(x, ldx, y, ldy, T, N, cap, dt, MAP_SOFT_CAP);
}

/* y (T, N) = x * factor; the caller rounds factor to dtype dt first (HAL contract) */
void llm_scale(const void* x, int64_t ldx, void* y, int64_t ldy, int64_t T, int64_t N,
               float factor, int32_t dt) {
    map_rows(x, ldx, y, ldy, T, N, factor, dt, MAP_SCALE);
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
/* greedy sampling: the argmax of each row                                                    */
/* ------------------------------------------------------------------------------------------ */

/* torch.argmax's answer: the first NaN if there is one, else the first maximum. */
static int64_t argmax_row(const float* x, int64_t V) {
    int64_t best = 0;
    float m = x[0];
    if (isnan(m)) return 0;
    for (int64_t t = 1; t < V; t++) {
        float v = x[t];
        if (v > m) {
            m = v;
            best = t;
        } else if (isnan(v)) {
            return t;
        }
    }
    return best;
}

typedef struct {
    const float* x;
    int64_t ldx, V, rows_per_chunk, B;
    int64_t* out;
} argmax_job;

static void argmax_chunk(void* p, int64_t chunk) {
    const argmax_job* j = (const argmax_job*)p;
    int64_t b0 = chunk * j->rows_per_chunk;
    int64_t b1 = b0 + j->rows_per_chunk < j->B ? b0 + j->rows_per_chunk : j->B;
    for (int64_t b = b0; b < b1; b++) j->out[b] = argmax_row(j->x + b * j->ldx, j->V);
}

/* fp32 logits (B, V), rows ldx apart: out[b] = argmax of row b (V >= 1). One thread per row:
 * torch's own argmax splits a few rows over OpenMP threads that, beside this library's pool
 * on a busy machine, took milliseconds for what is microseconds of work. */
void llm_argmax_rows(const float* logits, int64_t ldx, int64_t B, int64_t V, int64_t* out) {
    int threads = B * V >= 1048576 ? g_threads : 1;
    int64_t rows = B / threads > 1 ? B / threads : 1;
    argmax_job job = {logits, ldx, V, rows, B, out};
    parallel_for(argmax_chunk, &job, (B + rows - 1) / rows, threads);
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
    K_GEMMA_RMS_NORM,
    K_SOFT_CAP,
    K_SCALE,
    K_ARGMAX_ROWS,
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
                          (float)r->f[0], (float)r->f[1], i[7], p[6], i[8], (int32_t)i[9]);
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
        case K_GEMMA_RMS_NORM:
            llm_gemma_rms_norm(p[0], i[0], p[1], i[1], p[2], p[3], i[2], p[4], i[3], i[4], i[5],
                               (float)r->f[0], (int32_t)i[6]);
            break;
        case K_SOFT_CAP:
            llm_soft_cap(p[0], i[0], p[1], i[1], i[2], i[3], (float)r->f[0], (int32_t)i[4]);
            break;
        case K_SCALE:
            llm_scale(p[0], i[0], p[1], i[1], i[2], i[3], (float)r->f[0], (int32_t)i[4]);
            break;
        case K_ARGMAX_ROWS:
            llm_argmax_rows((const float*)p[0], i[0], i[1], i[2], (int64_t*)p[1]);
            break;
        default:
            return -(j + 1); /* unknown kind: the caller reports which record */
        }
    }
    return n;
}
