/* KV-cache write and paged attention on the CPU: float32, K/V read in place through the
 * block tables (no gather of a sequence's pages into a contiguous copy).
 *
 * Semantics (as kernels/reference.py):
 *   write_kv:        kv[s // B, layer, 0, s % B] = key[t], kv[s // B, layer, 1, s % B] = value[t],
 *                    s = slot_mapping[t]; tokens with s < 0 are skipped.
 *   paged_attention: out[t] = softmax(cap(q[t] @ K[seq(t), w(t):p(t)+1].T * scale))
 *                                @ V[seq(t), w(t):p(t)+1]
 *                    for every query token t at position p(t) = context_len - q_len + i of its
 *                    sequence: causal over the cached prefix and the new tokens; query head h
 *                    reads KV head h / (num_heads / num_kv_heads) (GQA). With a sliding
 *                    window W > 0, w(t) = max(0, p(t) - W + 1), else 0; with softcap c > 0,
 *                    cap(s) = c * tanh(s / c), else s.
 *
 * Work: an item is (sequence, KV head, block of at most QUERY_BLOCK query tokens); its rows
 * are those tokens times the query heads of the KV head's group, so each K and V row read
 * serves every query head that shares it. An item walks the sequence's pages in order with
 * an online softmax (a running max and sum per row, the output accumulator rescaled when
 * the max grows): its memory is rows x (block_size + head_dim) floats, whatever the
 * context, in a scratch allocated once per thread per call. Scores come from 4x4 dot tiles
 * (4 positions x 4 rows) or, for fewer than 3 rows, 8x1 tiles; P @ V from axpy tiles that
 * keep up to four rows of the accumulator in registers. Positions past a row's own, and before
 * its window, are given weight 0; positions past the context, and pages wholly before the
 * window of an item's first row, are never read (they may hold anything, NaN too).
 */
#include <math.h>
#include <stdlib.h>

#include "native_common.h"
#include "native_tiles.h"

#define QUERY_BLOCK 16 /* query tokens per item: prefill items reuse each K/V row 16x */

/* exp(x) lane-wise for x <= 0 (a softmax's arguments after subtracting the max), in plain
 * vector arithmetic: Cody-Waite range reduction, a degree-6 polynomial (Cephes expf), 2^n
 * built in the exponent bits; relative error ~2e-7. x below -87 (and -inf) gives ~1e-38:
 * callers that need an exact 0 mask it. Rounding to the nearest integer adds and subtracts
 * 1.5 * 2^23 (exact without -ffast-math, which this library is never built with). */
ALWAYS_INLINE vec_t exp_nonpositive(vec_t x) {
    const float round_magic = 12582912.0f;
    x = select_vec(x < splat(-87.0f), splat(-87.0f), x);
    vec_t shifted = x * 1.44269504088896341f + round_magic;
    vec_t n = shifted - round_magic;
    vec_t r = x - n * 0.693359375f + n * 2.12194440e-4f;
    vec_t p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    ivec_t n_bits, magic_bits;
    memcpy(&n_bits, &shifted, sizeof n_bits);
    vec_t magic = splat(round_magic);
    memcpy(&magic_bits, &magic, sizeof magic_bits);
    ivec_t exponent = (n_bits - magic_bits + 127) << 23; /* n >= -126: a normal 2^n */
    vec_t two_to_n;
    memcpy(&two_to_n, &exponent, sizeof two_to_n);
    return p * two_to_n;
}

