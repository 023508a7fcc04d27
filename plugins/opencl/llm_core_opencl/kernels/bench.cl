/* Ceilings of a device as OpenCL C reaches them, for the GEMM benchmark (bench.py). */

/* 8 independent float8 multiply-add chains per work-item: 128 flops per iteration. Written
 * a * b + c and built with -cl-mad-enable, like the GEMM (fma() is slow on PoCL). */
kernel __attribute__((vec_type_hint(float8)))
void fma_peak(global float* out, int iterations) {
    float8 a0 = (float8)(get_global_id(0) * 1e-9f), a1 = a0 + 1.0f, a2 = a0 + 2.0f,
           a3 = a0 + 3.0f, a4 = a0 + 4.0f, a5 = a0 + 5.0f, a6 = a0 + 6.0f, a7 = a0 + 7.0f;
    const float8 m = (float8)(0.999999f), c = (float8)(1e-7f);
    for (int i = 0; i < iterations; ++i) {
        a0 = a0 * m + c; a1 = a1 * m + c; a2 = a2 * m + c; a3 = a3 * m + c;
        a4 = a4 * m + c; a5 = a5 * m + c; a6 = a6 * m + c; a7 = a7 * m + c;
    }
    float8 s = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7));
    out[get_global_id(0)] = s.s0 + s.s1 + s.s2 + s.s3 + s.s4 + s.s5 + s.s6 + s.s7;
}

/* Each work-item sums a contiguous chunk of `per_item` float8s: read bandwidth. */
kernel void read_sum(global const float8* x, int per_item, global float* out) {
    size_t base = get_global_id(0) * (size_t)per_item;
    float8 s = (float8)(0.0f);
    for (int i = 0; i < per_item; ++i) s += x[base + i];
    out[get_global_id(0)] = s.s0 + s.s1 + s.s2 + s.s3 + s.s4 + s.s5 + s.s6 + s.s7;
}
