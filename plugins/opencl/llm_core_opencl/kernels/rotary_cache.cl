/* Rotary embedding and the paged KV-cache write.
 *
 * The cache is (num_blocks, block_size, Hkv, D) row-major: token position p of sequence b
 * lives at slot block_tables[b, p / block_size] * block_size + p % block_size.
 */

/* Rotate x (T, heads * head_size) in place. cos_sin: (max_pos, rot) float, cos then sin.
 * Global (rot / 2, heads, T). */
kernel void rotary(global const long* positions, global T* x, global const float* cos_sin,
                   int heads, int head_size, int rot, int neox) {
    int i = get_global_id(0), h = get_global_id(1);
    size_t t = get_global_id(2);
    int half_rot = rot / 2;
    size_t angle = positions[t] * rot + i;
    float c = cos_sin[angle], s = cos_sin[angle + half_rot];
    size_t base = (t * heads + h) * head_size;
    size_t ia = base + (neox ? i : 2 * i);
    size_t ib = base + (neox ? i + half_rot : 2 * i + 1);
    float a = LOAD(x, ia), b = LOAD(x, ib);
    STORE(x, ia, a * c - b * s);
    STORE(x, ib, b * c + a * s);
}

/* cache[slots[t], :] = new[t, :] for key and value, skipping slot -1. width = Hkv * D.
 * Global (width, T). */
kernel void reshape_and_cache(global const RAW* key, global const RAW* value, global RAW* key_cache,
                              global RAW* value_cache, global const long* slots, int width) {
    size_t j = get_global_id(0), t = get_global_id(1);
    long slot = slots[t];
    if (slot < 0) return;
    key_cache[slot * width + j] = key[t * width + j];
    value_cache[slot * width + j] = value[t * width + j];
}