int loraserve_write_kv(
    float* kv_layer,               /* &kv_pages[0, layer, 0, 0, 0, 0] */
    int64_t page_stride,           /* kv_pages' strides along page, K/V, position, head */
    int64_t which_stride,
    int64_t position_stride,
    int64_t head_stride,
    int64_t num_pages,             /* pages of the view: every slot must lie inside */
    int64_t block_size,            /* positions per page */
    int64_t num_kv_heads,
    int64_t head_dim,              /* unit stride in kv_pages, key and value */
    const float* key,              /* [num_tokens, num_kv_heads, head_dim] */
    int64_t key_token_stride,
    int64_t key_head_stride,
    const float* value,            /* [num_tokens, num_kv_heads, head_dim] */
    int64_t value_token_stride,
    int64_t value_head_stride,
    const int64_t* slot_mapping,   /* [num_tokens] page * block_size + position; < 0: skip */
    int64_t slot_stride,           /* slot_mapping's stride */
    int64_t num_tokens,
    int num_threads)               /* OpenMP threads (torch.get_num_threads()) */
{
    for (int64_t t = 0; t < num_tokens; t++)
        if (slot_mapping[t * slot_stride] >= num_pages * block_size) return STATUS_BAD_PAGE;
    size_t row_bytes = sizeof(float) * (size_t)head_dim;
#pragma omp parallel for schedule(static) num_threads(num_threads) \
    if (num_tokens * num_kv_heads * head_dim >= PARALLEL_MIN_FMAS)
    for (int64_t t = 0; t < num_tokens; t++) {
        int64_t slot = slot_mapping[t * slot_stride];
        if (slot < 0) continue;
        float* target = kv_layer + slot / block_size * page_stride
                        + slot % block_size * position_stride;
        for (int64_t h = 0; h < num_kv_heads; h++) {
            memcpy(target + h * head_stride, key + t * key_token_stride + h * key_head_stride,
                   row_bytes);
            memcpy(target + which_stride + h * head_stride,
                   value + t * value_token_stride + h * value_head_stride, row_bytes);
        }
    }
    return STATUS_OK;
}

typedef struct {
    int32_t seq, kv_head, first_query, num_queries; /* queries relative to the sequence's */
} AttentionItem;

typedef struct { /* everything an item reads; one per call */
    const float* query;
    int64_t query_token_stride, query_head_stride;
    const float* kv_layer;
    int64_t page_stride, which_stride, position_stride, head_stride;
    int64_t block_size, group, head_dim;
    const int32_t* block_tables;
    int64_t table_seq_stride, table_block_stride;
    const int32_t* query_starts;
    const int32_t* context_lens;
    float scale;
    int64_t window; /* 0: no sliding window */
    float softcap;  /* 0: no soft-capping */
    float* out;
    int64_t out_token_stride, out_head_stride;
} Attention;

typedef struct { /* one thread's scratch: rows x (score_stride + head_dim + 3) */
    int64_t score_stride; /* block_size rounded up to whole vectors */
    const float** q_rows; /* [rows] where each row's query vector is */
    float* scores;  /* [rows, score_stride] scores, then weights, of the current page */
    float* acc;     /* [rows, head_dim] unnormalised output */
    float* row_max; /* [rows] running max of the scaled scores */
    float* row_sum; /* [rows] running sum of exp(score - row_max) */
} Scratch;

/* scores[r][p] = dot(q_r, K[p]) for p < n, all rows of an item, K rows from one page. */
static void page_scores(const float* const* q_rows, int64_t num_rows, const float* k,
                        int64_t position_stride, int64_t n, int64_t head_dim,
                        int64_t score_stride, float* scores) {
    if (num_rows < 3) {
        for (int64_t r = 0; r < num_rows; r++)
            for (int64_t p = 0; p < n; p += 8) {
                const float* keys[8];
                float out[8];
                for (int u = 0; u < 8; u++) keys[u] = k + min_i64(p + u, n - 1) * position_stride;
                dot_tile_8x1(keys, q_rows[r], head_dim, out);
                for (int64_t u = 0; u < min_i64(8, n - p); u++) scores[r * score_stride + p + u] = out[u];
            }
        return;
    }
    for (int64_t r = 0; r < num_rows; r += 4) {
        const float* rows[4];
        for (int u = 0; u < 4; u++) rows[u] = q_rows[min_i64(r + u, num_rows - 1)];
        for (int64_t p = 0; p < n; p += 4) {
            const float* keys[4];
            float out[4][4];
            for (int u = 0; u < 4; u++) keys[u] = k + min_i64(p + u, n - 1) * position_stride;
            dot_tile_4x4(keys, rows, head_dim, out);
            for (int64_t u = 0; u < min_i64(4, n - p); u++)
                for (int64_t v = 0; v < min_i64(4, num_rows - r); v++)
                    scores[(r + v) * score_stride + p + u] = out[u][v];
        }
    }
}

