/* dst[i] = src[i] between two float storage types. Built with -DSRC=n -DDST=n (see common.h). */

kernel void convert(global const CAT(TYPE_, SRC)* src, global CAT(TYPE_, DST)* dst) {
    size_t i = get_global_id(0);
    float v = CAT(LOAD_, SRC)(src, i);
    CAT(STORE_, DST)(dst, i, v);
}
