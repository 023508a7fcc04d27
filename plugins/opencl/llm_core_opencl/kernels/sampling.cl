/* Logits processing, sampling and log-probabilities on fp32 logits (B, V).
 * The row kernels run one work-group of WG work-items (a power of two) per row; group_sum and
 * group_count, the work-group reductions, are in common.h.
 */

/* (value, index) pairs ordered by value descending, then index ascending. */
inline int before(float v, int i, float best_v, int best_i) {
    return v > best_v || (v == best_v && i < best_i);
}

/* The first (value, index) in that order over the group: the index is returned, the value
 * stored in *value. Work-items holding nothing pass index INT_MAX. */
inline int group_argmax(float v, int i, local float* sv, local int* si, float* value) {
    size_t lid = get_local_id(0);
    sv[lid] = v;
    si[lid] = i;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (size_t s = WG / 2; s > 0; s >>= 1) {
        if (lid < s && before(sv[lid + s], si[lid + s], sv[lid], si[lid])) {
            sv[lid] = sv[lid + s];
            si[lid] = si[lid + s];
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    *value = sv[0];
    int r = si[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return r;
}

/* The row's argmax, ties to the lowest id. */
inline int row_argmax(global const float* x, int V, local float* sv, local int* si,
                      float* value) {
    float best = -INFINITY;
    int best_i = INT_MAX;
    for (int i = get_local_id(0); i < V; i += WG) {
        if (before(x[i], i, best, best_i)) {
            best = x[i];
            best_i = i;
        }
    }
    return group_argmax(best, best_i, sv, si, value);
}

/* ---------------------------------------------------------------------------------------- */
/* penalties, bans and the guided-decoding mask                                             */
/* ---------------------------------------------------------------------------------------- */

#define SEEN_IN_PROMPT 0x40000000

/* counts (B, V) int, zeroed: output tokens are counted, prompt tokens set a flag bit.
 * ids (B, L) padded with -1. Global (L, B). */
kernel void count_tokens(global const long* ids, int L, global int* counts, int V,
                         int is_prompt) {
    size_t j = get_global_id(0), b = get_global_id(1);
    long id = ids[b * L + j];
    if (id < 0 || id >= V) return;
    global int* c = counts + b * V + id;
    if (is_prompt) atomic_or(c, SEEN_IN_PROMPT);
    else atomic_inc(c);
}

/* Repetition on every seen token, then frequency and presence on output counts.
 * Global (V, B). */
kernel void apply_penalties(global float* logits, global const int* counts, int V,
                            global const float* presence, global const float* frequency,
                            global const float* repetition) {
    size_t v = get_global_id(0), b = get_global_id(1);
    int c = counts[b * V + v];
    if (c == 0) return;
    float n = (float)(c & (SEEN_IN_PROMPT - 1));
    float x = logits[b * V + v];
    float r = repetition[b];
    x = x > 0.0f ? x / r : x * r;
    x -= frequency[b] * n + (n > 0.0f ? presence[b] : 0.0f);
    logits[b * V + v] = x;
}

/* Global (L, B). */
kernel void apply_token_bans(global float* logits, int V, global const long* banned, int L) {
    size_t j = get_global_id(0), b = get_global_id(1);
    long id = banned[b * L + j];
    if (id >= 0) logits[b * V + id] = -INFINITY;
}

/* Guided decoding: logits[b, t] = -inf where bit t % 32 of mask[b, t / 32] is clear (int32
 * words, W per row; bits past V are never read). Global (V, B). */
kernel void apply_token_bitmask(global float* logits, int V, global const int* mask, int W) {
    size_t t = get_global_id(0), b = get_global_id(1);
    uint word = (uint)mask[b * W + t / 32];
    if (!((word >> (t % 32)) & 1u)) logits[b * V + t] = -INFINITY;
}

/* ---------------------------------------------------------------------------------------- */
/* sampling                                                                                  */
/* ---------------------------------------------------------------------------------------- */

/* splitmix64's finalizer: a counter-based generator, so draw i of a row needs no state. */
inline ulong mix64(ulong z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
    return z ^ (z >> 31);
}

/* A uniform float in (0, 1) for element i of the stream seeded with seed. */
inline float uniform01(ulong seed, uint i) {
    ulong z = mix64(seed + ((ulong)i + 1UL) * 0x9E3779B97F4A7C15UL);
    return ((float)(z >> 40) + 0.5f) * (1.0f / 16777216.0f);
}

/* A float's bits as a uint that sorts like the float (for radix selection). */
inline uint ordered(float f) {
    uint u = as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* One token per row. temperature 0 = greedy (argmax of the raw logits). Otherwise, on
 * y = logits / temperature: keep y >= the k-th largest (top_k > 0), take the softmax, keep the
 * shortest prefix of the (probability descending, id ascending) order whose mass reaches top_p,
 * drop p < min_p * max p, and draw by an exponential race (argmax p_i / E_i, E_i ~ Exp(1) from
 * the row's seed): an exact draw from the renormalized kept set. probs: (B, V) scratch.
 * Global (WG * B), local (WG). */
kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void sample(global const float* logits, int V, global const float* temperature,
            global const int* top_k, global const float* top_p, global const float* min_p,
            global const long* seeds, global float* probs, global long* out) {
    local float sv[WG];
    local int si[WG];
    local uint su[WG];
    local int tie_cut;
    int lid = get_local_id(0);
    size_t b = get_group_id(0);
    global const float* x = logits + b * V;
    global float* p = probs + b * V;

    float top_value;
    int top = row_argmax(x, V, sv, si, &top_value);
    float temp = temperature[b];
    if (temp == 0.0f) {
        if (lid == 0) out[b] = top;
        return;
    }

    /* top-k: the k-th largest key of y, found bit by bit from the most significant. */
    uint key_cut = 0u;
    int k = top_k[b];
    if (k > 0 && k < V) {
        for (int bit = 31; bit >= 0; --bit) {
            uint cand = key_cut | (1u << bit);
            uint n = 0;
            for (int i = lid; i < V; i += WG) n += ordered(x[i] / temp) >= cand;
            if (group_count(n, su) >= (uint)k) key_cut = cand;
        }
    }

    /* softmax over the kept tokens; the row maximum is y[top] */
    float m = top_value / temp;
    float z = 0.0f;
    for (int i = lid; i < V; i += WG) {
        float y = x[i] / temp;
        float e = ordered(y) >= key_cut ? exp(y - m) : 0.0f;
        p[i] = e;
        z += e;
    }
    z = group_sum(z, sv);
    for (int i = lid; i < V; i += WG) p[i] /= z;
    barrier(CLK_GLOBAL_MEM_FENCE);

    /* top-p. S(u) = mass of tokens whose bits exceed u (probabilities are >= 0, so their bits
     * sort like them). cut = the largest u with S(u) >= top_p; the boundary probability is the
     * one with bits cut + 1, and of its ties only the first (by id) that fit are kept. */
    float pp = top_p[b];
    uint p_cut = 0u;
    int keep_ties_to = INT_MAX;
    float s0 = 0.0f;
    for (int i = lid; i < V; i += WG) s0 += as_uint(p[i]) > 0u ? p[i] : 0.0f;
    if (pp < 1.0f && group_sum(s0, sv) >= pp) {
        for (int bit = 30; bit >= 0; --bit) {
            uint cand = p_cut | (1u << bit);
            float s = 0.0f;
            for (int i = lid; i < V; i += WG) s += as_uint(p[i]) > cand ? p[i] : 0.0f;
            if (group_sum(s, sv) >= pp) p_cut = cand;
        }
        p_cut += 1u; /* the boundary probability's bits */
        float boundary = as_float(p_cut);
        float above = 0.0f;
        uint ties = 0u;
        for (int i = lid; i < V; i += WG) {
            above += as_uint(p[i]) > p_cut ? p[i] : 0.0f;
            ties += as_uint(p[i]) == p_cut;
        }
        above = group_sum(above, sv);
        ties = group_count(ties, su);
        /* tie j (0-based, by id) is kept while above + j * boundary < top_p */
        uint keep = (uint)max(1.0f, ceil((pp - above) / boundary));
        if (keep < ties) {
            /* the id of tie number `keep` (1-based): count ties per contiguous chunk of ids */
            int chunk = (V + WG - 1) / WG;
            int lo = lid * chunk, hi = min(V, lo + chunk);
            uint mine = 0u;
            for (int i = lo; i < hi; ++i) mine += as_uint(p[i]) == p_cut;
            su[lid] = mine;
            barrier(CLK_LOCAL_MEM_FENCE);
            if (lid == 0) {
                uint seen = 0u;
                int owner = 0;
                while (seen + su[owner] < keep) seen += su[owner++];
                int i = owner * chunk;
                for (;; ++i) {
                    if (as_uint(p[i]) == p_cut && ++seen == keep) break;
                }
                tie_cut = i;
            }
            barrier(CLK_LOCAL_MEM_FENCE);
            keep_ties_to = tie_cut;
        }
    }

    /* min-p against the most likely token, then the exponential race */
    float floor_p = min_p[b] * p[top];
    ulong seed = (ulong)seeds[b];
    float best = -1.0f;
    int best_i = INT_MAX;
    for (int i = lid; i < V; i += WG) {
        float pi = p[i];
        uint bits = as_uint(pi);
        int kept = pi > 0.0f && pi >= floor_p &&
                   (p_cut == 0u || bits > p_cut || (bits == p_cut && i <= keep_ties_to));
        if (!kept) continue;
        float score = pi / -log(uniform01(seed, i));
        if (before(score, i, best, best_i)) {
            best = score;
            best_i = i;
        }
    }
    float drawn_score;
    int drawn = group_argmax(best, best_i, sv, si, &drawn_score);
    if (lid == 0) out[b] = drawn == INT_MAX ? top : drawn;
}

/* ---------------------------------------------------------------------------------------- */
/* log-probabilities                                                                         */
/* ---------------------------------------------------------------------------------------- */

/* log-softmax of each row: the log-probability and rank of tokens[b], and the num_top most
 * likely tokens (value descending, id ascending). Global (WG * B), local (WG). */
kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void logprobs(global const float* logits, int V, global const long* tokens,
              global float* token_lp, global long* token_rank, int num_top,
              global float* top_lp, global long* top_ids) {
    local float sv[WG];
    local int si[WG];
    local uint su[WG];
    int lid = get_local_id(0);
    size_t b = get_group_id(0);
    global const float* x = logits + b * V;

    float m;
    int top = row_argmax(x, V, sv, si, &m);
    float z = 0.0f;
    for (int i = lid; i < V; i += WG) z += exp(x[i] - m);
    float log_z = log(group_sum(z, sv));
    float xt = x[tokens[b]];
    uint above = 0u;
    for (int i = lid; i < V; i += WG) above += x[i] > xt;
    above = group_count(above, su);
    if (lid == 0) {
        token_lp[b] = (xt - m) - log_z;
        token_rank[b] = (long)above + 1;
    }
    float prev_v = m;
    int prev_i = top;
    for (int j = 0; j < num_top; ++j) {
        if (j > 0) {
            float best = -INFINITY;
            int best_i = INT_MAX;
            for (int i = lid; i < V; i += WG) {
                if (!before(prev_v, prev_i, x[i], i)) continue; /* already listed */
                if (before(x[i], i, best, best_i)) {
                    best = x[i];
                    best_i = i;
                }
            }
            prev_i = group_argmax(best, best_i, sv, si, &prev_v);
        }
        if (lid == 0) {
            top_lp[b * num_top + j] = (prev_v - m) - log_z;
            top_ids[b * num_top + j] = prev_i;
        }
    }
}