/* Online softmax step of one row over one page: scores (the row's first n, in a buffer
 * padded to whole vectors) -> weights, 0 before `first_visible` (sliding window) and from
 * `visible` on (causal mask); running max and sum updated; the row's accumulator rescaled
 * when the max grows. Soft-capping (softcap > 0) is a scalar tanhf per visible score. */
static void softmax_step(float* scores, int64_t n, int64_t first_visible, int64_t visible,
                         float scale, float softcap, float* row_max, float* row_sum, float* acc,
                         int64_t head_dim) {
    int64_t padded = (n + VEC_WIDTH - 1) / VEC_WIDTH * VEC_WIDTH;
    if (softcap > 0.0f) { /* as the reference: scale, divide by the cap, tanh, multiply */
        for (int64_t p = first_visible; p < visible; p++)
            scores[p] = tanhf(scores[p] * scale / softcap) * softcap;
        scale = 1.0f;
    }
    for (int64_t p = 0; p < first_visible; p++) scores[p] = -INFINITY;
    for (int64_t p = visible; p < padded; p++) scores[p] = -INFINITY;
    vec_t page_max = splat(-INFINITY);
    for (int64_t p = 0; p < padded; p += VEC_WIDTH) {
        vec_t score = load_vec(scores + p) * scale;
        store_vec(scores + p, score);
        page_max = select_vec(score > page_max, score, page_max);
    }
    float new_max = max_lanes(page_max);
    new_max = new_max > *row_max ? new_max : *row_max;
    vec_t sum = splat(0.0f);
    for (int64_t p = 0; p < padded; p += VEC_WIDTH) {
        vec_t score = load_vec(scores + p);
        vec_t weight = exp_nonpositive(score - new_max);
        weight = select_vec(score != splat(-INFINITY), weight, splat(0.0f)); /* NaN stays NaN */
        store_vec(scores + p, weight);
        sum += weight;
    }
    if (new_max > *row_max) { /* the first page too: acc and sum are 0, alpha ~0 */
        float alpha = exp_nonpositive(splat(*row_max - new_max))[0];
        for (int64_t e = 0; e < head_dim; e++) acc[e] *= alpha;
        *row_sum *= alpha;
        *row_max = new_max;
    }
    *row_sum += sum_vec(sum);
}

static void attention_item(const Attention* a, const AttentionItem* item, Scratch* scratch) {
    int64_t q_len = a->query_starts[item->seq + 1] - a->query_starts[item->seq];
    int64_t context = a->context_lens[item->seq];
    int64_t num_rows = item->num_queries * a->group;
    const float** q_rows = scratch->q_rows;
    for (int64_t r = 0; r < num_rows; r++) {
        int64_t token = a->query_starts[item->seq] + item->first_query + r / a->group;
        int64_t head = item->kv_head * a->group + r % a->group;
        q_rows[r] = a->query + token * a->query_token_stride + head * a->query_head_stride;
        scratch->row_max[r] = -INFINITY;
        scratch->row_sum[r] = 0.0f;
    }
    memset(scratch->acc, 0, sizeof(float) * (size_t)(num_rows * a->head_dim));
    int64_t first_position = context - q_len + item->first_query; /* of the item's first row */
    int64_t limit = first_position + item->num_queries;           /* positions any row sees */
    /* The first row's window starts earliest: pages wholly before it are skipped. */
    int64_t lowest = a->window > 0 ? max_i64(0, first_position - a->window + 1) : 0;
    const int32_t* table = a->block_tables + item->seq * a->table_seq_stride;
    for (int64_t start = lowest / a->block_size * a->block_size; start < limit;
         start += a->block_size) {
        int64_t n = min_i64(a->block_size, limit - start);
        const float* k = a->kv_layer + table[start / a->block_size * a->table_block_stride]
                                           * a->page_stride + item->kv_head * a->head_stride;
        page_scores(q_rows, num_rows, k, a->position_stride, n, a->head_dim, scratch->score_stride,
                    scratch->scores);
        for (int64_t r = 0; r < num_rows; r++) {
            int64_t position = first_position + r / a->group;
            int64_t visible = min_i64(n, position + 1 - start);
            int64_t first_visible = a->window > 0 ? position - a->window + 1 - start : 0;
            softmax_step(scratch->scores + r * scratch->score_stride, n,
                         min_i64(max_i64(first_visible, 0), n), max_i64(visible, 0), a->scale,
                         a->softcap, &scratch->row_max[r], &scratch->row_sum[r],
                         scratch->acc + r * a->head_dim, a->head_dim);
        }
        for (int64_t r = 0; r < num_rows; r += MAX_AXPY_ROWS) {
            int rows = (int)min_i64(MAX_AXPY_ROWS, num_rows - r);
            float* acc[MAX_AXPY_ROWS];
            const float* w[MAX_AXPY_ROWS];
            for (int u = 0; u < rows; u++) {
                acc[u] = scratch->acc + (r + u) * a->head_dim;
                w[u] = scratch->scores + (r + u) * scratch->score_stride;
            }
            axpy_rows(acc, w, rows, k + a->which_stride, a->position_stride, n, a->head_dim);
        }
    }
    for (int64_t r = 0; r < num_rows; r++) {
        int64_t token = a->query_starts[item->seq] + item->first_query + r / a->group;
        int64_t head = item->kv_head * a->group + r % a->group;
        float* o = a->out + token * a->out_token_stride + head * a->out_head_stride;
        float inverse = 1.0f / scratch->row_sum[r];
        for (int64_t e = 0; e < a->head_dim; e++) o[e] = scratch->acc[r * a->head_dim + e] * inverse;
    }
}

