/* Row norms: one work-group of WG work-items per row (WG a power of two, -DWG=n); group_sum is
 * in common.h. gemma_rms_norm reads its weight in storage type WSTORAGE (-DWSTORAGE=n, default
 * the program's own): its (1 + w) is formed from the weight as it is, never rounded to T. */

#ifndef WSTORAGE
#define WSTORAGE STORAGE
#endif
#define WT CAT(TYPE_, WSTORAGE)
#define WLOAD(p, i) CAT(LOAD_, WSTORAGE)(p, i)

/* y = round(s * rsqrt(mean(s^2) + eps)) * w with s = x, or s = round(x + residual), which is
 * then written over residual. Global (WG * rows), local (WG). */
kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void rms_norm(global const T* x, global T* residual, int has_residual, global const T* w,
              global T* out, int hidden, float eps) {
    local float scratch[WG];
    size_t lid = get_local_id(0);
    size_t row = get_group_id(0) * (size_t)hidden;
    float sumsq = 0.0f;
    for (int h = lid; h < hidden; h += WG) {
        float v = LOAD(x, row + h);
        if (has_residual) {
            STORE(residual, row + h, v + LOAD(residual, row + h));
            v = LOAD(residual, row + h);
        }
        sumsq += v * v;
    }
    float inv = rsqrt(group_sum(sumsq, scratch) / hidden + eps);
    for (int h = lid; h < hidden; h += WG) {
        float v = has_residual ? LOAD(residual, row + h) : LOAD(x, row + h);
        STORE(out, row + h, ROUND(v * inv) * LOAD(w, h));
    }
}

/* The Gemma convention: y = s * rsqrt(mean(s^2) + eps) * (1 + w) in float, rounded once; s as
 * in rms_norm. Global (WG * rows), local (WG). */
kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void gemma_rms_norm(global const T* x, global T* residual, int has_residual, global const WT* w,
                    global T* out, int hidden, float eps) {
    local float scratch[WG];
    size_t lid = get_local_id(0);
    size_t row = get_group_id(0) * (size_t)hidden;
    float sumsq = 0.0f;
    for (int h = lid; h < hidden; h += WG) {
        float v = LOAD(x, row + h);
        if (has_residual) {
            STORE(residual, row + h, v + LOAD(residual, row + h));
            v = LOAD(residual, row + h);
        }
        sumsq += v * v;
    }
    float inv = rsqrt(group_sum(sumsq, scratch) / hidden + eps);
    for (int h = lid; h < hidden; h += WG) {
        float v = has_residual ? LOAD(residual, row + h) : LOAD(x, row + h);
        STORE(out, row + h, v * inv * (1.0f + WLOAD(w, h)));
    }
}

/* (x - mean) * rsqrt(var + eps) * w + b, biased variance (two passes). */
kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void layer_norm(global const T* x, global const T* w, global const T* b, int has_bias,
                global T* out, int hidden, float eps) {
    local float scratch[WG];
    size_t lid = get_local_id(0);
    size_t row = get_group_id(0) * (size_t)hidden;
    float sum = 0.0f;
    for (int h = lid; h < hidden; h += WG) sum += LOAD(x, row + h);
    float mean = group_sum(sum, scratch) / hidden;
    float sq = 0.0f;
    for (int h = lid; h < hidden; h += WG) {
        float d = LOAD(x, row + h) - mean;
        sq += d * d;
    }
    float inv = rsqrt(group_sum(sq, scratch) / hidden + eps);
    for (int h = lid; h < hidden; h += WG) {
        float y = (LOAD(x, row + h) - mean) * inv * LOAD(w, h);
        STORE(out, row + h, has_bias ? y + LOAD(b, h) : y);
    }
}
