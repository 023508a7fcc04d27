/* Native kernels of the llm-core CPU backend.
 *
 * Built at run time by llm_core_cpu/native.py (gcc -O3 -march=native -fopenmp) and called
 * through ctypes with raw pointers. Activations are fp32 or bf16 (dtype code 0 or 1); every
 * kernel computes in fp32 and rounds to bf16 (round to nearest even) where the HAL contract says
 * a value is rounded. Rows may be strided (the last dimension is contiguous): strides are in
 * elements.
 *
 * The OpenMP runtime is the one torch has loaded (libgomp.so.1 is shared by soname), so these
 * kernels and torch's own parallel regions use one thread pool.
 *
 * llm_run() replays a recorded list of kernel calls (a captured decode step) with no Python in
 * between: see struct llm_record.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LLM_AVX2 1
#else
#define LLM_AVX2 0
#endif

enum { DT_F32 = 0, DT_BF16 = 1 };

static int g_threads = 1;

void llm_set_threads(int32_t n) { g_threads = n > 0 ? n : 1; }

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
/* linear: y (T, N) = x (T, K) @ w (N, K)^T + bias                                             */
/* ------------------------------------------------------------------------------------------ */

/* One token, up to 4 weight rows read straight from memory (the batch-1 decode case: the
 * weights stream once from DRAM, converted to fp32 in registers). */
static void dot_rows_1tok(const float* x, const void* w, int64_t ldw, int dt, int64_t K,
                          int rows, float* out) {
    for (int r = 0; r < rows; r++) out[r] = 0.0f;
    int64_t k = 0;
#if LLM_AVX2
    if (rows == 4) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        if (dt == DT_BF16) {
            const uint16_t* w0 = (const uint16_t*)w;
            const uint16_t *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
            for (; k + 8 <= K; k += 8) {
                __m256 xv = _mm256_loadu_ps(x + k);
                a0 = _mm256_fmadd_ps(load_bf16x8(w0 + k), xv, a0);
                a1 = _mm256_fmadd_ps(load_bf16x8(w1 + k), xv, a1);
                a2 = _mm256_fmadd_ps(load_bf16x8(w2 + k), xv, a2);
                a3 = _mm256_fmadd_ps(load_bf16x8(w3 + k), xv, a3);
            }
        } else {
            const float* w0 = (const float*)w;
            const float *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
            for (; k + 8 <= K; k += 8) {
                __m256 xv = _mm256_loadu_ps(x + k);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), xv, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), xv, a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), xv, a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), xv, a3);
            }
        }
        out[0] = hsum8(a0);
        out[1] = hsum8(a1);
        out[2] = hsum8(a2);
        out[3] = hsum8(a3);
    }
#endif
    int64_t k0 = k;
    for (int r = 0; r < rows; r++) {
        float s = 0.0f;
        if (dt == DT_BF16) {
            const uint16_t* wr = (const uint16_t*)w + r * ldw;
            for (k = k0; k < K; k++) s += bf2f(wr[k]) * x[k];
        } else {
            const float* wr = (const float*)w + r * ldw;
            for (k = k0; k < K; k++) s += wr[k] * x[k];
        }
        out[r] += s;
    }
}

