/* LoRA shrink and expand (SGMV) on the CPU: float32, adapter weights read in place.
 *
 * Semantics (as kernels/reference.py):
 *   lora_shrink: y[t, i, :r] = x[t] @ A[slot(t), i].T; y[t, i, r:] = 0; y[t] = 0 when
 *                slot(t) is NO_ADAPTER. r = ranks[slot, i] (0: slice i not targeted).
 *   lora_expand: out[t, c_i:c_{i+1}] += y[t, i, :r] @ B[slot(t), i]; NO_ADAPTER tokens and
 *                untargeted slices leave out untouched. A DoRA slice (g offset >= 0) adds
 *                (g - 1) * (out - bias) + g * (y @ B) instead (kernels/ops.py), its delta
 *                summed apart in a small buffer first; plain slices take the direct path.
 * A (`[r, in_dim]`) and B (`[r, c_{i+1} - c_i]`, scaling folded in) are row-major at element
 * offsets into the flat pool, found through the offset table of the slot: no gather, no copy.
 *
 * Work: every segment (a run of tokens sharing an adapter slot) is cut into chunks of at
 * most TOKEN_BLOCK tokens; a work item is (chunk, slice) for shrink and (chunk, block of at
 * most COLUMN_BLOCK output columns of one slice) for expand. Items run in parallel (OpenMP,
 * torch's thread pool: the runtime is the one torch loaded); inside an item the A rows of a
 * 4-row tile stay in L1 while every token of the chunk passes, and the B block of an
 * expand item is reused by every token of the chunk. The cost of a batch is its FLOPs and
 * the bytes of its adapters' weights, whatever the number of distinct adapters: nothing
 * is launched or gathered per segment.
 *
 * Those bytes come from wherever the pool put each adapter: a decode step of many adapters
 * reads a few KiB here, a few KiB there, which the hardware prefetchers do not see coming
 * (on a 2-core EPYC, 8 KiB runs at random places read at a third of the contiguous rate).
 * So the items are handed out one at a time (dynamic scheduling: a thread the OS delays
 * takes fewer), each thread claiming its next item before it runs the one in hand and
 * prefetching that next item's weights into L2 meanwhile (`run_items`).
 */
#include <stdlib.h>

#include "native_common.h"
#include "native_tiles.h"

#define TOKEN_BLOCK 16    /* tokens per work item: enough items for the threads, A stays hot */
#define COLUMN_BLOCK 256  /* output columns per expand item: a 1 KiB run of each B row */

#define PREFETCH_MAX_BYTES (64 * 1024) /* of one item's weights: past that, a run is long
                                         enough for the hardware prefetchers */

/* Into L2 (not L1: the item in hand is using it) the cache lines of `rows` runs of `length`
 * elements `stride` apart, at most PREFETCH_MAX_BYTES of them. Always inlined, as are its
 * callers: GCC counts a prefetch as no effect, so a function that only prefetches is "pure"
 * to it, and a call to it whose result is unused is dropped (GCC 12 at -O3 dropped them). */
ALWAYS_INLINE void prefetch_rows(const float* first, int64_t rows, int64_t stride,
                                int64_t length) {
    const int64_t line = 64 / sizeof(float);
    int64_t budget = PREFETCH_MAX_BYTES / 64;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < length && budget > 0; c += line, budget--)
            __builtin_prefetch(first + r * stride + c, 0, 1);
}

typedef struct {
    int64_t first, end; /* tokens [first, end) of one segment */
    int32_t slot;       /* its adapter slot, or NO_ADAPTER */
} Chunk;

typedef struct {
    const int64_t* offsets;                 /* [num_slots, num_slices] element offsets */
    int64_t offset_slot_stride, offset_slice_stride;
    const int32_t* ranks;                   /* [num_slots, num_slices] */
    int64_t rank_slot_stride, rank_slice_stride;
} AdapterTable;

static inline int32_t table_rank(const AdapterTable* table, int32_t slot, int64_t slice) {
    return table->ranks[slot * table->rank_slot_stride + slice * table->rank_slice_stride];
}

