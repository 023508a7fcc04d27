/* y = x @ W.T + bias for x (M, K) and W (N, K), both row-major with K contiguous.
 *
 * Two flavours. For CPU devices (PoCL), where work-items are loop iterations and local memory
 * is ordinary cache, blocked_gemm has no local memory and no barrier: each work-item computes
 * an RM x RN block of y as float8 dot products along K, which compiles to SIMD FMAs over
 * contiguous rows. For GPUs, the classic tiled kernels below:
 *
 * Products are written a * b + c, not fma(): PoCL computes fma() in software (about 10x
 * slower); the program is built with -cl-mad-enable so the compiler may fuse them.
 *
 * gemm: a TM x TN tile of y per work-group, K in slices of TK staged in local memory; each
 * work-item owns a WM x WN block of the tile, strided by the work-group's extent so that
 * neighbouring work-items touch neighbouring addresses. Global (ceil(N/TN) * TN/WN,
 * ceil(M/TM) * TM/WM), local (TN/WN, TM/WM).
 *
 * gemv: the decode shape (M <= GEMV_MAX_M): one work-group per output feature, its work-items
 * splitting K in float4 steps and reducing in local memory; W is read once for all M rows.
 * Global (GWG * N), local (GWG).
 */

#define RX (TN / WN)
#define RY (TM / WM)
#define THREADS (RX * RY)

kernel __attribute__((reqd_work_group_size(RX, RY, 1)))
void gemm(global const T* x, global const T* w, global const T* bias, int has_bias,
          global T* y, int M, int N, int K) {
    local float xs[TK][TM];
    local float ws[TK][TN + 1];
    int lx = get_local_id(0), ly = get_local_id(1);
    int li = ly * RX + lx;
    int n0 = get_group_id(0) * TN, m0 = get_group_id(1) * TM;
    float acc[WM][WN];
    for (int i = 0; i < WM; ++i)
        for (int j = 0; j < WN; ++j) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += TK) {
        for (int e = li; e < TM * TK; e += THREADS) {
            int r = e / TK, kk = e % TK;
            int m = m0 + r, k = k0 + kk;
            xs[kk][r] = (m < M && k < K) ? LOAD(x, (size_t)m * K + k) : 0.0f;
        }
        for (int e = li; e < TN * TK; e += THREADS) {
            int r = e / TK, kk = e % TK;
            int n = n0 + r, k = k0 + kk;
            ws[kk][r] = (n < N && k < K) ? LOAD(w, (size_t)n * K + k) : 0.0f;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int kk = 0; kk < TK; ++kk) {
            float a[WM], b[WN];
            for (int i = 0; i < WM; ++i) a[i] = xs[kk][ly + i * RY];
            for (int j = 0; j < WN; ++j) b[j] = ws[kk][lx + j * RX];
            for (int i = 0; i < WM; ++i)
                for (int j = 0; j < WN; ++j) acc[i][j] += a[i] * b[j];
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    for (int i = 0; i < WM; ++i) {
        int m = m0 + ly + i * RY;
        if (m >= M) continue;
        for (int j = 0; j < WN; ++j) {
            int n = n0 + lx + j * RX;
            if (n < N) STORE(y, (size_t)m * N + n, acc[i][j] + (has_bias ? LOAD(bias, n) : 0.0f));
        }
    }
}

kernel __attribute__((reqd_work_group_size(GWG, 1, 1)))
void gemv(global const T* x, global const T* w, global const T* bias, int has_bias,
          global T* y, int M, int N, int K) {
    local float scratch[GEMV_MAX_M][GWG];
    int lid = get_local_id(0);
    int n = get_group_id(0);
    global const T* row = w + (size_t)n * K;
    float acc[GEMV_MAX_M];
    for (int m = 0; m < GEMV_MAX_M; ++m) acc[m] = 0.0f;
    int k4 = K / 4;
    if ((K & 3) == 0) {
        for (int i = lid; i < k4; i += GWG) {
            float4 wv = LOAD4(row, i);
            for (int m = 0; m < M; ++m) acc[m] += dot(LOAD4(x + (size_t)m * K, i), wv);
        }
    } else {
        for (int k = lid; k < K; k += GWG) {
            float wv = LOAD(row, k);
            for (int m = 0; m < M; ++m) acc[m] += LOAD(x, (size_t)m * K + k) * wv;
        }
    }
    for (int m = 0; m < GEMV_MAX_M; ++m) scratch[m][lid] = acc[m];
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = GWG / 2; s > 0; s >>= 1) {
        if (lid < s)
            for (int m = 0; m < GEMV_MAX_M; ++m) scratch[m][lid] += scratch[m][lid + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid < M) {
        float v = scratch[lid][0] + (has_bias ? LOAD(bias, n) : 0.0f);
        STORE(y, (size_t)lid * N + n, v);
    }
}

/* CPU flavour. Global (ceil(N / RN), ceil(M / RM)); rows past M or N are clamped on load and
 * skipped on store. */
kernel __attribute__((vec_type_hint(float8)))
void blocked_gemm(global const T* x, global const T* w, global const T* bias,
                         int has_bias, global T* y, int M, int N, int K) {
    int n0 = get_global_id(0) * RN, m0 = get_global_id(1) * RM;
    global const T* xr[RM];
    global const T* wr[RN];
    for (int r = 0; r < RM; ++r) xr[r] = x + (size_t)min(m0 + r, M - 1) * K;
    for (int c = 0; c < RN; ++c) wr[c] = w + (size_t)min(n0 + c, N - 1) * K;
    float8 acc[RM][RN];
    for (int r = 0; r < RM; ++r)
        for (int c = 0; c < RN; ++c) acc[r][c] = (float8)(0.0f);
    int k8 = K / 8;
    for (int i = 0; i < k8; ++i) {
        float8 xv[RM];
        for (int r = 0; r < RM; ++r) xv[r] = LOAD8(xr[r], i);
        for (int c = 0; c < RN; ++c) {
            float8 wv = LOAD8(wr[c], i);
            for (int r = 0; r < RM; ++r) acc[r][c] += xv[r] * wv;
        }
    }
    for (int r = 0; r < RM; ++r) {
        if (m0 + r >= M) break;
        for (int c = 0; c < RN; ++c) {
            if (n0 + c >= N) break;
            float8 a = acc[r][c];
            float4 h = a.lo + a.hi;
            float s = (h.x + h.y) + (h.z + h.w);
            for (int k = k8 * 8; k < K; ++k) s += LOAD(xr[r], k) * LOAD(wr[c], k);
            if (has_bias) s += LOAD(bias, n0 + c);
            STORE(y, (size_t)(m0 + r) * N + n0 + c, s);
        }
    }
}
