/* Register tiles shared by the native (C) kernels: float32, vectorised with GCC/Clang vector
 * extensions so that the accumulators of a tile stay in registers whatever the loop nest.
 *
 * Two shapes of product, each used by a LoRA kernel and by attention:
 * - dot tiles (`dot_tile_4x4`, `dot_tile_8x1`): several dot products of length n between
 *   rows of one operand and rows of another (LoRA shrink: A's rank rows x tokens; attention
 *   scores: K positions x query rows). Each loaded vector feeds 4 (or 8) FMAs.
 * - axpy tiles (`axpy_rows`): acc[t] += sum_j w[t][j] * M[j] over the columns of a matrix
 *   with a row stride (LoRA expand: y @ B; attention: P @ V), the accumulators of up to four
 *   rows x AXPY_VECS vectors held in registers across the whole sum over j.
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

/* s in every lane: one broadcast. `x - 0.0f` is exactly x (even -0.0), so the compiler drops
 * the subtraction; `(vec_t){0} + s` would keep an add (-0.0 + 0.0 is +0.0). */
ALWAYS_INLINE vec_t splat(float s) { return s - (vec_t){0}; }

/* The sum of a vector's lanes, halving it (an extract and an add per step) down to four lanes:
 * a short dependency chain, where adding lane by lane would chain VEC_WIDTH dependent adds. */
typedef float vec4_t __attribute__((vector_size(4 * sizeof(float))));
typedef float vec8_t __attribute__((vector_size(8 * sizeof(float))));

ALWAYS_INLINE vec4_t fold_to_4(vec8_t v) {
    vec4_t low, high;
    memcpy(&low, &v, sizeof low);
    memcpy(&high, (const char*)&v + sizeof low, sizeof high);
    return low + high;
}

ALWAYS_INLINE float sum_vec(vec_t v) {
#if VEC_WIDTH == 16
    vec8_t low, high;
    memcpy(&low, &v, sizeof low);
    memcpy(&high, (const char*)&v + sizeof low, sizeof high);
    vec4_t four = fold_to_4(low + high);
#elif VEC_WIDTH == 8
    vec4_t four = fold_to_4(v);
#else
    vec4_t four = v;
#endif
    return (four[0] + four[2]) + (four[1] + four[3]);
}

typedef int32_t ivec_t __attribute__((vector_size(VEC_WIDTH * sizeof(int32_t))));

/* Lane-wise mask ? a : b, mask lanes all ones or all zeros (as vector comparisons make). */
ALWAYS_INLINE vec_t select_vec(ivec_t mask, vec_t a, vec_t b) {
    ivec_t a_bits, b_bits;
    memcpy(&a_bits, &a, sizeof a);
    memcpy(&b_bits, &b, sizeof b);
    ivec_t bits = (a_bits & mask) | (b_bits & ~mask);
    vec_t out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

/* The largest lane, halving the vector as sum_vec does (NaN lanes may be skipped). */
ALWAYS_INLINE float max_lanes(vec_t v) {
    float lanes[VEC_WIDTH];
    memcpy(lanes, &v, sizeof lanes);
    for (int width = VEC_WIDTH / 2; width >= 1; width /= 2)
        for (int lane = 0; lane < width; lane++)
            lanes[lane] = lanes[lane + width] > lanes[lane] ? lanes[lane + width] : lanes[lane];
    return lanes[0];
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

#define MAX_AXPY_ROWS 4 /* rows of an axpy tile */
#if VEC_WIDTH == 16
#define AXPY_VECS 4 /* vectors of columns per axpy tile: 4 x 4 accumulators of 32 registers */
#else
#define AXPY_VECS 2 /* 4 x 2 accumulators: room left in 16 registers */
#endif

/* acc[t][0:nv*VEC_WIDTH] += sum_{j < n} w[t][j] * m[j * m_stride + 0 : nv*VEC_WIDTH], for
 * t < num_rows and nv <= AXPY_VECS whole vectors of columns: the accumulators are loaded
 * once, kept in registers over j (each loaded vector of m feeds num_rows FMAs), stored once. */
ALWAYS_INLINE void axpy_tile(float* const acc[MAX_AXPY_ROWS], const float* const w[MAX_AXPY_ROWS],
                             const int num_rows, const float* m, int64_t m_stride, int64_t n,
                             const int nv) {
    vec_t sum[MAX_AXPY_ROWS][AXPY_VECS];
    for (int t = 0; t < num_rows; t++)
        for (int v = 0; v < nv; v++) sum[t][v] = load_vec(acc[t] + v * VEC_WIDTH);
    for (int64_t j = 0; j < n; j++) {
        const float* row = m + j * m_stride;
        vec_t mv[AXPY_VECS];
        for (int v = 0; v < nv; v++) mv[v] = load_vec(row + v * VEC_WIDTH);
        for (int t = 0; t < num_rows; t++) {
            vec_t wv = splat(w[t][j]);
            for (int v = 0; v < nv; v++) sum[t][v] += wv * mv[v];
        }
    }
    for (int t = 0; t < num_rows; t++)
        for (int v = 0; v < nv; v++) store_vec(acc[t] + v * VEC_WIDTH, sum[t][v]);
}

/* acc[t][0:width] += sum_{j < n} w[t][j] * m[j * m_stride + 0 : width] for t < num_rows and
 * any width: tiles of AXPY_VECS vectors, then single vectors, then scalar columns.
 * num_rows must be a constant where this is inlined (see axpy_rows), so that the tiles'
 * loops unroll and their accumulators live in registers. */
ALWAYS_INLINE void axpy_columns(float* const acc[MAX_AXPY_ROWS],
                                const float* const w[MAX_AXPY_ROWS], const int num_rows,
                                const float* m, int64_t m_stride, int64_t n, int64_t width) {
    float* at[MAX_AXPY_ROWS];
    int64_t c = 0;
    for (; c + AXPY_VECS * VEC_WIDTH <= width; c += AXPY_VECS * VEC_WIDTH) {
        for (int t = 0; t < num_rows; t++) at[t] = acc[t] + c;
        axpy_tile(at, w, num_rows, m + c, m_stride, n, AXPY_VECS);
    }
    for (; c + VEC_WIDTH <= width; c += VEC_WIDTH) {
        for (int t = 0; t < num_rows; t++) at[t] = acc[t] + c;
        axpy_tile(at, w, num_rows, m + c, m_stride, n, 1);
    }
    for (; c < width; c++)
        for (int t = 0; t < num_rows; t++) {
            float s = acc[t][c];
            for (int64_t j = 0; j < n; j++) s += w[t][j] * m[j * m_stride + c];
            acc[t][c] = s;
        }
}

/* axpy_columns for 1..MAX_AXPY_ROWS rows, each count compiled with its constant. */
static inline void axpy_rows(float* const acc[MAX_AXPY_ROWS], const float* const w[MAX_AXPY_ROWS],
                             int num_rows, const float* m, int64_t m_stride, int64_t n,
                             int64_t width) {
    switch (num_rows) {
        case 4: axpy_columns(acc, w, 4, m, m_stride, n, width); break;
        case 3: axpy_columns(acc, w, 3, m, m_stride, n, width); break;
        case 2: axpy_columns(acc, w, 2, m, m_stride, n, width); break;
        default: axpy_columns(acc, w, 1, m, m_stride, n, width);
    }
}

#endif