static inline int64_t table_offset(const AdapterTable* table, int32_t slot, int64_t slice) {
    return table->offsets[slot * table->offset_slot_stride + slice * table->offset_slice_stride];
}

/* One work item of a kernel (`work`: its arguments), to prefetch or to run. */
typedef void (*ItemFunction)(const void* work, int64_t item);

/* Items [0, num_items) over `num_threads` threads (one, unless `parallel`), handed out one
 * at a time (a thread the OS delays takes fewer); each thread claims its next item before
 * it runs the one in hand, and prefetches that next item's weights meanwhile. Inlined with
 * its functions, so that each kernel's prefetch stays in its loop (see prefetch_rows). */
ALWAYS_INLINE void run_items(int64_t num_items, int parallel, int num_threads, const void* work,
                             ItemFunction prefetch, ItemFunction run) {
    int64_t claimed = 0; /* items claimed so far, by every thread */
#pragma omp parallel num_threads(num_threads) if (parallel)
    {
        int64_t item = __atomic_fetch_add(&claimed, 1, __ATOMIC_RELAXED);
        while (item < num_items) {
            int64_t next = __atomic_fetch_add(&claimed, 1, __ATOMIC_RELAXED);
            if (next < num_items) prefetch(work, next);
            run(work, item);
            item = next;
        }
    }
}

/* Status of segment bounds and slots; *fmas gets the batch's multiply-adds (for the
 * decision to fork) once every (slot, slice) used is checked against max_rank and the pool.
 * Rows of slice i's matrices hold in_dim elements (A) or, given slice_starts, that slice's
 * width (B). */
static int check_batch(const int32_t* starts, const int32_t* slots, int64_t num_segments,
                       int64_t num_tokens, int64_t num_slots, const AdapterTable* table,
                       int64_t num_slices, int64_t in_dim, const int64_t* slice_starts,
                       int64_t max_rank, int64_t pool_numel, int64_t* fmas) {
    if (starts[0] != 0 || starts[num_segments] != num_tokens) return STATUS_BAD_STARTS;
    *fmas = 0;
    for (int64_t s = 0; s < num_segments; s++) {
        if (starts[s + 1] < starts[s]) return STATUS_BAD_STARTS;
        int32_t slot = slots[s];
        if (slot == NO_ADAPTER) continue;
        if (slot < 0 || slot >= num_slots) return STATUS_BAD_SLOT;
        for (int64_t i = 0; i < num_slices; i++) {
            int64_t rank = table_rank(table, slot, i);
            if (rank < 0 || rank > max_rank) return STATUS_BAD_RANK;
            if (rank == 0) continue;
            int64_t row_length = slice_starts ? slice_starts[i + 1] - slice_starts[i] : in_dim;
            int64_t offset = table_offset(table, slot, i);
            if (offset < 0 || offset > pool_numel - rank * row_length) return STATUS_BAD_OFFSET;
            *fmas += (starts[s + 1] - starts[s]) * rank * row_length;
        }
    }
    return STATUS_OK;
}

/* Chunks of at most TOKEN_BLOCK tokens of every non-empty segment (NO_ADAPTER ones only
 * when keep_no_adapter); NULL when out of memory. The caller frees. */
static Chunk* token_chunks(const int32_t* starts, const int32_t* slots, int64_t num_segments,
                           int keep_no_adapter, int64_t* num_chunks) {
    int64_t count = 0;
    for (int64_t s = 0; s < num_segments; s++)
        if (keep_no_adapter || slots[s] != NO_ADAPTER)
            count += (starts[s + 1] - starts[s] + TOKEN_BLOCK - 1) / TOKEN_BLOCK;
    Chunk* chunks = malloc(sizeof(Chunk) * (size_t)max_i64(count, 1));
    if (chunks == NULL) return NULL;
    int64_t n = 0;
    for (int64_t s = 0; s < num_segments; s++) {
        if (!keep_no_adapter && slots[s] == NO_ADAPTER) continue;
        for (int64_t t = starts[s]; t < starts[s + 1]; t += TOKEN_BLOCK)
            chunks[n++] = (Chunk){t, min_i64(t + TOKEN_BLOCK, starts[s + 1]), slots[s]};
    }
    *num_chunks = n;
    return chunks;
}

