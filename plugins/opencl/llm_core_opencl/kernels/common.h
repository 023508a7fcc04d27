/* Storage types and helpers shared by every program of the OpenCL backend.
 *
 * Every kernel computes in float. Tensors are stored as float (STORAGE 0), IEEE half (1) or
 * bfloat16 (2, the upper 16 bits of a float, kept in a ushort); a program is built once per
 * storage type with -DSTORAGE=n, and T, LOAD, STORE and ROUND follow it. Half is read with
 * vload_half/vstore_half, which need no cl_khr_fp16: devices without it (PoCL on the CPU) store
 * half but never compute in it. Conversions round to nearest even.
 */

#ifndef STORAGE
#define STORAGE 0
#endif

inline float bf16_to_float(ushort v) { return as_float(((uint)v) << 16); }

inline ushort float_to_bf16(float f) {
    uint u = as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (ushort)((u >> 16) | 0x40u); /* NaN stays a (quiet) NaN */
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (ushort)(u >> 16);
}

inline float round_half(float v) {
    ushort bits; /* no half variables without cl_khr_fp16: store through a pointer */
    vstore_half_rte(v, 0, (private half*)&bits);
    return vload_half(0, (private const half*)&bits);
}

/* RAW_n: an integer type of the same size, for bit-exact copies (half cannot be assigned
 * without cl_khr_fp16). */
#define RAW_0 uint
#define RAW_1 ushort
#define RAW_2 ushort

#define TYPE_0 float
#define LOAD_0(p, i) ((p)[i])
#define STORE_0(p, i, v) ((p)[i] = (v))
#define ROUND_0(v) (v)

#define TYPE_1 half
#define LOAD_1(p, i) vload_half((i), (p))
#define STORE_1(p, i, v) vstore_half_rte((v), (i), (p))
#define ROUND_1(v) round_half(v)

#define TYPE_2 ushort
#define LOAD_2(p, i) bf16_to_float((p)[i])
#define STORE_2(p, i, v) ((p)[i] = float_to_bf16(v))
#define ROUND_2(v) bf16_to_float(float_to_bf16(v))

/* Four consecutive elements p[4i .. 4i+3] as a float4. */
#define LOAD4_0(p, i) vload4((i), (p))
#define LOAD4_1(p, i) vload_half4((i), (p))
#define LOAD4_2(p, i) as_float4(convert_uint4(vload4((i), (p))) << 16)

/* Eight consecutive elements p[8i .. 8i+7] as a float8. */
#define LOAD8_0(p, i) vload8((i), (p))
#define LOAD8_1(p, i) vload_half8((i), (p))
#define LOAD8_2(p, i) as_float8(convert_uint8(vload8((i), (p))) << 16)

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

/* The program's storage type T: LOAD(p, i) -> float, STORE(p, i, float), ROUND(float) rounds
 * a float to T's precision and back. */
#define T CAT(TYPE_, STORAGE)
#define RAW CAT(RAW_, STORAGE)
#define LOAD(p, i) CAT(LOAD_, STORAGE)(p, i)
#define LOAD4(p, i) CAT(LOAD4_, STORAGE)(p, i)
#define LOAD8(p, i) CAT(LOAD8_, STORAGE)(p, i)
#define STORE(p, i, v) CAT(STORE_, STORAGE)(p, i, v)
#define ROUND(v) CAT(ROUND_, STORAGE)(v)

#ifdef WG
/* Work-group reductions, in programs built with -DWG=n (the work-group size, a power of two).
 * DEFINE_GROUP_REDUCE(name, type, combine) defines type name(type v, local type* scratch): v
 * combined over the work-group by a tree of combine(a, b) calls; every work-item gets it.
 * scratch: WG elements of type, free for reuse once the call returns. */
#define DEFINE_GROUP_REDUCE(name, type, combine)                                               \
    inline type name(type v, local type* scratch) {                                            \
        size_t lid = get_local_id(0);                                                          \
        scratch[lid] = v;                                                                      \
        barrier(CLK_LOCAL_MEM_FENCE);                                                          \
        for (size_t s = WG / 2; s > 0; s >>= 1) {                                              \
            if (lid < s) scratch[lid] = combine(scratch[lid], scratch[lid + s]);               \
            barrier(CLK_LOCAL_MEM_FENCE);                                                      \
        }                                                                                      \
        type r = scratch[0];                                                                   \
        barrier(CLK_LOCAL_MEM_FENCE);                                                          \
        return r;                                                                              \
    }

#define GROUP_ADD(a, b) ((a) + (b))
DEFINE_GROUP_REDUCE(group_sum, float, GROUP_ADD)
DEFINE_GROUP_REDUCE(group_count, uint, GROUP_ADD)
#endif