/* Status of the batch's metadata; *fmas gets the multiply-adds of the sequences to run. */
static int check_sequences(const Attention* a, int64_t num_seqs, int64_t num_tokens,
                           int64_t max_blocks, int64_t num_pages, int64_t num_heads,
                           int64_t max_query_len, int64_t* fmas) {
    if (a->query_starts[0] != 0 || a->query_starts[num_seqs] != num_tokens)
        return STATUS_BAD_STARTS;
    *fmas = 0;
    for (int64_t s = 0; s < num_seqs; s++) {
        int64_t q_len = a->query_starts[s + 1] - a->query_starts[s];
        int64_t context = a->context_lens[s];
        if (q_len < 0) return STATUS_BAD_STARTS;
        if (context < q_len || context > max_blocks * a->block_size) return STATUS_BAD_CONTEXT;
        for (int64_t b = 0; b * a->block_size < context; b++) {
            int32_t page = a->block_tables[s * a->table_seq_stride + b * a->table_block_stride];
            if (page < 0 || page >= num_pages) return STATUS_BAD_PAGE;
        }
        if (q_len <= max_query_len) *fmas += 2 * q_len * context * num_heads * a->head_dim;
    }
    return STATUS_OK;
}

/* The items of the sequences with 0 < q_len <= max_query_len; NULL when out of memory.
 * *max_rows gets the most rows of one item (the size of the scratch). */
static AttentionItem* attention_items(const Attention* a, int64_t num_seqs, int64_t num_kv_heads,
                                      int64_t max_query_len, int64_t* num_items,
                                      int64_t* max_rows) {
    int64_t count = 0;
    *max_rows = 1;
    for (int64_t s = 0; s < num_seqs; s++) {
        int64_t q_len = a->query_starts[s + 1] - a->query_starts[s];
        if (q_len == 0 || q_len > max_query_len) continue;
        count += num_kv_heads * ((q_len + QUERY_BLOCK - 1) / QUERY_BLOCK);
        *max_rows = max_i64(*max_rows, a->group * min_i64(q_len, QUERY_BLOCK));
    }
    AttentionItem* items = malloc(sizeof(AttentionItem) * (size_t)max_i64(count, 1));
    if (items == NULL) return NULL;
    int64_t n = 0;
    for (int64_t s = 0; s < num_seqs; s++) {
        int64_t q_len = a->query_starts[s + 1] - a->query_starts[s];
        if (q_len == 0 || q_len > max_query_len) continue;
        for (int64_t h = 0; h < num_kv_heads; h++)
            for (int64_t q = 0; q < q_len; q += QUERY_BLOCK)
                items[n++] = (AttentionItem){(int32_t)s, (int32_t)h, (int32_t)q,
                                             (int32_t)min_i64(QUERY_BLOCK, q_len - q)};
    }
    *num_items = n;
    return items;
}