/* y_rows[t][j] = dot(a[j], x_rows[t]) for j < rank and the tokens of one chunk. */
static void shrink_tile_rows(const float* a, int64_t in_dim, int64_t rank, const float* x,
                             int64_t x_stride, float* y, int64_t y_stride, int64_t num_tokens) {
    for (int64_t t = 0; t < num_tokens; t += 4) {
        int64_t tile_tokens = min_i64(4, num_tokens - t);
        if (tile_tokens == 1) { /* decode: 8 rows of A against one token */
            for (int64_t j = 0; j < rank; j += 8) {
                const float* rows[8];
                float out[8];
                for (int r = 0; r < 8; r++) rows[r] = a + min_i64(j + r, rank - 1) * in_dim;
                dot_tile_8x1(rows, x + t * x_stride, in_dim, out);
                for (int64_t r = 0; r < min_i64(8, rank - j); r++) y[t * y_stride + j + r] = out[r];
            }
            continue;
        }
        const float* tokens[4];
        for (int u = 0; u < 4; u++) tokens[u] = x + min_i64(t + u, num_tokens - 1) * x_stride;
        for (int64_t j = 0; j < rank; j += 4) {
            const float* rows[4];
            float out[4][4];
            for (int r = 0; r < 4; r++) rows[r] = a + min_i64(j + r, rank - 1) * in_dim;
            dot_tile_4x4(rows, tokens, in_dim, out);
            for (int64_t r = 0; r < min_i64(4, rank - j); r++)
                for (int64_t u = 0; u < tile_tokens; u++) y[(t + u) * y_stride + j + r] = out[r][u];
        }
    }
}

/* Shrink of one chunk and one slice: y rows of the chunk's tokens, zero past the rank. */
static void shrink_item(const float* x, int64_t x_stride, int64_t in_dim, const float* pool,
                        const AdapterTable* table, const Chunk* chunk, int64_t slice,
                        int64_t num_slices, int64_t max_rank, float* y) {
    int64_t rank = chunk->slot == NO_ADAPTER ? 0 : table_rank(table, chunk->slot, slice);
    int64_t y_stride = num_slices * max_rank;
    float* y_first = y + chunk->first * y_stride + slice * max_rank;
    for (int64_t t = 0; t < chunk->end - chunk->first; t++)
        memset(y_first + t * y_stride + rank, 0, sizeof(float) * (size_t)(max_rank - rank));
    if (rank == 0) return;
    const float* a = pool + table_offset(table, chunk->slot, slice);
    shrink_tile_rows(a, in_dim, rank, x + chunk->first * x_stride, x_stride, y_first, y_stride,
                     chunk->end - chunk->first);
}

typedef struct {
    const float* x;
    int64_t x_stride, in_dim;
    const float* pool;
    const AdapterTable* table;
    const Chunk* chunks;
    int64_t num_slices, max_rank;
    float* y;
} ShrinkWork; /* loraserve_lora_shrink's arguments; item = chunk * num_slices + slice */

ALWAYS_INLINE void shrink_run(const void* work, int64_t item) {
    const ShrinkWork* job = work;
    shrink_item(job->x, job->x_stride, job->in_dim, job->pool, job->table,
                &job->chunks[item / job->num_slices], item % job->num_slices, job->num_slices,
                job->max_rank, job->y);
}

/* Into L2, the A that shrink_run(item) will read. */
ALWAYS_INLINE void shrink_prefetch(const void* work, int64_t item) {
    const ShrinkWork* job = work;
    const Chunk* chunk = &job->chunks[item / job->num_slices];
    int64_t slice = item % job->num_slices;
    int64_t rank = chunk->slot == NO_ADAPTER ? 0 : table_rank(job->table, chunk->slot, slice);
    if (rank > 0)
        prefetch_rows(job->pool + table_offset(job->table, chunk->slot, slice), 1, 0,
                      rank * job->in_dim);
}

