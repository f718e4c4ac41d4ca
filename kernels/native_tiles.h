/* Register tiles shared by the native (C) kernels: float32, vectorised with GCC/Clang vector
 * extensions so that the accumulators of a tile stay in registers whatever the loop nest.
 *
 * Two shapes of product, each used by a LoRA kernel and by attention:
 * - dot tiles (`dot_tile_4x4`, `dot_tile_8x1`): several dot products of length n between
 *   rows of one operand and rows of another (LoRA shrink: A's rank rows x tokens; attention
 *   scores: K positions x query rows). Each loaded vector feeds 4 (or 8) FMAs.
 * - axpy tiles (`axpy_tile`): acc[t] += sum_j w[t][j] * M[j] over a few columns of a matrix
 *   with a row stride (LoRA expand: y @ B; attention: P @ V), the accumulators of up to two
 *   rows x four vectors held in registers across the whole sum over j.
 * Operands are read with unaligned loads (memcpy of a vector compiles to one); no tile
 * reads past the n (or the columns) it is given: tails are scalar.
 */
#ifndef LORASERVE_NATIVE_TILES_H
#define LORASERVE_NATIVE_TILES_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define VEC_WIDTH 16 /* floats per vector: one zmm register */
#elif defined(__AVX__)
#define VEC_WIDTH 8 /* one ymm register */
#else
#define VEC_WIDTH 4 /* SSE / NEON */
#endif

typedef float vec_t __attribute__((vector_size(VEC_WIDTH * sizeof(float))));

#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE vec_t load_vec(const float* p) {
    vec_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

ALWAYS_INLINE void store_vec(float* p, vec_t v) { memcpy(p, &v, sizeof v); }

ALWAYS_INLINE vec_t splat(float s) { return (vec_t){0} + s; }

ALWAYS_INLINE float sum_vec(vec_t v) {
    float s = 0.0f;
    for (int lane = 0; lane < VEC_WIDTH; lane++) s += v[lane];
    return s;
}

static inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

/* out[i][j] = dot(a[i][0:n], b[j][0:n]) for 4 rows of a and 4 rows of b. Callers with fewer
 * rows repeat a pointer and ignore the repeated results. */
ALWAYS_INLINE void dot_tile_4x4(const float* const a[4], const float* const b[4], int64_t n,
                                float out[4][4]) {
    vec_t acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = splat(0.0f);
    int64_t k = 0;
    for (; k + VEC_WIDTH <= n; k += VEC_WIDTH) {
        vec_t av[4], bv[4];
        for (int i = 0; i < 4; i++) av[i] = load_vec(a[i] + k);
        for (int j = 0; j < 4; j++) bv[j] = load_vec(b[j] + k);
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++) acc[i][j] += av[i] * bv[j];
    }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) {
            float s = sum_vec(acc[i][j]);
            for (int64_t tail = k; tail < n; tail++) s += a[i][tail] * b[j][tail];
            out[i][j] = s;
        }
}

/* out[i] = dot(a[i][0:n], b[0:n]) for 8 rows of a and one row b: eight independent FMA chains
 * for the one-token case (decode), where b is reused and a streams from memory. */
ALWAYS_INLINE void dot_tile_8x1(const float* const a[8], const float* b, int64_t n, float out[8]) {
    vec_t acc[8];
    for (int i = 0; i < 8; i++) acc[i] = splat(0.0f);
    int64_t k = 0;
    for (; k + VEC_WIDTH <= n; k += VEC_WIDTH) {
        vec_t bv = load_vec(b + k);
        for (int i = 0; i < 8; i++) acc[i] += load_vec(a[i] + k) * bv;
    }
    for (int i = 0; i < 8; i++) {
        float s = sum_vec(acc[i]);
        for (int64_t tail = k; tail < n; tail++) s += a[i][tail] * b[tail];
        out[i] = s;
    }
}

/* acc[t][0:NV*VEC_WIDTH] += sum_{j < n} w[t][j] * m[j * m_stride + 0 : NV*VEC_WIDTH], for
 * t < num_rows (1 or 2) and NV (1..4) whole vectors of columns: 2 x 4 vector accumulators,
 * loaded once, kept in registers over j, stored once. */
ALWAYS_INLINE void axpy_tile(float* const acc[2], const float* const w[2], int num_rows,
                             const float* m, int64_t m_stride, int64_t n, int nv) {
    vec_t sum[2][4];
    for (int t = 0; t < num_rows; t++)
        for (int v = 0; v < nv; v++) sum[t][v] = load_vec(acc[t] + v * VEC_WIDTH);
    for (int64_t j = 0; j < n; j++) {
        const float* row = m + j * m_stride;
        vec_t mv[4];
        for (int v = 0; v < nv; v++) mv[v] = load_vec(row + v * VEC_WIDTH);
        for (int t = 0; t < num_rows; t++) {
            vec_t wv = splat(w[t][j]);
            for (int v = 0; v < nv; v++) sum[t][v] += wv * mv[v];
        }
    }
    for (int t = 0; t < num_rows; t++)
        for (int v = 0; v < nv; v++) store_vec(acc[t] + v * VEC_WIDTH, sum[t][v]);
}

/* acc[t][0:width] += sum_{j < n} w[t][j] * m[j * m_stride + 0 : width] for t < num_rows (1 or
 * 2) and any width: axpy tiles of four vectors, then single vectors, then scalar columns. */
static inline void axpy_rows(float* const acc[2], const float* const w[2], int num_rows,
                             const float* m, int64_t m_stride, int64_t n, int64_t width) {
    int64_t c = 0;
    for (; c + 4 * VEC_WIDTH <= width; c += 4 * VEC_WIDTH) {
        float* const at[2] = {acc[0] + c, acc[num_rows - 1] + c};
        axpy_tile(at, w, num_rows, m + c, m_stride, n, 4);
    }
    for (; c + VEC_WIDTH <= width; c += VEC_WIDTH) {
        float* const at[2] = {acc[0] + c, acc[num_rows - 1] + c};
        axpy_tile(at, w, num_rows, m + c, m_stride, n, 1);
    }
    for (; c < width; c++)
        for (int t = 0; t < num_rows; t++) {
            float s = acc[t][c];
            for (int64_t j = 0; j < n; j++) s += w[t][j] * m[j * m_stride + c];
            acc[t][c] = s;
        }
}

#endif
