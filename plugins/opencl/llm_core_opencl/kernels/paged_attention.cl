/* Paged attention over the KV cache written by reshape_and_cache (see rotary_cache.cl for
 * its layout). Built with -DWG (work-group size, a power of two) and -DMAX_HEAD (the largest
 * head size the program serves).
 */

/* The max of v over the work-group (group_sum, its sum, is in common.h). */
DEFINE_GROUP_REDUCE(group_max, float, fmax)

#define DIMS_PER_ITEM ((MAX_HEAD + WG - 1) / WG)

/* One work-group per (query token, query head): online softmax over the token's visible keys,
 * WG keys at a time. token_seq/token_pos give each query token's sequence and position.
 * window 0 = no sliding window; soft_cap 0 = no soft cap. Global (WG * Hq, T), local (WG, 1).
 */
kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void paged_attention(global const T* query, global const T* key_cache,
                     global const T* value_cache, global const int* token_seq,
                     global const int* token_pos, global const int* block_tables,
                     int max_blocks, int block_size, int hq, int hkv, int head_size, float scale,
                     int window, float soft_cap, global T* out) {
    local float q[MAX_HEAD];
    local float probs[WG];
    local float scratch[WG];
    size_t lid = get_local_id(0);
    int h = get_group_id(0);
    size_t t = get_group_id(1);
    int seq = token_seq[t], pos = token_pos[t];
    int kvh = h / (hq / hkv);
    size_t q_row = (t * hq + h) * head_size;
    for (int d = lid; d < head_size; d += WG) q[d] = LOAD(query, q_row + d);
    barrier(CLK_LOCAL_MEM_FENCE);

    global const int* table = block_tables + (size_t)seq * max_blocks;
    int first = window > 0 ? max(0, pos - window + 1) : 0;
    int end = pos + 1;
    float m = -INFINITY, l = 0.0f;
    float acc[DIMS_PER_ITEM];
    for (int k = 0; k < DIMS_PER_ITEM; ++k) acc[k] = 0.0f;

    for (int j0 = first; j0 < end; j0 += WG) {
        int j = j0 + lid;
        float s = -INFINITY;
        if (j < end) {
            size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
            size_t base = (slot * hkv + kvh) * head_size;
            float dot = 0.0f;
            for (int d = 0; d < head_size; ++d) dot += q[d] * LOAD(key_cache, base + d);
            s = dot * scale;
            if (soft_cap > 0.0f) s = soft_cap * tanh(s / soft_cap);
        }
        float m_new = fmax(m, group_max(s, scratch));
        float p = j < end ? exp(s - m_new) : 0.0f;
        float correction = exp(m - m_new); /* 0 on the first chunk, where m = -inf */
        l = l * correction + group_sum(p, scratch);
        probs[lid] = p;
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int k = 0; k < DIMS_PER_ITEM; ++k) acc[k] *= correction;
        int n = min(WG, end - j0);
        for (int jj = 0; jj < n; ++jj) {
            int jp = j0 + jj;
            size_t slot = (size_t)table[jp / block_size] * block_size + jp % block_size;
            size_t base = (slot * hkv + kvh) * head_size;
            float pj = probs[jj];
            for (int k = 0; k < DIMS_PER_ITEM; ++k) {
                int d = lid + k * WG;
                if (d < head_size) acc[k] += pj * LOAD(value_cache, base + d);
            }
        }
        m = m_new;
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    for (int k = 0; k < DIMS_PER_ITEM; ++k) {
        int d = lid + k * WG;
        if (d < head_size) STORE(out, q_row + d, acc[k] / l);
    }
}