int loraserve_lora_shrink(
    const float* x,                /* [num_tokens, in_dim], row stride x_stride, unit columns */
    int64_t x_stride,              /* elements between consecutive tokens of x */
    int64_t num_tokens,            /* rows of x and y */
    int64_t in_dim,                /* columns of x, row length of every A */
    const float* pool,             /* the flat unified pool */
    int64_t pool_numel,            /* its elements: every A must lie inside */
    const int64_t* a_offsets,      /* [num_slots, num_slices] element offset of each A */
    int64_t offset_slot_stride,    /* a_offsets' strides (a strided view of the table) */
    int64_t offset_slice_stride,
    const int32_t* ranks,          /* [num_slots, num_slices] rank of each A, 0: untargeted */
    int64_t rank_slot_stride,      /* ranks' strides */
    int64_t rank_slice_stride,
    int64_t num_slots,             /* rows of the two tables */
    int64_t num_slices,            /* columns of the two tables: q/k/v = 3 */
    const int32_t* segment_starts, /* [num_segments + 1] token boundaries, 0 .. num_tokens */
    const int32_t* segment_slots,  /* [num_segments] slot of each segment, or NO_ADAPTER */
    int64_t num_segments,
    int64_t max_rank,              /* last dimension of y: at least every rank used */
    float* y,                      /* [num_tokens, num_slices, max_rank] contiguous, written */
    int num_threads)               /* OpenMP threads (torch.get_num_threads()) */
{
    AdapterTable table = {a_offsets, offset_slot_stride, offset_slice_stride,
                          ranks,     rank_slot_stride,   rank_slice_stride};
    int64_t fmas, num_chunks;
    int status = check_batch(segment_starts, segment_slots, num_segments, num_tokens, num_slots,
                             &table, num_slices, in_dim, NULL, max_rank, pool_numel, &fmas);
    if (status != STATUS_OK) return status;
    Chunk* chunks = token_chunks(segment_starts, segment_slots, num_segments, 1, &num_chunks);
    if (chunks == NULL) return STATUS_NO_MEMORY;
    ShrinkWork work = {x, x_stride, in_dim, pool, &table, chunks, num_slices, max_rank, y};
    int64_t num_items = num_chunks * num_slices;
    run_items(num_items, num_items > 1 && fmas >= PARALLEL_MIN_FMAS, num_threads, &work,
              shrink_prefetch, shrink_run);
    free(chunks);
    return STATUS_OK;
}

typedef struct {
    int64_t slice, first, end; /* columns [first, end) of slice `slice`, relative to it */
} ColumnBlock;

/* Blocks of at most COLUMN_BLOCK columns of every slice; NULL when out of memory. */
static ColumnBlock* column_blocks(const int64_t* slice_starts, int64_t num_slices,
                                  int64_t* num_blocks) {
    int64_t count = 0;
    for (int64_t i = 0; i < num_slices; i++)
        count += (slice_starts[i + 1] - slice_starts[i] + COLUMN_BLOCK - 1) / COLUMN_BLOCK;
    ColumnBlock* blocks = malloc(sizeof(ColumnBlock) * (size_t)max_i64(count, 1));
    if (blocks == NULL) return NULL;
    int64_t n = 0;
    for (int64_t i = 0; i < num_slices; i++) {
        int64_t width = slice_starts[i + 1] - slice_starts[i];
        for (int64_t c = 0; c < width; c += COLUMN_BLOCK)
            blocks[n++] = (ColumnBlock){i, c, min_i64(c + COLUMN_BLOCK, width)};
    }
    *num_blocks = n;
    return blocks;
}

typedef struct {
    const int64_t* offsets; /* [num_slots, num_slices] element offset of each g; -1: plain LoRA;
                               NULL: no DoRA table */
    int64_t slot_stride, slice_stride;
    const float* bias; /* [out_dim] the base projection's bias, or NULL */
} DoraTable;

static inline int64_t dora_offset(const DoraTable* dora, int32_t slot, int64_t slice) {
    if (dora->offsets == NULL) return -1;
    return dora->offsets[slot * dora->slot_stride + slice * dora->slice_stride];
}

