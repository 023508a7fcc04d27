/* Gathers, copies and elementwise operators. Row-major tensors, offset 0, contiguous. */

/* out[t, :] = table[ids[t], :], bit-exact. Global (H, T). */
kernel void embedding_i64(global const RAW* table, global const long* ids, global RAW* out,
                          int hidden) {
    size_t h = get_global_id(0), t = get_global_id(1);
    out[t * hidden + h] = table[ids[t] * hidden + h];
}

kernel void embedding_i32(global const RAW* table, global const int* ids, global RAW* out,
                          int hidden) {
    size_t h = get_global_id(0), t = get_global_id(1);
    out[t * hidden + h] = table[(long)ids[t] * hidden + h];
}

/* out[b, :] = x[indices[b], :], bit-exact. Global (H, B). */
kernel void gather_rows(global const RAW* x, global const long* indices, global RAW* out,
                        int hidden) {
    size_t h = get_global_id(0), b = get_global_id(1);
    out[b * hidden + h] = x[indices[b] * hidden + h];
}

/* dst[r, c] = src[r, col0 + c]: one part of split(). Global (width, rows). */
kernel void copy_columns(global const RAW* src, int src_width, int col0, global RAW* dst,
                         int width) {
    size_t c = get_global_id(0), r = get_global_id(1);
    dst[r * width + c] = src[r * src_width + col0 + c];
}

/* Global (n). */
kernel void add(global const T* a, global const T* b, global T* out) {
    size_t i = get_global_id(0);
    STORE(out, i, LOAD(a, i) + LOAD(b, i));
}

/* out = x * factor; the host rounds factor to T first (the HAL contract). Global (n). */
kernel void scale(global const T* x, global T* out, float factor) {
    size_t i = get_global_id(0);
    STORE(out, i, LOAD(x, i) * factor);
}

/* out = cap * tanh(x / cap), cap > 0; +-inf gives +-cap. Past |t| = 10, tanh(t) is +-1 in float
 * (1 - tanh(t) < 2^-28): saturate exactly there, which some libraries' tanh (PoCL's: 1 - 2^-24
 * even at inf) does not. NaN fails the comparison and stays NaN. Global (n). */
kernel void soft_cap(global const T* x, global T* out, float cap) {
    size_t i = get_global_id(0);
    float t = LOAD(x, i) / cap;
    STORE(out, i, cap * (fabs(t) >= 10.0f ? copysign(1.0f, t) : tanh(t)));
}

inline float gelu_f(float g, int approximate_tanh) {
    if (approximate_tanh) {
        const float k = 0.7978845608028654f; /* sqrt(2 / pi) */
        return 0.5f * g * (1.0f + tanh(k * (g + 0.044715f * g * g * g)));
    }
    return 0.5f * g * (1.0f + erf(g * 0.7071067811865476f));
}

/* x: (T, 2I) = [gate | up]; out: (T, I). Global (I, T). */
kernel void silu_and_mul(global const T* x, global T* out, int inter) {
    size_t i = get_global_id(0), t = get_global_id(1);
    float g = LOAD(x, t * 2 * inter + i);
    float u = LOAD(x, t * 2 * inter + inter + i);
    STORE(out, t * inter + i, g / (1.0f + exp(-g)) * u);
}

kernel void gelu_and_mul(global const T* x, global T* out, int inter, int approximate_tanh) {
    size_t i = get_global_id(0), t = get_global_id(1);
    float g = LOAD(x, t * 2 * inter + i);
    float u = LOAD(x, t * 2 * inter + inter + i);
    STORE(out, t * inter + i, gelu_f(g, approximate_tanh) * u);
}

/* Global (n). */
kernel void gelu(global const T* x, global T* out, int approximate_tanh) {
    size_t i = get_global_id(0);
    STORE(out, i, gelu_f(LOAD(x, i), approximate_tanh));
}