/* 2 fp32 weight rows x 4 tokens, the register tile of the batched case. */
static void tile_2x4(const float* w, int64_t K, const float* x, int64_t K_x, float out[2][4]) {
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

#define LIN_ROWS 8   /* weight rows converted per block (kept in L1/L2) */
#define LIN_TOKENS 64 /* tokens per pass over a weight block (their fp32 copy stays in L2) */

void llm_linear(const void* x, int64_t ldx, int64_t T, int64_t K, const void* w, int64_t N,
                const void* bias, void* y, int64_t ldy, int32_t dt) {
    float* xf = (float*)malloc((size_t)(T * K + N) * sizeof(float));
    for (int64_t t = 0; t < T; t++) to_f32((const char*)x + t * ldx * esize(dt), dt, xf + t * K, K);
    float* bf = NULL;
    if (bias) {
        bf = xf + T * K;
        to_f32(bias, dt, bf, N);
    }
    int nth = g_threads;
    if ((double)N * K * (T > 4 ? T : 1) < 65536.0) nth = 1; /* not worth a fork */
#pragma omp parallel num_threads(nth)
    {
        int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t per = ((N + nt - 1) / nt + 3) & ~(int64_t)3;
        int64_t n0 = tid * per, n1 = n0 + per < N ? n0 + per : N;
        if (T == 1) {
            float acc[4];
            for (int64_t n = n0; n < n1; n += 4) {
                int rows = n1 - n < 4 ? (int)(n1 - n) : 4;
                dot_rows_1tok(xf, (const char*)w + n * K * esize(dt), K, dt, K, rows, acc);
                for (int r = 0; r < rows; r++) store_out(y, ldy, dt, 0, n + r, acc[r], bf);
            }
        } else {
            float* wb = (float*)malloc((size_t)LIN_ROWS * K * sizeof(float));
            for (int64_t tc = 0; tc < T; tc += LIN_TOKENS) {
                int64_t tn = T - tc < LIN_TOKENS ? T - tc : LIN_TOKENS;
                const float* xc = xf + tc * K;
                for (int64_t n = n0; n < n1; n += LIN_ROWS) {
                    int64_t rows = n1 - n < LIN_ROWS ? n1 - n : LIN_ROWS;
                    to_f32((const char*)w + n * K * esize(dt), dt, wb, rows * K);
                    int64_t r = 0;
                    for (; r + 2 <= rows; r += 2) {
                        int64_t t = 0;
                        float acc[2][4];
                        for (; t + 4 <= tn; t += 4) {
                            tile_2x4(wb + r * K, K, xc + t * K, K, acc);
                            for (int i = 0; i < 2; i++)
                                for (int j = 0; j < 4; j++)
                                    store_out(y, ldy, dt, tc + t + j, n + r + i, acc[i][j], bf);
                        }
                        for (; t < tn; t++)
                            for (int i = 0; i < 2; i++)
                                store_out(y, ldy, dt, tc + t, n + r + i,
                                          dot_f32(wb + (r + i) * K, xc + t * K, K), bf);
                    }
                    for (; r < rows; r++)
                        for (int64_t t = 0; t < tn; t++)
                            store_out(y, ldy, dt, tc + t, n + r, dot_f32(wb + r * K, xc + t * K, K), bf);
                }
            }
            free(wb);
        }
    }
    free(xf);
}

/* ------------------------------------------------------------------------------------------ */
/* rms_norm (optionally fused with the residual add)                                          */
/* ------------------------------------------------------------------------------------------ */

void llm_rms_norm(const void* x, int64_t ldx, const void* res, int64_t ldr, const void* w,
                  void* y, int64_t ldy, void* s_out, int64_t lds, int64_t T, int64_t H,
                  float eps, int32_t dt) {
    size_t es = esize(dt);
    int nth = T * H >= 262144 ? g_threads : 1;
#pragma omp parallel num_threads(nth)
    {
        float* buf = (float*)malloc((size_t)(3 * H) * sizeof(float));
        float *s = buf, *r = buf + H, *wf = buf + 2 * H;
        to_f32(w, dt, wf, H);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            to_f32((const char*)x + t * ldx * es, dt, s, H);
            if (res) {
                to_f32((const char*)res + t * ldr * es, dt, r, H);
                for (int64_t i = 0; i < H; i++) s[i] = round_dt(s[i] + r[i], dt);
                from_f32(s, (char*)s_out + t * lds * es, dt, H);
            }
            float ss = dot_f32(s, s, H);
            float inv = 1.0f / sqrtf(ss / (float)H + eps);
            for (int64_t i = 0; i < H; i++) s[i] = round_dt(s[i] * inv, dt) * wf[i];
            from_f32(s, (char*)y + t * ldy * es, dt, H);
        }
        free(buf);
    }
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

void llm_rotary(const int64_t* pos, void* q, int64_t ldq, int64_t hq, void* k, int64_t ldk,
                int64_t hk, const float* cos_sin, int64_t R, int64_t D, int32_t neox, int64_t T,
                int32_t dt) {
    int nth = T >= 64 ? g_threads : 1;
#pragma omp parallel num_threads(nth)
    {
        float* buf = (float*)malloc((size_t)R * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            const float* cs = cos_sin + pos[t] * R;
            rotate_heads(q, ldq, t, hq, D, cs, R, neox, dt, buf);
            rotate_heads(k, ldk, t, hk, D, cs, R, neox, dt, buf);
        }
        free(buf);
    }
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
    for (int64_t i = 0; i < n; i++) m = s[i] > m ? s[i] : m;
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

/* Query rows q[b] (Hq heads of D), keys and values of sequence b at positions
 * [start, seq_lens[b]) read through its block table; output rows out[b]. */
void llm_attn_decode(const void* q, int64_t ldq, const void* kc, const void* vc, int64_t B,
                     int64_t Hq, int64_t Hkv, int64_t D, int64_t bs, const int32_t* tables,
                     int64_t ldt, const int32_t* seq_lens, float scale, int64_t window,
                     void* out, int64_t ldo, int32_t dt) {
    size_t es = esize(dt);
    int64_t group = Hq / Hkv, max_len = 1, work = 0;
    for (int64_t b = 0; b < B; b++) {
        max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
        work += seq_lens[b];
    }
    /* A fork/join costs microseconds on an idle machine, a time slice on a busy one. */
    int nth = work * Hq * D >= 65536 ? g_threads : 1;
#pragma omp parallel num_threads(nth)
    {
        float* buf = (float*)malloc((size_t)(max_len + 4 * D) * sizeof(float));
        float *sc = buf, *qf = buf + max_len, *kf = qf + D, *acc = kf + D;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < B * Hq; item++) {
            int64_t b = item / Hq, h = item % Hq, g = h / group;
            int64_t L = seq_lens[b];
            int64_t start = window > 0 && L > window ? L - window : 0;
            const int32_t* table = tables + b * ldt;
            to_f32((const char*)q + (b * ldq + h * D) * es, dt, qf, D);
            for (int64_t p = start; p < L; p++) {
                int64_t slot = (int64_t)table[p / bs] * bs + p % bs;
                to_f32((const char*)kc + ((slot * Hkv + g) * D) * es, dt, kf, D);
                sc[p - start] = dot_f32(qf, kf, D) * scale;
            }
            float sum;
            softmax_inplace(sc, L - start, &sum);
            memset(acc, 0, (size_t)D * sizeof(float));
            for (int64_t p = start; p < L; p++) {
                int64_t slot = (int64_t)table[p / bs] * bs + p % bs;
                to_f32((const char*)vc + ((slot * Hkv + g) * D) * es, dt, kf, D);
                axpy_f32(sc[p - start], kf, acc, D);
            }
            float inv = 1.0f / sum;
            for (int64_t i = 0; i < D; i++) acc[i] *= inv;
            from_f32(acc, (char*)out + (b * ldo + h * D) * es, dt, D);
        }
        free(buf);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* activations, gathers, conversion                                                           */
/* ------------------------------------------------------------------------------------------ */

/* y (T, I) = silu(x[:, :I]) * x[:, I:2I] */
void llm_silu_mul(const void* x, int64_t ldx, void* y, int64_t ldy, int64_t T, int64_t I,
                  int32_t dt) {
    size_t es = esize(dt);
    int nth = T * I >= 262144 ? g_threads : 1;
#pragma omp parallel num_threads(nth)
    {
        float* buf = (float*)malloc((size_t)(2 * I) * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            to_f32((const char*)x + t * ldx * es, dt, buf, 2 * I);
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
            from_f32(g, (char*)y + t * ldy * es, dt, I);
        }
        free(buf);
    }
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
    K_ATTN_DECODE,
    K_SILU_MUL,
    K_EMBEDDING,
    K_GATHER_ROWS,
    K_CONVERT,
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
        case K_ATTN_DECODE:
            llm_attn_decode(p[0], i[0], p[1], p[2], i[1], i[2], i[3], i[4], i[5],
                            (const int32_t*)p[3], i[6], (const int32_t*)p[4], (float)r->f[0],
                            i[7], p[5], i[8], (int32_t)i[9]);
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
        default:
            return -(j + 1); /* unknown kind: the caller reports which record */
        }
    }
    return n;
}