/* Status of every g the batch reads: inside the pool, its slice's width long. */
static int check_dora(const int32_t* starts, const int32_t* slots, int64_t num_segments,
                      const AdapterTable* table, const DoraTable* dora, int64_t num_slices,
                      const int64_t* slice_starts, int64_t pool_numel) {
    if (dora->offsets == NULL) return STATUS_OK;
    for (int64_t s = 0; s < num_segments; s++) {
        if (slots[s] == NO_ADAPTER || starts[s + 1] == starts[s]) continue;
        for (int64_t i = 0; i < num_slices; i++) {
            int64_t offset = dora_offset(dora, slots[s], i);
            if (table_rank(table, slots[s], i) == 0 || offset < 0) continue;
            if (offset > pool_numel - (slice_starts[i + 1] - slice_starts[i]))
                return STATUS_BAD_OFFSET;
        }
    }
    return STATUS_OK;
}

/* Expand of one chunk and one column block: out rows += y rows @ B[:, block], up to
 * MAX_AXPY_ROWS tokens at a time so that each B vector loaded feeds as many accumulators.
 * DoRA (g != NULL, g and bias already at the block's first column): the rows' deltas are
 * summed in `delta`, then out = out + ((g - 1) * (out - bias) + g * delta). */
static void expand_rows(float* out, int64_t out_stride, const float* y, int64_t num_slices,
                        int64_t max_rank, const float* b, int64_t width, int64_t rank,
                        int64_t column, int64_t slice, int64_t first_token, int num_rows,
                        int64_t num_columns, const float* g, const float* bias) {
    float delta[MAX_AXPY_ROWS][COLUMN_BLOCK];
    float* acc[MAX_AXPY_ROWS];
    const float* w[MAX_AXPY_ROWS];
    for (int u = 0; u < num_rows; u++) {
        acc[u] = out + (first_token + u) * out_stride + column;
        w[u] = y + ((first_token + u) * num_slices + slice) * max_rank;
        if (g != NULL) {
            memset(delta[u], 0, sizeof(float) * (size_t)num_columns);
            acc[u] = delta[u];
        }
    }
    axpy_rows(acc, w, num_rows, b, width, rank, num_columns);
    if (g == NULL) return;
    for (int u = 0; u < num_rows; u++) {
        float* row = out + (first_token + u) * out_stride + column;
        for (int64_t c = 0; c < num_columns; c++) {
            float base = row[c], without_bias = bias ? base - bias[c] : base;
            row[c] = base + ((g[c] - 1.0f) * without_bias + g[c] * delta[u][c]);
        }
    }
}

static void expand_item(float* out, int64_t out_stride, const float* y, int64_t num_slices,
                        int64_t max_rank, const float* pool, const AdapterTable* table,
                        const DoraTable* dora, const int64_t* slice_starts, const Chunk* chunk,
                        const ColumnBlock* block) {
    int64_t rank = table_rank(table, chunk->slot, block->slice);
    if (rank == 0) return;
    int64_t width = slice_starts[block->slice + 1] - slice_starts[block->slice];
    const float* b = pool + table_offset(table, chunk->slot, block->slice) + block->first;
    int64_t column = slice_starts[block->slice] + block->first;
    int64_t g_offset = dora_offset(dora, chunk->slot, block->slice);
    const float* g = g_offset < 0 ? NULL : pool + g_offset + block->first;
    const float* bias = g != NULL && dora->bias != NULL ? dora->bias + column : NULL;
    for (int64_t t = chunk->first; t < chunk->end; t += MAX_AXPY_ROWS) {
        int num_rows = (int)min_i64(MAX_AXPY_ROWS, chunk->end - t);
        expand_rows(out, out_stride, y, num_slices, max_rank, b, width, rank, column,
                    block->slice, t, num_rows, block->end - block->first, g, bias);
    }
}

typedef struct {
    float* out;
    int64_t out_stride;
    const float* y;
    int64_t num_slices, max_rank;
    const float* pool;
    const AdapterTable* table;
    const DoraTable* dora;
    const int64_t* slice_starts;
    const Chunk* chunks;
    const ColumnBlock* blocks;
    int64_t num_blocks;
} ExpandWork; /* loraserve_lora_expand's arguments; item = chunk * num_blocks + block */