/* One thread's scratch for items of up to max_rows rows, in one allocation (NULL: no memory). */
static void* scratch_alloc(Scratch* scratch, int64_t max_rows, int64_t block_size,
                           int64_t head_dim) {
    scratch->score_stride = (block_size + VEC_WIDTH - 1) / VEC_WIDTH * VEC_WIDTH;
    size_t floats = (size_t)(max_rows * (scratch->score_stride + head_dim + 2));
    char* memory = malloc(sizeof(float*) * (size_t)max_rows + sizeof(float) * floats);
    if (memory == NULL) return NULL;
    scratch->q_rows = (const float**)memory;
    scratch->scores = (float*)(memory + sizeof(float*) * (size_t)max_rows);
    scratch->acc = scratch->scores + max_rows * scratch->score_stride;
    scratch->row_max = scratch->acc + max_rows * head_dim;
    scratch->row_sum = scratch->row_max + max_rows;
    return memory;
}

int loraserve_paged_attention(
    const float* query,            /* [num_tokens, num_heads, head_dim], unit stride on dim */
    int64_t query_token_stride,
    int64_t query_head_stride,
    const float* kv_layer,         /* &kv_pages[0, layer, 0, 0, 0, 0] */
    int64_t page_stride,           /* kv_pages' strides along page, K/V, position, head */
    int64_t which_stride,
    int64_t position_stride,
    int64_t head_stride,
    int64_t num_pages,             /* pages of the view: every table entry used lies inside */
    int64_t block_size,            /* positions per page */
    int64_t num_heads,             /* query heads: a multiple of num_kv_heads */
    int64_t num_kv_heads,
    int64_t head_dim,
    const int32_t* block_tables,   /* [num_seqs, max_blocks] pages of each sequence in order */
    int64_t table_seq_stride,
    int64_t table_block_stride,
    int64_t max_blocks,
    const int32_t* query_starts,   /* [num_seqs + 1] contiguous, 0 .. num_tokens */
    const int32_t* context_lens,   /* [num_seqs] contiguous: tokens in the cache, new included */
    int64_t num_seqs,
    int64_t num_tokens,
    float scale,                   /* applied to q @ k before the softmax */
    int64_t window,                /* sliding window: a query sees its last `window` keys; 0: all */
    float softcap,                 /* scores -> softcap * tanh(score / softcap); 0: none */
    int64_t max_query_len,         /* sequences with more queries are skipped (out untouched) */
    float* out,                    /* [num_tokens, num_heads, head_dim], unit stride on dim */
    int64_t out_token_stride,
    int64_t out_head_stride,
    int num_threads)               /* OpenMP threads (torch.get_num_threads()) */
{
    Attention a = {query,       query_token_stride, query_head_stride,
                   kv_layer,    page_stride,        which_stride,
                   position_stride, head_stride,    block_size,
                   num_heads / num_kv_heads,        head_dim,
                   block_tables, table_seq_stride,  table_block_stride,
                   query_starts, context_lens,      scale,
                   window,      softcap,
                   out,         out_token_stride,   out_head_stride};
    int64_t fmas, num_items, max_rows;
    int status = check_sequences(&a, num_seqs, num_tokens, max_blocks, num_pages, num_heads,
                                 max_query_len, &fmas);
    if (status != STATUS_OK) return status;
    AttentionItem* items =
        attention_items(&a, num_seqs, num_kv_heads, max_query_len, &num_items, &max_rows);
    if (items == NULL) return STATUS_NO_MEMORY;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) if (num_items > 1 && fmas >= PARALLEL_MIN_FMAS)
    {
        Scratch scratch = {0};
        void* memory = scratch_alloc(&scratch, max_rows, block_size, head_dim);
        if (memory == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < num_items; i++) attention_item(&a, &items[i], &scratch);
        }
        free(memory);
    }
    free(items);
    return failed ? STATUS_NO_MEMORY : STATUS_OK;
}