ALWAYS_INLINE void expand_run(const void* work, int64_t item) {
    const ExpandWork* job = work;
    expand_item(job->out, job->out_stride, job->y, job->num_slices, job->max_rank, job->pool,
                job->table, job->dora, job->slice_starts, &job->chunks[item / job->num_blocks],
                &job->blocks[item % job->num_blocks]);
}

/* Into L2, the rows of B that expand_run(item) will read. */
ALWAYS_INLINE void expand_prefetch(const void* work, int64_t item) {
    const ExpandWork* job = work;
    const Chunk* chunk = &job->chunks[item / job->num_blocks];
    const ColumnBlock* block = &job->blocks[item % job->num_blocks];
    int64_t rank = table_rank(job->table, chunk->slot, block->slice);
    if (rank == 0) return;
    int64_t width = job->slice_starts[block->slice + 1] - job->slice_starts[block->slice];
    prefetch_rows(job->pool + table_offset(job->table, chunk->slot, block->slice) + block->first,
                  rank, width, block->end - block->first);
}

int loraserve_lora_expand(
    float* out,                    /* [num_tokens, slice_starts[num_slices]], row stride */
    int64_t out_stride,            /* elements between consecutive tokens of out */
    int64_t num_tokens,            /* rows of out and y */
    const float* y,                /* [num_tokens, num_slices, max_rank] contiguous */
    int64_t max_rank,              /* last dimension of y: at least every rank used */
    const float* pool,             /* the flat unified pool */
    int64_t pool_numel,            /* its elements: every B must lie inside */
    const int64_t* b_offsets,      /* [num_slots, num_slices] element offset of each B */
    int64_t offset_slot_stride,    /* b_offsets' strides (a strided view of the table) */
    int64_t offset_slice_stride,
    const int32_t* ranks,          /* [num_slots, num_slices] rank of each B, 0: untargeted */
    int64_t rank_slot_stride,      /* ranks' strides */
    int64_t rank_slice_stride,
    int64_t num_slots,             /* rows of the two tables */
    int64_t num_slices,            /* columns of the two tables */
    const int64_t* slice_starts,   /* [num_slices + 1] first column of each slice in out */
    const int32_t* segment_starts, /* [num_segments + 1] token boundaries, 0 .. num_tokens */
    const int32_t* segment_slots,  /* [num_segments] slot of each segment, or NO_ADAPTER */
    int64_t num_segments,
    const int64_t* g_offsets,      /* [num_slots, num_slices] DoRA's g offsets, -1: plain; NULL */
    int64_t g_slot_stride,         /* g_offsets' strides */
    int64_t g_slice_stride,
    const float* bias,             /* [slice_starts[num_slices]] base bias (DoRA), or NULL */
    int num_threads)               /* OpenMP threads (torch.get_num_threads()) */
{
    AdapterTable table = {b_offsets, offset_slot_stride, offset_slice_stride,
                          ranks,     rank_slot_stride,   rank_slice_stride};
    DoraTable dora = {g_offsets, g_slot_stride, g_slice_stride, bias};
    int64_t fmas, num_chunks, num_blocks;
    int status = check_batch(segment_starts, segment_slots, num_segments, num_tokens, num_slots,
                             &table, num_slices, 0, slice_starts, max_rank, pool_numel, &fmas);
    if (status == STATUS_OK)
        status = check_dora(segment_starts, segment_slots, num_segments, &table, &dora,
                            num_slices, slice_starts, pool_numel);
    if (status != STATUS_OK) return status;
    Chunk* chunks = token_chunks(segment_starts, segment_slots, num_segments, 0, &num_chunks);
    ColumnBlock* blocks = column_blocks(slice_starts, num_slices, &num_blocks);
    if (chunks == NULL || blocks == NULL) {
        free(chunks);
        free(blocks);
        return STATUS_NO_MEMORY;
    }
    ExpandWork work = {out, out_stride, y, num_slices, max_rank, pool, &table, &dora,
                       slice_starts, chunks, blocks, num_blocks};
    int64_t num_items = num_chunks * num_blocks;
    run_items(num_items, num_items > 1 && fmas >= PARALLEL_MIN_FMAS, num_threads, &work,
              expand_prefetch, expand_run);
    free(chunks);
    free(blocks);
    return STATUS_OK;
}
